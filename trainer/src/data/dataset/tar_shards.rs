//! WebDataset-style tar shards: `<key>.jpg|png|webp` with an optional `<key>.cls` (the class
//! index as text). The key is the member path up to the first dot of its file name.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{Dataset, Sample, is_image_name};
use crate::data::DataError;
use crate::data::decode::decode_rgb;

#[derive(Debug)]
struct Member {
    shard: usize,
    offset: u64,
    size: u64,
    key: String,
    label: Option<u32>,
}

#[derive(Debug)]
pub struct TarShards {
    root: PathBuf,
    shards: Vec<(PathBuf, File)>,
    members: Vec<Member>,
    truncated_shards: usize,
}

impl TarShards {
    /// Indexes one `.tar` file, or every `.tar` file of a folder (sorted by name). A shard cut
    /// short contributes the members complete before the cut; the loss is logged.
    pub fn open(path: &Path) -> Result<Self, DataError> {
        let meta = std::fs::metadata(path).map_err(|e| DataError::io(path, e))?;
        let mut paths = if meta.is_dir() {
            std::fs::read_dir(path)
                .map_err(|e| DataError::io(path, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "tar"))
                .collect()
        } else {
            vec![path.to_path_buf()]
        };
        paths.sort();
        let mut out = Self {
            root: path.to_path_buf(),
            shards: Vec::new(),
            members: Vec::new(),
            truncated_shards: 0,
        };
        for shard_path in paths {
            out.index_shard(shard_path)?;
        }
        if out.members.is_empty() {
            return Err(DataError::Empty {
                path: path.to_path_buf(),
                detail: "no readable <key>.jpg/.png/.webp members in its tar shards".into(),
            });
        }
        Ok(out)
    }

    /// Shards that ended before their end-of-archive marker.
    pub fn truncated_shards(&self) -> usize {
        self.truncated_shards
    }

    fn index_shard(&mut self, path: PathBuf) -> Result<(), DataError> {
        let file = File::open(&path).map_err(|e| DataError::io(&path, e))?;
        let file_len = file.metadata().map_err(|e| DataError::io(&path, e))?.len();
        let shard = self.shards.len();
        let mut images: Vec<Member> = Vec::new();
        let mut labels: HashMap<String, u32> = HashMap::new();
        let mut archive = tar::Archive::new(&file);
        let mut cut: Option<String> = None;
        let entries = archive
            .entries_with_seek()
            .map_err(|e| DataError::io(&path, e))?;
        for entry in entries {
            let mut entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    cut = Some(e.to_string());
                    break;
                }
            };
            let (offset, size) = (entry.raw_file_position(), entry.size());
            if offset + size > file_len {
                cut = Some(format!(
                    "member data ends at byte {} but the file has {file_len}",
                    offset + size
                ));
                break;
            }
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let Some(key) = webdataset_key(&name) else {
                continue;
            };
            if name.to_ascii_lowercase().ends_with(".cls") {
                let mut text = String::new();
                if entry.read_to_string(&mut text).is_ok()
                    && let Ok(label) = text.trim().parse::<u32>()
                {
                    labels.insert(key, label);
                } else {
                    tracing::warn!(shard = %path.display(), member = %name, "ignoring a .cls member that is not a class index");
                }
            } else if is_image_name(&name) {
                images.push(Member {
                    shard,
                    offset,
                    size,
                    key,
                    label: None,
                });
            }
        }
        if let Some(reason) = cut {
            self.truncated_shards += 1;
            tracing::warn!(
                shard = %path.display(),
                readable_images = images.len(),
                reason = %reason,
                "tar shard is cut short; using the members before the cut, the rest is lost",
            );
        }
        for member in &mut images {
            member.label = labels.get(&member.key).copied();
        }
        self.members.extend(images);
        self.shards.push((path, file));
        Ok(())
    }
}

/// WebDataset's key: directory plus the file name up to its first dot.
fn webdataset_key(name: &str) -> Option<String> {
    let (dir, base) = name.rsplit_once('/').map_or(("", name), |(d, b)| (d, b));
    let stem = base.split('.').next().filter(|s| !s.is_empty())?;
    Some(if dir.is_empty() {
        stem.to_string()
    } else {
        format!("{dir}/{stem}")
    })
}

impl Dataset for TarShards {
    fn len(&self) -> usize {
        self.members.len()
    }

    fn get(&self, index: usize) -> Result<Sample, DataError> {
        let m = &self.members[index];
        let (path, file) = &self.shards[m.shard];
        let what = format!("{}:{}", path.display(), m.key);
        let mut bytes = vec![0; m.size as usize];
        // Positional reads: the workers share one handle per shard without locking.
        file.read_exact_at(&mut bytes, m.offset)
            .map_err(|e| DataError::io(path, e))?;
        Ok(Sample {
            image: decode_rgb(&bytes, &what)?,
            label: m.label,
        })
    }

    fn num_classes(&self) -> Option<usize> {
        self.members
            .iter()
            .filter_map(|m| m.label)
            .max()
            .map(|max| max as usize + 1)
    }

    fn describe(&self) -> String {
        format!("tar shards {}", self.root.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::decode::tests::encoded;
    use image::ImageFormat;

    fn add(builder: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, data).unwrap();
    }

    fn shard(n: usize) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for i in 0..n {
            add(
                &mut b,
                &format!("s/{i:04}.jpg"),
                &encoded(16 + i as u32, 12, ImageFormat::Jpeg),
            );
            if i % 2 == 0 {
                add(
                    &mut b,
                    &format!("s/{i:04}.cls"),
                    format!("{}\n", i % 3).as_bytes(),
                );
            }
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn images_pair_with_their_cls_labels() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.tar"), shard(4)).unwrap();
        let ds = TarShards::open(dir.path()).unwrap();
        assert_eq!(ds.len(), 4);
        assert_eq!(ds.truncated_shards(), 0);
        let labels: Vec<_> = (0..4).map(|i| ds.get(i).unwrap().label).collect();
        assert_eq!(labels, [Some(0), None, Some(2), None]);
        assert_eq!(ds.get(3).unwrap().image.dimensions(), (19, 12));
        assert_eq!(ds.num_classes(), Some(3));
    }

    #[test]
    fn a_shard_cut_short_keeps_the_members_before_the_cut() {
        let dir = tempfile::tempdir().unwrap();
        let full = shard(6);
        let path = dir.path().join("cut.tar");
        std::fs::write(&path, &full[..full.len() * 2 / 3]).unwrap();
        let ds = TarShards::open(&path).unwrap();
        assert_eq!(ds.truncated_shards(), 1);
        assert!(ds.len() >= 2 && ds.len() < 6, "kept {}", ds.len());
        for i in 0..ds.len() {
            ds.get(i).unwrap();
        }
    }

    #[test]
    fn a_shard_without_images_is_an_empty_dataset() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        add(&mut b, "x.txt", b"hello");
        std::fs::write(dir.path().join("a.tar"), b.into_inner().unwrap()).unwrap();
        let err = TarShards::open(dir.path()).unwrap_err();
        assert!(
            matches!(err, DataError::Empty { .. }) && err.is_permanent(),
            "{err}"
        );
    }

    #[test]
    fn webdataset_keys_stop_at_the_first_dot_of_the_file_name() {
        assert_eq!(
            webdataset_key("a/b.c/x.seg.jpg").as_deref(),
            Some("a/b.c/x")
        );
        assert_eq!(webdataset_key("k.cls").as_deref(), Some("k"));
        assert_eq!(webdataset_key(".hidden"), None);
    }
}
