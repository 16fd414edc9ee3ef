//! The student and teacher networks and their forward passes in the step.

use tch::{Device, Kind, Tensor, nn};

use super::SslBatch;
use crate::model::{DinoHead, DinoHeadConfig, DinoVisionTransformer, ModelError, VitConfig};

/// Names of the student sub-modules, each clipped with its own gradient norm.
pub const SUBMODULES: [&str; 3] = ["backbone", "dino_head", "ibot_head"];

/// One network (student or teacher): its own var store with keys `backbone.*`,
/// `dino_head.*` and, with a separate iBOT head, `ibot_head.*` (the official key names).
#[derive(Debug)]
pub struct SslNetwork {
    pub vs: nn::VarStore,
    pub backbone: DinoVisionTransformer,
    pub dino_head: DinoHead,
    pub ibot_head: Option<DinoHead>,
}

impl SslNetwork {
    pub fn new(
        device: Device,
        vit: &VitConfig,
        dino_head: &DinoHeadConfig,
        ibot_head: Option<&DinoHeadConfig>,
    ) -> Result<Self, ModelError> {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let backbone = DinoVisionTransformer::new(&(&root / "backbone"), vit)?;
        let dino_head = DinoHead::new(&(&root / "dino_head"), dino_head)?;
        let ibot_head = ibot_head
            .map(|c| DinoHead::new(&(&root / "ibot_head"), c))
            .transpose()?;
        Ok(Self {
            vs,
            backbone,
            dino_head,
            ibot_head,
        })
    }

    /// The head that scores masked patch tokens: the separate iBOT head, else the DINO head.
    pub fn patch_head(&self) -> &DinoHead {
        self.ibot_head.as_ref().unwrap_or(&self.dino_head)
    }

    /// Variables of one sub-module (`"backbone"`, `"dino_head"`, `"ibot_head"`), sorted by name.
    pub fn submodule_variables(&self, name: &str) -> Vec<(String, Tensor)> {
        let prefix = format!("{name}.");
        let mut vars: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }
}

/// Copies every variable of `src` into `dst` (same keys and shapes).
pub fn copy_weights(dst: &nn::VarStore, src: &nn::VarStore) {
    let src_vars = src.variables();
    tch::no_grad(|| {
        for (k, v) in dst.variables() {
            v.shallow_clone().copy_(&src_vars[&k]);
        }
    });
}

/// Teacher head outputs of one step (fp32).
#[derive(Debug)]
pub struct TeacherHeadOutputs {
    /// DINO head on the global CLS tokens, crop blocks swapped (crop 1 first) `[2·B, K]`.
    pub cls_after_head: Tensor,
    /// Patch head on the masked patch tokens `[n, K_ibot]` (with iBOT on).
    pub masked_patches_after_head: Option<Tensor>,
}

/// Student outputs of one step (head outputs in fp32).
#[derive(Debug)]
pub struct StudentOutputs {
    /// `[n_local·B, K]`.
    pub local_cls_after_head: Tensor,
    /// `[2·B, K]`.
    pub global_cls_after_head: Tensor,
    /// `[n, K_ibot]` (with iBOT on).
    pub masked_patches_after_head: Option<Tensor>,
    /// Backbone CLS tokens of the global crops `[2·B, D]` (KoLeo input).
    pub global_cls_tokens: Tensor,
}

/// Zero buffer of `rows` rows whose first `n` rows are the masked patch tokens
/// (official padded `upperbound` buffers; only the first `n` rows are ever used).
fn masked_patch_buffer(patch_tokens: &Tensor, indices: &Tensor, rows: i64) -> Tensor {
    let d = patch_tokens.size()[2];
    let selected = patch_tokens.flatten(0, 1).index_select(0, indices);
    let n = selected.size()[0];
    let pad = Tensor::zeros([rows - n, d], (selected.kind(), selected.device()));
    Tensor::cat(&[selected, pad], 0)
}

