//! Status of PretrainJob and DistillJob.
//!
//! Placeholder owned by the operator helper; replaced by its version on merge.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Observed state of a job.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobStatus {
    /// Lifecycle phase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Last reported iteration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iteration: Option<u64>,
    /// Total iterations of the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_iterations: Option<u64>,
    /// Gang restarts so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restarts: Option<u32>,
}
