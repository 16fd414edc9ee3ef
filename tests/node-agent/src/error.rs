use std::path::PathBuf;

/// Why the node agent could not register its Node, prepare a pod or start its process.
/// Pod-level errors end up in the pod's status (waiting or terminated message) as well.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),

    #[error("pod {pod}: {message}")]
    Unsupported { pod: String, message: String },

    #[error("pod {pod}: {what} not found{hint}")]
    MissingReference {
        pod: String,
        what: String,
        hint: &'static str,
    },

    #[error(
        "pod {pod}: container command `{command}` is not an executable path and not one of the \
         agent's binaries ({known}); give the agent a path for it"
    )]
    UnknownCommand {
        pod: String,
        command: String,
        known: String,
    },

    #[error(
        "node {node} is not schedulable after {seconds} s: taints {taints}; is kube-controller-manager running?"
    )]
    NodeNotSchedulable {
        node: String,
        seconds: u64,
        taints: String,
    },
}

impl AgentError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }
}
