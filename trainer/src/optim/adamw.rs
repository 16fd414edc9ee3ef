//! AdamW with a learning rate and weight decay per parameter, fp32 master state.
//!
//! Hand-written rather than `tch::nn::Optimizer`: that wrapper exposes one lr / wd per
//! optimizer (or per coarse group) and no access to the moment buffers, while the DINOv2 loop
//! sets `lr = schedule × lr_mult` and `wd = schedule × wd_mult` for every parameter each
//! iteration, freezes the prototype layer through its own schedule, and checkpoints the
//! state. The update reproduces `torch.optim.AdamW` (foreach path) operation by operation:
//!
//! ```text
//! p *= 1 - lr·wd                        (decoupled weight decay, skipped when wd = 0)
//! m  = lerp(m, g, 1 - β1)
//! v  = β2·v + (1 - β2)·g·g
//! p += -(lr / (1 - β1^t)) · m / (sqrt(v) / sqrt(1 - β2^t) + eps)
//! ```

use tch::{Kind, Tensor};

use super::param_groups::ParamMultipliers;

/// Hyper-parameters (official `optim.adamw_beta1/2`; eps is PyTorch's default).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// First-moment decay (0.9).
    pub beta1: f64,
    /// Second-moment decay (0.999).
    pub beta2: f64,
    /// Denominator offset (1e-8).
    pub eps: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// Optimizer misuse.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OptimError {
    /// Master weights must be float32.
    #[error("parameter {name:?}: master weights must be float32, got {kind:?}")]
    NotFloat32 { name: String, kind: Kind },
    /// A gradient whose shape differs from its parameter.
    #[error("parameter {name:?}: gradient shape {grad:?} differs from the parameter's {param:?}")]
    GradShape {
        name: String,
        grad: Vec<i64>,
        param: Vec<i64>,
    },
    /// Wrong number of gradients passed to `step_with_grads`.
    #[error("expected {expected} gradients (one per parameter), got {got}")]
    GradCount { expected: usize, got: usize },
    /// No parameter of that name.
    #[error("no parameter named {0:?} in the optimizer")]
    UnknownParam(String),
    /// A state entry that does not fit its parameter.
    #[error("optimizer state for {name:?}: {message}")]
    BadState { name: String, message: String },
    /// Invalid hyper-parameter.
    #[error("{field}: {message}")]
    InvalidSetting {
        field: &'static str,
        message: String,
    },
}

/// Moment buffers and step count of one parameter (what a checkpoint stores).
#[derive(Debug)]
pub struct AdamWParamState {
    /// First moment `m`, float32, shape of the parameter.
    pub exp_avg: Tensor,
    /// Second moment `v`, float32, shape of the parameter.
    pub exp_avg_sq: Tensor,
    /// Number of updates applied.
    pub step: u64,
}

impl AdamWParamState {
    fn copy(&self) -> Self {
        Self {
            exp_avg: self.exp_avg.copy(),
            exp_avg_sq: self.exp_avg_sq.copy(),
            step: self.step,
        }
    }
}

#[derive(Debug)]
struct Slot {
    name: String,
    param: Tensor,
    multipliers: ParamMultipliers,
    lr: f64,
    weight_decay: f64,
    state: Option<AdamWParamState>,
}

/// AdamW over named float32 parameters, each with its own lr and weight decay.
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
}

impl AdamW {
    /// An optimizer over `params` (name, float32 tensor shared with the model, multipliers).
    /// lr and wd start at 0 until [`apply_schedule`](Self::apply_schedule) or
    /// [`set_hyper`](Self::set_hyper) sets them.
    pub fn new(
        cfg: AdamWConfig,
        params: Vec<(String, Tensor, ParamMultipliers)>,
    ) -> Result<Self, OptimError> {
        for (field, v) in [
            ("optim.adamwBeta1", cfg.beta1),
            ("optim.adamwBeta2", cfg.beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                return Err(OptimError::InvalidSetting {
                    field,
                    message: format!("must be in [0, 1), got {v}"),
                });
            }
        }
        if !(cfg.eps.is_finite() && cfg.eps > 0.0) {
            return Err(OptimError::InvalidSetting {
                field: "eps",
                message: format!("must be > 0, got {}", cfg.eps),
            });
        }
        let mut slots = Vec::with_capacity(params.len());
        for (name, param, multipliers) in params {
            if param.kind() != Kind::Float {
                return Err(OptimError::NotFloat32 {
                    name,
                    kind: param.kind(),
                });
            }
            slots.push(Slot {
                name,
                param,
                multipliers,
                lr: 0.0,
                weight_decay: 0.0,
                state: None,
            });
        }
        Ok(Self { cfg, slots })
    }

