//! The Dinoflow trainer: DINOv2 on libtorch. The layering, top to bottom, is described in
//! [`commands`]; nothing below `commands` imports it.

pub mod checkpoint;
pub mod cli;
pub mod commands;
pub mod config;
pub mod cuda_backend;
pub mod curriculum;
pub mod data;
pub mod dist;
pub mod distill;
pub mod env;
pub mod eval;
pub mod export;
pub mod flops;
pub mod host_sync;
pub mod job;
pub mod launch;
pub mod logging;
pub mod loss;
pub mod masking;
pub mod meta_arch;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod parallel;
pub mod precision;
pub mod pretrain;
pub mod pretrained;
pub mod progress_client;
pub mod synthetic;
pub mod train_loop;
pub mod weights;

#[cfg(test)]
pub(crate) mod parity_fixture;
