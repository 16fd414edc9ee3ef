//! What `kubectl dinoflow` shows of a job, computed from its object alone (status and spec) so
//! that the text and `-o json` say the same thing; rendering is pure and unit-tested.
use std::fmt::Write as _;

use dinoflow_api::status::{JobStatus, condition};
use k8s_openapi::jiff::Timestamp;
use serde::Serialize;
use serde_json::Value;

/// A job as the plugin reads it: identity, the spec values it shows and the status.
#[derive(Debug, Clone)]
pub struct Job {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub spec: Value,
    pub status: JobStatus,
}

/// The derived view of a job (`-o json` prints it).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StatusView {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub phase: String,
    pub message: Option<String>,
    pub iteration: Option<i64>,
    pub total_iterations: Option<i64>,
    /// iteration / total, 0..1.
    pub progress: Option<f64>,
    /// Seconds to the last iteration at the current attempt's average rate.
    pub eta_seconds: Option<f64>,
    pub images_per_second: Option<f64>,
    /// Estimated MFU (0..1), when the trainer knows the peak FLOP/s.
    pub mfu: Option<f64>,
    pub losses: std::collections::BTreeMap<String, f64>,
    pub last_checkpoint: Option<CheckpointView>,
    pub evaluations: Vec<EvaluationView>,
    pub restarts: RestartsView,
    pub pods: Option<dinoflow_api::status::PodCounts>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointView {
    pub iteration: i64,
    pub path: String,
    pub age_seconds: Option<f64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EvaluationView {
    pub name: String,
    pub iteration: i64,
    pub metrics: std::collections::BTreeMap<String, f64>,
}

/// Gang restarts by the budget they count against, and why the last one happened.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RestartsView {
    pub run_attempt: i32,
    /// Failures without progress (and hangs): `runPolicy.backoffLimit`.
    pub failures: i32,
    /// Failures after a new verified checkpoint: `runPolicy.progressRestartLimit`.
    pub after_progress: i32,
    /// Evictions, preemptions, lost nodes: `runPolicy.disruptionLimit`.
    pub disruptions: i32,
    /// Reason and message of the `Restarting` condition (the latest restart).
    pub last_reason: Option<String>,
    pub last_message: Option<String>,
}

/// `kubectl dinoflow checkpoints`: what the job says about its checkpoints.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointsView {
    pub namespace: String,
    pub name: String,
    pub output_dir: Option<String>,
    pub period_iterations: Option<u64>,
    pub keep_last: Option<u64>,
    pub last: Option<CheckpointView>,
    /// The checkpoint the current attempt resumed from.
    pub attempt_resumed_from: Option<i64>,
    /// The next periodic checkpoint, if the run goes on.
    pub next_iteration: Option<i64>,
}

fn seconds_between(from: Timestamp, to: Timestamp) -> f64 {
    (to.as_millisecond() - from.as_millisecond()) as f64 / 1000.0
}

impl Job {
    pub fn status_view(&self, now: Timestamp) -> StatusView {
        let s = &self.status;
        let progress = match (s.iteration, s.total_iterations) {
            (Some(i), Some(t)) if t > 0 => Some((i as f64 / t as f64).clamp(0.0, 1.0)),
            _ => None,
        };
        let restarting = s.condition(condition::RESTARTING);
        StatusView {
            kind: self.kind.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            phase: s.phase().as_str().to_string(),
            message: s.message.clone(),
            iteration: s.iteration,
            total_iterations: s.total_iterations,
            progress,
            eta_seconds: self.eta_seconds(),
            images_per_second: s.images_per_second,
            mfu: s.mfu,
            losses: s.losses.clone(),
            last_checkpoint: s.last_checkpoint.as_ref().map(|c| CheckpointView {
                iteration: c.iteration,
                path: c.path.clone(),
                age_seconds: Some(seconds_between(c.time.0, now).max(0.0)),
            }),
            evaluations: s
                .evaluations
                .iter()
                .map(|e| EvaluationView {
                    name: e.name.clone(),
                    iteration: e.iteration,
                    metrics: e.metrics.clone(),
                })
                .collect(),
            restarts: RestartsView {
                run_attempt: s.run_attempt.unwrap_or(0),
                failures: s.restarts.unwrap_or(0),
                after_progress: s.progress_restarts.unwrap_or(0),
                disruptions: s.disruptions.unwrap_or(0),
                last_reason: restarting
                    .filter(|c| !c.reason.is_empty())
                    .map(|c| c.reason.clone()),
                last_message: restarting
                    .filter(|c| !c.message.is_empty())
                    .map(|c| c.message.clone()),
            },
            pods: s.pods,
        }
    }

