//! The unit of a sharded checkpoint: a contiguous run of one tensor's flattened elements.
//!
//! Like torch.distributed.checkpoint, a sharded run saves, per rank, the pieces of each named
//! tensor that rank owns (its flat shard of a sharding unit intersects some parameters), and a
//! resume on another world size or sharding reads back whatever ranges its new layout needs,
//! assembled from the pieces of any old ranks. A replicated tensor is one chunk covering it.
use tch::Tensor;

use super::CheckpointError;

/// Elements `[offset, offset + data.numel())` of the full tensor `name` (shape `shape`),
/// flattened in row-major order.
#[derive(Debug)]
pub struct Chunk {
    pub name: String,
    /// Shape of the whole tensor, not of this chunk.
    pub shape: Vec<i64>,
    /// Start of this chunk in the flattened whole tensor.
    pub offset: i64,
    /// 1-D, contiguous.
    pub data: Tensor,
}

/// Reads any range of any saved tensor, whichever ranks saved its pieces.
pub trait ChunkSource {
    /// Elements `[offset, offset + len)` of the flattened tensor `name` as a 1-D tensor; an
    /// error names the tensor and range when the saved pieces do not cover it.
    fn read(&self, name: &str, offset: i64, len: i64) -> Result<Tensor, CheckpointError>;

    /// The whole-tensor shape saved for `name`, if it was saved.
    fn shape(&self, name: &str) -> Option<Vec<i64>>;
}
