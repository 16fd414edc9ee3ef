//! `dinoflow-node-agent`: the local node agent as a process, for scripts/demo.sh. Registers a
//! Node with the cluster of `--kubeconfig` and runs the pods scheduled to it as local processes
//! (see the `dinoflow_node_agent` library for what that means, path mapping included) until
//! SIGINT or SIGTERM, then ends them and removes the Node.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use dinoflow_node_agent::{AgentConfig, Capacity, NodeAgent};
use kube::config::{KubeConfigOptions, Kubeconfig};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Runs the pods scheduled to a local Node as host processes"
)]
struct Args {
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// Name of the Node to register.
    #[arg(long, default_value = "dinoflow-local")]
    node_name: String,
    /// Per-pod directories (volumes, logs) and claim directories go here.
    #[arg(long)]
    root: PathBuf,
    /// Run container command NAME as the executable PATH (repeatable), e.g.
    /// `--binary dinoflow-trainer=target/debug/dinoflow-trainer`.
    #[arg(long = "binary", value_name = "NAME=PATH")]
    binaries: Vec<String>,
    /// Extra Node label KEY=VALUE (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// GPUs the Node offers (`nvidia.com/gpu`); this agent does not isolate them.
    #[arg(long, default_value_t = 0)]
    gpus: u32,
}

fn pair(s: &str, flag: &str) -> Result<(String, String)> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => bail!("--{flag} {s:?}: expected NAME=VALUE"),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let kubeconfig = Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("reading kubeconfig {}", args.kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .context("kubeconfig")?;
    let client = kube::Client::try_from(config)?;
    let root = std::path::absolute(&args.root)?;
    let mut config = AgentConfig::new(&args.node_name, root);
    config.capacity = Capacity::of_host(args.gpus);
    for b in &args.binaries {
        let (name, path) = pair(b, "binary")?;
        let path = std::path::absolute(&path)?;
        if !path.is_file() {
            bail!("--binary {name}={}: no such file", path.display());
        }
        config = config.binary(name, path);
    }
    for l in &args.labels {
        let (k, v) = pair(l, "label")?;
        config = config.label(k, v);
    }
    let agent = NodeAgent::start(client, config).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    eprintln!(
        "[node-agent] stopping: ending pod processes, removing node {}",
        agent.node_name()
    );
    agent.stop().await?;
    Ok(())
}
