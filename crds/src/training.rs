//! `spec.training`: the trainer configuration, defaults equal to the official DINOv2 config.
