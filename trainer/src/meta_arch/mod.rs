//! The DINOv2 meta-architecture: student and teacher networks and the training step.
//!
//! Mirrors the official `SSLMetaArch`: student = {backbone, dino_head, ibot_head (when
//! separate)}, teacher = the same modules, initialised as a copy of the student, never trained
//! by gradients (EMA only) and always run in eval mode. One module per concern:
//! - [`network`]: the student/teacher networks and their forward passes;
//! - [`batch`]: one collated batch and its shape checks;
//! - [`targets`]: where the teacher targets come from ([`TargetSource`]);
//! - [`step`]: one iteration: forward, losses, backward, gradient averaging, clipping,
//!   optimizer, EMA, all without a host sync;
//! - [`losses`]: the losses a step leaves on the device and their one host read;
//! - [`config`]: the settings and their validation.

mod batch;
mod config;
mod losses;
mod network;
mod step;
mod targets;

use std::collections::BTreeMap;

use tch::{Device, Tensor};

pub use batch::SslBatch;
pub use config::MetaArchConfig;
pub use losses::{LossValues, StepLosses};
pub use network::{SUBMODULES, SslNetwork, StudentOutputs, TeacherHeadOutputs, copy_weights};
pub use step::{StepOutcome, StepPhases, StepReport};
pub use targets::TargetSource;

use crate::loss::{DinoLoss, DinoLossConfig, IbotLoss, IbotLossConfig, LossError};
use crate::model::{ModelError, VitConfig};
use crate::optim::param_groups::{ParamGroupError, student_param_multipliers};
use crate::optim::{AdamW, OptimError};
use crate::parallel::{MemoryBytes, ShardedStudent};
use crate::precision::{DynamicLossScaler, LossScalerError};

