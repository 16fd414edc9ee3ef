//! `kubectl dinoflow`: a terminal view of PretrainJobs and DistillJobs (a kubectl plugin:
//! kubectl runs any `kubectl-dinoflow` on the PATH for `kubectl dinoflow ...`).
//!
//! `status JOB`, `watch JOB`, `logs JOB [--rank N]`, `checkpoints JOB`; `-o json` for
//! scripts. Everything shown comes from the job object (its status, written by the operator
//! and the trainer's progress reports) and, for `logs`, the pods' logs through the API server.
mod view;

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use dinoflow_api::contract::{LABEL_JOB, LABEL_JOB_KIND, LABEL_NODE_RANK, LABEL_RUN_ATTEMPT};
use dinoflow_api::status::JobStatus;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DynamicObject, ListParams, LogParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};

use view::Job;

#[derive(Parser, Debug)]
#[command(
    name = "kubectl-dinoflow",
    about = "Status, progress, evaluations, checkpoints and logs of Dinoflow jobs"
)]
struct Args {
    /// Namespace of the job (default: the kubeconfig context's, else `default`).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// Kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Phase, progress bar with ETA, throughput, last checkpoint, restarts, evaluations.
    Status { job: String },
    /// `status` again whenever the job changes, until it succeeds or fails (`-o json`: one
    /// JSON line per change).
    Watch {
        job: String,
        /// Seconds between reads of the job.
        #[arg(long, default_value_t = 2.0)]
        interval: f64,
    },
    /// Logs of the job's pod of node rank N in its current attempt.
    Logs {
        job: String,
        #[arg(long, default_value_t = 0)]
        rank: u32,
        /// Attempt whose pod to read (default: the current one).
        #[arg(long)]
        attempt: Option<i32>,
        /// Only the last N lines.
        #[arg(long)]
        tail: Option<i64>,
    },
    /// Checkpoint policy, the last verified checkpoint and the next one due.
    Checkpoints { job: String },
}

#[tokio::main]
async fn main() {
    if let Err(e) = run(Args::parse()).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<()> {
    let (client, default_ns) = connect(args.kubeconfig.as_deref()).await?;
    let ns = args.namespace.clone().unwrap_or(default_ns);
    let mut out = std::io::stdout().lock();
    match &args.command {
        Command::Status { job } => {
            let job = get_job(&client, &ns, job).await?;
            let v = job.status_view(Timestamp::now());
            match args.output {
                Output::Text => write!(out, "{}", view::render_status(&v))?,
                Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?,
            }
        }
        Command::Watch { job, interval } => {
            if !(interval.is_finite() && *interval > 0.0) {
                bail!("--interval must be a positive number of seconds, got {interval}");
            }
            let mut last: Option<JobStatus> = None;
            loop {
                let j = get_job(&client, &ns, job).await?;
                if last.as_ref() != Some(&j.status) {
                    let v = j.status_view(Timestamp::now());
                    match args.output {
                        Output::Text => {
                            writeln!(out, "--- {}", Timestamp::now())?;
                            write!(out, "{}", view::render_status(&v))?;
                        }
                        Output::Json => writeln!(out, "{}", serde_json::to_string(&v)?)?,
                    }
                    out.flush()?;
                    last = Some(j.status.clone());
                }
                if j.status.phase().is_finished() {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_secs_f64(*interval)).await;
            }
        }
        Command::Logs {
            job,
            rank,
            attempt,
            tail,
        } => {
            let j = get_job(&client, &ns, job).await?;
            let attempt = attempt.unwrap_or(j.status.run_attempt.unwrap_or(0));
            let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
            // The kind too: a PretrainJob and a DistillJob may share the name.
            let selector = format!(
                "{LABEL_JOB}={},{LABEL_JOB_KIND}={},{LABEL_RUN_ATTEMPT}={attempt},{LABEL_NODE_RANK}={rank}",
                j.name, j.kind
            );
            let found = pods.list(&ListParams::default().labels(&selector)).await?;
            let Some(pod) = found.items.first() else {
                bail!(
                    "no pod of {}/{} with node rank {rank} in attempt {attempt} (selector {selector}); \
                     the job has {} node(s) and is at attempt {}",
                    ns,
                    j.name,
                    j.spec["cluster"]["nodes"].as_i64().unwrap_or(1),
                    j.status.run_attempt.unwrap_or(0)
                );
            };
            let params = LogParams {
                tail_lines: *tail,
                ..LogParams::default()
            };
            let text = pods
                .logs(&pod.name_any(), &params)
                .await
                .with_context(|| format!("reading the logs of pod {}", pod.name_any()))?;
            match args.output {
                Output::Text => write!(out, "{text}")?,
                Output::Json => writeln!(
                    out,
                    "{}",
                    serde_json::json!({"pod": pod.name_any(), "attempt": attempt, "rank": rank, "log": text})
                )?,
            }
        }
        Command::Checkpoints { job } => {
            let job = get_job(&client, &ns, job).await?;
            let v = job.checkpoints_view(Timestamp::now());
            match args.output {
                Output::Text => write!(out, "{}", view::render_checkpoints(&v))?,
                Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?,
            }
        }
    }
    Ok(())
}

/// A client for `kubeconfig` (else the usual inference) and the context's namespace.
async fn connect(kubeconfig: Option<&std::path::Path>) -> Result<(Client, String)> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default()).await?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig found (set --kubeconfig or KUBECONFIG)")?,
    };
    let ns = config.default_namespace.clone();
    Ok((Client::try_from(config)?, ns))
}

/// The job named `name`: a PretrainJob, else a DistillJob.
async fn get_job(client: &Client, ns: &str, name: &str) -> Result<Job> {
    for (kind, plural) in [
        ("PretrainJob", "pretrainjobs"),
        ("DistillJob", "distilljobs"),
    ] {
        let gvk = GroupVersionKind::gvk("dinoflow.dev", "v1alpha1", kind);
        let resource = ApiResource::from_gvk_with_plural(&gvk, plural);
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &resource);
        if let Some(obj) = api
            .get_opt(name)
            .await
            .with_context(|| format!("reading {plural} in namespace {ns}"))?
        {
            let status: JobStatus = match obj.data.get("status") {
                Some(s) => serde_json::from_value(s.clone())
                    .with_context(|| format!("the status of {kind} {ns}/{name}"))?,
                None => JobStatus::default(),
            };
            return Ok(Job {
                kind: kind.to_string(),
                namespace: ns.to_string(),
                name: name.to_string(),
                spec: obj.data.get("spec").cloned().unwrap_or_default(),
                status,
            });
        }
    }
    bail!("no PretrainJob or DistillJob named {name} in namespace {ns}")
}
