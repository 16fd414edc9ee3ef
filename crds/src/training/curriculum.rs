//! `training.curriculum`: resolution phases (e.g. the official high-resolution adaptation at
//! the end of training).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Most phases a curriculum may hold (bounds the cost of the CEL ordering rule).
pub const MAX_PHASES: usize = 16;

/// One curriculum phase. It starts at `startIteration` or `startEpoch` (exactly one) and
/// overrides the crop settings and the batch size from then until the next phase; fields left
/// out keep the values of `crops`/`train`. Iterations before the first phase use
/// `crops`/`train` as they are (the phase named `base`). The trainer switches the loader,
/// the iBOT mask grid and the position-embedding interpolation with the crop size, continues
/// the data order from the global sample count, and, when `optim.lr` is 0 (derived), uses the
/// learning rate of `optim.scalingRule` for the phase's global batch.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CurriculumPhase {
    /// Name reported in `status.curriculumPhase` and metrics.jsonl while the phase runs;
    /// default `phase-<n>` (n = 1 for the first listed phase).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub name: Option<String>,
    /// First iteration of the phase (0-based).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_iteration: Option<u64>,
    /// First official epoch of the phase (0-based; iteration = epoch × `train.officialEpochLength`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_epoch: Option<u32>,
    /// Global crop side during the phase; a multiple of `model.patchSize`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub global_crops_size: Option<u32>,
    /// Local crop side during the phase; a multiple of `model.patchSize`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub local_crops_size: Option<u32>,
    /// Local crops per image during the phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_crops_number: Option<u32>,
    /// Images per GPU during the phase (smaller at higher resolution).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub batch_size_per_gpu: Option<u32>,
}

impl CurriculumPhase {
    /// The reported name of the phase at `index` in the list.
    pub fn display_name(&self, index: usize) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("phase-{}", index + 1))
    }

    /// The phase's first iteration, converting epochs with `epoch_length`.
    pub fn start(&self, epoch_length: u32) -> Option<u64> {
        match (self.start_iteration, self.start_epoch) {
            (Some(it), None) => Some(it),
            (None, Some(ep)) => Some(u64::from(ep) * u64::from(epoch_length)),
            _ => None,
        }
    }
}

/// Resolution curriculum: phases in strictly increasing start order, all given in the same
/// unit (iterations or epochs). Empty means the `crops` settings throughout.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct CurriculumConfig {
    /// The phases, in order.
    #[schemars(length(max = 16))]
    pub phases: Vec<CurriculumPhase>,
}
