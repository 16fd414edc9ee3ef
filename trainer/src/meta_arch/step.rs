//! One training iteration: forward, losses, backward, gradient averaging, clipping, optimizer
//! and the EMA, in the official order. Nothing is read to the host on the way (fp16 excepted:
//! one flag decides whether the update is applied); the losses and clipping statistics stay on
//! the device in the [`StepOutcome`] until the caller reads them.

use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use super::{MetaArch, MetaArchError, SUBMODULES, SslBatch, StepLosses, TargetSource};
use crate::dist::Collective;
use crate::loss::koleo_per_crop_sum;
use crate::meta_arch::LossValues;
use crate::optim::{ClipStats, ClipTensors, ScheduleValues, clip_grad_norm_on_device, ema_update};
use crate::precision::StepDecision;

/// Result of [`MetaArch::train_step`], still on the device.
#[derive(Debug)]
pub struct StepOutcome {
    pub losses: StepLosses,
    /// Gradient norm before clipping and clip coefficient, per student sub-module.
    pub clip: Vec<(String, ClipTensors)>,
    /// False when fp16 loss scaling found a non-finite gradient and skipped the update.
    pub applied: bool,
}

/// Host wall time of the parts of one step, for `dinoflow_trainer_step_phase_seconds_total`.
/// Measured on the CPU only, where every tensor op has finished when it returns. On a GPU the
/// host only queues kernels, so these times would be queueing times, and making them true
/// would need a device sync per phase: there the step is not split (its total, up to the
/// loss read, is still measured by the loop).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepPhases {
    /// Teacher targets (centering included), student forward and the losses.
    pub forward: Duration,
    pub backward: Duration,
    /// Gradient all-reduce over the ranks (zero in a one-process run).
    pub communication: Duration,
    /// Unscaling, clipping, AdamW and the EMA update.
    pub optimizer: Duration,
}

/// Laps of [`StepPhases`]; does nothing when off (on a GPU).
struct PhaseClock {
    at: Option<Instant>,
}

impl PhaseClock {
    fn start(device: Device) -> Self {
        Self {
            at: (device == Device::Cpu).then(Instant::now),
        }
    }

    /// Time since the previous lap.
    fn lap(&mut self) -> Duration {
        let Some(at) = self.at else {
            return Duration::ZERO;
        };
        let now = Instant::now();
        self.at = Some(now);
        now - at
    }
}

/// A [`StepOutcome`] read to the host.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub losses: LossValues,
    pub clip: Vec<(String, ClipStats)>,
    pub applied: bool,
}

impl StepOutcome {
    /// Reads losses (averaged over the ranks) and clipping statistics to the host.
    pub fn read(&self, collective: &dyn Collective) -> StepReport {
        StepReport {
            losses: self.losses.read(collective),
            clip: self
                .clip
                .iter()
                .map(|(name, c)| (name.clone(), c.read()))
                .collect(),
            applied: self.applied,
        }
    }
}

