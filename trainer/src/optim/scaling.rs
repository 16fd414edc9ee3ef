//! Learning-rate scaling with the global batch size (`optim.scaling_rule`).

use std::str::FromStr;

/// How `optim.base_lr` (given for a reference batch) becomes `optim.lr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrScalingRule {
    /// DINOv2: `lr = base_lr · sqrt(batch_per_gpu · world / 1024)` (official default).
    #[default]
    SqrtWrt1024,
    /// DINO v1 / linear rule: `lr = base_lr · batch_per_gpu · world / 256`.
    LinearWrt256,
}

/// An unknown scaling-rule name.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error(
    "optim.scalingRule: unknown rule {0:?}; use \"sqrt_wrt_1024\" (DINOv2) or \"linear_wrt_256\""
)]
pub struct UnknownScalingRule(pub String);

impl FromStr for LrScalingRule {
    type Err = UnknownScalingRule;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sqrt_wrt_1024" => Ok(Self::SqrtWrt1024),
            "linear_wrt_256" => Ok(Self::LinearWrt256),
            other => Err(UnknownScalingRule(other.to_string())),
        }
    }
}

/// `optim.lr` for a global batch of `batch_size_per_gpu × world_size` images, with the
/// reference's floating-point order of operations.
pub fn scaled_lr(
    rule: LrScalingRule,
    base_lr: f64,
    batch_size_per_gpu: usize,
    world_size: usize,
) -> f64 {
    let global = (batch_size_per_gpu * world_size) as f64;
    match rule {
        LrScalingRule::SqrtWrt1024 => base_lr * (global / 1024.0).sqrt(),
        LrScalingRule::LinearWrt256 => base_lr * global / 256.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_batch_sizes_leave_the_base_lr_unchanged() {
        assert_eq!(scaled_lr(LrScalingRule::SqrtWrt1024, 4e-3, 64, 16), 4e-3);
        assert_eq!(scaled_lr(LrScalingRule::LinearWrt256, 5e-4, 32, 8), 5e-4);
    }

    #[test]
    fn quadrupling_the_batch_doubles_the_sqrt_rule_and_quadruples_the_linear_rule() {
        let a = scaled_lr(LrScalingRule::SqrtWrt1024, 1e-3, 256, 1);
        let b = scaled_lr(LrScalingRule::SqrtWrt1024, 1e-3, 256, 4);
        assert!((b / a - 2.0).abs() < 1e-12);
        let a = scaled_lr(LrScalingRule::LinearWrt256, 1e-3, 64, 1);
        let b = scaled_lr(LrScalingRule::LinearWrt256, 1e-3, 64, 4);
        assert!((b / a - 4.0).abs() < 1e-12);
    }

    #[test]
    fn rule_names_parse_and_unknown_names_say_what_is_accepted() {
        assert_eq!("sqrt_wrt_1024".parse(), Ok(LrScalingRule::SqrtWrt1024));
        assert_eq!("linear_wrt_256".parse(), Ok(LrScalingRule::LinearWrt256));
        let err = "sqrt".parse::<LrScalingRule>().unwrap_err();
        assert!(err.to_string().contains("sqrt_wrt_1024"), "{err}");
    }
}