impl SslNetwork {
    /// The official `get_teacher_output` head part (no grad, eval mode): backbone on the
    /// global crops, CLS tokens in swapped crop order, masked patch tokens in padded buffers.
    pub fn teacher_head_outputs(
        &self,
        batch: &SslBatch,
        kind: Kind,
        do_ibot: bool,
    ) -> Result<TeacherHeadOutputs, ModelError> {
        tch::no_grad(|| {
            let out =
                self.backbone
                    .forward_features(&batch.global_crops.to_kind(kind), None, false)?;
            let cls = out.x_norm_clstoken.chunk(2, 0);
            let cls = Tensor::cat(&[&cls[1], &cls[0]], 0);
            let n_cls = cls.size()[0];
            let n = batch.n_masked();
            if !do_ibot {
                return Ok(TeacherHeadOutputs {
                    cls_after_head: self.dino_head.forward(&cls).to_kind(Kind::Float),
                    masked_patches_after_head: None,
                });
            }
            let buffer = masked_patch_buffer(
                &out.x_norm_patchtokens,
                &batch.mask_indices_list,
                batch.upperbound,
            );
            let (cls_after, patches_after) = match &self.ibot_head {
                None => {
                    // Shared head: CLS rows and the patch buffer go through it together.
                    let y = self.dino_head.forward(&Tensor::cat(&[&cls, &buffer], 0));
                    (y.narrow(0, 0, n_cls), y.narrow(0, n_cls, n))
                }
                Some(ibot) => (
                    self.dino_head.forward(&cls),
                    ibot.forward(&buffer).narrow(0, 0, n),
                ),
            };
            Ok(TeacherHeadOutputs {
                cls_after_head: cls_after.to_kind(Kind::Float),
                masked_patches_after_head: Some(patches_after.to_kind(Kind::Float)),
            })
        })
    }

    /// The official student forward: backbone on the masked global crops and on the local
    /// crops (separate forwards, stochastic depth on), heads on the CLS tokens and on the
    /// padded masked-patch buffer.
    pub fn student_outputs(
        &self,
        batch: &SslBatch,
        kind: Kind,
        n_local_crops: i64,
        do_ibot: bool,
    ) -> Result<StudentOutputs, ModelError> {
        let global = self.backbone.forward_features(
            &batch.global_crops.to_kind(kind),
            Some(&batch.masks),
            true,
        )?;
        let local_cls = if n_local_crops > 0 {
            self.backbone
                .forward_features(&batch.local_crops.to_kind(kind), None, true)?
                .x_norm_clstoken
        } else {
            Tensor::zeros(
                [0, self.backbone.embed_dim()],
                (kind, batch.global_crops.device()),
            )
        };
        let global_cls = global.x_norm_clstoken;
        let (n_local, n_global) = (local_cls.size()[0], global_cls.size()[0]);
        let n = batch.n_masked();
        let mut head_inputs = vec![local_cls, global_cls.shallow_clone()];
        let mut masked_after = None;
        if do_ibot {
            let buffer = masked_patch_buffer(
                &global.x_norm_patchtokens,
                &batch.mask_indices_list,
                batch.upperbound,
            );
            match &self.ibot_head {
                None => head_inputs.push(buffer),
                Some(ibot) => masked_after = Some(ibot.forward(&buffer).narrow(0, 0, n)),
            }
        }
        // One DINO-head pass over all rows, as the official concatenated call.
        let y = self.dino_head.forward(&Tensor::cat(&head_inputs, 0));
        if do_ibot && self.ibot_head.is_none() {
            masked_after = Some(y.narrow(0, n_local + n_global, n));
        }
        Ok(StudentOutputs {
            local_cls_after_head: y.narrow(0, 0, n_local).to_kind(Kind::Float),
            global_cls_after_head: y.narrow(0, n_local, n_global).to_kind(Kind::Float),
            masked_patches_after_head: masked_after.map(|t| t.to_kind(Kind::Float)),
            global_cls_tokens: global_cls.to_kind(Kind::Float),
        })
    }
}