    /// Remaining iterations at the current attempt's average rate: iterations done since the
    /// attempt started (from its resume point) over the time from its pods running to the
    /// last report. Evaluations and checkpoint writes are in that time, as they will be in
    /// the rest of the run. None before two points are known or once finished.
    fn eta_seconds(&self) -> Option<f64> {
        let s = &self.status;
        if s.phase().is_finished() {
            return None;
        }
        let (iteration, total) = (s.iteration?, s.total_iterations?);
        let started = s.attempt_running_time.as_ref()?.0;
        let last = s.last_progress_time.as_ref()?.0;
        let done = iteration - s.attempt_checkpoint_iteration.unwrap_or(0);
        let elapsed = seconds_between(started, last);
        if done <= 0 || elapsed <= 0.0 {
            return None;
        }
        Some((total - iteration).max(0) as f64 * elapsed / done as f64)
    }

    pub fn checkpoints_view(&self, now: Timestamp) -> CheckpointsView {
        let training = &self.spec["training"];
        let period = training["checkpoint"]["periodIterations"]
            .as_u64()
            .or_else(|| {
                // Unset: 3 official epochs, as the trainer does.
                training["train"]["officialEpochLength"]
                    .as_u64()
                    .map(|e| 3 * e)
            });
        let last = self.status_view(now).last_checkpoint;
        let next_iteration = match (period, self.status.iteration, self.status.phase()) {
            (Some(p), Some(i), phase) if p > 0 && !phase.is_finished() => {
                let next = (i as u64 / p + 1) * p;
                Some(match self.status.total_iterations {
                    Some(t) => next.min(t as u64),
                    None => next,
                } as i64)
            }
            _ => None,
        };
        CheckpointsView {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            output_dir: training["output"]["dir"].as_str().map(str::to_string),
            period_iterations: period,
            keep_last: training["checkpoint"]["keepLast"].as_u64(),
            last,
            attempt_resumed_from: self.status.attempt_checkpoint_iteration,
            next_iteration,
        }
    }
}

/// `1h02m03s`, `4m05s`, `12s`.
pub fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    let (h, m, s) = (s / 3600, (s % 3600) / 60, s % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s:02}s"),
        _ => format!("{h}h{m:02}m{s:02}s"),
    }
}

