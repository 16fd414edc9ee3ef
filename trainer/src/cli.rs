//! Command line of the `dinoflow-trainer` binary.
use std::path::PathBuf;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Parser, Subcommand};
use dinoflow_api::contract::JobKind;

use crate::checkpoint::ResumeMode;

#[derive(Debug, Parser)]
#[command(
    name = "dinoflow-trainer",
    version,
    about = "DINOv2 self-supervised pretraining on libtorch"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The config file the command reads (its `training.logging` applies from the start).
    pub fn config_path(&self) -> &std::path::Path {
        match &self.command {
            Command::Train(a) | Command::Distill(a) => &a.config,
            Command::Validate { config } => config,
            Command::Launch(a) => &a.train.config,
            Command::Export(a) => &a.source.config,
            Command::Eval(a) => &a.source.config,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train (or resume training) from a config: a bare `training:` block or a whole
    /// PretrainJob manifest.
    Train(TrainArgs),
    /// Distil a student from a frozen teacher (or resume doing so): a DistillJob manifest.
    Distill(TrainArgs),
    /// Load and check a config, then print it resolved (preset and defaults applied).
    Validate {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// What the operator's pods run: read the pod's environment contract (MASTER_ADDR,
    /// NNODES, NODE_RANK, NPROC_PER_NODE, WORLD_SIZE, ...), fork one worker per local
    /// process like torchrun, forward SIGTERM to them and exit with the gang's code.
    Launch(LaunchArgs),
    /// Write the final backbone of a checkpoint (pretraining: the EMA teacher; distillation:
    /// the student EMA) or of a weights file as safetensors with the official DINOv2 key names.
    Export(ExportArgs),
    /// Run the evaluation hooks (k-NN, linear probe) of the config on a checkpoint or a
    /// weights file; prints the metrics as JSON.
    Eval(EvalArgs),
}

/// Which backbone `export` and `eval` work on.
#[derive(Debug, clap::Args)]
pub struct BackboneArgs {
    /// The job (or bare `training:` block) whose `training.model` describes the backbone.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Overrides `training.output.dir`, where checkpoints are looked for.
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// A checkpoint directory; default: the newest verified one in the output directory.
    #[arg(long, value_name = "DIR", conflicts_with = "weights")]
    pub checkpoint: Option<PathBuf>,
    /// A weights file instead of a checkpoint: an official `.pth` (hub backbone or
    /// `teacher_checkpoint.pth`) or an earlier export (`.safetensors`).
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub source: BackboneArgs,
    /// Destination `.safetensors` file (written atomically and verified by reading it back).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub source: BackboneArgs,
    /// Also write the JSON report to this file.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Also run the k-NN protocol on the evaluation transform's raw pixels (same splits,
    /// same k values and temperature): the baseline a learned feature has to beat. Its cost
    /// grows with `3 · crop²` per image, fine for small images, not for ImageNet at 224.
    #[arg(long)]
    pub raw_pixels: bool,
}

/// What `launch` runs in each worker: the job kind, named by its subcommand (`train`,
/// `distill`).
fn job_kind() -> impl TypedValueParser<Value = JobKind> {
    PossibleValuesParser::new([
        PossibleValue::new(JobKind::Pretrain.trainer_subcommand())
            .help("DINOv2 pretraining (`PretrainJob`)"),
        PossibleValue::new(JobKind::Distill.trainer_subcommand())
            .help("Distillation from a frozen teacher (`DistillJob`)"),
    ])
    .map(|name| {
        [JobKind::Pretrain, JobKind::Distill]
            .into_iter()
            .find(|k| k.trainer_subcommand() == name)
            .expect("the parser only accepts the subcommands of the kinds")
    })
}

#[derive(Debug, clap::Args)]
pub struct LaunchArgs {
    #[arg(value_name = "MODE", value_parser = job_kind())]
    pub mode: JobKind,
    #[command(flatten)]
    pub train: TrainArgs,
    /// After one worker fails, how long the others get to exit after SIGTERM before SIGKILL.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub grace_period_seconds: u64,
}

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Overrides `training.output.dir`: checkpoints, metrics.jsonl and logs go here.
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// `auto` resumes from the newest checkpoint that verifies, `never` starts fresh, a
    /// path resumes from exactly that checkpoint directory.
    #[arg(long, value_name = "auto|never|PATH", default_value = "auto")]
    pub resume: ResumeMode,
    /// Resume even when the architecture, batch size or dataset changed.
    #[arg(long)]
    pub force: bool,
    /// Stop after this many iterations of the run (tests and smoke runs); the schedules
    /// still span the configured length.
    #[arg(long, value_name = "N")]
    pub max_iterations: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn train_takes_config_output_dir_resume_and_force() {
        let cli = Cli::try_parse_from([
            "dinoflow-trainer",
            "train",
            "--config",
            "job.yaml",
            "--output-dir",
            "/out",
            "--resume",
            "never",
            "--force",
        ])
        .unwrap();
        let Command::Train(args) = cli.command else {
            panic!("expected train")
        };
        assert_eq!(args.config, PathBuf::from("job.yaml"));
        assert_eq!(args.output_dir, Some(PathBuf::from("/out")));
        assert_eq!(args.resume, ResumeMode::Never);
        assert!(args.force);
    }

    #[test]
    fn resume_defaults_to_auto() {
        let cli = Cli::try_parse_from(["dinoflow-trainer", "train", "--config", "c.yaml"]).unwrap();
        let Command::Train(args) = cli.command else {
            panic!("expected train")
        };
        assert_eq!(args.resume, ResumeMode::Auto);
    }

    #[test]
    fn launch_takes_the_mode_then_the_train_arguments() {
        let cli = Cli::try_parse_from([
            "dinoflow-trainer",
            "launch",
            "train",
            "--config",
            "/etc/dinoflow/config.yaml",
            "--resume",
            "never",
        ])
        .unwrap();
        let Command::Launch(args) = cli.command else {
            panic!("expected launch")
        };
        assert_eq!(args.mode, JobKind::Pretrain);
        assert_eq!(
            args.train.config,
            PathBuf::from("/etc/dinoflow/config.yaml")
        );
        assert_eq!(args.train.resume, ResumeMode::Never);
        assert_eq!(args.grace_period_seconds, 30);
        let cli = Cli::try_parse_from(["dinoflow-trainer", "launch", "distill", "--config", "c"])
            .unwrap();
        assert!(matches!(cli.command, Command::Launch(a) if a.mode == JobKind::Distill));
        assert!(
            Cli::try_parse_from(["dinoflow-trainer", "launch", "eval", "--config", "c"]).is_err()
        );
    }

    #[test]
    fn validate_requires_a_config() {
        assert!(Cli::try_parse_from(["dinoflow-trainer", "validate"]).is_err());
    }
}
