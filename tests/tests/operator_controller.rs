//! The operator against a real control plane. The tests play kubelet: they set pod phases and
//! exit codes through the pod status subresource. Each test runs its own operator scoped to
//! its own namespace, so tests do not see each other's jobs.

mod operator_env;

use std::time::Duration;

use dinoflow_api::DistillJob;
use dinoflow_e2e::{FaultProxy, TestCluster};
use dinoflow_operator::leader::{self, Leadership, LeaseTiming};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use operator_env::{Env, TIMEOUT, env_map, start_operator, wait};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_node_job_creates_exactly_its_service_configmap_and_two_pods_with_the_env_contract() {
    let env = Env::start("op-create").await;
    env.create_pretrain("vitl", json!({"nodes": 2, "gpusPerNode": 0}))
        .await;
    let pods = env.wait_gang("vitl", 0, 2).await;
    assert_eq!(
        pods.iter().map(|p| p.name_any()).collect::<Vec<_>>(),
        ["vitl-a0-0", "vitl-a0-1"]
    );
    let e = env_map(&pods[1]);
    assert_eq!(e["MASTER_ADDR"], format!("vitl-a0-0.vitl.{}.svc", env.ns));
    assert_eq!(e["NNODES"], "2");
    assert_eq!(e["NODE_RANK"], "1");
    assert_eq!(e["NPROC_PER_NODE"], "1");
    assert_eq!(e["WORLD_SIZE"], "2");
    assert_eq!(e["DINOFLOW_JOB"], "vitl");
    assert_eq!(e["DINOFLOW_RUN_ATTEMPT"], "0");

    // The Service and ConfigMap are written in the same round trip as the pods, so they may
    // land a moment after the pods do.
    let services: Vec<Service> = env.wait_children("vitl", 1).await;
    let spec = services[0].spec.clone().unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(spec.publish_not_ready_addresses, Some(true));
    let cm: Vec<ConfigMap> = env.wait_children("vitl", 1).await;
    assert!(cm[0].data.as_ref().unwrap()["config.yaml"].contains("kind: PretrainJob"));

    let s = env
        .wait_status("vitl", "Created condition", |s| s.is_true("Created"))
        .await;
    assert_eq!(s.run_attempt, Some(0));
    for p in &pods {
        env.run_pod(&p.name_any()).await;
    }
    env.wait_status("vitl", "phase Running", |s| {
        s.phase.map(|p| p.as_str()) == Some("Running")
    })
    .await;
    // Still exactly two pods once running.
    assert_eq!(env.job_pods("vitl").await.len(), 2);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_failure_restarts_the_whole_gang_once_and_counts_it() {
    let env = Env::start("op-retry").await;
    env.create_pretrain("r", json!({"nodes": 2, "gpusPerNode": 0}))
        .await;
    let pods = env.wait_gang("r", 0, 2).await;
    for p in &pods {
        env.run_pod(&p.name_any()).await;
    }
    env.exit_pod("r-a0-1", 1).await;
    let pods = env.wait_gang("r", 1, 2).await;
    assert_eq!(env_map(&pods[0])["DINOFLOW_RUN_ATTEMPT"], "1");
    let s = env
        .wait_status("r", "restart recorded", |s| s.restarts == Some(1))
        .await;
    assert_eq!(s.run_attempt, Some(1));
    // Exactly one restart: nothing else happens while the new gang waits.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env.status("r").await.restarts, Some(1));
    assert_eq!(env.job_pods("r").await.len(), 2);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_exit_code_fails_the_job_without_restart() {
    let env = Env::start("op-perm").await;
    env.create_pretrain("p", json!({"nodes": 2, "gpusPerNode": 0}))
        .await;
    let pods = env.wait_gang("p", 0, 2).await;
    for p in &pods {
        env.run_pod(&p.name_any()).await;
    }
    env.exit_pod("p-a0-0", 78).await;
    let s = env
        .wait_status("p", "phase Failed", |s| s.is_true("Failed"))
        .await;
    assert_eq!(s.condition("Failed").unwrap().reason, "PermanentFailure");
    assert_eq!(s.restarts, Some(0));
    // The straggler is deleted, the failed pod kept for its logs, no new attempt appears.
    let left = wait(TIMEOUT, "straggler deleted", || async {
        let pods = env.job_pods("p").await;
        (pods.len() == 1).then_some(pods)
    })
    .await;
    assert_eq!(left[0].name_any(), "p-a0-0");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_backoff_limit_fails_the_job() {
    let env = Env::start("op-backoff").await;
    env.create_pretrain(
        "b",
        json!({"nodes": 1, "gpusPerNode": 0, "runPolicy": {"backoffLimit": 1}}),
    )
    .await;
    env.wait_gang("b", 0, 1).await;
    env.exit_pod("b-a0-0", 1).await;
    env.wait_gang("b", 1, 1).await;
    env.exit_pod("b-a1-0", 1).await;
    let s = env
        .wait_status("b", "phase Failed", |s| s.is_true("Failed"))
        .await;
    assert_eq!(
        s.condition("Failed").unwrap().reason,
        "BackoffLimitExceeded"
    );
    assert_eq!(s.restarts, Some(1));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_deletes_the_pods_and_resume_recreates_them() {
    let env = Env::start("op-suspend").await;
    env.create_pretrain("s", json!({"nodes": 2, "gpusPerNode": 0}))
        .await;
    env.wait_gang("s", 0, 2).await;
    let suspend = |on: bool| json!({"spec": {"cluster": {"runPolicy": {"suspend": on}}}});
    env.pretrain()
        .patch("s", &PatchParams::default(), &Patch::Merge(&suspend(true)))
        .await
        .unwrap();
    env.wait_status("s", "Suspended", |s| s.is_true("Suspended"))
        .await;
    env.wait_gang("s", 0, 0).await;
    env.pretrain()
        .patch("s", &PatchParams::default(), &Patch::Merge(&suspend(false)))
        .await
        .unwrap();
    env.wait_gang("s", 1, 2).await;
    let s = env
        .wait_status("s", "resumed", |s| !s.is_true("Suspended"))
        .await;
    assert_eq!(s.restarts, Some(0), "a suspension is not a failure");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_job_garbage_collects_its_children() {
    let env = Env::start("op-gc").await;
    env.create_pretrain("g", json!({"nodes": 2, "gpusPerNode": 0}))
        .await;
    env.wait_gang("g", 0, 2).await;
    env.pretrain()
        .delete("g", &DeleteParams::foreground())
        .await
        .unwrap();
    env.wait_gang("g", 0, 0).await;
    let _: Vec<ConfigMap> = env.wait_children("g", 0).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distill_job_waits_for_its_teacher_then_gets_its_checkpoint() {
    let env = Env::start("op-distill").await;
    let distill: Api<DistillJob> = Api::namespaced(env.client.clone(), &env.ns);
    let student: DistillJob = serde_json::from_value(json!({
        "apiVersion": "dinoflow.dev/v1alpha1", "kind": "DistillJob",
        "metadata": { "name": "small" },
        "spec": { "teacher": { "pretrainJob": "big" }, "training": { "data": { "path": "/data/train" } }, "cluster": { "nodes": 1, "gpusPerNode": 0 } },
    }))
    .expect("valid DistillJob");
    distill
        .create(&PostParams::default(), &student)
        .await
        .unwrap();
    wait(TIMEOUT, "WaitingForTeacher", || async {
        let s = distill.get("small").await.ok()?.status?;
        s.is_true("WaitingForTeacher").then_some(())
    })
    .await;
    assert!(env.job_pods("small").await.is_empty());

    // The teacher exists (suspended: no pods needed) and then succeeds with a checkpoint.
    env.create_pretrain(
        "big",
        json!({"nodes": 1, "gpusPerNode": 0, "runPolicy": {"suspend": true}}),
    )
    .await;
    let done = json!({"status": {"phase": "Succeeded",
        "lastCheckpoint": {"iteration": 100, "path": "/ckpt/big/iter-100", "time": "2026-01-01T00:00:00Z"}}});
    env.pretrain()
        .patch_status("big", &PatchParams::default(), &Patch::Merge(&done))
        .await
        .unwrap();
    let pods = wait(TIMEOUT, "student pods", || async {
        let pods = env.job_pods("small").await;
        (pods.len() == 1).then_some(pods)
    })
    .await;
    assert_eq!(
        env_map(&pods[0])["DINOFLOW_TEACHER_CHECKPOINT"],
        "/ckpt/big/iter-100"
    );
    let s = distill.get("small").await.unwrap().status.unwrap();
    assert!(!s.is_true("WaitingForTeacher"));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_restarted_mid_run_creates_no_duplicates_and_keeps_status() {
    let mut env = Env::start("op-restart").await;
    env.create_pretrain("k", json!({"nodes": 2, "gpusPerNode": 0}))
        .await;
    let pods = env.wait_gang("k", 0, 2).await;
    env.exit_pod(&pods[0].name_any(), 1).await;
    // Kill the operator as soon as the restart is recorded, before it settles.
    env.wait_status("k", "restart recorded", |s| s.restarts == Some(1))
        .await;
    env.operator.take().unwrap().stop().await;
    env.operator = Some(start_operator(&env.client, &env.ns, Leadership::always()));
    let pods = env.wait_gang("k", 1, 2).await;
    assert_eq!(pods.len(), 2);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = env.status("k").await;
    assert_eq!((s.restarts, s.run_attempt), (Some(1), Some(1)));
    assert_eq!(env.job_pods("k").await.len(), 2);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_replicas_only_the_leader_acts_and_the_other_takes_over() {
    let mut env = Env::without_operator("op-leader").await;
    let timing = LeaseTiming::for_duration(Duration::from_secs(4));
    let lease = "dinoflow-test-leader";
    let (mut a, a_election) =
        leader::elect(env.client.clone(), &env.ns, lease, "replica-a", timing)
            .await
            .unwrap();
    a.acquired().await;
    let (b, b_election) = leader::elect(env.client.clone(), &env.ns, lease, "replica-b", timing)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(a.is_leader() && !b.is_leader(), "exactly one leader");

    // B runs its controllers with its (follower) leadership: every write is fenced.
    let follower = start_operator(&env.client, &env.ns, b.clone());
    env.create_pretrain("l", json!({"nodes": 1, "gpusPerNode": 0}))
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        env.job_pods("l").await.is_empty(),
        "a follower must not act"
    );
    assert!(env.status("l").await.phase.is_none());

    // The leader acts.
    env.operator = Some(start_operator(&env.client, &env.ns, a.clone()));
    env.wait_gang("l", 0, 1).await;

    // The leader shuts down and releases the Lease; B takes over without waiting for expiry
    // (B may be asleep until the expiry it last saw, so allow one lease duration plus slack).
    env.operator.take().unwrap().stop().await;
    a_election.release().await;
    assert!(!a.is_leader(), "a released candidate fences itself");
    let mut b2 = b.clone();
    tokio::time::timeout(Duration::from_secs(20), b2.acquired())
        .await
        .expect("B becomes leader");
    env.create_pretrain("m", json!({"nodes": 1, "gpusPerNode": 0}))
        .await;
    env.wait_gang("m", 0, 1).await;
    follower.stop().await;
    b_election.release().await;
    env.stop().await;
}

/// A leader cut off from the API server (here: a proxy that stops forwarding, as a hung API
/// server or a partition does) stops acting within its renew deadline, before its Lease
/// expires for the others; while it can renew, it keeps leading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_cannot_renew_steps_down_within_the_renew_deadline() {
    let env = Env::without_operator("op-renew").await;
    let mut config = TestCluster::shared().config().await.unwrap();
    let upstream = config.cluster_url.authority().unwrap().as_str().to_string();
    let upstream = tokio::net::lookup_host(upstream)
        .await
        .unwrap()
        .next()
        .unwrap();
    let proxy = FaultProxy::start(upstream).await.unwrap();
    config.cluster_url = format!("https://{}", proxy.addr()).parse().unwrap();
    let client = Client::try_from(config).unwrap();
    // Renews every 3 s, steps down after 6 s without a renewal, expires after 9 s.
    let timing = LeaseTiming::for_duration(Duration::from_secs(9));
    let (mut leadership, election) =
        leader::elect(client, &env.ns, "dinoflow-test-renew", "replica-a", timing)
            .await
            .unwrap();
    tokio::time::timeout(TIMEOUT, leadership.acquired())
        .await
        .expect("leads");
    // Several renew deadlines pass while renewals succeed: no false step-down.
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert!(leadership.is_leader(), "a leader that renews keeps leading");

    proxy.stall(true);
    let stalled = std::time::Instant::now();
    // At most the deadline (6 s) after the last renewal, plus one check period and one
    // bounded read-back (2 s each).
    tokio::time::timeout(Duration::from_secs(14), leadership.lost())
        .await
        .expect("the leader steps down within its renew deadline");
    assert!(
        leadership.ensure().is_err(),
        "and its write fence is closed"
    );
    let took = stalled.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "not before a renewal was due: {took:?}"
    );
    // Release cannot reach the API server either; it gives up instead of hanging.
    tokio::time::timeout(Duration::from_secs(15), election.release())
        .await
        .expect("release is bounded");
    proxy.stall(false);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_deleted_pod_restarts_the_running_gang_instead_of_joining_a_replacement() {
    let env = Env::start("op-vanish").await;
    env.create_pretrain("v", json!({"nodes": 2, "gpusPerNode": 0}))
        .await;
    let pods = env.wait_gang("v", 0, 2).await;
    for p in &pods {
        env.run_pod(&p.name_any()).await;
    }
    env.wait_status("v", "phase Running", |s| {
        s.phase.map(|p| p.as_str()) == Some("Running")
    })
    .await;
    let force = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    env.pods().delete("v-a0-1", &force).await.unwrap();
    // The whole gang restarts as attempt 1; no lone attempt-0 replacement is created.
    env.wait_gang("v", 1, 2).await;
    let s = env
        .wait_status("v", "disruption recorded", |s| s.disruptions == Some(1))
        .await;
    assert_eq!((s.restarts, s.run_attempt), (Some(0), Some(1)));
    env.stop().await;
}

/// A PretrainJob and a DistillJob of one name run side by side in one namespace, each with
/// its own children (the DistillJob's named `<name>-distill...`), neither touching the other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pretrain_job_and_a_distill_job_of_the_same_name_run_side_by_side() {
    let env = Env::start("op-same-name").await;
    env.create_pretrain("twin", json!({"nodes": 2, "gpusPerNode": 0}))
        .await;
    let student: DistillJob = serde_json::from_value(json!({
        "apiVersion": "dinoflow.dev/v1alpha1", "kind": "DistillJob",
        "metadata": { "name": "twin" },
        "spec": {
            "teacher": { "checkpoint": { "format": "dinoflow", "path": "/ckpt/teacher" } },
            "training": { "data": { "path": "/data/train" } },
            "cluster": { "nodes": 1, "gpusPerNode": 0 },
        },
    }))
    .expect("valid DistillJob");
    env.distill()
        .create(&PostParams::default(), &student)
        .await
        .unwrap();
    let gang = |kind: &'static str, n: usize| {
        let env = &env;
        wait(TIMEOUT, kind, move || async move {
            let pods = env.kind_pods(kind, "twin").await;
            (pods.len() == n).then_some(pods)
        })
    };
    let pretrain_pods = gang("PretrainJob", 2).await;
    let distill_pods = gang("DistillJob", 1).await;
    let names = |pods: &[k8s_openapi::api::core::v1::Pod]| {
        pods.iter().map(|p| p.name_any()).collect::<Vec<_>>()
    };
    assert_eq!(names(&pretrain_pods), ["twin-a0-0", "twin-a0-1"]);
    assert_eq!(names(&distill_pods), ["twin-distill-a0-0"]);
    let e = env_map(&distill_pods[0]);
    assert_eq!(
        e["MASTER_ADDR"],
        format!("twin-distill-a0-0.twin-distill.{}.svc", env.ns)
    );
    assert_eq!(e["DINOFLOW_JOB"], "twin");
    assert_eq!(e["DINOFLOW_JOB_KIND"], "DistillJob");
    assert_eq!(
        env_map(&pretrain_pods[1])["MASTER_ADDR"],
        format!("twin-a0-0.twin.{}.svc", env.ns)
    );

    // Each kind's Service and ConfigMap, owned by its own job; the Services select by kind.
    let services: Api<Service> = Api::namespaced(env.client.clone(), &env.ns);
    let config_maps: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.ns);
    for (service, config, kind) in [
        ("twin", "twin-config", "PretrainJob"),
        ("twin-distill", "twin-distill-config", "DistillJob"),
    ] {
        let svc = wait(TIMEOUT, service, || async {
            services.get(service).await.ok()
        })
        .await;
        assert_eq!(svc.owner_references()[0].kind, kind);
        let selector = svc.spec.unwrap().selector.unwrap();
        assert_eq!(selector["dinoflow.dev/job-kind"], kind);
        let cm = wait(TIMEOUT, config, || async {
            config_maps.get(config).await.ok()
        })
        .await;
        assert_eq!(cm.owner_references()[0].kind, kind);
        assert!(cm.data.unwrap()["config.yaml"].contains(&format!("kind: {kind}")));
    }

    // Both run; the DistillJob fails for good, the PretrainJob is untouched by it.
    for p in pretrain_pods.iter().chain(&distill_pods) {
        env.run_pod(&p.name_any()).await;
    }
    env.wait_status("twin", "PretrainJob Running", |s| {
        s.phase.map(|p| p.as_str()) == Some("Running")
    })
    .await;
    env.exit_pod("twin-distill-a0-0", 78).await;
    wait(TIMEOUT, "DistillJob Failed", || async {
        let s = env.distill().get("twin").await.ok()?.status?;
        s.is_true("Failed").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = env.status("twin").await;
    assert_eq!(s.phase.map(|p| p.as_str()), Some("Running"));
    assert_eq!((s.restarts, s.disruptions.unwrap_or(0)), (Some(0), 0));
    assert_eq!(
        names(&env.kind_pods("PretrainJob", "twin").await),
        ["twin-a0-0", "twin-a0-1"]
    );
    env.stop().await;
}

/// A child's name taken by an object the job does not own (here a person's ConfigMap) is
/// not written over: the job says why (`Synced=False`, a Warning event) and creates no pod
/// that would mount it; once the name is free, the job proceeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_name_taken_by_an_object_the_job_does_not_own_is_not_overwritten() {
    let env = Env::start("op-not-owned").await;
    let config_maps: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.ns);
    let theirs: ConfigMap = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": "mine-config" },
        "data": { "keep": "me" },
    }))
    .unwrap();
    config_maps
        .create(&PostParams::default(), &theirs)
        .await
        .unwrap();
    env.create_pretrain("mine", json!({"nodes": 2, "gpusPerNode": 0}))
        .await;
    let s = env
        .wait_status("mine", "Synced=False", |s| {
            s.condition("Synced").is_some_and(|c| c.status == "False")
        })
        .await;
    let synced = s.condition("Synced").unwrap();
    assert_eq!(synced.reason, "InvalidJob");
    for part in ["ConfigMap", "mine-config", "has no controller", "delete"] {
        assert!(synced.message.contains(part), "{part}: {}", synced.message);
    }
    wait(TIMEOUT, "a ReconcileError event", || async {
        let events = env.events("mine").await;
        events
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("ReconcileError")
                    && e.note.as_deref().is_some_and(|n| n.contains("mine-config"))
            })
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let kept = config_maps.get("mine-config").await.unwrap();
    assert_eq!(
        kept.data.clone().unwrap(),
        [("keep".to_string(), "me".to_string())].into()
    );
    assert!(kept.owner_references().is_empty(), "not taken over");
    assert!(
        env.job_pods("mine").await.is_empty(),
        "no pod mounts a ConfigMap the job does not own"
    );

    // The name is freed: the next retry creates the job's own ConfigMap and its gang.
    config_maps
        .delete("mine-config", &DeleteParams::default())
        .await
        .unwrap();
    env.wait_gang("mine", 0, 2).await;
    let ours = config_maps.get("mine-config").await.unwrap();
    assert_eq!(ours.owner_references()[0].kind, "PretrainJob");
    env.wait_status("mine", "Synced=True", |s| s.is_true("Synced"))
        .await;
    env.stop().await;
}
