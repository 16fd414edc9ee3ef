//! Evaluation inputs: the official evaluation transform over labelled datasets, in batches.
//!
//! The official transform (`make_classification_eval_transform`) resizes the shorter side to
//! 256 (bicubic), centre-crops 224 and normalises. Dinoflow evaluates at the run's global crop
//! size, so the resize keeps the official 256/224 ratio: `resize = round(crop · 256 / 224)`.
use std::sync::Arc;

use image::RgbImage;
use tch::Tensor;

use super::EvalError;
use crate::data::augment::{CropBox, Normalizer, resized_crop};
use crate::data::{DataError, Dataset};

/// Resize (shorter side) + centre crop + normalise, with Pillow's bicubic.
#[derive(Debug, Clone)]
pub struct EvalTransform {
    pub resize: u32,
    pub crop: u32,
    pub normalizer: Normalizer,
}

impl EvalTransform {
    /// The official transform scaled to `crop` pixels.
    pub fn official(crop: u32, mean: [f32; 3], std: [f32; 3]) -> Self {
        Self {
            resize: (f64::from(crop) * 256.0 / 224.0).round() as u32,
            crop,
            normalizer: Normalizer::new(mean, std),
        }
    }

    /// Writes the transformed image as CHW into `out` (length `3 * crop * crop`).
    pub fn apply(&self, img: &RgbImage, out: &mut [f32]) {
        let (w, h) = img.dimensions();
        // torchvision `Resize(int)`: the shorter side becomes `resize`, the longer one is
        // scaled and truncated.
        let (rw, rh) = if w <= h {
            (
                self.resize,
                (u64::from(self.resize) * u64::from(h) / u64::from(w)) as u32,
            )
        } else {
            (
                (u64::from(self.resize) * u64::from(w) / u64::from(h)) as u32,
                self.resize,
            )
        };
        let full = CropBox {
            top: 0,
            left: 0,
            height: h,
            width: w,
        };
        let resized = resized_crop(img, full, rw, rh);
        // torchvision `CenterCrop`: offsets rounded half to even, as Python's `round`.
        let top = ((f64::from(rh) - f64::from(self.crop)) / 2.0).round_ties_even() as u32;
        let left = ((f64::from(rw) - f64::from(self.crop)) / 2.0).round_ties_even() as u32;
        let cropped = image::imageops::crop_imm(&resized, left, top, self.crop, self.crop);
        self.normalizer.write_chw(&cropped.to_image(), out);
    }
}

/// Pixels (CHW, image after image) and labels of consecutive images of a batch.
type DecodedPart = (Vec<f32>, Vec<i64>);

/// A labelled dataset (or an evenly strided subset of it) read in order for feature
/// extraction.
#[derive(Clone)]
pub struct LabelledSplit {
    pub name: &'static str,
    pub dataset: Arc<dyn Dataset>,
    /// Dataset indices to read; None reads all.
    indices: Option<Arc<Vec<usize>>>,
}

impl std::fmt::Debug for LabelledSplit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name, self.dataset.describe())
    }
}

impl LabelledSplit {
    /// Checks that the dataset has labels: k-NN and the linear probe need them.
    pub fn new(name: &'static str, dataset: Arc<dyn Dataset>) -> Result<Self, EvalError> {
        if dataset.num_classes().is_none() {
            return Err(EvalError::Data(format!(
                "the {name} split ({}) has no class labels; evaluation needs labelled images \
                 (class folders, `.cls` files in tar shards, or IDX label files)",
                dataset.describe()
            )));
        }
        Ok(Self {
            name,
            dataset,
            indices: None,
        })
    }

    /// Keeps at most `max` images, evenly strided over the dataset so every part of it (and,
    /// for class-sorted datasets, every class) is represented.
    pub fn subsample(mut self, max: usize) -> Self {
        let n = self.dataset.len();
        if max < n {
            self.indices = Some(Arc::new((0..max).map(|i| i * n / max).collect()));
        }
        self
    }

    /// Number of images read.
    pub fn len(&self) -> usize {
        self.indices
            .as_ref()
            .map_or(self.dataset.len(), |ids| ids.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn index(&self, position: usize) -> usize {
        self.indices.as_ref().map_or(position, |ids| ids[position])
    }

    /// Batches of `(images [B, 3, crop, crop], labels [B])` over the whole split, decoded and
    /// transformed on `threads` threads. Unreadable images are skipped (the training loader
    /// already reports them); an empty split is an error from [`super::extract_features`].
    pub fn batches<'a>(
        &'a self,
        transform: &'a EvalTransform,
        batch_size: usize,
        threads: usize,
    ) -> impl Iterator<Item = Result<(Tensor, Tensor), EvalError>> + 'a {
        let n = self.len();
        (0..n)
            .step_by(batch_size.max(1))
            .map(move |start| self.batch(start..n.min(start + batch_size), transform, threads))
            .filter(|b| !matches!(b, Ok((_, labels)) if labels.numel() == 0))
    }

