//! The local gang: one worker process per local rank, supervised like torchrun's local
//! agent. Signals to the launcher go to every worker; the first worker to fail takes the
//! others down, because a collective cannot continue with a rank missing.
use std::io;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dinoflow_api::exit_codes::{NON_FINITE_LOSS, PERMANENT_FAILURE};
use rustix::process::{Pid, Signal, kill_process};

/// How often the supervisor looks at its workers and at pending signals.
const POLL: Duration = Duration::from_millis(50);

/// Exit code as a shell reports it: the code, or 128 + the signal that killed the process.
pub fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// The launcher's exit code from its workers' codes in the order they were seen.
///
/// A permanent code (78 bad input, 79 non-finite loss) wins wherever it appears: the ranks
/// that fail after it typically only lost their peer, and the operator must not retry a job
/// that will fail again. Otherwise the first failure is the cause; 0 only when all succeeded.
pub fn gang_exit_code(codes_in_exit_order: &[i32]) -> i32 {
    let permanent = |c: &&i32| **c == PERMANENT_FAILURE || **c == NON_FINITE_LOSS;
    codes_in_exit_order
        .iter()
        .find(permanent)
        .or_else(|| codes_in_exit_order.iter().find(|c| **c != 0))
        .copied()
        .unwrap_or(0)
}

struct Worker {
    local_rank: usize,
    child: Child,
    code: Option<i32>,
}

impl Worker {
    fn signal(&self, sig: Signal) {
        if self.code.is_some() {
            return;
        }
        let Some(pid) = i32::try_from(self.child.id()).ok().and_then(Pid::from_raw) else {
            return;
        };
        // ESRCH: it exited between the poll and now; the next poll reaps it.
        if let Err(e) = kill_process(pid, sig)
            && e != rustix::io::Errno::SRCH
        {
            tracing::warn!(local_rank = self.local_rank, "cannot signal worker: {e}");
        }
    }
}

/// Running workers of this node.
pub struct Gang {
    workers: Vec<Worker>,
}

impl std::fmt::Debug for Gang {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gang")
            .field("workers", &self.workers.len())
            .finish()
    }
}

impl Gang {
    /// Starts one worker per command (index = local rank). If one cannot be started, those
    /// already running are killed.
    pub fn spawn(commands: Vec<Command>) -> io::Result<Self> {
        let mut gang = Self {
            workers: Vec::with_capacity(commands.len()),
        };
        for (local_rank, mut cmd) in commands.into_iter().enumerate() {
            match cmd.spawn() {
                Ok(child) => gang.workers.push(Worker {
                    local_rank,
                    child,
                    code: None,
                }),
                Err(e) => {
                    for w in &mut gang.workers {
                        let _ = w.child.kill();
                        let _ = w.child.wait();
                    }
                    return Err(e);
                }
            }
        }
        Ok(gang)
    }

