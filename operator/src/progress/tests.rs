//! The progress endpoint over a real gRPC connection, with an in-memory job store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use dinoflow_api::progress::progress_client::ProgressClient;
use dinoflow_api::progress::{
    CheckpointWritten, EvaluationDone, Heartbeat, IterationDone, RunStarted,
};

use super::*;

/// Jobs by (kind, namespace, name).
type Jobs = HashMap<(JobKind, String, String), JobSnapshot>;

#[derive(Clone, Default)]
struct MemoryStore {
    jobs: Arc<Mutex<Jobs>>,
    writes: Arc<Mutex<Vec<JobStatus>>>,
}

impl JobStore for MemoryStore {
    async fn get(&self, kind: JobKind, namespace: &str, name: &str) -> Result<Option<JobSnapshot>> {
        Ok(self
            .jobs
            .lock()
            .unwrap()
            .get(&(kind, namespace.into(), name.into()))
            .cloned())
    }

    async fn write_progress(
        &self,
        kind: JobKind,
        namespace: &str,
        name: &str,
        progress: &JobStatus,
    ) -> Result<()> {
        let mut jobs = self.jobs.lock().unwrap();
        let job = jobs
            .get_mut(&(kind, namespace.into(), name.into()))
            .expect("job exists");
        let controller = crate::controller::apply::controller_fields(&job.status);
        job.status = JobStatus { ..progress.clone() };
        // Merge back the controller's half, as the API server does for two field managers.
        job.status.phase = controller.phase;
        job.status.run_attempt = controller.run_attempt;
        self.writes.lock().unwrap().push(progress.clone());
        Ok(())
    }
}

const KEY: &[u8] = b"operator-key";

fn report(attempt: u32, event: Event) -> ProgressReport {
    ProgressReport {
        namespace: "ml".into(),
        job: "vitl".into(),
        kind: "PretrainJob".into(),
        run_attempt: attempt,
        unix_time: 0,
        event: Some(event),
    }
}

fn iteration(i: u64, loss: f64) -> Event {
    Event::Iteration(IterationDone {
        iteration: i,
        total_iterations: 1000,
        curriculum_phase: "low-res".into(),
        losses: [("total".to_string(), loss)].into(),
        learning_rate: 0.004,
        images_per_second: 512.0,
        mfu: Some(0.25),
    })
}

async fn serve(store: MemoryStore) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = ProgressService::new(
        store,
        KEY.to_vec(),
        Leadership::always(),
        Metrics::default(),
    );
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc.into_server())
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    format!("http://{addr}")
}

fn store_with_job(attempt: i32) -> MemoryStore {
    let store = MemoryStore::default();
    let status = JobStatus {
        run_attempt: Some(attempt),
        ..Default::default()
    };
    store.jobs.lock().unwrap().insert(
        (JobKind::Pretrain, "ml".into(), "vitl".into()),
        JobSnapshot {
            uid: "uid-1".into(),
            status,
        },
    );
    store
}

async fn send(
    endpoint: &str,
    token: Option<String>,
    reports: Vec<ProgressReport>,
) -> Result<ReportAck, Status> {
    let mut client = ProgressClient::connect(endpoint.to_string()).await.unwrap();
    let mut req = Request::new(futures::stream::iter(reports));
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    client.report(req).await.map(Response::into_inner)
}

