//! The operator's error type; each variant maps to a metric label so failures are countable.

/// Errors of the reconcilers, the progress endpoint and leader election.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API failed.
    #[error("kubernetes API: {0}")]
    Kube(#[source] kube::Error),

    /// An object could not be (de)serialised.
    #[error("serialising {what}: {source}")]
    Serde {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },

    /// The training block could not be rendered as YAML for the ConfigMap.
    #[error("rendering the trainer config: {0}")]
    Yaml(#[source] serde_yaml_ng::Error),

    /// The job object lacks something the API server always sets (name, namespace, uid).
    #[error("job object is missing {0}")]
    MissingField(&'static str),

    /// The job cannot be laid out as written (the message names the field and the fix).
    #[error("invalid job: {0}")]
    InvalidJob(String),

    /// This replica lost the leader Lease; it must not write.
    #[error("not the leader (lease lost); refusing to write")]
    NotLeader,

    /// Leader election failed.
    #[error("leader election: {0}")]
    Lease(String),

    /// A reconcile took longer than its time limit and was abandoned (it is retried; what it
    /// left half done is what a crash would leave, which the next reconcile completes).
    #[error("reconcile abandoned after {0:?} (API server slow or unreachable); retrying")]
    Timeout(std::time::Duration),
}

impl Error {
    /// Every [`metric_label`](Self::metric_label), so the error counter can start each at 0.
    pub const METRIC_LABELS: [&'static str; 8] = [
        "kube",
        "serde",
        "yaml",
        "missing_field",
        "invalid_job",
        "not_leader",
        "lease",
        "timeout",
    ];

    /// Metric label of the variant (`dinoflow_operator_reconcile_errors_total{error=...}`).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
            Self::Serde { .. } => "serde",
            Self::Yaml(_) => "yaml",
            Self::MissingField(_) => "missing_field",
            Self::InvalidJob(_) => "invalid_job",
            Self::NotLeader => "not_leader",
            Self::Lease(_) => "lease",
            Self::Timeout(_) => "timeout",
        }
    }

    /// Reason of the job's `Synced=False` condition for this error (CamelCase, as reasons are).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Kube(_) => "KubernetesAPIError",
            Self::Serde { .. } => "SerializationError",
            Self::Yaml(_) => "ConfigRenderError",
            Self::MissingField(_) => "MissingField",
            Self::InvalidJob(_) => "InvalidJob",
            Self::NotLeader => "NotLeader",
            Self::Lease(_) => "LeaseError",
            Self::Timeout(_) => "ReconcileTimeout",
        }
    }

    /// A write refused because this view of the object is stale (409): retry at once on a
    /// fresh view; it is no fault worth reporting.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Self::Kube(kube::Error::Api(s)) if s.code == 409)
    }
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Self::Kube(e)
    }
}

/// Result with the operator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_has_a_distinct_metric_label() {
        let errors = [
            Error::Serde {
                what: "x",
                source: serde_json::from_str::<u8>("x").unwrap_err(),
            },
            Error::MissingField("uid"),
            Error::InvalidJob("x".into()),
            Error::NotLeader,
            Error::Lease("x".into()),
            Error::Timeout(std::time::Duration::from_secs(1)),
        ];
        let mut labels: Vec<_> = errors.iter().map(Error::metric_label).collect();
        for label in &labels {
            assert!(Error::METRIC_LABELS.contains(label), "{label} not listed");
        }
        assert!(Error::METRIC_LABELS.contains(&"kube"));
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), errors.len());
        let mut reasons: Vec<_> = errors.iter().map(Error::reason).collect();
        reasons.sort_unstable();
        reasons.dedup();
        assert_eq!(reasons.len(), errors.len());
    }
}
