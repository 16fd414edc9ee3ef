//! `dinoflow-trainer launch <train|distill>`: the process the operator's pods run, a local
//! agent in the manner of torchrun. It reads the pod's environment contract, forks one
//! `train` (or `distill`) worker per local rank with `RANK`, `LOCAL_RANK` and `LOCAL_WORLD_SIZE` set, forwards
//! SIGTERM/SIGINT to them, and exits with the gang's code (see [`gang::gang_exit_code`]).
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use dinoflow_api::contract::{self as c, JobKind};

use crate::checkpoint::ResumeMode;
use crate::cli::TrainArgs;
use crate::env::{self, EnvError, LaunchEnv};

pub mod gang;

/// Why the launcher could not start its workers.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The pod's environment contract is broken: no restart fixes it.
    #[error(transparent)]
    Env(#[from] EnvError),
    #[error("cannot find the trainer executable to fork workers: {0}")]
    Exe(#[source] std::io::Error),
    #[error("cannot install the signal handler: {0}")]
    Signals(#[source] std::io::Error),
    #[error("cannot start a worker process: {0}")]
    Spawn(#[source] std::io::Error),
}

/// Runs the launcher for a job of `kind`; returns the gang's exit code (see
/// [`gang::gang_exit_code`]) once every worker is done.
pub fn run(kind: JobKind, args: &TrainArgs, grace_period: Duration) -> Result<i32, LaunchError> {
    let env = env::launch_env(&env::process_env(), kind)?;
    let exe = std::env::current_exe().map_err(LaunchError::Exe)?;
    let signal = Arc::new(AtomicUsize::new(0));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register_usize(sig, Arc::clone(&signal), sig as usize)
            .map_err(LaunchError::Signals)?;
    }
    tracing::info!(
        node_rank = env.node_rank,
        nnodes = env.nnodes,
        nproc_per_node = env.nproc_per_node,
        world_size = env.world_size,
        master = %format!("{}:{}", env.rendezvous.master_addr, env.rendezvous.master_port),
        "launching workers"
    );
    let gang =
        gang::Gang::spawn(worker_commands(kind, &exe, args, &env)).map_err(LaunchError::Spawn)?;
    let code = gang.supervise(&signal, grace_period);
    tracing::info!(code, "workers done");
    Ok(code)
}

/// `train` argument list equivalent to `args`.
pub fn train_argv(args: &TrainArgs) -> Vec<String> {
    worker_argv(JobKind::Pretrain, args)
}

/// The worker's argument list: the subcommand of `kind` (`train` or `distill`) with `args`.
pub fn worker_argv(kind: JobKind, args: &TrainArgs) -> Vec<String> {
    let mut argv = vec![
        kind.trainer_subcommand().to_string(),
        "--config".into(),
        args.config.display().to_string(),
    ];
    if let Some(dir) = &args.output_dir {
        argv.extend(["--output-dir".into(), dir.display().to_string()]);
    }
    let resume = match &args.resume {
        ResumeMode::Auto => "auto".to_string(),
        ResumeMode::Never => "never".to_string(),
        ResumeMode::Path(p) => p.display().to_string(),
    };
    argv.extend(["--resume".into(), resume]);
    if args.force {
        argv.push("--force".into());
    }
    if let Some(n) = args.max_iterations {
        argv.extend(["--max-iterations".into(), n.to_string()]);
    }
    argv
}

/// One command per local rank: this binary's `train` (or `distill`) with the per-process
/// variables.
pub fn worker_commands(
    kind: JobKind,
    exe: &Path,
    args: &TrainArgs,
    env: &LaunchEnv,
) -> Vec<Command> {
    let argv = worker_argv(kind, args);
    let nproc = env.nproc_per_node;
    // Several CPU processes on one node would each start a thread per core; split the cores
    // as torchrun does, unless the user chose.
    let threads = (nproc > 1 && std::env::var_os("OMP_NUM_THREADS").is_none()).then(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / nproc as usize).max(1)
    });
    (0..nproc)
        .map(|local| {
            let mut cmd = Command::new(exe);
            cmd.args(&argv)
                .env(c::RANK, env.global_rank(local).to_string())
                .env(c::LOCAL_RANK, local.to_string())
                .env(c::LOCAL_WORLD_SIZE, nproc.to_string())
                .env(c::WORLD_SIZE, env.world_size.to_string())
                .env(c::NPROC_PER_NODE, nproc.to_string())
                .env(c::MASTER_ADDR, &env.rendezvous.master_addr)
                .env(c::MASTER_PORT, env.rendezvous.master_port.to_string());
            if let Some(t) = threads {
                cmd.env("OMP_NUM_THREADS", t.to_string());
            }
            cmd
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use super::*;

    fn envs(cmd: &Command) -> BTreeMap<String, String> {
        cmd.get_envs()
            .filter_map(|(k, v)| Some((k.to_str()?.to_string(), v?.to_str()?.to_string())))
            .collect()
    }

    #[test]
    fn workers_get_torchrun_ranks_from_the_node_rank() {
        let env = env::launch_env(
            &crate::env::tests::lookup(&[
                ("MASTER_ADDR", "job-a0-0.job.ns.svc"),
                ("MASTER_PORT", "29500"),
                ("NNODES", "3"),
                ("NODE_RANK", "2"),
                ("NPROC_PER_NODE", "4"),
                ("WORLD_SIZE", "12"),
            ]),
            JobKind::Pretrain,
        )
        .unwrap();
        let args = TrainArgs {
            config: PathBuf::from("/etc/dinoflow/config.yaml"),
            output_dir: Some("/ckpt".into()),
            resume: ResumeMode::Auto,
            force: false,
            max_iterations: Some(5),
        };
        let cmds = worker_commands(
            JobKind::Pretrain,
            Path::new("/bin/dinoflow-trainer"),
            &args,
            &env,
        );
        assert_eq!(cmds.len(), 4);
        let e = envs(&cmds[3]);
        assert_eq!(e["RANK"], "11");
        assert_eq!(e["LOCAL_RANK"], "3");
        assert_eq!(e["LOCAL_WORLD_SIZE"], "4");
        assert_eq!(e["WORLD_SIZE"], "12");
        assert_eq!(e["MASTER_ADDR"], "job-a0-0.job.ns.svc");
        assert_eq!(envs(&cmds[0])["RANK"], "8");
        let argv: Vec<_> = cmds[0]
            .get_args()
            .map(|a| a.to_str().unwrap().to_string())
            .collect();
        assert_eq!(
            argv,
            [
                "train",
                "--config",
                "/etc/dinoflow/config.yaml",
                "--output-dir",
                "/ckpt",
                "--resume",
                "auto",
                "--max-iterations",
                "5"
            ]
        );
    }

    #[test]
    fn distill_workers_run_the_distill_subcommand_with_the_same_arguments() {
        let args = TrainArgs {
            config: PathBuf::from("/etc/dinoflow/config.yaml"),
            output_dir: None,
            resume: ResumeMode::Never,
            force: true,
            max_iterations: None,
        };
        assert_eq!(
            worker_argv(JobKind::Distill, &args),
            [
                "distill",
                "--config",
                "/etc/dinoflow/config.yaml",
                "--resume",
                "never",
                "--force"
            ]
        );
        assert_eq!(worker_argv(JobKind::Pretrain, &args)[0], "train");
    }
}
