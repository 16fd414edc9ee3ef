//! `DistillJob`: distillation of a smaller student from a frozen, larger teacher (the
//! DINOv2 recipe that produced the released ViT-S/B/L from ViT-g).

use kube_derive::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::cluster::ClusterSpec;
use crate::training::{ModelConfig, TrainingConfig};

/// Format of a teacher checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum CheckpointFormat {
    /// A Dinoflow checkpoint directory (its manifest carries the teacher's config).
    Dinoflow,
    /// A `.pth` file in the official DINOv2 layout; `teacher.model` must describe the
    /// architecture. Distillation needs the teacher's DINO/iBOT heads (its targets are their
    /// prototype distributions), so the trainer accepts an official training checkpoint
    /// (`teacher_checkpoint.pth`: `teacher.backbone.*`, `teacher.dino_head.*`, ...) and refuses
    /// a backbone-only release file (`dinov2_vitg14_pretrain.pth`) with that reason.
    OfficialPth,
    /// An official torch.hub model name (`dinov2_vitg14`, `dinov2_vitl14_reg`, ...) resolved
    /// in the local hub cache, the architecture following from the name. The released hub
    /// weights are backbones only, so the trainer currently refuses them as distillation
    /// teachers (see `officialPth`), naming the reason and the alternatives.
    OfficialHub,
}

/// A teacher checkpoint on disk.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TeacherCheckpoint {
    /// Path of the checkpoint inside the pod (directory, `.pth` file, or hub model name).
    pub path: String,
    /// Format of `path`.
    #[serde(default = "default_format")]
    pub format: CheckpointFormat,
}

fn default_format() -> CheckpointFormat {
    CheckpointFormat::Dinoflow
}

/// Where the frozen teacher comes from: exactly one of `pretrainJob` or `checkpoint`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(transform = teacher_rules::attach_cel)]
pub struct TeacherSource {
    /// Name of a succeeded PretrainJob in the same namespace; its last verified checkpoint
    /// (backbone and heads) is the teacher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretrain_job: Option<String>,
    /// A checkpoint to load the teacher from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<TeacherCheckpoint>,
    /// Teacher architecture; required with `checkpoint.format: officialPth`, otherwise taken
    /// from the source and must not be set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelConfig>,
}

impl TeacherSource {
    /// Every rule violation (the Rust mirror of the CEL rules on `spec.teacher`).
    pub fn violations(&self) -> Vec<teacher_rules::Violation> {
        teacher_rules::check(self)
    }
}

/// Rules of `spec.teacher`, enforced as CEL by the API server and in Rust by the trainer.
pub mod teacher_rules {
    use schemars::Schema;

    use super::{CheckpointFormat, TeacherSource};

