//! Rank 0's progress stream to the operator (`crds/proto/progress.proto`): iterations with
//! losses, learning rate and images/s, checkpoints written, evaluations done.
//!
//! Training never waits for the operator. The loop's calls only touch a small shared buffer:
//! iteration reports coalesce into the latest one (sent at most once a second; the last report
//! of a curriculum phase is queued instead, so no phase is coalesced away), checkpoint and
//! evaluation events queue up to [`MAX_QUEUED`] and the oldest are dropped beyond that. A
//! background thread with its own tokio runtime owns the gRPC stream, reconnects with
//! exponential backoff and warns once per outage. HTTP/2 keep-alive pings find a connection
//! whose peer went away without closing it (a pod's network torn down), which would otherwise
//! swallow reports until the run ends.
//!
//! The last reports (the final iteration and checkpoint: a DistillJob takes its teacher from
//! that checkpoint) wait at exit for an operator that took reports during the run but is away
//! now (a leader hand-over, a restart) up to [`RETURN_GRACE`]; one never reached gets only
//! the flush timeout.
//!
//! Heartbeats: each stream opens with one (the operator checks the token at once), and a
//! running loop reports every iteration. A timer heartbeat at all times would hide a wedged
//! loop from the operator's hang detection, so the timer runs only while the loop says it is
//! in a long phase (start-up, evaluation, checkpoint write; [`ProgressHook::long_phase`]): then a
//! heartbeat goes out every [`HEARTBEAT_INTERVAL`], keeping the CRD's promise that
//! `hangTimeoutSeconds >= 30` is safe.
use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dinoflow_api::progress::progress_client::ProgressClient;
use dinoflow_api::progress::progress_report::Event;
use dinoflow_api::progress::{
    AUTHORIZATION_METADATA, CheckpointWritten, EvaluationDone, Heartbeat, IterationDone,
    ProgressReport, RunStarted,
};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::env::ProgressTarget;
use crate::train_loop::{IterationReport, ProgressHook, RunStart};

/// Checkpoint and evaluation events kept while the operator is slow or away.
pub const MAX_QUEUED: usize = 64;
/// Iteration reports are coalesced to at most one per this interval (the operator writes
/// status at most once a second anyway).
const ITERATION_INTERVAL: Duration = Duration::from_secs(1);
/// Heartbeat period during a long phase (the CRD allows hang timeouts from 30 s).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnect backoff cap: after a hand-over the new leader counts hang timeouts (>= 30 s) from
/// its own start, so the trainer must be back well within that.
const MAX_BACKOFF: Duration = Duration::from_secs(8);
/// A ping after this long without a frame from the operator; no answer within as long again
/// drops the connection and reconnects.
const KEEPALIVE: Duration = Duration::from_secs(5);
/// How long the last reports wait at exit for an operator that took reports during the run:
/// a hand-over (lease expiry 15 s, the new leader's start and readiness) takes less.
pub const RETURN_GRACE: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Buffer {
    latest_iteration: Option<IterationDone>,
    events: VecDeque<Event>,
    /// The loop is in a long phase: heartbeat while nothing else is sent.
    in_long_phase: bool,
    heartbeat_interval: Duration,
    dropped: u64,
    /// The operator took reports during this run: it is expected back after an outage.
    delivered_once: bool,
    closed: bool,
    /// `finish` gave up waiting: the sender stops retrying.
    abandoned: bool,
}

struct Shared {
    buffer: Mutex<Buffer>,
    wake: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Buffer> {
        self.buffer.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The rank-0 reporter; a [`ProgressHook`] for the training loop.
pub struct ProgressReporter {
    shared: Arc<Shared>,
    done: Option<std_mpsc::Receiver<()>>,
    images_per_second: f64,
    /// MFU of the latest logging window, if known (sent with every iteration, as throughput).
    mfu: Option<f64>,
    /// How long dropping the reporter waits to deliver what is buffered.
    pub flush_timeout: Duration,
}

impl std::fmt::Debug for ProgressReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProgressReporter").finish_non_exhaustive()
    }
}

