//! Observability of a run: Prometheus metrics (`dinoflow_trainer_*`) served over HTTP, a
//! JSON-lines metrics file in the output directory, and the periodic progress log line.
use std::fs::{File, OpenOptions};
use std::future::IntoFuture;
use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::Instant;

use prometheus::{Encoder, Gauge, GaugeVec, IntCounter, IntGauge, Opts, Registry, TextEncoder};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "cannot serve metrics on {addr}: {reason}. Set training.logging.metricsPort to a free port (0 picks one)"
    )]
    Bind { addr: SocketAddr, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Prometheus(#[from] prometheus::Error),
}

/// The trainer's gauges and counters, registered in their own registry.
#[derive(Debug, Clone)]
pub struct TrainerMetrics {
    pub registry: Registry,
    pub iteration: IntGauge,
    pub total_iterations: IntGauge,
    /// One series per loss term (`dino_local_crops_loss`, `ibot_loss`, `koleo_loss`, `total`).
    pub loss: GaugeVec,
    pub lr: Gauge,
    pub weight_decay: Gauge,
    pub teacher_momentum: Gauge,
    pub teacher_temperature: Gauge,
    pub images_per_second: Gauge,
    /// Without labels, and a vector only so that the series is absent (not 0) until
    /// [`set_mfu`](Self::set_mfu) is called: unknown peak FLOP/s means no estimate.
    pub mfu: GaugeVec,
    pub memory_bytes: Gauge,
    pub data_wait_seconds_total: prometheus::Counter,
    pub checkpoint_age_seconds: Gauge,
    pub checkpoint_iteration: IntGauge,
    pub skipped_images_total: IntCounter,
    /// Evaluation results, one series per metric (`knn_top1_k20`, `linear_top1`, ...).
    pub eval: GaugeVec,
}

impl TrainerMetrics {
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let opts = |name: &str, help: &str| Opts::new(format!("dinoflow_trainer_{name}"), help);
        let m = Self {
            iteration: IntGauge::with_opts(opts("iteration", "Current training iteration"))?,
            total_iterations: IntGauge::with_opts(opts(
                "total_iterations",
                "Iterations the run will do in total",
            ))?,
            loss: GaugeVec::new(opts("loss", "Latest value of each loss term"), &["term"])?,
            lr: Gauge::with_opts(opts("lr", "Learning rate of the backbone parameter group"))?,
            weight_decay: Gauge::with_opts(opts("weight_decay", "Weight decay"))?,
            teacher_momentum: Gauge::with_opts(opts(
                "teacher_momentum",
                "EMA momentum of the teacher",
            ))?,
            teacher_temperature: Gauge::with_opts(opts(
                "teacher_temperature",
                "Teacher softmax temperature",
            ))?,
            images_per_second: Gauge::with_opts(opts(
                "images_per_second",
                "Training throughput over the last logging window (all ranks)",
            ))?,
            mfu: GaugeVec::new(
                opts(
                    "mfu",
                    "Estimated model FLOPs utilisation (0..1); absent when peak FLOP/s are unknown",
                ),
                &[],
            )?,
            memory_bytes: Gauge::with_opts(opts(
                "memory_bytes",
                "Resident memory of the trainer process",
            ))?,
            data_wait_seconds_total: prometheus::Counter::with_opts(opts(
                "data_wait_seconds_total",
                "Time the training loop waited for the data loader",
            ))?,
            checkpoint_age_seconds: Gauge::with_opts(opts(
                "checkpoint_age_seconds",
                "Seconds since the last checkpoint was written (since start if none)",
            ))?,
            checkpoint_iteration: IntGauge::with_opts(opts(
                "checkpoint_iteration",
                "Iteration of the last written checkpoint",
            ))?,
            skipped_images_total: IntCounter::with_opts(opts(
                "skipped_images_total",
                "Images skipped because they could not be decoded",
            ))?,
            eval: GaugeVec::new(opts("eval", "Latest evaluation results"), &["metric"])?,
            registry,
        };
        let r = &m.registry;
        r.register(Box::new(m.iteration.clone()))?;
        r.register(Box::new(m.total_iterations.clone()))?;
        r.register(Box::new(m.loss.clone()))?;
        r.register(Box::new(m.lr.clone()))?;
        r.register(Box::new(m.weight_decay.clone()))?;
        r.register(Box::new(m.teacher_momentum.clone()))?;
        r.register(Box::new(m.teacher_temperature.clone()))?;
        r.register(Box::new(m.images_per_second.clone()))?;
        r.register(Box::new(m.mfu.clone()))?;
        r.register(Box::new(m.memory_bytes.clone()))?;
        r.register(Box::new(m.data_wait_seconds_total.clone()))?;
        r.register(Box::new(m.checkpoint_age_seconds.clone()))?;
        r.register(Box::new(m.checkpoint_iteration.clone()))?;
        r.register(Box::new(m.skipped_images_total.clone()))?;
        r.register(Box::new(m.eval.clone()))?;
        Ok(m)
    }

    /// The text exposition format of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("encoding into a Vec cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }

    /// Sets the MFU estimate (the series exists from then on).
    pub fn set_mfu(&self, mfu: f64) {
        self.mfu.with_label_values::<&str>(&[]).set(mfu);
    }

    /// Raises the skipped-images counter to the loader's running total.
    pub fn set_skipped_images(&self, total: u64) {
        let seen = self.skipped_images_total.get();
        if total > seen {
            self.skipped_images_total.inc_by(total - seen);
        }
    }
}

