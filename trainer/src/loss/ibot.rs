//! iBOT masked-patch loss (reference `iBOTPatchLoss`), with its teacher center `[1, 1, K]`.
//!
//! Inputs are the head outputs of the masked patches only, in flattened-mask order
//! (`mask_indices_list`), `[n_masked, K]`.

use tch::{Device, Kind, Tensor};

use super::centering::{CenteringMode, TeacherCenter, sinkhorn_knopp};
use super::{LossError, PrototypeLossConfig, expect_2d, expect_positive};
use crate::dist::Collective;

/// Settings of the iBOT patch loss.
pub type IbotLossConfig = PrototypeLossConfig;

/// iBOT patch loss with its teacher-center state.
#[derive(Debug)]
pub struct IbotLoss {
    out_dim: i64,
    student_temp: f64,
    sinkhorn_iterations: usize,
    center: TeacherCenter,
}

impl IbotLoss {
    /// A loss with a zero center `[1, 1, K]` on `device`.
    pub fn new(cfg: &IbotLossConfig, device: Device) -> Result<Self, LossError> {
        cfg.check("ibot.headNPrototypes")?;
        Ok(Self {
            out_dim: cfg.out_dim,
            student_temp: cfg.student_temp,
            sinkhorn_iterations: cfg.sinkhorn_iterations,
            center: TeacherCenter::zeros(&[1, 1, cfg.out_dim], cfg.center_momentum, device)?,
        })
    }

    /// The teacher center (for checkpoints and inspection).
    pub fn center(&self) -> &TeacherCenter {
        &self.center
    }

    /// Mutable center, e.g. to restore it from a checkpoint.
    pub fn center_mut(&mut self) -> &mut TeacherCenter {
        &mut self.center
    }

    /// `softmax((teacher - center) / temp)` of the masked patches `[n, K]`, after folding in
    /// any pending center update.
    pub fn softmax_center_teacher(
        &mut self,
        teacher_masked: &Tensor,
        teacher_temp: f64,
    ) -> Result<Tensor, LossError> {
        expect_2d(
            "teacher patch logits",
            teacher_masked,
            None,
            Some(self.out_dim),
        )?;
        expect_positive("teacherTemp", teacher_temp)?;
        // The reference centers a [1, n, K] view against the [1, 1, K] center.
        Ok(self
            .center
            .softmax_centered(&teacher_masked.unsqueeze(0), teacher_temp)
            .squeeze_dim(0))
    }

    /// Records the mean over this rank's masked patches. The reference sums per-rank means
    /// and divides by the world size (a mean of means, not of all patches); so do we.
    pub fn update_center(
        &mut self,
        teacher_masked: &Tensor,
        collective: &dyn Collective,
    ) -> Result<(), LossError> {
        expect_2d(
            "teacher patch logits",
            teacher_masked,
            None,
            Some(self.out_dim),
        )?;
        let mean = tch::no_grad(|| {
            teacher_masked
                .unsqueeze(0)
                .mean_dim(&[1i64][..], false, None::<Kind>)
                .sum_dim_intlist(&[0i64][..], true, None::<Kind>)
        });
        self.center.record(mean, 1, collective);
        Ok(())
    }

    /// Sinkhorn–Knopp targets with `B` = the masked-patch count summed over ranks.
    pub fn sinkhorn_knopp_teacher(
        &self,
        teacher_masked: &Tensor,
        teacher_temp: f64,
        n_masked_patches: i64,
        collective: &dyn Collective,
    ) -> Result<Tensor, LossError> {
        expect_2d(
            "teacher patch logits",
            teacher_masked,
            Some(n_masked_patches),
            Some(self.out_dim),
        )?;
        // Alone, the sum over ranks is this rank's count: no round trip through the device.
        let total = if collective.world_size() == 1 {
            n_masked_patches
        } else {
            let mut b = Tensor::from_slice(&[n_masked_patches]).to_device(teacher_masked.device());
            collective.all_reduce_sum(&mut b);
            crate::host_sync::i64_scalar(&b)
        };
        sinkhorn_knopp(
            teacher_masked,
            teacher_temp,
            total,
            self.sinkhorn_iterations,
            collective,
        )
    }

    /// Teacher targets as the training step builds them: for `Centering`, the centered softmax
    /// followed by `update_center`; for `SinkhornKnopp`, the SK targets.
    pub fn teacher_targets(
        &mut self,
        mode: CenteringMode,
        teacher_masked: &Tensor,
        teacher_temp: f64,
        n_masked_patches: i64,
        collective: &dyn Collective,
    ) -> Result<Tensor, LossError> {
        match mode {
            CenteringMode::Centering => {
                let t = self.softmax_center_teacher(teacher_masked, teacher_temp)?;
                self.update_center(teacher_masked, collective)?;
                Ok(t)
            }
            CenteringMode::SinkhornKnopp => self.sinkhorn_knopp_teacher(
                teacher_masked,
                teacher_temp,
                n_masked_patches,
                collective,
            ),
        }
    }