    /// Waits for every worker and returns the launcher's exit code (see [`gang_exit_code`]).
    ///
    /// `signal` holds a signal number the launcher received (0: none); it is forwarded to
    /// every live worker, and then the launcher waits without a deadline (the workers write
    /// a checkpoint; the kubelet enforces the pod's grace period). When a worker fails on its
    /// own, the others get SIGTERM and, after `grace`, SIGKILL.
    pub fn supervise(mut self, signal: &AtomicUsize, grace: Duration) -> i32 {
        let mut codes = Vec::with_capacity(self.workers.len());
        let mut forwarded = false;
        let mut kill_at: Option<Instant> = None;
        loop {
            let received = signal.swap(0, Ordering::SeqCst);
            if received != 0 {
                let sig = i32::try_from(received)
                    .ok()
                    .and_then(Signal::from_named_raw)
                    .unwrap_or(Signal::TERM);
                tracing::warn!(signal = received, "forwarding the signal to every worker");
                for w in &self.workers {
                    w.signal(sig);
                }
                forwarded = true;
                kill_at = None;
            }
            for w in &mut self.workers {
                if w.code.is_some() {
                    continue;
                }
                match w.child.try_wait() {
                    Ok(Some(status)) => {
                        let code = exit_code(status);
                        w.code = Some(code);
                        codes.push(code);
                        if code != 0 {
                            tracing::warn!(local_rank = w.local_rank, code, "worker exited");
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!(local_rank = w.local_rank, "cannot wait for worker: {e}");
                        w.code = Some(1);
                        codes.push(1);
                    }
                }
            }
            if self.workers.iter().all(|w| w.code.is_some()) {
                return gang_exit_code(&codes);
            }
            let failed = codes.iter().any(|c| *c != 0);
            if failed && !forwarded && kill_at.is_none() {
                tracing::warn!(
                    grace_seconds = grace.as_secs_f64(),
                    "a worker failed: stopping the others"
                );
                for w in &self.workers {
                    w.signal(Signal::TERM);
                }
                kill_at = Some(Instant::now() + grace);
            }
            if let Some(at) = kill_at
                && Instant::now() >= at
            {
                tracing::warn!("grace period over: killing the remaining workers");
                for w in &self.workers {
                    w.signal(Signal::KILL);
                }
                // Reap them on the next polls; SIGKILL cannot be ignored.
                kill_at = Some(Instant::now() + Duration::from_secs(3600));
            }
            std::thread::sleep(POLL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c").arg(script);
        c
    }

    /// Exits `code` on SIGTERM, otherwise runs for a minute.
    const STOPPABLE: &str =
        "trap 'exit 143' TERM; i=0; while [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done";

    fn run(commands: Vec<Command>, signal: usize, grace: Duration) -> (i32, Duration) {
        let started = Instant::now();
        let gang = Gang::spawn(commands).unwrap();
        let flag = AtomicUsize::new(signal);
        (gang.supervise(&flag, grace), started.elapsed())
    }

    #[test]
    fn the_gang_succeeds_only_when_every_worker_succeeds() {
        assert_eq!(gang_exit_code(&[0, 0, 0]), 0);
        assert_eq!(gang_exit_code(&[]), 0);
        let (code, _) = run(
            vec![sh("exit 0"), sh("sleep 0.2; exit 0")],
            0,
            Duration::ZERO,
        );
        assert_eq!(code, 0);
    }

    #[test]
    fn the_first_failure_is_the_gangs_code_unless_a_permanent_one_follows() {
        assert_eq!(gang_exit_code(&[0, 3, 143]), 3);
        assert_eq!(gang_exit_code(&[1, 79, 137]), 79);
        assert_eq!(gang_exit_code(&[143, 78]), 78);
        assert_eq!(gang_exit_code(&[0, 101]), 101);
    }

    #[test]
    fn a_failing_worker_stops_the_others_and_its_code_is_returned() {
        let (code, took) = run(
            vec![sh(STOPPABLE), sh("sleep 0.2; exit 78"), sh(STOPPABLE)],
            0,
            Duration::from_secs(30),
        );
        assert_eq!(code, 78);
        assert!(took < Duration::from_secs(20), "took {took:?}");
        let (code, _) = run(
            vec![sh("sleep 0.2; exit 3"), sh(STOPPABLE)],
            0,
            Duration::from_secs(30),
        );
        assert_eq!(code, 3);
    }

    #[test]
    fn a_worker_ignoring_sigterm_is_killed_after_the_grace_period() {
        let (code, took) = run(
            vec![
                sh("trap '' TERM; i=0; while [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done"),
                sh("exit 2"),
            ],
            0,
            Duration::from_millis(300),
        );
        assert_eq!(code, 2);
        assert!(took < Duration::from_secs(20), "took {took:?}");
    }

    #[test]
    fn a_signal_to_the_launcher_reaches_every_worker() {
        let sigterm = Signal::TERM.as_raw() as usize;
        let (code, took) = run(
            vec![sh(STOPPABLE), sh(STOPPABLE)],
            sigterm,
            Duration::from_secs(30),
        );
        assert_eq!(code, 143);
        assert!(took < Duration::from_secs(20), "took {took:?}");
    }

    #[test]
    fn exit_codes_of_signalled_processes_read_as_a_shells() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        child.kill().unwrap();
        assert_eq!(exit_code(child.wait().unwrap()), 137);
    }
}
