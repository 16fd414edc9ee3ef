//! Evaluation hooks on the final backbone: k-NN (official protocol) and a linear probe.
//! An [`Evaluator`] runs a frozen backbone over the labelled splits of [`EvalInputs`]; the
//! hooks themselves see features only.
pub mod baseline;
pub mod data;
pub mod knn;
pub mod linear;

use serde::Serialize;
use tch::{Kind, Tensor};

use crate::model::DinoVisionTransformer;

pub use baseline::raw_pixel_knn;
pub use data::{EvalTransform, LabelledSplit};
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
    #[error("evaluation forward: {0}")]
    Model(String),
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
    F: FnMut(&Tensor) -> Result<BatchFeatures, EvalError>,
{
    let _guard = tch::no_grad_guard();
    let (mut cls, mut lin, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    for batch in batches {
        let (images, y) = batch?;
        let f = extract(&images)?;
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

/// The labelled splits the hooks run on and how images reach the backbone.
#[derive(Debug, Clone)]
pub struct EvalInputs {
    /// k-NN reference set and linear-probe training set (official: the training split).
    pub train: LabelledSplit,
    /// Reported accuracy is on this split (official: the validation split).
    pub test: LabelledSplit,
    pub transform: EvalTransform,
    pub batch_size: usize,
    /// Decode threads.
    pub threads: usize,
    /// CLS tokens of this many last blocks form the linear-probe input (official
    /// `n_last_blocks`, 4 for the linear evaluation), with the average-pooled patch tokens
    /// of the last block appended (official `avgpool=True`).
    pub n_last_blocks: usize,
}

/// Features of a frozen backbone in eval mode: the final-norm CLS token (k-NN) and the
/// linear-probe input, computed in one forward through `get_intermediate_layers` (its last
/// normed CLS token is the final CLS token).
pub fn backbone_features(
    backbone: &DinoVisionTransformer,
    images: &Tensor,
    kind: Kind,
    n_last_blocks: usize,
) -> Result<BatchFeatures, EvalError> {
    let device = backbone.cls_token.device();
    let n = n_last_blocks.clamp(1, backbone.blocks.len());
    let layers = backbone
        .get_intermediate_layers(&images.to_device(device).to_kind(kind), n, true)
        .map_err(|e| EvalError::Model(e.to_string()))?;
    let last = layers.last().expect("n >= 1 layers");
    let cls_blocks = Tensor::stack(
        &layers.iter().map(|l| &l.class_token).collect::<Vec<_>>(),
        1,
    );
    Ok(BatchFeatures {
        cls: last.class_token.to_kind(Kind::Float),
        linear: linear_input(&cls_blocks, Some(&last.patch_tokens)).to_kind(Kind::Float),
    })
}

/// The evaluation hooks over labelled splits, given the backbone to evaluate (the final
/// backbone of a training run, or one loaded from a checkpoint).
#[derive(Debug, Clone, Copy)]
pub struct Evaluator<'a> {
    pub inputs: &'a EvalInputs,
    pub config: &'a EvalConfig,
    /// Compute dtype of the forwards.
    pub kind: Kind,
}

impl Evaluator<'_> {
    /// Runs the hooks on `backbone` (frozen, eval mode) over both splits.
    pub fn evaluate(&self, backbone: &DinoVisionTransformer) -> Result<EvalReport, EvalError> {
        let inputs = self.inputs;
        let split = |s: &LabelledSplit| {
            let mut progress = Progress::new(s.name, s.len());
            extract_features(
                s.batches(&inputs.transform, inputs.batch_size, inputs.threads),
                |x| {
                    let features = backbone_features(backbone, x, self.kind, inputs.n_last_blocks);
                    progress.advance(x.size()[0] as usize);
                    features
                },
            )
        };
        let train = split(&inputs.train)?;
        let test = split(&inputs.test)?;
        evaluate(&train, &test, self.config)
    }
}

/// [`Evaluator::evaluate`] in one call (the `eval` command's form).
pub fn evaluate_backbone(
    backbone: &DinoVisionTransformer,
    kind: Kind,
    inputs: &EvalInputs,
    config: &EvalConfig,
) -> Result<EvalReport, EvalError> {
    Evaluator {
        inputs,
        config,
        kind,
    }
    .evaluate(backbone)
}

/// Feature extraction over a large split takes minutes (ImageNet's 1.28M reference images):
/// a log line every [`Progress::EVERY`] with the rate and the time left.
struct Progress {
    split: &'static str,
    total: usize,
    done: usize,
    started: std::time::Instant,
    logged: std::time::Instant,
}

impl Progress {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(10);

    fn new(split: &'static str, total: usize) -> Self {
        let now = std::time::Instant::now();
        Self {
            split,
            total,
            done: 0,
            started: now,
            logged: now,
        }
    }

    fn advance(&mut self, images: usize) {
        self.done += images;
        if self.logged.elapsed() < Self::EVERY || self.done >= self.total {
            return;
        }
        self.logged = std::time::Instant::now();
        let rate = self.done as f64 / self.started.elapsed().as_secs_f64();
        tracing::info!(
            split = self.split,
            images = self.done,
            total = self.total,
            images_per_s = format!("{rate:.0}"),
            eta_s = format!("{:.0}", (self.total - self.done) as f64 / rate),
            "evaluation: extracting features"
        );
    }
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
            Ok(BatchFeatures {
                cls: f.shallow_clone(),
                linear: f,
            })
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

    /// 16×16 images whose pattern encodes the class (4 classes): horizontal stripes,
    /// vertical stripes, bright left half, bright top half.
    struct Levels(usize);

    impl crate::data::Dataset for Levels {
        fn len(&self) -> usize {
            self.0
        }
        fn get(&self, index: usize) -> Result<crate::data::Sample, crate::data::DataError> {
            let class = (index % 4) as u32;
            let image = image::RgbImage::from_fn(16, 16, |x, y| {
                let on = match class {
                    0 => y % 4 < 2,
                    1 => x % 4 < 2,
                    2 => x < 8,
                    _ => y < 8,
                };
                image::Rgb([if on { 230 } else { 20 }; 3])
            });
            Ok(crate::data::Sample {
                image,
                label: Some(class),
            })
        }
        fn num_classes(&self) -> Option<usize> {
            Some(4)
        }
        fn describe(&self) -> String {
            "levels".into()
        }
    }

    #[test]
    fn a_vit_backbone_is_evaluated_on_both_splits_with_every_hook() {
        use crate::model::VitConfig;
        tch::manual_seed(0);
        let cfg = VitConfig {
            img_size: 16,
            embed_dim: 32,
            depth: 3,
            num_heads: 2,
            // LayerScale off: with the official 1e-5 init the CLS token barely depends on
            // the image at initialisation, and this test wants informative features.
            layerscale: None,
            ..VitConfig::vit_small(8)
        };
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let vit = DinoVisionTransformer::new(&vs.root(), &cfg).unwrap();
        let split =
            |name, n| LabelledSplit::new(name, std::sync::Arc::new(Levels(n)) as _).unwrap();
        let inputs = EvalInputs {
            train: split("train", 40).subsample(25),
            test: split("validation", 12),
            transform: EvalTransform::official(16, [0.5; 3], [0.25; 3]),
            batch_size: 7,
            threads: 2,
            n_last_blocks: 4,
        };
        let config = EvalConfig {
            num_classes: 4,
            knn: KnnConfig {
                ks: vec![1, 5],
                ..KnnConfig::default()
            },
            linear: Some(LinearConfig {
                epochs: 5,
                ..LinearConfig::default()
            }),
        };
        let report = evaluate_backbone(&vit, Kind::Float, &inputs, &config).unwrap();
        // Each test image has exact copies among the training images: its nearest neighbour
        // is of its class.
        assert_eq!(report.knn.iter().map(|a| a.k).collect::<Vec<_>>(), [1, 5]);
        assert_eq!(report.knn[0].top1, 100.0, "{report:?}");
        let linear = report.linear.as_ref().expect("the linear probe ran");
        assert!((0.0..=100.0).contains(&linear.test_top1));
        // The linear input is 3 CLS tokens (n_last_blocks clamped to the depth) + pooled
        // patches.
        let x = Tensor::zeros([2, 3, 16, 16], (Kind::Float, Device::Cpu));
        let f = backbone_features(&vit, &x, Kind::Float, 4).unwrap();
        assert_eq!(f.linear.size(), [2, 4 * 32]);
        assert_eq!(f.cls.size(), [2, 32]);
        let again = evaluate_backbone(&vit, Kind::Float, &inputs, &config).unwrap();
        assert_eq!(report.flat(), again.flat(), "evaluation is deterministic");
    }

    #[test]
    fn no_batches_is_a_clear_error() {
        let none: Vec<Result<(Tensor, Tensor), EvalError>> = Vec::new();
        let err = extract_features(none, |x| {
            Ok(BatchFeatures {
                cls: x.shallow_clone(),
                linear: x.shallow_clone(),
            })
        })
        .unwrap_err();
        assert!(err.to_string().contains("empty"));
    }
}