#[tokio::test]
async fn reports_with_the_jobs_token_update_its_progress() {
    let store = store_with_job(2);
    let endpoint = serve(store.clone()).await;
    let token = progress_token(KEY, "uid-1", 2);
    let reports = vec![
        report(2, iteration(10, 9.5)),
        report(2, iteration(20, 8.25)),
        report(
            2,
            Event::Checkpoint(CheckpointWritten {
                iteration: 20,
                path: "/ckpt/iter-20".into(),
                ..Default::default()
            }),
        ),
        report(
            2,
            Event::Evaluation(EvaluationDone {
                iteration: 20,
                name: "knn".into(),
                metrics: [("top1".to_string(), 0.5)].into(),
            }),
        ),
        report(2, Event::Heartbeat(Heartbeat {})),
    ];
    let ack = send(&endpoint, Some(token), reports).await.unwrap();
    assert_eq!(ack.accepted, 5);
    let jobs = store.jobs.lock().unwrap();
    let s = &jobs[&(JobKind::Pretrain, "ml".to_string(), "vitl".to_string())].status;
    assert_eq!(s.iteration, Some(20));
    assert_eq!(s.total_iterations, Some(1000));
    assert_eq!(s.losses["total"], 8.25);
    assert_eq!(s.curriculum_phase.as_deref(), Some("low-res"));
    assert_eq!(s.last_checkpoint.as_ref().unwrap().path, "/ckpt/iter-20");
    assert_eq!(s.evaluations[0].metrics["top1"], 0.5);
    assert!(s.last_progress_time.is_some());
    assert_eq!(
        s.run_attempt,
        Some(2),
        "the controller's fields are left alone"
    );
    // Every write carries only progress fields.
    for w in store.writes.lock().unwrap().iter() {
        assert_eq!(
            crate::controller::apply::controller_fields(w),
            JobStatus::default()
        );
    }
}

#[test]
fn a_checkpoint_reported_as_the_best_is_recorded_and_a_later_plain_one_keeps_it() {
    let mut s = JobStatus::default();
    let checkpoint = |iteration, best: Option<f64>| ProgressReport {
        event: Some(Event::Checkpoint(CheckpointWritten {
            iteration,
            path: format!("/ckpt/{iteration}"),
            best_metric: best.map(|_| "knn_top1_k20".to_string()),
            best_value: best,
        })),
        ..Default::default()
    };
    let now = Timestamp::from_second(1_700_000_000).unwrap();
    apply_report(&mut s, &checkpoint(10, None), now);
    assert_eq!(s.best_checkpoint, None);
    apply_report(&mut s, &checkpoint(20, Some(61.5)), now);
    apply_report(&mut s, &checkpoint(30, None), now);
    let best = s.best_checkpoint.clone().unwrap();
    assert_eq!(
        (
            best.iteration,
            best.path.as_str(),
            best.metric.as_str(),
            best.value
        ),
        (20, "/ckpt/20", "knn_top1_k20", 61.5)
    );
    assert_eq!(s.last_checkpoint.as_ref().unwrap().iteration, 30);
    // The progress writer owns it; the controller's writes leave it alone.
    assert_eq!(progress_fields(&s).best_checkpoint, Some(best));
    assert_eq!(
        crate::controller::apply::controller_fields(&s).best_checkpoint,
        None
    );
}

#[tokio::test]
async fn a_run_resumed_on_another_world_size_reports_the_reshard_in_the_status() {
    let store = store_with_job(1);
    let endpoint = serve(store.clone()).await;
    let token = progress_token(KEY, "uid-1", 1);
    let started = |world_size, checkpoint_world_size| {
        report(
            1,
            Event::Started(RunStarted {
                world_size,
                resumed: true,
                checkpoint_iteration: 30,
                checkpoint_path: "/ckpt/ckpt-000000030".into(),
                checkpoint_world_size,
            }),
        )
    };
    // Same world size: the world is recorded, no reshard.
    send(&endpoint, Some(token.clone()), vec![started(4, 4)])
        .await
        .unwrap();
    let status = |store: &MemoryStore| {
        store.jobs.lock().unwrap()[&(JobKind::Pretrain, "ml".to_string(), "vitl".to_string())]
            .status
            .clone()
    };
    let s = status(&store);
    assert_eq!((s.world_size, s.last_reshard.as_ref()), (Some(4), None));
    // 4 -> 2: reported, and kept by the next stream (the endpoint starts from the status).
    send(&endpoint, Some(token.clone()), vec![started(2, 4)])
        .await
        .unwrap();
    send(&endpoint, Some(token), vec![report(1, iteration(31, 1.0))])
        .await
        .unwrap();
    let s = status(&store);
    assert_eq!(s.world_size, Some(2));
    let r = s.last_reshard.expect("the reshard is in the status");
    assert_eq!(
        (
            r.iteration,
            r.path.as_str(),
            r.from_world_size,
            r.to_world_size
        ),
        (30, "/ckpt/ckpt-000000030", 4, 2)
    );
    for w in store.writes.lock().unwrap().iter() {
        assert_eq!(
            crate::controller::apply::controller_fields(w),
            JobStatus::default()
        );
    }
}

