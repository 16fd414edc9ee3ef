//! The frozen teacher of distillation: `spec.teacher` -> backbone + DINO/iBOT heads in one
//! frozen [`SslNetwork`], plus the identity (format, path, sha256) a resume must match.
//!
//! Sources:
//! - a Dinoflow checkpoint directory: its `teacher.safetensors` (backbone and heads, the EMA
//!   teacher of pretraining); the backbone architecture comes from the `training.model`
//!   guarded field of its manifest, the heads' shapes from the tensors;
//! - an official `.pth` (`spec.teacher.model` gives the backbone architecture);
//! - an official hub name, resolved in the local torch hub cache.
//!
//! The recipe distils through the teacher's heads (its prototype distributions). The official
//! release files (`dinov2_vitg14_pretrain.pth`, the hub cache) hold the backbone only, and no
//! choice of heads for them would be the teacher's: random frozen heads would make the targets
//! an arbitrary projection of its features, trained ones would no longer be a frozen teacher.
//! Such a file is therefore refused with the reason, and only files that carry the heads
//! (official training `teacher_checkpoint.pth`: `teacher.dino_head.*`) are accepted.
use std::path::{Path, PathBuf};

use dinoflow_api::TrainingConfig;
use dinoflow_api::distill::{CheckpointFormat, TeacherSource};
use dinoflow_api::training::{Arch, FfnLayer, ModelConfig};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use super::DistillError;
use crate::checkpoint;
use crate::config;
use crate::meta_arch::SslNetwork;
use crate::model::DinoHeadConfig;
use crate::weights::{
    self, StateDict, backbone_state_dict, rename_parametrized_weight_norm, select_prefix,
};
pub use crate::weights::{hub_file, torch_home};

const PATH_FIELD: &str = "spec.teacher.checkpoint.path";

fn path_err(message: String) -> DistillError {
    DistillError {
        field: PATH_FIELD,
        message,
    }
}

/// What identifies the teacher across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeacherIdentity {
    /// `dinoflow`, `officialPth` or `officialHub`.
    pub format: String,
    /// The file or directory it was read from.
    pub path: PathBuf,
    /// sha256 of the weights file (`teacher.safetensors` of a Dinoflow checkpoint; of the
    /// list of its per-rank files' checksums when several ranks wrote it).
    pub sha256: String,
}

/// The teacher network (frozen, always run in eval mode under no_grad) and its identity.
#[derive(Debug)]
pub struct FrozenTeacher {
    pub net: SslNetwork,
    pub identity: TeacherIdentity,
    pub patch_size: i64,
}

/// Loads the teacher `source` describes onto `device`. `torch_home` is the torch hub root
/// (`$TORCH_HOME`, default `~/.cache/torch`), for `officialHub`.
pub fn load_teacher(
    source: &TeacherSource,
    device: Device,
    torch_home: &Path,
) -> Result<FrozenTeacher, DistillError> {
    let Some(ckpt) = &source.checkpoint else {
        return Err(DistillError {
            field: "spec.teacher.pretrainJob",
            message: format!(
                "{:?} is resolved to its checkpoint by the operator; outside the cluster set \
                 spec.teacher.checkpoint.path to that PretrainJob's checkpoint directory \
                 (ckpt-NNNNNNNNN) instead",
                source.pretrain_job.as_deref().unwrap_or_default()
            ),
        });
    };
    let path = Path::new(&ckpt.path);
    let loaded = match ckpt.format {
        CheckpointFormat::Dinoflow => load_dinoflow(path)?,
        CheckpointFormat::OfficialPth => {
            let model = source.model.as_ref().ok_or_else(|| DistillError {
                field: "spec.teacher.model",
                message: "is required with format officialPth; describe the teacher backbone \
                          (arch, patchSize, ffnLayer, numRegisterTokens)"
                    .into(),
            })?;
            load_official(path, model.clone(), "officialPth")?
        }
        CheckpointFormat::OfficialHub => {
            let file = hub_file(torch_home, &ckpt.path);
            let model = hub_model(&ckpt.path)?;
            if !file.is_file() {
                return Err(path_err(format!(
                    "hub model {:?} is not in the local torch hub cache ({} does not exist); \
                     download it there (torch.hub.load('facebookresearch/dinov2', {:?})) or set \
                     TORCH_HOME to the cache that holds it",
                    ckpt.path,
                    file.display(),
                    ckpt.path
                )));
            }
            load_official(&file, model, "officialHub")?
        }
    };
    build(loaded, device)
}

