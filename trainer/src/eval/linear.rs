//! Linear probe in the spirit of `dinov2/eval/linear.py`: linear classifiers on frozen
//! features (concatenated CLS tokens of the last n blocks, optionally the average-pooled
//! patch tokens), one per learning rate of a small grid, trained together with SGD
//! (momentum 0.9, cosine decay to 0); the one best on a held-out validation split is reported
//! with its test accuracy. Unlike the official code the features are computed once, without
//! training-time augmentation, so the probe costs seconds rather than an epoch of forwards.
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::EvalError;

#[derive(Debug, Clone)]
pub struct LinearConfig {
    /// Base learning rates; each is scaled by batch_size / 256 as in the official code.
    pub learning_rates: Vec<f64>,
    pub epochs: usize,
    pub batch_size: i64,
    /// Fraction of the training features held out to choose the learning rate.
    pub val_fraction: f64,
    pub seed: i64,
}

impl Default for LinearConfig {
    fn default() -> Self {
        Self {
            // A subset of the official grid (1e-5 .. 0.1) spanning the useful range.
            learning_rates: vec![1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1],
            epochs: 10,
            batch_size: 256,
            val_fraction: 0.1,
            seed: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LinearResult {
    pub best_lr: f64,
    pub val_top1: f64,
    pub test_top1: f64,
    /// Validation top-1 of every learning rate in the grid, in grid order.
    pub val_top1_per_lr: Vec<f64>,
}

/// Trains the grid of classifiers on `train` ([N, D] features, [N] labels) and evaluates on
/// `test`.
pub fn linear_probe(
    train: &Tensor,
    train_labels: &Tensor,
    test: &Tensor,
    test_labels: &Tensor,
    num_classes: i64,
    config: &LinearConfig,
) -> Result<LinearResult, EvalError> {
    let n = train.size()[0];
    if n < 2 || test.size()[0] == 0 {
        return Err(EvalError::Empty {
            what: "linear probe features",
        });
    }
    if config.learning_rates.is_empty() {
        return Err(EvalError::Config(
            "training.evaluation: the linear probe needs at least one learning rate".into(),
        ));
    }
    let device = train.device();
    let train = train.to_kind(Kind::Float);
    let train_labels = train_labels.to_kind(Kind::Int64);
    // Deterministic split independent of the global torch RNG.
    let perm = seeded_permutation(n, config.seed, device);
    let n_val = ((n as f64 * config.val_fraction).round() as i64).clamp(1, n - 1);
    let val_idx = perm.narrow(0, 0, n_val);
    let fit_idx = perm.narrow(0, n_val, n - n_val);
    let (x_fit, y_fit) = (
        train.index_select(0, &fit_idx),
        train_labels.index_select(0, &fit_idx),
    );
    let (x_val, y_val) = (
        train.index_select(0, &val_idx),
        train_labels.index_select(0, &val_idx),
    );

    let dim = train.size()[1];
    let grid = config.learning_rates.len() as i64;
    let batch = config.batch_size.min(x_fit.size()[0]).max(1);
    let lrs: Vec<f64> = config
        .learning_rates
        .iter()
        .map(|lr| lr * batch as f64 / 256.0)
        .collect();
    let lr_t = Tensor::from_slice(&lrs)
        .to_kind(Kind::Float)
        .to_device(device)
        .view([grid, 1, 1]);
    // Official init: weight ~ N(0, 0.01), bias 0.
    let mut w = generator_normal(&[grid, dim, num_classes], 0.01, config.seed + 1, device);
    let mut b = Tensor::zeros([grid, 1, num_classes], (Kind::Float, device));
    let mut vw = Tensor::zeros_like(&w);
    let mut vb = Tensor::zeros_like(&b);
    let steps_per_epoch = (x_fit.size()[0] + batch - 1) / batch;
    let total_steps = (steps_per_epoch * config.epochs as i64).max(1);
    let mut step = 0;
    for epoch in 0..config.epochs {
        let order = seeded_permutation(x_fit.size()[0], config.seed + 100 + epoch as i64, device);
        for s in 0..steps_per_epoch {
            let idx = order.narrow(0, s * batch, batch.min(x_fit.size()[0] - s * batch));
            let x = x_fit.index_select(0, &idx);
            let y = y_fit.index_select(0, &idx);
            let wg = w.detach().set_requires_grad(true);
            let bg = b.detach().set_requires_grad(true);
            let logits = x.unsqueeze(0).matmul(&wg) + &bg; // [grid, B, C]
            let rows = logits.size()[1];
            // Sum over classifiers: their gradients are independent.
            let loss = logits
                .view([grid * rows, num_classes])
                .cross_entropy_for_logits(&y.repeat([grid]))
                * grid as f64;
            loss.backward();
            let cosine =
                0.5 * (1.0 + (std::f64::consts::PI * step as f64 / total_steps as f64).cos());
            tch::no_grad(|| {
                vw = &vw * 0.9 + wg.grad();
                vb = &vb * 0.9 + bg.grad();
                w = &w - &lr_t * &vw * cosine;
                b = &b - &lr_t * &vb * cosine;
            });
            step += 1;
        }
    }
    let _guard = tch::no_grad_guard();
    let accuracy = |x: &Tensor, y: &Tensor| -> Vec<f64> {
        let pred = (x.to_kind(Kind::Float).unsqueeze(0).matmul(&w) + &b).argmax(-1, false);
        let hits = pred
            .eq_tensor(&y.to_kind(Kind::Int64).unsqueeze(0))
            .to_kind(Kind::Float);
        let acc = hits.mean_dim(1, false, Kind::Float) * 100.0;
        Vec::<f64>::try_from(acc.to_kind(Kind::Double)).expect("1-d accuracy vector")
    };
    let val = accuracy(&x_val, &y_val);
    let best = val
        .iter()
        .enumerate()
        .fold(0, |best, (i, v)| if *v > val[best] { i } else { best });
    let test_acc = accuracy(test, test_labels);
    Ok(LinearResult {
        best_lr: config.learning_rates[best],
        val_top1: val[best],
        test_top1: test_acc[best],
        val_top1_per_lr: val,
    })
}

/// The linear-probe input of the official code: CLS tokens of the last `n` blocks
/// concatenated ([B, n, D] -> [B, n*D]), then optionally the mean of the last block's patch
/// tokens ([B, P, D] -> [B, D]).
pub fn linear_input(cls_last_blocks: &Tensor, last_patch_tokens: Option<&Tensor>) -> Tensor {
    let b = cls_last_blocks.size()[0];
    let cls = cls_last_blocks.reshape([b, -1]);
    match last_patch_tokens {
        Some(p) => Tensor::cat(&[cls, p.mean_dim(1, false, p.kind())], 1),
        None => cls,
    }
}

fn seeded_permutation(n: i64, seed: i64, device: Device) -> Tensor {
    let keys = generator_normal(&[n], 1.0, seed, device);
    keys.argsort(0, false)
}

/// Normal samples from a private generator, so the probe never disturbs (or depends on)
/// the training RNG state.
fn generator_normal(shape: &[i64], std: f64, seed: i64, device: Device) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed as u64);
    let count: i64 = shape.iter().product();
    // Box-Muller: two uniforms give one normal; avoids a dependency for one distribution.
    let values: Vec<f32> = (0..count)
        .map(|_| {
            let u1: f64 = rng.random_range(f64::EPSILON..1.0);
            let u2: f64 = rng.random();
            ((-2.0f64 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std) as f32
        })
        .collect();
    Tensor::from_slice(&values).view(shape).to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gaussian blobs around orthogonal class means: linearly separable.
    fn blobs(n_per_class: i64, classes: i64, dim: i64, seed: i64) -> (Tensor, Tensor) {
        let noise = generator_normal(&[n_per_class * classes, dim], 0.3, seed, Device::Cpu);
        let labels = Tensor::arange(classes, (Kind::Int64, Device::Cpu))
            .repeat_interleave_self_int(n_per_class, 0, None);
        let means = Tensor::eye(classes, (Kind::Float, Device::Cpu)).narrow(1, 0, classes);
        let means = Tensor::cat(
            &[
                means,
                Tensor::zeros([classes, dim - classes], (Kind::Float, Device::Cpu)),
            ],
            1,
        );
        (means.index_select(0, &labels) * 2.0 + noise, labels)
    }

    #[test]
    fn separable_features_are_learned_nearly_perfectly() {
        let (x, y) = blobs(100, 5, 16, 1);
        let (xt, yt) = blobs(40, 5, 16, 2);
        let cfg = LinearConfig {
            epochs: 20,
            ..LinearConfig::default()
        };
        let r = linear_probe(&x, &y, &xt, &yt, 5, &cfg).unwrap();
        assert!(r.test_top1 > 95.0, "{r:?}");
        assert_eq!(r.val_top1_per_lr.len(), cfg.learning_rates.len());
    }

    #[test]
    fn the_best_learning_rate_is_chosen_on_validation() {
        let (x, y) = blobs(60, 4, 8, 3);
        let (xt, yt) = blobs(20, 4, 8, 4);
        // 1e-9 cannot move the weights away from their tiny random init.
        let cfg = LinearConfig {
            learning_rates: vec![1e-9, 0.1],
            epochs: 10,
            ..LinearConfig::default()
        };
        let r = linear_probe(&x, &y, &xt, &yt, 4, &cfg).unwrap();
        assert_eq!(r.best_lr, 0.1, "{r:?}");
        assert!(r.val_top1_per_lr[0] < r.val_top1_per_lr[1]);
    }

    #[test]
    fn linear_input_concatenates_cls_blocks_and_pooled_patches() {
        let cls = Tensor::ones([2, 4, 3], (Kind::Float, Device::Cpu));
        let patches = Tensor::full([2, 5, 3], 2.0, (Kind::Float, Device::Cpu));
        let x = linear_input(&cls, Some(&patches));
        assert_eq!(x.size(), [2, 15]);
        assert_eq!(x.double_value(&[0, 14]), 2.0);
        assert_eq!(linear_input(&cls, None).size(), [2, 12]);
    }

    #[test]
    fn the_probe_is_deterministic() {
        let (x, y) = blobs(30, 3, 6, 5);
        let cfg = LinearConfig {
            epochs: 3,
            ..LinearConfig::default()
        };
        let a = linear_probe(&x, &y, &x, &y, 3, &cfg).unwrap();
        let b = linear_probe(&x, &y, &x, &y, 3, &cfg).unwrap();
        assert_eq!(a, b);
    }
}
