//! Observability of a run: Prometheus metrics (`dinoflow_trainer_*`) served over HTTP, a
//! JSON-lines metrics file in the output directory, and the periodic progress log line.
//! (Over 500 lines: every trainer series is declared and updated here, the one list the
//! chart's dashboards and alerts are checked against.)
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::future::IntoFuture;
use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus::core::Collector;
use prometheus::{
    Counter, CounterVec, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntGauge,
    Opts, Registry, TextEncoder,
};

use dinoflow_api::contract::JobKind;

use crate::env::JobIdentity;

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

/// Labels on every series of a trainer process, so one Prometheus tells the runs and ranks
/// apart. `job_name`, not `job`: Prometheus gives every scraped series a `job` label of its
/// own (the scrape job), and a target's `job` would be renamed to `exported_job`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunLabels {
    /// `DINOFLOW_NAMESPACE` (the job's namespace); unset outside a pod.
    pub namespace: Option<String>,
    /// `DINOFLOW_JOB` (the PretrainJob/DistillJob name); unset outside a pod.
    pub job_name: Option<String>,
    /// `DINOFLOW_JOB_KIND`, else the subcommand's kind (`PretrainJob`, `DistillJob`).
    pub kind: Option<String>,
    /// Global rank of the process serving the metrics (the pod's first process).
    pub rank: Option<usize>,
}

impl RunLabels {
    /// The labels of a process of `kind` with global rank `rank`, identified by the env
    /// contract (`env::job_and_progress`) when it runs in a job's pod.
    pub fn new(identity: Option<&JobIdentity>, kind: JobKind, rank: usize) -> Self {
        Self {
            namespace: identity.map(|i| i.namespace.clone()),
            job_name: identity.map(|i| i.name.clone()),
            kind: Some(identity.map_or(kind, |i| i.kind).as_str().to_string()),
            rank: Some(rank),
        }
    }

    fn to_map(&self) -> HashMap<String, String> {
        let mut map = HashMap::new();
        if let Some(rank) = self.rank {
            map.insert("rank".to_string(), rank.to_string());
        }
        for (name, value) in [
            ("namespace", &self.namespace),
            ("job_name", &self.job_name),
            ("kind", &self.kind),
        ] {
            if let Some(v) = value.as_ref().filter(|v| !v.is_empty()) {
                map.insert(name.to_string(), v.clone());
            }
        }
        map
    }
}