/// The weights and architecture read from a source, before the network is built.
struct Loaded {
    model: ModelConfig,
    sd: StateDict,
    identity: TeacherIdentity,
}

fn load_dinoflow(dir: &Path) -> Result<Loaded, DistillError> {
    let manifest = checkpoint::Manifest::read(dir).map_err(|e| {
        path_err(format!(
            "{e}; point it at a verified checkpoint directory (ckpt-NNNNNNNNN) of a PretrainJob"
        ))
    })?;
    // The teacher's files: `teacher.safetensors` (all of it when one rank wrote the
    // checkpoint, rank 0's chunks otherwise) and `teacher.rank-RRRRR.safetensors` of the
    // other ranks.
    let files: Vec<(&String, &checkpoint::manifest::FileEntry)> = manifest
        .files
        .iter()
        .filter(|(name, _)| {
            name.as_str() == "teacher.safetensors"
                || (name.starts_with("teacher.rank-") && name.ends_with(".safetensors"))
        })
        .collect();
    if files.is_empty() {
        return Err(path_err(format!(
            "{} holds no teacher.safetensors; a PretrainJob checkpoint is needed",
            dir.display()
        )));
    }
    // Only the teacher's files are checked against the manifest: hashing the student and the
    // optimiser state too would read several times the teacher's size at every start.
    let mut shas = Vec::new();
    for (name, entry) in &files {
        let file = dir.join(name);
        let (bytes, sha256) = checkpoint::manifest::hash_file(&file)
            .map_err(|e| path_err(format!("{}: {e}", file.display())))?;
        if (bytes, &sha256) != (entry.bytes, &entry.sha256) {
            return Err(path_err(format!(
                "{} does not match its manifest (size or sha256 differ): the checkpoint is damaged; \
                 use another verified checkpoint",
                file.display()
            )));
        }
        shas.push(sha256);
    }
    // One file: its own checksum (as before sharded checkpoints); several: of their list.
    let sha256 = match shas.as_slice() {
        [one] => one.clone(),
        many => checkpoint::manifest::hash_bytes(many.join("\n").as_bytes()),
    };
    let model_json = manifest.guarded.get("training.model").ok_or_else(|| {
        path_err(format!(
            "the manifest of {} does not record training.model; it was not written by a \
             Dinoflow pretraining run",
            dir.display()
        ))
    })?;
    let model: ModelConfig = serde_json::from_str(model_json).map_err(|e| {
        path_err(format!(
            "training.model in the manifest of {}: {e}",
            dir.display()
        ))
    })?;
    // Assembled from the shards of whatever world size wrote it (already hashed above).
    let checkpoint = checkpoint::VerifiedCheckpoint {
        path: dir.to_path_buf(),
        manifest: manifest.clone(),
    };
    let sd: StateDict = checkpoint::CheckpointReader::open(&checkpoint)
        .and_then(|r| r.group("teacher"))
        .map_err(|e| path_err(e.to_string()))?
        .into_iter()
        .collect();
    Ok(Loaded {
        model,
        sd,
        identity: TeacherIdentity {
            format: "dinoflow".into(),
            path: dir.to_path_buf(),
            sha256,
        },
    })
}

