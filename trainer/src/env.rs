//! The pod's environment contract (DESIGN.md, "Contracts between operator and trainer"), read
//! into typed values before anything is spawned, so a broken pod spec fails at once with
//! the variable named instead of as a hang at rendezvous. The variable names come from
//! [`dinoflow_api::contract`]; this module is the only reader of the process environment for
//! them (the launcher, [`crate::dist::World`] and the commands go through it).
use std::fmt;

use dinoflow_api::contract as c;

/// Kind of job a trainer runs for, as the operator names it (`DINOFLOW_JOB_KIND`).
pub use dinoflow_api::contract::JobKind;

/// A variable of the contract that is missing or does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error("environment variable {name} is not set: {fix}")]
    Missing { name: &'static str, fix: String },
    #[error("environment variable {name}={value:?}: {reason}; {fix}")]
    Invalid {
        name: &'static str,
        value: String,
        reason: String,
        fix: String,
    },
}

impl EnvError {
    /// The variable at fault.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Missing { name, .. } | Self::Invalid { name, .. } => name,
        }
    }
}

/// What a rank needs to reach rank 0 (`MASTER_ADDR`, `MASTER_PORT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendezvous {
    pub master_addr: String,
    pub master_port: u16,
}

/// Which job and attempt the process belongs to (`DINOFLOW_NAMESPACE`, `DINOFLOW_JOB`,
/// `DINOFLOW_JOB_KIND`, `DINOFLOW_RUN_ATTEMPT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobIdentity {
    pub namespace: String,
    pub name: String,
    pub kind: JobKind,
    pub run_attempt: u32,
}

/// Where rank 0 reports progress (`DINOFLOW_PROGRESS_ENDPOINT`, `DINOFLOW_PROGRESS_TOKEN`,
/// `DINOFLOW_PROGRESS_CA`).
#[derive(Clone, PartialEq, Eq)]
pub struct ProgressTarget {
    pub endpoint: String,
    pub token: String,
    pub job: JobIdentity,
    /// PEM of the CA the endpoint's certificate must chain to (the only one trusted); set
    /// exactly when the endpoint is `https://`.
    pub ca: Option<String>,
}

impl fmt::Debug for ProgressTarget {
    // The token is a secret: never in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProgressTarget")
            .field("endpoint", &self.endpoint)
            .field("token", &"<redacted>")
            .field("job", &self.job)
            .finish()
    }
}

/// The whole contract of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    pub rendezvous: Rendezvous,
    pub nnodes: u32,
    pub node_rank: u32,
    /// Processes to fork on this node (`NPROC_PER_NODE`; 0, a CPU pod, means 1).
    pub nproc_per_node: u32,
    pub world_size: u32,
    pub job: Option<JobIdentity>,
    pub progress: Option<ProgressTarget>,
}

impl LaunchEnv {
    /// Global rank of local process `local_rank` (torchrun's numbering).
    pub fn global_rank(&self, local_rank: u32) -> u32 {
        self.node_rank * self.nproc_per_node + local_rank
    }
}

const SET_BY_OPERATOR: &str = "the Dinoflow operator sets it in every trainer pod; when launching by hand export it (see DESIGN.md, \"Contracts between operator and trainer\")";

fn missing(name: &'static str) -> EnvError {
    EnvError::Missing {
        name,
        fix: SET_BY_OPERATOR.into(),
    }
}

fn invalid(name: &'static str, value: &str, reason: impl Into<String>) -> EnvError {
    EnvError::Invalid {
        name,
        value: value.into(),
        reason: reason.into(),
        fix: SET_BY_OPERATOR.into(),
    }
}

/// Reads variables through `lookup` (the process environment in production, a map in tests).
pub struct Lookup<F: Fn(&str) -> Option<String>>(pub F);

impl<F: Fn(&str) -> Option<String>> Lookup<F> {
    /// A set, non-empty value.
    pub fn get(&self, name: &'static str) -> Option<String> {
        (self.0)(name).filter(|v| !v.trim().is_empty())
    }

    pub fn required(&self, name: &'static str) -> Result<String, EnvError> {
        self.get(name).ok_or_else(|| missing(name))
    }

    pub fn parsed<T: std::str::FromStr>(
        &self,
        name: &'static str,
        what: &str,
    ) -> Result<Option<T>, EnvError> {
        self.get(name)
            .map(|v| {
                v.trim()
                    .parse()
                    .map_err(|_| invalid(name, &v, format!("must be {what}")))
            })
            .transpose()
    }

    pub fn required_parsed<T: std::str::FromStr>(
        &self,
        name: &'static str,
        what: &str,
    ) -> Result<T, EnvError> {
        self.parsed(name, what)?.ok_or_else(|| missing(name))
    }
}

