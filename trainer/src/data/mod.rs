//! The data pipeline: datasets, DINOv2 multi-crop augmentation, and a parallel,
//! deterministic, resumable loader.

pub mod augment;
pub mod dataset;
pub mod decode;
mod error;
pub mod loader;
pub mod sampler;
mod skip;

pub use augment::{MultiCrop, MultiCropConfig};
pub use dataset::{Dataset, DatasetKind, ImageNetSplit, Sample, open_dataset};
pub use error::DataError;
pub use loader::{Batch, Loader, LoaderConfig};
pub use sampler::ShardedInfiniteSampler;
pub use skip::SkippedImages;