fn load_official(file: &Path, model: ModelConfig, format: &str) -> Result<Loaded, DistillError> {
    let raw = weights::read_state_dict(file).map_err(|e| path_err(e.to_string()))?;
    let raw = rename_parametrized_weight_norm(raw);
    // Heads live next to the backbone: `teacher.dino_head.*` (training checkpoint) or
    // `dino_head.*`.
    let heads_prefix = ["teacher.", ""]
        .into_iter()
        .find(|p| raw.contains_key(&format!("{p}dino_head.last_layer.weight_v")));
    let Some(prefix) = heads_prefix else {
        return Err(path_err(format!(
            "{} holds no complete DINO head (no dino_head.last_layer.weight_v): it is a \
             backbone-only release file. Distillation targets are the teacher's DINO/iBOT \
             prototype distributions, which such a file cannot give; use a checkpoint with the \
             heads: a Dinoflow checkpoint directory (format dinoflow, or teacher.pretrainJob) or \
             an official training teacher_checkpoint.pth (keys teacher.dino_head.*)",
            file.display()
        )));
    };
    let mut sd: StateDict = backbone_state_dict(&raw)
        .into_iter()
        // Top-level keys (no `backbone.` prefix) come with the heads: those are not backbone.
        .filter(|(k, _)| !k.starts_with("dino_head.") && !k.starts_with("ibot_head."))
        .map(|(k, v)| (format!("backbone.{k}"), v))
        .collect();
    for head in ["dino_head.", "ibot_head."] {
        for (k, v) in select_prefix(&raw, &format!("{prefix}{head}")) {
            sd.insert(format!("{head}{k}"), v);
        }
    }
    let (_, sha256) = checkpoint::manifest::hash_file(file)
        .map_err(|e| path_err(format!("{}: {e}", file.display())))?;
    Ok(Loaded {
        model,
        sd,
        identity: TeacherIdentity {
            format: format.into(),
            path: file.to_path_buf(),
            sha256,
        },
    })
}

/// The backbone of an official hub name (`dinov2_vit{s,b,l,g}14[_reg]`), as the official
/// `hub/backbones.py` builds it.
pub fn hub_model(name: &str) -> Result<ModelConfig, DistillError> {
    let (base, reg) = match name.strip_suffix("_reg") {
        Some(b) => (b, true),
        None => (name, false),
    };
    let (arch, ffn) = match base {
        "dinov2_vits14" => (Arch::VitSmall, FfnLayer::Mlp),
        "dinov2_vitb14" => (Arch::VitBase, FfnLayer::Mlp),
        "dinov2_vitl14" => (Arch::VitLarge, FfnLayer::Mlp),
        "dinov2_vitg14" => (Arch::VitGiant2, FfnLayer::Swiglufused),
        _ => {
            return Err(path_err(format!(
                "{name:?} is not an official DINOv2 hub model; use one of dinov2_vits14, \
                 dinov2_vitb14, dinov2_vitl14, dinov2_vitg14 (optionally with _reg)"
            )));
        }
    };
    Ok(ModelConfig {
        arch,
        patch_size: 14,
        ffn_layer: ffn,
        layerscale: 1.0,
        num_register_tokens: if reg { 4 } else { 0 },
        interpolate_antialias: reg,
        interpolate_offset: if reg { 0.0 } else { 0.1 },
        ..ModelConfig::default()
    })
}

