//! `dinoflow-trainer distill`: a DistillJob manifest -> frozen teacher + student components
//! ([`crate::distill::run::build`]) -> the job every kind runs, with the same output
//! directory, checkpoints, resume, evaluation and exit codes as `train`.
use dinoflow_api::contract::{self as c, JobKind};
use dinoflow_api::distill::{CheckpointFormat, TeacherCheckpoint};

use super::CommandError;
use super::error::outcome_code;
use crate::cli::TrainArgs;
use crate::distill::DistillSettings;

pub(super) fn run(args: &TrainArgs) -> Result<i32, CommandError> {
    let resolved = dinoflow_api::load_training_config(&args.config)?;
    let (Some(mut teacher), Some(recipe)) = (resolved.teacher, resolved.distillation) else {
        return Err(CommandError::NotADistillJob {
            config: args.config.clone(),
        });
    };
    // Where the operator passes the resolved checkpoint of `teacher.pretrainJob`.
    if teacher.checkpoint.is_none()
        && let Some(path) = crate::env::process_env().get(c::TEACHER_CHECKPOINT)
    {
        teacher.checkpoint = Some(TeacherCheckpoint {
            path,
            format: CheckpointFormat::Dinoflow,
        });
    }
    let settings = DistillSettings::from(&recipe);
    // Bad flags are refused before any output is written.
    settings.check(resolved.training.ibot.loss_weight > 0.0)?;
    let outcome = crate::job::run(args, JobKind::Distill, |training, world| {
        crate::distill::run::build(training, world, &teacher, &settings)
    })?;
    Ok(outcome_code(&outcome))
}
