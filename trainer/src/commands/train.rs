//! `dinoflow-trainer train`: a pretraining job (a bare `training:` block or a PretrainJob).
use dinoflow_api::contract::JobKind;

use super::CommandError;
use super::error::outcome_code;
use crate::cli::TrainArgs;

pub(super) fn run(args: &TrainArgs) -> Result<i32, CommandError> {
    let outcome = crate::job::run(args, JobKind::Pretrain, crate::pretrain::build_components)?;
    Ok(outcome_code(&outcome))
}
