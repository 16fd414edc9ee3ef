//! From `kubectl apply` to a trained, checkpointed model on one machine, on the real node: one
//! local control plane per test binary (kube-scheduler included), the CRDs from crds/, the
//! real operator, and a kubelet with containerd, runc, a CNI bridge and CoreDNS
//! (`scripts/node.sh`) running the operator's pods as containers of the CPU trainer image
//! (`scripts/images.sh`), each with its own IP, the gang finding rank 0 by the headless
//! Service's DNS name. A small job derived from manifests/examples/tiny-cpu-fashion-mnist.yaml.
//!
//! The operator runs in-process (its controllers, and its gRPC progress endpoint on an
//! ephemeral port of the host's bridge address, which the pods reach by the chart's Service
//! name; scoped to the test's namespace), not as a pod: each test stops its own operator
//! deterministically, and the tests of the chart run it from its image. The binaries and the
//! image are built by the harness (cargo into this test's target directory, then
//! `scripts/images.sh --bin-dir`, cached by its inputs). The world itself is in `support/`
//! (shared with e2e_reshard.rs and e2e_observability.rs, which run on the node agent and say
//! why). Needs root (the node).
mod support;

use std::time::Duration;

use dinoflow_e2e::REAL_NODE_NAME;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use serde_yaml_ng::Value;
use support::{World, kill_pod_processes, pod_log, tiny_job};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pretrain_job_applied_with_kubectl_trains_on_the_real_node_to_a_verified_checkpoint() {
    let started = std::time::Instant::now();
    let world = World::start("e2e-train").await;
    let out = world.dir.join("checkpoints");
    world.kubectl_apply(&tiny_job(&world, "tiny", 1, 2, 100, &out));

    let status = world
        .wait_status("tiny", "phase Succeeded", Duration::from_secs(120), |s| {
            s.phase.map(|p| p.as_str()) == Some("Succeeded")
        })
        .await;
    // Progress streamed by the trainer (its token and run attempt accepted by the operator).
    assert_eq!(status.iteration, Some(12), "{status:?}");
    assert_eq!(status.total_iterations, Some(12), "{status:?}");
    assert_eq!(status.restarts, Some(0));
    let checkpoint = status
        .last_checkpoint
        .clone()
        .expect("a checkpoint reported");
    assert_eq!(checkpoint.iteration, 12);
    // The trainer wrote to the volume's host directory.
    assert!(
        checkpoint.path.starts_with("/checkpoints/tiny/"),
        "{checkpoint:?}"
    );
    let ckpt = world.host_path(&checkpoint.path, &out);
    assert!(
        ckpt.join("manifest.json").is_file(),
        "{} has no manifest.json",
        ckpt.display()
    );
    assert!(out.join("tiny/metrics.jsonl").is_file());

    // The env contract reached the process: the launcher logs what it read.
    let pods = world.pods("tiny").await;
    assert_eq!(pods.len(), 1);
    let pod = &pods[0];
    let log = pod_log(&world, &pod.name_any());
    let launch = log
        .lines()
        .find(|l| l.contains("launching workers"))
        .unwrap_or_else(|| panic!("no launcher line in the log:\n{log}"));
    for expected in [
        "node_rank=0".to_string(),
        "nnodes=1".into(),
        "world_size=1".into(),
        format!("master=tiny-a0-0.tiny.{}.svc:29500", world.ns),
    ] {
        assert!(
            launch.contains(&expected),
            "{expected} missing in: {launch}"
        );
    }
    assert_eq!(
        pod.status.as_ref().unwrap().phase.as_deref(),
        Some("Succeeded")
    );
    assert_ran_as_a_container(&world, pod);
    assert_eq!(exit_code(pod), Some(0));
    world.stop().await;
    eprintln!(
        "[e2e] one-node job on the real node: {:?}",
        started.elapsed()
    );
}

