//! `dinoflow-trainer`: parses the command line and runs it (`commands`), exiting with the
//! code of the contract in `dinoflow_api::exit_codes`.
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
    std::process::exit(dinoflow_trainer::commands::run(Cli::parse()));
}
