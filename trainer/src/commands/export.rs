//! `dinoflow-trainer export`: the final backbone as safetensors (see [`crate::export`]).
use super::CommandError;
use crate::cli::ExportArgs;

pub(super) fn run(args: &ExportArgs) -> Result<i32, CommandError> {
    crate::export::export(&args.source, &args.out)?;
    Ok(0)
}
