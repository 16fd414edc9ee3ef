//! `dinoflow-trainer`: parses the command line and runs it (`commands`), exiting with the
//! code of the contract in `dinoflow_api::exit_codes`.
use clap::Parser;
use dinoflow_trainer::cli::Cli;

fn main() {
    // Before anything asks libtorch about CUDA (it caches the answer).
    dinoflow_trainer::cuda_backend::load();
    let cli = Cli::parse();
    // `training.logging.format` decides the log format before the first line is written.
    dinoflow_trainer::logging::init(dinoflow_trainer::logging::format_of(cli.config_path()));
    std::process::exit(dinoflow_trainer::commands::run(cli));
}