/// Reports faster than the write interval: a curriculum phase shorter than the interval still
/// reaches the status, written at its first iteration (issue 12: `curriculumPhase` changing).
#[tokio::test]
async fn a_new_curriculum_phase_is_written_at_once_despite_the_write_interval() {
    let store = store_with_job(0);
    let endpoint = serve(store.clone()).await;
    let token = progress_token(KEY, "uid-1", 0);
    let phased = |i: u64, phase: &str| {
        let Event::Iteration(mut it) = iteration(i, 1.0) else {
            unreachable!()
        };
        it.curriculum_phase = phase.into();
        report(0, Event::Iteration(it))
    };
    // As the trainer streams: started (written at once), then iterations in quick succession.
    let mut reports = vec![report(
        0,
        Event::Started(RunStarted {
            world_size: 1,
            ..Default::default()
        }),
    )];
    reports.extend((1..=5).map(|i| phased(i, "base")));
    reports.extend((6..=8).map(|i| phased(i, "high-res")));
    send(&endpoint, Some(token), reports).await.unwrap();

    let writes = store.writes.lock().unwrap();
    // The first write showing each phase, in order (a slow machine may add throttled writes
    // in between; none may come late or out of order).
    let mut firsts: Vec<(Option<i64>, String)> = Vec::new();
    for w in writes.iter() {
        if let Some(p) = &w.curriculum_phase
            && firsts.last().map(|(_, q)| q) != Some(p)
        {
            firsts.push((w.iteration, p.clone()));
        }
    }
    assert_eq!(
        firsts,
        [(Some(1), "base".to_string()), (Some(6), "high-res".into())],
        "{writes:?}"
    );
    assert_eq!(writes.last().unwrap().iteration, Some(8));
}

#[tokio::test]
async fn wrong_or_missing_token_is_refused() {
    let store = store_with_job(0);
    let endpoint = serve(store.clone()).await;
    let wrong = progress_token(KEY, "uid-of-another-job", 0);
    let err = send(&endpoint, Some(wrong), vec![report(0, iteration(1, 1.0))])
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let err = send(&endpoint, None, vec![report(0, iteration(1, 1.0))])
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(store.writes.lock().unwrap().is_empty());
}

#[tokio::test]
async fn reports_from_an_earlier_attempt_are_refused() {
    let store = store_with_job(3);
    let endpoint = serve(store.clone()).await;
    let token = progress_token(KEY, "uid-1", 2);
    let err = send(&endpoint, Some(token), vec![report(2, iteration(1, 1.0))])
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test]
async fn a_pod_of_an_earlier_attempt_cannot_report_as_the_current_one() {
    let store = store_with_job(3);
    let endpoint = serve(store.clone()).await;
    // Its token is attempt 2's; claiming attempt 3 does not make it attempt 3's.
    let stale = progress_token(KEY, "uid-1", 2);
    let err = send(&endpoint, Some(stale), vec![report(3, iteration(1, 1.0))])
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(store.writes.lock().unwrap().is_empty());
    let current = progress_token(KEY, "uid-1", 3);
    send(&endpoint, Some(current), vec![report(3, iteration(1, 1.0))])
        .await
        .unwrap();
}

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data/tls")
        .join(name)
}

