//! Issue 15, item 5: one real training job under a seeded, logged schedule of faults of every
//! kind — a trainer SIGKILLed, a pod deleted, a pod evicted through the Eviction API, the
//! leading operator replica `kill -9`ed (the standby takes over), the API server answering the
//! operator with 409s and 5xx or stalling (an HTTP fault proxy between them), a checkpoint torn
//! after it was written, the node going NotReady — ends Succeeded with final weights bitwise
//! equal to those of an uninterrupted run of the same spec, and the job's restart counters
//! and RestartingGang events match the faults one for one.
//!
//! The world: the shared control plane; the operator as the two-replica `dinoflow-operator`
//! deployment would run it (support/replicas.rs); the job on the in-process node agent
//! (tests/node-agent), the reference run on a second agent's Node beside it, both at once.
//! The node agent rather than the real node (tests/src/real_node.rs): the faults need a host
//! process to SIGKILL by pid, a checkpoint directory on the host to tear, and a Node that
//! reports NotReady on demand ([`NodeAgent::set_ready`], as a kubelet whose runtime stopped
//! does; the real kubelet cannot be told to) — the node lifecycle controller then taints it
//! and the taint-eviction controller evicts the job's pods, which tolerate `not-ready` for 0 s
//! (a Lease left to expire would take the controller's 50 s grace period instead).
//!
//! `DINOFLOW_CHAOS_SEED` replays a schedule; unset, the seed is drawn from the clock. The log
//! (stderr, `[chaos]` lines) lists the seed, every fault and the operator's response to it,
//! a Lease hand-over a fault caused included (while the leader renewed every 5 s, the 5 s
//! stall made it miss its 10 s renew deadline and exit in 3 runs of 4; it renews every 2 s
//! now, as client-go does). Every fault kind is injected and checked in every run; none is left out.
//! Seeds 1 to 4 passed: 225 s (load 6), 403 s (seeds 2 and 3 at once, load 12 to 15), 410 s
//! (of which some 230 s building the operator binary, load 6).
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dinoflow_api::status::JobStatus;
use dinoflow_e2e::{Injection, NODE_LABEL};
use dinoflow_node_agent::{AgentConfig, NodeAgent};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, EvictParams, ListParams, Patch, PatchParams};
use serde_yaml_ng::Value;
use support::replicas::OperatorReplicas;
use support::{World, kill_pod_processes, pod_log, tiny_job_on, trainer};

const JOB: &str = "chaos";
const REFERENCE: &str = "reference";
/// Pods of the job (and of the reference).
const NODES: u32 = 2;
/// 200 epochs of 6 iterations, a checkpoint every 3. The faults come as fast as the job
/// allows (each after a new checkpoint), but the job trains on while they are answered: a
/// Lease take-over alone is 15 s, some 130 iterations on an idle machine (~9 it/s). 20 epochs
/// ended before the fourth fault under load, 80 before the eighth on an idle machine.
const EPOCHS: u64 = 200;
const ITERATIONS: i64 = EPOCHS as i64 * 6;
const CHECKPOINT_EVERY: i64 = 3;
/// Deadline for each step (a restart, a take-over, a checkpoint): generous, for a loaded CI.
const STEP: Duration = Duration::from_secs(180);

/// A kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    /// SIGKILL of a rank's trainer processes.
    KillTrainer,
    /// `kubectl delete pod` (graceful).
    DeletePod,
    /// A pod evicted through the Eviction API.
    EvictPod,
    /// `kill -9` of the leading operator replica.
    KillLeader,
    /// 409 Conflict on the operator's next writes of the job.
    ApiConflicts,
    /// 500 and 503 on the operator's next requests about the job.
    ApiErrors,
    /// The API server answers nothing for a while.
    ApiStall,
    /// The newest checkpoint torn (a file cut short) as the trainer is SIGKILLed.
    TornCheckpoint,
    /// The node reports NotReady; its pods are evicted by the taint.
    NodeNotReady,
}

