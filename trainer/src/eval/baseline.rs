//! The raw-pixel baseline: the k-NN protocol run on the evaluation transform's pixels
//! themselves (the exact tensors a backbone would receive, flattened), on the same splits.
//! A learned feature is only useful where it beats this; on small grayscale datasets such as
//! Fashion-MNIST pixels are a strong baseline. Its cost grows with the image size (features of
//! `3 · crop²` values), so it is computed on request (`eval --raw-pixels`), not in the loop.

use tch::Tensor;

use super::{EvalError, EvalInputs, KnnAccuracy, KnnConfig, LabelledSplit, knn_classify};

/// Flattened pixels and labels of a whole split.
fn split_pixels(split: &LabelledSplit, inputs: &EvalInputs) -> Result<(Tensor, Tensor), EvalError> {
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for batch in split.batches(&inputs.transform, inputs.batch_size, inputs.threads) {
        let (images, y) = batch?;
        pixels.push(images.flatten(1, -1));
        labels.push(y);
    }
    if pixels.is_empty() {
        return Err(EvalError::Empty { what: split.name });
    }
    Ok((Tensor::cat(&pixels, 0), Tensor::cat(&labels, 0)))
}

/// k-NN top-1/top-5 of raw pixels with `config` (cosine, temperature, k values), reference set
/// `inputs.train`, reported on `inputs.test`.
pub fn raw_pixel_knn(
    inputs: &EvalInputs,
    num_classes: i64,
    config: &KnnConfig,
) -> Result<Vec<KnnAccuracy>, EvalError> {
    let _guard = tch::no_grad_guard();
    let (train, train_labels) = split_pixels(&inputs.train, inputs)?;
    let (test, test_labels) = split_pixels(&inputs.test, inputs)?;
    knn_classify(
        &train,
        &train_labels,
        &test,
        &test_labels,
        num_classes,
        config,
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use image::RgbImage;

    use super::*;
    use crate::data::{DataError, Dataset, Sample};
    use crate::eval::EvalTransform;

    /// Class `c` is a bright square in quadrant `c` with a little per-image noise: pixels
    /// separate the classes perfectly, a constant feature would not.
    struct Quadrants(usize);

    impl Dataset for Quadrants {
        fn len(&self) -> usize {
            self.0
        }
        fn get(&self, index: usize) -> Result<Sample, DataError> {
            let class = index % 4;
            let (qx, qy) = ((class % 2) as u32 * 8, (class / 2) as u32 * 8);
            let image = RgbImage::from_fn(16, 16, |x, y| {
                let inside = (qx..qx + 8).contains(&x) && (qy..qy + 8).contains(&y);
                let v = if inside { 200 } else { 20 } + ((index * 7 + x as usize) % 5) as u8;
                image::Rgb([v, v, v])
            });
            Ok(Sample {
                image,
                label: Some(class as u32),
            })
        }
        fn num_classes(&self) -> Option<usize> {
            Some(4)
        }
        fn describe(&self) -> String {
            "quadrants".into()
        }
    }

    fn inputs(n_train: usize, n_test: usize) -> EvalInputs {
        let split = |name, n| LabelledSplit::new(name, Arc::new(Quadrants(n))).unwrap();
        EvalInputs {
            train: split("train", n_train),
            test: split("test", n_test),
            transform: EvalTransform::official(16, [0.5; 3], [0.25; 3]),
            batch_size: 5,
            threads: 2,
            n_last_blocks: 1,
        }
    }

    #[test]
    fn raw_pixels_separate_classes_that_differ_in_their_pixels() {
        let config = KnnConfig {
            ks: vec![1, 3],
            ..KnnConfig::default()
        };
        let out = raw_pixel_knn(&inputs(40, 12), 4, &config).unwrap();
        assert_eq!(out.iter().map(|a| a.k).collect::<Vec<_>>(), [1, 3]);
        for a in &out {
            assert_eq!(a.top1, 100.0, "{a:?}");
        }
    }

    #[test]
    fn the_baseline_is_the_knn_of_the_transformed_batches_flattened() {
        let inputs = inputs(20, 8);
        let config = KnnConfig {
            ks: vec![2],
            ..KnnConfig::default()
        };
        let flat = |s: &LabelledSplit| {
            let (x, y): (Vec<Tensor>, Vec<Tensor>) = s
                .batches(&inputs.transform, 3, 1)
                .map(Result::unwrap)
                .map(|(x, y)| (x.reshape([x.size()[0], -1]), y))
                .unzip();
            (Tensor::cat(&x, 0), Tensor::cat(&y, 0))
        };
        let (tr, trl) = flat(&inputs.train);
        let (te, tel) = flat(&inputs.test);
        assert_eq!(tr.size(), [20, 3 * 16 * 16]);
        let want = knn_classify(&tr, &trl, &te, &tel, 4, &config).unwrap();
        assert_eq!(raw_pixel_knn(&inputs, 4, &config).unwrap(), want);
    }
}
