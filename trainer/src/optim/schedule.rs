//! Per-iteration schedules (reference `CosineScheduler` and `build_schedulers`).
//!
//! A schedule is a precomputed array indexed by iteration: an optional frozen segment of
//! zeros, a linear warmup `linspace(start, base, warmup)` (numpy semantics: the last warmup
//! value is exactly `base`), then a half cosine from `base` to `final` over the remaining
//! iterations. At or after `total_iters` the final value is returned. Arithmetic follows numpy
//! operation by operation so the values are bit-identical to the reference.

use std::f64::consts::PI;

/// Invalid schedule settings.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ScheduleError {
    /// Warmup plus frozen iterations exceed the schedule length.
    #[error(
        "{field}: warmup ({warmup}) + freeze ({freeze}) iterations exceed the {total} total iterations; shorten the warmup or train longer"
    )]
    WarmupTooLong {
        field: &'static str,
        warmup: usize,
        freeze: usize,
        total: usize,
    },
    /// A value that must be finite is not.
    #[error("{field}: must be a finite number, got {value}")]
    NotFinite { field: &'static str, value: f64 },
    /// An epoch length of zero.
    #[error("train.officialEpochLength: must be > 0")]
    ZeroEpochLength,
}

/// One schedule: precomputed values plus the value returned past its end.
#[derive(Debug, Clone, PartialEq)]
pub struct CosineSchedule {
    values: Vec<f64>,
    final_value: f64,
}

impl CosineSchedule {
    /// Reference `CosineScheduler(base, final, total_iters, warmup_iters, start_warmup_value,
    /// freeze_iters)`.
    pub fn new(
        field: &'static str,
        base_value: f64,
        final_value: f64,
        total_iters: usize,
        warmup_iters: usize,
        start_warmup_value: f64,
        freeze_iters: usize,
    ) -> Result<Self, ScheduleError> {
        for v in [base_value, final_value, start_warmup_value] {
            if !v.is_finite() {
                return Err(ScheduleError::NotFinite { field, value: v });
            }
        }
        if warmup_iters + freeze_iters > total_iters {
            return Err(ScheduleError::WarmupTooLong {
                field,
                warmup: warmup_iters,
                freeze: freeze_iters,
                total: total_iters,
            });
        }
        let mut values = Vec::with_capacity(total_iters);
        values.extend(std::iter::repeat_n(0.0, freeze_iters));
        values.extend(np_linspace(start_warmup_value, base_value, warmup_iters));
        let n = total_iters - warmup_iters - freeze_iters;
        // numpy: final + 0.5 * (base - final) * (1 + cos(pi * i / n)), left to right.
        let half_range = 0.5 * (base_value - final_value);
        values.extend(
            (0..n).map(|i| final_value + half_range * (1.0 + (PI * i as f64 / n as f64).cos())),
        );
        debug_assert_eq!(values.len(), total_iters);
        Ok(Self {
            values,
            final_value,
        })
    }

    /// Value at iteration `it` (the final value at or past the end).
    pub fn at(&self, it: usize) -> f64 {
        self.values.get(it).copied().unwrap_or(self.final_value)
    }

    /// Number of precomputed iterations (`total_iters`).
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether the schedule has no precomputed iterations (a constant `final_value`).
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Sets the first `iters` values to zero, as `build_schedulers` does for the last-layer
    /// learning rate (`schedule[:freeze_last_layer_epochs * epoch_len] = 0`): unlike the
    /// `freeze_iters` argument this does not shift the rest of the schedule.
    pub fn zero_prefix(&mut self, iters: usize) {
        let n = iters.min(self.values.len());
        self.values[..n].iter_mut().for_each(|v| *v = 0.0);
    }
}

/// numpy `linspace(start, stop, num)` with `endpoint=True`, bit-exact for float64.
fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    if num == 1 {
        return vec![start];
    }
    let div = (num - 1) as f64;
    let delta = stop - start;
    let step = delta / div;
    let mut y: Vec<f64> = if step == 0.0 {
        (0..num).map(|i| i as f64 / div * delta + start).collect()
    } else {
        (0..num).map(|i| i as f64 * step + start).collect()
    };
    y[num - 1] = stop;
    y
}

