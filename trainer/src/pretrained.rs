//! Where a run that starts from scratch takes its weights: `training.model.pretrainedWeights`
//! (backbones only) or `training.model.weights` (backbones and heads of student and teacher).
//! Applied once, before iteration 0; a resumed run continues from its checkpoint instead
//! (`Trainable::start_fresh` is not called then).
//!
//! `pretrainedWeights` follows the official `student.pretrained_weights` (the student backbone
//! is loaded, the teacher starts as a copy of the student, the heads keep their random init),
//! but strictly: the official `load_state_dict(chkpt["model"], strict=False)` silently loads
//! nothing when the key names differ, here any missing, unexpected or mis-shaped key fails the
//! start with the full list. `weights` follows the official `MODEL.WEIGHTS` of a run without a
//! checkpoint (`resume_or_load`: the model's tensors only), again strictly; unlike fvcore it
//! does not take the iteration over, the run's schedules start at 0.
//!
//! A position embedding of another grid (weights trained at 518 loaded into a 224 run) is
//! resized with the model's own interpolation, so the loaded model computes at this run's
//! resolution what the source model computes there.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use dinoflow_api::TrainingConfig;
use tch::Tensor;

use crate::checkpoint::{self, CheckpointManager};
use crate::meta_arch::MetaArch;
use crate::model::VitConfig;
use crate::model::vit::interpolate_pos_embed;
use crate::weights::{
    self, KeyMismatch, StateDict, rename_parametrized_weight_norm, select_prefix,
};

const PRETRAINED: &str = "training.model.pretrainedWeights";
const WEIGHTS: &str = "training.model.weights";

/// What to load at the start of a fresh run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Init {
    /// `pretrainedWeights`: the backbone of student and teacher.
    Backbone(PathBuf),
    /// `weights`: student and teacher, backbones and heads.
    Full(PathBuf),
}

/// A source that cannot be read or does not fit the model (exit 78).
#[derive(Debug, thiserror::Error)]
#[error("{field}: {path}: {message}")]
pub struct InitError {
    pub field: &'static str,
    pub path: PathBuf,
    pub message: String,
}

/// What was loaded, for the log.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub tensors: usize,
    /// `(file grid, model grid)` when the position embedding was resized.
    pub resized_pos_embed: Vec<(i64, i64)>,
}

/// The initialisation `training` asks for (hub names resolved under `torch_home`).
pub fn from_config(training: &TrainingConfig, torch_home: &Path) -> Option<Init> {
    let m = &training.model;
    if !m.pretrained_weights.is_empty() {
        return Some(Init::Backbone(resolve(&m.pretrained_weights, torch_home)));
    }
    (!m.weights.is_empty()).then(|| Init::Full(PathBuf::from(&m.weights)))
}

/// An official hub name (`dinov2_vits14`, ..., `dinov2_vitg14_reg`) is the file torch.hub
/// caches it as (`$TORCH_HOME/hub/checkpoints/<name>_pretrain.pth`); anything else is a path.
pub fn resolve(value: &str, torch_home: &Path) -> PathBuf {
    let base = value.strip_suffix("_reg").unwrap_or(value);
    let hub = [
        "dinov2_vits14",
        "dinov2_vitb14",
        "dinov2_vitl14",
        "dinov2_vitg14",
    ];
    if hub.contains(&base) {
        weights::hub_file(torch_home, value)
    } else {
        PathBuf::from(value)
    }
}

impl Init {
    fn field_and_path(&self) -> (&'static str, &Path) {
        match self {
            Init::Backbone(p) => (PRETRAINED, p),
            Init::Full(p) => (WEIGHTS, p),
        }
    }

    /// Loads the source into `arch` (strict; nothing is copied when anything does not fit).
    pub fn apply(&self, arch: &MetaArch) -> Result<Applied, InitError> {
        let (field, path) = self.field_and_path();
        let err = |message: String| InitError {
            field,
            path: path.to_path_buf(),
            message,
        };
        if !path.exists() {
            let hint = if field == PRETRAINED {
                " (a hub name such as dinov2_vitl14 is read from $TORCH_HOME/hub/checkpoints/<name>_pretrain.pth)"
            } else {
                ""
            };
            return Err(err(format!("does not exist{hint}")));
        }
        let vit = &arch.config.student;
        let mut resized = Vec::new();
        let (student_sd, teacher_sd) = match self {
            Init::Backbone(_) => {
                let backbone = read_backbone(path).map_err(&err)?;
                let sd = prefixed(backbone, "backbone.");
                (sd, None)
            }
            Init::Full(_) => {
                let (s, t) = read_full(path).map_err(&err)?;
                (s, Some(t))
            }
        };
        let student_sd = fit_pos_embed(student_sd, vit, &mut resized).map_err(&err)?;
        let teacher_sd = teacher_sd
            .map(|t| fit_pos_embed(t, vit, &mut resized))
            .transpose()
            .map_err(&err)?;
        // The backbone only: the heads keep their init (identical in student and teacher).
        let only_backbone = teacher_sd.is_none();
        let vars = |vs: &tch::nn::VarStore| -> HashMap<String, Tensor> {
            vs.variables()
                .into_iter()
                .filter(|(k, _)| !only_backbone || k.starts_with("backbone."))
                .collect()
        };
        let (student_vars, teacher_vars) = (vars(&arch.student.vs), vars(&arch.teacher.vs));
        let teacher_sd = teacher_sd.as_ref().unwrap_or(&student_sd);
        for (sd, vars, name) in [
            (&student_sd, &student_vars, "student"),
            (teacher_sd, &teacher_vars, "teacher"),
        ] {
            let mismatch = weights::compare(vars, sd);
            if !mismatch.is_empty() {
                return Err(err(describe(name, &mismatch)));
            }
        }
        for (key, t) in student_sd.iter().chain(teacher_sd.iter()) {
            if !t.is_floating_point() {
                return Err(err(format!(
                    "tensor {key} is {:?}, not floating point",
                    t.kind()
                )));
            }
        }
        tch::no_grad(|| {
            for (sd, vars) in [(&student_sd, &student_vars), (teacher_sd, &teacher_vars)] {
                for (key, var) in vars {
                    let src = sd[key].to_device(var.device()).to_kind(var.kind());
                    var.shallow_clone().copy_(&src);
                }
            }
        });
        Ok(Applied {
            tensors: student_vars.len() + teacher_vars.len(),
            resized_pos_embed: resized,
        })
    }
}