impl MetaArch {
    /// One training iteration in the official order: schedules, zero_grad, forward/backward,
    /// gradient averaging over the ranks, (fp16: unscale), per-sub-module gradient clipping,
    /// AdamW, then the EMA network follows the student as `targets` says. This is the only
    /// place the EMA happens.
    ///
    /// A non-finite loss is not checked here (that would read it to the host): it reaches the
    /// update like any other, and the caller that reads the losses stops the run on it.
    pub fn train_step(
        &mut self,
        batch: &SslBatch,
        values: &ScheduleValues,
        collective: &dyn Collective,
        targets: TargetSource<'_>,
    ) -> Result<StepOutcome, MetaArchError> {
        self.prepare_parallel(collective.rank(), collective.world_size())?;
        let mut clock = PhaseClock::start(self.student.vs.device());
        let mut phases = StepPhases::default();
        if let Some(sharded) = &mut self.sharded {
            sharded.apply_schedule(values.lr, values.wd, values.last_layer_lr);
        } else {
            self.optimizer
                .apply_schedule(values.lr, values.wd, values.last_layer_lr);
            self.optimizer.zero_grad();
        }
        let (losses, to_backprop) =
            self.forward_losses(batch, values.teacher_temp, collective, targets)?;
        phases.forward = clock.lap();
        if let Some(sharded) = &mut self.sharded {
            // Sharded: reduction, clipping and the update per flat unit (crate::parallel);
            // backward, communication and optimizer interleave there, so they are timed as
            // one phase (counted as backward).
            let (clip, applied) = sharded.backward_and_step(
                &to_backprop,
                collective,
                self.loss_scaler.as_mut(),
                self.config.clip_grad,
            )?;
            phases.backward = clock.lap();
            if let Some(momentum) = targets.ema_momentum(values.momentum) {
                self.update_ema(momentum)?;
            }
            phases.optimizer = clock.lap();
            self.last_step_phases = clock.at.is_some().then_some(phases);
            return Ok(StepOutcome {
                losses,
                clip,
                applied,
            });
        }
        to_backprop.backward();
        phases.backward = clock.lap();
        if collective.world_size() > 1 {
            // Data parallelism: average before unscaling and clipping, as DDP/FSDP do, so
            // every rank applies the same update; each sub-module in its reduce dtype.
            let by_module: Vec<(Kind, Vec<Tensor>)> = SUBMODULES
                .iter()
                .map(|m| {
                    (
                        self.config.parallel.module(m).reduce_kind,
                        self.submodule_grads(m),
                    )
                })
                .collect();
            crate::parallel::average_gradients_by_kind(collective, by_module);
        }
        phases.communication = clock.lap();

        let mut found_non_finite = false;
        if let Some(scaler) = &self.loss_scaler {
            let mut all: Vec<Tensor> = SUBMODULES
                .iter()
                .flat_map(|m| self.submodule_grads(m))
                .collect();
            found_non_finite = scaler.unscale(&mut all);
        }
        let mut clip = Vec::new();
        if self.config.clip_grad > 0.0 {
            for name in SUBMODULES {
                let mut grads = self.submodule_grads(name);
                if !grads.is_empty() {
                    clip.push((
                        name.to_string(),
                        clip_grad_norm_on_device(&mut grads, self.config.clip_grad),
                    ));
                }
            }
        }
        let applied = match &mut self.loss_scaler {
            Some(scaler) => scaler.update(found_non_finite) == StepDecision::Apply,
            None => true,
        };
        if applied {
            self.optimizer.step()?;
        }
        if let Some(momentum) = targets.ema_momentum(values.momentum) {
            self.update_ema(momentum)?;
        }
        phases.optimizer = clock.lap();
        self.last_step_phases = clock.at.is_some().then_some(phases);
        Ok(StepOutcome {
            losses,
            clip,
            applied,
        })
    }

    /// The official `forward_backward` up to the backward: teacher targets, student forward,
    /// DINO (local and global), KoLeo and iBOT losses; returns them and the weighted sum to
    /// differentiate (scaled in fp16).
    fn forward_losses(
        &mut self,
        batch: &SslBatch,
        teacher_temp: f64,
        collective: &dyn Collective,
        targets: TargetSource<'_>,
    ) -> Result<(StepLosses, Tensor), MetaArchError> {
        let cfg = self.config.clone();
        batch.validate(cfg.n_local_crops)?;
        let (dino_targets, ibot_targets) =
            self.teacher_targets(batch, teacher_temp, collective, targets)?;
        let kind = cfg.precision.compute_kind();
        let s = self
            .student
            .student_outputs(batch, kind, cfg.n_local_crops, cfg.do_ibot())?;

        let mut objective: Option<Tensor> = None;
        let mut add = |t: Tensor| {
            objective = Some(match objective.take() {
                None => t,
                Some(acc) => acc + t,
            });
        };
        let (mut local_loss, mut global_loss, mut koleo_loss, mut ibot_loss) =
            (None, None, None, None);
        let n_local = cfg.n_local_crops as usize;
        let local = (n_local > 0).then_some(&s.local_cls_after_head);
        let dino =
            self.dino_loss
                .crop_losses(&s.global_cls_after_head, local, n_local, &dino_targets)?;
        // The official step always adds the local term (when there are local crops) and
        // the global term and KoLeo only with DINO on.
        if let Some(l) = dino.local {
            local_loss = Some(l.detach());
            add(l * cfg.dino_loss_weight);
        }
        if cfg.do_dino() {
            global_loss = Some(dino.global.detach());
            add(dino.global * cfg.dino_loss_weight);
            if cfg.do_koleo() {
                let koleo = koleo_per_crop_sum(&s.global_cls_tokens, 2)? * cfg.koleo_loss_weight;
                koleo_loss = Some(koleo.detach());
                add(koleo);
            }
        }
        if let (Some(loss), Some(targets), Some(student)) =
            (&self.ibot_loss, &ibot_targets, &s.masked_patches_after_head)
        {
            let n_images = batch.masks.size()[0];
            // × 2 (both global crops together) × 1/2 (iBOT loss scale) as the official step.
            let ibot =
                loss.forward_masked(student, targets, &batch.masks_weight, n_images)? * 2.0 * 0.5;
            ibot_loss = Some(ibot.detach());
            add(ibot * cfg.ibot_loss_weight);
        }
        let Some(objective) = objective else {
            return Err(MetaArchError::InvalidConfig {
                field: "dino.loss_weight",
                message: "every loss is switched off; enable DINO or iBOT".into(),
            });
        };
        let to_backprop = match &self.loss_scaler {
            Some(scaler) => scaler.scale_loss(&objective),
            None => objective.shallow_clone(),
        };
        Ok((
            StepLosses {
                dino_local_crops_loss: local_loss,
                dino_global_crops_loss: global_loss,
                koleo: koleo_loss,
                ibot: ibot_loss,
                objective: objective.detach(),
            },
            to_backprop,
        ))
    }