/// Inputs of the five training schedules (official config keys in the comments).
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulesConfig {
    /// `optim.lr` after the scaling rule (see [`crate::optim::scaled_lr`]).
    pub lr: f64,
    /// `optim.min_lr` (1e-6).
    pub min_lr: f64,
    /// `optim.epochs` (100).
    pub epochs: usize,
    /// `optim.warmup_epochs` (10).
    pub warmup_epochs: usize,
    /// `optim.weight_decay` (0.04).
    pub weight_decay: f64,
    /// `optim.weight_decay_end` (0.4).
    pub weight_decay_end: f64,
    /// `teacher.momentum_teacher` (0.992).
    pub momentum_teacher: f64,
    /// `teacher.final_momentum_teacher` (1.0).
    pub final_momentum_teacher: f64,
    /// `teacher.warmup_teacher_temp` (0.04).
    pub warmup_teacher_temp: f64,
    /// `teacher.teacher_temp` (0.07).
    pub teacher_temp: f64,
    /// `teacher.warmup_teacher_temp_epochs` (30).
    pub warmup_teacher_temp_epochs: usize,
    /// `optim.freeze_last_layer_epochs` (1).
    pub freeze_last_layer_epochs: usize,
    /// `train.OFFICIAL_EPOCH_LENGTH` (1250).
    pub epoch_length: usize,
}

impl SchedulesConfig {
    /// The official defaults (`ssl_default_config.yaml`) for an already scaled `lr`.
    pub fn official_defaults(lr: f64) -> Self {
        Self {
            lr,
            min_lr: 1.0e-6,
            epochs: 100,
            warmup_epochs: 10,
            weight_decay: 0.04,
            weight_decay_end: 0.4,
            momentum_teacher: 0.992,
            final_momentum_teacher: 1.0,
            warmup_teacher_temp: 0.04,
            teacher_temp: 0.07,
            warmup_teacher_temp_epochs: 30,
            freeze_last_layer_epochs: 1,
            epoch_length: 1250,
        }
    }
}

/// The values of all five schedules at one iteration: what the training loop hands the step
/// and logs (`metrics.jsonl` uses the same names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScheduleValues {
    /// Learning rate before per-parameter multipliers.
    pub lr: f64,
    /// Weight decay before per-parameter multipliers.
    pub wd: f64,
    /// Teacher EMA momentum.
    pub momentum: f64,
    /// Teacher softmax temperature.
    pub teacher_temp: f64,
    /// Learning rate of the prototype (`last_layer`) parameters.
    pub last_layer_lr: f64,
}

/// The five schedules of the reference `build_schedulers`.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedules {
    /// lr: warmup from 0, cosine to `min_lr`.
    pub lr: CosineSchedule,
    /// Weight decay: cosine from `weight_decay` to `weight_decay_end`, no warmup.
    pub wd: CosineSchedule,
    /// Teacher momentum: cosine to `final_momentum_teacher`.
    pub momentum: CosineSchedule,
    /// Teacher temperature: linear warmup, then constant.
    pub teacher_temp: CosineSchedule,
    /// lr schedule with its first `freeze_last_layer_epochs` epochs set to zero.
    pub last_layer_lr: CosineSchedule,
}

impl Schedules {
    /// Builds the schedules exactly as the reference `build_schedulers`.
    pub fn new(cfg: &SchedulesConfig) -> Result<Self, ScheduleError> {
        let e = cfg.epoch_length;
        if e == 0 {
            return Err(ScheduleError::ZeroEpochLength);
        }
        let total = cfg.epochs * e;
        let lr = CosineSchedule::new(
            "optim.warmupEpochs",
            cfg.lr,
            cfg.min_lr,
            total,
            cfg.warmup_epochs * e,
            0.0,
            0,
        )?;
        let wd = CosineSchedule::new(
            "optim.weightDecay",
            cfg.weight_decay,
            cfg.weight_decay_end,
            total,
            0,
            0.0,
            0,
        )?;
        let momentum = CosineSchedule::new(
            "teacher.momentumTeacher",
            cfg.momentum_teacher,
            cfg.final_momentum_teacher,
            total,
            0,
            0.0,
            0,
        )?;
        let temp_iters = cfg.warmup_teacher_temp_epochs * e;
        let teacher_temp = CosineSchedule::new(
            "teacher.warmupTeacherTempEpochs",
            cfg.teacher_temp,
            cfg.teacher_temp,
            temp_iters,
            temp_iters,
            cfg.warmup_teacher_temp,
            0,
        )?;
        let mut last_layer_lr = lr.clone();
        last_layer_lr.zero_prefix(cfg.freeze_last_layer_epochs * e);
        Ok(Self {
            lr,
            wd,
            momentum,
            teacher_temp,
            last_layer_lr,
        })
    }

