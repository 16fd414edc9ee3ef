//! From `kubectl apply` to a trained, checkpointed model on one machine: the shared local
//! control plane (kube-scheduler included), the CRDs from crds/, the real operator and the
//! local node agent (crate `dinoflow-node-agent`, tests/node-agent) running the operator's pods as trainer
//! processes. A small job derived from manifests/examples/tiny-cpu-fashion-mnist.yaml.
//!
//! The operator runs in-process (its controllers and its gRPC progress endpoint on an
//! ephemeral 127.0.0.1 port, scoped to the test's namespace), not as the `dinoflow-operator`
//! binary: nothing else to build, no port to guess, and each test stops its own operator
//! deterministically. scripts/demo.sh runs the binary. The trainer is built by
//! `dinoflow_e2e::build_workspace_binary` (cargo, into this test's target directory). The
//! world itself is in `support/` (shared with e2e_observability.rs).
mod support;

use std::path::PathBuf;
use std::time::Duration;

use dinoflow_node_agent::terminated_state;
use kube::ResourceExt;
use serde_yaml_ng::Value;
use support::{World, kill_pod_processes, pod_log, tiny_job, tiny_job_on};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pretrain_job_applied_with_kubectl_trains_on_the_local_node_to_a_verified_checkpoint() {
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
    // The trainer wrote to the claim's host directory through the path mapping.
    let ckpt = PathBuf::from(&checkpoint.path);
    assert!(ckpt.starts_with(out.join("tiny")), "{}", ckpt.display());
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
    let port = pod.spec.as_ref().unwrap().containers[0]
        .ports
        .as_ref()
        .unwrap()[0]
        .container_port;
    let log = pod_log(&world, &pod.name_any());
    let launch = log
        .lines()
        .find(|l| l.contains("launching workers"))
        .unwrap_or_else(|| panic!("no launcher line in the log:\n{log}"));
    for expected in [
        "node_rank=0".to_string(),
        "nnodes=1".into(),
        "world_size=1".into(),
        format!("master=127.0.0.1:{port}"),
    ] {
        assert!(
            launch.contains(&expected),
            "{expected} missing in: {launch}"
        );
    }
    let s = pod.status.as_ref().unwrap();
    assert_eq!(s.phase.as_deref(), Some("Succeeded"));
    assert_eq!(s.pod_ip.as_deref(), Some("127.0.0.1"));
    let terminated = terminated_state(pod).expect("a terminated container");
    assert_eq!(terminated.exit_code, 0);
    world.stop().await;
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
        let t = terminated_state(failed).expect("a terminated container");
        assert_eq!(t.exit_code, 137, "SIGKILL is reported as 128 + 9");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_node_job_trains_as_one_gang_over_tcp_between_two_local_pods() {
    let world = World::start("e2e-gang").await;
    let out = world.dir.join("checkpoints");
    world.kubectl_apply(&tiny_job(&world, "gang", 2, 2, 100, &out));

    let status = world
        .wait_status("gang", "phase Succeeded", Duration::from_secs(150), |s| {
            s.phase.map(|p| p.as_str()) == Some("Succeeded")
        })
        .await;
    assert_eq!(status.iteration, Some(12), "{status:?}");
    let checkpoint = status
        .last_checkpoint
        .clone()
        .expect("a checkpoint reported");
    assert!(
        PathBuf::from(&checkpoint.path)
            .join("manifest.json")
            .is_file()
    );

    // Both pods reached rank 0's port through MASTER_ADDR -> 127.0.0.1 and ended with the
    // same weights.
    let mut digests = Vec::new();
    for rank in 0..2 {
        let log = pod_log(&world, &format!("gang-a0-{rank}"));
        let launch = log
            .lines()
            .find(|l| l.contains("launching workers"))
            .unwrap_or_else(|| panic!("no launcher line in rank {rank}'s log:\n{log}"));
        for expected in [
            format!("node_rank={rank}"),
            "nnodes=2".into(),
            "world_size=2".into(),
        ] {
            assert!(
                launch.contains(&expected),
                "{expected} missing in: {launch}"
            );
        }
        assert!(launch.contains("master=127.0.0.1:"), "{launch}");
        let digest = log
            .lines()
            .find_map(|l| l.split("student_sha256=").nth(1))
            .and_then(|d| d.split_whitespace().next())
            .unwrap_or_else(|| panic!("no final digest in rank {rank}'s log:\n{log}"))
            .to_string();
        digests.push(digest);
    }
    assert_eq!(
        digests[0], digests[1],
        "the ranks ended with different weights"
    );
    world.stop().await;
}

/// Issue 10, item 5: a 2-node × 2-process job (4 ranks over TCP, sharded checkpoints: every
/// rank writes its shard) is killed mid-run and resumes on 4 ranks; then it is suspended
/// (SIGTERM: a checkpoint on the way out), changed to 1 node × 2 processes and resumed: the
/// trainer reshards the 4-rank checkpoint onto 2 ranks, the status shows it, and it finishes.
/// Training runs SHARD_GRAD_OP (the official default): each rank keeps the gradients and AdamW
/// state of its shard only, which its log reports (checked against the checkpoint's size).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_node_two_process_job_killed_resumes_then_suspended_resumes_resharded_on_one_node() {
    let started = std::time::Instant::now();
    let world = World::start_with_gpus("e2e-reshard", 4).await;
    let out = world.dir.join("checkpoints");
    let job = "reshard";
    // 6 epochs of 6 iterations, 4 images per process: a checkpoint every 3 iterations.
    let mut manifest: Value =
        serde_yaml_ng::from_str(&tiny_job_on(&world, job, (2, 2, 4), 6, 3, &out)).unwrap();
    manifest["spec"]["training"]["sharding"] = serde_yaml_ng::from_str(
        "{student: {backbone: SHARD_GRAD_OP, dinoHead: SHARD_GRAD_OP, ibotHead: SHARD_GRAD_OP}, \
         teacher: {backbone: SHARD_GRAD_OP, dinoHead: SHARD_GRAD_OP, ibotHead: SHARD_GRAD_OP}}",
    )
    .unwrap();
    world.kubectl_apply(&serde_yaml_ng::to_string(&manifest).unwrap());
    let status = world
        .wait_status(
            job,
            "a checkpoint on 4 ranks",
            Duration::from_secs(240),
            |s| s.last_checkpoint.as_ref().is_some_and(|c| c.iteration >= 3),
        )
        .await;
    assert_eq!(status.world_size, Some(4), "{status:?}");
    let ckpt = PathBuf::from(&status.last_checkpoint.unwrap().path);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["worldSize"], 4, "{manifest}");
    assert_eq!(
        manifest["shards"].as_array().map(Vec::len),
        Some(4),
        "every rank wrote its shard: {manifest}"
    );
    assert_eq!(manifest["job"], format!("PretrainJob/{}/{job}", world.ns));
    let logs: Vec<String> = [0, 1]
        .iter()
        .map(|n| pod_log(&world, &format!("{job}-a0-{n}")))
        .collect();
    assert_shard_of_the_optimizer_state(&logs.join("\n"), &ckpt, 4);

    // Killed mid-run: the gang restarts on 4 ranks and resumes (no reshard).
    kill_pod_processes(&world, &format!("{job}-a0-1")).await;
    let status = world
        .wait_status(job, "attempt 1 running", Duration::from_secs(180), |s| {
            s.run_attempt == Some(1) && s.phase.map(|p| p.as_str()) == Some("Running")
        })
        .await;
    assert_eq!(status.last_reshard, None, "{status:?}");
    let resumed_at = status.last_checkpoint.as_ref().unwrap().iteration;
    world
        .wait_status(
            job,
            "a checkpoint after the restart",
            Duration::from_secs(240),
            |s| {
                s.last_checkpoint
                    .as_ref()
                    .is_some_and(|c| c.iteration > resumed_at)
                    && s.world_size == Some(4)
            },
        )
        .await;

    // Suspended, then one node of two processes: the 4-rank checkpoint reshards onto 2.
    let patch = |json: &str| {
        world
            .cluster
            .kubectl([
                "patch",
                "pretrainjob",
                job,
                "-n",
                &world.ns,
                "--type",
                "merge",
                "-p",
                json,
            ])
            .unwrap()
            .ok()
            .unwrap_or_else(|e| panic!("{e}"));
    };
    patch(r#"{"spec":{"cluster":{"runPolicy":{"suspend":true}}}}"#);
    let suspended = world
        .wait_status(job, "phase Suspended", Duration::from_secs(120), |s| {
            s.phase.map(|p| p.as_str()) == Some("Suspended")
                && s.pods.is_none_or(|p| p.running == 0)
        })
        .await;
    let at_suspend = suspended.last_checkpoint.as_ref().unwrap().iteration;
    // The API server allows the new layout only while suspended (CEL), so in two steps.
    patch(r#"{"spec":{"cluster":{"nodes":1}}}"#);
    patch(r#"{"spec":{"cluster":{"runPolicy":{"suspend":false}}}}"#);
    let status = world
        .wait_status(
            job,
            "phase Succeeded on 1 node",
            Duration::from_secs(400),
            |s| s.phase.map(|p| p.as_str()) == Some("Succeeded"),
        )
        .await;
    assert_eq!(status.iteration, Some(36), "{status:?}");
    assert_eq!(status.world_size, Some(2), "{status:?}");
    let reshard = status
        .last_reshard
        .clone()
        .expect("status.lastReshard is set");
    assert_eq!(
        (reshard.from_world_size, reshard.to_world_size),
        (4, 2),
        "{reshard:?}"
    );
    assert!(
        reshard.iteration >= at_suspend,
        "{reshard:?} vs suspended at {at_suspend}"
    );
    let last = PathBuf::from(&status.last_checkpoint.unwrap().path);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(last.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(
        (
            manifest["iteration"].as_u64(),
            manifest["worldSize"].as_u64()
        ),
        (Some(36), Some(2))
    );

    // The launcher of the one pod says what it resharded, with the global batch change.
    let pods = world.pods(job).await;
    let pod = pods.iter().map(|p| p.name_any()).max().unwrap();
    let log = pod_log(&world, &pod);
    assert_shard_of_the_optimizer_state(&log, &last, 2);
    let line = log
        .lines()
        .find(|l| l.contains("resharding"))
        .unwrap_or_else(|| panic!("no reshard line in {pod}'s log:\n{log}"));
    for want in [
        "from_world_size=4",
        "to_world_size=2",
        "global_batch_before=16",
        "global_batch=8",
    ] {
        assert!(line.contains(want), "{want} missing in: {line}");
    }
    eprintln!(
        "[e2e] 2x2 -> 1x2 reshard job took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    world.stop().await;
}

/// SHARD_GRAD_OP on `world_size` ranks: the `world_size` processes whose `log` this is each
/// report holding about 1/`world_size` of the AdamW state (NO_SHARD holds all of it), the
/// whole being 8 bytes per parameter element of the checkpoint's moments (`exp_avg` chunks,
/// summed over its shard headers) plus a step counter per tensor.
fn assert_shard_of_the_optimizer_state(log: &str, ckpt: &std::path::Path, world_size: usize) {
    let mut elements = 0u64;
    for rank in 0..world_size {
        let header: serde_json::Value = serde_json::from_slice(
            &std::fs::read(ckpt.join(format!("shard-{rank:05}.json"))).unwrap(),
        )
        .unwrap();
        for file in header["files"].as_object().unwrap().values() {
            if file["group"] != "optimizer" {
                continue;
            }
            for c in file["chunks"].as_array().unwrap() {
                if c["name"].as_str().unwrap().ends_with(".exp_avg") {
                    elements += c["numel"].as_u64().unwrap();
                }
            }
        }
    }
    let whole = 8 * elements;
    let held: Vec<u64> = log
        .lines()
        .filter_map(|l| {
            let (_, rest) = l.split_once("B of gradients and ")?;
            rest.split_once(" B of optimizer state")?.0.parse().ok()
        })
        .collect();
    assert_eq!(held.len(), world_size, "one report per rank in:\n{log}");
    for bytes in held {
        let share = bytes as f64 / whole as f64;
        eprintln!(
            "[e2e] a rank of {world_size} holds {bytes} B of {whole} B of AdamW moments ({share:.3})"
        );
        assert!(
            share <= 1.0 / world_size as f64 + 0.05,
            "{bytes} B of {whole} B: not sharded over {world_size} ranks"
        );
    }
}
