//! Compute precision and dynamic loss scaling.
//!
//! Master weights and optimizer state are always float32 (see [`crate::optim::AdamW`]); the
//! precision mode only picks the dtype the forward/backward runs in. bf16 has float32's
//! exponent range and needs no loss scaling; fp16 (e.g. V100, which lacks bf16) does, with
//! the dynamic scaler below (PyTorch `GradScaler` semantics and defaults).

use std::str::FromStr;

use tch::{Kind, Tensor};

/// Forward/backward compute precision (`precision` in the training config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in float32.
    #[default]
    Fp32,
    /// bfloat16 compute (A100/H100 and newer), no loss scaling.
    Bf16,
    /// float16 compute with dynamic loss scaling.
    Fp16,
}

/// An unknown precision name.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("precision: unknown mode {0:?}; use \"fp32\", \"bf16\" or \"fp16\"")]
pub struct UnknownPrecision(pub String);

impl FromStr for Precision {
    type Err = UnknownPrecision;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fp32" | "float32" => Ok(Self::Fp32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "fp16" | "float16" => Ok(Self::Fp16),
            other => Err(UnknownPrecision(other.to_string())),
        }
    }
}

impl Precision {
    /// dtype of activations (and autocast target) in this mode.
    pub fn compute_kind(self) -> Kind {
        match self {
            Self::Fp32 => Kind::Float,
            Self::Bf16 => Kind::BFloat16,
            Self::Fp16 => Kind::Half,
        }
    }

    /// dtype of master weights and optimizer state: always float32.
    pub fn master_kind(self) -> Kind {
        Kind::Float
    }

    /// Whether gradients need dynamic loss scaling (fp16 only).
    pub fn needs_loss_scaling(self) -> bool {
        self == Self::Fp16
    }
}

/// Loss-scaler settings (PyTorch `GradScaler` defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScalerConfig {
    /// Initial scale (2¹⁶).
    pub init_scale: f64,
    /// Factor applied after `growth_interval` consecutive finite steps (2).
    pub growth_factor: f64,
    /// Factor applied on a non-finite gradient (0.5).
    pub backoff_factor: f64,
    /// Finite steps between growths (2000).
    pub growth_interval: u32,
}

impl Default for LossScalerConfig {
    fn default() -> Self {
        Self {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

/// Invalid loss-scaler settings or state.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{field}: {message}")]
pub struct LossScalerError {
    /// Offending setting.
    pub field: &'static str,
    /// What is wrong and what is accepted.
    pub message: String,
}

/// Checkpointable scaler state.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LossScalerState {
    /// Current scale.
    pub scale: f64,
    /// Consecutive finite steps since the last growth or backoff.
    pub growth_tracker: u32,
}

/// Whether the optimizer step of this iteration should run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepDecision {
    /// Gradients are finite: step.
    Apply,
    /// A gradient was inf/NaN: skip the optimizer step (the scale was backed off).
    Skip,
}

/// Dynamic loss scaler: multiply the loss by `scale`, unscale gradients before clipping, skip
/// steps with non-finite gradients and back off; grow after a run of finite steps.
#[derive(Debug, Clone, PartialEq)]
pub struct DynamicLossScaler {
    cfg: LossScalerConfig,
    state: LossScalerState,
}

impl DynamicLossScaler {
    /// A scaler at `cfg.init_scale`.
    pub fn new(cfg: LossScalerConfig) -> Result<Self, LossScalerError> {
        let check = |field, v: f64, ok: bool, what: &str| {
            if v.is_finite() && ok {
                Ok(())
            } else {
                Err(LossScalerError {
                    field,
                    message: format!("must be {what}, got {v}"),
                })
            }
        };
        check("initScale", cfg.init_scale, cfg.init_scale > 0.0, "> 0")?;
        check(
            "growthFactor",
            cfg.growth_factor,
            cfg.growth_factor > 1.0,
            "> 1",
        )?;
        check(
            "backoffFactor",
            cfg.backoff_factor,
            cfg.backoff_factor > 0.0 && cfg.backoff_factor < 1.0,
            "in (0, 1)",
        )?;
        if cfg.growth_interval == 0 {
            return Err(LossScalerError {
                field: "growthInterval",
                message: "must be ≥ 1".into(),
            });
        }
        Ok(Self {
            cfg,
            state: LossScalerState {
                scale: cfg.init_scale,
                growth_tracker: 0,
            },
        })
    }