/// `pod` ran on the real node as a container of containerd, with an IP of the node's pod
/// network; returns the IP.
fn assert_ran_as_a_container(world: &World, pod: &Pod) -> String {
    let real = world.real.expect("a world on the real node");
    let name = pod.name_any();
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.node_name.as_deref(), Some(REAL_NODE_NAME), "{name}");
    let status = pod.status.as_ref().unwrap();
    let container = &status.container_statuses.as_ref().unwrap()[0];
    let id = container.container_id.as_deref().unwrap_or_default();
    assert!(id.starts_with("containerd://"), "{name}: container {id:?}");
    assert_eq!(container.image, real.image, "{name}");
    let ip = status.pod_ip.clone().unwrap_or_default();
    let subnet = real.node.env("SUBNET").unwrap();
    assert!(
        ip.starts_with(subnet.trim_end_matches("0/24")),
        "{name}: pod IP {ip:?} not in the node's {subnet}"
    );
    ip
}

/// The exit code of `pod`'s terminated trainer container.
fn exit_code(pod: &Pod) -> Option<i32> {
    let status = pod.status.as_ref()?.container_statuses.as_ref()?.first()?;
    Some(status.state.as_ref()?.terminated.as_ref()?.exit_code)
}

/// A two-phase curriculum (`training.curriculum`): 6 iterations at 28px global crops, then 6
/// at 42px with 8 instead of 16 images. A watch on the job records every `curriculumPhase`
/// the API server stored: exactly `base`, then `high-res` (the operator writes a phase change
/// at once, whatever the machine's speed); `kubectl get ptj -o yaml` shows the last one, and
/// metrics.jsonl shows the crop size change after iteration 6.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_phase_curriculum_switches_crops_and_the_status_shows_the_phase() {
    let started = std::time::Instant::now();
    let world = World::start("e2e-curric").await;
    let out = world.dir.join("checkpoints");
    let mut job: Value =
        serde_yaml_ng::from_str(&tiny_job(&world, "curric", 1, 2, 100, &out)).unwrap();
    job["spec"]["training"]["curriculum"] = serde_yaml_ng::from_str(
        "{phases: [{name: high-res, startIteration: 6, globalCropsSize: 42, \
         localCropsSize: 21, batchSizePerGpu: 8}]}",
    )
    .unwrap();
    // Watching from before the apply sees every version of the object, not a sample of them.
    let phases = watch_curriculum_phases(&world, "curric").await;
    world.kubectl_apply(&serde_yaml_ng::to_string(&job).unwrap());

    let status = world
        .wait_status("curric", "phase Succeeded", Duration::from_secs(120), |s| {
            s.phase.map(|p| p.as_str()) == Some("Succeeded")
        })
        .await;
    assert_eq!(status.iteration, Some(12), "{status:?}");
    let seen = tokio::time::timeout(Duration::from_secs(30), phases)
        .await
        .expect("the watch sees the job succeed")
        .unwrap();
    assert_eq!(
        seen,
        ["base", "high-res"],
        "status.curriculumPhase over time"
    );
    let yaml = world
        .cluster
        .kubectl(["get", "ptj", "curric", "-n", &world.ns, "-o", "yaml"])
        .unwrap()
        .ok()
        .unwrap_or_else(|e| panic!("{e}"));
    let shown: Value = serde_yaml_ng::from_str(&yaml).unwrap();
    assert_eq!(
        shown["status"]["curriculumPhase"].as_str(),
        Some("high-res"),
        "{yaml}"
    );

    let text = std::fs::read_to_string(out.join("curric/metrics.jsonl")).unwrap();
    let crops: Vec<(u64, u64, u64)> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "train")
        .map(|v| {
            let c = &v["curriculum"];
            (
                v["iteration"].as_u64().unwrap(),
                c["global_crops_size"].as_u64().unwrap(),
                c["batch_size_per_gpu"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected: Vec<(u64, u64, u64)> = (1..=12)
        .map(|it| if it <= 6 { (it, 28, 16) } else { (it, 42, 8) })
        .collect();
    assert_eq!(crops, expected);
    world.stop().await;
    eprintln!("two-phase curriculum e2e: {:?}", started.elapsed());
}

/// Watches the PretrainJob `name` (from now on, so it may not exist yet) until it finishes,
/// and returns every value its `status.curriculumPhase` took, in order, repeats collapsed.
async fn watch_curriculum_phases(
    world: &World,
    name: &str,
) -> tokio::task::JoinHandle<Vec<String>> {
    use futures::StreamExt;
    use kube::api::{ListParams, WatchEvent, WatchParams};
    let api = world.jobs();
    let fields = format!("metadata.name={name}");
    let version = api
        .list(&ListParams::default().fields(&fields))
        .await
        .expect("list jobs")
        .metadata
        .resource_version
        .expect("a list has a resourceVersion");
    let events = api
        .watch(
            &WatchParams::default().fields(&fields).timeout(290),
            &version,
        )
        .await
        .expect("watch the job");
    tokio::spawn(async move {
        let mut events = std::pin::pin!(events);
        let mut seen: Vec<String> = Vec::new();
        while let Some(event) = events.next().await {
            let job = match event.expect("watch event") {
                WatchEvent::Added(j) | WatchEvent::Modified(j) => j,
                WatchEvent::Bookmark(_) => continue,
                WatchEvent::Deleted(_) => break,
                WatchEvent::Error(e) => panic!("watch error: {e:?}"),
            };
            let status = job.status.unwrap_or_default();
            if let Some(p) = status.curriculum_phase
                && seen.last() != Some(&p)
            {
                seen.push(p);
            }
            if status.phase.is_some_and(|p| p.is_finished()) {
                break;
            }
        }
        seen
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_trainer_restarts_the_gang_which_resumes_from_the_checkpoint_and_succeeds() {
    let world = World::start("e2e-restart").await;
    let out = world.dir.join("checkpoints");
    world.kubectl_apply(&tiny_job(&world, "resume", 1, 8, 6, &out));

    world
        .wait_status(
            "resume",
            "a checkpoint at iteration 6",
            Duration::from_secs(120),
            |s| s.last_checkpoint.as_ref().is_some_and(|c| c.iteration >= 6),
        )
        .await;
    // Kill the container's processes the hard way (no checkpoint on the way out).
    let pods = world.pods("resume").await;
    assert_eq!(pods[0].name_any(), "resume-a0-0");
    kill_pod_processes(&world, "resume-a0-0").await;

    let status = world
        .wait_status(
            "resume",
            "phase Succeeded after one restart",
            Duration::from_secs(150),
            |s| s.phase.map(|p| p.as_str()) == Some("Succeeded"),
        )
        .await;
    // The trainer was killed after a verified checkpoint: the restart is charged to the
    // progress budget, not to backoffLimit (issue 15's checkpoint-aware budget).
    assert_eq!(status.progress_restarts, Some(1), "{status:?}");
    assert_eq!(status.restarts, Some(0), "{status:?}");
    assert!(
        status.attempt_checkpoint_iteration.is_some_and(|i| i >= 6),
        "{status:?}"
    );
    assert_eq!(status.run_attempt, Some(1), "{status:?}");
    assert_eq!(status.iteration, Some(48), "{status:?}");
    assert_eq!(
        status.last_checkpoint.as_ref().map(|c| c.iteration),
        Some(48)
    );

    let first = world.pods("resume").await;
    let failed = first.iter().find(|p| p.name_any() == "resume-a0-0");
    if let Some(failed) = failed {
        assert_eq!(
            exit_code(failed),
            Some(137),
            "SIGKILL is reported as 128 + 9"
        );
    }
    let log = pod_log(&world, "resume-a1-0");
    let resumed = log
        .lines()
        .find(|l| l.contains("resumed from checkpoint"))
        .unwrap_or_else(|| panic!("attempt 1 did not resume:\n{log}"));
    let from: u64 = resumed
        .split("iteration=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no iteration in: {resumed}"));
    assert!(
        (6..48).contains(&from) && from.is_multiple_of(6),
        "{resumed}"
    );
    world.stop().await;
}

/// Issue 13's acceptance: a 2-node job's pods run as containers on the real kubelet, have
/// distinct pod IPs, and rank 1 reaches rank 0 by the headless Service's DNS name through
/// CoreDNS (its log says which address the name gave: rank 0's pod IP). The gang trains to
/// Succeeded, its progress reaches the job's status, and both ranks end with the same weights.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_node_job_runs_as_containers_that_meet_by_dns_and_train_as_one_gang() {
    let started = std::time::Instant::now();
    let world = World::start("e2e-gang").await;
    let out = world.dir.join("checkpoints");
    world.kubectl_apply(&tiny_job(&world, "gang", 2, 2, 100, &out));

    let status = world
        .wait_status("gang", "phase Succeeded", Duration::from_secs(150), |s| {
            s.phase.map(|p| p.as_str()) == Some("Succeeded")
        })
        .await;
    let trained = started.elapsed();
    assert_eq!(status.iteration, Some(12), "{status:?}");
    assert_eq!(status.world_size, Some(2), "{status:?}");
    let checkpoint = status
        .last_checkpoint
        .clone()
        .expect("a checkpoint reported");
    assert!(
        world
            .host_path(&checkpoint.path, &out)
            .join("manifest.json")
            .is_file()
    );

    let pods = world.pods("gang").await;
    let names: Vec<String> = pods.iter().map(ResourceExt::name_any).collect();
    assert_eq!(names, ["gang-a0-0", "gang-a0-1"]);
    let ips: Vec<String> = pods
        .iter()
        .map(|p| assert_ran_as_a_container(&world, p))
        .collect();
    assert_ne!(ips[0], ips[1], "each pod has its own IP");

    let master = format!("gang-a0-0.gang.{}.svc:29500", world.ns);
    let mut digests = Vec::new();
    for (rank, pod) in pods.iter().enumerate() {
        assert_eq!(exit_code(pod), Some(0), "rank {rank}");
        let log = pod_log(&world, &names[rank]);
        let launch = log
            .lines()
            .find(|l| l.contains("launching workers"))
            .unwrap_or_else(|| panic!("no launcher line in rank {rank}'s log:\n{log}"));
        for expected in [
            format!("node_rank={rank}"),
            "nnodes=2".into(),
            "world_size=2".into(),
            format!("master={master}"),
        ] {
            assert!(
                launch.contains(&expected),
                "{expected} missing in: {launch}"
            );
        }
        let digest = log
            .lines()
            .find_map(|l| l.split("student_sha256=").nth(1))
            .and_then(|d| d.split_whitespace().next())
            .unwrap_or_else(|| panic!("no final digest in rank {rank}'s log:\n{log}"))
            .to_string();
        digests.push(digest);
    }
    // Rank 1 resolved MASTER_ADDR through CoreDNS to rank 0's pod IP and connected there.
    let log = pod_log(&world, "gang-a0-1");
    let reached = log
        .lines()
        .find(|l| l.contains("reached rank 0"))
        .unwrap_or_else(|| panic!("rank 1 does not say it reached rank 0:\n{log}"));
    assert!(
        reached.contains(&format!("master={master}"))
            && reached.contains(&format!("address={}:29500", ips[0])),
        "rank 1 reached rank 0 elsewhere than {master} = {}: {reached}",
        ips[0]
    );
    assert_eq!(
        digests[0], digests[1],
        "the ranks ended with different weights"
    );
    world.stop().await;
    eprintln!(
        "[e2e] two-node gang on the real node: Succeeded {trained:?} after the test started, test {:?}",
        started.elapsed()
    );
}
