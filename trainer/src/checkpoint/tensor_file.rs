//! Writes a checkpoint's tensor group as a `.safetensors` file through `std::fs`, so a failed
//! write keeps its `io::ErrorKind` (a full disk is recognised by kind, not by message text;
//! `tch`'s writer flattens the I/O error into a string). Files are read back with `tch`.
use std::borrow::Cow;
use std::path::Path;

use safetensors::SafeTensorError;
use safetensors::tensor::{Dtype, View};
use tch::{Kind, Tensor};

use super::CheckpointError;

/// One host tensor as safetensors sees it.
struct HostTensor {
    tensor: Tensor,
    dtype: Dtype,
    shape: Vec<usize>,
}

impl View for &HostTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let mut buf = vec![0u8; self.data_len()];
        self.tensor.copy_data_u8(&mut buf, self.tensor.numel());
        Cow::Owned(buf)
    }

    fn data_len(&self) -> usize {
        self.tensor.numel() * self.tensor.kind().elt_size_in_bytes()
    }
}

fn dtype(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

/// Writes `tensors` (any device) to `path`.
pub(super) fn write(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), CheckpointError> {
    let mut host = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        // safetensors serialises host memory: a contiguous CPU copy of every tensor.
        let tensor = t.to_device(tch::Device::Cpu).contiguous();
        let dtype = dtype(tensor.kind()).ok_or_else(|| CheckpointError::Unsupported {
            path: path.to_path_buf(),
            name: name.clone(),
            kind: tensor.kind(),
        })?;
        let shape = tensor.size().iter().map(|&d| d as usize).collect();
        host.push((
            name.as_str(),
            HostTensor {
                tensor,
                dtype,
                shape,
            },
        ));
    }
    let views = host.iter().map(|(name, t)| (*name, t));
    safetensors::serialize_to_file(views, None, path).map_err(|e| match e {
        SafeTensorError::IoError(source) => CheckpointError::io(path, source),
        other => CheckpointError::Serialize {
            path: path.to_path_buf(),
            source: other,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_group_reads_back_bitwise_with_tch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.safetensors");
        let tensors = vec![
            (
                "a".to_string(),
                Tensor::from_slice(&[1.5f32, -2.0]).view([2, 1]),
            ),
            ("b".to_string(), Tensor::from_slice(&[7i64])),
            (
                "c".to_string(),
                Tensor::from_slice(&[0.25f64]).to_kind(Kind::BFloat16),
            ),
        ];
        write(&path, &tensors).unwrap();
        let back: std::collections::BTreeMap<_, _> = Tensor::read_safetensors(&path)
            .unwrap()
            .into_iter()
            .collect();
        for (name, t) in &tensors {
            let u = &back[name];
            assert_eq!((u.kind(), u.size()), (t.kind(), t.size()), "{name}");
            assert!(u.equal(t), "{name}");
        }
    }

    #[test]
    fn a_failed_write_keeps_its_io_error_kind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing/g.safetensors");
        let err = write(&path, &[("a".into(), Tensor::from_slice(&[1.0f32]))]).unwrap_err();
        assert!(
            matches!(&err, CheckpointError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound),
            "{err:?}"
        );
    }
}
