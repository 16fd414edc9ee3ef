//! The DINOv2 meta-architecture: student and teacher networks and the training step.
//!
//! Mirrors the official `SSLMetaArch`: student = {backbone, dino_head, ibot_head (when
//! separate)}, teacher = the same modules, initialised as a copy of the student, never trained
//! by gradients (EMA only) and always run in eval mode.

use tch::{Device, Kind, Tensor, nn};

use crate::dist::Collective;
use crate::loss::{
    CenteringMode, DinoLoss, DinoLossConfig, IbotLoss, IbotLossConfig, LossError,
    koleo_per_crop_sum,
};
use crate::model::{DinoHead, DinoHeadConfig, DinoVisionTransformer, ModelError, VitConfig};
use crate::optim::param_groups::{ParamGroupError, student_param_multipliers};
use crate::optim::{
    AdamW, AdamWConfig, ClipStats, OptimError, ParamGroupConfig, ScheduleValues, clip_grad_norm,
    ema_update,
};
use crate::precision::{
    DynamicLossScaler, LossScalerConfig, LossScalerError, Precision, StepDecision,
};

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

/// One collated batch, as the official `collate_data_and_cast` produces it.
#[derive(Debug)]
pub struct SslBatch {
    /// `[2·B, 3, H, W]`, crop-major.
    pub global_crops: Tensor,
    /// `[n_local·B, 3, h, w]`, crop-major (may have zero rows when there are no local crops).
    pub local_crops: Tensor,
    /// `[2·B, N]` bool, `true` = masked.
    pub masks: Tensor,
    /// `[n]` int64: positions of `true` in `masks.flatten()`.
    pub mask_indices_list: Tensor,
    /// `[n]` float: `1 / masked count` of each masked patch's image.
    pub masks_weight: Tensor,
    /// `n` (summed over ranks by the Sinkhorn-Knopp iBOT targets).
    pub n_masked_patches: i64,
    /// Rows of the padded masked-token buffers (`≥ n`).
    pub upperbound: i64,
}

impl SslBatch {
    pub fn n_masked(&self) -> i64 {
        self.mask_indices_list.size()[0]
    }

    /// Checks the shapes against each other and against the local-crop count.
    pub fn validate(&self, n_local_crops: i64) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::BadInput(m));
        let g = self.global_crops.size();
        if g.len() != 4 || g[0] % 2 != 0 || g[0] == 0 {
            return bad(format!("global_crops must be [2*B, 3, H, W], got {g:?}"));
        }
        let b = g[0] / 2;
        let l = self.local_crops.size();
        if n_local_crops > 0 && (l.len() != 4 || l[0] != n_local_crops * b) {
            return bad(format!(
                "local_crops must be [{}*{b}, 3, h, w], got {l:?}",
                n_local_crops
            ));
        }
        let m = self.masks.size();
        if m.len() != 2 || m[0] != g[0] || self.masks.kind() != Kind::Bool {
            return bad(format!(
                "masks must be bool [{}, N], got {:?} {m:?}",
                g[0],
                self.masks.kind()
            ));
        }
        let n = self.n_masked();
        if self.masks_weight.size() != [n] {
            return bad(format!(
                "masks_weight must have {n} entries, got {:?}",
                self.masks_weight.size()
            ));
        }
        if self.upperbound < n {
            return bad(format!(
                "upperbound {} is smaller than the {n} masked patches",
                self.upperbound
            ));
        }
        Ok(())
    }
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