    /// Reference `forward_masked`: per masked patch `Σ_k t · log_softmax(s / temp)`, weighted
    /// by `masks_weight` (1 / masked count of the patch's image), summed, negated and divided
    /// by the number of images `n_images` (rows of the collated masks).
    ///
    /// `student_masked` may hold more rows than `targets` (a padded `upperbound` buffer): only
    /// the first `n = targets.rows` rows are used.
    pub fn forward_masked(
        &self,
        student_masked: &Tensor,
        targets: &Tensor,
        masks_weight: &Tensor,
        n_images: i64,
    ) -> Result<Tensor, LossError> {
        let (n, _) = expect_2d("iBOT targets", targets, None, Some(self.out_dim))?;
        let (rows, _) = expect_2d(
            "student patch logits",
            student_masked,
            None,
            Some(self.out_dim),
        )?;
        if rows < n {
            return Err(LossError::Shape {
                name: "student patch logits",
                expected: format!("[≥{n}, {}]", self.out_dim),
                got: student_masked.size(),
            });
        }
        if masks_weight.size() != [n] {
            return Err(LossError::Shape {
                name: "masks_weight",
                expected: format!("[{n}]"),
                got: masks_weight.size(),
            });
        }
        if n_images <= 0 {
            return Err(LossError::InvalidSetting {
                field: "n_images",
                message: format!("must be > 0, got {n_images}"),
            });
        }
        let s = student_masked.narrow(0, 0, n);
        let lsm = (s / self.student_temp).log_softmax(-1, None::<Kind>);
        let per_patch = (targets * lsm).sum_dim_intlist(&[-1i64][..], false, None::<Kind>);
        let weighted = per_patch * masks_weight;
        Ok(-weighted.sum(None::<Kind>) / n_images)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::Single;
    use crate::dist::tests::Replicated;

    fn loss(k: i64) -> IbotLoss {
        IbotLoss::new(
            &IbotLossConfig {
                out_dim: k,
                ..Default::default()
            },
            Device::Cpu,
        )
        .unwrap()
    }

    #[test]
    fn uniform_prediction_costs_log_k_per_masked_image() {
        let l = loss(8);
        let opts = (Kind::Float, Device::Cpu);
        // Two images with 2 and 1 masked patches (weights 1/2, 1/2, 1), four images in total.
        let s = Tensor::zeros([3, 8], opts);
        let t = Tensor::full([3, 8], 1.0 / 8.0, opts);
        let w = Tensor::from_slice(&[0.5f32, 0.5, 1.0]);
        let v = l.forward_masked(&s, &t, &w, 4).unwrap().double_value(&[]);
        assert!((v - 2.0 * 8f64.ln() / 4.0).abs() < 1e-6, "{v}");
    }

    #[test]
    fn padded_student_rows_beyond_the_targets_are_ignored() {
        let l = loss(4);
        let opts = (Kind::Float, Device::Cpu);
        let s = Tensor::randn([3, 4], opts);
        let padded = Tensor::cat(&[s.copy(), Tensor::full([5, 4], 100.0, opts)], 0);
        let t = Tensor::randn([3, 4], opts).softmax(-1, None::<Kind>);
        let w = Tensor::ones([3], opts);
        let a = l.forward_masked(&s, &t, &w, 2).unwrap().double_value(&[]);
        let b = l
            .forward_masked(&padded, &t, &w, 2)
            .unwrap()
            .double_value(&[]);
        assert_eq!(a, b);
    }

    #[test]
    fn mask_weight_length_must_match_the_targets() {
        let l = loss(4);
        let opts = (Kind::Float, Device::Cpu);
        let t = Tensor::zeros([3, 4], opts);
        let err = l
            .forward_masked(&t, &t, &Tensor::ones([2], opts), 1)
            .unwrap_err();
        assert!(err.to_string().contains("masks_weight"), "{err}");
    }

    #[test]
    fn center_is_three_dimensional_and_moves_toward_the_patch_mean() {
        let mut l = loss(2);
        assert_eq!(l.center().center().size(), vec![1, 1, 2]);
        let t = Tensor::from_slice(&[1.0f32, 0.0, 3.0, 0.0]).view([2, 2]);
        let _ = l
            .teacher_targets(CenteringMode::Centering, &t, 0.04, 2, &Single)
            .unwrap();
        l.center_mut().apply_pending();
        let c = Vec::<f32>::try_from(&l.center().center().flatten(0, -1)).unwrap();
        assert!((c[0] - 0.2).abs() < 1e-7 && c[1].abs() < 1e-7, "{c:?}");
    }

    #[test]
    fn sinkhorn_uses_the_masked_count_summed_over_ranks() {
        let l = loss(4);
        let t = Tensor::randn([6, 4], (Kind::Float, Device::Cpu));
        let group = Replicated::new(2);
        // With every rank holding the same patches, B = 12 and columns still sum to one.
        let q = l.sinkhorn_knopp_teacher(&t, 0.05, 6, &group).unwrap();
        let rows =
            Vec::<f32>::try_from(&q.sum_dim_intlist(&[1i64][..], false, None::<Kind>)).unwrap();
        assert!(rows.iter().all(|r| (r - 1.0).abs() < 1e-5), "{rows:?}");
        assert!(l.sinkhorn_knopp_teacher(&t, 0.05, 5, &Single).is_err());
    }
}
