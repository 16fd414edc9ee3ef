//! One pod's life on the local node: prepare (fetch references, write its volumes), start
//! the process, report Running, wait for it or for the pod's deletion (SIGTERM, SIGKILL after
//! the grace period), report how it ended, and finally confirm the deletion (the API server
//! keeps a deleted pod bound to a node until its kubelet does).

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::{Client, ResourceExt};
use rustix::process::{Pid, Signal, kill_process, kill_process_group};
use serde_json::Value;
use tokio::sync::watch;

use super::AgentError;
use super::plan::{Host, Plan, References, plan, pod_key};
use super::status::{self, Exit};

/// What the agent loop tells a pod's task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodSignal {
    Run,
    /// The pod is being deleted: SIGTERM, SIGKILL after `grace`, then confirm the deletion.
    Terminate {
        grace: Duration,
    },
    /// The pod is gone from the API (force-deleted): kill at once.
    Gone,
    /// The agent stops: end the process (SIGTERM, a short grace) and leave the pod alone.
    AgentStop,
}

/// Grace the agent gives processes when it stops itself.
const AGENT_STOP_GRACE: Duration = Duration::from_secs(10);
/// How often a pod whose references are missing is retried.
const PREPARE_RETRY: Duration = Duration::from_secs(1);

pub struct Ctx {
    pub client: Client,
    pub host: Host,
}

/// Runs `pod` until it is deleted (or the agent stops).
pub async fn run_pod(ctx: Arc<Ctx>, pod: Pod, mut signal: watch::Receiver<PodSignal>) {
    let key = pod_key(&pod);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
    let container = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .cloned()
        .unwrap_or_default();
    let image = container.image.clone().unwrap_or_default();
    let write = |patch: Value| {
        let pods = pods.clone();
        let name = pod.name_any();
        let key = key.clone();
        async move {
            match pods
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => eprintln!("[node-agent] {key}: writing pod status: {e}"),
            }
        }
    };
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    // A pod that ended before this agent saw it (an earlier agent ran it) is not run again.
    let finished = matches!(phase, Some("Succeeded" | "Failed"));
    // One an earlier agent started: its process is gone with that agent, and restartPolicy
    // Never forbids running it again. Reported as a kubelet reports a lost container.
    let lost = phase == Some("Running");

    let outcome = if finished || *signal.borrow() != PodSignal::Run {
        None
    } else if lost {
        eprintln!("[node-agent] {key}: was started by an earlier agent; its process is gone");
        let exit = Exit {
            code: 137,
            reason: "ContainerStatusUnknown".into(),
            message: Some("the node agent that ran this pod stopped; its process is gone".into()),
        };
        write(status::terminated(
            &container.name,
            &image,
            None,
            None,
            &exit,
        ))
        .await;
        Some(Ended::Exited)
    } else {
        let mut last_error = String::new();
        let plan = loop {
            match prepare(&ctx, &pod).await {
                Ok(plan) => break Ok(plan),
                Err(e @ (AgentError::Unsupported { .. } | AgentError::UnknownCommand { .. })) => {
                    break Err(e);
                }
                Err(e) => {
                    let message = e.to_string();
                    if message != last_error {
                        eprintln!("[node-agent] {key}: not starting yet: {message}");
                        write(status::waiting(
                            &container.name,
                            &image,
                            "CreateContainerConfigError",
                            &message,
                        ))
                        .await;
                        last_error = message;
                    }
                    tokio::select! {
                        () = tokio::time::sleep(PREPARE_RETRY) => {}
                        changed = signal.changed() => {
                            // The agent is gone: nothing left to report to.
                            if changed.is_err() {
                                return;
                            }
                        }
                    }
                    if *signal.borrow() != PodSignal::Run {
                        break Err(e);
                    }
                }
            }
        };
        match plan {
            Ok(plan) => Some(run_process(&key, &plan, &image, &mut signal, &write).await),
            Err(_) if *signal.borrow() != PodSignal::Run => None,
            Err(e) => {
                eprintln!("[node-agent] {key}: cannot start: {e}");
                let exit = Exit::start_error(&e);
                write(status::terminated(
                    &container.name,
                    &image,
                    None,
                    None,
                    &exit,
                ))
                .await;
                Some(Ended::Exited)
            }
        }
    };
    if outcome == Some(Ended::AgentStopped) {
        return;
    }
    // Wait for the deletion, then confirm it.
    loop {
        match *signal.borrow_and_update() {
            PodSignal::Terminate { .. } => break,
            PodSignal::Gone | PodSignal::AgentStop => return,
            PodSignal::Run => {}
        }
        if signal.changed().await.is_err() {
            return;
        }
    }
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: pod.uid(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match pods.delete(&pod.name_any(), &params).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => eprintln!("[node-agent] {key}: confirming the deletion: {e}"),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    Exited,
    AgentStopped,
}