    /// Gradients of one student sub-module (those that received one).
    fn submodule_grads(&self, name: &str) -> Vec<Tensor> {
        self.student
            .submodule_variables(name)
            .into_iter()
            .map(|(_, v)| v.grad())
            .filter(Tensor::defined)
            .collect()
    }

    /// EMA over every parameter: `ema = m · ema + (1 − m) · student`.
    fn update_ema(&self, momentum: f64) -> Result<(), MetaArchError> {
        let mut ema = Vec::new();
        let mut student = Vec::new();
        for name in SUBMODULES {
            ema.extend(
                self.teacher
                    .submodule_variables(name)
                    .into_iter()
                    .map(|(_, v)| v),
            );
            student.extend(
                self.student
                    .submodule_variables(name)
                    .into_iter()
                    .map(|(_, v)| v),
            );
        }
        ema_update(&ema, &student, momentum)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind};

    use super::*;
    use crate::dist::Single;
    use crate::host_sync;
    use crate::loss::CenteringMode;
    use crate::meta_arch::MetaArchConfig;
    use crate::meta_arch::test_support::{tiny_batch, tiny_config, values};
    use crate::model::DinoHeadConfig;
    use crate::precision::Precision;

    fn step(arch: &mut MetaArch, batch: &SslBatch) -> StepReport {
        arch.train_step(batch, &values(), &Single, TargetSource::Ema)
            .unwrap()
            .read(&Single)
    }

    fn separate_head_sinkhorn() -> MetaArchConfig {
        let mut cfg = tiny_config();
        cfg.ibot_head = Some(DinoHeadConfig {
            out_dim: 12,
            ..cfg.dino_head.clone()
        });
        cfg.centering = CenteringMode::SinkhornKnopp;
        cfg
    }

    #[test]
    fn a_shared_head_step_with_drop_path_updates_student_and_teacher() {
        let mut arch = MetaArch::new(tiny_config(), Device::Cpu).unwrap();
        let before = arch.student.vs.variables()["backbone.blocks.1.mlp.fc1.weight"].copy();
        let teacher_before = arch.teacher.vs.variables()["dino_head.mlp.0.weight"].copy();
        let out = step(&mut arch, &tiny_batch());
        assert!(out.applied);
        let l = &out.losses;
        for v in [
            l.dino_local_crops_loss,
            l.dino_global_crops_loss,
            l.koleo_loss,
            l.ibot_loss,
        ] {
            assert!(v.is_some_and(f64::is_finite), "{l:?}");
        }
        assert_eq!(
            out.clip.iter().map(|c| c.0.as_str()).collect::<Vec<_>>(),
            ["backbone", "dino_head"]
        );
        assert!(!arch.student.vs.variables()["backbone.blocks.1.mlp.fc1.weight"].equal(&before));
        assert!(!arch.teacher.vs.variables()["dino_head.mlp.0.weight"].equal(&teacher_before));
    }

    #[test]
    fn a_cpu_step_records_where_its_time_went() {
        let mut arch = MetaArch::new(tiny_config(), Device::Cpu).unwrap();
        assert_eq!(arch.last_step_phases, None);
        let started = Instant::now();
        step(&mut arch, &tiny_batch());
        let elapsed = started.elapsed();
        let p = arch.last_step_phases.expect("phases of a CPU step");
        assert!(
            p.forward > Duration::ZERO && p.backward > Duration::ZERO,
            "{p:?}"
        );
        assert!(p.optimizer > Duration::ZERO, "{p:?}");
        // One process: nothing to all-reduce, so (almost) no time in it.
        assert!(p.communication < p.forward, "{p:?}");
        assert!(p.forward + p.backward + p.communication + p.optimizer <= elapsed);
    }