    /// Parameter names in optimizer order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(|s| s.name.as_str())
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the optimizer has no parameters.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Reference `apply_optim_scheduler`: every parameter gets
    /// `lr = (last_layer_lr if is_last_layer else lr) × lr_mult`, `wd = wd × wd_mult`.
    pub fn apply_schedule(&mut self, lr: f64, wd: f64, last_layer_lr: f64) {
        for s in &mut self.slots {
            let m = s.multipliers;
            s.weight_decay = wd * m.wd_mult;
            s.lr = (if m.is_last_layer { last_layer_lr } else { lr }) * m.lr_mult;
        }
    }

    /// Sets lr and weight decay of one parameter directly.
    pub fn set_hyper(&mut self, name: &str, lr: f64, weight_decay: f64) -> Result<(), OptimError> {
        let s = self.slot_mut(name)?;
        s.lr = lr;
        s.weight_decay = weight_decay;
        Ok(())
    }

    /// Current `(lr, weight_decay)` of one parameter.
    pub fn hyper(&self, name: &str) -> Option<(f64, f64)> {
        self.slots
            .iter()
            .find(|s| s.name == name)
            .map(|s| (s.lr, s.weight_decay))
    }

    /// Moment state of one parameter (`None` before its first update).
    pub fn state(&self, name: &str) -> Option<&AdamWParamState> {
        self.slots
            .iter()
            .find(|s| s.name == name)
            .and_then(|s| s.state.as_ref())
    }

    /// Copies of all moment states, for checkpoints.
    pub fn state_dict(&self) -> Vec<(String, AdamWParamState)> {
        self.slots
            .iter()
            .filter_map(|s| s.state.as_ref().map(|st| (s.name.clone(), st.copy())))
            .collect()
    }

    /// Restores moment states saved by [`state_dict`](Self::state_dict).
    pub fn load_state_dict(
        &mut self,
        states: Vec<(String, AdamWParamState)>,
    ) -> Result<(), OptimError> {
        for (name, st) in states {
            let slot = self.slot_mut(&name)?;
            let shape = slot.param.size();
            for (what, t) in [("exp_avg", &st.exp_avg), ("exp_avg_sq", &st.exp_avg_sq)] {
                if t.size() != shape {
                    return Err(OptimError::BadState {
                        name,
                        message: format!("{what} has shape {:?}, parameter {shape:?}", t.size()),
                    });
                }
            }
            let device = slot.param.device();
            slot.state = Some(AdamWParamState {
                exp_avg: st.exp_avg.to_kind(Kind::Float).to_device(device),
                exp_avg_sq: st.exp_avg_sq.to_kind(Kind::Float).to_device(device),
                step: st.step,
            });
        }
        Ok(())
    }

    /// Clears the gradients of all parameters.
    pub fn zero_grad(&mut self) {
        for s in &mut self.slots {
            s.param.zero_grad();
        }
    }

    /// One update from the parameters' own `.grad()`; parameters without a gradient are left
    /// untouched (no state change), as in PyTorch.
    pub fn step(&mut self) -> Result<(), OptimError> {
        let grads: Vec<Option<Tensor>> = self
            .slots
            .iter()
            .map(|s| {
                let g = s.param.grad();
                g.defined().then_some(g)
            })
            .collect();
        self.step_with_grads(&grads)
    }

    /// One update with explicit gradients, one per parameter in optimizer order (e.g. already
    /// unscaled or clipped copies; lower-precision gradients are promoted to float32).
    pub fn step_with_grads(&mut self, grads: &[Option<Tensor>]) -> Result<(), OptimError> {
        if grads.len() != self.slots.len() {
            return Err(OptimError::GradCount {
                expected: self.slots.len(),
                got: grads.len(),
            });
        }
        for (s, g) in self.slots.iter().zip(grads) {
            if let Some(g) = g
                && g.size() != s.param.size()
            {
                return Err(OptimError::GradShape {
                    name: s.name.clone(),
                    grad: g.size(),
                    param: s.param.size(),
                });
            }
        }
        let cfg = self.cfg;
        tch::no_grad(|| {
            for (s, g) in self.slots.iter_mut().zip(grads) {
                let Some(g) = g else { continue };
                update_one(&cfg, s, &g.to_kind(Kind::Float));
            }
        });
        Ok(())
    }

    fn slot_mut(&mut self, name: &str) -> Result<&mut Slot, OptimError> {
        self.slots
            .iter_mut()
            .find(|s| s.name == name)
            .ok_or_else(|| OptimError::UnknownParam(name.to_string()))
    }
}