/// The endpoint over TLS with the test fixtures (a certificate for localhost and 127.0.0.1).
async fn serve_tls(store: MemoryStore) -> u16 {
    let files = crate::tls::TlsFiles {
        cert: fixture("server.crt"),
        key: fixture("server.key"),
        ca: fixture("ca.crt"),
    };
    let tls = crate::tls::ServerTls::load(&files, "https://localhost:1").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let svc = ProgressService::new(
        store,
        KEY.to_vec(),
        Leadership::always(),
        Metrics::default(),
    );
    let mut server = crate::tls::server(Some(&tls)).unwrap();
    tokio::spawn(async move {
        server
            .add_service(svc.into_server())
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    port
}

/// A client as the trainer's: trusts `ca` only.
async fn send_tls(
    endpoint: &str,
    ca: &str,
    token: String,
    reports: Vec<ProgressReport>,
) -> Result<ReportAck, String> {
    let pem = std::fs::read(fixture(ca)).unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(pem));
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let mut req = Request::new(futures::stream::iter(reports));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    ProgressClient::new(channel)
        .report(req)
        .await
        .map(Response::into_inner)
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

#[tokio::test]
async fn reports_over_tls_are_accepted_from_a_client_trusting_the_ca() {
    let store = store_with_job(1);
    let port = serve_tls(store.clone()).await;
    let token = progress_token(KEY, "uid-1", 1);
    for host in ["localhost", "127.0.0.1"] {
        let ack = send_tls(
            &format!("https://{host}:{port}"),
            "ca.crt",
            token.clone(),
            vec![report(1, iteration(7, 1.5))],
        )
        .await
        .unwrap();
        assert_eq!(ack.accepted, 1);
    }
    assert_eq!(
        store.writes.lock().unwrap().last().unwrap().iteration,
        Some(7)
    );
}

#[tokio::test]
async fn a_client_trusting_another_ca_or_speaking_plaintext_gets_nothing_through() {
    let store = store_with_job(1);
    let port = serve_tls(store.clone()).await;
    let token = progress_token(KEY, "uid-1", 1);
    let err = send_tls(
        &format!("https://localhost:{port}"),
        "other-ca.crt",
        token.clone(),
        vec![report(1, iteration(7, 1.5))],
    )
    .await
    .unwrap_err();
    assert!(
        err.to_lowercase().contains("certificate") || err.contains("UnknownIssuer"),
        "{err}"
    );
    // Plaintext HTTP/2 against the TLS port: refused as well.
    let plain = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        let mut client = ProgressClient::connect(format!("http://127.0.0.1:{port}"))
            .await
            .map_err(|e| e.to_string())?;
        let mut req = Request::new(futures::stream::iter(vec![report(1, iteration(7, 1.5))]));
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        client.report(req).await.map_err(|s| s.to_string())
    })
    .await;
    assert!(!matches!(plain, Ok(Ok(_))), "{plain:?}");
    assert!(store.writes.lock().unwrap().is_empty());
}

#[tokio::test]
async fn unknown_job_is_not_found() {
    let endpoint = serve(MemoryStore::default()).await;
    let err = send(
        &endpoint,
        Some("x".into()),
        vec![report(0, iteration(1, 1.0))],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[test]
fn non_finite_values_are_not_written_into_the_status() {
    let mut s = JobStatus::default();
    let mut it = IterationDone {
        iteration: 5,
        learning_rate: f64::NAN,
        ..Default::default()
    };
    it.losses.insert("total".into(), f64::INFINITY);
    it.losses.insert("koleo".into(), 0.1);
    apply_report(
        &mut s,
        &report(0, Event::Iteration(it)),
        Timestamp::from_second(1).unwrap(),
    );
    assert_eq!(s.losses.len(), 1);
    assert!(s.learning_rate.is_none());
    // serde_json cannot encode NaN; the patch must serialise.
    serde_json::to_string(&s).unwrap();
}

#[test]
fn evaluations_are_kept_per_name() {
    let mut s = JobStatus::default();
    let eval = |i, name: &str| {
        Event::Evaluation(EvaluationDone {
            iteration: i,
            name: name.into(),
            metrics: Default::default(),
        })
    };
    for e in [eval(1, "knn"), eval(1, "linear"), eval(2, "knn")] {
        apply_report(&mut s, &report(0, e), Timestamp::from_second(1).unwrap());
    }
    let got: Vec<_> = s
        .evaluations
        .iter()
        .map(|e| (e.name.as_str(), e.iteration))
        .collect();
    assert_eq!(got, [("knn", 2), ("linear", 1)]);
}

#[test]
fn the_mfu_is_written_when_reported_and_a_non_finite_one_is_dropped() {
    let mut s = JobStatus::default();
    let at = Timestamp::from_second(1).unwrap();
    apply_report(&mut s, &report(0, iteration(1, 2.0)), at);
    assert_eq!(s.mfu, Some(0.25));
    let unknown = IterationDone {
        iteration: 2,
        mfu: Some(f64::NAN),
        ..Default::default()
    };
    apply_report(&mut s, &report(0, Event::Iteration(unknown)), at);
    assert_eq!(s.mfu, None);
}
