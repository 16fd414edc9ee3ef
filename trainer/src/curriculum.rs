//! The resolution curriculum (`training.curriculum`): which crop sizes, local-crop count and
//! batch size each iteration trains with, as a list of phases.
//!
//! A phase is the training config with its overrides applied ([`Phase::training`]), so the
//! loader, the mask grid, the FLOP count and the learning-rate scaling of a phase come from the
//! same mapping functions as a run without a curriculum. Iterations before the first listed
//! phase form the phase `base` (the config as it is).
//!
//! The learning rate: the reference computes `optim.lr` once from the global batch
//! (`apply_scaling_rules_to_cfg`: `base_lr · sqrt(batch_per_gpu · world / 1024)`) and has no
//! curriculum; its high-resolution adaptation is a run restarted from a checkpoint with the new
//! crop size and batch, which applies the same rule to the new batch. A phase here does what
//! that restart does: its schedules are the run's schedules built with the peak lr the scaling
//! rule gives for the phase's batch (same warm-up, cosine and iteration count), so a phase
//! with a quarter of the batch runs at half the learning rate under the sqrt rule. An explicit
//! `optim.lr` (> 0) or `scalingRule: none` keeps one learning rate for every phase.

use std::sync::Arc;

use dinoflow_api::TrainingConfig;

use crate::config::MappingError;
use crate::optim;
use crate::train_loop::{ScheduleValues, Schedules};

/// Name of the iterations before the first listed phase.
pub const BASE_PHASE: &str = "base";

/// One stretch of iterations with fixed crops and batch size.
#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    pub name: String,
    /// First iteration of the phase.
    pub start: u64,
    /// The training config in effect during the phase (`crops.*` and
    /// `train.batchSizePerGpu` overridden).
    pub training: TrainingConfig,
}

impl Phase {
    pub fn global_crops_size(&self) -> u32 {
        self.training.crops.global_crops_size
    }

    pub fn local_crops_size(&self) -> u32 {
        self.training.crops.local_crops_size
    }

    pub fn local_crops_number(&self) -> u32 {
        self.training.crops.local_crops_number
    }

    pub fn batch_size_per_gpu(&self) -> u32 {
        self.training.train.batch_size_per_gpu
    }

    /// What metrics.jsonl and checkpoints record about the phase.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "start_iteration": self.start,
            "global_crops_size": self.global_crops_size(),
            "local_crops_size": self.local_crops_size(),
            "local_crops_number": self.local_crops_number(),
            "batch_size_per_gpu": self.batch_size_per_gpu(),
        })
    }
}

/// The phases of a run, in order; the first starts at iteration 0.
#[derive(Debug, Clone, PartialEq)]
pub struct Curriculum {
    phases: Vec<Phase>,
    /// Whether `training.curriculum` lists phases (only then is a phase name reported).
    configured: bool,
}

impl Curriculum {
    /// The phases of `training.curriculum`. The API server's CEL rules already refuse an
    /// unordered list or a phase without exactly one start; they are checked again here for
    /// configs that reach the trainer without it.
    pub fn from_config(t: &TrainingConfig) -> Result<Self, MappingError> {
        let listed = &t.curriculum.phases;
        let err = |message: String| MappingError {
            field: "curriculum.phases",
            message,
        };
        let mut phases = Vec::with_capacity(listed.len() + 1);
        let mut previous: Option<u64> = None;
        for (i, p) in listed.iter().enumerate() {
            let start = p.start(t.train.official_epoch_length).ok_or_else(|| {
                err(format!(
                    "phase {i} needs exactly one of startIteration or startEpoch"
                ))
            })?;
            if previous.is_some_and(|prev| start <= prev) {
                return Err(err(format!(
                    "phase {i} starts at iteration {start}, not after the phase before it; \
                     sort the phases by start"
                )));
            }
            previous = Some(start);
            let mut training = t.clone();
            training.curriculum.phases.clear();
            let c = &mut training.crops;
            c.global_crops_size = p.global_crops_size.unwrap_or(c.global_crops_size);
            c.local_crops_size = p.local_crops_size.unwrap_or(c.local_crops_size);
            c.local_crops_number = p.local_crops_number.unwrap_or(c.local_crops_number);
            let b = &mut training.train.batch_size_per_gpu;
            *b = p.batch_size_per_gpu.unwrap_or(*b);
            if *b == 0 {
                return Err(err(format!("phase {i}: batchSizePerGpu must be >= 1")));
            }
            let patch = t.model.patch_size.max(1);
            for (size, what) in [
                (training.crops.global_crops_size, "globalCropsSize"),
                (training.crops.local_crops_size, "localCropsSize"),
            ] {
                if size % patch != 0 {
                    return Err(err(format!(
                        "phase {i}: {what} {size} is not a multiple of model.patchSize {patch}"
                    )));
                }
            }
            phases.push(Phase {
                name: p.display_name(i),
                start,
                training,
            });
        }
        if phases.first().is_none_or(|p| p.start > 0) {
            phases.insert(
                0,
                Phase {
                    name: BASE_PHASE.into(),
                    start: 0,
                    training: TrainingConfig {
                        curriculum: Default::default(),
                        ..t.clone()
                    },
                },
            );
        }
        Ok(Self {
            phases,
            configured: !listed.is_empty(),
        })
    }