/// `[########------------]` of `width` cells.
pub fn bar(fraction: f64, width: usize) -> String {
    let filled = (fraction.clamp(0.0, 1.0) * width as f64).round() as usize;
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

fn or_dash(v: Option<String>) -> String {
    v.unwrap_or_else(|| "-".into())
}

/// The terminal view of `kubectl dinoflow status`.
pub fn render_status(v: &StatusView) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{} {}/{}", v.kind, v.namespace, v.name);
    let mut phase = format!("Phase:       {}", v.phase);
    if let Some(m) = v.message.as_deref().filter(|m| !m.is_empty()) {
        let _ = write!(phase, " ({m})");
    }
    let _ = writeln!(out, "{phase}");
    let progress = match (v.iteration, v.total_iterations, v.progress) {
        (Some(i), Some(t), Some(p)) => format!(
            "{} {i}/{t} iterations ({:.1}%)  ETA {}",
            bar(p, 30),
            100.0 * p,
            or_dash(v.eta_seconds.map(duration))
        ),
        _ => format!("{} no progress reported yet", bar(0.0, 30)),
    };
    let _ = writeln!(out, "Progress:    {progress}");
    let _ = writeln!(
        out,
        "Throughput:  {}   MFU: {}",
        or_dash(v.images_per_second.map(|x| format!("{x:.1} images/s"))),
        or_dash(v.mfu.map(|m| format!("{:.1}%", 100.0 * m)))
    );
    if !v.losses.is_empty() {
        let losses: Vec<String> = v
            .losses
            .iter()
            .map(|(k, x)| format!("{k}={x:.4}"))
            .collect();
        let _ = writeln!(out, "Losses:      {}", losses.join(" "));
    }
    let checkpoint = v.last_checkpoint.as_ref().map(|c| {
        format!(
            "iteration {} ({} ago) {}",
            c.iteration,
            or_dash(c.age_seconds.map(duration)),
            c.path
        )
    });
    let _ = writeln!(
        out,
        "Checkpoint:  {}",
        checkpoint.unwrap_or_else(|| "none yet".into())
    );
    if let Some(p) = &v.pods {
        let _ = writeln!(
            out,
            "Pods:        {} expected: {} running, {} pending, {} succeeded, {} failed",
            p.expected, p.running, p.pending, p.succeeded, p.failed
        );
    }
    let r = &v.restarts;
    let _ = writeln!(
        out,
        "Restarts:    attempt {}: {} after failures, {} after progress, {} disruptions",
        r.run_attempt, r.failures, r.after_progress, r.disruptions
    );
    if let Some(reason) = &r.last_reason {
        let _ = writeln!(
            out,
            "             last: {reason}: {}",
            r.last_message.as_deref().unwrap_or("")
        );
    }
    out.push_str("Evaluations:\n");
    out.push_str(&evaluation_table(&v.evaluations));
    out
}

/// One row per evaluation metric: `NAME  ITERATION  METRIC  VALUE`, aligned.
pub fn evaluation_table(evaluations: &[EvaluationView]) -> String {
    if evaluations.is_empty() {
        return "  none yet\n".into();
    }
    let mut rows = vec![[
        "NAME".to_string(),
        "ITERATION".into(),
        "METRIC".into(),
        "VALUE".into(),
    ]];
    for e in evaluations {
        for (metric, value) in &e.metrics {
            rows.push([
                e.name.clone(),
                e.iteration.to_string(),
                metric.clone(),
                format!("{value:.4}"),
            ]);
        }
    }
    table(&rows)
}

fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "  {}", cells.join("  ").trim_end());
    }
    out
}

