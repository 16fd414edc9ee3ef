//! Dinoflow API: the custom resources and the trainer configuration, one schema for both.
//!
//! `training` is the trainer config (read by the trainer from the same YAML kubectl applies),
//! `cluster` is how the operator lays the job out on Kubernetes.
pub mod cluster;
pub mod contract;
pub mod crd;
pub mod distill;
pub mod exit_codes;
pub mod fields;
mod job_resource;
pub mod load;
pub mod presets;
pub mod pretrain;
pub mod progress;
pub mod status;
pub mod training;

pub use distill::{DistillJob, DistillJobSpec};
pub use load::{ConfigError, ResolvedConfig, load_training_config, load_training_config_str};
pub use pretrain::{PretrainJob, PretrainJobSpec};
pub use training::TrainingConfig;
