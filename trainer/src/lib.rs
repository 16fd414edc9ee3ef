//! The Dinoflow trainer: DINOv2 on libtorch.

pub mod dist;
pub mod loss;
pub mod masking;
pub mod optim;
pub mod precision;
pub mod data;
