//! DINO image-level loss: cross-entropy between teacher targets of the global crops and the
//! student's CLS-head outputs of every crop (reference `DINOLoss` plus the pairing and
//! normalisation of `SSLMetaArch.forward_backward`).

use tch::{Device, Kind, Tensor};

use super::centering::{CenteringMode, TeacherCenter, sinkhorn_knopp};
use super::{LossError, PrototypeLossConfig, expect_2d, expect_positive};
use crate::dist::Collective;

pub use super::DEFAULT_STUDENT_TEMP;
/// The reference supports exactly two global crops (it asserts so).
pub const N_GLOBAL_CROPS: usize = 2;

/// Settings of the DINO loss.
pub type DinoLossConfig = PrototypeLossConfig;

/// The two normalised DINO terms of one step plus their raw values.
#[derive(Debug)]
pub struct DinoCropLosses {
    /// `dino_local_crops_loss`: raw local loss / (global terms + local terms); `None` without
    /// local crops.
    pub local: Option<Tensor>,
    /// `dino_global_crops_loss`: raw global loss × 2 / (global terms + local terms).
    pub global: Tensor,
    /// Raw `DINOLoss.forward` value over the local pairing.
    pub raw_local: Option<Tensor>,
    /// Raw `DINOLoss.forward` value over the (swapped) global pairing.
    pub raw_global: Tensor,
}

/// DINO loss with its teacher-center state (`[1, K]`).
#[derive(Debug)]
pub struct DinoLoss {
    out_dim: i64,
    student_temp: f64,
    sinkhorn_iterations: usize,
    center: TeacherCenter,
}

