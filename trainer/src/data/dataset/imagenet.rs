//! The official ImageNet-1k layout (`dinov2/data/datasets/image_net.py`): images under
//! `<root>/train/<class_id>/<class_id>_<n>.JPEG`, `<root>/val/<class_id>/ILSVRC2012_val_<n:08>.JPEG`
//! and `<root>/test/ILSVRC2012_test_<n:08>.JPEG`; which samples exist, in which order and with
//! which label is the extra file `<extra>/entries-<SPLIT>.npy` that the official
//! `ImageNet.dump_extra` writes: a structured array of `actual_index` (u4), `class_index` (u4),
//! `class_id` and `class_name` (fixed-width unicode). The test split has no labels.
//!
//! Unlike the official class, the sample count is not checked against the full ImageNet split
//! sizes, so subsets (and the tests' tiny trees) read too.

use std::path::{Path, PathBuf};

use super::{Dataset, Sample};
use crate::data::DataError;
use crate::data::decode::decode_rgb;

/// Split of the official dataset (`data.split`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageNetSplit {
    Train,
    Val,
    Test,
}

impl ImageNetSplit {
    /// The folder under the root (`train`) and the extra files' suffix (`TRAIN`).
    pub fn dir(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Val => "val",
            Self::Test => "test",
        }
    }

    /// The image of entry (`actual_index`, `class_id`), relative to the root.
    fn image_relpath(self, actual_index: u32, class_id: &str) -> PathBuf {
        let dir = Path::new(self.dir());
        match self {
            Self::Train => dir
                .join(class_id)
                .join(format!("{class_id}_{actual_index}.JPEG")),
            Self::Val | Self::Test => dir
                .join(class_id)
                .join(format!("ILSVRC2012_{}_{actual_index:08}.JPEG", self.dir())),
        }
    }
}

/// One row of `entries-<SPLIT>.npy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub actual_index: u32,
    pub class_index: u32,
    pub class_id: String,
}

#[derive(Debug)]
pub struct ImageNet {
    root: PathBuf,
    split: ImageNetSplit,
    entries: Vec<Entry>,
    num_classes: usize,
}

impl ImageNet {
    /// Reads `<extra>/entries-<SPLIT>.npy`; images are read from `root` when sampled.
    pub fn open(root: &Path, extra: &Path, split: ImageNetSplit) -> Result<Self, DataError> {
        std::fs::metadata(root).map_err(|e| DataError::io(root, e))?;
        let file = extra.join(format!("entries-{}.npy", split.dir().to_uppercase()));
        let bytes = std::fs::read(&file).map_err(|e| DataError::io(&file, e))?;
        let entries = parse_entries(&bytes).map_err(|message| DataError::InvalidConfig {
            field: "data.extraPath",
            message: format!(
                "{}: {message}; it must be the entries file the official \
                 ImageNet.dump_extra writes",
                file.display()
            ),
        })?;
        if entries.is_empty() {
            return Err(DataError::Empty {
                path: file,
                detail: "the entries file lists no images".into(),
            });
        }
        let num_classes = match split {
            ImageNetSplit::Test => 0,
            _ => entries
                .iter()
                .map(|e| e.class_index as usize + 1)
                .max()
                .unwrap_or(0),
        };
        Ok(Self {
            root: root.to_path_buf(),
            split,
            entries,
            num_classes,
        })
    }

    /// The image file of sample `index`.
    pub fn path(&self, index: usize) -> PathBuf {
        let e = &self.entries[index];
        self.root
            .join(self.split.image_relpath(e.actual_index, &e.class_id))
    }
}

impl Dataset for ImageNet {
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn get(&self, index: usize) -> Result<Sample, DataError> {
        let path = self.path(index);
        let what = path.display().to_string();
        let bytes = std::fs::read(&path).map_err(|e| DataError::Corrupt {
            what: what.clone(),
            reason: e.to_string(),
        })?;
        Ok(Sample {
            image: decode_rgb(&bytes, &what)?,
            label: (self.split != ImageNetSplit::Test).then(|| self.entries[index].class_index),
        })
    }