    pub fn phases(&self) -> &[Phase] {
        &self.phases
    }

    /// Whether the config lists phases (a run without one reports no phase).
    pub fn is_configured(&self) -> bool {
        self.configured
    }

    /// Index of the phase that iteration `iteration` (0-based) trains in.
    pub fn index_at(&self, iteration: u64) -> usize {
        self.phases
            .iter()
            .rposition(|p| p.start <= iteration)
            .unwrap_or(0)
    }

    /// The phase that iteration `iteration` (0-based) trains in.
    pub fn at(&self, iteration: u64) -> &Phase {
        &self.phases[self.index_at(iteration)]
    }

    /// First iteration after phase `index` (None for the last phase).
    pub fn end_of(&self, index: usize) -> Option<u64> {
        self.phases.get(index + 1).map(|p| p.start)
    }

    /// Global samples (all ranks) the iterations before `iteration` consume on `world_size`
    /// ranks: where the data order stands at `iteration` in a run that kept its world size.
    pub fn samples_before(&self, iteration: u64, world_size: usize) -> u64 {
        self.phases
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let end = self.end_of(i).unwrap_or(u64::MAX).min(iteration);
                end.saturating_sub(p.start) * u64::from(p.batch_size_per_gpu()) * world_size as u64
            })
            .sum()
    }
}

/// The run's schedules, each phase with the peak learning rate of its batch (see the module
/// doc); phases with the same peak share one set.
#[derive(Debug, Clone)]
pub struct PhasedSchedules {
    /// (first iteration, schedules), in order.
    phases: Vec<(u64, Arc<optim::Schedules>)>,
}

impl PhasedSchedules {
    pub fn new(curriculum: &Curriculum, world_size: usize) -> Result<Self, optim::ScheduleError> {
        let mut built: Vec<(f64, Arc<optim::Schedules>)> = Vec::new();
        let mut phases = Vec::new();
        for p in curriculum.phases() {
            let cfg = crate::config::schedules_config(&p.training, world_size);
            let shared = match built.iter().find(|(lr, _)| *lr == cfg.lr) {
                Some((_, s)) => Arc::clone(s),
                None => {
                    let s = Arc::new(optim::Schedules::new(&cfg)?);
                    built.push((cfg.lr, Arc::clone(&s)));
                    s
                }
            };
            phases.push((p.start, shared));
        }
        Ok(Self { phases })
    }

    /// The peak learning rate of the phase that `iteration` trains in.
    pub fn schedules_at(&self, iteration: u64) -> &optim::Schedules {
        let i = self
            .phases
            .iter()
            .rposition(|(start, _)| *start <= iteration)
            .unwrap_or(0);
        &self.phases[i].1
    }
}

