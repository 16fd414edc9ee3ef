//! Operator-wide settings that shape every job's children (from command-line flags).

/// Settings the desired-state functions need besides the job itself.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Trainer image for jobs that set no `cluster.image`.
    pub default_image: String,
    /// Address pods use to reach the progress endpoint (`DINOFLOW_PROGRESS_ENDPOINT`),
    /// e.g. `http://dinoflow-operator.dinoflow-system.svc:9090`.
    pub progress_endpoint: String,
    /// Key from which per-job progress tokens are derived (HMAC of the job's uid). Keep it
    /// stable across operator restarts, or running trainers lose the right to report.
    pub progress_key: Vec<u8>,
}

impl Settings {
    /// Settings for unit tests.
    pub fn for_tests() -> Self {
        Self {
            default_image: "ghcr.io/dinoflow/trainer:test".into(),
            progress_endpoint: "http://dinoflow-operator.dinoflow-system.svc:9090".into(),
            progress_key: b"test-key".to_vec(),
        }
    }
}