/// The terminal view of `kubectl dinoflow checkpoints`.
pub fn render_checkpoints(v: &CheckpointsView) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Checkpoints of {}/{}", v.namespace, v.name);
    let _ = writeln!(
        out,
        "Directory:   {}/checkpoints (every {} iterations, last {} kept)",
        or_dash(v.output_dir.clone()),
        or_dash(v.period_iterations.map(|p| p.to_string())),
        or_dash(v.keep_last.map(|k| k.to_string()))
    );
    match &v.last {
        Some(c) => {
            let _ = writeln!(
                out,
                "Last:        iteration {} ({} ago) {}",
                c.iteration,
                or_dash(c.age_seconds.map(duration)),
                c.path
            );
        }
        None => out.push_str("Last:        none verified yet\n"),
    }
    if let Some(i) = v.attempt_resumed_from {
        let _ = writeln!(out, "Resumed:     this attempt started from iteration {i}");
    }
    if let Some(i) = v.next_iteration {
        let _ = writeln!(out, "Next:        at iteration {i}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use dinoflow_api::status::{CheckpointRef, EvaluationResult, JobPhase};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(1_800_000_000 + secs).unwrap())
    }

    fn running_job() -> Job {
        let mut status = JobStatus {
            phase: Some(JobPhase::Running),
            iteration: Some(120),
            total_iterations: Some(300),
            images_per_second: Some(812.25),
            mfu: Some(0.4123),
            run_attempt: Some(1),
            progress_restarts: Some(1),
            attempt_checkpoint_iteration: Some(100),
            attempt_running_time: Some(at(0)),
            last_progress_time: Some(at(40)),
            last_checkpoint: Some(CheckpointRef {
                iteration: 100,
                path: "/ckpt/ckpt-000000100".into(),
                time: at(-30),
            }),
            evaluations: vec![EvaluationResult {
                name: "knn".into(),
                iteration: 100,
                metrics: [("top1_k20".to_string(), 0.705), ("top5_k20".into(), 0.97)].into(),
                time: at(-20),
            }],
            ..Default::default()
        };
        status.losses.insert("total_loss".into(), 9.5);
        status.set_condition(
            condition::RESTARTING,
            false,
            "PodFailed",
            "pod tiny-a0-0 exited 137",
            at(-50),
            None,
        );
        Job {
            kind: "PretrainJob".into(),
            namespace: "ml".into(),
            name: "tiny".into(),
            spec: serde_json::json!({"training": {
                "checkpoint": {"periodIterations": 50, "keepLast": 2},
                "output": {"dir": "/ckpt"},
            }}),
            status,
        }
    }

    #[test]
    fn the_eta_is_the_remaining_iterations_at_the_attempts_average_rate() {
        let v = running_job().status_view(at(60).0);
        // 20 iterations in 40 s since the resume at 100: 180 left take 360 s.
        assert_eq!(v.eta_seconds, Some(360.0));
        assert_eq!(v.progress, Some(0.4));
        let mut done = running_job();
        done.status.phase = Some(JobPhase::Succeeded);
        assert_eq!(done.status_view(at(60).0).eta_seconds, None);
    }

    #[test]
    fn status_shows_a_progress_bar_throughput_checkpoint_restarts_and_evaluations() {
        let text = render_status(&running_job().status_view(at(60).0));
        for expected in [
            "PretrainJob ml/tiny",
            "Phase:       Running",
            "[############------------------] 120/300 iterations (40.0%)  ETA 6m00s",
            "Throughput:  812.2 images/s   MFU: 41.2%",
            "Losses:      total_loss=9.5000",
            "Checkpoint:  iteration 100 (1m30s ago) /ckpt/ckpt-000000100",
            "Restarts:    attempt 1: 0 after failures, 1 after progress, 0 disruptions",
            "last: PodFailed: pod tiny-a0-0 exited 137",
            "  NAME  ITERATION  METRIC    VALUE",
            "  knn   100        top1_k20  0.7050",
            "  knn   100        top5_k20  0.9700",
        ] {
            assert!(text.contains(expected), "{expected:?} not in\n{text}");
        }
    }

    #[test]
    fn a_job_without_progress_says_so() {
        let job = Job {
            kind: "DistillJob".into(),
            namespace: "ml".into(),
            name: "d".into(),
            spec: Value::Null,
            status: JobStatus::default(),
        };
        let text = render_status(&job.status_view(at(0).0));
        assert!(text.contains("Phase:       Pending"), "{text}");
        assert!(text.contains("no progress reported yet"), "{text}");
        assert!(text.contains("Checkpoint:  none yet"), "{text}");
        assert!(text.contains("MFU: -"), "unknown, not 0: {text}");
        assert!(text.contains("Evaluations:\n  none yet"), "{text}");
    }

    #[test]
    fn checkpoints_show_the_policy_the_last_one_and_the_next() {
        let v = running_job().checkpoints_view(at(60).0);
        assert_eq!(v.next_iteration, Some(150));
        let text = render_checkpoints(&v);
        for expected in [
            "Directory:   /ckpt/checkpoints (every 50 iterations, last 2 kept)",
            "Last:        iteration 100 (1m30s ago) /ckpt/ckpt-000000100",
            "Resumed:     this attempt started from iteration 100",
            "Next:        at iteration 150",
        ] {
            assert!(text.contains(expected), "{expected:?} not in\n{text}");
        }
    }

    #[test]
    fn durations_and_bars_format_for_a_terminal() {
        assert_eq!(duration(12.4), "12s");
        assert_eq!(duration(245.0), "4m05s");
        assert_eq!(duration(3723.0), "1h02m03s");
        assert_eq!(bar(0.5, 4), "[##--]");
        assert_eq!(bar(1.5, 2), "[##]");
    }
}
