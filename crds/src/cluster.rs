//! `spec.cluster`: nodes, GPUs, placement, gang scheduling, volumes, run policy.
//!
//! Placeholder owned by the operator helper; replaced by its version on merge.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How the job is laid out on the cluster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase")]
pub struct ClusterSpec {
    /// Number of nodes (pods).
    #[schemars(range(min = 1))]
    pub nodes: u32,
    /// GPUs per node; 0 runs on CPU.
    pub gpus_per_node: u32,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        Self {
            nodes: 1,
            gpus_per_node: 0,
        }
    }
}