impl ProgressReporter {
    /// Starts the background sender for `target`; returns at once (no connection yet).
    pub fn start(target: ProgressTarget) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            buffer: Mutex::new(Buffer {
                heartbeat_interval: HEARTBEAT_INTERVAL,
                ..Buffer::default()
            }),
            wake: Notify::new(),
        });
        let (done_tx, done_rx) = std_mpsc::channel();
        let bg = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(run(bg, target)),
                    Err(e) => tracing::warn!("progress reports disabled: no runtime: {e}"),
                }
                let _ = done_tx.send(());
            })?;
        Ok(Self {
            shared,
            done: Some(done_rx),
            images_per_second: 0.0,
            mfu: None,
            flush_timeout: Duration::from_secs(5),
        })
    }

    /// Changes the long-phase heartbeat period (tests).
    pub fn set_heartbeat_interval(&self, interval: Duration) {
        self.shared.lock().heartbeat_interval = interval;
    }

    /// Reports dropped so far because the operator could not keep up.
    pub fn dropped(&self) -> u64 {
        self.shared.lock().dropped
    }

    /// Delivers what is buffered, waiting at most `timeout`, or up to [`RETURN_GRACE`] when
    /// the operator took reports during the run (it is expected back); true when everything
    /// was sent and the operator answered.
    pub fn finish(&mut self, timeout: Duration) -> bool {
        let Some(done) = self.done.take() else {
            return true;
        };
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        let mut outcome = done.recv_timeout(timeout);
        if outcome.is_err() && self.shared.lock().delivered_once && timeout < RETURN_GRACE {
            tracing::warn!(
                "the progress endpoint took reports earlier in this run but not the last ones \
                 yet (an operator hand-over or restart?); waiting up to {:?} more for it",
                RETURN_GRACE - timeout
            );
            outcome = done.recv_timeout(RETURN_GRACE - timeout);
        }
        match outcome {
            Ok(()) => true,
            Err(_) => {
                let left = {
                    let mut b = self.shared.lock();
                    b.abandoned = true;
                    b.events.len() + usize::from(b.latest_iteration.is_some())
                };
                tracing::warn!(
                    undelivered = left,
                    "progress endpoint did not take the last reports; exiting anyway (the job's \
                     status may show an earlier iteration and checkpoint than this run's last)"
                );
                false
            }
        }
    }

    fn push(&self, event: Event) {
        let mut b = self.shared.lock();
        if b.events.len() >= MAX_QUEUED {
            b.events.pop_front();
            b.dropped += 1;
            if b.dropped == 1 {
                tracing::warn!(
                    "progress endpoint is not keeping up: dropping the oldest reports (training goes on)"
                );
            }
        }
        b.events.push_back(event);
        drop(b);
        self.shared.wake.notify_one();
    }
}

impl Drop for ProgressReporter {
    fn drop(&mut self) {
        self.finish(self.flush_timeout);
    }
}

/// `total_loss` -> `total`: the proto's loss names.
fn loss_name(term: &str) -> String {
    term.strip_suffix("_loss").unwrap_or(term).to_string()
}

/// `knn_top1_k20` -> (`knn`, `top1_k20`): one evaluation per method, as the job status
/// lists them.
fn group_evaluations(metrics: &[(String, f64)]) -> BTreeMap<String, BTreeMap<String, f64>> {
    let mut out: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    for (name, v) in metrics {
        let (group, metric) = name.split_once('_').unwrap_or(("eval", name.as_str()));
        out.entry(group.to_string())
            .or_default()
            .insert(metric.to_string(), *v);
    }
    out
}

impl ProgressHook for ProgressReporter {
    fn run_started(&mut self, start: &RunStart<'_>) {
        let world_size = u32::try_from(start.world_size).unwrap_or(u32::MAX);
        let (path, iteration, from) = start
            .resumed
            .unwrap_or((Path::new(""), 0, start.world_size));
        self.push(Event::Started(RunStarted {
            world_size,
            resumed: start.resumed.is_some(),
            checkpoint_iteration: iteration,
            checkpoint_path: path.display().to_string(),
            checkpoint_world_size: u32::try_from(from).unwrap_or(u32::MAX),
        }));
    }

    fn iteration(&mut self, r: &IterationReport<'_>) {
        if let Some(ips) = r.images_per_second {
            self.images_per_second = ips;
        }
        if r.mfu.is_some() {
            self.mfu = r.mfu;
        }
        let report = IterationDone {
            iteration: r.iteration,
            total_iterations: r.total_iterations,
            curriculum_phase: r.phase.unwrap_or_default().to_string(),
            losses: r.losses.iter().map(|(k, v)| (loss_name(k), *v)).collect(),
            learning_rate: r.lr,
            images_per_second: self.images_per_second,
            mfu: self.mfu,
        };
        let mut b = self.shared.lock();
        // Coalescing never hides a curriculum phase: a pending report of the phase that just
        // ended is queued (sent before the new phase's), so the operator sees every phase.
        let ended = b
            .latest_iteration
            .take_if(|pending| pending.curriculum_phase != report.curriculum_phase);
        b.latest_iteration = Some(report);
        drop(b);
        match ended {
            Some(pending) => self.push(Event::Iteration(pending)),
            None => self.shared.wake.notify_one(),
        }
    }