/// Builds the frozen network from what was read and copies the weights in (strict: every key
/// and shape must match).
fn build(loaded: Loaded, device: Device) -> Result<FrozenTeacher, DistillError> {
    let Loaded {
        model,
        sd,
        identity,
    } = loaded;
    let patch = i64::from(model.patch_size);
    let img_size = img_size_of(&sd, patch)?;
    let mut training = TrainingConfig {
        model,
        ..TrainingConfig::default()
    };
    training.crops.global_crops_size = img_size as u32;
    let mut vit = config::vit_config(&training).map_err(|e| path_err(e.to_string()))?;
    // The teacher runs in eval mode: no stochastic depth.
    vit.drop_path_rate = 0.0;
    let dino = head_config(&sd, "dino_head.")?.ok_or_else(|| {
        path_err(
            "the teacher weights hold no dino_head.* tensors; a teacher needs its DINO head".into(),
        )
    })?;
    let ibot = head_config(&sd, "ibot_head.")?;
    let net = SslNetwork::new(device, &vit, &dino, ibot.as_ref())
        .map_err(|e| path_err(format!("teacher architecture: {e}")))?;
    weights::load_state_dict(&net.vs, &sd).map_err(|e| {
        // Only an officialPth teacher's architecture comes from the job; the others carry it.
        let hint = match identity.format.as_str() {
            "officialPth" => "; check spec.teacher.model",
            _ => "",
        };
        path_err(format!(
            "{e} (teacher read from {}{hint})",
            identity.path.display()
        ))
    })?;
    let mut net = net;
    net.vs.freeze();
    Ok(FrozenTeacher {
        net,
        identity,
        patch_size: patch,
    })
}

/// The resolution the teacher was trained at, from its position embeddings
/// `[1, 1 + (img/patch)², D]`: the forward interpolates them to the student's crops.
fn img_size_of(sd: &StateDict, patch: i64) -> Result<i64, DistillError> {
    let pos = sd
        .get("backbone.pos_embed")
        .ok_or_else(|| path_err("the teacher weights hold no backbone.pos_embed".into()))?;
    let n = pos.size().get(1).copied().unwrap_or(0) - 1;
    let side = (n.max(0) as f64).sqrt().round() as i64;
    if side == 0 || side * side != n {
        return Err(path_err(format!(
            "backbone.pos_embed has shape {:?}, not [1, 1 + g², D] for a g×g patch grid",
            pos.size()
        )));
    }
    Ok(side * patch)
}

/// A head's config from its tensors: `mlp.<i>.weight` (or `mlp.weight`) give the layer
/// count and widths, `last_layer.weight_v` the prototypes. None when there are no tensors.
fn head_config(sd: &StateDict, prefix: &str) -> Result<Option<DinoHeadConfig>, DistillError> {
    let head = select_prefix(sd, prefix);
    if head.is_empty() {
        return Ok(None);
    }
    let bad = |m: String| path_err(format!("teacher {prefix}*: {m}"));
    let mut layers: Vec<(usize, &Tensor)> = head
        .iter()
        .filter_map(|(k, v)| {
            let i = k.strip_prefix("mlp.")?.strip_suffix(".weight")?;
            Some((i.parse().ok()?, v))
        })
        .collect();
    layers.sort_by_key(|(i, _)| *i);
    let single = head.get("mlp.weight");
    let (first, last, nlayers, bias_key) = match (single, layers.first(), layers.last()) {
        (Some(w), ..) => (w, w, 1, "mlp.bias".to_string()),
        (None, Some((i0, f)), Some((_, l))) => (*f, *l, layers.len(), format!("mlp.{i0}.bias")),
        _ => return Err(bad("no mlp weights".into())),
    };
    let v = head
        .get("last_layer.weight_v")
        .ok_or_else(|| bad("no last_layer.weight_v".into()))?;
    let (f, l, vs) = (first.size(), last.size(), v.size());
    if f.len() != 2 || l.len() != 2 || vs.len() != 2 || vs[1] != l[0] {
        return Err(bad(format!(
            "inconsistent shapes: first layer {f:?}, last layer {l:?}, prototypes {vs:?}"
        )));
    }
    Ok(Some(DinoHeadConfig {
        in_dim: f[1],
        out_dim: vs[0],
        hidden_dim: if nlayers > 1 { f[0] } else { l[0] },
        bottleneck_dim: l[0],
        nlayers: nlayers as i64,
        mlp_bias: head.contains_key(&bias_key),
    }))
}

#[cfg(test)]
mod tests;