/// Resident set size of this process in bytes (Linux); None elsewhere.
pub fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // Every Linux target we run on uses 4 KiB pages; reading the real value needs libc.
    Some(pages * 4096)
}

/// The HTTP endpoint serving `/metrics` (axum, the workspace's one HTTP stack) on a thread of
/// its own with a single-threaded tokio runtime, so a scrape never waits on the training loop
/// and the loop never waits on a scrape.
pub struct MetricsServer {
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    pub addr: SocketAddr,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl MetricsServer {
    /// Binds `addr` (port 0 picks a free port; [`addr`](Self::addr) is the bound one) and
    /// serves until dropped.
    pub fn start(addr: SocketAddr, metrics: TrainerMetrics) -> Result<Self, MetricsError> {
        let bind_error = |reason: String| MetricsError::Bind { addr, reason };
        // Bound here rather than on the server thread, so a taken port is this call's error.
        let listener = std::net::TcpListener::bind(addr).map_err(|e| bind_error(e.to_string()))?;
        let bound = listener
            .local_addr()
            .map_err(|e| bind_error(e.to_string()))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| bind_error(e.to_string()))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|e| bind_error(e.to_string()))?;
        let app = axum::Router::new()
            .route(
                "/metrics",
                axum::routing::get(move || {
                    if let Some(bytes) = resident_memory_bytes() {
                        metrics.memory_bytes.set(bytes as f64);
                    }
                    let body = metrics.render();
                    async move {
                        (
                            [(
                                axum::http::header::CONTENT_TYPE,
                                "text/plain; version=0.0.4",
                            )],
                            body,
                        )
                    }
                }),
            )
            .fallback(|| async {
                (
                    axum::http::StatusCode::NOT_FOUND,
                    "not found; try /metrics\n",
                )
            });
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("metrics-http".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => listener,
                        Err(e) => {
                            tracing::warn!("metrics endpoint on {bound} not served: {e}");
                            return;
                        }
                    };
                    // Stops at once on shutdown: dropping the runtime afterwards ends any
                    // connection still open, so dropping the server never waits on a client.
                    let serve = axum::serve(listener, app).into_future();
                    tokio::select! {
                        served = serve => {
                            if let Err(e) = served {
                                tracing::warn!("metrics endpoint on {bound} stopped: {e}");
                            }
                        }
                        _ = stopped => {}
                    }
                });
            })
            .map_err(|e| bind_error(e.to_string()))?;
        Ok(Self {
            shutdown: Some(shutdown),
            thread: Some(thread),
            addr: bound,
        })
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Appends one JSON object per line to `metrics.jsonl`; each line is flushed so a crash
/// loses at most the line being written.
#[derive(Debug)]
pub struct JsonlLog {
    out: BufWriter<File>,
    path: std::path::PathBuf,
}

impl JsonlLog {
    pub fn open(path: &Path) -> Result<Self, MetricsError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| MetricsError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            out: BufWriter::new(file),
            path: path.to_path_buf(),
        })
    }

    pub fn record(&mut self, value: &serde_json::Value) -> Result<(), MetricsError> {
        let io = |source| MetricsError::Io {
            path: self.path.clone(),
            source,
        };
        serde_json::to_writer(&mut self.out, value).map_err(|e| io(e.into()))?;
        self.out.write_all(b"\n").map_err(io)?;
        self.out.flush().map_err(io)
    }
}

/// Formats a progress line every `every` iterations: iteration/total, loss terms, lr,
/// images/s over the window since the previous line, ETA at that rate.
#[derive(Debug)]
pub struct Progress {
    every: u64,
    total: u64,
    window_start: Instant,
    window_images: u64,
}

/// What one progress line reports.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressLine {
    pub text: String,
    pub images_per_second: f64,
    pub eta_seconds: f64,
}

impl Progress {
    pub fn new(every: u64, total: u64) -> Self {
        Self {
            every: every.max(1),
            total,
            window_start: Instant::now(),
            window_images: 0,
        }
    }

