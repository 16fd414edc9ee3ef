//! `dinoflow-trainer eval`: the evaluation hooks on a checkpoint or a weights file, outside
//! training (the same protocol, splits and settings as the hooks inside the loop); prints the
//! report as JSON and, with `--out`, writes it there.
use std::path::Path;

use serde_json::json;

use super::CommandError;
use crate::cli::EvalArgs;
use crate::config;
use crate::data::open_dataset;
use crate::dist::World;
use crate::eval::{evaluate_backbone, raw_pixel_knn};
use crate::export::{BackboneSource, compute_kind, load_backbone};
use crate::pretrain::eval_inputs;

pub(super) fn run(args: &EvalArgs) -> Result<i32, CommandError> {
    let report = evaluate(args)?;
    println!("{report}");
    if let Some(out) = &args.out {
        std::fs::write(out, format!("{report:#}\n")).map_err(|source| CommandError::Report {
            path: out.clone(),
            source,
        })?;
    }
    Ok(0)
}

/// Runs k-NN and (if enabled) the linear probe from `training.evaluation` on the backbone of
/// `args`; returns the report (`source`, `iteration`, `metrics`).
fn evaluate(args: &EvalArgs) -> Result<serde_json::Value, CommandError> {
    let training = dinoflow_api::load_training_config(&args.source.config)?.training;
    if config::eval_config(&training, 0).is_none() {
        return Err(CommandError::EvalDisabled);
    }
    let source = BackboneSource::resolve(&args.source, &training)?;
    let dataset = open_dataset(
        &config::dataset_kind(&training),
        Path::new(&training.data.path),
    )
    .map_err(CommandError::Dataset)?;
    let Some(inputs) = eval_inputs(&training, &dataset)? else {
        return Err(CommandError::NoValPath);
    };
    let eval = config::eval_config(&training, dataset.num_classes().unwrap_or(0) as i64)
        .expect("checked above");
    let sd = source.state_dict()?;
    // One process: rank 0 of a world of one, on the first GPU when there is one.
    let world = World::single();
    let (_vs, backbone) = load_backbone(&training, &sd, world.device())?;
    tracing::info!(
        source = %source.describe(),
        reference_images = inputs.train.len(),
        reported_images = inputs.test.len(),
        "evaluating"
    );
    let report = evaluate_backbone(&backbone, compute_kind(&training)?, &inputs, &eval)
        .map_err(CommandError::Evaluation)?;
    let metrics: serde_json::Map<String, serde_json::Value> = report
        .flat()
        .into_iter()
        .map(|(k, v)| (k, json!(v)))
        .collect();
    let mut out = json!({
        "source": source.describe(),
        "iteration": source.iteration(),
        "metrics": metrics,
    });
    if args.raw_pixels {
        let knn = raw_pixel_knn(&inputs, eval.num_classes, &eval.knn)
            .map_err(CommandError::Evaluation)?;
        let raw: serde_json::Map<String, serde_json::Value> = knn
            .iter()
            .flat_map(|a| {
                [
                    (format!("knn_top1_k{}", a.k), json!(a.top1)),
                    (format!("knn_top5_k{}", a.k), json!(a.top5)),
                ]
            })
            .collect();
        out["raw_pixels"] = serde_json::Value::Object(raw);
    }
    Ok(out)
}
