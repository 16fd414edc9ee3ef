//! k-NN classification with the official DINOv2 protocol (`dinov2/eval/knn.py`):
//! L2-normalised features, cosine similarity to every training feature, the top-k
//! neighbours vote for their class with weight exp(sim / T), T = 0.07.
use serde::Serialize;
use tch::{Kind, Tensor};

use super::EvalError;

/// The official k values and temperature.
pub const OFFICIAL_KS: [usize; 4] = [10, 20, 100, 200];
pub const OFFICIAL_TEMPERATURE: f64 = 0.07;

#[derive(Debug, Clone)]
pub struct KnnConfig {
    pub ks: Vec<usize>,
    pub temperature: f64,
    /// Test features processed per similarity matrix, to bound memory.
    pub chunk: i64,
}

impl Default for KnnConfig {
    fn default() -> Self {
        Self {
            ks: OFFICIAL_KS.to_vec(),
            temperature: OFFICIAL_TEMPERATURE,
            chunk: 1024,
        }
    }
}

/// Accuracy for one k, in percent like the official logs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KnnAccuracy {
    pub k: usize,
    pub top1: f64,
    pub top5: f64,
}

/// Classifies `test` by its neighbours in `train`. Features are [N, D] (normalised here),
/// labels [N] int64 in 0..num_classes.
pub fn knn_classify(
    train: &Tensor,
    train_labels: &Tensor,
    test: &Tensor,
    test_labels: &Tensor,
    num_classes: i64,
    config: &KnnConfig,
) -> Result<Vec<KnnAccuracy>, EvalError> {
    let n_train = train.size()[0];
    let n_test = test.size()[0];
    if n_train == 0 || n_test == 0 {
        return Err(EvalError::Empty {
            what: if n_train == 0 {
                "k-NN train set"
            } else {
                "k-NN test set"
            },
        });
    }
    let _guard = tch::no_grad_guard();
    let train = normalize(train);
    let test = normalize(test);
    let train_t = train.tr();
    let train_labels = train_labels.to_kind(Kind::Int64);
    let test_labels = test_labels.to_kind(Kind::Int64);
    // With fewer training points than k, every point votes (as topk cannot exceed N).
    let max_k = (*config.ks.iter().max().unwrap_or(&1) as i64).min(n_train);
    let top5 = 5.min(num_classes);
    let mut correct1 = vec![0i64; config.ks.len()];
    let mut correct5 = vec![0i64; config.ks.len()];
    let mut start = 0;
    while start < n_test {
        let len = config.chunk.min(n_test - start);
        let feats = test.narrow(0, start, len);
        let targets = test_labels.narrow(0, start, len);
        let sims = feats.mm(&train_t);
        let (top_sims, top_idx) = sims.topk(max_k, 1, true, true);
        let neighbour_labels = train_labels
            .index_select(0, &top_idx.view(-1))
            .view([len, max_k]);
        // Softmax over the max_k neighbours, as the official code does; for each sample this
        // is exp(sim/T) times one positive constant, so votes rank the same.
        let weights = (top_sims / config.temperature).softmax(1, Kind::Float);
        let one_hot = neighbour_labels.one_hot(num_classes).to_kind(Kind::Float);
        let votes = one_hot * weights.unsqueeze(-1);
        for (i, &k) in config.ks.iter().enumerate() {
            let k = (k as i64).min(max_k);
            let probs = votes.narrow(1, 0, k).sum_dim_intlist(1, false, Kind::Float);
            let (_, pred) = probs.topk(top5, 1, true, true);
            let hits = pred.eq_tensor(&targets.unsqueeze(1));
            correct1[i] += hits.narrow(1, 0, 1).sum(Kind::Int64).int64_value(&[]);
            correct5[i] += hits.sum(Kind::Int64).int64_value(&[]);
        }
        start += len;
    }
    Ok(config
        .ks
        .iter()
        .enumerate()
        .map(|(i, &k)| KnnAccuracy {
            k,
            top1: 100.0 * correct1[i] as f64 / n_test as f64,
            top5: 100.0 * correct5[i] as f64 / n_test as f64,
        })
        .collect())
}