/// The process environment.
pub fn process_env() -> Lookup<impl Fn(&str) -> Option<String>> {
    Lookup(|name: &str| std::env::var(name).ok())
}

/// `MASTER_ADDR` and `MASTER_PORT`.
pub fn rendezvous<F: Fn(&str) -> Option<String>>(env: &Lookup<F>) -> Result<Rendezvous, EnvError> {
    let master_addr = env.required(c::MASTER_ADDR)?;
    let master_port: u16 = env.required_parsed(c::MASTER_PORT, "a TCP port 1..65535")?;
    if master_port == 0 {
        return Err(invalid(c::MASTER_PORT, "0", "must be a TCP port 1..65535"));
    }
    Ok(Rendezvous {
        master_addr: master_addr.trim().to_string(),
        master_port,
    })
}

/// The job identity and, when `DINOFLOW_PROGRESS_ENDPOINT` is set, where to report.
/// `default_kind` applies when `DINOFLOW_JOB_KIND` is unset (the subcommand implies it).
pub fn job_and_progress<F: Fn(&str) -> Option<String>>(
    env: &Lookup<F>,
    default_kind: JobKind,
) -> Result<(Option<JobIdentity>, Option<ProgressTarget>), EnvError> {
    let kind = match env.get(c::JOB_KIND) {
        None => default_kind,
        Some(k) => JobKind::from_kind(&k)
            .ok_or_else(|| invalid(c::JOB_KIND, &k, "must be PretrainJob or DistillJob"))?,
    };
    let run_attempt = env
        .parsed(c::RUN_ATTEMPT, "a non-negative integer")?
        .unwrap_or(0);
    let job = env.get(c::JOB).map(|name| JobIdentity {
        namespace: env.get(c::NAMESPACE).unwrap_or_else(|| "default".into()),
        name,
        kind,
        run_attempt,
    });
    let Some(endpoint) = env.get(c::PROGRESS_ENDPOINT) else {
        return Ok((job, None));
    };
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        return Err(invalid(
            c::PROGRESS_ENDPOINT,
            &endpoint,
            "must be an http:// or https:// URL such as http://dinoflow-operator.dinoflow-system.svc:9090",
        ));
    }
    // Reporting needs to say for whom, and to prove it.
    let Some(job) = job else {
        return Err(missing(c::JOB));
    };
    if env.get(c::NAMESPACE).is_none() {
        return Err(missing(c::NAMESPACE));
    }
    let token = env.required(dinoflow_api::progress::TOKEN_ENV)?;
    let ca = progress_ca(env, &endpoint)?;
    let progress = ProgressTarget {
        endpoint,
        token,
        job: job.clone(),
        ca,
    };
    Ok((Some(job), Some(progress)))
}

/// `DINOFLOW_PROGRESS_CA` for `endpoint`: required by `https://`, refused with `http://` (a
/// trainer given a CA never reports in plaintext), and checked to be a usable PEM CA.
fn progress_ca<F: Fn(&str) -> Option<String>>(
    env: &Lookup<F>,
    endpoint: &str,
) -> Result<Option<String>, EnvError> {
    let ca = env.get(c::PROGRESS_CA);
    let tls = endpoint.starts_with("https://");
    let Some(ca) = ca else {
        if tls {
            return Err(EnvError::Missing {
                name: c::PROGRESS_CA,
                fix: format!(
                    "{} is https://: the trainer verifies the operator against this CA (PEM), \
                     which the operator puts in the job's Secret under `ca.crt`",
                    c::PROGRESS_ENDPOINT
                ),
            });
        }
        return Ok(None);
    };
    let short = ca.chars().take(40).collect::<String>();
    if !tls {
        return Err(invalid(
            c::PROGRESS_CA,
            &short,
            format!(
                "given a CA, the trainer reports over TLS only, but {c}={endpoint:?} is plaintext \
                 (make it https://, or unset {ca_var} for a plaintext local run)",
                c = c::PROGRESS_ENDPOINT,
                ca_var = c::PROGRESS_CA
            ),
        ));
    }
    crate::progress_client::check_ca(&ca)
        .map_err(|reason| invalid(c::PROGRESS_CA, &short, reason))?;
    Ok(Some(ca))
}