impl DinoLoss {
    /// A loss with a zero center on `device`.
    pub fn new(cfg: &DinoLossConfig, device: Device) -> Result<Self, LossError> {
        cfg.check("dino.headNPrototypes")?;
        Ok(Self {
            out_dim: cfg.out_dim,
            student_temp: cfg.student_temp,
            sinkhorn_iterations: cfg.sinkhorn_iterations,
            center: TeacherCenter::zeros(&[1, cfg.out_dim], cfg.center_momentum, device)?,
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

    /// `softmax((teacher - center) / temp)` after folding in any pending center update.
    /// `teacher_logits`: `[rows, K]`.
    pub fn softmax_center_teacher(
        &mut self,
        teacher_logits: &Tensor,
        teacher_temp: f64,
    ) -> Result<Tensor, LossError> {
        expect_2d("teacher logits", teacher_logits, None, Some(self.out_dim))?;
        expect_positive("teacherTemp", teacher_temp)?;
        Ok(self.center.softmax_centered(teacher_logits, teacher_temp))
    }

    /// Records the batch mean of `teacher_logits` (all-reduced) for the next centering call.
    pub fn update_center(
        &mut self,
        teacher_logits: &Tensor,
        collective: &dyn Collective,
    ) -> Result<(), LossError> {
        let (rows, _) = expect_2d("teacher logits", teacher_logits, None, Some(self.out_dim))?;
        let sum = tch::no_grad(|| teacher_logits.sum_dim_intlist(&[0i64][..], true, None::<Kind>));
        self.center.record(sum, rows, collective);
        Ok(())
    }

    /// Sinkhorn–Knopp targets with `B` = rows × world size.
    pub fn sinkhorn_knopp_teacher(
        &self,
        teacher_logits: &Tensor,
        teacher_temp: f64,
        collective: &dyn Collective,
    ) -> Result<Tensor, LossError> {
        let (rows, _) = expect_2d("teacher logits", teacher_logits, None, Some(self.out_dim))?;
        let b = rows * collective.world_size() as i64;
        sinkhorn_knopp(
            teacher_logits,
            teacher_temp,
            b,
            self.sinkhorn_iterations,
            collective,
        )
    }

    /// Teacher targets as the training step builds them: for `Centering`, the centered softmax
    /// followed by `update_center`; for `SinkhornKnopp`, the SK targets (center untouched).
    pub fn teacher_targets(
        &mut self,
        mode: CenteringMode,
        teacher_logits: &Tensor,
        teacher_temp: f64,
        collective: &dyn Collective,
    ) -> Result<Tensor, LossError> {
        match mode {
            CenteringMode::Centering => {
                let t = self.softmax_center_teacher(teacher_logits, teacher_temp)?;
                self.update_center(teacher_logits, collective)?;
                Ok(t)
            }
            CenteringMode::SinkhornKnopp => {
                self.sinkhorn_knopp_teacher(teacher_logits, teacher_temp, collective)
            }
        }
    }

    /// Reference `DINOLoss.forward`: `-Σ_s Σ_t mean_rows(Σ_k t · log_softmax(s / temp))`.
    /// Every student block pairs with every target block; they must have the same shape.
    pub fn forward(&self, students: &[Tensor], targets: &[Tensor]) -> Result<Tensor, LossError> {
        if students.is_empty() || targets.is_empty() {
            return Err(LossError::InvalidSetting {
                field: "students/targets",
                message: "need at least one student and one target block".into(),
            });
        }
        let (rows, _) = expect_2d("target block", &targets[0], None, Some(self.out_dim))?;
        for t in targets {
            expect_2d("target block", t, Some(rows), Some(self.out_dim))?;
        }
        let mut total: Option<Tensor> = None;
        for s in students {
            expect_2d("student block", s, Some(rows), Some(self.out_dim))?;
            let lsm = (s / self.student_temp).log_softmax(-1, None::<Kind>);
            for t in targets {
                let per_row = (t * &lsm).sum_dim_intlist(&[-1i64][..], false, None::<Kind>);
                let mean = per_row.mean(None::<Kind>);
                total = Some(match total {
                    None => -mean,
                    Some(acc) => acc - mean,
                });
            }
        }
        Ok(total.expect("non-empty students and targets"))
    }

    /// The two DINO terms of a step with the official pairing and divisors.
    ///
    /// * `targets`: `[2·B, K]` teacher targets of the global crops in **swapped** order (the
    ///   block of crop 1 first), so that student crop 0 meets teacher crop 1.
    /// * `student_global`: `[2·B, K]`, crop-major; `student_local`: `[n_local·B, K]`.
    ///
    /// Local: every local crop against both target blocks, divided by
    /// `n_global_terms + n_local_terms` with `n_global_terms = 2`,
    /// `n_local_terms = max(2·n_local, 1)`. Global: all rows against all rows, times 2, same
    /// divisor.
    pub fn crop_losses(
        &self,
        student_global: &Tensor,
        student_local: Option<&Tensor>,
        n_local_crops: usize,
        targets: &Tensor,
    ) -> Result<DinoCropLosses, LossError> {
        let (rows, _) = expect_2d("teacher targets", targets, None, Some(self.out_dim))?;
        if rows == 0 || rows % N_GLOBAL_CROPS as i64 != 0 {
            return Err(LossError::Shape {
                name: "teacher targets",
                expected: format!("[{N_GLOBAL_CROPS}·B, K] (two global crops)"),
                got: targets.size(),
            });
        }
        expect_2d(
            "student global logits",
            student_global,
            Some(rows),
            Some(self.out_dim),
        )?;
        let batch = rows / N_GLOBAL_CROPS as i64;
        let n_global_terms = ((N_GLOBAL_CROPS - 1) * N_GLOBAL_CROPS) as i64;
        let n_local_terms = (n_local_crops * N_GLOBAL_CROPS).max(1) as i64;
        let divisor = n_global_terms + n_local_terms;

        let (raw_local, local) = match (n_local_crops, student_local) {
            (0, None) => (None, None),
            (0, Some(_)) => {
                return Err(LossError::InvalidSetting {
                    field: "crops.localCropsNumber",
                    message: "is 0 but local-crop logits were given".into(),
                });
            }
            (_, None) => {
                return Err(LossError::InvalidSetting {
                    field: "crops.localCropsNumber",
                    message: format!("is {n_local_crops} but no local-crop logits were given"),
                });
            }
            (n, Some(local)) => {
                expect_2d(
                    "student local logits",
                    local,
                    Some(n as i64 * batch),
                    Some(self.out_dim),
                )?;
                let students = local.chunk(n as i64, 0);
                let target_blocks = targets.chunk(N_GLOBAL_CROPS as i64, 0);
                let raw = self.forward(&students, &target_blocks)?;
                let normalised = &raw / divisor;
                (Some(raw), Some(normalised))
            }
        };

        let raw_global = self.forward(
            std::slice::from_ref(student_global),
            std::slice::from_ref(targets),
        )?;
        // The reference multiplies by 2 because both global crops are processed together.
        let global = &raw_global * 2i64 / divisor;
        Ok(DinoCropLosses {
            local,
            global,
            raw_local,
            raw_global,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::Single;

    fn scalar(t: &Tensor) -> f64 {
        t.double_value(&[])
    }

    fn loss(k: i64) -> DinoLoss {
        DinoLoss::new(
            &DinoLossConfig {
                out_dim: k,
                ..Default::default()
            },
            Device::Cpu,
        )
        .unwrap()
    }

    #[test]
    fn cross_entropy_of_uniform_targets_against_uniform_student_is_log_k() {
        let l = loss(8);
        let s = Tensor::zeros([3, 8], (Kind::Float, Device::Cpu));
        let t = Tensor::full([3, 8], 1.0 / 8.0, (Kind::Float, Device::Cpu));
        let v = scalar(&l.forward(&[s], &[t]).unwrap());
        assert!((v - 8f64.ln()).abs() < 1e-6, "{v}");
    }

    #[test]
    fn forward_sums_over_all_student_target_pairs() {
        let l = loss(4);
        let s = Tensor::randn([2, 4], (Kind::Float, Device::Cpu));
        let t = Tensor::randn([2, 4], (Kind::Float, Device::Cpu)).softmax(-1, None::<Kind>);
        let one = scalar(&l.forward(&[s.copy()], &[t.copy()]).unwrap());
        let four = scalar(&l.forward(&[s.copy(), s], &[t.copy(), t]).unwrap());
        assert!((four - 4.0 * one).abs() < 1e-5);
    }

    #[test]
    fn crop_losses_use_the_official_divisors() {
        let l = loss(6);
        let opts = (Kind::Float, Device::Cpu);
        let b = 3;
        let targets = Tensor::randn([2 * b, 6], opts).softmax(-1, None::<Kind>);
        let global = Tensor::randn([2 * b, 6], opts);
        let local = Tensor::randn([4 * b, 6], opts);
        let out = l.crop_losses(&global, Some(&local), 4, &targets).unwrap();
        // 2 global terms + 4·2 local terms.
        let raw_local = scalar(out.raw_local.as_ref().unwrap());
        assert!((scalar(out.local.as_ref().unwrap()) - raw_local / 10.0).abs() < 1e-6);
        assert!((scalar(&out.global) - scalar(&out.raw_global) * 2.0 / 10.0).abs() < 1e-6);
        // Without local crops the local divisor is max(0, 1) = 1.
        let out = l.crop_losses(&global, None, 0, &targets).unwrap();
        assert!(out.local.is_none());
        assert!((scalar(&out.global) - scalar(&out.raw_global) * 2.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn crop_losses_reject_mismatched_local_rows() {
        let l = loss(6);
        let opts = (Kind::Float, Device::Cpu);
        let targets = Tensor::zeros([4, 6], opts);
        let local = Tensor::zeros([5, 6], opts);
        let err = l
            .crop_losses(&Tensor::zeros([4, 6], opts), Some(&local), 2, &targets)
            .unwrap_err();
        assert!(err.to_string().contains("student local logits"), "{err}");
        assert!(l.crop_losses(&targets, None, 2, &targets).is_err());
    }

    #[test]
    fn sinkhorn_targets_leave_the_center_alone() {
        let mut l = loss(4);
        let t = Tensor::randn([4, 4], (Kind::Float, Device::Cpu));
        let _ = l
            .teacher_targets(CenteringMode::SinkhornKnopp, &t, 0.04, &Single)
            .unwrap();
        assert!(!l.center().has_pending());
        let _ = l
            .teacher_targets(CenteringMode::Centering, &t, 0.04, &Single)
            .unwrap();
        assert!(l.center().has_pending());
    }

    #[test]
    fn the_sinkhorn_iteration_count_sets_how_far_the_targets_are_balanced() {
        let t = Tensor::randn([8, 6], (Kind::Float, Device::Cpu));
        let targets = |n: usize| {
            let mut l = DinoLoss::new(
                &DinoLossConfig {
                    out_dim: 6,
                    sinkhorn_iterations: n,
                    ..Default::default()
                },
                Device::Cpu,
            )
            .unwrap();
            l.teacher_targets(CenteringMode::SinkhornKnopp, &t, 0.5, &Single)
                .unwrap()
        };
        // More iterations balance the prototype marginals better (each column sums to B/K).
        let imbalance = |q: &Tensor| {
            let cols = q.sum_dim_intlist(&[0i64][..], false, None::<Kind>);
            (cols - 8.0 / 6.0).abs().max().double_value(&[])
        };
        let (one, three, ten) = (targets(1), targets(3), targets(10));
        assert!(!one.allclose(&three, 1e-6, 1e-6, false));
        assert!(
            imbalance(&ten) < imbalance(&one),
            "{} vs {}",
            imbalance(&ten),
            imbalance(&one)
        );
    }

    #[test]
    fn wrong_prototype_count_is_a_shape_error() {
        let mut l = loss(4);
        let t = Tensor::zeros([2, 5], (Kind::Float, Device::Cpu));
        assert!(matches!(
            l.softmax_center_teacher(&t, 0.04),
            Err(LossError::Shape { .. })
        ));
    }
}