const KINDS: [Fault; 9] = [
    Fault::KillTrainer,
    Fault::DeletePod,
    Fault::EvictPod,
    Fault::KillLeader,
    Fault::ApiConflicts,
    Fault::ApiErrors,
    Fault::ApiStall,
    Fault::TornCheckpoint,
    Fault::NodeNotReady,
];

/// The budget a fault's restart is charged to by the operator's rules (operator/src/decide.rs):
/// a trainer's own failure after a new verified checkpoint uses `progressRestartLimit`
/// (every fault is injected after one); a pod ended from outside is a disruption.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Charge {
    None,
    Progress,
    Disruption,
}

impl Fault {
    fn charge(self) -> Charge {
        match self {
            Fault::KillTrainer | Fault::TornCheckpoint => Charge::Progress,
            Fault::DeletePod | Fault::EvictPod | Fault::NodeNotReady => Charge::Disruption,
            Fault::KillLeader | Fault::ApiConflicts | Fault::ApiErrors | Fault::ApiStall => {
                Charge::None
            }
        }
    }
}

/// splitmix64: a seeded schedule without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Every kind once plus `extra` drawn at random, in a random order.
fn schedule(rng: &mut Rng, extra: usize) -> Vec<Fault> {
    let mut faults = KINDS.to_vec();
    for _ in 0..extra {
        faults.push(KINDS[rng.below(KINDS.len())]);
    }
    for i in (1..faults.len()).rev() {
        faults.swap(i, rng.below(i + 1));
    }
    faults
}

