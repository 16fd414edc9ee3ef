//! The Dinoflow trainer: DINOv2 on libtorch.

pub mod meta_arch;
pub mod model;
pub mod weights;

#[cfg(test)]
pub(crate) mod parity_fixture;
