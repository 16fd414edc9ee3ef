//! `PretrainJob`: DINOv2 self-supervised pretraining from scratch.
// clippy reads the repeated keys of kube's `printcolumn(...)` lists as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use kube_derive::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::cluster::ClusterSpec;
use crate::status::JobStatus;
use crate::training::TrainingConfig;

/// A DINOv2 pretraining run: a student ViT and its EMA teacher trained from scratch on
/// `training.data`, laid out on `cluster.nodes` × `cluster.gpusPerNode` processes.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    crates(kube_core = "::kube_core"),
    group = "dinoflow.dev",
    version = "v1alpha1",
    kind = "PretrainJob",
    plural = "pretrainjobs",
    shortname = "ptj",
    category = "dinoflow",
    namespaced,
    status = "JobStatus",
    derive = "PartialEq",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Iteration", type_ = "integer", json_path = ".status.iteration"),
    printcolumn(
        name = "Total",
        type_ = "integer",
        json_path = ".status.totalIterations"
    ),
    printcolumn(name = "Nodes", type_ = "integer", json_path = ".spec.cluster.nodes"),
    printcolumn(
        name = "GPUs/Node",
        type_ = "integer",
        json_path = ".spec.cluster.gpusPerNode"
    ),
    printcolumn(name = "Restarts", type_ = "integer", json_path = ".status.restarts"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
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
