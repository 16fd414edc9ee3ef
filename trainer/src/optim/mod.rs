//! Optimisation: schedules, lr scaling, parameter groups, AdamW, gradient clipping and the
//! teacher EMA, each matching the reference DINOv2 training loop.

pub mod adamw;
pub mod clip;
pub mod ema;
pub mod param_groups;
pub mod scaling;
pub mod schedule;

#[cfg(test)]
mod parity;

pub use adamw::{AdamW, AdamWConfig, AdamWParamState, OptimError};
pub use clip::{ClipStats, ClipTensors, clip_grad_norm, clip_grad_norm_on_device, grad_total_norm};
pub use ema::ema_update;
pub use param_groups::{
    FusedGroup, ParamGroupConfig, ParamGroupError, ParamMultipliers, fuse_param_groups,
    param_multipliers, student_param_multipliers,
};
pub use scaling::{LrScalingRule, scaled_lr};
pub use schedule::{CosineSchedule, ScheduleError, ScheduleValues, Schedules, SchedulesConfig};