    fn num_classes(&self) -> Option<usize> {
        (self.num_classes > 0).then_some(self.num_classes)
    }

    fn describe(&self) -> String {
        format!(
            "ImageNet {} split at {}",
            self.split.dir(),
            self.root.display()
        )
    }
}

/// A field of a structured numpy dtype: name, byte offset, kind (`u4` or `U<n>`).
struct Field {
    name: String,
    offset: usize,
    chars: Option<usize>,
}

/// Parses a version 1-3 `.npy` file holding a 1-d C-order structured array with fields
/// `actual_index` (`<u4`), `class_index` (`<u4`) and `class_id` (`<U<n>`); others are skipped.
pub fn parse_entries(bytes: &[u8]) -> Result<Vec<Entry>, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy file".into());
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = bytes
        .get(start..start + header_len)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or("truncated .npy header")?;
    if header.contains("'fortran_order': True") {
        return Err("Fortran-ordered arrays are not supported".into());
    }
    let descr = header
        .split_once("'descr':")
        .map(|(_, r)| r)
        .and_then(|r| r.split_once(']'))
        .map(|(d, _)| d)
        .ok_or("no structured 'descr' in the header")?;
    let mut fields = Vec::new();
    let mut offset = 0;
    for tuple in descr.split('(').skip(1) {
        let quoted: Vec<&str> = tuple.split('\'').skip(1).step_by(2).collect();
        let (name, ty) = match quoted.as_slice() {
            [n, t, ..] => (*n, *t),
            _ => return Err(format!("unreadable dtype field ({tuple})")),
        };
        let (size, chars) = if ty == "<u4" || ty == "<i4" {
            (4, None)
        } else if let Some(n) = ty.strip_prefix("<U").and_then(|n| n.parse::<usize>().ok()) {
            (4 * n, Some(n))
        } else {
            return Err(format!(
                "field {name} has dtype {ty}, expected <u4 or <U<n>"
            ));
        };
        fields.push(Field {
            name: name.into(),
            offset,
            chars,
        });
        offset += size;
    }
    let item = offset;
    let shape = header
        .split_once("'shape':")
        .and_then(|(_, r)| r.split_once('('))
        .and_then(|(_, r)| r.split_once(')'))
        .map(|(s, _)| s.trim().trim_end_matches(','))
        .ok_or("no shape in the header")?;
    let count: usize = shape
        .parse()
        .map_err(|_| format!("shape ({shape}) is not one-dimensional"))?;
    let field = |name: &str| {
        fields
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| format!("no {name} field"))
    };
    let (actual, class, id) = (
        field("actual_index")?,
        field("class_index")?,
        field("class_id")?,
    );
    if actual.chars.is_some() || class.chars.is_some() || id.chars.is_none() {
        return Err("actual_index/class_index must be <u4 and class_id unicode".into());
    }
    let data = &bytes[start + header_len..];
    if data.len() < count * item {
        return Err(format!(
            "truncated: {count} entries of {item} bytes need {} bytes, found {}",
            count * item,
            data.len()
        ));
    }
    let u32_at = |p: usize| u32::from_le_bytes([data[p], data[p + 1], data[p + 2], data[p + 3]]);
    let text_at = |p: usize, n: usize| -> String {
        (0..n)
            .map(|i| u32_at(p + 4 * i))
            .take_while(|c| *c != 0)
            .filter_map(char::from_u32)
            .collect()
    };
    Ok((0..count)
        .map(|i| {
            let row = i * item;
            Entry {
                actual_index: u32_at(row + actual.offset),
                class_index: u32_at(row + class.offset),
                class_id: text_at(row + id.offset, id.chars.unwrap_or(0)),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Writes a tiny official tree and its extra files with numpy, as `dump_extra` would.
    fn tiny_tree(dir: &Path) {
        let script = r#"
import sys, os, numpy as np
from PIL import Image
root, extra = sys.argv[1], sys.argv[2]
os.makedirs(extra, exist_ok=True)
def save(rel, shade):
    p = os.path.join(root, rel); os.makedirs(os.path.dirname(p), exist_ok=True)
    Image.new("RGB", (8, 6), (shade, 0, 0)).save(p, format="JPEG")
dtype = np.dtype([("actual_index", "<u4"), ("class_index", "<u4"), ("class_id", "U9"), ("class_name", "U12")])
train = [(7, 0, "n01440764", "tench"), (3, 1, "n01443537", "goldfish"), (12, 1, "n01443537", "goldfish")]
for a, c, i, n in train: save(f"train/{i}/{i}_{a}.JPEG", 40 * a)
np.save(os.path.join(extra, "entries-TRAIN.npy"), np.array(train, dtype=dtype))
val = [(2, 1, "n01443537", "goldfish")]
for a, c, i, n in val: save(f"val/{i}/ILSVRC2012_val_{a:08d}.JPEG", 200)
np.save(os.path.join(extra, "entries-VAL.npy"), np.array(val, dtype=dtype))
test = [(1, 4294967295, "", ""), (2, 4294967295, "", "")]
for a, c, i, n in test: save(f"test/ILSVRC2012_test_{a:08d}.JPEG", 90)
np.save(os.path.join(extra, "entries-TEST.npy"), np.array(test, dtype=dtype))
"#;
        let python = std::env::var_os("DINOFLOW_VENV")
            .map(|v| PathBuf::from(v).join("bin/python3"))
            .filter(|p| p.exists())
            .unwrap_or_else(|| "python3".into());
        let status = Command::new(python)
            .args(["-c", script])
            .arg(dir.join("root"))
            .arg(dir.join("extra"))
            .status()
            .expect("the venv's python runs (source scripts/env.sh)");
        assert!(status.success(), "writing the ImageNet tree failed");
    }

    #[test]
    fn train_val_and_test_splits_read_their_entries_and_images() {
        let dir = tempfile::tempdir().unwrap();
        tiny_tree(dir.path());
        let (root, extra) = (dir.path().join("root"), dir.path().join("extra"));
        let train = ImageNet::open(&root, &extra, ImageNetSplit::Train).unwrap();
        // The entries' order, not the directory order.
        assert_eq!(train.len(), 3);
        assert_eq!(train.num_classes(), Some(2));
        assert!(train.path(0).ends_with("train/n01440764/n01440764_7.JPEG"));
        assert!(train.path(2).ends_with("train/n01443537/n01443537_12.JPEG"));
        let labels: Vec<_> = (0..3).map(|i| train.get(i).unwrap().label).collect();
        assert_eq!(labels, [Some(0), Some(1), Some(1)]);
        let s = train.get(1).unwrap();
        assert_eq!(s.image.dimensions(), (8, 6));
        let val = ImageNet::open(&root, &extra, ImageNetSplit::Val).unwrap();
        assert!(
            val.path(0)
                .ends_with("val/n01443537/ILSVRC2012_val_00000002.JPEG")
        );
        assert_eq!(val.get(0).unwrap().label, Some(1));
        let test = ImageNet::open(&root, &extra, ImageNetSplit::Test).unwrap();
        assert!(test.path(1).ends_with("test/ILSVRC2012_test_00000002.JPEG"));
        assert_eq!(test.get(1).unwrap().label, None);
        assert_eq!(test.num_classes(), None);
    }

    #[test]
    fn a_missing_or_foreign_extra_file_is_a_permanent_error_naming_extra_path() {
        let dir = tempfile::tempdir().unwrap();
        let err = ImageNet::open(dir.path(), dir.path(), ImageNetSplit::Train).unwrap_err();
        assert!(err.is_permanent(), "{err}");
        assert!(err.to_string().contains("entries-TRAIN.npy"), "{err}");
        std::fs::write(dir.path().join("entries-TRAIN.npy"), b"not numpy").unwrap();
        let err = ImageNet::open(dir.path(), dir.path(), ImageNetSplit::Train).unwrap_err();
        assert!(err.is_permanent());
        assert!(err.to_string().contains("data.extraPath"), "{err}");
    }
}
