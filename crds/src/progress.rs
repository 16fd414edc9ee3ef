//! The progress protocol (`proto/progress.proto`): the trainer's rank 0 reports iterations,
//! losses, checkpoints and evaluations to the operator over gRPC.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("dinoflow.progress.v1");

/// gRPC metadata key carrying `Bearer <token>`.
pub const AUTHORIZATION_METADATA: &str = "authorization";
/// Environment variable through which the operator hands the job's token to the trainer.
pub const TOKEN_ENV: &str = crate::contract::PROGRESS_TOKEN;