    fn checkpoint(&mut self, iteration: u64, path: &Path, best: Option<(&str, f64)>) {
        self.push(Event::Checkpoint(CheckpointWritten {
            iteration,
            path: path.display().to_string(),
            best_metric: best.map(|(m, _)| m.to_string()),
            best_value: best.map(|(_, v)| v),
        }));
    }

    fn long_phase(&mut self, active: bool) {
        self.shared.lock().in_long_phase = active;
        self.shared.wake.notify_one();
    }

    fn evaluation(&mut self, iteration: u64, metrics: &[(String, f64)]) {
        for (name, metrics) in group_evaluations(metrics) {
            self.push(Event::Evaluation(EvaluationDone {
                iteration,
                name,
                metrics: metrics.into_iter().collect(),
            }));
        }
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn report(target: &ProgressTarget, event: Event) -> ProgressReport {
    ProgressReport {
        namespace: target.job.namespace.clone(),
        job: target.job.name.clone(),
        kind: target.job.kind.as_str().to_string(),
        run_attempt: target.job.run_attempt,
        unix_time: unix_now(),
        event: Some(event),
    }
}

/// The newest checkpoint and iteration sent: a new stream opens with them.
#[derive(Default)]
struct LastSent {
    checkpoint: Option<Event>,
    iteration: Option<Event>,
}

/// What ended one stream.
enum StreamEnd {
    /// The reporter was finished and everything was delivered.
    Finished,
    /// Connection or stream failure; retry. `refused`: the operator turned the stream down
    /// (token, attempt, job), so it did not take what was sent.
    Lost { why: String, refused: bool },
}

/// The sender thread: one stream at a time, reconnecting with backoff until finished.
async fn run(shared: Arc<Shared>, target: ProgressTarget) {
    let mut backoff = Duration::from_secs(1);
    let mut outage_logged = false;
    // Resent first on a new stream, so an operator that restarted learns the state at once,
    // and what went into a stream that then broke is not lost.
    let mut last_sent = LastSent::default();
    loop {
        let (end, delivered) = stream_once(&shared, &target, &mut last_sent).await;
        match end {
            StreamEnd::Finished => return,
            StreamEnd::Lost { why, refused } => {
                if delivered {
                    backoff = Duration::from_secs(1);
                    outage_logged = false;
                    if !refused {
                        shared.lock().delivered_once = true;
                    }
                }
                if !outage_logged {
                    tracing::warn!(
                        endpoint = %target.endpoint,
                        "progress reports paused: {why}; training goes on, reconnecting with backoff"
                    );
                    outage_logged = true;
                } else {
                    tracing::debug!("progress endpoint still unavailable: {why}");
                }
            }
        }
        let (closed, abandoned) = {
            let b = shared.lock();
            (b.closed, b.abandoned)
        };
        if abandoned {
            return;
        }
        if closed {
            // Shutting down: keep trying until `finish` gives up, without spinning.
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        // New reports wait out the backoff; only shutdown cuts it short.
        let deadline = tokio::time::Instant::now() + backoff;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => break,
                () = shared.wake.notified() => if shared.lock().closed { break },
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Next report to send: queued events first, then the latest iteration once it is due
/// (always when closing), then, in a long phase, a heartbeat once [`HEARTBEAT_INTERVAL`] has
/// passed since the last report. `Err(Some(t))`: wait until `t`; `Err(None)`: idle.
fn next_report(
    shared: &Shared,
    last_iteration_sent: Option<Instant>,
    last_sent: Instant,
) -> Result<Event, Option<Instant>> {
    let mut b = shared.lock();
    if let Some(e) = b.events.pop_front() {
        return Ok(e);
    }
    let now = Instant::now();
    let mut wake: Option<Instant> = None;
    if b.latest_iteration.is_some() {
        let due = last_iteration_sent.map_or(now, |t| t + ITERATION_INTERVAL);
        if b.closed || now >= due {
            let it = b.latest_iteration.take().expect("checked above");
            return Ok(Event::Iteration(it));
        }
        wake = Some(due);
    }
    if b.in_long_phase && !b.closed {
        let due = last_sent + b.heartbeat_interval;
        if now >= due {
            return Ok(Event::Heartbeat(Heartbeat {}));
        }
        wake = Some(wake.map_or(due, |w| w.min(due)));
    }
    Err(wake)
}

/// Checks that `pem` holds at least one CA certificate rustls accepts as a trust anchor; the
/// error says what is wrong (for `DINOFLOW_PROGRESS_CA`).
pub fn check_ca(pem: &str) -> Result<(), String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate: {e}"))?;
    if certs.is_empty() {
        return Err("no `-----BEGIN CERTIFICATE-----` block in it".into());
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| format!("not a usable CA certificate: {e}"))?;
    }
    Ok(())
}

/// The endpoint of `target`: TLS trusting its CA only when it has one, plaintext otherwise.
/// A CA with an `http://` endpoint, or `https://` without a CA, is refused (the env check
/// refuses both first), so a trainer given a CA never reports in plaintext.
fn endpoint(target: &ProgressTarget) -> Result<tonic::transport::Endpoint, String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let tls = target.endpoint.starts_with("https://");
    let endpoint = Endpoint::from_shared(target.endpoint.clone())
        .map_err(|e| format!("bad endpoint {:?}: {e}", target.endpoint))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(KEEPALIVE)
        .keep_alive_while_idle(true);
    match (&target.ca, tls) {
        (Some(ca), true) => endpoint
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
            .map_err(|e| format!("TLS settings for {}: {e}", target.endpoint)),
        (None, false) => Ok(endpoint),
        (Some(_), false) => Err(format!(
            "{} is given but {:?} is plaintext; refusing to report without TLS",
            dinoflow_api::contract::PROGRESS_CA,
            target.endpoint
        )),
        (None, true) => Err(format!(
            "{:?} needs {} to verify the operator",
            target.endpoint,
            dinoflow_api::contract::PROGRESS_CA
        )),
    }
}

async fn stream_once(
    shared: &Shared,
    target: &ProgressTarget,
    last: &mut LastSent,
) -> (StreamEnd, bool) {
    let lost = |why: String| {
        (
            StreamEnd::Lost {
                why,
                refused: false,
            },
            false,
        )
    };
    let endpoint = match endpoint(target) {
        Ok(e) => e,
        Err(e) => return lost(e),
    };
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(e) => {
            return lost(format!(
                "cannot connect to {}: {}",
                target.endpoint,
                chain(&e)
            ));
        }
    };
    let mut client = ProgressClient::new(channel);
    let (tx, rx) = mpsc::channel::<ProgressReport>(8);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    match format!("Bearer {}", target.token).parse() {
        Ok(v) => {
            request.metadata_mut().insert(AUTHORIZATION_METADATA, v);
        }
        Err(_) => {
            return lost("DINOFLOW_PROGRESS_TOKEN is not a valid header value".into());
        }
    }
    let mut call = tokio::spawn(async move { client.report(request).await });

    let mut opening = vec![Event::Heartbeat(Heartbeat {})];
    opening.extend(last.checkpoint.clone());
    // Unless a newer one waits to go out.
    if shared.lock().latest_iteration.is_none() {
        opening.extend(last.iteration.clone());
    }
    let mut delivered = false;
    let mut last_iteration_sent: Option<Instant> = None;
    let mut last_sent = Instant::now();
    let mut pending: VecDeque<Event> = opening.into();
    loop {
        let next = match pending.pop_front() {
            Some(e) => Ok(e),
            None => next_report(shared, last_iteration_sent, last_sent),
        };
        match next {
            Ok(event) => {
                last_sent = Instant::now();
                match &event {
                    Event::Iteration(_) => {
                        last_iteration_sent = Some(last_sent);
                        last.iteration = Some(event.clone());
                    }
                    Event::Checkpoint(_) => last.checkpoint = Some(event.clone()),
                    _ => {}
                }
                tokio::select! {
                    sent = tx.send(report(target, event)) => {
                        if sent.is_err() {
                            return (describe(call.await), delivered);
                        }
                        delivered = true;
                    }
                    result = &mut call => return (describe(result), delivered),
                }
            }
            Err(wait_until) => {
                if shared.lock().closed {
                    if delivered {
                        // The operator holds the stream open: it took what was sent.
                        shared.lock().delivered_once = true;
                    }
                    drop(tx);
                    return match (&mut call).await {
                        Ok(Ok(_ack)) => (StreamEnd::Finished, delivered),
                        other => (describe(other), delivered),
                    };
                }
                let sleep = async {
                    match wait_until {
                        Some(t) => tokio::time::sleep_until(t.into()).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = shared.wake.notified() => {}
                    () = sleep => {}
                    result = &mut call => return (describe(result), delivered),
                }
            }
        }
    }
}

/// An error with its causes (tonic's "transport error" hides a failed TLS verification there).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Outcome of the client-streaming call.
type Rpc = Result<tonic::Response<dinoflow_api::progress::ReportAck>, tonic::Status>;

/// A stream that ended before the reporter finished.
fn describe(result: Result<Rpc, tokio::task::JoinError>) -> StreamEnd {
    use tonic::Code;
    let (why, refused) = match result {
        Ok(Ok(_)) => ("the operator closed the stream".into(), false),
        Ok(Err(status)) => (
            format!("{}: {}", status.code(), status.message()),
            matches!(
                status.code(),
                Code::Unauthenticated
                    | Code::PermissionDenied
                    | Code::FailedPrecondition
                    | Code::InvalidArgument
                    | Code::NotFound
            ),
        ),
        Err(e) => (format!("stream task failed: {e}"), false),
    };
    StreamEnd::Lost { why, refused }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use dinoflow_api::progress::ReportAck;
    use dinoflow_api::progress::progress_server::{Progress, ProgressServer};
    use tokio_stream::StreamExt;
    use tonic::{Request, Response, Status, Streaming};

    use super::*;
    use crate::env::{JobIdentity, JobKind};

    /// An operator stand-in: checks the token like operator/src/progress.rs and records.
    #[derive(Clone, Default)]
    struct Recorder {
        reports: Arc<StdMutex<Vec<ProgressReport>>>,
    }

    #[tonic::async_trait]
    impl Progress for Recorder {
        async fn report(
            &self,
            request: Request<Streaming<ProgressReport>>,
        ) -> Result<Response<ReportAck>, Status> {
            let auth = request
                .metadata()
                .get(AUTHORIZATION_METADATA)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            if auth.as_deref() != Some("Bearer t0ken") {
                return Err(Status::unauthenticated("bad token"));
            }
            let mut stream = request.into_inner();
            let mut accepted = 0;
            while let Some(r) = stream.next().await {
                self.reports.lock().unwrap().push(r?);
                accepted += 1;
            }
            Ok(Response::new(ReportAck { accepted }))
        }
    }

    /// Serves `recorder` on `port` (0: any) in a background runtime; returns the port and a
    /// handle whose drop stops the server.
    fn serve(recorder: Recorder, port: u16) -> (u16, tokio::runtime::Runtime) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        rt.spawn(
            tonic::transport::Server::builder()
                .add_service(ProgressServer::new(recorder))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (port, rt)
    }

    fn target(port: u16) -> ProgressTarget {
        ProgressTarget {
            endpoint: format!("http://127.0.0.1:{port}"),
            token: "t0ken".into(),
            job: JobIdentity {
                namespace: "ml".into(),
                name: "tiny".into(),
                kind: JobKind::Pretrain,
                run_attempt: 2,
            },
            ca: None,
        }
    }

    const TLS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/tls");

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!("{TLS_DIR}/{name}")).unwrap()
    }

