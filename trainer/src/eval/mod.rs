//! Evaluation hooks on the teacher backbone: k-NN (official protocol) and a linear probe.
//! The hooks see features only; the training loop supplies a closure that runs the frozen
//! backbone on a batch of images.
pub mod knn;
pub mod linear;

use serde::Serialize;
use tch::Tensor;

pub use knn::{KnnAccuracy, KnnConfig, knn_classify};
pub use linear::{LinearConfig, LinearResult, linear_input, linear_probe};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("evaluation needs data, but the {what} is empty")]
    Empty { what: &'static str },
    #[error("{0}")]
    Config(String),
    #[error("evaluation data: {0}")]
    Data(String),
}

/// Features of one batch: the final normalised CLS token (k-NN input) and the linear-probe
/// input (see [`linear_input`]).
#[derive(Debug)]
pub struct BatchFeatures {
    pub cls: Tensor,
    pub linear: Tensor,
}

/// Features of a whole labelled split, on the CPU.
#[derive(Debug)]
pub struct SplitFeatures {
    pub cls: Tensor,
    pub linear: Tensor,
    pub labels: Tensor,
}

/// Runs `extract` over labelled batches (images, labels) without gradients and stacks the
/// results.
pub fn extract_features<I, F>(batches: I, mut extract: F) -> Result<SplitFeatures, EvalError>
where
    I: IntoIterator<Item = Result<(Tensor, Tensor), EvalError>>,
    F: FnMut(&Tensor) -> BatchFeatures,
{
    let _guard = tch::no_grad_guard();
    let (mut cls, mut lin, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    for batch in batches {
        let (images, y) = batch?;
        let f = extract(&images);
        cls.push(f.cls.to_device(tch::Device::Cpu));
        lin.push(f.linear.to_device(tch::Device::Cpu));
        labels.push(y.to_device(tch::Device::Cpu));
    }
    if cls.is_empty() {
        return Err(EvalError::Empty {
            what: "evaluation split",
        });
    }
    Ok(SplitFeatures {
        cls: Tensor::cat(&cls, 0),
        linear: Tensor::cat(&lin, 0),
        labels: Tensor::cat(&labels, 0),
    })
}

#[derive(Debug, Clone)]
pub struct EvalConfig {
    pub num_classes: i64,
    pub knn: KnnConfig,
    /// None skips the linear probe.
    pub linear: Option<LinearConfig>,
}

/// What one evaluation produced.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub knn: Vec<KnnAccuracy>,
    pub linear: Option<LinearResult>,
}

impl EvalReport {
    /// Flat (name, value) pairs for Prometheus labels and the JSONL file.
    pub fn flat(&self) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        for a in &self.knn {
            out.push((format!("knn_top1_k{}", a.k), a.top1));
            out.push((format!("knn_top5_k{}", a.k), a.top5));
        }
        if let Some(l) = &self.linear {
            out.push(("linear_top1".into(), l.test_top1));
            out.push(("linear_val_top1".into(), l.val_top1));
            out.push(("linear_best_lr".into(), l.best_lr));
        }
        out
    }

    /// The headline number: k-NN top-1 at k=20 (the official summary), else the first k.
    pub fn knn_top1(&self) -> Option<f64> {
        self.knn
            .iter()
            .find(|a| a.k == 20)
            .or(self.knn.first())
            .map(|a| a.top1)
    }
}

/// Runs k-NN and (if configured) the linear probe on extracted features.
pub fn evaluate(
    train: &SplitFeatures,
    test: &SplitFeatures,
    config: &EvalConfig,
) -> Result<EvalReport, EvalError> {
    let knn = knn_classify(
        &train.cls,
        &train.labels,
        &test.cls,
        &test.labels,
        config.num_classes,
        &config.knn,
    )?;
    let linear = match &config.linear {
        Some(cfg) => Some(linear_probe(
            &train.linear,
            &train.labels,
            &test.linear,
            &test.labels,
            config.num_classes,
            cfg,
        )?),
        None => None,
    };
    Ok(EvalReport { knn, linear })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn features_are_extracted_batch_by_batch_and_evaluated() {
        // "Images" whose first pixel is the class: the extractor maps them to one-hot-ish
        // features, so k-NN must be perfect.
        let batches = |n: i64| {
            (0..n).map(move |i| {
                let labels = Tensor::from_slice(&[i % 3, (i + 1) % 3]);
                Ok((labels.to_kind(Kind::Float).view([2, 1]), labels))
            })
        };
        let extract = |x: &Tensor| {
            let f = x
                .to_kind(Kind::Int64)
                .view(-1)
                .one_hot(3)
                .to_kind(Kind::Float)
                + 0.01;
            BatchFeatures {
                cls: f.shallow_clone(),
                linear: f,
            }
        };
        let train = extract_features(batches(30), extract).unwrap();
        let test = extract_features(batches(6), extract).unwrap();
        assert_eq!(train.cls.size(), [60, 3]);
        let config = EvalConfig {
            num_classes: 3,
            knn: KnnConfig {
                ks: vec![10, 20],
                ..KnnConfig::default()
            },
            linear: Some(LinearConfig {
                epochs: 30,
                ..LinearConfig::default()
            }),
        };
        let report = evaluate(&train, &test, &config).unwrap();
        assert_eq!(report.knn_top1(), Some(100.0));
        let flat = report.flat();
        assert!(flat.contains(&("knn_top1_k10".to_string(), 100.0)));
        assert!(
            flat.iter().any(|(k, v)| k == "linear_top1" && *v > 90.0),
            "{flat:?}"
        );
        let _ = Device::Cpu;
    }

    #[test]
    fn no_batches_is_a_clear_error() {
        let none: Vec<Result<(Tensor, Tensor), EvalError>> = Vec::new();
        let err = extract_features(none, |x| BatchFeatures {
            cls: x.shallow_clone(),
            linear: x.shallow_clone(),
        })
        .unwrap_err();
        assert!(err.to_string().contains("empty"));
    }
}