fn normalize(x: &Tensor) -> Tensor {
    let x = x.to_kind(Kind::Float);
    let norm = x.norm_scalaropt_dim(2.0, [1], true).clamp_min(1e-12);
    x / norm
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(rows: &[[f32; 2]]) -> Tensor {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::from_slice(&flat).view([rows.len() as i64, 2])
    }

    #[test]
    fn separable_clusters_are_classified_perfectly() {
        let train = t(&[
            [1.0, 0.1],
            [1.0, -0.1],
            [0.9, 0.0],
            [-0.1, 1.0],
            [0.1, 1.0],
            [0.0, 0.8],
        ]);
        let labels = Tensor::from_slice(&[0i64, 0, 0, 1, 1, 1]);
        let test = t(&[[2.0, 0.05], [0.05, 3.0]]);
        let test_labels = Tensor::from_slice(&[0i64, 1]);
        let cfg = KnnConfig {
            ks: vec![1, 3],
            ..KnnConfig::default()
        };
        let acc = knn_classify(&train, &labels, &test, &test_labels, 2, &cfg).unwrap();
        assert_eq!(
            acc,
            [
                KnnAccuracy {
                    k: 1,
                    top1: 100.0,
                    top5: 100.0
                },
                KnnAccuracy {
                    k: 3,
                    top1: 100.0,
                    top5: 100.0
                }
            ]
        );
    }

    #[test]
    fn one_very_close_neighbour_outvotes_two_far_ones() {
        // exp(sim/0.07) makes the near neighbour (sim ~1) dominate two at sim 0.6 of the
        // other class: an unweighted majority vote would say class 1.
        let train = t(&[[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]]);
        let labels = Tensor::from_slice(&[0i64, 1, 1]);
        let test = t(&[[1.0, 0.0]]);
        let cfg = KnnConfig {
            ks: vec![3],
            ..KnnConfig::default()
        };
        let acc = knn_classify(
            &train,
            &labels,
            &test,
            &Tensor::from_slice(&[0i64]),
            2,
            &cfg,
        )
        .unwrap();
        assert_eq!(acc[0].top1, 100.0);
        let flat = KnnConfig {
            ks: vec![3],
            temperature: 100.0,
            ..KnnConfig::default()
        };
        let acc = knn_classify(
            &train,
            &labels,
            &test,
            &Tensor::from_slice(&[0i64]),
            2,
            &flat,
        )
        .unwrap();
        assert_eq!(acc[0].top1, 0.0, "a near-uniform vote is a majority vote");
    }

    #[test]
    fn feature_scale_does_not_matter_because_features_are_normalised() {
        let train = t(&[[1.0, 0.0], [0.0, 1.0]]);
        let labels = Tensor::from_slice(&[0i64, 1]);
        let test = t(&[[100.0, 1.0], [0.001, 0.01]]);
        let cfg = KnnConfig {
            ks: vec![1],
            ..KnnConfig::default()
        };
        let acc = knn_classify(
            &train,
            &labels,
            &test,
            &Tensor::from_slice(&[0i64, 1]),
            2,
            &cfg,
        )
        .unwrap();
        assert_eq!(acc[0].top1, 100.0);
    }

    #[test]
    fn random_features_give_chance_accuracy_and_top5_counts_five_classes() {
        tch::manual_seed(0);
        let train = Tensor::randn([2000, 16], (Kind::Float, tch::Device::Cpu));
        let labels = Tensor::randint(10, [2000], (Kind::Int64, tch::Device::Cpu));
        let test = Tensor::randn([1000, 16], (Kind::Float, tch::Device::Cpu));
        let test_labels = Tensor::randint(10, [1000], (Kind::Int64, tch::Device::Cpu));
        let cfg = KnnConfig {
            chunk: 128,
            ..KnnConfig::default()
        };
        let acc = knn_classify(&train, &labels, &test, &test_labels, 10, &cfg).unwrap();
        assert_eq!(acc.iter().map(|a| a.k).collect::<Vec<_>>(), OFFICIAL_KS);
        for a in acc {
            assert!((5.0..16.0).contains(&a.top1), "{a:?}");
            assert!((42.0..58.0).contains(&a.top5), "{a:?}");
        }
    }

    #[test]
    fn an_empty_test_set_is_an_error() {
        let train = t(&[[1.0, 0.0]]);
        let empty = Tensor::zeros([0, 2], (Kind::Float, tch::Device::Cpu));
        let err = knn_classify(
            &train,
            &Tensor::from_slice(&[0i64]),
            &empty,
            &Tensor::from_slice::<i64>(&[]),
            2,
            &KnnConfig::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("test set"));
    }
}