/// The AdamW update of one parameter, with torch's order of floating-point operations.
fn update_one(cfg: &AdamWConfig, s: &mut Slot, grad: &Tensor) {
    let st = s.state.get_or_insert_with(|| AdamWParamState {
        exp_avg: s.param.zeros_like(),
        exp_avg_sq: s.param.zeros_like(),
        step: 0,
    });
    st.step += 1;
    let step = st.step as f64;
    if s.weight_decay != 0.0 {
        let _ = s.param.g_mul_scalar_(1.0 - s.lr * s.weight_decay);
    }
    let _ = st.exp_avg.lerp_(grad, 1.0 - cfg.beta1);
    let _ = st.exp_avg_sq.g_mul_scalar_(cfg.beta2);
    // addcmul(v, g, g, value=c) computes v + (c·g)·g; tch's addcmul_ has no `value`, so the
    // scaled factor is formed first (same float32 roundings).
    let _ = st.exp_avg_sq.addcmul_(&(grad * (1.0 - cfg.beta2)), grad);
    let bias_correction1 = 1.0 - cfg.beta1.powf(step);
    let bias_correction2 = 1.0 - cfg.beta2.powf(step);
    let step_size = -(s.lr / bias_correction1);
    let bias_correction2_sqrt = bias_correction2.powf(0.5);
    // In place on the one new tensor: the same kernels and roundings as
    // `sqrt(v) / c + eps`, without two more parameter-sized allocations per update.
    let mut denom = st.exp_avg_sq.sqrt();
    let _ = denom.g_div_scalar_(bias_correction2_sqrt);
    let _ = denom.g_add_scalar_(cfg.eps);
    // addcdiv(p, m, d, value=c) computes p + (c·m)/d; same trick as above.
    let _ = s.param.addcdiv_(&(&st.exp_avg * step_size), &denom);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn mult(lr_mult: f64, wd_mult: f64, is_last_layer: bool) -> ParamMultipliers {
        ParamMultipliers {
            lr_mult,
            wd_mult,
            is_last_layer,
        }
    }

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(&t.flatten(0, -1)).unwrap()
    }

    #[test]
    fn first_step_moves_each_weight_by_about_lr_against_its_gradient() {
        let p = Tensor::from_slice(&[1.0f32, -2.0, 0.5]);
        let mut opt = AdamW::new(
            AdamWConfig::default(),
            vec![("w".into(), p.shallow_clone(), mult(1.0, 0.0, false))],
        )
        .unwrap();
        opt.apply_schedule(0.01, 0.04, 0.0);
        let g = Tensor::from_slice(&[0.3f32, -4.0, 1e-3]);
        opt.step_with_grads(&[Some(g)]).unwrap();
        let v = values(&p);
        let expect = [0.99f32, -1.99, 0.49];
        for (a, b) in v.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{v:?}");
        }
    }

    #[test]
    fn the_configured_betas_and_eps_shape_the_update() {
        // β1 0.5, β2 0.75, eps 0.1 by hand, lr 1, no weight decay:
        // step 1, g = 1:  m 0.5, v 0.25, m̂ 1, sqrt(v̂) 1       -> p = -1/1.1
        // step 2, g = -1: m -0.25, v 0.4375, m̂ -1/3, sqrt(v̂) 1 -> p += (1/3)/1.1
        // (the defaults 0.9/0.999/1e-8 give -1 and then -0.947).
        let p = Tensor::from_slice(&[0.0f32]);
        let cfg = AdamWConfig {
            beta1: 0.5,
            beta2: 0.75,
            eps: 0.1,
        };
        let mut opt = AdamW::new(
            cfg,
            vec![("w".into(), p.shallow_clone(), mult(1.0, 0.0, false))],
        )
        .unwrap();
        opt.apply_schedule(1.0, 0.0, 0.0);
        opt.step_with_grads(&[Some(Tensor::from_slice(&[1.0f32]))])
            .unwrap();
        assert!((values(&p)[0] + 1.0 / 1.1).abs() < 1e-6, "{:?}", values(&p));
        opt.step_with_grads(&[Some(Tensor::from_slice(&[-1.0f32]))])
            .unwrap();
        let expect = -1.0 / 1.1 + (1.0 / 3.0) / 1.1;
        assert!((values(&p)[0] - expect).abs() < 1e-6, "{:?}", values(&p));
    }

    #[test]
    fn decoupled_weight_decay_shrinks_weights_without_gradient_signal() {
        let p = Tensor::from_slice(&[2.0f32]);
        let mut opt = AdamW::new(
            AdamWConfig::default(),
            vec![("w".into(), p.shallow_clone(), mult(1.0, 1.0, false))],
        )
        .unwrap();
        opt.apply_schedule(0.1, 0.5, 0.0);
        opt.step_with_grads(&[Some(Tensor::from_slice(&[0.0f32]))])
            .unwrap();
        // p·(1 - 0.1·0.5), and a zero gradient gives a zero Adam step.
        assert!((values(&p)[0] - 1.9).abs() < 1e-6);
    }

    #[test]
    fn schedule_multipliers_and_last_layer_lr_reach_each_parameter() {
        let z = || Tensor::zeros([1], (Kind::Float, Device::Cpu));
        let mut opt = AdamW::new(
            AdamWConfig::default(),
            vec![
                ("a".into(), z(), mult(0.5, 0.0, false)),
                ("b".into(), z(), mult(1.0, 1.0, true)),
            ],
        )
        .unwrap();
        opt.apply_schedule(1e-3, 0.04, 0.0);
        assert_eq!(opt.hyper("a"), Some((5e-4, 0.0)));
        assert_eq!(opt.hyper("b"), Some((0.0, 0.04)));
        opt.set_hyper("a", 1.0, 2.0).unwrap();
        assert_eq!(opt.hyper("a"), Some((1.0, 2.0)));
        assert!(matches!(
            opt.set_hyper("c", 0.0, 0.0),
            Err(OptimError::UnknownParam(_))
        ));
    }

    #[test]
    fn frozen_parameters_keep_their_value_but_accumulate_moments() {
        let p = Tensor::from_slice(&[1.0f32, 2.0]);
        let mut opt = AdamW::new(
            AdamWConfig::default(),
            vec![("last_layer".into(), p.shallow_clone(), mult(1.0, 1.0, true))],
        )
        .unwrap();
        opt.apply_schedule(1e-3, 0.04, 0.0);
        opt.step_with_grads(&[Some(Tensor::from_slice(&[1.0f32, 1.0]))])
            .unwrap();
        assert_eq!(values(&p), vec![1.0, 2.0]);
        assert_eq!(opt.state("last_layer").unwrap().step, 1);
    }

    #[test]
    fn step_uses_autograd_gradients_and_skips_parameters_without_one() {
        let a = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let b = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let mut opt = AdamW::new(
            AdamWConfig::default(),
            vec![
                ("a".into(), a.shallow_clone(), mult(1.0, 0.0, false)),
                ("b".into(), b.shallow_clone(), mult(1.0, 0.0, false)),
            ],
        )
        .unwrap();
        opt.apply_schedule(0.1, 0.0, 0.0);
        (&a * 3.0).sum(None::<Kind>).backward();
        opt.step().unwrap();
        assert!((a.double_value(&[0]) - 0.9).abs() < 1e-6);
        assert_eq!(b.double_value(&[0]), 1.0);
        assert!(opt.state("b").is_none());
        opt.zero_grad();
        assert_eq!(a.grad().abs().sum(None::<Kind>).double_value(&[]), 0.0);
    }

    #[test]
    fn state_round_trips_through_a_state_dict() {
        let mk = || Tensor::from_slice(&[1.0f32, -1.0]);
        let (p1, p2) = (mk(), mk());
        let build = |p: &Tensor| {
            let mut o = AdamW::new(
                AdamWConfig::default(),
                vec![("w".into(), p.shallow_clone(), mult(1.0, 1.0, false))],
            )
            .unwrap();
            o.apply_schedule(0.01, 0.1, 0.0);
            o
        };
        let (mut o1, mut o2) = (build(&p1), build(&p2));
        let g = || Some(Tensor::from_slice(&[0.5f32, 0.25]));
        o1.step_with_grads(&[g()]).unwrap();
        o2.step_with_grads(&[g()]).unwrap();
        let mut o3 = build(&p2);
        o3.load_state_dict(o2.state_dict()).unwrap();
        o1.step_with_grads(&[g()]).unwrap();
        o3.step_with_grads(&[g()]).unwrap();
        assert_eq!(values(&p1), values(&p2));
    }

    #[test]
    fn misuse_is_reported_with_the_parameter_name() {
        let half = Tensor::zeros([2], (Kind::Half, Device::Cpu));
        let err = AdamW::new(
            AdamWConfig::default(),
            vec![("blocks.0.w".into(), half, mult(1.0, 1.0, false))],
        )
        .unwrap_err();
        assert!(err.to_string().contains("blocks.0.w"), "{err}");
        let mut opt = AdamW::new(
            AdamWConfig::default(),
            vec![(
                "w".into(),
                Tensor::zeros([2], (Kind::Float, Device::Cpu)),
                mult(1.0, 1.0, false),
            )],
        )
        .unwrap();
        let wrong = Some(Tensor::zeros([3], (Kind::Float, Device::Cpu)));
        assert!(matches!(
            opt.step_with_grads(&[wrong]),
            Err(OptimError::GradShape { .. })
        ));
        assert!(matches!(
            opt.step_with_grads(&[]),
            Err(OptimError::GradCount { .. })
        ));
        let bad = AdamWConfig {
            beta1: 1.0,
            ..Default::default()
        };
        assert!(AdamW::new(bad, vec![]).is_err());
    }
}
