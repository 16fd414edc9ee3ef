//! The operator under faults, against a real control plane (issue 15): a child the API
//! server refuses, a job whose name cannot name its children, a DistillJob whose teacher is
//! deleted after its checkpoint was pinned, and a node lost with the gang's pods on it. Each
//! of these failed on the operator before its fix (operator/FAULTS.md).

mod operator_env;

use std::time::{Duration, Instant};

use dinoflow_api::DistillJob;
use dinoflow_api::status::JobStatus;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Resource, ResourceExt};
use operator_env::{Env, TIMEOUT, env_map, wait};
use serde_json::json;

/// A child the API server refuses (422: a pod label value no label may have, which the CRD's
/// schema cannot check) is visible on the job (`Synced=False`, a Warning event) and retried
/// ever more slowly (exponential backoff with jitter), not at a fixed 5 s pace forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_child_is_reported_and_retried_with_growing_intervals() {
    let env = Env::start("op-refused").await;
    env.create_pretrain(
        "refused",
        json!({"nodes": 1, "gpusPerNode": 0,
               "podTemplate": {"labels": {"team": "not a label value!"}}}),
    )
    .await;
    let s = env
        .wait_status("refused", "Synced=False", |s| {
            s.condition("Synced").is_some_and(|c| c.status == "False")
        })
        .await;
    let synced = s.condition("Synced").unwrap();
    assert_eq!(synced.reason, "KubernetesAPIError");
    assert!(
        synced.message.contains("metadata.labels") && synced.message.contains("not a label value!"),
        "the API server's refusal, naming the field: {}",
        synced.message
    );
    wait(TIMEOUT, "a ReconcileError event", || async {
        let events = env.events("refused").await;
        events
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("ReconcileError")
                    && e.type_.as_deref() == Some("Warning")
            })
            .then_some(())
    })
    .await;

    // When each failed reconcile happened, from the operator's failure counter.
    let errors = env
        .metrics
        .errors
        .with_label_values(&["PretrainJob", "kube"]);
    let (mut seen, mut at) = (errors.get(), Vec::new());
    let started = Instant::now();
    while at.len() < 4 && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(25)).await;
        let now = errors.get();
        if now > seen {
            at.push(Instant::now());
            seen = now;
        }
    }
    assert!(at.len() >= 4, "4 retries within 60 s, saw {}", at.len());
    let gaps: Vec<f64> = at.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
    eprintln!("retry intervals: {gaps:.2?} s (after {} failures)", seen);
    // Each wait at least half the doubled one before it (equal jitter), so they grow: two
    // doublings apart, the later is more than 1.5 times the earlier. A fixed pace fails this.
    assert!(
        gaps[2] > 1.5 * gaps[0],
        "retry intervals do not grow: {gaps:.2?} s"
    );
    for w in gaps.windows(2) {
        assert!(
            w[1] > 0.75 * w[0],
            "a retry came sooner than the last: {gaps:.2?} s"
        );
    }
    assert!(env.job_pods("refused").await.is_empty());
    env.stop().await;
}

/// A job named `7b` (a valid custom resource name, no valid Service name) fails at once as
/// InvalidJob, saying why and what to do, instead of looping on the API server's 422.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_name_cannot_name_a_service_fails_as_invalid_without_retrying() {
    let env = Env::start("op-7b").await;
    env.create_pretrain("7b", json!({"nodes": 1, "gpusPerNode": 0}))
        .await;
    let s = env
        .wait_status("7b", "phase Failed", |s| s.is_true("Failed"))
        .await;
    let failed = s.condition("Failed").unwrap();
    assert_eq!(failed.reason, "InvalidJob");
    assert!(failed.message.contains("DNS-1035"), "{}", failed.message);
    assert!(failed.message.contains("\"job-7b\""), "{}", failed.message);
    wait(TIMEOUT, "an InvalidJob event", || async {
        let events = env.events("7b").await;
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("InvalidJob"))
            .then_some(())
    })
    .await;
    // Nothing was sent to be refused, and nothing is retried.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let errors = env
        .metrics
        .errors
        .with_label_values(&["PretrainJob", "kube"]);
    assert_eq!(errors.get(), 0, "no API call failed");
    let services: Api<Service> = Api::namespaced(env.client.clone(), &env.ns);
    assert!(
        services
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert!(env.job_pods("7b").await.is_empty());
    env.stop().await;
}

