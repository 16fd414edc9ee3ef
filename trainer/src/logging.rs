//! The trainer's log output on stderr, in the format of `training.logging.format`: `text`
//! (human-readable lines) or `json` (one JSON object per line, for log collectors). The format
//! is read from the command's config before anything else is logged; a config that cannot be
//! read logs as text (the command then reports why it cannot be read).
use std::path::Path;
use std::sync::OnceLock;

use dinoflow_api::training::LogFormat;

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// `training.logging.format` of the config at `path`; `text` when it cannot be read.
pub fn format_of(path: &Path) -> LogFormat {
    dinoflow_api::load_training_config(path)
        .map(|r| r.training.logging.format)
        .unwrap_or(LogFormat::Text)
}

/// Installs the global subscriber (level from `RUST_LOG`, default `info`) in `format`.
pub fn init(format: LogFormat) {
    let _ = FORMAT.set(format);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Whether [`init`] chose JSON lines (the final error of a command is then logged as one too).
pub fn is_json() -> bool {
    FORMAT.get() == Some(&LogFormat::Json)
}
