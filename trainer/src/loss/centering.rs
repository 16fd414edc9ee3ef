//! Teacher targets: softmax centering with an EMA center, and Sinkhorn–Knopp.
//!
//! The reference keeps the center update *pending*: `update_center` only records the batch
//! statistics (started as an async all-reduce), and the next `softmax_center_teacher` call
//! folds it in before centering. The effect is that step `t` is centered with the center of
//! step `t-1`'s update applied one call late. [`TeacherCenter`] reproduces that exactly; the
//! all-reduce is done synchronously in [`TeacherCenter::record`] (same values, simpler).

use std::str::FromStr;

use tch::{Device, Kind, Tensor};

use super::{LossError, expect_positive};
use crate::dist::Collective;

/// Official center momentum (`DINOLoss` / `iBOTPatchLoss` default).
pub const DEFAULT_CENTER_MOMENTUM: f64 = 0.9;
/// Official number of Sinkhorn–Knopp iterations.
pub const SINKHORN_ITERATIONS: usize = 3;

/// How teacher head outputs become training targets (`train.centering` in the official
/// config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CenteringMode {
    /// `softmax((t - center) / temp)` with the EMA center (official default).
    #[default]
    Centering,
    /// Sinkhorn–Knopp equipartition, 3 iterations in float32.
    SinkhornKnopp,
}

impl FromStr for CenteringMode {
    type Err = LossError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "centering" => Ok(Self::Centering),
            "sinkhorn_knopp" | "sinkhornKnopp" => Ok(Self::SinkhornKnopp),
            other => Err(LossError::UnknownCenteringMode(other.to_string())),
        }
    }
}

/// Serializable snapshot of a [`TeacherCenter`] for checkpoints. Keeping the pending update
/// makes a resumed run identical to an uninterrupted one (the reference drops it).
#[derive(Debug)]
pub struct CenterState {
    /// The center buffer (`[1, K]` for DINO, `[1, 1, K]` for iBOT), float32.
    pub center: Tensor,
    /// Recorded but not yet applied batch statistic: all-reduced sum and its divisor.
    pub pending: Option<(Tensor, i64)>,
}

/// EMA center of teacher outputs with the reference's one-call-late update.
#[derive(Debug)]
pub struct TeacherCenter {
    center: Tensor,
    momentum: f64,
    /// All-reduced batch sum and the divisor `len × world_size` it is averaged with.
    pending: Option<(Tensor, i64)>,
}

impl TeacherCenter {
    /// A zero center of the given shape (float32), like the reference buffer at init.
    pub fn zeros(shape: &[i64], momentum: f64, device: Device) -> Result<Self, LossError> {
        check_momentum(momentum)?;
        Ok(Self {
            center: Tensor::zeros(shape, (Kind::Float, device)),
            momentum,
            pending: None,
        })
    }

    /// Restores a center from a checkpoint snapshot.
    pub fn from_state(state: CenterState, momentum: f64) -> Result<Self, LossError> {
        check_momentum(momentum)?;
        Ok(Self {
            center: state.center.to_kind(Kind::Float),
            momentum,
            pending: state.pending,
        })
    }

    /// A copy of the state for checkpointing.
    pub fn state(&self) -> CenterState {
        CenterState {
            center: self.center.copy(),
            pending: self.pending.as_ref().map(|(s, n)| (s.copy(), *n)),
        }
    }

    /// The current center buffer (without any pending update).
    pub fn center(&self) -> &Tensor {
        &self.center
    }

    /// EMA momentum of the center.
    pub fn momentum(&self) -> f64 {
        self.momentum
    }

    /// Whether a recorded batch statistic waits to be folded in.
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Records a batch statistic: `local_sum` is summed over ranks, and the next
    /// [`apply_pending`](Self::apply_pending) uses `local_sum_total / (local_count × world)`.
    /// A previous, not yet applied record is replaced (as in the reference).
    pub fn record(&mut self, local_sum: Tensor, local_count: i64, collective: &dyn Collective) {
        let mut sum = tch::no_grad(|| local_sum.detach().to_kind(Kind::Float));
        collective.all_reduce_sum(&mut sum);
        let divisor = local_count * collective.world_size() as i64;
        self.pending = Some((sum, divisor));
    }