/// References fetched, plan made, directories and projected files written.
async fn prepare(ctx: &Ctx, pod: &Pod) -> Result<Plan, AgentError> {
    let refs = References::fetch(&ctx.client, pod).await?;
    let plan = plan(pod, &refs, &ctx.host)?;
    for dir in std::iter::once(&plan.pod_dir).chain(&plan.dirs) {
        std::fs::create_dir_all(dir).map_err(AgentError::io(dir))?;
    }
    for (path, bytes) in &plan.files {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(AgentError::io(parent))?;
        }
        std::fs::write(path, bytes).map_err(AgentError::io(path))?;
    }
    Ok(plan)
}

/// Starts the process and supervises it; returns once it has ended (its status written,
/// unless the agent is stopping).
async fn run_process<F, Fut>(
    key: &str,
    plan: &Plan,
    image: &str,
    signal: &mut watch::Receiver<PodSignal>,
    write: &F,
) -> Ended
where
    F: Fn(Value) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let started = status::now();
    let child = open_log(&plan.log).and_then(|(out, err)| {
        tokio::process::Command::new(&plan.program)
            .args(&plan.args)
            .env_clear()
            .envs(plan.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&plan.cwd)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Its own process group: SIGKILL reaches everything the container started.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(AgentError::io(&plan.program))
    });
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            eprintln!("[node-agent] {key}: cannot start: {e}");
            let exit = Exit::start_error(&e);
            write(status::terminated(
                &plan.container,
                image,
                None,
                Some(&started),
                &exit,
            ))
            .await;
            return Ended::Exited;
        }
    };
    let pid = child.id().unwrap_or_default();
    eprintln!(
        "[node-agent] {key}: started pid {pid}: {} {} (log: {})",
        plan.program.display(),
        plan.args.join(" "),
        plan.log.display()
    );
    for (mount, host) in plan.paths.mounts() {
        eprintln!("[node-agent] {key}:   {mount} -> {}", host.display());
    }
    write(status::running(&plan.container, image, pid, &started)).await;

    let mut agent_stopping = false;
    let mut kill_at: Option<tokio::time::Instant> = None;
    let exit = loop {
        let kill_deadline = async {
            match kill_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            status = child.wait() => break status,
            () = kill_deadline => {
                eprintln!("[node-agent] {key}: pid {pid} outlived its grace period, SIGKILL");
                kill_group(pid, Signal::KILL);
                kill_at = None;
            }
            changed = signal.changed() => {
                let now = tokio::time::Instant::now();
                let sig = if changed.is_err() { PodSignal::AgentStop } else { *signal.borrow() };
                match sig {
                    PodSignal::Run => {}
                    PodSignal::Terminate { grace } if kill_at.is_none() => {
                        terminate(pid);
                        kill_at = Some(now + grace);
                    }
                    PodSignal::Terminate { .. } => {}
                    PodSignal::Gone => kill_group(pid, Signal::KILL),
                    PodSignal::AgentStop => {
                        agent_stopping = true;
                        terminate(pid);
                        kill_at = Some(kill_at.map_or(now + AGENT_STOP_GRACE, |at| at.min(now + AGENT_STOP_GRACE)));
                    }
                }
                if changed.is_err() {
                    // No more signals can come: wait for the exit alone.
                    let status = tokio::select! {
                        status = child.wait() => status,
                        () = tokio::time::sleep(AGENT_STOP_GRACE) => {
                            kill_group(pid, Signal::KILL);
                            child.wait().await
                        }
                    };
                    break status;
                }
            }
        }
    };
    // When the container's first process ends, the rest of it goes too.
    kill_group(pid, Signal::KILL);
    let exit = match exit {
        Ok(status) => {
            let tail = (status.code() != Some(0)).then(|| {
                std::fs::read(&plan.log)
                    .map(|b| status::log_tail(&String::from_utf8_lossy(&b)))
                    .unwrap_or_default()
            });
            Exit::from_status(status, tail)
        }
        Err(e) => Exit {
            code: 128,
            reason: "Error".into(),
            message: Some(format!("waiting for pid {pid}: {e}")),
        },
    };
    eprintln!(
        "[node-agent] {key}: pid {pid} exited with {} (log: {})",
        exit.code,
        plan.log.display()
    );
    if agent_stopping {
        return Ended::AgentStopped;
    }
    write(status::terminated(
        &plan.container,
        image,
        Some(pid),
        Some(&started),
        &exit,
    ))
    .await;
    Ended::Exited
}

fn open_log(path: &Path) -> Result<(Stdio, Stdio), AgentError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(AgentError::io(path))?;
    let copy = file.try_clone().map_err(AgentError::io(path))?;
    Ok((file.into(), copy.into()))
}

/// SIGTERM to the container's first process, as a kubelet sends it (the trainer's launcher
/// forwards it to its workers and checkpoints).
fn terminate(pid: u32) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        // It may have exited already.
        let _ = kill_process(pid, Signal::TERM);
    }
}

/// `sig` to every process of the container (its process group).
fn kill_group(pid: u32, sig: Signal) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        // ESRCH: nothing left of the group.
        let _ = kill_process_group(pid, sig);
    }
}
