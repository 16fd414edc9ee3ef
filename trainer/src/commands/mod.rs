//! The subcommands of `dinoflow-trainer`, one module each, and their error and exit codes.
//!
//! Layering (each layer uses only the ones below it; nothing below imports `commands`):
//!
//! ```text
//! main.rs -> commands/        CLI dispatch, CommandError, the one exit-code mapping
//!         -> job, launch      one training job (any kind); the torchrun-like launcher
//!         -> pretrain, distill, eval, export
//!                             components of each job kind; the backbone outside training
//!         -> train_loop       the generic loop and the real components behind its traits
//!         -> meta_arch, model, loss, optim, data, masking, checkpoint, metrics, ...
//!         -> dist (World, collectives) -> env (the pod's environment contract)
//! ```
// A command fails at most once per process: the size of its error costs nothing.
#![allow(clippy::result_large_err)]

use crate::cli::{Cli, Command};

mod distill;
pub mod error;
mod eval;
mod export;
mod launch;
mod train;
mod validate;

pub use error::CommandError;

/// Runs the command line; returns the process exit code (printing the error of a failure).
pub fn run(cli: Cli) -> i32 {
    let result = match cli.command {
        Command::Validate { config } => validate::run(&config),
        Command::Launch(args) => launch::run(&args),
        Command::Distill(args) => distill::run(&args),
        Command::Export(args) => export::run(&args),
        Command::Eval(args) => eval::run(&args),
        Command::Train(args) => train::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) if crate::logging::is_json() => {
            tracing::error!(exit_code = e.exit_code(), "{e}");
            e.exit_code()
        }
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// The commands are the top layer: a module below them that reached up would make a cycle.
    #[test]
    fn nothing_below_commands_imports_them() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        assert!(files.len() > 50, "found only {} files", files.len());
        let offenders: Vec<_> = files
            .iter()
            .filter(|p| !p.starts_with(src.join("commands")) && !p.ends_with("main.rs"))
            .filter(|p| {
                std::fs::read_to_string(p)
                    .unwrap()
                    .contains("crate::commands")
            })
            .collect();
        assert!(offenders.is_empty(), "{offenders:?}");
    }
}