fn describe(network: &str, m: &KeyMismatch) -> String {
    format!("{network}: {m}")
}

fn prefixed(sd: StateDict, prefix: &str) -> StateDict {
    sd.into_iter()
        .map(|(k, v)| (format!("{prefix}{k}"), v))
        .collect()
}

/// A state dict's tensors without a leading `model.` (fvcore training checkpoints nest the
/// model under it), with chunked blocks flattened and weight-norm names of new PyTorch mapped.
fn normalised(sd: StateDict) -> StateDict {
    let nested = !sd.is_empty() && sd.keys().any(|k| k.starts_with("model."));
    let sd = if nested {
        select_prefix(&sd, "model.")
    } else {
        sd
    };
    rename_parametrized_weight_norm(
        sd.into_iter()
            .map(|(k, v)| (weights::unchunk_key(&k), v))
            .collect(),
    )
}

/// Reads a file's tensors, or a Dinoflow checkpoint directory's `student`/`teacher` groups
/// (as `student.*`/`teacher.*`, like an official training checkpoint).
fn read_any(path: &Path) -> Result<StateDict, String> {
    if path.is_dir() {
        let ckpt = checkpoint::verify(path).map_err(|e| {
            format!("{e}; point it at a verified Dinoflow checkpoint directory (ckpt-NNNNNNNNN)")
        })?;
        let snapshot = CheckpointManager::load(&ckpt).map_err(|e| e.to_string())?;
        let mut out = StateDict::new();
        for group in ["student", "teacher"] {
            for (k, v) in snapshot.tensors.get(group).into_iter().flatten() {
                out.insert(format!("{group}.{k}"), v.shallow_clone());
            }
        }
        return Ok(out);
    }
    let sd = weights::read_state_dict(path).map_err(|e| e.to_string())?;
    Ok(normalised(sd))
}

/// The backbone (hub key names) of: a hub/release file or an export (keys as they are), an
/// official training checkpoint (`teacher.backbone.*`, the released model, else
/// `student.backbone.*`), a Dinoflow checkpoint directory (its EMA teacher's backbone).
fn read_backbone(path: &Path) -> Result<StateDict, String> {
    let sd = read_any(path)?;
    for prefix in ["teacher.backbone.", "backbone.", "student.backbone."] {
        let picked = select_prefix(&sd, prefix);
        if !picked.is_empty() {
            return Ok(picked);
        }
    }
    Ok(sd)
}

/// Student and teacher (`backbone.*`, `dino_head.*`, `ibot_head.*`) of a whole training
/// checkpoint: official `model_*.pth`, a Dinoflow checkpoint directory, or an official
/// `teacher_checkpoint.pth`, whose teacher then starts the student too (it holds nothing else).
fn read_full(path: &Path) -> Result<(StateDict, StateDict), String> {
    let sd = read_any(path)?;
    let (student, teacher) = (
        select_prefix(&sd, "student."),
        select_prefix(&sd, "teacher."),
    );
    match (student.is_empty(), teacher.is_empty()) {
        (false, false) => Ok((student, teacher)),
        (true, false) => {
            tracing::warn!(
                path = %path.display(),
                "{WEIGHTS}: the file holds the teacher only (teacher_checkpoint.pth); the student starts from it too"
            );
            let copy = teacher.iter().map(|(k, v)| (k.clone(), v.copy())).collect();
            Ok((copy, teacher))
        }
        _ => Err(format!(
            "holds no teacher.* tensors: {WEIGHTS} needs a whole training checkpoint (official \
             model_*.pth or teacher_checkpoint.pth, or a Dinoflow checkpoint directory); for a \
             backbone-only file (release weights, exports) use {PRETRAINED}"
        )),
    }
}

/// Resizes `backbone.pos_embed` of another square grid to the model's (same width only; any
/// other difference is left for the strict comparison to report).
fn fit_pos_embed(
    mut sd: StateDict,
    vit: &VitConfig,
    resized: &mut Vec<(i64, i64)>,
) -> Result<StateDict, String> {
    let key = "backbone.pos_embed";
    let grid = vit.base_grid();
    let Some(pos) = sd.get(key) else {
        return Ok(sd);
    };
    let size = pos.size();
    let n = size.get(1).copied().unwrap_or(0) - 1;
    let file_grid = (n.max(0) as f64).sqrt().round() as i64;
    let same_width = size.len() == 3 && size[0] == 1 && size[2] == vit.embed_dim;
    if !same_width || file_grid * file_grid != n || file_grid == grid {
        return Ok(sd);
    }
    let side = grid * vit.patch_size;
    let new = tch::no_grad(|| interpolate_pos_embed(pos, vit, side, side))
        .map_err(|e| format!("resizing {key} from a {file_grid}x{file_grid} grid: {e}"))?;
    sd.insert(key.into(), new.to_kind(pos.kind()));
    if !resized.contains(&(file_grid, grid)) {
        resized.push((file_grid, grid));
    }
    Ok(sd)
}

#[cfg(test)]
mod tests;
