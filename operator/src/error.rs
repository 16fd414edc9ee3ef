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
}

impl Error {
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
        }
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
        ];
        let mut labels: Vec<_> = errors.iter().map(Error::metric_label).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), errors.len());
    }
}