#[test]
fn the_schedule_holds_every_kind_and_is_reproducible_from_its_seed() {
    let a = schedule(&mut Rng(7), 2);
    assert_eq!(a.len(), 11);
    for kind in KINDS {
        assert!(a.contains(&kind), "{kind:?} missing from {a:?}");
    }
    assert_eq!(a, schedule(&mut Rng(7), 2));
    assert_ne!(a, schedule(&mut Rng(8), 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_under_eleven_seeded_faults_of_every_kind_ends_with_the_weights_of_an_uninterrupted_run()
 {
    let started = Instant::now();
    let seed = std::env::var("DINOFLOW_CHAOS_SEED")
        .ok()
        .map(|s| s.parse().expect("DINOFLOW_CHAOS_SEED is a u64"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let mut rng = Rng(seed);
    let faults = schedule(&mut rng, 2);
    log(format!(
        "seed {seed} (DINOFLOW_CHAOS_SEED={seed} replays it): {} faults {faults:?}",
        faults.len()
    ));

    let world = World::without_operator("e2e-chaos", 0).await;
    let reference_node = NodeAgent::start(
        world.client.clone(),
        AgentConfig::new(
            format!("local-{}-ref", world.ns),
            world.dir.join("agent-ref"),
        )
        .binary(dinoflow_api::contract::TRAINER_COMMAND, trainer())
        .label(NODE_LABEL, format!("{}-ref", world.ns)),
    )
    .await
    .expect("the reference's node agent registers");
    let replicas = OperatorReplicas::start(&world).await;
    log(format!(
        "operator replicas up; {} leads",
        replicas.holder().await.unwrap_or_default()
    ));

    let out = world.dir.join("checkpoints");
    world.kubectl_apply(&chaos_job(&world, JOB, &world.ns, &out));
    world.kubectl_apply(&chaos_job(
        &world,
        REFERENCE,
        &format!("{}-ref", world.ns),
        &out,
    ));

    let mut chaos = Chaos {
        world: &world,
        replicas: &replicas,
        rng,
        since: started,
        last_fault_checkpoint: 0,
        charged: BTreeMap::new(),
        killed_leader: None,
    };
    for (n, fault) in faults.iter().enumerate() {
        let before = chaos.ready_for_a_fault(n + 1, *fault).await;
        chaos.inject(n + 1, *fault, &before).await;
    }
    assert!(faults.len() >= 10);

    let status = succeeded(&world, JOB).await;
    let reference = succeeded(&world, REFERENCE).await;
    log(format!(
        "{JOB} Succeeded at iteration {:?}: runAttempt {:?}, restarts {:?}, progressRestarts {:?}, disruptions {:?}",
        status.iteration,
        status.run_attempt,
        status.restarts,
        status.progress_restarts,
        status.disruptions
    ));

    // The counters are the faults' charges, one for one; nothing used backoffLimit.
    let progress = chaos.count(Charge::Progress);
    let disruptions = chaos.count(Charge::Disruption);
    assert_eq!(status.restarts.unwrap_or(0), 0, "{status:?}");
    assert_eq!(
        status.progress_restarts.unwrap_or(0),
        progress,
        "{status:?}"
    );
    assert_eq!(status.disruptions.unwrap_or(0), disruptions, "{status:?}");
    assert_eq!(
        status.run_attempt.unwrap_or(0),
        progress + disruptions,
        "{status:?}"
    );
    assert_eq!(status.iteration, Some(ITERATIONS));
    // The reference ran through the operator's own faults without a restart.
    assert_eq!(
        (
            reference.run_attempt.unwrap_or(0),
            reference.restarts.unwrap_or(0),
            reference.disruptions.unwrap_or(0)
        ),
        (0, 0, 0),
        "{reference:?}"
    );

    // Bitwise the same model, optimizer state included.
    let ours = tensor_digests(&checkpoint_dir(&status));
    let theirs = tensor_digests(&checkpoint_dir(&reference));
    assert!(!ours.is_empty());
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    for (name, digest) in &ours {
        assert_eq!(
            Some(digest),
            theirs.get(name),
            "tensor {name} differs from the uninterrupted run's"
        );
    }
    log(format!(
        "final weights bitwise equal to the uninterrupted run's: {} tensors (student, teacher, optimizer)",
        ours.len()
    ));
    log(format!("operator processes: {:?}", replicas.history()));
    replicas.stop().await;
    reference_node.stop().await.expect("reference node stops");
    log(format!(
        "chaos e2e took {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    world.stop().await;
}

/// Waits for `job` to succeed, however long the rest of its run takes on a loaded machine,
/// as long as it makes progress: fails after [`STEP`] without a new iteration.
async fn succeeded(world: &World, job: &str) -> JobStatus {
    let mut last = (None, Instant::now());
    loop {
        let status = world.status(job).await;
        match status.phase.map(|p| p.as_str()) {
            Some("Succeeded") => return status,
            Some("Failed") => world.fail(job, &format!("{job} Succeeded")).await,
            _ => {}
        }
        if status.iteration != last.0 {
            last = (status.iteration, Instant::now());
        } else if last.1.elapsed() > STEP {
            let what = format!(
                "{job} Succeeded (no progress past {:?} in {STEP:?})",
                last.0
            );
            world.fail(job, &what).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

struct Chaos<'a> {
    world: &'a World,
    replicas: &'a OperatorReplicas,
    rng: Rng,
    since: Instant,
    /// The checkpoint the previous fault came after: each fault waits for a newer one.
    last_fault_checkpoint: i64,
    /// Faults injected, by the budget they should use.
    charged: BTreeMap<&'static str, i32>,
    /// The identity of the replica the last KillLeader killed.
    killed_leader: Option<String>,
}

impl Chaos<'_> {
    fn count(&self, charge: Charge) -> i32 {
        self.charged
            .get(format!("{charge:?}").as_str())
            .copied()
            .unwrap_or(0)
    }

    /// Waits until the job runs with every pod up and has written a checkpoint newer than
    /// both the one its attempt started from and the one the previous fault came after; a
    /// torn checkpoint also waits for the run's second checkpoint, so that a verified one
    /// older than the torn one is left to resume from (keepLast 2): tearing the only one
    /// leaves the trainer nothing but a fresh start (seed 1796691390985199831 did).
    async fn ready_for_a_fault(&mut self, n: usize, fault: Fault) -> JobStatus {
        let after = self.last_fault_checkpoint;
        let status = self
            .world
            .wait_status(
                JOB,
                &format!("fault {n} ({fault:?}): running with a new checkpoint"),
                STEP,
                |s| {
                    let newest = s.last_checkpoint.as_ref().map_or(0, |c| c.iteration);
                    s.phase.map(|p| p.as_str()) == Some("Running")
                        && s.pods.as_ref().is_some_and(|p| p.running == NODES as i32)
                        && newest > after
                        && newest > s.attempt_checkpoint_iteration.unwrap_or(0)
                        && (fault != Fault::TornCheckpoint || newest >= 2 * CHECKPOINT_EVERY)
                },
            )
            .await;
        assert!(
            status.last_checkpoint.as_ref().unwrap().iteration + 2 * CHECKPOINT_EVERY < ITERATIONS,
            "the job is about to finish before fault {n}: make it longer"
        );
        self.last_fault_checkpoint = status.last_checkpoint.as_ref().unwrap().iteration;
        status
    }

    async fn inject(&mut self, n: usize, fault: Fault, before: &JobStatus) {
        let attempt = before.run_attempt.unwrap_or(0);
        let at = before.iteration.unwrap_or(0);
        // The torn checkpoint's writer is rank 0 (it seals every checkpoint): killed, no newer
        // checkpoint can appear after the tear.
        let rank = match fault {
            Fault::TornCheckpoint => 0,
            _ => self.rng.below(NODES as usize),
        };
        let pod = format!("{JOB}-a{attempt}-{rank}");
        let t = self.since.elapsed().as_secs();
        let leader = self.replicas.holder().await;
        let ended = self.replicas.history().len();
        let what = match fault {
            Fault::KillTrainer => {
                kill_pod_processes(self.world, &pod).await;
                format!("SIGKILL of {pod}'s trainer")
            }
            Fault::TornCheckpoint => {
                kill_pod_processes(self.world, &pod).await;
                let dir = self
                    .world
                    .dir
                    .join("checkpoints")
                    .join(JOB)
                    .join("checkpoints");
                let torn = tear_newest_checkpoint(&dir);
                format!("SIGKILL of {pod}'s trainer, then {torn} cut short")
            }
            Fault::DeletePod => {
                self.pods()
                    .delete(&pod, &DeleteParams::default())
                    .await
                    .expect("delete the pod");
                format!("deleted pod {pod}")
            }
            Fault::EvictPod => {
                self.pods()
                    .evict(&pod, &EvictParams::default())
                    .await
                    .expect("evict the pod");
                format!("evicted pod {pod} through the Eviction API")
            }
            Fault::NodeNotReady => {
                self.agent()
                    .set_ready(false)
                    .await
                    .expect("report NotReady");
                format!("node {} reports NotReady", self.agent().node_name())
            }
            Fault::KillLeader => {
                let leader = self.replicas.holder().await.expect("a leader");
                assert!(self.replicas.kill_9(&leader), "kill -9 {leader}");
                let what = format!("kill -9 of the leading operator replica {leader}");
                self.killed_leader = Some(leader);
                what
            }
            Fault::ApiConflicts => {
                self.replicas.api.inject(Injection {
                    status: 409,
                    writes_only: true,
                    path_contains: format!("/pretrainjobs/{JOB}"),
                    count: 3,
                });
                format!("API server answers the operator's next 3 writes of {JOB} with 409")
            }
            Fault::ApiErrors => {
                for status in [500, 503] {
                    self.replicas.api.inject(Injection {
                        status,
                        writes_only: false,
                        path_contains: format!("/pretrainjobs/{JOB}"),
                        count: 2,
                    });
                }
                format!(
                    "API server answers the operator's next 4 requests about {JOB} with 500, 500, 503, 503"
                )
            }
            Fault::ApiStall => {
                self.replicas.api.stall(true);
                tokio::time::sleep(Duration::from_secs(5)).await;
                self.replicas.api.stall(false);
                "API server stalled for 5 s (no request answered, no watch byte forwarded)".into()
            }
        };
        log(format!(
            "fault {n} at {t} s, iteration {at}, attempt {attempt}, checkpoint {}: {fault:?}: {what}",
            self.last_fault_checkpoint
        ));
        let charge = fault.charge();
        *self
            .charged
            .entry(match charge {
                Charge::None => "None",
                Charge::Progress => "Progress",
                Charge::Disruption => "Disruption",
            })
            .or_default() += 1;
        let mut response = match charge {
            Charge::None => self.unharmed(fault, before).await,
            _ => self.restarted(fault, before).await,
        };
        // A replica may also step down on its own (a stall past its renew deadline ends it):
        // not a fault of the job's, but part of the operator's response.
        let now = self.replicas.holder().await;
        if now != leader {
            let history = self.replicas.history();
            response += &format!(
                "; the Lease moved from {} to {} (operator processes that ended meanwhile: {:?})",
                leader.unwrap_or_default(),
                now.unwrap_or_default(),
                &history[ended.min(history.len())..]
            );
        }
        log(format!("  response: {response}"));
    }

    /// The operator went on without restarting anything: after the fault, a status newer
    /// than it (a later iteration), the same attempt.
    async fn unharmed(&mut self, fault: Fault, before: &JobStatus) -> String {
        let attempt = before.run_attempt;
        let mut notes = Vec::new();
        if fault == Fault::KillLeader {
            let old = self.killed_leader.clone().unwrap_or_default();
            let took = Instant::now();
            let new = self
                .replicas
                .wait_leader(STEP, |h| h != old)
                .await
                .unwrap_or_else(|| panic!("no replica took over from {old}"));
            notes.push(format!(
                "{new} took the Lease over in {:.1} s",
                took.elapsed().as_secs_f64()
            ));
        }
        if matches!(fault, Fault::ApiConflicts | Fault::ApiErrors) {
            let deadline = Instant::now() + STEP;
            while self.replicas.api.pending() > 0 {
                assert!(
                    Instant::now() < deadline,
                    "the injected replies were never asked for"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let served = self.replicas.api.injected();
            let last: Vec<String> = served
                .iter()
                .rev()
                .take(if fault == Fault::ApiConflicts { 3 } else { 4 })
                .rev()
                .map(|i| format!("{} {} -> {}", i.method, short(&i.path), i.status))
                .collect();
            notes.push(format!("served {}", last.join(", ")));
        }
        let from = self.world.status(JOB).await.iteration.unwrap_or(0);
        let status = self
            .world
            .wait_status(JOB, &format!("status updated after {fault:?}"), STEP, |s| {
                s.iteration.unwrap_or(0) > from + 1
            })
            .await;
        assert_eq!(
            status.run_attempt, attempt,
            "{fault:?} restarted the gang: {status:?}"
        );
        notes.push(format!(
            "no restart (attempt {}), status written on at iteration {}, phase {}",
            attempt.unwrap_or(0),
            status.iteration.unwrap_or(0),
            status.phase.map(|p| p.as_str()).unwrap_or("?")
        ));
        if fault == Fault::KillLeader {
            notes.push(format!(
                "progress reports reach the new leader via {}",
                self.replicas.progress.upstream()
            ));
        }
        notes.join("; ")
    }

    /// The operator restarted the gang as the next attempt, charged to the fault's budget,
    /// and the new attempt runs (resuming from a checkpoint).
    async fn restarted(&self, fault: Fault, before: &JobStatus) -> String {
        let next = before.run_attempt.unwrap_or(0) + 1;
        let status = self
            .world
            .wait_status(JOB, &format!("attempt {next} after {fault:?}"), STEP, |s| {
                s.run_attempt.unwrap_or(0) >= next
            })
            .await;
        assert_eq!(status.run_attempt, Some(next), "one restart per fault");
        let event = self.restart_event(next).await;
        let expected = match fault.charge() {
            Charge::Progress => "after progress",
            _ => "disruption ",
        };
        assert!(
            event.contains(expected),
            "{fault:?} should be charged as '{expected}': {event}"
        );
        let mut notes = vec![format!("event RestartingGang: {event}")];
        if fault == Fault::NodeNotReady {
            notes.push(self.repair_node().await);
        }
        let running = self
            .world
            .wait_status(
                JOB,
                &format!("attempt {next} running after {fault:?}"),
                STEP,
                |s| {
                    s.run_attempt == Some(next)
                        && s.phase.map(|p| p.as_str()) == Some("Running")
                        && s.pods.as_ref().is_some_and(|p| p.running == NODES as i32)
                },
            )
            .await;
        notes.push(format!(
            "attempt {next} Running (progressRestarts {}, disruptions {}, restarts {})",
            running.progress_restarts.unwrap_or(0),
            running.disruptions.unwrap_or(0),
            running.restarts.unwrap_or(0)
        ));
        let resumed = self.resumed_from(next).await;
        notes.push(resumed);
        notes.join("; ")
    }

    /// The `RestartingGang` event that started attempt `attempt`.
    async fn restart_event(&self, attempt: i32) -> String {
        let events: Api<Event> = Api::namespaced(self.world.client.clone(), &self.world.ns);
        let want = format!("as attempt {attempt} ");
        let deadline = Instant::now() + STEP;
        loop {
            let list = events.list(&ListParams::default()).await.expect("events");
            if let Some(note) = list
                .items
                .iter()
                .filter(|e| {
                    e.reason.as_deref() == Some("RestartingGang")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(JOB)
                })
                .filter_map(|e| e.note.clone())
                .find(|n| n.contains(&want))
            {
                return note;
            }
            assert!(
                Instant::now() < deadline,
                "no RestartingGang event for attempt {attempt}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// What rank 0 of `attempt` says it resumed from (and skipped).
    async fn resumed_from(&self, attempt: i32) -> String {
        let pod = format!("{JOB}-a{attempt}-0");
        let deadline = Instant::now() + STEP;
        loop {
            let log = pod_log(self.world, &pod);
            if let Some(line) = log.lines().find(|l| l.contains("resumed from checkpoint")) {
                let skipped = log
                    .lines()
                    .filter(|l| l.contains("does not verify"))
                    .map(|l| l.split("reason=").nth(1).unwrap_or(l).to_string())
                    .collect::<Vec<_>>();
                let at = line
                    .split("iteration=")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .unwrap_or("?");
                return if skipped.is_empty() {
                    format!("{pod} resumed from the checkpoint of iteration {at}")
                } else {
                    format!(
                        "{pod} skipped {} torn checkpoint(s) ({}) and resumed from iteration {at}",
                        skipped.len(),
                        skipped.join("; ")
                    )
                };
            }
            assert!(Instant::now() < deadline, "{pod} did not resume:\n{log}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Brings the NotReady node back as an administrator does: cordoned first, Ready, and
    /// uncordoned once the node lifecycle controller lifted its `not-ready` taints. Made Ready
    /// uncordoned, it takes pods again as soon as the `NoSchedule` taint goes, while the
    /// `NoExecute` one stays until the controller's next pass (up to its 5 s period): the
    /// next attempt's pods, which tolerate it for 0 s, were scheduled into that window and
    /// evicted again, five times in a row in one run (each a real restart, but not one per fault).
    async fn repair_node(&self) -> String {
        let node = self.agent().node_name().to_string();
        let nodes: Api<Node> = Api::all(self.world.client.clone());
        let cordon = |on: bool| {
            let nodes = nodes.clone();
            let node = node.clone();
            async move {
                let patch = serde_json::json!({"spec": {"unschedulable": on}});
                nodes
                    .patch(&node, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .expect("cordon or uncordon the node");
            }
        };
        let while_not_ready = taints(&nodes, &node).await.join(", ");
        cordon(true).await;
        self.agent().set_ready(true).await.expect("report Ready");
        let took = Instant::now();
        let deadline = took + STEP;
        loop {
            let left = taints(&nodes, &node).await;
            if !left
                .iter()
                .any(|t| t.starts_with("node.kubernetes.io/not-ready"))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the not-ready taints stayed on the Ready node {node}: {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        cordon(false).await;
        format!(
            "node taints while NotReady: {while_not_ready}; node cordoned, reports Ready again, \
             not-ready taints lifted after {:.1} s, uncordoned",
            took.elapsed().as_secs_f64()
        )
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.world.client.clone(), &self.world.ns)
    }

    fn agent(&self) -> &NodeAgent {
        self.world.agent.as_ref().unwrap()
    }
}

/// The node's taints, `key:effect`.
async fn taints(nodes: &Api<Node>, node: &str) -> Vec<String> {
    let n = nodes.get(node).await.expect("the node");
    n.spec
        .and_then(|s| s.taints)
        .unwrap_or_default()
        .iter()
        .map(|t| format!("{}:{}", t.key, t.effect))
        .collect()
}

/// The tiny job, long enough for the schedule, on the Node labelled `node`: tolerating
/// `not-ready` for 0 s (evicted at once from a NotReady node), budgets above the faults.
fn chaos_job(world: &World, name: &str, node: &str, out: &Path) -> String {
    let mut job: Value = serde_yaml_ng::from_str(&tiny_job_on(
        world,
        name,
        (NODES, 0, 16),
        EPOCHS,
        CHECKPOINT_EVERY as u64,
        out,
    ))
    .unwrap();
    let yaml = |s: &str| -> Value { serde_yaml_ng::from_str(s).unwrap() };
    let cluster = &mut job["spec"]["cluster"];
    cluster["nodeSelector"] = yaml(&format!("{{\"{NODE_LABEL}\": \"{node}\"}}"));
    cluster["tolerations"] = yaml(
        "[{key: node.kubernetes.io/not-ready, operator: Exists, effect: NoExecute, tolerationSeconds: 0}]",
    );
    cluster["runPolicy"] = yaml("{backoffLimit: 0, progressRestartLimit: 20, disruptionLimit: 20}");
    serde_yaml_ng::to_string(&job).unwrap()
}

/// Cuts the largest file of the newest sealed checkpoint under `dir` short; returns its path.
fn tear_newest_checkpoint(dir: &Path) -> String {
    let newest = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("ckpt-"))
                && p.join("manifest.json").is_file()
        })
        .max()
        .expect("a sealed checkpoint");
    let file = std::fs::read_dir(&newest)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .expect("a tensor file");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    format!(
        "{}/{}",
        newest.file_name().unwrap().to_string_lossy(),
        file.file_name().unwrap().to_string_lossy()
    )
}

fn checkpoint_dir(status: &JobStatus) -> PathBuf {
    let c = status.last_checkpoint.as_ref().expect("a final checkpoint");
    assert_eq!(c.iteration, ITERATIONS, "{c:?}");
    PathBuf::from(&c.path)
}

/// sha256 of every tensor's bytes in the checkpoint's safetensors files, by file and tensor
/// name (the files' headers may differ, e.g. in metadata naming the job).
fn tensor_digests(dir: &Path) -> BTreeMap<String, String> {
    let mut digests = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
        let data = &bytes[8 + len..];
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        for (name, info) in header.as_object().unwrap() {
            if name == "__metadata__" {
                continue;
            }
            let offsets = &info["data_offsets"];
            let (a, b) = (
                offsets[0].as_u64().unwrap() as usize,
                offsets[1].as_u64().unwrap() as usize,
            );
            digests.insert(format!("{file}:{name}"), sha256_hex(&data[a..b]));
        }
    }
    digests
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A path without its namespace part, for the log.
fn short(path: &str) -> String {
    path.rsplit_once("/namespaces/")
        .and_then(|(_, rest)| rest.split_once('/'))
        .map_or_else(|| path.to_string(), |(_, r)| r.to_string())
}

fn log(line: String) {
    eprintln!("[chaos] {line}");
}
