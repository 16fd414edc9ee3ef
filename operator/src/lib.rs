//! The Dinoflow operator: reconciles PretrainJob and DistillJob into gangs of pods.
//!
//! The pieces, from pure to effectful:
//! - [`desired`]: the objects a job should have (Service, ConfigMap, Secret, Pods, PodGroup),
//!   a pure function of the job, its attempt and the operator's settings;
//! - [`observe`] and [`decide`]: what the observed pods mean and what to do (restart the gang,
//!   fail, succeed, suspend...), again pure, with every run-policy rule unit-tested;
//! - [`controller`]: the kube-rs controllers that apply those decisions with server-side apply;
//! - [`progress`], [`health`], [`metrics`], [`leader`]: the gRPC progress endpoint, probes,
//!   Prometheus metrics and Lease-based leader election.
pub mod controller;
pub mod decide;
pub mod desired;
mod error;
pub mod health;
pub mod job;
pub mod leader;
pub mod metrics;
pub mod observe;
pub mod progress;
pub mod settings;
pub mod tls;

pub use error::{Error, Result};
