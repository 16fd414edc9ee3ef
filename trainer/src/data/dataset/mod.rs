//! Datasets: random access to decoded RGB images and optional class labels.

mod folder;
mod idx;
mod imagenet;
mod tar_shards;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::RgbImage;

pub use folder::ImageFolder;
pub use idx::IdxDataset;
pub use imagenet::{ImageNet, ImageNetSplit};
pub use tar_shards::TarShards;

use super::DataError;

/// One decoded image, as Pillow's `Image.open(..).convert("RGB")` would give it.
#[derive(Debug, Clone)]
pub struct Sample {
    pub image: RgbImage,
    /// Class index, when the dataset has labels.
    pub label: Option<u32>,
}

/// Random access to a fixed list of images.
pub trait Dataset: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Decodes image `index`. An unreadable image is `DataError::Corrupt` (to be skipped);
    /// other errors (I/O) are not the image's fault.
    fn get(&self, index: usize) -> Result<Sample, DataError>;
    /// Number of classes when labelled.
    fn num_classes(&self) -> Option<usize>;
    /// What this dataset is, for messages ("image folder /data/train").
    fn describe(&self) -> String;
}

/// Which reader to use for a dataset path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatasetKind {
    /// Decide from the path: a `.tar` file or a folder of them is tar shards, an IDX file (or a
    /// folder holding `<split>-images-idx3-ubyte[.gz]`) is IDX, anything else an image folder.
    Auto,
    ImageFolder,
    Tar,
    /// `split` picks `train` or `t10k` files when the path is a folder.
    Idx {
        split: String,
    },
    /// The official ImageNet layout: the samples of `split` listed in
    /// `<extra>/entries-<SPLIT>.npy`; without `extra`, the entries the official `dump_extra`
    /// derives from the tree: an image folder of `<path>/<split>` (classes sorted by id).
    ImageNet {
        extra: Option<PathBuf>,
        split: ImageNetSplit,
    },
}

/// Opens the dataset at `path`. A missing path or a dataset without images is an error for
/// which [`DataError::is_permanent`] holds.
pub fn open_dataset(kind: &DatasetKind, path: &Path) -> Result<Arc<dyn Dataset>, DataError> {
    std::fs::metadata(path).map_err(|e| DataError::io(path, e))?;
    let kind = match kind {
        DatasetKind::Auto => detect(path),
        other => other.clone(),
    };
    Ok(match kind {
        DatasetKind::Auto | DatasetKind::ImageFolder => Arc::new(ImageFolder::open(path)?),
        DatasetKind::Tar => Arc::new(TarShards::open(path)?),
        DatasetKind::Idx { split } => Arc::new(IdxDataset::open_split(path, &split)?),
        DatasetKind::ImageNet {
            extra: Some(extra),
            split,
        } => Arc::new(ImageNet::open(path, &extra, split)?),
        DatasetKind::ImageNet { extra: None, split } => {
            Arc::new(ImageFolder::open(&path.join(split.dir()))?)
        }
    })
}

fn detect(path: &Path) -> DatasetKind {
    let name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default()
    };
    if path.is_file() {
        let n = name(path);
        if n.ends_with(".tar") {
            return DatasetKind::Tar;
        }
        if n.contains("idx3-ubyte") {
            return DatasetKind::Idx {
                split: String::new(),
            };
        }
        return DatasetKind::ImageFolder;
    }
    let entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    if entries
        .iter()
        .any(|p| p.is_file() && name(p).ends_with(".tar"))
    {
        DatasetKind::Tar
    } else if entries
        .iter()
        .any(|p| name(p).starts_with("train-images-idx3-ubyte"))
    {
        DatasetKind::Idx {
            split: "train".into(),
        }
    } else {
        DatasetKind::ImageFolder
    }
}

/// File extensions read as images (case-insensitive), as torchvision's `IMG_EXTENSIONS`
/// restricted to what the decoders handle.
pub(crate) fn is_image_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    [".jpg", ".jpeg", ".png", ".webp"]
        .iter()
        .any(|ext| lower.ends_with(ext))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_path_is_a_permanent_not_found_error() {
        let err = open_dataset(&DatasetKind::Auto, Path::new("/definitely/not/here"))
            .err()
            .unwrap();
        assert!(matches!(err, DataError::NotFound { .. }));
        assert!(err.is_permanent());
        assert!(err.to_string().contains("/definitely/not/here"));
    }

    #[test]
    fn auto_detection_recognises_tar_shards_idx_and_folders() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(detect(dir.path()), DatasetKind::ImageFolder);
        std::fs::write(dir.path().join("shard-0000.tar"), b"").unwrap();
        assert_eq!(detect(dir.path()), DatasetKind::Tar);
        let idx = tempfile::tempdir().unwrap();
        std::fs::write(idx.path().join("train-images-idx3-ubyte.gz"), b"").unwrap();
        assert_eq!(
            detect(idx.path()),
            DatasetKind::Idx {
                split: "train".into()
            }
        );
    }
}
