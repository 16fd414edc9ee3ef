//! The Dinoflow trainer: DINOv2 on libtorch.
pub mod checkpoint;
pub mod eval;
pub mod metrics;
pub mod train_loop;
pub mod cli;
// pub mod config;