    /// Counts `images` for iteration `iteration` (1-based, the number of finished
    /// iterations) and returns a line when one is due (also at the last iteration).
    pub fn on_iteration(
        &mut self,
        iteration: u64,
        images: u64,
        losses: &[(String, f64)],
        lr: f64,
    ) -> Option<ProgressLine> {
        self.window_images += images;
        if !iteration.is_multiple_of(self.every) && iteration != self.total {
            return None;
        }
        let elapsed = self.window_start.elapsed().as_secs_f64().max(1e-9);
        let images_per_second = self.window_images as f64 / elapsed;
        let iterations_in_window = (self.window_images as f64 / images.max(1) as f64).max(1.0);
        let seconds_per_iteration = elapsed / iterations_in_window;
        let eta_seconds = self.total.saturating_sub(iteration) as f64 * seconds_per_iteration;
        let terms: Vec<String> = losses.iter().map(|(k, v)| format!("{k}={v:.4}")).collect();
        let text = format!(
            "it {iteration}/{total} ({pct:.1}%) {terms} lr={lr:.3e} {ips:.1} img/s eta {eta}",
            total = self.total,
            pct = 100.0 * iteration as f64 / self.total.max(1) as f64,
            terms = terms.join(" "),
            ips = images_per_second,
            eta = format_duration(eta_seconds),
        );
        self.window_start = Instant::now();
        self.window_images = 0;
        Some(ProgressLine {
            text,
            images_per_second,
            eta_seconds,
        })
    }
}

/// `1h02m03s` style durations for log lines.
pub fn format_duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    let (h, m, s) = (s / 3600, (s % 3600) / 60, s % 60);
    if h > 0 {
        format!("{h}h{m:02}m{s:02}s")
    } else {
        format!("{m}m{s:02}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn every_metric_is_named_with_the_trainer_prefix() {
        let m = TrainerMetrics::new().unwrap();
        m.iteration.set(12);
        m.loss
            .with_label_values(&["dino_global_crops_loss"])
            .set(1.5);
        m.eval.with_label_values(&["knn_top1_k20"]).set(0.7);
        m.set_skipped_images(3);
        m.set_skipped_images(2);
        let text = m.render();
        assert!(
            !text.contains("dinoflow_trainer_mfu"),
            "no peak FLOP/s, no MFU: {text}"
        );
        m.set_mfu(0.25);
        let text = m.render();
        assert!(text.contains("dinoflow_trainer_mfu 0.25"), "{text}");
        assert!(text.contains("dinoflow_trainer_iteration 12"));
        assert!(text.contains("dinoflow_trainer_loss{term=\"dino_global_crops_loss\"} 1.5"));
        assert!(text.contains("dinoflow_trainer_skipped_images_total 3"));
        for family in m.registry.gather() {
            assert!(
                family.name().starts_with("dinoflow_trainer_"),
                "{}",
                family.name()
            );
        }
    }

    #[test]
    fn the_http_endpoint_serves_metrics_and_404_elsewhere() {
        let m = TrainerMetrics::new().unwrap();
        m.iteration.set(42);
        let server = MetricsServer::start("127.0.0.1:0".parse().unwrap(), m).unwrap();
        let get = |path: &str| {
            let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
            write!(
                stream,
                "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut body = String::new();
            stream.read_to_string(&mut body).unwrap();
            body
        };
        let ok = get("/metrics");
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("dinoflow_trainer_iteration 42"));
        assert!(get("/other").starts_with("HTTP/1.1 404"));
    }

    #[test]
    fn a_taken_port_is_a_clear_error() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = MetricsServer::start(addr, TrainerMetrics::new().unwrap()).unwrap_err();
        assert!(err.to_string().contains("metricsPort"), "{err}");
    }

    #[test]
    fn jsonl_lines_are_appended_across_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        JsonlLog::open(&path)
            .unwrap()
            .record(&serde_json::json!({"iteration": 1}))
            .unwrap();
        JsonlLog::open(&path)
            .unwrap()
            .record(&serde_json::json!({"iteration": 2}))
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["iteration"], 2);
    }

    #[test]
    fn progress_lines_come_every_n_iterations_and_at_the_end() {
        let mut p = Progress::new(10, 25);
        let losses = vec![("total".to_string(), 2.5)];
        let lines: Vec<u64> = (1..=25)
            .filter(|&it| p.on_iteration(it, 8, &losses, 1e-3).is_some())
            .collect();
        assert_eq!(lines, [10, 20, 25]);
    }

    #[test]
    fn progress_line_names_iteration_losses_lr_and_eta() {
        let mut p = Progress::new(1, 100);
        let line = p
            .on_iteration(50, 64, &[("dino".into(), 10.25)], 5e-4)
            .unwrap();
        assert!(
            line.text
                .starts_with("it 50/100 (50.0%) dino=10.2500 lr=5.000e-4"),
            "{}",
            line.text
        );
        assert!(line.text.contains("img/s eta"));
        assert!(line.images_per_second > 0.0);
    }

    #[test]
    fn durations_format_as_hours_minutes_seconds() {
        assert_eq!(format_duration(59.4), "0m59s");
        assert_eq!(format_duration(3723.0), "1h02m03s");
    }
}