/// Errors of the meta-architecture.
#[derive(Debug, thiserror::Error)]
pub enum MetaArchError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Loss(#[from] LossError),
    #[error(transparent)]
    Optim(#[from] OptimError),
    #[error(transparent)]
    ParamGroup(#[from] ParamGroupError),
    #[error(transparent)]
    LossScaler(#[from] LossScalerError),
    #[error("{field}: {message}")]
    InvalidConfig {
        field: &'static str,
        message: String,
    },
    /// The objective became NaN or infinite (the trainer exits with NON_FINITE_LOSS).
    #[error("non-finite loss: {0:?}")]
    NonFiniteLoss(LossValues),
}

/// Everything the meta-architecture needs (official `student`, `dino`, `ibot`, `train`,
/// `crops` and `optim` keys).
#[derive(Debug, Clone, PartialEq)]
pub struct MetaArchConfig {
    /// Student backbone (the teacher is the same without stochastic depth).
    pub student: VitConfig,
    /// DINO head (`dino.head_*`); `in_dim` must be the backbone width.
    pub dino_head: DinoHeadConfig,
    /// `Some` = separate iBOT head (`ibot.separate_head`), `None` = shared with DINO.
    pub ibot_head: Option<DinoHeadConfig>,
    /// `dino.loss_weight` (1.0); 0 turns the DINO loss off.
    pub dino_loss_weight: f64,
    /// `dino.koleo_loss_weight` (0.1).
    pub koleo_loss_weight: f64,
    /// `ibot.loss_weight` (1.0); 0 turns iBOT off.
    pub ibot_loss_weight: f64,
    /// `train.centering`.
    pub centering: CenteringMode,
    /// `crops.local_crops_number` (8).
    pub n_local_crops: i64,
    /// `optim.clip_grad` (3.0); 0 disables clipping.
    pub clip_grad: f64,
    /// Student softmax temperature (0.1) and center momentum (0.9) of both losses.
    pub student_temp: f64,
    pub center_momentum: f64,
    pub param_groups: ParamGroupConfig,
    pub adamw: AdamWConfig,
    /// `precision.lossScale`: the fp16 loss scaler's settings (used only in fp16).
    pub loss_scaler: LossScalerConfig,
    pub precision: Precision,
}

impl MetaArchConfig {
    /// The official default config for a given backbone (heads 65536/2048/256, shared iBOT head).
    pub fn official(student: VitConfig) -> Self {
        let head = DinoHeadConfig::official(student.embed_dim);
        Self {
            student,
            dino_head: head,
            ibot_head: None,
            dino_loss_weight: 1.0,
            koleo_loss_weight: 0.1,
            ibot_loss_weight: 1.0,
            centering: CenteringMode::Centering,
            n_local_crops: 8,
            clip_grad: 3.0,
            student_temp: 0.1,
            center_momentum: 0.9,
            param_groups: ParamGroupConfig::default(),
            adamw: AdamWConfig::default(),
            loss_scaler: LossScalerConfig::default(),
            precision: Precision::Fp32,
        }
    }

    fn validate(&self) -> Result<(), MetaArchError> {
        let bad = |field, message: String| Err(MetaArchError::InvalidConfig { field, message });
        if self.dino_head.in_dim != self.student.embed_dim {
            return bad(
                "dino.head",
                format!(
                    "in_dim {} must equal embed_dim {}",
                    self.dino_head.in_dim, self.student.embed_dim
                ),
            );
        }
        if let Some(h) = &self.ibot_head
            && h.in_dim != self.student.embed_dim
        {
            return bad(
                "ibot.head",
                format!(
                    "in_dim {} must equal embed_dim {}",
                    h.in_dim, self.student.embed_dim
                ),
            );
        }
        if self.n_local_crops < 0 {
            return bad(
                "crops.local_crops_number",
                format!("must be >= 0, got {}", self.n_local_crops),
            );
        }
        for (field, v) in [
            ("dino.loss_weight", self.dino_loss_weight),
            ("dino.koleo_loss_weight", self.koleo_loss_weight),
            ("ibot.loss_weight", self.ibot_loss_weight),
            ("optim.clip_grad", self.clip_grad),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(field, format!("must be a finite number >= 0, got {v}"));
            }
        }
        Ok(())
    }

    pub fn do_dino(&self) -> bool {
        self.dino_loss_weight > 0.0
    }
    pub fn do_koleo(&self) -> bool {
        self.koleo_loss_weight > 0.0
    }
    pub fn do_ibot(&self) -> bool {
        self.ibot_loss_weight > 0.0
    }
}

/// The losses of one step, as the official `loss_dict` reports them, plus the objective
/// that was back-propagated (before loss scaling).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LossValues {
    pub dino_local_crops_loss: Option<f64>,
    pub dino_global_crops_loss: Option<f64>,
    pub koleo_loss: Option<f64>,
    pub ibot_loss: Option<f64>,
    pub objective: f64,
}

impl LossValues {
    /// Averages the values over the ranks, as the official trainer reduces its `loss_dict`
    /// before logging and before its NaN check: every rank then takes the same decision.
    fn mean_over_ranks(&mut self, collective: &dyn Collective) {
        let mut slots: Vec<&mut f64> = [
            self.dino_local_crops_loss.as_mut(),
            self.dino_global_crops_loss.as_mut(),
            self.koleo_loss.as_mut(),
            self.ibot_loss.as_mut(),
        ]
        .into_iter()
        .flatten()
        .chain([&mut self.objective])
        .collect();
        let mut values: Vec<f64> = slots.iter().map(|v| **v).collect();
        crate::dist::mean_over_ranks(collective, &mut values);
        for (slot, v) in slots.iter_mut().zip(values) {
            **slot = v;
        }
    }
}

/// Result of [`MetaArch::train_step`].
#[derive(Debug, Clone)]
pub struct StepOutcome {
    pub losses: LossValues,
    /// Gradient norm before clipping and clip coefficient, per student sub-module.
    pub clip: Vec<(String, ClipStats)>,
    /// False when fp16 loss scaling found a non-finite gradient and skipped the update.
    pub applied: bool,
}

/// Student, teacher, losses with their centers, optimizer and loss scaler.
#[derive(Debug)]
pub struct MetaArch {
    pub config: MetaArchConfig,
    pub student: SslNetwork,
    pub teacher: SslNetwork,
    pub dino_loss: DinoLoss,
    pub ibot_loss: Option<IbotLoss>,
    pub optimizer: AdamW,
    pub loss_scaler: Option<DynamicLossScaler>,
}

impl MetaArch {
    /// Builds the student with the official init, copies it into the teacher (as the official
    /// `prepare_for_distributed_training`), and sets up losses and the optimizer.
    pub fn new(config: MetaArchConfig, device: Device) -> Result<Self, MetaArchError> {
        config.validate()?;
        let ibot_head = if config.do_ibot() {
            config.ibot_head.as_ref()
        } else {
            None
        };
        let student = SslNetwork::new(device, &config.student, &config.dino_head, ibot_head)?;
        let teacher_vit = VitConfig {
            drop_path_rate: 0.0,
            ..config.student.clone()
        };
        let mut teacher = SslNetwork::new(device, &teacher_vit, &config.dino_head, ibot_head)?;
        copy_weights(&teacher.vs, &student.vs);
        teacher.vs.freeze();
        let dino_loss = DinoLoss::new(
            &DinoLossConfig {
                out_dim: config.dino_head.out_dim,
                student_temp: config.student_temp,
                center_momentum: config.center_momentum,
            },
            device,
        )?;
        let ibot_loss = config
            .do_ibot()
            .then(|| {
                IbotLoss::new(
                    &IbotLossConfig {
                        out_dim: student.patch_head().config.out_dim,
                        student_temp: config.student_temp,
                        center_momentum: config.center_momentum,
                    },
                    device,
                )
            })
            .transpose()?;
        let depth = config.student.depth as usize;
        let mut params = Vec::new();
        for name in SUBMODULES {
            for (key, var) in student.submodule_variables(name) {
                let mult = student_param_multipliers(&key, depth, &config.param_groups)?;
                params.push((key, var, mult));
            }
        }
        let optimizer = AdamW::new(config.adamw, params)?;
        let loss_scaler = config
            .precision
            .needs_loss_scaling()
            .then(|| DynamicLossScaler::new(config.loss_scaler))
            .transpose()?;
        Ok(Self {
            config,
            student,
            teacher,
            dino_loss,
            ibot_loss,
            optimizer,
            loss_scaler,
        })
    }

    /// Teacher targets `(dino [2·B, K] swapped order, ibot [n, K])`, updating the centers.
    /// `frozen` replaces the EMA teacher as the source of the targets (distillation).
    fn teacher_targets(
        &mut self,
        batch: &SslBatch,
        teacher_temp: f64,
        collective: &dyn Collective,
        frozen: Option<&SslNetwork>,
    ) -> Result<(Tensor, Option<Tensor>), MetaArchError> {
        let kind = self.config.precision.compute_kind();
        let out = frozen.unwrap_or(&self.teacher).teacher_head_outputs(
            batch,
            kind,
            self.config.do_ibot(),
        )?;
        let mode = self.config.centering;
        let dino = tch::no_grad(|| {
            self.dino_loss
                .teacher_targets(mode, &out.cls_after_head, teacher_temp, collective)
        })?;
        let ibot = match (&mut self.ibot_loss, &out.masked_patches_after_head) {
            (Some(loss), Some(t)) => Some(tch::no_grad(|| {
                loss.teacher_targets(mode, t, teacher_temp, batch.n_masked_patches, collective)
            })?),
            _ => None,
        };
        Ok((dino, ibot))
    }

    /// The official `forward_backward`: teacher targets, student forward, DINO (local and
    /// global), KoLeo and iBOT losses, and backward of their weighted sum (scaled in fp16).
    pub fn forward_backward(
        &mut self,
        batch: &SslBatch,
        teacher_temp: f64,
        collective: &dyn Collective,
    ) -> Result<LossValues, MetaArchError> {
        self.forward_backward_from(batch, teacher_temp, collective, None)
    }

    /// [`Self::forward_backward`] with the targets taken from `frozen` when given (the frozen
    /// teacher of distillation) instead of the EMA teacher.
    pub fn forward_backward_from(
        &mut self,
        batch: &SslBatch,
        teacher_temp: f64,
        collective: &dyn Collective,
        frozen: Option<&SslNetwork>,
    ) -> Result<LossValues, MetaArchError> {
        let cfg = self.config.clone();
        batch.validate(cfg.n_local_crops)?;
        let (dino_targets, ibot_targets) =
            self.teacher_targets(batch, teacher_temp, collective, frozen)?;
        let kind = cfg.precision.compute_kind();
        let s = self
            .student
            .student_outputs(batch, kind, cfg.n_local_crops, cfg.do_ibot())?;

        let mut values = LossValues::default();
        let mut objective: Option<Tensor> = None;
        let mut add = |t: Tensor| {
            objective = Some(match objective.take() {
                None => t,
                Some(acc) => acc + t,
            });
        };
        let n_local = cfg.n_local_crops as usize;
        let local = (n_local > 0).then_some(&s.local_cls_after_head);
        let dino =
            self.dino_loss
                .crop_losses(&s.global_cls_after_head, local, n_local, &dino_targets)?;
        // The official step always adds the local term (when there are local crops) and
        // the global term and KoLeo only with DINO on.
        if let Some(l) = dino.local {
            values.dino_local_crops_loss = Some(l.double_value(&[]));
            add(l * cfg.dino_loss_weight);
        }
        if cfg.do_dino() {
            values.dino_global_crops_loss = Some(dino.global.double_value(&[]));
            add(dino.global * cfg.dino_loss_weight);
            if cfg.do_koleo() {
                let koleo = koleo_per_crop_sum(&s.global_cls_tokens, 2)? * cfg.koleo_loss_weight;
                values.koleo_loss = Some(koleo.double_value(&[]) / 2.0);
                add(koleo);
            }
        }
        if let (Some(loss), Some(targets), Some(student)) =
            (&self.ibot_loss, &ibot_targets, &s.masked_patches_after_head)
        {
            let n_images = batch.masks.size()[0];
            // × 2 (both global crops together) × 1/2 (iBOT loss scale) as the official step.
            let ibot =
                loss.forward_masked(student, targets, &batch.masks_weight, n_images)? * 2.0 * 0.5;
            values.ibot_loss = Some(ibot.double_value(&[]) / 2.0);
            add(ibot * cfg.ibot_loss_weight);
        }
        let Some(objective) = objective else {
            return Err(MetaArchError::InvalidConfig {
                field: "dino.loss_weight",
                message: "every loss is switched off; enable DINO or iBOT".into(),
            });
        };
        values.objective = objective.double_value(&[]);
        values.mean_over_ranks(collective);
        if !values.objective.is_finite() {
            return Err(MetaArchError::NonFiniteLoss(values));
        }
        match &self.loss_scaler {
            Some(scaler) => scaler.scale_loss(&objective).backward(),
            None => objective.backward(),
        }
        Ok(values)
    }

    /// Gradients of one student sub-module (those that received one).
    fn submodule_grads(&self, name: &str) -> Vec<Tensor> {
        self.student
            .submodule_variables(name)
            .into_iter()
            .map(|(_, v)| v.grad())
            .filter(Tensor::defined)
            .collect()
    }

    /// One training iteration in the official order: schedules, zero_grad, forward/backward,
    /// (fp16: unscale), per-sub-module gradient clipping, AdamW, teacher EMA.
    pub fn train_step(
        &mut self,
        batch: &SslBatch,
        hyper: &ScheduleValues,
        collective: &dyn Collective,
    ) -> Result<StepOutcome, MetaArchError> {
        self.train_step_from(batch, hyper, collective, None, Some(hyper.momentum))
    }

    /// [`Self::train_step`] for distillation: targets from `frozen` when given, and the EMA
    /// network (`self.teacher`) updated with `ema_momentum`, or left alone when it is None.
    pub fn train_step_from(
        &mut self,
        batch: &SslBatch,
        hyper: &ScheduleValues,
        collective: &dyn Collective,
        frozen: Option<&SslNetwork>,
        ema_momentum: Option<f64>,
    ) -> Result<StepOutcome, MetaArchError> {
        self.optimizer
            .apply_schedule(hyper.lr, hyper.wd, hyper.last_layer_lr);
        self.optimizer.zero_grad();
        let losses = self.forward_backward_from(batch, hyper.teacher_temp, collective, frozen)?;
        if collective.world_size() > 1 {
            // Data parallelism: average before unscaling and clipping, as DDP/FSDP do, so
            // every rank applies the same update.
            let mut grads: Vec<Tensor> = SUBMODULES
                .iter()
                .flat_map(|m| self.submodule_grads(m))
                .collect();
            crate::dist::average_gradients(collective, &mut grads);
        }

        let mut found_non_finite = false;
        if let Some(scaler) = &self.loss_scaler {
            let mut all: Vec<Tensor> = SUBMODULES
                .iter()
                .flat_map(|m| self.submodule_grads(m))
                .collect();
            found_non_finite = scaler.unscale(&mut all);
        }
        let mut clip = Vec::new();
        if self.config.clip_grad > 0.0 {
            for name in SUBMODULES {
                let mut grads = self.submodule_grads(name);
                if !grads.is_empty() {
                    clip.push((
                        name.to_string(),
                        clip_grad_norm(&mut grads, self.config.clip_grad),
                    ));
                }
            }
        }
        let applied = match &mut self.loss_scaler {
            Some(scaler) => scaler.update(found_non_finite) == StepDecision::Apply,
            None => true,
        };
        if applied {
            self.optimizer.step()?;
        }
        if let Some(momentum) = ema_momentum {
            self.update_teacher(momentum)?;
        }
        Ok(StepOutcome {
            losses,
            clip,
            applied,
        })
    }

    /// Teacher EMA over every parameter: `teacher = m · teacher + (1 − m) · student`.
    pub fn update_teacher(&self, momentum: f64) -> Result<(), MetaArchError> {
        let mut teacher = Vec::new();
        let mut student = Vec::new();
        for name in SUBMODULES {
            teacher.extend(
                self.teacher
                    .submodule_variables(name)
                    .into_iter()
                    .map(|(_, v)| v),
            );
            student.extend(
                self.student
                    .submodule_variables(name)
                    .into_iter()
                    .map(|(_, v)| v),
            );
        }
        ema_update(&teacher, &student, momentum)?;
        Ok(())
    }
}

#[cfg(test)]
mod parity_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::Single;

    fn tiny_config() -> MetaArchConfig {
        let vit = VitConfig {
            img_size: 56,
            embed_dim: 32,
            depth: 2,
            num_heads: 2,
            drop_path_rate: 0.2,
            ..VitConfig::vit_small(14)
        };
        let head = DinoHeadConfig {
            in_dim: 32,
            out_dim: 24,
            hidden_dim: 16,
            bottleneck_dim: 8,
            nlayers: 3,
            mlp_bias: true,
        };
        MetaArchConfig {
            dino_head: head,
            n_local_crops: 2,
            ..MetaArchConfig::official(vit)
        }
    }

    /// A batch of 2 images: 2 global 56² crops (first image's crops masked), 2 local 28² crops.
    fn tiny_batch() -> SslBatch {
        tch::manual_seed(0);
        let opts = (Kind::Float, Device::Cpu);
        let mut mask_rows = vec![false; 4 * 16];
        for i in [0usize, 1, 4, 5] {
            mask_rows[i] = true; // image 0, crop 0
            mask_rows[2 * 16 + i + 10] = true; // image 0, crop 1
        }
        let masks = Tensor::from_slice(&mask_rows).reshape([4, 16]);
        let indices = masks.flatten(0, -1).nonzero().squeeze_dim(1);
        let n = indices.size()[0];
        SslBatch {
            global_crops: Tensor::randn([4, 3, 56, 56], opts),
            local_crops: Tensor::randn([4, 3, 28, 28], opts),
            masks,
            mask_indices_list: indices,
            masks_weight: Tensor::full([n], 0.25, opts),
            n_masked_patches: n,
            upperbound: n + 3,
        }
    }

    fn hyper() -> ScheduleValues {
        ScheduleValues {
            lr: 1e-3,
            wd: 0.04,
            momentum: 0.9,
            teacher_temp: 0.04,
            last_layer_lr: 1e-3,
        }
    }

    #[test]
    fn the_teacher_starts_as_a_frozen_copy_of_the_student() {
        let arch = MetaArch::new(tiny_config(), Device::Cpu).unwrap();
        let t = arch.teacher.vs.variables();
        for (k, v) in arch.student.vs.variables() {
            assert!(v.equal(&t[&k]), "{k}");
            assert!(
                !t[&k].requires_grad(),
                "{k} of the teacher must not require grad"
            );
        }
        // Shared iBOT head: no ibot_head parameters.
        assert!(arch.student.submodule_variables("ibot_head").is_empty());
    }

    #[test]
    fn an_fp16_arch_scales_the_loss_with_the_configured_scaler() {
        let scaler = LossScalerConfig {
            init_scale: 512.0,
            growth_interval: 9,
            ..LossScalerConfig::default()
        };
        let cfg = MetaArchConfig {
            loss_scaler: scaler,
            precision: Precision::Fp16,
            ..tiny_config()
        };
        let arch = MetaArch::new(cfg, Device::Cpu).unwrap();
        let s = arch.loss_scaler.as_ref().expect("fp16 scales the loss");
        assert_eq!((s.scale(), s.config()), (512.0, scaler));
        let fp32 = MetaArch::new(tiny_config(), Device::Cpu).unwrap();
        assert!(fp32.loss_scaler.is_none());
    }

    #[test]
    fn a_shared_head_step_with_drop_path_updates_student_and_teacher() {
        let mut arch = MetaArch::new(tiny_config(), Device::Cpu).unwrap();
        let before = arch.student.vs.variables()["backbone.blocks.1.mlp.fc1.weight"].copy();
        let teacher_before = arch.teacher.vs.variables()["dino_head.mlp.0.weight"].copy();
        let out = arch.train_step(&tiny_batch(), &hyper(), &Single).unwrap();
        assert!(out.applied);
        let l = &out.losses;
        for v in [
            l.dino_local_crops_loss,
            l.dino_global_crops_loss,
            l.koleo_loss,
            l.ibot_loss,
        ] {
            assert!(v.is_some_and(f64::is_finite), "{l:?}");
        }
        assert_eq!(
            out.clip.iter().map(|c| c.0.as_str()).collect::<Vec<_>>(),
            ["backbone", "dino_head"]
        );
        assert!(!arch.student.vs.variables()["backbone.blocks.1.mlp.fc1.weight"].equal(&before));
        assert!(!arch.teacher.vs.variables()["dino_head.mlp.0.weight"].equal(&teacher_before));
    }

    #[test]
    fn a_separate_head_sinkhorn_step_without_local_crops_runs() {
        let mut cfg = tiny_config();
        cfg.ibot_head = Some(DinoHeadConfig {
            out_dim: 12,
            ..cfg.dino_head.clone()
        });
        cfg.centering = CenteringMode::SinkhornKnopp;
        cfg.n_local_crops = 0;
        let mut arch = MetaArch::new(cfg, Device::Cpu).unwrap();
        let mut batch = tiny_batch();
        batch.local_crops = Tensor::zeros([0, 3, 28, 28], (Kind::Float, Device::Cpu));
        let out = arch.train_step(&batch, &hyper(), &Single).unwrap();
        assert!(out.losses.dino_local_crops_loss.is_none());
        assert!(out.losses.ibot_loss.is_some());
        assert_eq!(out.clip.len(), 3);
        assert!(
            arch.dino_loss
                .center()
                .center()
                .abs()
                .sum(Kind::Float)
                .double_value(&[])
                == 0.0
        );
    }

    #[test]
    fn a_head_wider_than_the_backbone_is_a_config_error() {
        let mut cfg = tiny_config();
        cfg.dino_head.in_dim = 64;
        let err = MetaArch::new(cfg, Device::Cpu).unwrap_err().to_string();
        assert!(
            err.contains("dino.head") && err.contains("embed_dim"),
            "{err}"
        );
    }

    #[test]
    fn a_batch_with_the_wrong_local_crop_count_is_rejected() {
        let mut arch = MetaArch::new(tiny_config(), Device::Cpu).unwrap();
        let mut batch = tiny_batch();
        batch.local_crops = batch.local_crops.narrow(0, 0, 2);
        let err = arch
            .train_step(&batch, &hyper(), &Single)
            .unwrap_err()
            .to_string();
        assert!(err.contains("local_crops"), "{err}");
    }
}