    fn batch(
        &self,
        range: std::ops::Range<usize>,
        transform: &EvalTransform,
        threads: usize,
    ) -> Result<(Tensor, Tensor), EvalError> {
        let c = transform.crop as usize;
        let per_image = 3 * c * c;
        let indices: Vec<usize> = range.map(|p| self.index(p)).collect();
        let chunk = indices.len().div_ceil(threads.max(1)).max(1);
        // Each thread fills its own pixel buffer and label list; they are concatenated in
        // index order, so the batch does not depend on the thread count.
        let parts: Vec<Result<DecodedPart, EvalError>> = std::thread::scope(|s| {
            let handles: Vec<_> = indices
                .chunks(chunk)
                .map(|ids| {
                    s.spawn(move || {
                        let mut pixels = Vec::with_capacity(ids.len() * per_image);
                        let mut labels = Vec::with_capacity(ids.len());
                        for &i in ids {
                            let sample = match self.dataset.get(i) {
                                Ok(sample) => sample,
                                Err(DataError::Corrupt { .. }) => continue,
                                Err(e) => return Err(EvalError::Data(e.to_string())),
                            };
                            let Some(label) = sample.label else {
                                return Err(EvalError::Data(format!(
                                    "{} image {i} has no label",
                                    self.name
                                )));
                            };
                            let at = pixels.len();
                            pixels.resize(at + per_image, 0.0);
                            transform.apply(&sample.image, &mut pixels[at..]);
                            labels.push(i64::from(label));
                        }
                        Ok((pixels, labels))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("an evaluation decode thread panicked"))
                .collect()
        });
        let (mut pixels, mut labels) = (Vec::new(), Vec::new());
        for part in parts {
            let (p, l) = part?;
            pixels.extend(p);
            labels.extend(l);
        }
        let b = labels.len() as i64;
        let images = Tensor::from_slice(&pixels).view([b, 3, c as i64, c as i64]);
        Ok((images, Tensor::from_slice(&labels)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Sample;

    /// Images whose every pixel is the label's grey level; image 3 is unreadable.
    struct Toy(usize);

    impl Dataset for Toy {
        fn len(&self) -> usize {
            self.0
        }
        fn get(&self, index: usize) -> Result<Sample, DataError> {
            if index == 3 {
                return Err(DataError::Corrupt {
                    what: "toy/3".into(),
                    reason: "truncated".into(),
                });
            }
            let v = (index % 4) as u8 * 60;
            Ok(Sample {
                image: RgbImage::from_pixel(10, 12, image::Rgb([v, v, v])),
                label: Some((index % 4) as u32),
            })
        }
        fn num_classes(&self) -> Option<usize> {
            Some(4)
        }
        fn describe(&self) -> String {
            "toy".into()
        }
    }

    #[test]
    fn the_official_ratio_scales_to_small_crops() {
        let t = EvalTransform::official(224, [0.0; 3], [1.0; 3]);
        assert_eq!((t.resize, t.crop), (256, 224));
        let t = EvalTransform::official(28, [0.0; 3], [1.0; 3]);
        assert_eq!((t.resize, t.crop), (32, 28));
    }

    #[test]
    fn a_constant_image_stays_constant_through_resize_and_crop() {
        let t = EvalTransform::official(8, [0.5; 3], [0.25; 3]);
        let img = RgbImage::from_pixel(10, 14, image::Rgb([51, 51, 51]));
        let mut out = vec![0.0; 3 * 64];
        t.apply(&img, &mut out);
        let expected = (51.0f32 / 255.0 - 0.5) / 0.25;
        assert!(out.iter().all(|v| (v - expected).abs() < 1e-6), "{out:?}");
    }

    #[test]
    fn batches_cover_the_split_in_order_skip_unreadable_images_and_ignore_thread_count() {
        let split = LabelledSplit::new("test", Arc::new(Toy(10))).unwrap();
        let t = EvalTransform::official(8, [0.0; 3], [1.0; 3]);
        let collect = |threads| {
            let batches: Vec<_> = split
                .batches(&t, 4, threads)
                .collect::<Result<_, _>>()
                .unwrap();
            let labels: Vec<i64> = batches
                .iter()
                .flat_map(|(_, l)| Vec::<i64>::try_from(l).unwrap())
                .collect();
            let first = batches[0].0.shallow_clone();
            (labels, first)
        };
        let (labels, first) = collect(1);
        // Image 3 is skipped; labels are index % 4.
        assert_eq!(labels, vec![0, 1, 2, 0, 1, 2, 3, 0, 1]);
        assert_eq!(first.size(), [3, 3, 8, 8]);
        let (labels3, first3) = collect(3);
        assert_eq!(labels, labels3);
        assert!(first.equal(&first3));
    }

    #[test]
    fn a_subsample_is_evenly_strided_and_never_larger_than_the_dataset() {
        let split = LabelledSplit::new("train", Arc::new(Toy(10))).unwrap();
        let sub = split.clone().subsample(5);
        assert_eq!(sub.len(), 5);
        assert_eq!(
            (0..5).map(|p| sub.index(p)).collect::<Vec<_>>(),
            [0, 2, 4, 6, 8]
        );
        assert_eq!(split.subsample(50).len(), 10);
    }

    #[test]
    fn an_unlabelled_dataset_is_refused_with_the_reason() {
        struct Unlabelled;
        impl Dataset for Unlabelled {
            fn len(&self) -> usize {
                1
            }
            fn get(&self, _: usize) -> Result<Sample, DataError> {
                unreachable!()
            }
            fn num_classes(&self) -> Option<usize> {
                None
            }
            fn describe(&self) -> String {
                "image folder /x".into()
            }
        }
        let err = LabelledSplit::new("train", Arc::new(Unlabelled)).unwrap_err();
        assert!(err.to_string().contains("no class labels"), "{err}");
        assert!(err.to_string().contains("/x"), "{err}");
    }
}