/// Reads and cross-checks the whole contract.
pub fn launch_env<F: Fn(&str) -> Option<String>>(
    env: &Lookup<F>,
    kind: JobKind,
) -> Result<LaunchEnv, EnvError> {
    let rendezvous = rendezvous(env)?;
    let nnodes: u32 = env.required_parsed(c::NNODES, "a positive integer")?;
    if nnodes == 0 {
        return Err(invalid(c::NNODES, "0", "must be a positive integer"));
    }
    let node_rank: u32 = env.required_parsed(c::NODE_RANK, "a non-negative integer")?;
    if node_rank >= nnodes {
        return Err(invalid(
            c::NODE_RANK,
            &node_rank.to_string(),
            format!("must be below NNODES={nnodes}"),
        ));
    }
    // A CPU pod asks for no GPUs; it still runs one process.
    let nproc_per_node = env
        .required_parsed::<u32>(c::NPROC_PER_NODE, "a non-negative integer")?
        .max(1);
    let world_size: u32 = env.required_parsed(c::WORLD_SIZE, "a positive integer")?;
    if u64::from(world_size) != u64::from(nnodes) * u64::from(nproc_per_node) {
        return Err(invalid(
            c::WORLD_SIZE,
            &world_size.to_string(),
            format!(
                "must equal NNODES × NPROC_PER_NODE = {nnodes} × {nproc_per_node} = {}",
                u64::from(nnodes) * u64::from(nproc_per_node)
            ),
        ));
    }
    let (job, progress) = job_and_progress(env, kind)?;
    Ok(LaunchEnv {
        rendezvous,
        nnodes,
        node_rank,
        nproc_per_node,
        world_size,
        job,
        progress,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use super::*;

    pub(crate) fn lookup(pairs: &[(&str, &str)]) -> Lookup<impl Fn(&str) -> Option<String>> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Lookup(move |name: &str| map.get(name).cloned())
    }

    const POD: &[(&str, &str)] = &[
        ("MASTER_ADDR", "vitl-a3-0.vitl.ml.svc"),
        ("MASTER_PORT", "29500"),
        ("NNODES", "2"),
        ("NODE_RANK", "1"),
        ("NPROC_PER_NODE", "8"),
        ("WORLD_SIZE", "16"),
        ("DINOFLOW_JOB", "vitl"),
        ("DINOFLOW_NAMESPACE", "ml"),
        ("DINOFLOW_JOB_KIND", "PretrainJob"),
        ("DINOFLOW_RUN_ATTEMPT", "3"),
        (
            "DINOFLOW_PROGRESS_ENDPOINT",
            "http://dinoflow-operator.dinoflow-system.svc:9090",
        ),
        ("DINOFLOW_PROGRESS_TOKEN", "secret"),
        ("DINOFLOW_CONFIG", "/etc/dinoflow/config.yaml"),
    ];

    fn without(name: &str) -> Vec<(&'static str, &'static str)> {
        POD.iter().copied().filter(|(k, _)| *k != name).collect()
    }

    fn with(name: &'static str, value: &'static str) -> Vec<(&'static str, &'static str)> {
        let mut v = without(name);
        v.push((name, value));
        v
    }

    #[test]
    fn the_operators_pod_env_parses_into_the_typed_contract() {
        let env = launch_env(&lookup(POD), JobKind::Pretrain).unwrap();
        assert_eq!(env.rendezvous.master_addr, "vitl-a3-0.vitl.ml.svc");
        assert_eq!(env.rendezvous.master_port, 29500);
        assert_eq!((env.nnodes, env.node_rank), (2, 1));
        assert_eq!((env.nproc_per_node, env.world_size), (8, 16));
        assert_eq!(env.global_rank(0), 8);
        assert_eq!(env.global_rank(7), 15);
        let job = env.job.unwrap();
        assert_eq!(
            (job.namespace.as_str(), job.name.as_str(), job.run_attempt),
            ("ml", "vitl", 3)
        );
        let progress = env.progress.unwrap();
        assert_eq!(progress.token, "secret");
        assert!(!format!("{progress:?}").contains("secret"));
    }

    #[test]
    fn every_rendezvous_variable_is_required_and_named_when_missing() {
        for name in [
            "MASTER_ADDR",
            "MASTER_PORT",
            "NNODES",
            "NODE_RANK",
            "NPROC_PER_NODE",
            "WORLD_SIZE",
        ] {
            let err = launch_env(&lookup(&without(name)), JobKind::Pretrain).unwrap_err();
            assert_eq!(err.name(), name);
            assert!(err.to_string().contains(name), "{err}");
            assert!(err.to_string().contains("operator"), "{err}");
        }
    }

    #[test]
    fn a_cpu_pod_with_zero_processes_per_node_runs_one() {
        let env = launch_env(
            &lookup(&[
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", "29500"),
                ("NNODES", "1"),
                ("NODE_RANK", "0"),
                ("NPROC_PER_NODE", "0"),
                ("WORLD_SIZE", "1"),
            ]),
            JobKind::Pretrain,
        )
        .unwrap();
        assert_eq!(env.nproc_per_node, 1);
        assert!(env.job.is_none() && env.progress.is_none());
    }

    #[test]
    fn inconsistent_sizes_are_rejected_naming_the_variable() {
        let err = launch_env(&lookup(&with("WORLD_SIZE", "12")), JobKind::Pretrain).unwrap_err();
        assert_eq!(err.name(), "WORLD_SIZE");
        assert!(err.to_string().contains("2 × 8 = 16"), "{err}");
        let err = launch_env(&lookup(&with("NODE_RANK", "2")), JobKind::Pretrain).unwrap_err();
        assert_eq!(err.name(), "NODE_RANK");
        let err = launch_env(&lookup(&with("MASTER_PORT", "http")), JobKind::Pretrain).unwrap_err();
        assert!(err.to_string().contains("TCP port"), "{err}");
        let err = launch_env(&lookup(&with("NNODES", "-1")), JobKind::Pretrain).unwrap_err();
        assert_eq!(err.name(), "NNODES");
    }

    const CA: &str = include_str!("../../tests/data/tls/ca.crt");

    #[test]
    fn an_https_endpoint_needs_a_valid_ca_and_a_ca_never_goes_with_plaintext() {
        let https = with(
            "DINOFLOW_PROGRESS_ENDPOINT",
            "https://dinoflow-operator.dinoflow-system.svc:9090",
        );
        let err = launch_env(&lookup(&https), JobKind::Pretrain).unwrap_err();
        assert_eq!(err.name(), "DINOFLOW_PROGRESS_CA");
        assert!(err.to_string().contains("ca.crt"), "{err}");
        let mut good = https.clone();
        good.push(("DINOFLOW_PROGRESS_CA", CA));
        let env = launch_env(&lookup(&good), JobKind::Pretrain).unwrap();
        assert_eq!(env.progress.unwrap().ca.as_deref(), Some(CA));
        let mut garbled = https.clone();
        garbled.push((
            "DINOFLOW_PROGRESS_CA",
            "-----BEGIN CERTIFICATE-----\nAAAA\n",
        ));
        let err = launch_env(&lookup(&garbled), JobKind::Pretrain).unwrap_err();
        assert_eq!(err.name(), "DINOFLOW_PROGRESS_CA");
        let mut not_pem = https;
        not_pem.push(("DINOFLOW_PROGRESS_CA", "secret"));
        let err = launch_env(&lookup(&not_pem), JobKind::Pretrain).unwrap_err();
        assert!(err.to_string().contains("BEGIN CERTIFICATE"), "{err}");
        // The POD fixture's endpoint is http://: with a CA that is refused, not downgraded.
        let err = launch_env(
            &lookup(&with("DINOFLOW_PROGRESS_CA", CA)),
            JobKind::Pretrain,
        )
        .unwrap_err();
        assert_eq!(err.name(), "DINOFLOW_PROGRESS_CA");
        assert!(err.to_string().contains("TLS only"), "{err}");
    }

    #[test]
    fn progress_reporting_needs_a_token_job_and_url() {
        let err = launch_env(
            &lookup(&without("DINOFLOW_PROGRESS_TOKEN")),
            JobKind::Pretrain,
        )
        .unwrap_err();
        assert_eq!(err.name(), "DINOFLOW_PROGRESS_TOKEN");
        let err = launch_env(
            &lookup(&with("DINOFLOW_PROGRESS_ENDPOINT", "operator:9090")),
            JobKind::Pretrain,
        )
        .unwrap_err();
        assert_eq!(err.name(), "DINOFLOW_PROGRESS_ENDPOINT");
        let err = launch_env(&lookup(&without("DINOFLOW_JOB")), JobKind::Pretrain).unwrap_err();
        assert_eq!(err.name(), "DINOFLOW_JOB");
        let err = launch_env(
            &lookup(&with("DINOFLOW_RUN_ATTEMPT", "x")),
            JobKind::Pretrain,
        )
        .unwrap_err();
        assert_eq!(err.name(), "DINOFLOW_RUN_ATTEMPT");
    }

    #[test]
    fn the_job_kind_defaults_from_the_subcommand() {
        let env = launch_env(&lookup(&without("DINOFLOW_JOB_KIND")), JobKind::Distill).unwrap();
        assert_eq!(env.job.unwrap().kind, JobKind::Distill);
        let err = launch_env(
            &lookup(&with("DINOFLOW_JOB_KIND", "Job")),
            JobKind::Pretrain,
        )
        .unwrap_err();
        assert_eq!(err.name(), "DINOFLOW_JOB_KIND");
    }
}
