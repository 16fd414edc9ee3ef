//! Gradient clipping by total L2 norm, applied separately to each student submodule
//! (`backbone`, `dino_head`, `ibot_head`) as the reference loop does.

use tch::{Kind, Tensor};

/// Norm and coefficient of one clipping call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipStats {
    /// Total L2 norm of the gradients before clipping.
    pub total_norm: f64,
    /// Factor the gradients were multiplied by: `min(1, max_norm / (norm + 1e-6))`.
    pub clip_coef: f64,
}

/// [`ClipStats`] as float32 scalars on the gradients' device, not yet read to the host.
#[derive(Debug)]
pub struct ClipTensors {
    pub total_norm: Tensor,
    pub clip_coef: Tensor,
}

impl ClipTensors {
    /// Both values in one host read.
    pub fn read(&self) -> ClipStats {
        let both = Tensor::stack(
            &[
                self.total_norm.to_kind(Kind::Double),
                self.clip_coef.to_kind(Kind::Double),
            ],
            0,
        );
        let v = crate::host_sync::f64s(&both);
        ClipStats {
            total_norm: v[0],
            clip_coef: v[1],
        }
    }
}

/// Total L2 norm over `grads` (the norm of the per-tensor norms, as
/// `torch.nn.utils.clip_grad_norm_`), as a float32 scalar tensor; 0 for no gradients.
pub fn grad_total_norm(grads: &[Tensor]) -> Tensor {
    tch::no_grad(|| {
        if grads.is_empty() {
            return Tensor::from(0.0f32);
        }
        let norms: Vec<Tensor> = grads
            .iter()
            .map(|g| g.to_kind(Kind::Float).norm())
            .collect();
        Tensor::stack(&norms, 0).norm()
    })
}

/// Clips `grads` in place: multiplies every gradient by
/// `clamp(max_norm / (total_norm + 1e-6), max = 1)`. A non-finite norm propagates into the
/// gradients (PyTorch's default), which the loss scaler or the NaN check then catches.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> ClipStats {
    clip_grad_norm_on_device(grads, max_norm).read()
}

/// [`clip_grad_norm`] without reading the statistics to the host (the training step's form).
pub fn clip_grad_norm_on_device(grads: &mut [Tensor], max_norm: f64) -> ClipTensors {
    let total = grad_total_norm(grads);
    let coef = tch::no_grad(|| {
        // `max_norm / t` in PyTorch is `t.reciprocal() * max_norm`; same roundings here.
        let coef = (&total + 1e-6).reciprocal() * max_norm;
        let coef = coef.clamp_max(1.0);
        for g in grads.iter_mut() {
            let _ = g.g_mul_(&coef.to_device(g.device()).to_kind(g.kind()));
        }
        coef
    });
    ClipTensors {
        total_norm: total,
        clip_coef: coef,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t).unwrap()
    }

    #[test]
    fn total_norm_spans_all_tensors() {
        let grads = [
            Tensor::from_slice(&[3.0f32]),
            Tensor::from_slice(&[4.0f32, 0.0]),
        ];
        assert_eq!(grad_total_norm(&grads).double_value(&[]), 5.0);
        assert_eq!(grad_total_norm(&[]).double_value(&[]), 0.0);
    }

    #[test]
    fn gradients_above_the_limit_are_scaled_to_it() {
        let mut grads = [Tensor::from_slice(&[3.0f32]), Tensor::from_slice(&[4.0f32])];
        let stats = clip_grad_norm(&mut grads, 1.0);
        assert_eq!(stats.total_norm, 5.0);
        assert!((stats.clip_coef - 1.0 / (5.0 + 1e-6)).abs() < 1e-7);
        let after = grad_total_norm(&grads).double_value(&[]);
        assert!((after - 1.0).abs() < 1e-5, "{after}");
    }

    #[test]
    fn gradients_below_the_limit_are_untouched() {
        let mut grads = [Tensor::from_slice(&[0.3f32, -0.4])];
        let stats = clip_grad_norm(&mut grads, 3.0);
        assert_eq!(stats.clip_coef, 1.0);
        assert_eq!(values(&grads[0]), vec![0.3, -0.4]);
    }

    #[test]
    fn clipping_works_on_autograd_gradients_in_place() {
        let w = Tensor::from_slice(&[1.0f32, 1.0]).set_requires_grad(true);
        (&w * 30.0).sum(None::<Kind>).backward();
        let mut grads = [w.grad()];
        clip_grad_norm(&mut grads, 3.0);
        let g = values(&w.grad());
        assert!((g[0] - 3.0 / 2f32.sqrt()).abs() < 1e-4, "{g:?}");
    }
}
