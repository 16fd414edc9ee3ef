//! Pod status as a kubelet writes it, for the three moments the agent reports: waiting to
//! start (a reference is missing), running, and terminated with the process's exit code.

use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

use super::plan::POD_IP;

/// Scheme of the containerIDs the agent reports: no runtime, the process id is the id.
const CONTAINER_ID_SCHEME: &str = "local://";

fn container_id(pid: u32) -> String {
    format!("{CONTAINER_ID_SCHEME}{pid}")
}

/// The process the agent runs for `pod` (its container's process-group leader), read from
/// the containerID it reported; None before the pod started or for a pod of another node.
pub fn container_pid(pod: &Pod) -> Option<u32> {
    let status = pod.status.as_ref()?.container_statuses.as_ref()?.first()?;
    status
        .container_id
        .as_deref()?
        .strip_prefix(CONTAINER_ID_SCHEME)?
        .parse()
        .ok()
}

/// RFC 3339 time in whole seconds, like the API server's `Time`.
pub fn now() -> String {
    let now = k8s_openapi::jiff::Timestamp::now();
    now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn conditions(ready: bool, time: &str) -> Value {
    let status = |ok: bool| if ok { "True" } else { "False" };
    let condition = |type_: &str, ok: bool| json!({ "type": type_, "status": status(ok), "lastTransitionTime": time });
    json!([
        condition("PodReadyToStartContainers", true),
        condition("Initialized", true),
        condition("Ready", ready),
        condition("ContainersReady", ready),
        condition("PodScheduled", true),
    ])
}

fn ips() -> Value {
    json!([{ "ip": POD_IP }])
}

/// Pending, the container waiting (`CreateContainerConfigError` and the reason).
pub fn waiting(container: &str, image: &str, reason: &str, message: &str) -> Value {
    let time = now();
    json!({ "status": {
        "phase": "Pending",
        "hostIP": POD_IP, "hostIPs": ips(),
        "conditions": conditions(false, &time),
        "containerStatuses": [{
            "name": container, "image": image, "imageID": "", "ready": false, "started": false,
            "restartCount": 0,
            "state": { "waiting": { "reason": reason, "message": message } },
        }],
    }})
}

/// Running: the process `pid` started at `started`.
pub fn running(container: &str, image: &str, pid: u32, started: &str) -> Value {
    json!({ "status": {
        "phase": "Running",
        "hostIP": POD_IP, "hostIPs": ips(),
        "podIP": POD_IP, "podIPs": ips(),
        "startTime": started,
        "conditions": conditions(true, started),
        "containerStatuses": [{
            "name": container, "image": image, "imageID": "", "ready": true, "started": true,
            "restartCount": 0, "containerID": container_id(pid),
            "state": { "running": { "startedAt": started } },
        }],
    }})
}

/// How a container process ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Exit {
    /// The exit status, or 128 + the signal that killed it (as container runtimes report).
    pub code: i32,
    /// `Completed` (0), `Error`, or `StartError` when it never ran.
    pub reason: String,
    /// The termination message (`FallbackToLogsOnError`: the log's tail on failure).
    pub message: Option<String>,
}

impl Exit {
    /// What a container runtime reports when it cannot start the container.
    pub fn start_error(error: &dyn std::fmt::Display) -> Self {
        Self {
            code: 128,
            reason: "StartError".into(),
            message: Some(error.to_string()),
        }
    }

    pub fn from_status(status: std::process::ExitStatus, message: Option<String>) -> Self {
        use std::os::unix::process::ExitStatusExt;
        let code = status
            .code()
            .or_else(|| status.signal().map(|s| 128 + s))
            .unwrap_or(128);
        Self {
            code,
            reason: if code == 0 { "Completed" } else { "Error" }.into(),
            message: message.filter(|_| code != 0),
        }
    }
}

/// The first container's terminated state, as a kubelet reports it (tests read exit codes
/// and reasons from it).
pub fn terminated_state(
    pod: &k8s_openapi::api::core::v1::Pod,
) -> Option<k8s_openapi::api::core::v1::ContainerStateTerminated> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .terminated
        .clone()
}

