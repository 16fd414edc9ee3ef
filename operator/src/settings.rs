//! Operator-wide settings: the command-line flags (each also read from an env var, which is how
//! the chart and `manifests/install/` configure the operator) and the [`Settings`] they give
//! the desired-state functions.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{CommandFactory, Parser, ValueEnum};

use crate::tls::{self, ServerTls, TlsError, TlsFiles};

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
        default_value = "https://dinoflow-operator.dinoflow-system.svc:9090"
    )]
    pub progress_endpoint: String,
    /// PEM certificate (chain) the progress endpoint serves; its host in
    /// DINOFLOW_PROGRESS_ENDPOINT must be one of the certificate's names.
    #[arg(long, env = "DINOFLOW_PROGRESS_TLS_CERT_FILE")]
    pub progress_tls_cert_file: Option<PathBuf>,
    /// PEM private key of --progress-tls-cert-file.
    #[arg(long, env = "DINOFLOW_PROGRESS_TLS_KEY_FILE")]
    pub progress_tls_key_file: Option<PathBuf>,
    /// PEM CA certificate that signed --progress-tls-cert-file; handed to every job's pods
    /// (DINOFLOW_PROGRESS_CA) so trainers verify the endpoint against it.
    #[arg(long, env = "DINOFLOW_PROGRESS_TLS_CA_FILE")]
    pub progress_tls_ca_file: Option<PathBuf>,
    /// Serve the progress endpoint without TLS (local runs and tests only: tokens and job
    /// status then cross the network in the clear). Refused together with the TLS files.
    #[arg(long, env = "DINOFLOW_PROGRESS_PLAINTEXT", default_value_t = false)]
    pub progress_plaintext: bool,
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
    /// Seconds a leader's Lease stays valid without renewal. The leader renews every 2/15 of
    /// it and steps down when it could not renew for two thirds (client-go's 15 s / 2 s / 10 s).
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
    /// e.g. `https://dinoflow-operator.dinoflow-system.svc:9090`.
    pub progress_endpoint: String,
    /// PEM of the CA the endpoint's certificate chains to, handed to pods in the job's Secret
    /// (`DINOFLOW_PROGRESS_CA`); `None`: the endpoint is plaintext (`--progress-plaintext`).
    pub progress_ca: Option<String>,
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
            progress_ca: None,
        }
    }
}

impl Args {
    /// The progress endpoint's transport: TLS from the three files (checked, see
    /// [`ServerTls::load`]), or `None` for plaintext, which only `--progress-plaintext` gives.
    /// Anything in between is an error naming the setting to fix.
    pub fn progress_tls(&self) -> Result<Option<ServerTls>, TlsError> {
        let files = [
            (&self.progress_tls_cert_file, tls::CERT_FLAG),
            (&self.progress_tls_key_file, tls::KEY_FLAG),
            (&self.progress_tls_ca_file, tls::CA_FLAG),
        ];
        if self.progress_plaintext {
            if let Some((_, flag)) = files.iter().find(|(f, _)| f.is_some()) {
                return Err(TlsError::new(format!(
                    "--progress-plaintext (DINOFLOW_PROGRESS_PLAINTEXT) and {flag} are both set: \
                     drop the flag to serve TLS, or the files to serve plaintext"
                )));
            }
            if !self.progress_endpoint.starts_with("http://") {
                return Err(TlsError::new(format!(
                    "--progress-plaintext: DINOFLOW_PROGRESS_ENDPOINT {:?} must start with http://",
                    self.progress_endpoint
                )));
            }
            return Ok(None);
        }
        let missing: Vec<&str> = files
            .iter()
            .filter(|(f, _)| f.is_none())
            .map(|(_, flag)| *flag)
            .collect();
        if !missing.is_empty() {
            return Err(TlsError::new(format!(
                "the progress endpoint serves TLS and needs {}; the chart mounts them from its \
                 TLS Secret. For a local run without TLS pass --progress-plaintext",
                missing.join(", ")
            )));
        }
        let files = TlsFiles {
            cert: self.progress_tls_cert_file.clone().unwrap_or_default(),
            key: self.progress_tls_key_file.clone().unwrap_or_default(),
            ca: self.progress_tls_ca_file.clone().unwrap_or_default(),
        };
        ServerTls::load(&files, &self.progress_endpoint).map(Some)
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
        for name in [
            "DINOFLOW_PROGRESS_TLS_CERT_FILE",
            "DINOFLOW_PROGRESS_TLS_KEY_FILE",
            "DINOFLOW_PROGRESS_TLS_CA_FILE",
            "DINOFLOW_PROGRESS_PLAINTEXT",
        ] {
            assert!(names.iter().any(|n| n == name), "{name} missing");
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

    fn parse(args: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("dinoflow-operator").chain(args.iter().copied()))
            .unwrap()
    }

    fn fixture(name: &str) -> String {
        format!("{}/../tests/data/tls/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn tls_is_the_default_and_names_every_missing_file() {
        let e = parse(&[]).progress_tls().unwrap_err().to_string();
        for flag in [tls::CERT_FLAG, tls::KEY_FLAG, tls::CA_FLAG] {
            assert!(e.contains(flag), "{e}");
        }
        assert!(e.contains("--progress-plaintext"), "{e}");
        let cert = fixture("server.crt");
        let e = parse(&["--progress-tls-cert-file", &cert])
            .progress_tls()
            .unwrap_err()
            .to_string();
        assert!(
            !e.contains(tls::CERT_FLAG) && e.contains(tls::KEY_FLAG),
            "{e}"
        );
    }

    #[test]
    fn the_three_files_give_tls_and_the_ca_for_the_pods() {
        let (cert, key, ca) = (
            fixture("server.crt"),
            fixture("server.key"),
            fixture("ca.crt"),
        );
        let args = parse(&[
            "--progress-endpoint",
            "https://localhost:9090",
            "--progress-tls-cert-file",
            &cert,
            "--progress-tls-key-file",
            &key,
            "--progress-tls-ca-file",
            &ca,
        ]);
        let tls = args.progress_tls().unwrap().expect("TLS");
        assert_eq!(tls.ca_pem, std::fs::read_to_string(&ca).unwrap());
        // The default endpoint is the chart's Service name, which the fixture also covers.
        let args = parse(&[
            "--progress-tls-cert-file",
            &cert,
            "--progress-tls-key-file",
            &key,
            "--progress-tls-ca-file",
            &ca,
        ]);
        assert!(args.progress_tls().unwrap().is_some());
    }

    #[test]
    fn plaintext_only_when_asked_and_never_with_tls_files() {
        let args = parse(&[
            "--progress-plaintext",
            "--progress-endpoint",
            "http://127.0.0.1:9090",
        ]);
        assert!(args.progress_tls().unwrap().is_none());
        let ca = fixture("ca.crt");
        let e = parse(&[
            "--progress-plaintext",
            "--progress-endpoint",
            "http://127.0.0.1:9090",
            "--progress-tls-ca-file",
            &ca,
        ])
        .progress_tls()
        .unwrap_err()
        .to_string();
        assert!(e.contains("both set") && e.contains(tls::CA_FLAG), "{e}");
        // The default endpoint is https: plaintext must say where trainers dial in the clear.
        let e = parse(&["--progress-plaintext"])
            .progress_tls()
            .unwrap_err()
            .to_string();
        assert!(e.contains("http://"), "{e}");
    }
}
