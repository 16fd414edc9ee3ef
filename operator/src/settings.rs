//! Operator-wide settings: the command-line flags (each also read from an env var, which is how
//! the chart and `manifests/install/` configure the operator) and the [`Settings`] they give
//! the desired-state functions.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{CommandFactory, Parser, ValueEnum};

/// The trainer image of this release (the GPU variant; `scripts/images.sh` builds it with
/// `--gpu`, and `<this>-cpu` always): the chart's appVersion is the crate version
/// (tests/tests/images.rs checks both).
pub const DEFAULT_TRAINER_IMAGE: &str = concat!(
    "ghcr.io/dinoflow/dinoflow-trainer:",
    env!("CARGO_PKG_VERSION")
);

/// How the operator writes its log.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

/// Reconciles Dinoflow PretrainJob and DistillJob resources into gangs of GPU pods.
#[derive(Debug, Parser)]
#[command(version)]
pub struct Args {
    /// Kubeconfig to use; unset: $KUBECONFIG, ~/.kube/config, or the in-cluster service account.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Trainer image for jobs that set no cluster.image.
    #[arg(long, env = "DINOFLOW_DEFAULT_IMAGE", default_value = DEFAULT_TRAINER_IMAGE)]
    pub default_image: String,
    /// Address trainers reach the progress endpoint at (DINOFLOW_PROGRESS_ENDPOINT).
    #[arg(
        long,
        env = "DINOFLOW_PROGRESS_ENDPOINT",
        default_value = "http://dinoflow-operator.dinoflow-system.svc:9090"
    )]
    pub progress_endpoint: String,
    /// File holding the key per-job progress tokens are derived from (keep it stable).
    #[arg(long, env = "DINOFLOW_PROGRESS_KEY_FILE")]
    pub progress_key_file: Option<PathBuf>,
    /// The key itself (prefer --progress-key-file).
    #[arg(long, env = "DINOFLOW_PROGRESS_KEY", hide_env_values = true)]
    pub progress_key: Option<String>,
    /// Listen address of /healthz, /readyz and /metrics.
    #[arg(long, env = "DINOFLOW_HEALTH_ADDR", default_value = "0.0.0.0:8080")]
    pub health_addr: SocketAddr,
    /// Listen address of the gRPC progress endpoint.
    #[arg(long, env = "DINOFLOW_PROGRESS_ADDR", default_value = "0.0.0.0:9090")]
    pub progress_addr: SocketAddr,
    /// Elect a leader over a Lease, so only one replica acts.
    #[arg(long, env = "DINOFLOW_LEADER_ELECT", default_value_t = false)]
    pub leader_elect: bool,
    /// Namespace of the leader Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "dinoflow-system")]
    pub lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, default_value = "dinoflow-operator-leader")]
    pub lease_name: String,
    /// This replica's identity in the Lease; defaults to the pod name.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Seconds a leader's Lease stays valid without renewal. The leader renews every third of
    /// it and steps down when it could not renew for two thirds (client-go's 15 s / 10 s).
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(3..))]
    pub lease_duration_seconds: u64,
    /// Watch only this namespace (a namespaced install); unset: the whole cluster.
    #[arg(long, env = "DINOFLOW_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Reconciles running at once per job kind. Each can make a gang's worth of concurrent
    /// writes; lower it when the API server is small or shared.
    #[arg(long, env = "DINOFLOW_MAX_CONCURRENT_RECONCILES", default_value_t = crate::controller::DEFAULT_CONCURRENCY,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub max_concurrent_reconciles: u16,
    /// Log format.
    #[arg(long, env = "DINOFLOW_LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
}

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

/// Env vars the operator reads outside its flags: the log filter of `tracing_subscriber`, and
/// the host name its Lease identity falls back to when `POD_NAME` is unset.
pub const OTHER_ENV: [&str; 2] = ["RUST_LOG", "HOSTNAME"];

/// Every environment variable the operator binary reads: each flag's env name, then
/// [`OTHER_ENV`]. The chart may set only these (tests/tests/chart.rs checks its Deployment).
pub fn env_names() -> Vec<String> {
    let command = Args::command();
    let flags = command
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned());
    flags.chain(OTHER_ENV.map(String::from)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_cover_every_env_backed_flag_and_the_log_filter() {
        let names = env_names();
        for name in [
            "DINOFLOW_LEADER_ELECT",
            "DINOFLOW_WATCH_NAMESPACE",
            "DINOFLOW_HEALTH_ADDR",
            "DINOFLOW_LOG_FORMAT",
            "DINOFLOW_PROGRESS_KEY_FILE",
            "POD_NAMESPACE",
            "RUST_LOG",
        ] {
            assert!(
                names.iter().any(|n| n == name),
                "{name} missing from {names:?}"
            );
        }
        // A flag without an env name is not in the list (the chart cannot set it).
        assert!(!names.iter().any(|n| n.contains("LEASE_NAME")));
    }

    #[test]
    fn flags_parse_from_their_env_names() {
        Args::command().debug_assert();
        let args = Args::try_parse_from(["dinoflow-operator", "--leader-elect"]).unwrap();
        assert!(args.leader_elect);
        assert!(args.watch_namespace.is_none());
    }
}
