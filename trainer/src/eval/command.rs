//! `dinoflow-trainer eval`: the evaluation hooks on a checkpoint or a weights file, outside
//! training (the same protocol, splits and settings as the hooks inside the loop).

use std::path::Path;

use serde_json::json;

use super::evaluate_backbone;
use crate::cli::EvalArgs;
use crate::config;
use crate::data::open_dataset;
use crate::export::{BackboneSource, compute_kind, load_backbone};
use crate::train_loop::run::{TrainError, data_error, eval_inputs, local_device};

/// Runs k-NN and (if enabled) the linear probe from `training.evaluation` on the backbone of
/// `args`; returns the report (`source`, `iteration`, `metrics`) that `eval` prints.
pub fn run(args: &EvalArgs) -> Result<serde_json::Value, TrainError> {
    let training = dinoflow_api::load_training_config(&args.source.config)?.training;
    if config::eval_config(&training, 0).is_none() {
        return Err(TrainError::Permanent(
            "training.evaluation: k-NN and the linear probe are both disabled; set \
             training.evaluation.knn.enabled or linearProbe.enabled to true"
                .into(),
        ));
    }
    let source = BackboneSource::resolve(&args.source, &training)?;
    let dataset = open_dataset(
        &config::dataset_kind(&training),
        Path::new(&training.data.path),
    )
    .map_err(data_error)?;
    let Some(inputs) = eval_inputs(&training, &dataset)? else {
        return Err(TrainError::Permanent(
            "training.data.valPath: not set; point it at the labelled split to report on".into(),
        ));
    };
    let eval = config::eval_config(&training, dataset.num_classes().unwrap_or(0) as i64)
        .expect("checked above");
    let sd = source.state_dict()?;
    let (_vs, backbone) = load_backbone(&training, &sd, local_device())?;
    tracing::info!(
        source = %source.describe(),
        reference_images = inputs.train.len(),
        reported_images = inputs.test.len(),
        "evaluating"
    );
    let report = evaluate_backbone(&backbone, compute_kind(&training)?, &inputs, &eval)
        .map_err(|e| TrainError::Permanent(format!("evaluation: {e}")))?;
    let metrics: serde_json::Map<String, serde_json::Value> = report
        .flat()
        .into_iter()
        .map(|(k, v)| (k, json!(v)))
        .collect();
    Ok(json!({
        "source": source.describe(),
        "iteration": source.iteration(),
        "metrics": metrics,
    }))
}
