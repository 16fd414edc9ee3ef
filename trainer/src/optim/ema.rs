//! Teacher update: exponential moving average of the student weights.

use tch::Tensor;

use super::adamw::OptimError;

/// `teacher = m · teacher + (1 − m) · student` for every pair, in place and without autograd
/// (reference `SSLMetaArch.update_teacher`). The lists pair up by position and must have the
/// same shapes.
///
/// PyTorch's `add_(x, alpha)` uses a fused multiply-add where tch only offers a separate
/// multiply, so results can differ from the reference in the last float32 bit.
pub fn ema_update(teacher: &[Tensor], student: &[Tensor], momentum: f64) -> Result<(), OptimError> {
    if !(0.0..=1.0).contains(&momentum) {
        return Err(OptimError::InvalidSetting {
            field: "teacher.momentumTeacher",
            message: format!("must be in [0, 1], got {momentum}"),
        });
    }
    if teacher.len() != student.len() {
        return Err(OptimError::GradCount {
            expected: teacher.len(),
            got: student.len(),
        });
    }
    for (i, (t, s)) in teacher.iter().zip(student).enumerate() {
        if t.size() != s.size() {
            return Err(OptimError::BadState {
                name: format!("teacher parameter #{i}"),
                message: format!(
                    "shape {:?} differs from the student's {:?}",
                    t.size(),
                    s.size()
                ),
            });
        }
    }
    tch::no_grad(|| {
        for (t, s) in teacher.iter().zip(student) {
            let mut t = t.shallow_clone();
            let _ = t.g_mul_scalar_(momentum);
            let _ = t.g_add_(&(s.to_kind(t.kind()) * (1.0 - momentum)));
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn teacher_moves_a_fraction_one_minus_m_toward_the_student() {
        let teacher = [Tensor::from_slice(&[0.0f32, 10.0])];
        let student = [Tensor::from_slice(&[1.0f32, 0.0])];
        ema_update(&teacher, &student, 0.9).unwrap();
        let v = Vec::<f32>::try_from(&teacher[0]).unwrap();
        assert!(
            (v[0] - 0.1).abs() < 1e-6 && (v[1] - 9.0).abs() < 1e-6,
            "{v:?}"
        );
    }

    #[test]
    fn momentum_one_freezes_the_teacher_and_zero_copies_the_student() {
        let teacher = [Tensor::from_slice(&[3.0f32])];
        let student = [Tensor::from_slice(&[5.0f32])];
        ema_update(&teacher, &student, 1.0).unwrap();
        assert_eq!(teacher[0].double_value(&[0]), 3.0);
        ema_update(&teacher, &student, 0.0).unwrap();
        assert_eq!(teacher[0].double_value(&[0]), 5.0);
    }

    #[test]
    fn mismatched_lists_and_bad_momentum_are_errors() {
        let a = [Tensor::from_slice(&[1.0f32])];
        let b = [Tensor::from_slice(&[1.0f32, 2.0])];
        assert!(ema_update(&a, &b, 0.9).is_err());
        assert!(ema_update(&a, &[], 0.9).is_err());
        assert!(ema_update(&a, &a, 1.5).is_err());
    }
}