/// Bounds of the per-iteration duration histogram: a tiny CPU step takes milliseconds, a
/// ViT-g step on a slow interconnect seconds.
const ITERATION_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0,
];
/// Bounds of the checkpoint write histogram: kilobytes on a laptop to ViT-g optimiser state.
const CHECKPOINT_BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// The trainer's gauges, counters and histograms, registered in their own registry. Every
/// series carries the [`RunLabels`].
#[derive(Debug, Clone)]
pub struct TrainerMetrics {
    pub registry: Registry,
    pub iteration: IntGauge,
    pub total_iterations: IntGauge,
    /// Seconds to the last iteration at the throughput of the last logging window.
    pub eta_seconds: Gauge,
    /// `DINOFLOW_RUN_ATTEMPT`: the gang's attempt (restarts and disruptions so far).
    pub run_attempt: IntGauge,
    pub start_time_seconds: Gauge,
    /// One series per loss term (`dino_local_crops_loss`, `ibot_loss`, `koleo_loss`, `total`).
    pub loss: GaugeVec,
    pub lr: Gauge,
    pub weight_decay: Gauge,
    pub teacher_momentum: Gauge,
    pub teacher_temperature: Gauge,
    pub images_per_second: Gauge,
    /// Images trained on, all ranks together.
    pub images_total: IntCounter,
    /// Wall time of each training iteration (data wait + compute), without evaluation and
    /// checkpoint writes.
    pub iteration_duration_seconds: Histogram,
    pub data_wait_seconds_total: Counter,
    /// Forward, backward, gradient all-reduce, optimizer and teacher EMA update.
    pub compute_seconds_total: Counter,
    /// The compute split by `phase` (`forward`, `backward`, `communication`, `optimizer`);
    /// CPU runs only (`meta_arch::StepPhases` says why).
    pub step_phase_seconds_total: CounterVec,
    /// Batches the loader has ready, sampled before each step takes its batch.
    pub loader_queue_depth: IntGauge,
    /// Without labels, and a vector only so that the series is absent (not 0) until
    /// [`set_mfu`](Self::set_mfu) is called: unknown peak FLOP/s means no estimate.
    pub mfu: GaugeVec,
    pub memory_bytes: Gauge,
    /// Gradient and optimizer-state bytes this rank holds, by `kind` (`gradients`,
    /// `optimizer_state`): what `training.sharding` divides by the world size.
    pub training_state_bytes: GaugeVec,
    /// Memory of the device the model trains on, by `device` and `state` (`allocated`,
    /// `peak`); see [`record_memory`](Self::record_memory).
    pub device_memory_bytes: GaugeVec,
    pub checkpoint_age_seconds: Gauge,
    pub checkpoint_iteration: IntGauge,
    /// A vector without labels so that it is absent until the first checkpoint is written.
    pub last_checkpoint_timestamp_seconds: GaugeVec,
    pub checkpoint_write_duration_seconds: Histogram,
    pub checkpoint_size_bytes: Gauge,
    pub skipped_images_total: IntCounter,
    /// Top-k accuracies of the latest evaluation as a ratio, one series per metric
    /// (`knn_top1_k20`, `knn_top5_k20`, `linear_top1`, ...).
    pub eval_accuracy: GaugeVec,
    pub eval_iteration: IntGauge,
    pub eval_duration_seconds: Gauge,
}

impl TrainerMetrics {
    /// Metrics without run labels (tests, tools).
    pub fn new() -> Result<Self, MetricsError> {
        Self::with_labels(&RunLabels::default())
    }