    /// Folds a pending record in: `center = m·center + (1-m)·batch_mean`.
    pub fn apply_pending(&mut self) {
        if let Some((sum, divisor)) = self.pending.take() {
            tch::no_grad(|| {
                let batch_mean = sum / divisor;
                self.center = &self.center * self.momentum + batch_mean * (1.0 - self.momentum);
            });
        }
    }

    /// Applies any pending update, then returns `softmax((logits - center) / temp, -1)`.
    pub fn softmax_centered(&mut self, logits: &Tensor, teacher_temp: f64) -> Tensor {
        self.apply_pending();
        tch::no_grad(|| ((logits - &self.center) / teacher_temp).softmax(-1, None::<Kind>))
    }
}

fn check_momentum(momentum: f64) -> Result<(), LossError> {
    if (0.0..=1.0).contains(&momentum) {
        Ok(())
    } else {
        Err(LossError::InvalidSetting {
            field: "centerMomentum",
            message: format!("must be in [0, 1], got {momentum}"),
        })
    }
}

/// Sinkhorn–Knopp targets of `logits` (`[rows, K]`), in float32 as the reference.
///
/// `Q = exp(logits / temp)ᵀ`, normalised to sum 1 over all ranks, then `iterations` times:
/// rows (prototypes) to `1/K` (row sums all-reduced), columns (samples) to `1/B`; finally
/// columns to 1. `total_samples` is `B`: rows × world size for DINO, the all-reduced number
/// of masked patches for iBOT.
pub fn sinkhorn_knopp(
    logits: &Tensor,
    teacher_temp: f64,
    total_samples: i64,
    iterations: usize,
    collective: &dyn Collective,
) -> Result<Tensor, LossError> {
    super::expect_2d("teacher logits", logits, None, None)?;
    expect_positive("teacherTemp", teacher_temp)?;
    if total_samples <= 0 {
        return Err(LossError::InvalidSetting {
            field: "total_samples",
            message: format!("Sinkhorn–Knopp needs at least one sample, got {total_samples}"),
        });
    }
    Ok(tch::no_grad(|| {
        let logits = logits.to_kind(Kind::Float);
        // Q is K × B, as in the paper's notation.
        let mut q = (logits / teacher_temp).exp().tr().contiguous();
        let k = q.size()[0];
        let b = total_samples;
        let mut sum_q = q.sum(None::<Kind>);
        collective.all_reduce_sum(&mut sum_q);
        q /= &sum_q;
        for _ in 0..iterations {
            let mut row_sums = q.sum_dim_intlist(&[1i64][..], true, None::<Kind>);
            collective.all_reduce_sum(&mut row_sums);
            q /= &row_sums;
            q /= k;
            let col_sums = q.sum_dim_intlist(&[0i64][..], true, None::<Kind>);
            q /= &col_sums;
            q /= b;
        }
        q *= b;
        q.tr()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::Single;
    use crate::dist::tests::Replicated;

    fn vec_of(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(&t.flatten(0, -1)).unwrap()
    }

    #[test]
    fn centering_modes_parse_from_their_official_names() {
        assert_eq!(
            "centering".parse::<CenteringMode>(),
            Ok(CenteringMode::Centering)
        );
        assert_eq!(
            "sinkhorn_knopp".parse::<CenteringMode>(),
            Ok(CenteringMode::SinkhornKnopp)
        );
        let err = "softmax".parse::<CenteringMode>().unwrap_err();
        assert!(err.to_string().contains("sinkhorn_knopp"), "{err}");
    }

    #[test]
    fn center_update_is_applied_only_by_the_next_softmax_call() {
        let mut c = TeacherCenter::zeros(&[1, 2], 0.9, Device::Cpu).unwrap();
        let logits = Tensor::from_slice(&[1.0f32, 3.0, 3.0, 5.0]).view([2, 2]);
        c.record(
            logits.sum_dim_intlist(&[0i64][..], true, None::<Kind>),
            2,
            &Single,
        );
        assert!(c.has_pending());
        assert_eq!(
            vec_of(c.center()),
            vec![0.0, 0.0],
            "record must not move the center"
        );
        let _ = c.softmax_centered(&logits, 0.04);
        assert!(!c.has_pending());
        // batch mean (2, 4) weighted by 0.1.
        let got = vec_of(c.center());
        assert!(
            (got[0] - 0.2).abs() < 1e-7 && (got[1] - 0.4).abs() < 1e-7,
            "{got:?}"
        );
    }

    #[test]
    fn center_batch_mean_divides_by_rows_times_world_size() {
        let group = Replicated::new(4);
        let mut c = TeacherCenter::zeros(&[1, 1], 0.5, Device::Cpu).unwrap();
        // Every rank holds rows {2, 4}: global mean 3.
        c.record(Tensor::from_slice(&[6.0f32]).view([1, 1]), 2, &group);
        c.apply_pending();
        assert!((vec_of(c.center())[0] - 1.5).abs() < 1e-7);
    }

    #[test]
    fn centered_softmax_rows_are_distributions_shifted_by_the_center() {
        let mut c = TeacherCenter::zeros(&[1, 3], 0.9, Device::Cpu).unwrap();
        let logits = Tensor::from_slice(&[0.1f32, 0.2, 0.3]).view([1, 3]);
        let p = c.softmax_centered(&logits, 0.1);
        let v = vec_of(&p);
        assert!((v.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(v[2] > v[1] && v[1] > v[0]);
    }

    #[test]
    fn center_state_round_trips_including_a_pending_update() {
        let mut c = TeacherCenter::zeros(&[1, 2], 0.9, Device::Cpu).unwrap();
        c.record(Tensor::from_slice(&[1.0f32, 1.0]).view([1, 2]), 1, &Single);
        let mut restored = TeacherCenter::from_state(c.state(), 0.9).unwrap();
        c.apply_pending();
        restored.apply_pending();
        assert_eq!(vec_of(c.center()), vec_of(restored.center()));
    }

    #[test]
    fn momentum_outside_unit_interval_is_rejected() {
        let err = TeacherCenter::zeros(&[1, 2], 1.5, Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("centerMomentum"), "{err}");
    }

    #[test]
    fn sinkhorn_targets_are_distributions_with_more_balanced_prototypes_than_softmax() {
        // Deterministic, unbalanced logits: prototype k is favoured by many rows.
        let logits =
            (Tensor::arange(64 * 16, (Kind::Float, Device::Cpu)).view([64, 16]) * 0.37).sin() * 0.2;
        let q = sinkhorn_knopp(&logits, 0.05, 64, SINKHORN_ITERATIONS, &Single).unwrap();
        let row_sums = vec_of(&q.sum_dim_intlist(&[1i64][..], false, None::<Kind>));
        assert!(
            row_sums.iter().all(|s| (s - 1.0).abs() < 1e-5),
            "{row_sums:?}"
        );
        // Equipartition: the mass per prototype spreads far less than under a plain softmax.
        let spread = |t: &Tensor| {
            t.sum_dim_intlist(&[0i64][..], false, None::<Kind>)
                .std(true)
                .double_value(&[])
        };
        let softmax = (&logits / 0.05).softmax(-1, None::<Kind>);
        let (sk, sm) = (spread(&q), spread(&softmax));
        assert!(sk < 0.5 * sm, "{sk} vs {sm}");
        let total = q.sum(None::<Kind>).double_value(&[]);
        assert!((total - 64.0).abs() < 1e-3, "{total}");
    }

    #[test]
    fn sinkhorn_rejects_a_non_matrix_and_zero_samples() {
        let v = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        assert!(matches!(
            sinkhorn_knopp(&v, 0.05, 4, 3, &Single),
            Err(LossError::Shape { .. })
        ));
        let m = Tensor::zeros([4, 2], (Kind::Float, Device::Cpu));
        assert!(sinkhorn_knopp(&m, 0.05, 0, 3, &Single).is_err());
    }
}