    /// A violated rule.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Violation {
        /// Field relative to `spec` (`teacher.checkpoint`).
        pub field: &'static str,
        /// What is wrong and the fix.
        pub message: String,
    }

    struct Rule {
        field: &'static str,
        message: &'static str,
        cel: &'static str,
        check: fn(&TeacherSource) -> bool,
    }

    const RULES: [Rule; 6] = [
        Rule {
            field: "teacher",
            message: "set exactly one of teacher.pretrainJob or teacher.checkpoint",
            cel: "has(self.pretrainJob) != has(self.checkpoint)",
            check: |t| t.pretrain_job.is_some() != t.checkpoint.is_some(),
        },
        Rule {
            field: "teacher.pretrainJob",
            message: "must name a PretrainJob; give the name of a succeeded PretrainJob in this namespace",
            cel: "!has(self.pretrainJob) || self.pretrainJob != ''",
            check: |t| t.pretrain_job.as_deref().is_none_or(|n| !n.is_empty()),
        },
        Rule {
            field: "teacher.checkpoint.path",
            message: "must not be empty; give the checkpoint's path inside the pod",
            cel: "!has(self.checkpoint) || self.checkpoint.path != ''",
            check: |t| t.checkpoint.as_ref().is_none_or(|c| !c.path.is_empty()),
        },
        Rule {
            field: "teacher.model",
            message: "is required with teacher.checkpoint.format officialPth (the .pth holds no architecture); describe the teacher backbone, e.g. arch vit_giant2, patchSize 14, ffnLayer swiglufused",
            cel: "!has(self.checkpoint) || !has(self.checkpoint.format) || self.checkpoint.format != 'officialPth' || has(self.model)",
            check: |t| {
                !matches!(&t.checkpoint, Some(c) if c.format == CheckpointFormat::OfficialPth)
                    || t.model.is_some()
            },
        },
        Rule {
            field: "teacher.model",
            message: "is only allowed with teacher.checkpoint.format officialPth (other sources carry their architecture); remove it",
            cel: "!has(self.model) || (has(self.checkpoint) && has(self.checkpoint.format) && self.checkpoint.format == 'officialPth')",
            check: |t| {
                t.model.is_none()
                    || matches!(&t.checkpoint, Some(c) if c.format == CheckpointFormat::OfficialPth)
            },
        },
        Rule {
            field: "teacher.model.activationCheckpointing",
            message: "must be false: the frozen teacher runs without gradients, and activation checkpointing is not supported (see training.model.activationCheckpointing); remove it",
            cel: "!has(self.model) || !has(self.model.activationCheckpointing) || !self.model.activationCheckpointing",
            check: |t| t.model.as_ref().is_none_or(|m| !m.activation_checkpointing),
        },
    ];

    /// Runs the rules in Rust.
    pub fn check(t: &TeacherSource) -> Vec<Violation> {
        RULES
            .iter()
            .filter(|r| !(r.check)(t))
            .map(|r| Violation {
                field: r.field,
                message: r.message.to_string(),
            })
            .collect()
    }

    /// Schema transform attaching the rules as CEL.
    pub fn attach_cel(schema: &mut Schema) {
        for r in &RULES {
            let path = r.field.strip_prefix("teacher").unwrap_or_default();
            let mut rule = kube_core::Rule::new(r.cel)
                .message(format!("spec.{}: {}", r.field, r.message).as_str());
            if !path.is_empty() {
                rule = rule.field_path(path);
            }
            kube_core::validate(schema, rule).expect("rules serialise");
        }
    }
}

/// The frozen-teacher recipe of the DINOv2 paper ("Distillation of smaller models"): the
/// teacher is frozen, a spare EMA of the student is kept as the final model, masking and
/// stochastic depth are removed, and the iBOT loss is applied on the two global crops.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct DistillationConfig {
    /// Keep an EMA of the student and export it as the final model.
    pub student_ema: bool,
    /// Momentum of that EMA; unset follows `training.teacher.momentumTeacher` →
    /// `finalMomentumTeacher`. In [0, 1].
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub student_ema_momentum: Option<f64>,
    /// Keep iBOT masking of the student's global crops (the paper removes it).
    pub masking: bool,
    /// Keep stochastic depth in the student (the paper removes it; `false` forces
    /// `training.model.dropPathRate` to 0).
    pub drop_path: bool,
    /// Apply the iBOT loss on all patch tokens of the two global crops.
    pub ibot_on_global_crops: bool,
}

impl Default for DistillationConfig {
    fn default() -> Self {
        Self {
            student_ema: true,
            student_ema_momentum: None,
            masking: false,
            drop_path: false,
            ibot_on_global_crops: true,
        }
    }
}

crate::job_resource::job_resource! {
/// A DINOv2 distillation run: `training` describes the (smaller) student; the teacher is
/// frozen and loaded from `teacher`.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    kind = "DistillJob",
    plural = "distilljobs",
    shortname = "dsj"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(transform = crate::pretrain::training_is_immutable, transform = teacher_is_immutable)]
pub struct DistillJobSpec {
    /// The frozen teacher.
    pub teacher: TeacherSource,
    /// The frozen-teacher recipe.
    #[serde(default)]
    pub distillation: DistillationConfig,
    /// The student's trainer configuration (DINOv2 config; defaults are the official ones).
    #[serde(deserialize_with = "crate::load::deserialize_training")]
    pub training: TrainingConfig,
    /// How the job is laid out on the cluster.
    #[serde(default)]
    pub cluster: ClusterSpec,
}
}

/// Schema transform: the teacher cannot change after creation.
fn teacher_is_immutable(schema: &mut schemars::Schema) {
    let rule = kube_core::Rule::new("self.teacher == oldSelf.teacher")
        .message("spec.teacher is immutable; create a new job to distill from another teacher")
        .field_path(".teacher");
    kube_core::validate(schema, rule).expect("rule serialises");
}
