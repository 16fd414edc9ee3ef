//! Resharding end to end (issue 10, item 5) on the host-process node agent, not the real node:
//! the job asks for 2 GPUs per pod so that each pod runs two trainer processes, and only the
//! agent's Node advertises `nvidia.com/gpu` on a machine without GPUs (a real kubelet
//! advertises what its device plugins report, and this machine has none); the agent then runs
//! the processes on the CPU. Everything else of the world is the one of e2e_training.rs
//! (`support/`): the shared local control plane, the CRDs, the in-process operator.
mod support;

use std::path::PathBuf;
use std::time::Duration;

use kube::ResourceExt;
use serde_yaml_ng::Value;
use support::{World, kill_pod_processes, pod_log, tiny_job_on};

/// Issue 10, item 5: a 2-node × 2-process job (4 ranks over TCP, sharded checkpoints: every
/// rank writes its shard) is killed mid-run and resumes on 4 ranks; then it is suspended
/// (SIGTERM: a checkpoint on the way out), changed to 1 node × 2 processes and resumed: the
/// trainer reshards the 4-rank checkpoint onto 2 ranks, the status shows it, and it finishes.
/// Training runs SHARD_GRAD_OP (the official default): each rank keeps the gradients and AdamW
/// state of its shard only, which its log reports (checked against the checkpoint's size).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_node_two_process_job_killed_resumes_then_suspended_resumes_resharded_on_one_node() {
    let started = std::time::Instant::now();
    let world = World::start_on_agent("e2e-reshard", 4).await;
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