    /// Restores a scaler from a checkpointed state.
    pub fn from_state(
        cfg: LossScalerConfig,
        state: LossScalerState,
    ) -> Result<Self, LossScalerError> {
        let mut s = Self::new(cfg)?;
        if !(state.scale.is_finite() && state.scale > 0.0) {
            return Err(LossScalerError {
                field: "lossScaler.scale",
                message: format!("must be a finite number > 0, got {}", state.scale),
            });
        }
        s.state = state;
        Ok(s)
    }

    /// Continues from a checkpointed state with this scaler's own (configured) factors.
    pub fn restore(&mut self, state: LossScalerState) -> Result<(), LossScalerError> {
        *self = Self::from_state(self.cfg, state)?;
        Ok(())
    }

    /// The settings this scaler runs with.
    pub fn config(&self) -> LossScalerConfig {
        self.cfg
    }

    /// Current state (for checkpoints and metrics).
    pub fn state(&self) -> LossScalerState {
        self.state
    }

    /// Current scale.
    pub fn scale(&self) -> f64 {
        self.state.scale
    }

    /// `loss × scale`, to call `backward` on.
    pub fn scale_loss(&self, loss: &Tensor) -> Tensor {
        loss * self.state.scale
    }

    /// Divides gradients by the scale in place (multiplying by the float32 inverse, as
    /// PyTorch) and reports whether any gradient holds inf or NaN: one host read for all of
    /// them, since whether to apply the update is decided on the host.
    pub fn unscale(&self, grads: &mut [Tensor]) -> bool {
        let inv_scale = (1.0 / self.state.scale) as f32 as f64;
        tch::no_grad(|| {
            let mut finite = Vec::with_capacity(grads.len());
            for g in grads.iter_mut() {
                let _ = g.g_mul_scalar_(inv_scale);
                finite.push(g.isfinite().all());
            }
            !finite.is_empty() && !crate::host_sync::all(&Tensor::stack(&finite, 0))
        })
    }