/// Errors of the meta-architecture.
#[derive(Debug, thiserror::Error)]
pub enum MetaArchError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Loss(#[from] LossError),
    #[error(transparent)]
    Optim(#[from] OptimError),
    #[error(transparent)]
    ParamGroup(#[from] ParamGroupError),
    #[error(transparent)]
    LossScaler(#[from] LossScalerError),
    #[error("{field}: {message}")]
    InvalidConfig {
        field: &'static str,
        message: String,
    },
}

/// Student, teacher, losses with their centers, optimizer and loss scaler.
#[derive(Debug)]
pub struct MetaArch {
    pub config: MetaArchConfig,
    pub student: SslNetwork,
    /// The EMA of the student: the teacher in pretraining, the student EMA in distillation.
    pub teacher: SslNetwork,
    pub dino_loss: DinoLoss,
    pub ibot_loss: Option<IbotLoss>,
    pub optimizer: AdamW,
    pub loss_scaler: Option<DynamicLossScaler>,
    /// The sharded layout of the student when any sub-module is sharded (built for the
    /// collective of the first step, see [`MetaArch::prepare_parallel`]); it then owns the
    /// AdamW state and [`MetaArch::optimizer`] stays empty.
    pub sharded: Option<ShardedStudent>,
    /// Where the last step's time went (CPU only, see [`StepPhases`]).
    pub last_step_phases: Option<StepPhases>,
}

impl MetaArch {
    /// Builds the student with the official init, copies it into the teacher (as the official
    /// `prepare_for_distributed_training`), and sets up losses and the optimizer.
    pub fn new(config: MetaArchConfig, device: Device) -> Result<Self, MetaArchError> {
        config.validate()?;
        let ibot_head = if config.do_ibot() {
            config.ibot_head.as_ref()
        } else {
            None
        };
        let student = SslNetwork::new(device, &config.student, &config.dino_head, ibot_head)?;
        let teacher_vit = VitConfig {
            drop_path_rate: 0.0,
            ..config.student.clone()
        };
        let mut teacher = SslNetwork::new(device, &teacher_vit, &config.dino_head, ibot_head)?;
        copy_weights(&teacher.vs, &student.vs);
        teacher.vs.freeze();
        let dino_loss = DinoLoss::new(
            &DinoLossConfig {
                out_dim: config.dino_head.out_dim,
                student_temp: config.student_temp,
                center_momentum: config.center_momentum,
                sinkhorn_iterations: config.sinkhorn_iterations,
            },
            device,
        )?;
        let ibot_loss = config
            .do_ibot()
            .then(|| {
                IbotLoss::new(
                    &IbotLossConfig {
                        out_dim: student.patch_head().config.out_dim,
                        student_temp: config.student_temp,
                        center_momentum: config.center_momentum,
                        sinkhorn_iterations: config.sinkhorn_iterations,
                    },
                    device,
                )
            })
            .transpose()?;
        let depth = config.student.depth as usize;
        let mut params = Vec::new();
        for name in SUBMODULES {
            for (key, var) in student.submodule_variables(name) {
                let mult = student_param_multipliers(&key, depth, &config.param_groups)?;
                params.push((key, var, mult));
            }
        }
        let optimizer = AdamW::new(config.adamw, params)?;
        let loss_scaler = (config.precision.needs_loss_scaling() || config.grad_scaler)
            .then(|| DynamicLossScaler::new(config.loss_scaler))
            .transpose()?;
        Ok(Self {
            config,
            student,
            teacher,
            dino_loss,
            ibot_loss,
            optimizer,
            loss_scaler,
            sharded: None,
            last_step_phases: None,
        })
    }

    /// Lays the student out for rank `rank` of `world` when the config shards any student
    /// sub-module and there are several ranks (a no-op otherwise, or when already laid out for that placement). The step
    /// calls it; a sharded checkpoint loader calls it first to have the shards to fill.
    pub fn prepare_parallel(&mut self, rank: usize, world: usize) -> Result<(), MetaArchError> {
        if !self.config.parallel.any_sharded() || world == 1 {
            // One rank's shard is the whole model: the replicated path is the same update.
            self.sharded = None;
            return Ok(());
        }
        if self.sharded.as_ref().map(ShardedStudent::placement) == Some((rank, world)) {
            return Ok(());
        }
        let depth = self.config.student.depth;
        let mut multipliers = BTreeMap::new();
        let mut submodules = Vec::new();
        for name in SUBMODULES {
            let vars = self.student.submodule_variables(name);
            for (key, _) in &vars {
                let m = student_param_multipliers(key, depth as usize, &self.config.param_groups)?;
                multipliers.insert(key.clone(), m);
            }
            submodules.push((name, vars));
        }
        self.sharded = Some(ShardedStudent::new(
            &submodules,
            &multipliers,
            depth,
            &self.config.parallel,
            self.config.adamw,
            rank,
            world,
        )?);
        Ok(())
    }

    /// Gradient and optimizer-state bytes this rank holds (after a step).
    pub fn memory_bytes(&self) -> MemoryBytes {
        match &self.sharded {
            Some(s) => s.memory(),
            None => {
                let params: Vec<Tensor> = SUBMODULES
                    .iter()
                    .flat_map(|m| self.student.submodule_variables(m))
                    .map(|(_, v)| v)
                    .collect();
                MemoryBytes::replicated(&self.optimizer, &params)
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod parallel_tests;
#[cfg(test)]
mod parity_tests;
#[cfg(test)]
pub(crate) mod test_support;
#[cfg(test)]
mod trajectory_parity_tests;

#[cfg(test)]
mod tests {
    use super::test_support::tiny_config;
    use super::*;
    use crate::precision::{LossScalerConfig, Precision};

    #[test]
    fn the_teacher_starts_as_a_frozen_copy_of_the_student() {
        let arch = MetaArch::new(tiny_config(), Device::Cpu).unwrap();
        let t = arch.teacher.vs.variables();
        for (k, v) in arch.student.vs.variables() {
            assert!(v.equal(&t[&k]), "{k}");
            assert!(
                !t[&k].requires_grad(),
                "{k} of the teacher must not require grad"
            );
        }
        // Shared iBOT head: no ibot_head parameters.
        assert!(arch.student.submodule_variables("ibot_head").is_empty());
    }

    #[test]
    fn an_fp16_arch_scales_the_loss_with_the_configured_scaler() {
        let scaler = LossScalerConfig {
            init_scale: 512.0,
            growth_interval: 9,
            ..LossScalerConfig::default()
        };
        let cfg = MetaArchConfig {
            loss_scaler: scaler,
            precision: Precision::Fp16,
            ..tiny_config()
        };
        let arch = MetaArch::new(cfg, Device::Cpu).unwrap();
        let s = arch.loss_scaler.as_ref().expect("fp16 scales the loss");
        assert_eq!((s.scale(), s.config()), (512.0, scaler));
        let fp32 = MetaArch::new(tiny_config(), Device::Cpu).unwrap();
        assert!(fp32.loss_scaler.is_none());
    }

    #[test]
    fn a_head_wider_than_the_backbone_is_a_config_error() {
        let mut cfg = tiny_config();
        cfg.dino_head.in_dim = 64;
        let err = MetaArch::new(cfg, Device::Cpu).unwrap_err().to_string();
        assert!(
            err.contains("dino.head") && err.contains("embed_dim"),
            "{err}"
        );
    }
}