    /// All five values at iteration `it`.
    pub fn at(&self, it: usize) -> ScheduleValues {
        ScheduleValues {
            lr: self.lr.at(it),
            wd: self.wd.at(it),
            momentum: self.momentum.at(it),
            teacher_temp: self.teacher_temp.at(it),
            last_layer_lr: self.last_layer_lr.at(it),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_hits_both_ends_exactly() {
        let v = np_linspace(0.04, 0.07, 7);
        assert_eq!(v[0], 0.04);
        assert_eq!(v[6], 0.07);
        assert_eq!(np_linspace(1.0, 2.0, 1), vec![1.0]);
        assert!(np_linspace(1.0, 2.0, 0).is_empty());
        assert_eq!(np_linspace(3.0, 3.0, 3), vec![3.0, 3.0, 3.0]);
    }

    #[test]
    fn warmup_then_cosine_reaches_base_and_decays_to_final() {
        let s = CosineSchedule::new("t", 1.0, 0.1, 20, 5, 0.0, 0).unwrap();
        assert_eq!(s.at(0), 0.0);
        assert_eq!(s.at(4), 1.0);
        assert_eq!(s.at(5), 1.0, "cosine starts at base");
        assert!(s.at(12) < 1.0 && s.at(12) > 0.1);
        assert!(s.at(19) > 0.1);
        assert_eq!(s.at(20), 0.1);
        assert_eq!(s.at(1_000_000), 0.1);
    }

    #[test]
    fn freeze_iters_shift_while_zero_prefix_overwrites() {
        let shifted = CosineSchedule::new("t", 1.0, 0.0, 10, 2, 0.5, 3).unwrap();
        assert_eq!(&shifted.values[..5], &[0.0, 0.0, 0.0, 0.5, 1.0]);
        let mut zeroed = CosineSchedule::new("t", 1.0, 0.0, 10, 2, 0.5, 0).unwrap();
        let before = zeroed.at(3);
        zeroed.zero_prefix(3);
        assert_eq!(zeroed.at(2), 0.0);
        assert_eq!(zeroed.at(3), before);
    }

    #[test]
    fn warmup_longer_than_training_is_an_error_naming_the_field() {
        let err = CosineSchedule::new("optim.warmupEpochs", 1.0, 0.0, 10, 11, 0.0, 0).unwrap_err();
        assert!(err.to_string().starts_with("optim.warmupEpochs"), "{err}");
        let mut cfg = SchedulesConfig::official_defaults(1e-3);
        cfg.warmup_epochs = 200;
        assert!(Schedules::new(&cfg).is_err());
        cfg.warmup_epochs = 10;
        cfg.epoch_length = 0;
        assert_eq!(Schedules::new(&cfg), Err(ScheduleError::ZeroEpochLength));
    }

    #[test]
    fn official_defaults_freeze_the_last_layer_for_one_epoch() {
        let s = Schedules::new(&SchedulesConfig::official_defaults(1e-3)).unwrap();
        assert_eq!(s.at(1249).last_layer_lr, 0.0);
        assert_eq!(s.at(1250).last_layer_lr, s.at(1250).lr);
        assert_eq!(s.at(0).teacher_temp, 0.04);
        assert_eq!(s.at(30 * 1250).teacher_temp, 0.07);
        assert_eq!(s.at(0).momentum, 0.992);
        assert_eq!(s.at(100 * 1250).momentum, 1.0);
    }
}