/// Succeeded or Failed (restartPolicy Never) with the container terminated.
pub fn terminated(
    container: &str,
    image: &str,
    pid: Option<u32>,
    started: Option<&str>,
    exit: &Exit,
) -> Value {
    let finished = now();
    let mut state = json!({
        "exitCode": exit.code,
        "reason": exit.reason,
        "finishedAt": finished,
    });
    if let Some(started) = started {
        state["startedAt"] = json!(started);
    }
    if let Some(message) = &exit.message {
        state["message"] = json!(message);
    }
    let mut container_status = json!({
        "name": container, "image": image, "imageID": "", "ready": false, "started": false,
        "restartCount": 0, "state": { "terminated": state },
    });
    if let Some(pid) = pid {
        container_status["containerID"] = json!(container_id(pid));
    }
    json!({ "status": {
        "phase": if exit.code == 0 { "Succeeded" } else { "Failed" },
        "hostIP": POD_IP, "hostIPs": ips(),
        "podIP": POD_IP, "podIPs": ips(),
        "conditions": conditions(false, &finished),
        "containerStatuses": [container_status],
    }})
}

/// The end of a log for a termination message: at most the last 80 lines and 2 KiB, as the
/// kubelet's `FallbackToLogsOnError` takes.
pub fn log_tail(text: &str) -> String {
    const MAX_BYTES: usize = 2048;
    const MAX_LINES: usize = 80;
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(MAX_LINES)..].join("\n");
    let mut start = tail.len().saturating_sub(MAX_BYTES);
    while !tail.is_char_boundary(start) {
        start += 1;
    }
    tail[start..].to_owned()
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    use super::*;

    #[test]
    fn the_pid_reported_in_the_container_id_is_read_back() {
        let mut pod: Pod = serde_json::from_value(running("trainer", "img", 4242, &now())).unwrap();
        assert_eq!(container_pid(&pod), Some(4242));
        pod.status
            .as_mut()
            .unwrap()
            .container_statuses
            .as_mut()
            .unwrap()[0]
            .container_id = Some("containerd://abc".into());
        assert_eq!(container_pid(&pod), None, "a real runtime's id has no pid");
        pod.status = None;
        assert_eq!(container_pid(&pod), None);
    }

    #[test]
    fn exit_codes_and_signals_become_container_exit_codes() {
        let ok = Exit::from_status(ExitStatus::from_raw(0), Some("ignored".into()));
        assert_eq!(
            (ok.code, ok.reason.as_str(), ok.message),
            (0, "Completed", None)
        );
        let failed = Exit::from_status(ExitStatus::from_raw(78 << 8), Some("bad config".into()));
        assert_eq!((failed.code, failed.reason.as_str()), (78, "Error"));
        assert_eq!(failed.message.as_deref(), Some("bad config"));
        // Killed by SIGKILL (9): 137, as container runtimes report it.
        assert_eq!(Exit::from_status(ExitStatus::from_raw(9), None).code, 137);
    }

    #[test]
    fn a_terminated_status_has_the_phase_and_exit_code_the_operator_reads() {
        let exit = Exit {
            code: 143,
            reason: "Error".into(),
            message: Some("stopped".into()),
        };
        let s = terminated(
            "trainer",
            "img",
            Some(7),
            Some("2026-01-01T00:00:00Z"),
            &exit,
        );
        assert_eq!(s["status"]["phase"], "Failed");
        let t = &s["status"]["containerStatuses"][0]["state"]["terminated"];
        assert_eq!(t["exitCode"], 143);
        assert_eq!(t["message"], "stopped");
        let ok = Exit {
            code: 0,
            reason: "Completed".into(),
            message: None,
        };
        assert_eq!(
            terminated("trainer", "img", None, None, &ok)["status"]["phase"],
            "Succeeded"
        );
    }

    #[test]
    fn a_running_pod_has_the_local_ip_and_is_ready() {
        let s = running("trainer", "img", 42, "2026-01-01T00:00:00Z");
        assert_eq!(s["status"]["podIP"], "127.0.0.1");
        assert_eq!(
            s["status"]["containerStatuses"][0]["state"]["running"]["startedAt"],
            "2026-01-01T00:00:00Z"
        );
        assert!(
            s["status"]["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        );
    }

    #[test]
    fn the_log_tail_keeps_the_last_lines_within_two_kib() {
        let log: String = (0..200).map(|i| format!("line {i}\n")).collect();
        let tail = log_tail(&log);
        assert!(tail.ends_with("line 199"));
        assert!(tail.starts_with("line 120"), "{}", &tail[..20]);
        let long = "é".repeat(3000);
        assert!(log_tail(&long).len() <= 2048);
    }
}
