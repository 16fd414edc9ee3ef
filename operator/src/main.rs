//! `dinoflow-operator`: reconciles PretrainJob and DistillJob into gangs of pods.

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use dinoflow_operator::controller;
use dinoflow_operator::health::{self, Readiness};
use dinoflow_operator::leader::{self, Leadership, LeaseTiming};
use dinoflow_operator::metrics::Metrics;
use dinoflow_operator::progress::{KubeJobStore, ProgressService};
use dinoflow_operator::settings::{Args, LogFormat, Settings};
use dinoflow_operator::tls;
use kube::Client;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    init_tracing(args.log_format);
    // Before anything else: a bad or missing certificate is a configuration error to show first.
    let progress_tls = args.progress_tls()?;
    if progress_tls.is_none() {
        tracing::warn!(
            endpoint = %args.progress_endpoint,
            "--progress-plaintext: the progress endpoint serves WITHOUT TLS; job tokens and \
             status cross the network in the clear (local runs and tests only)"
        );
    }

    let client = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            let config =
                kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
            Client::try_from(config)?
        }
        None => Client::try_default()
            .await
            .context("no kubeconfig and not in a cluster")?,
    };
    let progress_key = match (&args.progress_key_file, &args.progress_key) {
        (Some(path), _) => std::fs::read(path)
            .with_context(|| format!("reading --progress-key-file {}", path.display()))?,
        (None, Some(key)) => key.clone().into_bytes(),
        (None, None) => bail!(
            "no progress key: set --progress-key-file (or DINOFLOW_PROGRESS_KEY_FILE) to a file with a random secret; \
             per-job tokens are derived from it and must survive operator restarts"
        ),
    };
    if progress_key.len() < 16 {
        bail!("the progress key must be at least 16 bytes");
    }
    let settings = Settings {
        default_image: args.default_image.clone(),
        progress_endpoint: args.progress_endpoint.clone(),
        progress_key,
        progress_ca: progress_tls.as_ref().map(|t| t.ca_pem.clone()),
    };

    let shutdown = CancellationToken::new();
    tokio::spawn(signal_handler(shutdown.clone()));
    let metrics = Metrics::default();
    let readiness = Readiness::default();
    let health = tokio::spawn(health::serve(
        args.health_addr,
        metrics.clone(),
        readiness.clone(),
        shutdown.clone(),
    ));

    let (mut leadership, election) = if args.leader_elect {
        let identity = args.identity.clone().unwrap_or_else(default_identity);
        let timing =
            LeaseTiming::for_duration(std::time::Duration::from_secs(args.lease_duration_seconds));
        let (leadership, election) = leader::elect(
            client.clone(),
            &args.lease_namespace,
            &args.lease_name,
            &identity,
            timing,
        )
        .await?;
        readiness.follow(leadership.clone());
        tracing::info!(%identity, lease = %args.lease_name, "waiting to become leader");
        (leadership, Some(election))
    } else {
        (Leadership::always(), None)
    };
    tokio::select! {
        _ = leadership.acquired() => { tracing::info!("leading"); metrics.leader.set(1); }
        _ = shutdown.cancelled() => {
            if let Some(election) = election { election.release().await; }
            let _ = health.await;
            return Ok(());
        }
    }

    let progress = ProgressService::new(
        KubeJobStore::new(client.clone()),
        settings.progress_key.clone(),
        leadership.clone(),
        metrics.clone(),
    );
    let progress_addr = args.progress_addr;
    let progress_shutdown = shutdown.clone();
    let mut progress_builder = tls::server(progress_tls.as_ref())?;
    let tls_on = progress_tls.is_some();
    let progress_server = tokio::spawn(async move {
        tracing::info!(addr = %progress_addr, tls = tls_on, "serving the progress endpoint");
        progress_builder
            .add_service(progress.into_server())
            .serve_with_shutdown(progress_addr, progress_shutdown.cancelled_owned())
            .await
    });

    let mut lost = leadership.clone();
    let lost_shutdown = shutdown.clone();
    let lost_metrics = metrics.clone();
    let lost_lease = tokio::spawn(async move {
        tokio::select! {
            _ = lost.lost() => { tracing::error!("lost the leader lease; stopping"); lost_metrics.leader.set(0); lost_shutdown.cancel(); true }
            _ = lost_shutdown.cancelled() => false,
        }
    });

    let scope = controller::Scope {
        namespace: args.watch_namespace.clone(),
    };
    let parts = controller::Parts {
        client,
        settings,
        metrics,
        leadership,
        readiness: readiness.clone(),
        scope,
    };
    let tuning = controller::Tuning {
        concurrency: args.max_concurrent_reconciles,
    };
    controller::run_tuned::<dinoflow_api::PretrainJob, dinoflow_api::DistillJob>(
        parts,
        tuning,
        shutdown.clone(),
    )
    .await;
    readiness.set_ready(false);
    shutdown.cancel();
    let lost = lost_lease.await?;
    // Hand the Lease over now rather than making the next leader wait out its duration.
    if let Some(election) = election {
        election.release().await;
    }
    progress_server.await?.context("progress endpoint")?;
    health.await?.context("health endpoint")?;
    if lost {
        // Exit non-zero so the Deployment restarts this replica as a fresh candidate.
        bail!("lost the leader lease");
    }
    tracing::info!("shut down cleanly");
    Ok(())
}

fn default_identity() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "dinoflow-operator".into());
    format!("{host}-{:08x}", rand::random::<u32>())
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Cancels `token` on SIGINT or SIGTERM (what Kubernetes sends before killing the pod).
async fn signal_handler(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    token.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
    token.cancel();
}
