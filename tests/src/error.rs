use std::path::PathBuf;

/// Why the harness could not do what a test asked; each message says what to run or fix.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error(
        "{name} not found in {cache_bin} or on PATH: run scripts/setup.sh, it builds the control plane"
    )]
    MissingBinary { name: String, cache_bin: PathBuf },

    #[error("scripts/cluster.sh {command} --dir {dir} failed ({status}):\n{output}")]
    ClusterScript {
        command: String,
        dir: PathBuf,
        status: std::process::ExitStatus,
        output: String,
    },

    #[error("scripts/node.sh {command} failed:\n{output}")]
    NodeScript { command: String, output: String },

    #[error("kubectl {args} failed ({status}):\n{stderr}")]
    Kubectl {
        args: String,
        status: std::process::ExitStatus,
        stderr: String,
    },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: {message}")]
    Manifest { path: PathBuf, message: String },

    #[error("kube client from {kubeconfig}: {source}")]
    Kubeconfig {
        kubeconfig: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },

    #[error(transparent)]
    Kube(#[from] kube::Error),

    #[error("{command} failed:\n{output}")]
    Build { command: String, output: String },

    #[error("prometheus: {0}")]
    Prometheus(String),
}

impl HarnessError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }
}
