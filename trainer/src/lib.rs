//! The Dinoflow trainer: DINOv2 on libtorch.
pub mod data;
