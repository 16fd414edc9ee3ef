//! `dinoflow-trainer`: `validate` prints a config resolved, `train` runs (or resumes) it.
//! Exit codes follow `dinoflow_api::exit_codes`: 78 bad input, 79 non-finite loss, anything
//! else retryable.
use clap::Parser;
use dinoflow_trainer::cli::Cli;

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    std::process::exit(dinoflow_trainer::train_loop::run::main_entry(cli));
}