impl Schedules for PhasedSchedules {
    fn at(&self, iteration: u64) -> ScheduleValues {
        self.schedules_at(iteration).at(iteration as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dinoflow_api::training::CurriculumPhase;

    fn two_phase() -> TrainingConfig {
        let mut t = TrainingConfig::default();
        t.train.official_epoch_length = 10;
        t.optim.epochs = 4;
        t.optim.warmup_epochs = 1;
        t.model.patch_size = 14;
        t.crops.global_crops_size = 224;
        t.crops.local_crops_size = 98;
        t.train.batch_size_per_gpu = 32;
        t.curriculum.phases.push(CurriculumPhase {
            name: Some("high-res".into()),
            start_iteration: Some(30),
            global_crops_size: Some(518),
            batch_size_per_gpu: Some(8),
            ..Default::default()
        });
        t
    }

    #[test]
    fn iterations_before_the_first_phase_are_the_base_phase() {
        let c = Curriculum::from_config(&two_phase()).unwrap();
        assert!(c.is_configured());
        let names: Vec<_> = c.phases().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["base", "high-res"]);
        assert_eq!(c.at(29).global_crops_size(), 224);
        assert_eq!(c.at(30).global_crops_size(), 518);
        // Left-out fields keep the config's values.
        assert_eq!(c.at(30).local_crops_size(), 98);
        assert_eq!(c.at(30).batch_size_per_gpu(), 8);
        assert_eq!(c.end_of(0), Some(30));
        // 30 iterations of 32 per rank on 4 ranks, then 5 of 8.
        assert_eq!(c.samples_before(35, 4), 30 * 32 * 4 + 5 * 8 * 4);
    }

    #[test]
    fn a_run_without_phases_is_one_unreported_base_phase() {
        let c = Curriculum::from_config(&TrainingConfig::default()).unwrap();
        assert!(!c.is_configured());
        assert_eq!(c.phases().len(), 1);
        assert_eq!(c.samples_before(7, 2), 7 * 64 * 2);
    }

    #[test]
    fn epochs_convert_and_a_phase_at_zero_replaces_the_base_phase() {
        let mut t = two_phase();
        t.curriculum.phases = vec![
            CurriculumPhase {
                start_epoch: Some(0),
                global_crops_size: Some(112),
                ..Default::default()
            },
            CurriculumPhase {
                start_epoch: Some(2),
                ..Default::default()
            },
        ];
        let c = Curriculum::from_config(&t).unwrap();
        let starts: Vec<_> = c
            .phases()
            .iter()
            .map(|p| (p.name.as_str(), p.start))
            .collect();
        assert_eq!(starts, [("phase-1", 0), ("phase-2", 20)]);
        assert_eq!(c.at(0).global_crops_size(), 112);
    }

    #[test]
    fn bad_phases_are_refused_naming_the_field() {
        for (phase, expect) in [
            (
                CurriculumPhase {
                    global_crops_size: Some(100),
                    start_iteration: Some(5),
                    ..Default::default()
                },
                "not a multiple of model.patchSize 14",
            ),
            (CurriculumPhase::default(), "exactly one of startIteration"),
        ] {
            let mut t = two_phase();
            t.curriculum.phases.insert(0, phase);
            let err = Curriculum::from_config(&t).unwrap_err();
            assert!(
                err.to_string().starts_with("training.curriculum.phases")
                    && err.to_string().contains(expect),
                "{err}"
            );
        }
        let mut t = two_phase();
        t.curriculum.phases.push(CurriculumPhase {
            start_iteration: Some(30),
            ..Default::default()
        });
        let err = Curriculum::from_config(&t).unwrap_err();
        assert!(err.to_string().contains("sort the phases"), "{err}");
    }

    #[test]
    fn the_examples_switch_resolution_where_their_comments_say() {
        let load = |name: &str| {
            let path = format!(
                "{}/../manifests/examples/{name}.yaml",
                env!("CARGO_MANIFEST_DIR")
            );
            let t = dinoflow_api::load_training_config(&path).unwrap().training;
            Curriculum::from_config(&t).unwrap()
        };
        let tiny = load("tiny-cpu-fashion-mnist-curriculum");
        let p: Vec<_> = tiny
            .phases()
            .iter()
            .map(|p| {
                (
                    p.name.as_str(),
                    p.start,
                    p.global_crops_size(),
                    p.batch_size_per_gpu(),
                )
            })
            .collect();
        assert_eq!(p, [("base", 0, 28, 64), ("high-res", 250, 42, 32)]);
        let vitl = load("vitl14-12x8");
        let p: Vec<_> = vitl
            .phases()
            .iter()
            .map(|p| {
                (
                    p.name.as_str(),
                    p.start,
                    p.global_crops_size(),
                    p.batch_size_per_gpu(),
                )
            })
            .collect();
        assert_eq!(p, [("base", 0, 224, 32), ("high-res-518", 612_500, 518, 8)]);
        assert_eq!(vitl.phases()[0].training.total_iterations(), 625_000);
    }

    #[test]
    fn a_phase_with_a_quarter_of_the_batch_runs_at_half_the_sqrt_scaled_lr() {
        let t = two_phase();
        let c = Curriculum::from_config(&t).unwrap();
        let s = PhasedSchedules::new(&c, 4).unwrap();
        let base = optim::Schedules::new(&crate::config::schedules_config(&t, 4)).unwrap();
        // The base phase is the run without a curriculum, bit for bit.
        for it in 0..30 {
            assert_eq!(s.at(it), base.at(it as usize));
        }
        let mut quarter = t.clone();
        quarter.train.batch_size_per_gpu = 8;
        let high = optim::Schedules::new(&crate::config::schedules_config(&quarter, 4)).unwrap();
        assert_eq!(s.at(33), high.at(33));
        // Peak lrs: 0.004·sqrt(128/1024) and 0.004·sqrt(32/1024), a factor 2.
        let ratio = crate::config::peak_lr(&t, 4) / crate::config::peak_lr(&quarter, 4);
        assert!((ratio - 2.0).abs() < 1e-12, "{ratio}");
        // wd, momentum and teacher temperature do not depend on the batch.
        let (a, b) = (s.at(33), base.at(33));
        assert_eq!(
            (a.wd, a.momentum, a.teacher_temp),
            (b.wd, b.momentum, b.teacher_temp)
        );
        assert!(a.lr < b.lr);
        // An explicit optim.lr is kept in every phase.
        let mut fixed = t.clone();
        fixed.optim.lr = 1e-3;
        let s = PhasedSchedules::new(&Curriculum::from_config(&fixed).unwrap(), 4).unwrap();
        assert_eq!(s.schedules_at(0).lr.at(20), s.schedules_at(35).lr.at(20));
    }
}