    /// Metrics whose every series carries `labels`.
    pub fn with_labels(labels: &RunLabels) -> Result<Self, MetricsError> {
        let registry = Registry::new_custom(None, Some(labels.to_map()))?;
        let opts = |name: &str, help: &str| Opts::new(format!("dinoflow_trainer_{name}"), help);
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            Histogram::with_opts(
                HistogramOpts::new(format!("dinoflow_trainer_{name}"), help)
                    .buckets(buckets.to_vec()),
            )
        };
        let m = Self {
            iteration: IntGauge::with_opts(opts("iteration", "Current training iteration"))?,
            total_iterations: IntGauge::with_opts(opts(
                "total_iterations",
                "Iterations the run will do in total",
            ))?,
            eta_seconds: Gauge::with_opts(opts(
                "eta_seconds",
                "Estimated seconds to the last iteration at the last window's throughput",
            ))?,
            run_attempt: IntGauge::with_opts(opts(
                "run_attempt",
                "Attempt of the gang (DINOFLOW_RUN_ATTEMPT): restarts and disruptions so far",
            ))?,
            start_time_seconds: Gauge::with_opts(opts(
                "start_time_seconds",
                "Unix time the trainer process started",
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
            images_total: IntCounter::with_opts(opts(
                "images_total",
                "Images trained on since the process started (all ranks)",
            ))?,
            iteration_duration_seconds: histogram(
                "iteration_duration_seconds",
                "Wall time of a training iteration (data wait and compute)",
                &ITERATION_BUCKETS,
            )?,
            data_wait_seconds_total: Counter::with_opts(opts(
                "data_wait_seconds_total",
                "Time the training loop waited for the data loader",
            ))?,
            compute_seconds_total: Counter::with_opts(opts(
                "compute_seconds_total",
                "Time in the training step: forward, backward, all-reduce, optimizer, teacher EMA",
            ))?,
            step_phase_seconds_total: CounterVec::new(
                opts(
                    "step_phase_seconds_total",
                    "Time in each phase of the training step (forward, backward, communication, optimizer); CPU runs only",
                ),
                &["phase"],
            )?,
            loader_queue_depth: IntGauge::with_opts(opts(
                "loader_queue_depth",
                "Batches the data loader has ready, sampled before each step takes one (0: the step waits)",
            ))?,
            mfu: GaugeVec::new(
                opts(
                    "mfu_ratio",
                    "Estimated model FLOPs utilisation (0..1); absent when peak FLOP/s are unknown",
                ),
                &[],
            )?,
            memory_bytes: Gauge::with_opts(opts(
                "memory_bytes",
                "Resident memory of the trainer process",
            ))?,
            training_state_bytes: GaugeVec::new(
                opts(
                    "training_state_bytes",
                    "Gradient and optimizer-state bytes this rank holds (sharded or replicated), by part",
                ),
                // Not `kind`: every series carries the run label `kind` (PretrainJob, ...), and
                // Prometheus refuses a whole scrape with a label name twice in one sample.
                &["part"],
            )?,
            device_memory_bytes: GaugeVec::new(
                opts(
                    "device_memory_bytes",
                    "Memory of the training device by state (allocated, peak); on the CPU the process's resident memory",
                ),
                &["device", "state"],
            )?,
            checkpoint_age_seconds: Gauge::with_opts(opts(
                "checkpoint_age_seconds",
                "Seconds since the last checkpoint was written (since start if none)",
            ))?,
            checkpoint_iteration: IntGauge::with_opts(opts(
                "checkpoint_iteration",
                "Iteration of the last written checkpoint",
            ))?,
            last_checkpoint_timestamp_seconds: GaugeVec::new(
                opts(
                    "last_checkpoint_timestamp_seconds",
                    "Unix time the last checkpoint of this process was written; absent before",
                ),
                &[],
            )?,
            checkpoint_write_duration_seconds: histogram(
                "checkpoint_write_duration_seconds",
                "Time to write and verify a checkpoint",
                &CHECKPOINT_BUCKETS,
            )?,
            checkpoint_size_bytes: Gauge::with_opts(opts(
                "checkpoint_size_bytes",
                "Size on disk of the last written checkpoint",
            ))?,
            skipped_images_total: IntCounter::with_opts(opts(
                "skipped_images_total",
                "Images skipped because they could not be decoded",
            ))?,
            eval_accuracy: GaugeVec::new(
                opts(
                    "eval_accuracy_ratio",
                    "Top-k accuracy (0..1) of the latest evaluation, by metric",
                ),
                &["metric"],
            )?,
            eval_iteration: IntGauge::with_opts(opts(
                "eval_iteration",
                "Iteration of the latest evaluation",
            ))?,
            eval_duration_seconds: Gauge::with_opts(opts(
                "eval_duration_seconds",
                "Wall time of the latest evaluation",
            ))?,
            registry,
        };
        for c in m.collectors() {
            m.registry.register(c)?;
        }
        m.start_time_seconds.set(unix_seconds(SystemTime::now()));
        Ok(m)
    }

    fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.iteration.clone()),
            Box::new(self.total_iterations.clone()),
            Box::new(self.eta_seconds.clone()),
            Box::new(self.run_attempt.clone()),
            Box::new(self.start_time_seconds.clone()),
            Box::new(self.loss.clone()),
            Box::new(self.lr.clone()),
            Box::new(self.weight_decay.clone()),
            Box::new(self.teacher_momentum.clone()),
            Box::new(self.teacher_temperature.clone()),
            Box::new(self.images_per_second.clone()),
            Box::new(self.images_total.clone()),
            Box::new(self.iteration_duration_seconds.clone()),
            Box::new(self.data_wait_seconds_total.clone()),
            Box::new(self.compute_seconds_total.clone()),
            Box::new(self.step_phase_seconds_total.clone()),
            Box::new(self.loader_queue_depth.clone()),
            Box::new(self.mfu.clone()),
            Box::new(self.memory_bytes.clone()),
            Box::new(self.training_state_bytes.clone()),
            Box::new(self.device_memory_bytes.clone()),
            Box::new(self.checkpoint_age_seconds.clone()),
            Box::new(self.checkpoint_iteration.clone()),
            Box::new(self.last_checkpoint_timestamp_seconds.clone()),
            Box::new(self.checkpoint_write_duration_seconds.clone()),
            Box::new(self.checkpoint_size_bytes.clone()),
            Box::new(self.skipped_images_total.clone()),
            Box::new(self.eval_accuracy.clone()),
            Box::new(self.eval_iteration.clone()),
            Box::new(self.eval_duration_seconds.clone()),
        ]
    }

    /// The name of every metric family (histograms without their `_bucket`/`_sum`/`_count`
    /// series), whether or not it has a series yet: what dashboards and alerts may query.
    pub fn names(&self) -> Vec<String> {
        self.collectors()
            .iter()
            .flat_map(|c| c.desc().into_iter().map(|d| d.fq_name.clone()))
            .collect()
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

    /// Sets the gradient and optimizer-state gauges.
    pub fn set_training_state_bytes(&self, bytes: crate::parallel::MemoryBytes) {
        for (part, v) in [
            ("gradients", bytes.gradients),
            ("optimizer_state", bytes.optimizer_state),
        ] {
            self.training_state_bytes
                .with_label_values(&[part])
                .set(v as f64);
        }
    }

    /// Raises the skipped-images counter to the loader's running total.
    pub fn set_skipped_images(&self, total: u64) {
        let seen = self.skipped_images_total.get();
        if total > seen {
            self.skipped_images_total.inc_by(total - seen);
        }
    }

    /// One training iteration: its data wait and its compute (training step and teacher
    /// update).
    pub fn observe_iteration(&self, data_wait: Duration, compute: Duration) {
        self.data_wait_seconds_total.inc_by(data_wait.as_secs_f64());
        self.compute_seconds_total.inc_by(compute.as_secs_f64());
        self.iteration_duration_seconds
            .observe((data_wait + compute).as_secs_f64());
    }

    /// Adds one step's [`StepPhases`](crate::meta_arch::StepPhases).
    pub fn observe_step_phases(&self, p: &crate::meta_arch::StepPhases) {
        for (phase, d) in [
            ("forward", p.forward),
            ("backward", p.backward),
            ("communication", p.communication),
            ("optimizer", p.optimizer),
        ] {
            self.step_phase_seconds_total
                .with_label_values(&[phase])
                .inc_by(d.as_secs_f64());
        }
    }

    /// Samples memory: the process's resident set (`memory_bytes`) and, when the model
    /// trains on the CPU (no CUDA, as `dist::World` picks the device), the device memory: on
    /// the CPU tensors live in the process's memory, so `allocated` is the resident set and
    /// `peak` its high-water mark. CUDA memory is not reported: tch exposes no allocator
    /// statistics (`torch.cuda.memory_allocated`), so those series are absent on GPUs.
    pub fn record_memory(&self) {
        let Some(host) = host_memory() else {
            return;
        };
        self.memory_bytes.set(host.resident as f64);
        static ON_CPU: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *ON_CPU.get_or_init(|| !tch::Cuda::is_available()) {
            for (state, bytes) in [("allocated", host.resident), ("peak", host.peak)] {
                self.device_memory_bytes
                    .with_label_values(&["cpu", state])
                    .set(bytes as f64);
            }
        }
    }

    /// A checkpoint of `iteration` is on disk. `written` is the write's duration and the
    /// checkpoint's directory on the rank that wrote it (None on the ranks that waited).
    pub fn checkpoint_written(&self, iteration: u64, written: Option<(Duration, &Path)>) {
        self.checkpoint_iteration.set(iteration as i64);
        self.checkpoint_age_seconds.set(0.0);
        self.last_checkpoint_timestamp_seconds
            .with_label_values::<&str>(&[])
            .set(unix_seconds(SystemTime::now()));
        if let Some((duration, dir)) = written {
            self.checkpoint_write_duration_seconds
                .observe(duration.as_secs_f64());
            self.checkpoint_size_bytes.set(dir_size_bytes(dir) as f64);
        }
    }

    /// The results of the evaluation at `iteration`, as `EvalReport::flat` names them:
    /// accuracies (`*top1*`, `*top5*`, in percent) become ratios; other values (the linear
    /// probe's chosen learning rate) stay in metrics.jsonl only.
    pub fn evaluation(&self, iteration: u64, duration: Duration, results: &[(String, f64)]) {
        self.eval_iteration.set(iteration as i64);
        self.eval_duration_seconds.set(duration.as_secs_f64());
        for (name, value) in results {
            if name.contains("_top") {
                self.eval_accuracy
                    .with_label_values(&[name.as_str()])
                    .set(value / 100.0);
            }
        }
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Total size of the files in `dir` and its subdirectories (0 where it cannot be read: the
/// size is informational).
fn dir_size_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

/// The process's resident memory and its high-water mark.
#[derive(Debug, Clone, Copy, PartialEq)]
struct HostMemory {
    resident: u64,
    peak: u64,
}

/// From `/proc/self/status` (`VmRSS`, `VmHWM`, in kB); None where there is no procfs.
fn host_memory() -> Option<HostMemory> {
    parse_proc_status(&std::fs::read_to_string("/proc/self/status").ok()?)
}

fn parse_proc_status(status: &str) -> Option<HostMemory> {
    let kb = |key: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        line[key.len()..]
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    };
    let resident = kb("VmRSS:")? * 1024;
    // The peak is never below the current value (a kernel without VmHWM: the current one).
    let peak = kb("VmHWM:").map_or(resident, |p| (p * 1024).max(resident));
    Some(HostMemory { resident, peak })
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
                    metrics.record_memory();
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
        self.on_iteration_closing(iteration, images, losses, lr, false)
    }

    /// As [`Self::on_iteration`]; `close` also ends the window at `iteration` (the last
    /// iteration of a curriculum phase, so no window mixes two phases' throughput).
    pub fn on_iteration_closing(
        &mut self,
        iteration: u64,
        images: u64,
        losses: &[(String, f64)],
        lr: f64,
        close: bool,
    ) -> Option<ProgressLine> {
        self.window_images += images;
        if !close && !iteration.is_multiple_of(self.every) && iteration != self.total {
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
        m.evaluation(0, Duration::ZERO, &[("knn_top1_k20".into(), 70.0)]);
        m.set_skipped_images(3);
        m.set_skipped_images(2);
        let text = m.render();
        assert!(
            !text.contains("dinoflow_trainer_mfu"),
            "no peak FLOP/s, no MFU: {text}"
        );
        m.set_mfu(0.25);
        let text = m.render();
        assert!(text.contains("dinoflow_trainer_mfu_ratio 0.25"), "{text}");
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
    fn step_phases_queue_depth_and_cpu_memory_are_exported() {
        let m = TrainerMetrics::new().unwrap();
        m.observe_step_phases(&crate::meta_arch::StepPhases {
            forward: Duration::from_millis(30),
            backward: Duration::from_millis(60),
            communication: Duration::ZERO,
            optimizer: Duration::from_millis(10),
        });
        m.loader_queue_depth.set(3);
        m.record_memory();
        let text = m.render();
        for line in [
            r#"dinoflow_trainer_step_phase_seconds_total{phase="forward"} 0.03"#,
            r#"dinoflow_trainer_step_phase_seconds_total{phase="backward"} 0.06"#,
            r#"dinoflow_trainer_step_phase_seconds_total{phase="communication"} 0"#,
            r#"dinoflow_trainer_step_phase_seconds_total{phase="optimizer"} 0.01"#,
            "dinoflow_trainer_loader_queue_depth 3",
        ] {
            assert!(text.contains(line), "{line} missing in {text}");
        }
        // The tests run without CUDA: the device is the CPU, its memory the process's.
        let device = |state: &str| {
            m.device_memory_bytes
                .with_label_values(&["cpu", state])
                .get()
        };
        assert!(device("allocated") > 1e6, "{text}");
        assert!(device("peak") >= device("allocated"), "{text}");
        assert_eq!(device("allocated"), m.memory_bytes.get());
    }

    #[test]
    fn proc_status_gives_resident_memory_and_its_peak() {
        let status =
            "Name:\ttrainer\nVmPeak:\t 9000 kB\nVmHWM:\t    2048 kB\nVmRSS:\t    1024 kB\n";
        assert_eq!(
            parse_proc_status(status),
            Some(HostMemory {
                resident: 1024 * 1024,
                peak: 2048 * 1024
            })
        );
        assert_eq!(parse_proc_status("Name: x\n"), None);
    }

    #[test]
    fn run_labels_from_the_env_contract_are_on_every_series() {
        let identity = JobIdentity {
            namespace: "ml".into(),
            name: "vitl".into(),
            kind: JobKind::Distill,
            run_attempt: 2,
        };
        let m = TrainerMetrics::with_labels(&RunLabels::new(Some(&identity), JobKind::Pretrain, 8))
            .unwrap();
        m.iteration.set(3);
        m.loss.with_label_values(&["koleo_loss"]).set(0.5);
        let text = m.render();
        // The encoder orders constant labels as it pleases: look for each one.
        let line = |prefix: &str| {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix} in {text}"))
        };
        let iteration = line("dinoflow_trainer_iteration{");
        let loss = line("dinoflow_trainer_loss{");
        for label in [
            r#"namespace="ml""#,
            r#"job_name="vitl""#,
            r#"kind="DistillJob""#,
            r#"rank="8""#,
        ] {
            assert!(iteration.contains(label), "{label} not in {iteration}");
            assert!(loss.contains(label), "{label} not in {loss}");
        }
        assert!(iteration.ends_with("} 3"), "{iteration}");
        assert!(
            loss.contains(r#"term="koleo_loss""#) && loss.ends_with("} 0.5"),
            "{loss}"
        );
        // Outside a pod: the subcommand's kind and the rank only.
        let local = RunLabels::new(None, JobKind::Pretrain, 0).to_map();
        assert_eq!(
            local,
            HashMap::from([
                ("kind".to_string(), "PretrainJob".to_string()),
                ("rank".to_string(), "0".to_string()),
            ])
        );
    }

    #[test]
    fn no_metric_has_a_label_of_the_run_labels() {
        // A sample with a label name twice fails the whole scrape ("label name \"kind\" is not
        // unique: invalid sample"): every panel of the run goes empty.
        let identity = JobIdentity {
            namespace: "ml".into(),
            name: "vitl".into(),
            kind: JobKind::Pretrain,
            run_attempt: 0,
        };
        let labels = RunLabels::new(Some(&identity), JobKind::Pretrain, 0).to_map();
        let m = TrainerMetrics::with_labels(&RunLabels::new(Some(&identity), JobKind::Pretrain, 0))
            .unwrap();
        for c in m.collectors() {
            for d in c.desc() {
                let clash: Vec<&String> = d
                    .variable_labels
                    .iter()
                    .filter(|l| labels.contains_key(*l))
                    .collect();
                assert!(clash.is_empty(), "{} has run labels {clash:?}", d.fq_name);
            }
        }
        // And in the exposition: no sample line names a label twice.
        m.set_training_state_bytes(crate::parallel::MemoryBytes {
            gradients: 1,
            optimizer_state: 2,
        });
        let text = m.render();
        let line = text
            .lines()
            .find(|l| l.starts_with("dinoflow_trainer_training_state_bytes{"))
            .unwrap_or_else(|| panic!("no training_state_bytes in {text}"));
        let names: Vec<&str> = line
            .split_once('{')
            .and_then(|(_, r)| r.rsplit_once('}'))
            .map(|(l, _)| {
                l.split(',')
                    .filter_map(|p| p.split_once('='))
                    .map(|(k, _)| k)
                    .collect()
            })
            .unwrap();
        let unique: std::collections::BTreeSet<&&str> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "{line}");
        assert!(line.contains(r#"part="gradients""#), "{line}");
    }

    #[test]
    fn iterations_checkpoints_and_evaluations_update_their_series() {
        let m = TrainerMetrics::new().unwrap();
        m.observe_iteration(Duration::from_millis(250), Duration::from_millis(750));
        assert_eq!(m.iteration_duration_seconds.get_sample_count(), 1);
        assert!((m.iteration_duration_seconds.get_sample_sum() - 1.0).abs() < 1e-9);
        assert!((m.data_wait_seconds_total.get() - 0.25).abs() < 1e-9);
        assert!((m.compute_seconds_total.get() - 0.75).abs() < 1e-9);

        assert!(
            !m.render()
                .contains("dinoflow_trainer_last_checkpoint_timestamp_seconds")
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("a"), [0u8; 100]).unwrap();
        std::fs::write(dir.path().join("sub/b"), [0u8; 23]).unwrap();
        m.checkpoint_written(40, Some((Duration::from_secs(2), dir.path())));
        assert_eq!(m.checkpoint_size_bytes.get(), 123.0);
        assert_eq!(m.checkpoint_iteration.get(), 40);
        assert_eq!(m.checkpoint_write_duration_seconds.get_sample_count(), 1);
        let written = m
            .last_checkpoint_timestamp_seconds
            .with_label_values::<&str>(&[])
            .get();
        assert!(
            written >= m.start_time_seconds.get() && written > 1.6e9,
            "{written}"
        );

        m.evaluation(
            40,
            Duration::from_secs(3),
            &[
                ("knn_top1_k20".into(), 70.5),
                ("linear_top1".into(), 80.0),
                ("linear_best_lr".into(), 0.01),
            ],
        );
        let text = m.render();
        assert!(
            text.contains(r#"dinoflow_trainer_eval_accuracy_ratio{metric="knn_top1_k20"} 0.705"#),
            "{text}"
        );
        assert!(
            text.contains(r#"dinoflow_trainer_eval_accuracy_ratio{metric="linear_top1"} 0.8"#),
            "{text}"
        );
        assert!(
            !text.contains("linear_best_lr"),
            "a learning rate is no accuracy: {text}"
        );
        assert!(
            text.contains("dinoflow_trainer_eval_iteration 40"),
            "{text}"
        );
    }

    /// Every `dinoflow_trainer_*` name in the chart's dashboards and alert rules is one this
    /// registry defines (histograms with their `_bucket`/`_sum`/`_count` series); the e2e
    /// suite (tests/tests/observability.rs) checks every other name in those queries.
    #[test]
    fn dashboards_and_alerts_name_only_registered_trainer_metrics() {
        let registered: Vec<String> = TrainerMetrics::new().unwrap().names();
        let known = |name: &str| {
            ["", "_bucket", "_sum", "_count"].iter().any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|base| registered.iter().any(|r| r == base))
            })
        };
        let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/dinoflow/files");
        let mut files: Vec<_> = ["dashboards", "alerts"]
            .iter()
            .flat_map(|d| std::fs::read_dir(chart.join(d)).unwrap())
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        let mut seen = 0;
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for (at, _) in text.match_indices("dinoflow_trainer_") {
                let name: String = text[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(known(&name), "{}: {name} is not registered", file.display());
                seen += 1;
            }
        }
        assert!(seen > 20, "only {seen} trainer metric references found");
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
