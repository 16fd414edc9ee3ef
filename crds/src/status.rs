//! Status of PretrainJob and DistillJob.