    #[test]
    fn a_separate_head_sinkhorn_step_without_local_crops_runs() {
        let mut cfg = separate_head_sinkhorn();
        cfg.n_local_crops = 0;
        let mut arch = MetaArch::new(cfg, Device::Cpu).unwrap();
        let mut batch = tiny_batch();
        batch.local_crops = Tensor::zeros([0, 3, 28, 28], (Kind::Float, Device::Cpu));
        let out = step(&mut arch, &batch);
        assert!(out.losses.dino_local_crops_loss.is_none());
        assert!(out.losses.ibot_loss.is_some());
        assert_eq!(out.clip.len(), 3);
        assert!(
            arch.dino_loss
                .center()
                .center()
                .abs()
                .sum(Kind::Float)
                .double_value(&[])
                == 0.0
        );
    }

    #[test]
    fn a_batch_with_the_wrong_local_crop_count_is_rejected() {
        let mut arch = MetaArch::new(tiny_config(), Device::Cpu).unwrap();
        let mut batch = tiny_batch();
        batch.local_crops = batch.local_crops.narrow(0, 0, 2);
        let err = arch
            .train_step(&batch, &values(), &Single, TargetSource::Ema)
            .unwrap_err()
            .to_string();
        assert!(err.contains("local_crops"), "{err}");
    }

    /// Host reads made by `f` on this thread.
    fn reads_of<T>(f: impl FnOnce() -> T) -> (T, u64) {
        let before = host_sync::reads();
        let out = f();
        (out, host_sync::reads() - before)
    }

    #[test]
    fn a_step_reads_nothing_to_the_host_until_its_losses_are_read_once() {
        let frozen = MetaArch::new(tiny_config(), Device::Cpu).unwrap().teacher;
        let bf16 = MetaArchConfig {
            precision: Precision::Bf16,
            ..tiny_config()
        };
        let cases: [(&str, MetaArchConfig, TargetSource<'_>); 5] = [
            ("shared head, centering", tiny_config(), TargetSource::Ema),
            (
                "separate head, sinkhorn",
                separate_head_sinkhorn(),
                TargetSource::Ema,
            ),
            ("bf16", bf16, TargetSource::Ema),
            (
                "frozen teacher with a student EMA",
                tiny_config(),
                TargetSource::Frozen {
                    teacher: &frozen,
                    student_ema_momentum: Some(0.5),
                },
            ),
            (
                "frozen teacher without a student EMA",
                tiny_config(),
                TargetSource::Frozen {
                    teacher: &frozen,
                    student_ema_momentum: None,
                },
            ),
        ];
        for (name, cfg, targets) in cases {
            let mut arch = MetaArch::new(cfg, Device::Cpu).unwrap();
            let batch = tiny_batch();
            let (out, during) = reads_of(|| {
                arch.train_step(&batch, &values(), &Single, targets)
                    .unwrap()
            });
            assert_eq!(during, 0, "{name}: the step read from the device");
            let (losses, reading) = reads_of(|| out.losses.read(&Single));
            assert_eq!(reading, 1, "{name}: reading the losses is one fused read");
            assert!(losses.objective.is_finite(), "{name}: {losses:?}");
        }
    }

    #[test]
    fn an_fp16_step_reads_one_flag_to_decide_whether_to_apply_the_update() {
        let cfg = MetaArchConfig {
            precision: Precision::Fp16,
            ..tiny_config()
        };
        let mut arch = MetaArch::new(cfg, Device::Cpu).unwrap();
        let batch = tiny_batch();
        let (_, during) = reads_of(|| {
            arch.train_step(&batch, &values(), &Single, TargetSource::Ema)
                .unwrap()
        });
        assert_eq!(during, 1);
    }

    #[test]
    fn read_losses_are_the_device_values_halved_where_the_official_loss_dict_halves_them() {
        let mut arch = MetaArch::new(tiny_config(), Device::Cpu).unwrap();
        let out = arch
            .train_step(&tiny_batch(), &values(), &Single, TargetSource::Ema)
            .unwrap();
        let read = out.losses.read(&Single);
        let value = |t: &Option<Tensor>| t.as_ref().unwrap().double_value(&[]);
        assert_eq!(
            read.dino_local_crops_loss,
            Some(value(&out.losses.dino_local_crops_loss))
        );
        assert_eq!(
            read.dino_global_crops_loss,
            Some(value(&out.losses.dino_global_crops_loss))
        );
        assert_eq!(read.koleo_loss, Some(value(&out.losses.koleo) / 2.0));
        assert_eq!(read.ibot_loss, Some(value(&out.losses.ibot) / 2.0));
        assert_eq!(read.objective, out.losses.objective.double_value(&[]));
    }
}
