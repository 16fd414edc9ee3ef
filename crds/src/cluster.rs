//! `spec.cluster`: nodes, GPUs, placement, gang scheduling, volumes, run policy.