    /// `recorder` behind TLS with the fixture certificate (localhost, 127.0.0.1).
    fn serve_tls(recorder: Recorder) -> (u16, tokio::runtime::Runtime) {
        use tonic::transport::{Identity, ServerTlsConfig};
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", 0)))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let identity = Identity::from_pem(fixture("server.crt"), fixture("server.key"));
        let mut server = tonic::transport::Server::builder()
            .tls_config(ServerTlsConfig::new().identity(identity))
            .unwrap();
        rt.spawn(
            server
                .add_service(ProgressServer::new(recorder))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (port, rt)
    }

    fn tls_target(port: u16, ca: &str) -> ProgressTarget {
        ProgressTarget {
            endpoint: format!("https://localhost:{port}"),
            ca: Some(fixture(ca)),
            ..target(port)
        }
    }

    #[test]
    fn reports_go_over_tls_to_an_endpoint_the_ca_vouches_for() {
        let recorder = Recorder::default();
        let (port, _server) = serve_tls(recorder.clone());
        let mut r = ProgressReporter::start(tls_target(port, "ca.crt")).unwrap();
        iterate(&mut r, 1..=3);
        r.checkpoint(3, Path::new("/ckpt/ckpt-000000003"), None);
        assert!(r.finish(Duration::from_secs(20)), "not delivered over TLS");
        let reports = recorder.reports.lock().unwrap().clone();
        assert_eq!(iterations(&reports).last().unwrap().iteration, 3);
    }

    #[test]
    fn an_endpoint_the_ca_does_not_vouch_for_gets_nothing() {
        let recorder = Recorder::default();
        let (port, _server) = serve_tls(recorder.clone());
        // Another CA: the handshake fails, nothing is sent, and the trainer does not fall
        // back to plaintext.
        let mut r = ProgressReporter::start(tls_target(port, "other-ca.crt")).unwrap();
        iterate(&mut r, 1..=3);
        assert!(!r.finish(Duration::from_secs(3)));
        assert!(recorder.reports.lock().unwrap().is_empty());
        let wrong = tls_target(port, "ca.crt");
        // A CA with an http:// endpoint: refused rather than sent in the clear.
        let plain = ProgressTarget {
            endpoint: format!("http://127.0.0.1:{port}"),
            ..wrong.clone()
        };
        assert!(endpoint(&plain).unwrap_err().contains("refusing"));
        let no_ca = ProgressTarget { ca: None, ..wrong };
        assert!(
            endpoint(&no_ca)
                .unwrap_err()
                .contains("DINOFLOW_PROGRESS_CA")
        );
    }

    #[test]
    fn the_ca_check_names_what_is_wrong() {
        assert!(check_ca(&fixture("ca.crt")).is_ok());
        assert!(check_ca("hello").unwrap_err().contains("BEGIN CERTIFICATE"));
        assert!(
            check_ca(&fixture("server.key"))
                .unwrap_err()
                .contains("BEGIN CERTIFICATE")
        );
        let e =
            check_ca("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap_err();
        assert!(e.contains("CA certificate") || e.contains("PEM"), "{e}");
    }

    fn losses(i: u64) -> Vec<(String, f64)> {
        vec![
            ("total_loss".into(), 10.0 - i as f64 * 0.01),
            ("koleo_loss".into(), -0.5),
        ]
    }

    fn iterate(r: &mut ProgressReporter, range: std::ops::RangeInclusive<u64>) {
        for i in range {
            let l = losses(i);
            r.iteration(&IterationReport {
                iteration: i,
                total_iterations: 500,
                losses: &l,
                lr: 1e-3,
                images_per_second: (i % 10 == 0).then_some(123.0),
                phase: None,
                mfu: (i % 10 == 0).then_some(0.5),
            });
        }
    }

    fn iterations(reports: &[ProgressReport]) -> Vec<&IterationDone> {
        reports
            .iter()
            .filter_map(|r| match &r.event {
                Some(Event::Iteration(it)) => Some(it),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn reports_reach_the_operator_with_the_token_coalesced_and_named_as_the_proto_says() {
        let recorder = Recorder::default();
        let (port, _server) = serve(recorder.clone(), 0);
        let mut r = ProgressReporter::start(target(port)).unwrap();
        iterate(&mut r, 1..=300);
        r.checkpoint(300, Path::new("/ckpt/ckpt-000000300"), None);
        r.evaluation(
            300,
            &[
                ("knn_top1_k20".into(), 0.7),
                ("knn_top5_k20".into(), 0.9),
                ("linear_top1".into(), 0.8),
            ],
        );
        assert!(r.finish(Duration::from_secs(20)), "not delivered");
        let reports = recorder.reports.lock().unwrap().clone();
        assert!(matches!(reports[0].event, Some(Event::Heartbeat(_))));
        assert!(reports.iter().all(|r| {
            r.namespace == "ml" && r.job == "tiny" && r.kind == "PretrainJob" && r.run_attempt == 2
        }));
        let its = iterations(&reports);
        // Coalesced: 300 calls in well under a second give a handful of reports, the last
        // of which is the newest.
        assert!(its.len() < 20, "{} iteration reports", its.len());
        let last = its.last().unwrap();
        assert_eq!((last.iteration, last.total_iterations), (300, 500));
        assert_eq!(last.losses["total"], 7.0);
        assert_eq!(last.losses["koleo"], -0.5);
        assert_eq!(last.images_per_second, 123.0);
        assert_eq!(
            last.mfu,
            Some(0.5),
            "the latest MFU rides along like the throughput"
        );
        assert!(reports.iter().any(|r| matches!(&r.event,
            Some(Event::Checkpoint(c)) if c.iteration == 300 && c.path.ends_with("300"))));
        let evals: BTreeMap<String, EvaluationDone> = reports
            .iter()
            .filter_map(|r| match &r.event {
                Some(Event::Evaluation(e)) => Some((e.name.clone(), e.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(evals["knn"].metrics["top1_k20"], 0.7);
        assert_eq!(evals["linear"].metrics["top1"], 0.8);
    }

    /// Two curriculum phases reported far faster than the coalescing interval: both reach the
    /// operator, in order, the first phase's last iteration before the second phase's.
    #[test]
    fn a_curriculum_phase_is_never_coalesced_away() {
        let recorder = Recorder::default();
        let (port, _server) = serve(recorder.clone(), 0);
        let mut r = ProgressReporter::start(target(port)).unwrap();
        let l = losses(1);
        for i in 1..=40 {
            r.iteration(&IterationReport {
                iteration: i,
                total_iterations: 40,
                losses: &l,
                lr: 1e-3,
                images_per_second: None,
                phase: Some(if i <= 20 { "base" } else { "high-res" }),
                mfu: None,
            });
        }
        assert!(r.finish(Duration::from_secs(20)), "not delivered");
        let reports = recorder.reports.lock().unwrap().clone();
        let its: Vec<(u64, &str)> = iterations(&reports)
            .iter()
            .map(|it| (it.iteration, it.curriculum_phase.as_str()))
            .collect();
        assert!(its.len() < 10, "still coalesced: {its:?}");
        assert!(its.contains(&(20, "base")), "{its:?}");
        assert_eq!(its.last(), Some(&(40, "high-res")));
        let first_high = its.iter().position(|(_, p)| *p == "high-res").unwrap();
        assert!(
            its[..first_high].iter().all(|(_, p)| *p == "base")
                && its[first_high..].iter().all(|(_, p)| *p == "high-res"),
            "{its:?}"
        );
    }

    #[test]
    fn heartbeats_go_out_only_while_the_loop_is_in_a_long_phase() {
        let recorder = Recorder::default();
        let (port, _server) = serve(recorder.clone(), 0);
        let mut r = ProgressReporter::start(target(port)).unwrap();
        r.set_heartbeat_interval(Duration::from_millis(100));
        let heartbeats = || {
            let reports = recorder.reports.lock().unwrap();
            reports
                .iter()
                .filter(|r| matches!(r.event, Some(Event::Heartbeat(_))))
                .count()
        };
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(
            heartbeats(),
            1,
            "only the stream's opening heartbeat while training"
        );
        r.long_phase(true);
        std::thread::sleep(Duration::from_millis(650));
        r.long_phase(false);
        std::thread::sleep(Duration::from_millis(100));
        let during = heartbeats() - 1;
        assert!((3..=7).contains(&during), "{during} heartbeats in 650 ms");
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            heartbeats(),
            during + 1,
            "heartbeats went on after the phase"
        );
        assert!(r.finish(Duration::from_secs(5)));
    }

    #[test]
    fn an_absent_operator_never_slows_the_loop() {
        // A port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = ProgressReporter::start(target(port)).unwrap();
        let started = Instant::now();
        iterate(&mut r, 1..=20_000);
        for i in 0..1000 {
            r.checkpoint(i, Path::new("/ckpt"), None);
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(r.dropped(), 1000 - MAX_QUEUED as u64);
        let finishing = Instant::now();
        assert!(!r.finish(Duration::from_millis(300)));
        assert!(finishing.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn the_reporter_reconnects_when_the_operator_comes_back() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = ProgressReporter::start(target(port)).unwrap();
        r.checkpoint(10, Path::new("/ckpt/ckpt-000000010"), None);
        iterate(&mut r, 1..=10);
        // The operator starts late (a restart, a slow rollout).
        std::thread::sleep(Duration::from_millis(1500));
        let recorder = Recorder::default();
        let (_, _server) = serve(recorder.clone(), port);
        // Delivered by the backoff retries alone, before any shutdown flush.
        let waiting = Instant::now();
        while iterations(&recorder.reports.lock().unwrap()).is_empty() {
            assert!(
                waiting.elapsed() < Duration::from_secs(20),
                "never reconnected"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        iterate(&mut r, 11..=12);
        assert!(
            r.finish(Duration::from_secs(30)),
            "not delivered after reconnecting"
        );
        let reports = recorder.reports.lock().unwrap().clone();
        assert_eq!(iterations(&reports).last().unwrap().iteration, 12);
        assert!(has_checkpoint(&reports, 10));
    }

    fn has_checkpoint(reports: &[ProgressReport], iteration: u64) -> bool {
        reports
            .iter()
            .any(|r| matches!(&r.event, Some(Event::Checkpoint(c)) if c.iteration == iteration))
    }

    /// Waits until `recorder` has an iteration report of at least `iteration`.
    fn wait_for_iteration(recorder: &Recorder, iteration: u64, within: Duration) {
        let waiting = Instant::now();
        while !iterations(&recorder.reports.lock().unwrap())
            .iter()
            .any(|it| it.iteration >= iteration)
        {
            assert!(
                waiting.elapsed() < within,
                "iteration {iteration} not delivered within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A TCP relay to a port. `silence` makes the connections open so far carry nothing more
    /// either way while they stay open: a peer gone without closing (its pod's network torn
    /// down). Later connections relay as before (the new leader).
    struct Relay {
        port: u16,
        generation: Arc<std::sync::atomic::AtomicU64>,
    }

    impl Relay {
        fn start(to: u16) -> Self {
            use std::io::{Read, Write};
            use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            let generation = Arc::new(AtomicU64::new(0));
            let g = Arc::clone(&generation);
            std::thread::spawn(move || {
                for client in listener.incoming().flatten() {
                    let server = std::net::TcpStream::connect(("127.0.0.1", to)).unwrap();
                    let born = g.load(SeqCst);
                    let legs = [
                        (client.try_clone().unwrap(), server.try_clone().unwrap()),
                        (server, client),
                    ];
                    for (mut from, mut into) in legs {
                        let g = Arc::clone(&g);
                        std::thread::spawn(move || {
                            let mut buf = [0u8; 16 * 1024];
                            while let Ok(n) = from.read(&mut buf) {
                                let live = g.load(SeqCst) == born;
                                if n == 0 || (live && into.write_all(&buf[..n]).is_err()) {
                                    break;
                                }
                            }
                            if g.load(SeqCst) == born {
                                let _ = into.shutdown(std::net::Shutdown::Write);
                            } else {
                                // Silenced: never close (a vanished peer sends no FIN).
                                std::thread::sleep(Duration::from_secs(3600));
                            }
                        });
                    }
                }
            });
            Self { port, generation }
        }

        fn silence(&self) {
            self.generation
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_connection_gone_silent_is_dropped_and_the_reports_go_over_a_new_one() {
        let recorder = Recorder::default();
        let (port, _server) = serve(recorder.clone(), 0);
        let relay = Relay::start(port);
        let mut r = ProgressReporter::start(target(relay.port)).unwrap();
        iterate(&mut r, 1..=3);
        wait_for_iteration(&recorder, 3, Duration::from_secs(20));
        relay.silence();
        // The last iteration goes into the silent stream; a new one must carry it again.
        iterate(&mut r, 4..=6);
        r.checkpoint(6, Path::new("/ckpt/ckpt-000000006"), None);
        let started = Instant::now();
        wait_for_iteration(&recorder, 6, 3 * KEEPALIVE + Duration::from_secs(10));
        eprintln!("delivered again {:?} after the silence", started.elapsed());
        assert!(
            r.finish(Duration::from_secs(10)),
            "the last reports were lost"
        );
        let reports = recorder.reports.lock().unwrap().clone();
        assert!(
            has_checkpoint(&reports, 6),
            "the checkpoint sent into the silent stream was not sent again"
        );
    }

    #[test]
    fn the_last_reports_wait_for_an_operator_that_took_reports_before() {
        let recorder = Recorder::default();
        let (port, server) = serve(recorder.clone(), 0);
        let mut r = ProgressReporter::start(target(port)).unwrap();
        iterate(&mut r, 1..=3);
        wait_for_iteration(&recorder, 3, Duration::from_secs(20));
        // The leader goes (a hand-over) just before the run ends; the next comes 3 s later.
        drop(server);
        iterate(&mut r, 4..=9);
        r.checkpoint(9, Path::new("/ckpt/ckpt-000000009"), None);
        let next = recorder.clone();
        let comeback = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(3));
            serve(next, port)
        });
        let finishing = Instant::now();
        // The flush timeout alone (1 s) would give up before the new leader comes.
        let delivered = r.finish(Duration::from_secs(1));
        let _server = comeback.join().unwrap();
        assert!(delivered, "gave up after {:?}", finishing.elapsed());
        assert!(finishing.elapsed() < RETURN_GRACE);
        let reports = recorder.reports.lock().unwrap().clone();
        assert_eq!(iterations(&reports).last().unwrap().iteration, 9);
        assert!(has_checkpoint(&reports, 9));
    }

    #[test]
    fn evaluation_metrics_group_by_method() {
        let g = group_evaluations(&[
            ("knn_top1_k10".into(), 0.5),
            ("linear_best_lr".into(), 0.01),
            ("score".into(), 1.0),
        ]);
        assert_eq!(g["knn"]["top1_k10"], 0.5);
        assert_eq!(g["linear"]["best_lr"], 0.01);
        assert_eq!(g["eval"]["score"], 1.0);
        assert_eq!(loss_name("dino_local_crops_loss"), "dino_local_crops");
    }
}