/// A DistillJob whose teacher PretrainJob is deleted (its TTL, a person) after the student
/// pinned the teacher's checkpoint keeps going: a restart distils from the same checkpoint,
/// and the job never falls back to WaitingForTeacher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_distill_job_whose_teacher_is_deleted_after_pinning_restarts_from_the_pinned_checkpoint()
{
    let env = Env::start("op-teacher-gone").await;
    let student: DistillJob = serde_json::from_value(json!({
        "apiVersion": "dinoflow.dev/v1alpha1", "kind": "DistillJob",
        "metadata": { "name": "small" },
        "spec": { "teacher": { "pretrainJob": "big" }, "training": { "data": { "path": "/data/train" } }, "cluster": { "nodes": 1, "gpusPerNode": 0 } },
    }))
    .expect("valid DistillJob");
    env.distill()
        .create(&PostParams::default(), &student)
        .await
        .unwrap();
    // The teacher exists (suspended: no pods needed) and succeeds with a checkpoint.
    env.create_pretrain(
        "big",
        json!({"nodes": 1, "gpusPerNode": 0, "runPolicy": {"suspend": true}}),
    )
    .await;
    let done = json!({"status": {"phase": "Succeeded",
        "lastCheckpoint": {"iteration": 100, "path": "/ckpt/big/iter-100", "time": "2026-01-01T00:00:00Z"}}});
    env.pretrain()
        .patch_status(
            "big",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&done),
        )
        .await
        .unwrap();
    let distill_status = |env: &Env| {
        let api = env.distill();
        async move { api.get("small").await.unwrap().status.unwrap_or_default() }
    };
    let pods = wait(TIMEOUT, "student pod of attempt 0", || async {
        let pods = env.kind_pods("DistillJob", "small").await;
        (pods.len() == 1).then_some(pods)
    })
    .await;
    let pinned = distill_status(&env).await.teacher_checkpoint;
    assert_eq!(pinned.as_deref(), Some("/ckpt/big/iter-100"));

    // The teacher goes; the student's pod fails and the gang restarts.
    env.pretrain()
        .delete("big", &DeleteParams::background())
        .await
        .unwrap();
    wait(TIMEOUT, "teacher gone", || async {
        env.pretrain()
            .get_opt("big")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    env.run_pod(&pods[0].name_any()).await;
    env.exit_pod(&pods[0].name_any(), 1).await;
    let never_waiting = |s: &JobStatus| {
        assert!(
            !s.is_true("WaitingForTeacher"),
            "back to waiting for a deleted teacher: {:?}",
            s.message
        );
    };
    let restarted = wait(TIMEOUT, "student pod of attempt 1", || async {
        never_waiting(&distill_status(&env).await);
        let pods = env.kind_pods("DistillJob", "small").await;
        let attempt1 = pods.iter().find(|p| {
            p.labels()
                .get("dinoflow.dev/run-attempt")
                .map(String::as_str)
                == Some("1")
        });
        attempt1.cloned()
    })
    .await;
    assert_eq!(
        env_map(&restarted)["DINOFLOW_TEACHER_CHECKPOINT"],
        "/ckpt/big/iter-100"
    );
    let s = distill_status(&env).await;
    never_waiting(&s);
    assert_eq!(s.restarts, Some(1));
    assert_eq!(s.teacher_checkpoint.as_deref(), Some("/ckpt/big/iter-100"));
    env.stop().await;
}

/// A node that stops answering: its pods stay Terminating (no kubelet confirms a deletion),
/// so a restart waiting for the old gang would wait forever. The operator force-deletes the
/// pods still there 60 s past their grace period and starts the next attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_stuck_terminating_on_a_lost_node_are_force_deleted_and_the_job_restarts() {
    let env = Env::start("op-node-lost").await;
    let node_name = format!("lost-{}", env.ns);
    let nodes: Api<Node> = Api::all(env.client.clone());
    // A node that never reports (no kubelet); tainted so the scheduler places nothing of
    // other tests there: the pods are bound to it directly.
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": node_name },
        "spec": { "taints": [{ "key": "dinoflow.dev/test-lost-node", "effect": "NoSchedule" }] },
    }))
    .unwrap();
    nodes.create(&PostParams::default(), &node).await.unwrap();

    // Grace period 1 s: the pods' deletion deadline comes at once, the 60 s wait is the
    // operator's own.
    env.create_pretrain(
        "n",
        json!({"nodes": 2, "gpusPerNode": 0, "terminationGracePeriodSeconds": 1}),
    )
    .await;
    let pods = env.wait_gang("n", 0, 2).await;
    for p in &pods {
        bind(&env, &p.name_any(), &node_name).await;
        env.run_pod(&p.name_any()).await;
    }
    env.wait_status("n", "phase Running", |s| {
        s.phase.map(|p| p.as_str()) == Some("Running")
    })
    .await;

    // The node is lost: a pod on it is deleted (as the taint manager evicts), and stays.
    let lost_at = Instant::now();
    env.pods()
        .delete("n-a0-1", &DeleteParams::default())
        .await
        .unwrap();
    let s = env
        .wait_status("n", "restart waiting for the old gang", |s| {
            s.phase.map(|p| p.as_str()) == Some("Restarting")
        })
        .await;
    assert_eq!(s.disruptions, Some(1), "a lost node is a disruption");
    let terminating = env.job_pods("n").await;
    assert!(
        terminating
            .iter()
            .all(|p| p.meta().deletion_timestamp.is_some()),
        "both pods of attempt 0 are terminating and stay"
    );

    let pods = wait(
        Duration::from_secs(150),
        "the next attempt after the stuck pods were force-deleted",
        || async {
            let pods = env.job_pods("n").await;
            let current = pods.iter().all(|p| {
                p.labels()
                    .get("dinoflow.dev/run-attempt")
                    .map(String::as_str)
                    == Some("1")
            });
            (pods.len() == 2 && current).then_some(pods)
        },
    )
    .await;
    let took = lost_at.elapsed();
    eprintln!("attempt 1 created {took:?} after the node was lost");
    assert!(
        took >= Duration::from_secs(60),
        "not before the pods were 60 s past their grace period: {took:?}"
    );
    assert_eq!(pods.len(), 2);
    let events = env.events("n").await;
    assert!(
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("ForceDeletingStuckPods")),
        "the force deletion is reported"
    );
    let s = env.status("n").await;
    assert_eq!(
        (s.restarts, s.disruptions, s.run_attempt),
        (Some(0), Some(1), Some(1))
    );

    // Nothing may stay stuck behind the test (namespace deletion would wait on them).
    let force = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    for p in env.job_pods("n").await {
        let _ = env.pods().delete(&p.name_any(), &force).await;
    }
    let _ = nodes.delete(&node_name, &DeleteParams::default()).await;
    env.stop().await;
}

/// Plays the scheduler: binds `pod` to `node`.
async fn bind(env: &Env, pod: &str, node: &str) {
    let binding = json!({
        "apiVersion": "v1", "kind": "Binding",
        "metadata": { "name": pod },
        "target": { "apiVersion": "v1", "kind": "Node", "name": node },
    });
    let pods: Api<Pod> = env.pods();
    pods.create_subresource::<serde_json::Value, serde_json::Value>(
        "binding",
        pod,
        &PostParams::default(),
        &binding,
    )
    .await
    .unwrap_or_else(|e| panic!("binding {pod} to {node}: {e}"));
}
