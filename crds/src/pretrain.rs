//! `PretrainJob`: DINOv2 self-supervised pretraining from scratch.

use kube_derive::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::cluster::ClusterSpec;
use crate::training::TrainingConfig;

crate::job_resource::job_resource! {
/// A DINOv2 pretraining run: a student ViT and its EMA teacher trained from scratch on
/// `training.data`, laid out on `cluster.nodes` × `cluster.gpusPerNode` processes.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    kind = "PretrainJob",
    plural = "pretrainjobs",
    shortname = "ptj"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(transform = training_is_immutable)]
pub struct PretrainJobSpec {
    /// The trainer configuration (DINOv2 config; defaults are the official ones).
    #[serde(deserialize_with = "crate::load::deserialize_training")]
    pub training: TrainingConfig,
    /// How the job is laid out on the cluster.
    #[serde(default)]
    pub cluster: ClusterSpec,
}
}

/// Schema transform: `spec.training` cannot change after creation (checkpoints record a hash of
/// it, and a resumed run must train the same model). Shared by both job kinds.
pub(crate) fn training_is_immutable(schema: &mut schemars::Schema) {
    let rule = kube_core::Rule::new("self.training == oldSelf.training")
        .message(
            "spec.training is immutable; create a new job to change the training configuration",
        )
        .field_path(".training");
    kube_core::validate(schema, rule).expect("rule serialises");
}
