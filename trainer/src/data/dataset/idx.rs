//! The IDX format of (Fashion-)MNIST: `<split>-images-idx3-ubyte` and
//! `<split>-labels-idx1-ubyte`, optionally gzipped (as Debian ships them).

use std::io::Read;
use std::path::{Path, PathBuf};

use image::RgbImage;

use super::{Dataset, Sample};
use crate::data::DataError;

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

#[derive(Debug)]
pub struct IdxDataset {
    path: PathBuf,
    pixels: Vec<u8>,
    count: usize,
    rows: u32,
    cols: u32,
    labels: Option<Vec<u8>>,
}

impl IdxDataset {
    /// Opens `<dir>/<split>-images-idx3-ubyte[.gz]` with its labels, or, when `path` is a file,
    /// that images file with the labels file beside it (`images-idx3` -> `labels-idx1`).
    pub fn open_split(path: &Path, split: &str) -> Result<Self, DataError> {
        if path.is_file() {
            let labels = sibling_labels(path);
            return Self::open(path, labels.as_deref());
        }
        let split = if split.is_empty() { "train" } else { split };
        let images =
            find_with_gz(path, &format!("{split}-images-idx3-ubyte")).ok_or_else(|| {
                DataError::Empty {
                    path: path.to_path_buf(),
                    detail: format!(
                        "no {split}-images-idx3-ubyte[.gz] in it (data.split must be train or t10k)"
                    ),
                }
            })?;
        let labels = find_with_gz(path, &format!("{split}-labels-idx1-ubyte"));
        Self::open(&images, labels.as_deref())
    }

    pub fn open(images: &Path, labels: Option<&Path>) -> Result<Self, DataError> {
        let data = read_maybe_gz(images)?;
        let dims = parse_header(images, &data, IMAGES_MAGIC, 3)?;
        let (count, rows, cols) = (dims[0] as usize, dims[1], dims[2]);
        let pixels = data[16..].to_vec();
        if pixels.len() != count * rows as usize * cols as usize {
            return Err(invalid(
                images,
                format!(
                    "header says {count} images of {rows}x{cols} but holds {} bytes",
                    pixels.len()
                ),
            ));
        }
        if count == 0 || rows == 0 || cols == 0 {
            return Err(DataError::Empty {
                path: images.to_path_buf(),
                detail: "the IDX header declares no images".into(),
            });
        }
        let labels = match labels {
            None => None,
            Some(lp) => {
                let ldata = read_maybe_gz(lp)?;
                let n = parse_header(lp, &ldata, LABELS_MAGIC, 1)?[0] as usize;
                if n != count || ldata.len() != 8 + n {
                    return Err(invalid(
                        lp,
                        format!(
                            "{} labels for {count} images",
                            ldata.len().saturating_sub(8)
                        ),
                    ));
                }
                Some(ldata[8..].to_vec())
            }
        };
        Ok(Self {
            path: images.to_path_buf(),
            pixels,
            count,
            rows,
            cols,
            labels,
        })
    }
}

fn invalid(path: &Path, reason: String) -> DataError {
    DataError::InvalidIdx {
        path: path.to_path_buf(),
        reason,
    }
}

fn find_with_gz(dir: &Path, stem: &str) -> Option<PathBuf> {
    [stem.to_string(), format!("{stem}.gz")]
        .into_iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
}

fn sibling_labels(images: &Path) -> Option<PathBuf> {
    let name = images
        .file_name()?
        .to_string_lossy()
        .replace("images-idx3", "labels-idx1");
    let p = images.with_file_name(name);
    p.is_file().then_some(p)
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&raw[..])
        .read_to_end(&mut out)
        .map_err(|e| invalid(path, format!("broken gzip stream: {e}")))?;
    Ok(out)
}

