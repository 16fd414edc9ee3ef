//! `/healthz`, `/readyz` and `/metrics` over HTTP.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::leader::Leadership;
use crate::metrics::Metrics;

/// Readiness shared between the controllers and the probe server: ready means this replica
/// leads and its caches have synced. A standby is not ready, so the Service in front of the
/// progress endpoint sends trainers only to the leader, the one replica that serves them.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    synced: Arc<AtomicBool>,
    // Unset: no leader election (a single replica always leads).
    leadership: Arc<OnceLock<Leadership>>,
}

impl Readiness {
    /// Marks the operator's caches synced (or not).
    pub fn set_ready(&self, ready: bool) {
        self.synced.store(ready, Ordering::Release);
    }

    /// Makes readiness follow `leadership` from now on (set once, at start-up).
    pub fn follow(&self, leadership: Leadership) {
        let _ = self.leadership.set(leadership);
    }

    pub fn is_ready(&self) -> bool {
        self.not_ready_reason().is_none()
    }

    fn not_ready_reason(&self) -> Option<&'static str> {
        if self.leadership.get().is_some_and(|l| !l.is_leader()) {
            Some("not the leader")
        } else if !self.synced.load(Ordering::Acquire) {
            Some("caches not synced")
        } else {
            None
        }
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    ready: Readiness,
}

/// The probe and metrics routes.
pub fn router(metrics: Metrics, ready: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { metrics, ready })
}

async fn readyz(State(s): State<AppState>) -> (StatusCode, &'static str) {
    match s.ready.not_ready_reason() {
        None => (StatusCode::OK, "ready"),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

async fn metrics_text(State(s): State<AppState>) -> String {
    s.metrics.render()
}

/// Serves the routes on `addr` until `shutdown` is cancelled.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    ready: Readiness,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /healthz /readyz /metrics");
    axum::serve(listener, router(metrics, ready))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get_path(addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn readyz_turns_ready_and_metrics_are_served() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ready = Readiness::default();
        let metrics = Metrics::default();
        drop(metrics.reconcile_started("PretrainJob"));
        let app = router(metrics, ready.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        assert!(get_path(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get_path(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        ready.set_ready(true);
        assert!(get_path(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(
            get_path(addr, "/metrics")
                .await
                .contains("dinoflow_operator_reconciles_total")
        );
    }

    #[tokio::test]
    async fn a_standby_is_not_ready_even_with_synced_caches() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ready = Readiness::default();
        let (tx, rx) = tokio::sync::watch::channel(false);
        ready.follow(Leadership::from_receiver(rx));
        ready.set_ready(true);
        let app = router(Metrics::default(), ready.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let standby = get_path(addr, "/readyz").await;
        assert!(standby.starts_with("HTTP/1.1 503"), "{standby}");
        assert!(standby.contains("not the leader"), "{standby}");
        tx.send(true).unwrap();
        assert!(get_path(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        // Deposed: not ready at once, before the process has shut its controllers down.
        tx.send(false).unwrap();
        assert!(get_path(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
    }
}
