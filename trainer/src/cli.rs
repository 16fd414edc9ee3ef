//! Command line of the `dinoflow-trainer` binary.
use std::path::PathBuf;

use clap::{Parser, Subcommand};

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

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train (or resume training) from a config: a bare `training:` block or a whole
    /// PretrainJob manifest.
    Train(TrainArgs),
    /// Load and check a config, then print it resolved (preset and defaults applied).
    Validate {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
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
    fn validate_requires_a_config() {
        assert!(Cli::try_parse_from(["dinoflow-trainer", "validate"]).is_err());
    }
}