/// Checks the magic (unsigned bytes, `ndims` dimensions) and returns the big-endian sizes.
fn parse_header(path: &Path, data: &[u8], magic: u32, ndims: usize) -> Result<Vec<u32>, DataError> {
    let need = 4 + 4 * ndims;
    if data.len() < need {
        return Err(invalid(
            path,
            format!("file of {} bytes is shorter than its header", data.len()),
        ));
    }
    let word = |i: usize| {
        u32::from_be_bytes([
            data[4 * i],
            data[4 * i + 1],
            data[4 * i + 2],
            data[4 * i + 3],
        ])
    };
    if word(0) != magic {
        return Err(invalid(
            path,
            format!("magic {:#010x}, expected {magic:#010x}", word(0)),
        ));
    }
    Ok((1..=ndims).map(word).collect())
}

impl Dataset for IdxDataset {
    fn len(&self) -> usize {
        self.count
    }

    fn get(&self, index: usize) -> Result<Sample, DataError> {
        let n = (self.rows * self.cols) as usize;
        let gray = &self.pixels[index * n..(index + 1) * n];
        // Grayscale to RGB by replication, as Pillow's convert("RGB") from mode "L".
        let rgb = gray.iter().flat_map(|&v| [v, v, v]).collect();
        let image =
            RgbImage::from_raw(self.cols, self.rows, rgb).expect("buffer sized from the header");
        Ok(Sample {
            image,
            label: self.labels.as_ref().map(|l| u32::from(l[index])),
        })
    }

    fn num_classes(&self) -> Option<usize> {
        self.labels
            .as_ref()
            .map(|l| l.iter().copied().max().map_or(0, |m| m as usize + 1))
    }

    fn describe(&self) -> String {
        format!("IDX file {}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn idx_images(n: u32, rows: u32, cols: u32) -> Vec<u8> {
        let mut v = Vec::new();
        for w in [IMAGES_MAGIC, n, rows, cols] {
            v.extend(w.to_be_bytes());
        }
        v.extend((0..n * rows * cols).map(|i| (i % 251) as u8));
        v
    }

    fn idx_labels(labels: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(LABELS_MAGIC.to_be_bytes());
        v.extend((labels.len() as u32).to_be_bytes());
        v.extend(labels);
        v
    }

    #[test]
    fn gzipped_images_and_labels_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&idx_images(3, 4, 5)).unwrap();
        std::fs::write(
            dir.path().join("t10k-images-idx3-ubyte.gz"),
            gz.finish().unwrap(),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("t10k-labels-idx1-ubyte"),
            idx_labels(&[7, 1, 9]),
        )
        .unwrap();
        let ds = IdxDataset::open_split(dir.path(), "t10k").unwrap();
        assert_eq!(ds.len(), 3);
        assert_eq!(ds.num_classes(), Some(10));
        let s = ds.get(1).unwrap();
        assert_eq!(s.label, Some(1));
        assert_eq!(s.image.dimensions(), (5, 4));
        assert_eq!(s.image.get_pixel(0, 0).0, [20, 20, 20]);
    }

    #[test]
    fn a_wrong_magic_or_short_file_is_an_invalid_idx_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x-images-idx3-ubyte");
        std::fs::write(&p, idx_labels(&[1, 2])).unwrap();
        assert!(matches!(
            IdxDataset::open(&p, None),
            Err(DataError::InvalidIdx { .. })
        ));
        let mut short = idx_images(3, 4, 5);
        short.truncate(30);
        std::fs::write(&p, short).unwrap();
        let err = IdxDataset::open(&p, None).unwrap_err();
        assert!(
            err.is_permanent() && err.to_string().contains("bytes"),
            "{err}"
        );
    }

    #[test]
    fn the_debian_fashion_mnist_package_reads_when_installed() {
        let dir = Path::new("/usr/share/datasets/fashion-mnist");
        if !dir.is_dir() {
            eprintln!("dataset-fashion-mnist not installed; skipping");
            return;
        }
        let ds = IdxDataset::open_split(dir, "t10k").unwrap();
        assert_eq!(ds.len(), 10_000);
        assert_eq!(ds.num_classes(), Some(10));
        assert_eq!(ds.get(0).unwrap().image.dimensions(), (28, 28));
    }
}
