//! `dinoflow-trainer launch <train|distill>`: what the operator's pods run (see
//! [`crate::launch`]); exits with the gang's code.
use std::time::Duration;

use super::CommandError;
use crate::cli::LaunchArgs;

pub(super) fn run(args: &LaunchArgs) -> Result<i32, CommandError> {
    let grace = Duration::from_secs(args.grace_period_seconds);
    Ok(crate::launch::run(args.mode, &args.train, grace)?)
}
