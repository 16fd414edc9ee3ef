//! The DINOv2 training objectives: DINO (image-level), iBOT (masked patches), KoLeo, and the
//! teacher-target construction they share (softmax centering or Sinkhorn–Knopp).
//!
//! Each loss follows the reference implementation (facebookresearch/dinov2, `dinov2/loss/`)
//! operation for operation so that float32 results agree with it to round-off.

pub mod centering;
pub mod dino;
pub mod ibot;
pub mod koleo;

pub use centering::{CenterState, CenteringMode, TeacherCenter, sinkhorn_knopp};
pub use dino::{DinoCropLosses, DinoLoss, DinoLossConfig};
pub use ibot::{IbotLoss, IbotLossConfig};

/// Official student temperature.
pub const DEFAULT_STUDENT_TEMP: f64 = 0.1;

/// Settings shared by the DINO and iBOT losses (the arguments of the official `DINOLoss` and
/// `iBOTPatchLoss`, which are the same three).
#[derive(Debug, Clone, PartialEq)]
pub struct PrototypeLossConfig {
    /// Number of prototypes `K` (`dino.head_n_prototypes` / `ibot.head_n_prototypes`,
    /// official 65536; iBOT uses the DINO head's when the head is shared).
    pub out_dim: i64,
    /// Student softmax temperature (0.1).
    pub student_temp: f64,
    /// EMA momentum of the teacher center (0.9).
    pub center_momentum: f64,
    /// Sinkhorn-Knopp iterations in `sinkhorn_knopp` centering (official `n_iterations=3`).
    pub sinkhorn_iterations: usize,
}

impl Default for PrototypeLossConfig {
    fn default() -> Self {
        Self {
            out_dim: 65536,
            student_temp: DEFAULT_STUDENT_TEMP,
            center_momentum: centering::DEFAULT_CENTER_MOMENTUM,
            sinkhorn_iterations: centering::SINKHORN_ITERATIONS,
        }
    }
}

impl PrototypeLossConfig {
    /// Checks the settings; `out_dim_field` names the prototype count in the config.
    pub(crate) fn check(&self, out_dim_field: &'static str) -> Result<(), LossError> {
        if self.out_dim <= 0 {
            return Err(LossError::InvalidSetting {
                field: out_dim_field,
                message: format!("must be > 0, got {}", self.out_dim),
            });
        }
        expect_positive("studentTemp", self.student_temp)
    }
}
pub use koleo::{KOLEO_EPS, koleo_loss, koleo_per_crop_sum};

/// Errors from loss construction and evaluation: always a caller mistake (shapes, settings).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LossError {
    /// A tensor argument has the wrong rank or size.
    #[error("{name}: expected shape {expected}, got {got:?}")]
    Shape {
        name: &'static str,
        expected: String,
        got: Vec<i64>,
    },
    /// A numeric setting is out of its valid range.
    #[error("{field}: {message}")]
    InvalidSetting {
        field: &'static str,
        message: String,
    },
    /// An unknown centering mode name.
    #[error(
        "loss.centering: unknown mode {0:?}; use \"centering\" (softmax with EMA center) or \"sinkhorn_knopp\""
    )]
    UnknownCenteringMode(String),
}

/// Checks that `t` is a matrix `[rows, cols]` (any size when `None`) and returns its size.
pub(crate) fn expect_2d(
    name: &'static str,
    t: &tch::Tensor,
    rows: Option<i64>,
    cols: Option<i64>,
) -> Result<(i64, i64), LossError> {
    let size = t.size();
    let ok =
        size.len() == 2 && rows.is_none_or(|r| size[0] == r) && cols.is_none_or(|c| size[1] == c);
    if ok {
        Ok((size[0], size[1]))
    } else {
        let fmt = |d: Option<i64>, n: &str| d.map_or(n.to_string(), |v| v.to_string());
        Err(LossError::Shape {
            name,
            expected: format!("[{}, {}]", fmt(rows, "rows"), fmt(cols, "K")),
            got: size,
        })
    }
}

/// Checks that a temperature or momentum-like setting is finite and positive.
pub(crate) fn expect_positive(field: &'static str, v: f64) -> Result<(), LossError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(LossError::InvalidSetting {
            field,
            message: format!("must be a finite number > 0, got {v}"),
        })
    }
}

#[cfg(test)]
mod parity;
