//! `training.teacher` (EMA momentum and temperatures) and `training.loss` (centering).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The EMA teacher: momentum schedule and output temperature schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct TeacherConfig {
    /// EMA momentum at iteration 0 (official `teacher.momentum_teacher`), in [0, 1]; follows a
    /// cosine schedule up to `finalMomentumTeacher`.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub momentum_teacher: f64,
    /// EMA momentum at the last iteration (official `teacher.final_momentum_teacher`), in [0, 1].
    #[schemars(range(min = 0.0, max = 1.0))]
    pub final_momentum_teacher: f64,
    /// Teacher temperature at iteration 0 (official `teacher.warmup_teacher_temp`), in (0, 1].
    #[schemars(range(min = 0.0, max = 1.0))]
    pub warmup_teacher_temp: f64,
    /// Teacher temperature after the warm-up (official `teacher.teacher_temp`), in (0, 1].
    #[schemars(range(min = 0.0, max = 1.0))]
    pub teacher_temp: f64,
    /// Epochs of linear warm-up from `warmupTeacherTemp` to `teacherTemp` (official
    /// `teacher.warmup_teacher_temp_epochs`); at most `optim.epochs`.
    pub warmup_teacher_temp_epochs: u32,
}

impl Default for TeacherConfig {
    fn default() -> Self {
        Self {
            momentum_teacher: 0.992,
            final_momentum_teacher: 1.0,
            warmup_teacher_temp: 0.04,
            teacher_temp: 0.07,
            warmup_teacher_temp_epochs: 30,
        }
    }
}

/// How the teacher's outputs are centred before the softmax (official `train.centering`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Centering {
    /// Subtract an EMA of the teacher's mean output (DINO v1 centering).
    Centering,
    /// Sinkhorn-Knopp normalisation of the teacher's batch outputs (DINOv2 recipes).
    SinkhornKnopp,
}

/// Loss details. The official code fixes the last three in its loss classes; they are
/// exposed here with those values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct LossConfig {
    /// Teacher centering mode (official `train.centering`).
    pub centering: Centering,
    /// Student softmax temperature (official `DINOLoss`/`iBOTPatchLoss` `student_temp`), in (0, 1].
    #[schemars(range(min = 0.0, max = 1.0))]
    pub student_temp: f64,
    /// EMA momentum of the centre in `centering` mode (official `center_momentum`), in [0, 1].
    #[schemars(range(min = 0.0, max = 1.0))]
    pub center_momentum: f64,
    /// Sinkhorn-Knopp iterations of the DINO and iBOT targets in `sinkhorn_knopp` mode
    /// (official `n_iterations`, fixed to 3 in the official losses).
    #[schemars(range(min = 1))]
    pub sinkhorn_knopp_iterations: u32,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            centering: Centering::Centering,
            student_temp: 0.1,
            center_momentum: 0.9,
            sinkhorn_knopp_iterations: 3,
        }
    }
}
