//! Dinoflow API: the custom resources and the trainer configuration, one schema for both.
//!
//! `training` is the trainer config (read by the trainer from the same YAML kubectl applies),
//! `cluster` is how the operator lays the job out on Kubernetes.
pub mod cluster;
pub mod progress;
pub mod status;
pub mod training;
