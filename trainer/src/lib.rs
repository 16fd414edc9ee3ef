//! The Dinoflow trainer: DINOv2 on libtorch.
