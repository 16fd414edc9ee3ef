//! `root/<class>/**/*.jpg` (labelled, torchvision `ImageFolder` order) or a flat folder of
//! images (unlabelled).

use std::path::{Path, PathBuf};

use super::{Dataset, Sample, is_image_name};
use crate::data::DataError;
use crate::data::decode::decode_rgb;

#[derive(Debug)]
pub struct ImageFolder {
    root: PathBuf,
    files: Vec<(PathBuf, Option<u32>)>,
    classes: Vec<String>,
}

impl ImageFolder {
    /// Scans `root`. Class folders (sorted by name, as torchvision) that hold at least one image
    /// become labels `0..`; without any, the images directly in `root` are read unlabelled.
    pub fn open(root: &Path) -> Result<Self, DataError> {
        let meta = std::fs::metadata(root).map_err(|e| DataError::io(root, e))?;
        if !meta.is_dir() {
            return Err(DataError::InvalidConfig {
                field: "data.path",
                message: format!(
                    "{} is not a folder of images (nor a .tar shard or IDX file)",
                    root.display()
                ),
            });
        }
        let (dirs, top_files) = list_sorted(root)?;
        let mut files = Vec::new();
        let mut classes = Vec::new();
        for dir in dirs {
            let mut images = Vec::new();
            collect_images(&dir, &mut images)?;
            if images.is_empty() {
                tracing::warn!(folder = %dir.display(), "class folder without images ignored");
                continue;
            }
            let label = classes.len() as u32;
            classes.push(
                dir.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
            );
            files.extend(images.into_iter().map(|p| (p, Some(label))));
        }
        if classes.is_empty() {
            files = top_files
                .into_iter()
                .filter(|p| is_image_file(p))
                .map(|p| (p, None))
                .collect();
        }
        if files.is_empty() {
            return Err(DataError::Empty {
                path: root.to_path_buf(),
                detail: "no .jpg/.jpeg/.png/.webp files in it or in its class sub-folders".into(),
            });
        }
        Ok(Self {
            root: root.to_path_buf(),
            files,
            classes,
        })
    }

    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    pub fn path(&self, index: usize) -> &Path {
        &self.files[index].0
    }
}

fn is_image_file(p: &Path) -> bool {
    p.file_name()
        .is_some_and(|n| is_image_name(&n.to_string_lossy()))
}

/// Sub-folders and files of `dir`, each sorted by name so indices are stable across machines.
fn list_sorted(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>), DataError> {
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let path = entry.map_err(|e| DataError::io(dir, e))?.path();
        // `is_dir` follows symlinks, like torchvision's os.walk(followlinks=True).
        if path.is_dir() {
            dirs.push(path)
        } else {
            files.push(path)
        }
    }
    dirs.sort();
    files.sort();
    Ok((dirs, files))
}

fn collect_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    let (dirs, files) = list_sorted(dir)?;
    out.extend(files.into_iter().filter(|p| is_image_file(p)));
    for sub in dirs {
        collect_images(&sub, out)?;
    }
    Ok(())
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn get(&self, index: usize) -> Result<Sample, DataError> {
        let (path, label) = &self.files[index];
        let what = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| DataError::Corrupt {
            what: what.clone(),
            reason: e.to_string(),
        })?;
        Ok(Sample {
            image: decode_rgb(&bytes, &what)?,
            label: *label,
        })
    }

    fn num_classes(&self) -> Option<usize> {
        (!self.classes.is_empty()).then_some(self.classes.len())
    }

    fn describe(&self) -> String {
        format!("image folder {}", self.root.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::decode::tests::encoded;
    use image::ImageFormat;

    #[test]
    fn class_folders_become_sorted_labels() {
        let dir = tempfile::tempdir().unwrap();
        for (class, n) in [("dog", 2), ("cat", 1)] {
            std::fs::create_dir(dir.path().join(class)).unwrap();
            for i in 0..n {
                std::fs::write(
                    dir.path().join(class).join(format!("{i}.png")),
                    encoded(8, 6, ImageFormat::Png),
                )
                .unwrap();
            }
        }
        std::fs::write(dir.path().join("dog/readme.txt"), b"not an image").unwrap();
        let ds = ImageFolder::open(dir.path()).unwrap();
        assert_eq!(ds.classes(), ["cat", "dog"]);
        assert_eq!(ds.len(), 3);
        assert_eq!(ds.num_classes(), Some(2));
        assert_eq!(ds.get(0).unwrap().label, Some(0));
        assert_eq!(ds.get(2).unwrap().label, Some(1));
        assert_eq!(ds.get(2).unwrap().image.dimensions(), (8, 6));
    }

    #[test]
    fn a_flat_folder_is_read_unlabelled() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.JPG"), encoded(8, 8, ImageFormat::Jpeg)).unwrap();
        std::fs::write(dir.path().join("b.webp"), encoded(8, 8, ImageFormat::WebP)).unwrap();
        let ds = ImageFolder::open(dir.path()).unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.num_classes(), None);
        assert_eq!(ds.get(1).unwrap().label, None);
    }

    #[test]
    fn an_empty_folder_is_a_permanent_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("empty_class")).unwrap();
        let err = ImageFolder::open(dir.path()).unwrap_err();
        assert!(matches!(err, DataError::Empty { .. }), "{err}");
        assert!(err.is_permanent());
        assert!(err.to_string().contains(&dir.path().display().to_string()));
    }

    #[test]
    fn a_non_image_file_with_an_image_name_is_corrupt_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("fake.jpg"), b"#!/bin/sh\necho hi\n").unwrap();
        let ds = ImageFolder::open(dir.path()).unwrap();
        let err = ds.get(0).unwrap_err();
        assert!(
            matches!(err, DataError::Corrupt { ref what, .. } if what.ends_with("fake.jpg")),
            "{err}"
        );
    }
}