    /// Updates the scale after a step and says whether that step's update should be applied.
    pub fn update(&mut self, found_non_finite: bool) -> StepDecision {
        let st = &mut self.state;
        if found_non_finite {
            st.scale *= self.cfg.backoff_factor;
            st.growth_tracker = 0;
            return StepDecision::Skip;
        }
        st.growth_tracker += 1;
        if st.growth_tracker == self.cfg.growth_interval {
            let grown = st.scale * self.cfg.growth_factor;
            // As PyTorch: never grow into infinity.
            if grown.is_finite() {
                st.scale = grown;
            }
            st.growth_tracker = 0;
        }
        StepDecision::Apply
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precision_names_map_to_compute_kinds() {
        assert_eq!(
            "fp32".parse::<Precision>().unwrap().compute_kind(),
            Kind::Float
        );
        assert_eq!(
            "bf16".parse::<Precision>().unwrap().compute_kind(),
            Kind::BFloat16
        );
        assert_eq!(
            "fp16".parse::<Precision>().unwrap().compute_kind(),
            Kind::Half
        );
        assert!(Precision::Fp16.needs_loss_scaling());
        assert!(!Precision::Bf16.needs_loss_scaling());
        assert_eq!(Precision::Bf16.master_kind(), Kind::Float);
        let err = "fp8".parse::<Precision>().unwrap_err();
        assert!(err.to_string().contains("bf16"), "{err}");
    }

    #[test]
    fn scaler_starts_at_two_to_the_sixteen() {
        let s = DynamicLossScaler::new(LossScalerConfig::default()).unwrap();
        assert_eq!(s.scale(), 65536.0);
        let loss = Tensor::from(1.5f32);
        assert_eq!(s.scale_loss(&loss).double_value(&[]), 1.5 * 65536.0);
    }

    #[test]
    fn non_finite_gradients_skip_the_step_and_halve_the_scale() {
        let mut s = DynamicLossScaler::new(LossScalerConfig::default()).unwrap();
        let mut grads = [Tensor::from_slice(&[65536.0f32, f32::INFINITY])];
        let bad = s.unscale(&mut grads);
        assert!(bad);
        assert_eq!(s.update(bad), StepDecision::Skip);
        assert_eq!(s.scale(), 32768.0);
        assert_eq!(s.state().growth_tracker, 0);
    }

    #[test]
    fn unscale_divides_finite_gradients_by_the_scale() {
        let s = DynamicLossScaler::new(LossScalerConfig::default()).unwrap();
        let mut grads = [Tensor::from_slice(&[65536.0f32, -131072.0])];
        assert!(!s.unscale(&mut grads));
        assert_eq!(Vec::<f32>::try_from(&grads[0]).unwrap(), vec![1.0, -2.0]);
        let mut nan = [Tensor::from_slice(&[f32::NAN])];
        assert!(s.unscale(&mut nan));
    }

    #[test]
    fn scale_doubles_after_the_growth_interval_of_finite_steps() {
        let cfg = LossScalerConfig {
            growth_interval: 3,
            ..Default::default()
        };
        let mut s = DynamicLossScaler::new(cfg).unwrap();
        for _ in 0..2 {
            assert_eq!(s.update(false), StepDecision::Apply);
        }
        assert_eq!(s.scale(), 65536.0);
        s.update(false);
        assert_eq!(s.scale(), 131072.0);
        assert_eq!(s.state().growth_tracker, 0);
        // A non-finite step resets the run.
        s.update(false);
        s.update(true);
        s.update(false);
        s.update(false);
        assert_eq!(s.scale(), 65536.0);
    }

    #[test]
    fn default_growth_interval_is_two_thousand_steps() {
        let mut s = DynamicLossScaler::new(LossScalerConfig::default()).unwrap();
        for _ in 0..1999 {
            s.update(false);
        }
        assert_eq!(s.scale(), 65536.0);
        s.update(false);
        assert_eq!(s.scale(), 131072.0);
    }

    #[test]
    fn a_restored_scaler_keeps_its_configured_factors() {
        let cfg = LossScalerConfig {
            init_scale: 1024.0,
            growth_factor: 3.0,
            backoff_factor: 0.25,
            growth_interval: 2,
        };
        let mut s = DynamicLossScaler::new(cfg).unwrap();
        s.restore(LossScalerState {
            scale: 8.0,
            growth_tracker: 1,
        })
        .unwrap();
        assert_eq!(s.config(), cfg);
        // One more finite step completes the configured interval of 2 and grows by 3.
        s.update(false);
        assert_eq!(s.scale(), 24.0);
        s.update(true);
        assert_eq!(s.scale(), 6.0);
    }

    #[test]
    fn state_serialises_and_restores() {
        let mut s = DynamicLossScaler::new(LossScalerConfig::default()).unwrap();
        s.update(true);
        s.update(false);
        let json = serde_json::to_string(&s.state()).unwrap();
        assert_eq!(json, r#"{"scale":32768.0,"growthTracker":1}"#);
        let state: LossScalerState = serde_json::from_str(&json).unwrap();
        let restored = DynamicLossScaler::from_state(LossScalerConfig::default(), state).unwrap();
        assert_eq!(restored, s);
        let bad = LossScalerState {
            scale: 0.0,
            growth_tracker: 0,
        };
        assert!(DynamicLossScaler::from_state(LossScalerConfig::default(), bad).is_err());
    }

    #[test]
    fn invalid_settings_name_the_field() {
        let cfg = LossScalerConfig {
            backoff_factor: 2.0,
            ..Default::default()
        };
        let err = DynamicLossScaler::new(cfg).unwrap_err();
        assert_eq!(err.field, "backoffFactor");
    }
}
