//! Flat units: the student's parameters grouped as the official FSDP wrapping groups them,
//! and the slice of each unit a rank owns.

use tch::{Kind, Tensor};

use super::{ParallelConfig, Sharding};

/// Parameters flattened together and reduced as one buffer (one FSDP `FlatParameter`).
#[derive(Debug)]
pub struct Unit {
    /// `backbone` (patch embedding, tokens, norm and, without chunks, the blocks),
    /// `backbone.chunk<c>`, `dino_head`, `ibot_head`.
    pub name: String,
    /// The student sub-module the unit belongs to (clipping is per sub-module).
    pub submodule: &'static str,
    pub sharding: Sharding,
    pub reduce_kind: Kind,
    /// Student variable names (`backbone.blocks.0.attn.qkv.weight`) and the variables.
    pub params: Vec<(String, Tensor)>,
    /// Start of each parameter in the flattened unit.
    pub offsets: Vec<i64>,
    /// Elements of all parameters together (before padding).
    pub numel: i64,
    /// Elements this rank owns: `ceil(numel / W)` sharded, `numel` replicated.
    pub shard_len: i64,
    /// Start of this rank's slice in the flattened, padded unit.
    pub shard_start: i64,
}

/// The part of one parameter inside this rank's slice of a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Index into [`Unit::params`].
    pub param: usize,
    /// First element of the piece in the flattened parameter.
    pub start: i64,
    pub len: i64,
    /// First element of the piece in this rank's slice.
    pub at: i64,
}

impl Unit {
    /// Padded length of the flattened unit (a multiple of the world size when sharded, so
    /// every rank's slice has the same length; the padding is zeros and never updated).
    pub fn padded(&self, world: usize) -> i64 {
        match self.sharding {
            Sharding::NoShard => self.numel,
            Sharding::ShardGradOp => self.shard_len * world as i64,
        }
    }

    /// The pieces of parameters in this rank's slice, in flat order.
    pub fn pieces(&self) -> Vec<Piece> {
        let (lo, hi) = (self.shard_start, self.shard_start + self.shard_len);
        let mut out = Vec::new();
        for (i, (_, p)) in self.params.iter().enumerate() {
            let (a, b) = (self.offsets[i], self.offsets[i] + p.numel() as i64);
            let (s, e) = (a.max(lo), b.min(hi));
            if s < e {
                out.push(Piece {
                    param: i,
                    start: s - a,
                    len: e - s,
                    at: s - lo,
                });
            }
        }
        out
    }
}

/// Which unit a backbone variable belongs to: its block chunk (official `BlockChunk`, the
/// wrapped module) or the backbone's root unit.
fn backbone_unit(key: &str, depth: i64, block_chunks: u32) -> String {
    if block_chunks == 0 {
        return "backbone".into();
    }
    // The official chunking: chunks of `depth // block_chunks` consecutive blocks.
    let chunk_size = (depth / i64::from(block_chunks)).max(1);
    key.strip_prefix("backbone.blocks.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|i| i.parse::<i64>().ok())
        .map_or_else(
            || "backbone".into(),
            |i| format!("backbone.chunk{}", i / chunk_size),
        )
}

/// Groups the student's variables (per sub-module, sorted by name) into units, and places
/// rank `rank`'s slice in each. Deterministic, so every rank computes the same layout.
pub fn plan_units(
    submodules: &[(&'static str, Vec<(String, Tensor)>)],
    depth: i64,
    cfg: &ParallelConfig,
    rank: usize,
    world: usize,
) -> Vec<Unit> {
    let mut units: Vec<Unit> = Vec::new();
    for (sub, vars) in submodules {
        let m = cfg.module(sub);
        for (key, var) in vars {
            let name = if *sub == "backbone" {
                backbone_unit(key, depth, cfg.block_chunks)
            } else {
                (*sub).to_string()
            };
            let idx = match units.iter().position(|u| u.name == name) {
                Some(i) => i,
                None => {
                    units.push(Unit {
                        name,
                        submodule: sub,
                        sharding: m.sharding,
                        reduce_kind: m.reduce_kind,
                        params: Vec::new(),
                        offsets: Vec::new(),
                        numel: 0,
                        shard_len: 0,
                        shard_start: 0,
                    });
                    units.len() - 1
                }
            };
            let u = &mut units[idx];
            u.offsets.push(u.numel);
            u.numel += var.numel() as i64;
            u.params.push((key.clone(), var.shallow_clone()));
        }
    }
    for u in &mut units {
        match u.sharding {
            Sharding::NoShard => u.shard_len = u.numel,
            Sharding::ShardGradOp => {
                let w = world as i64;
                u.shard_len = (u.numel + w - 1) / w;
                u.shard_start = rank as i64 * u.shard_len;
            }
        }
    }
    units
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::ModuleParallel;

    fn vars(names: &[(&str, i64)]) -> Vec<(String, Tensor)> {
        names
            .iter()
            .map(|(n, len)| {
                (
                    n.to_string(),
                    Tensor::zeros([*len], (Kind::Float, tch::Device::Cpu)),
                )
            })
            .collect()
    }

    fn sharded(block_chunks: u32) -> ParallelConfig {
        let m = ModuleParallel {
            sharding: Sharding::ShardGradOp,
            reduce_kind: Kind::Float,
        };
        ParallelConfig {
            backbone: m,
            dino_head: m,
            ibot_head: m,
            block_chunks,
        }
    }

    fn backbone() -> Vec<(&'static str, Vec<(String, Tensor)>)> {
        vec![
            (
                "backbone",
                vars(&[
                    ("backbone.blocks.0.w", 3),
                    ("backbone.blocks.1.w", 3),
                    ("backbone.blocks.2.w", 3),
                    ("backbone.blocks.3.w", 3),
                    ("backbone.cls_token", 2),
                ]),
            ),
            ("dino_head", vars(&[("dino_head.a", 5)])),
        ]
    }

    #[test]
    fn block_chunks_group_consecutive_blocks_as_the_official_block_chunk_modules() {
        let names = |u: &[Unit]| u.iter().map(|u| u.name.clone()).collect::<Vec<_>>();
        let units = plan_units(&backbone(), 4, &sharded(0), 0, 2);
        assert_eq!(names(&units), ["backbone", "dino_head"]);
        assert_eq!(units[0].numel, 14);
        let units = plan_units(&backbone(), 4, &sharded(2), 0, 2);
        assert_eq!(
            names(&units),
            [
                "backbone.chunk0",
                "backbone.chunk1",
                "backbone",
                "dino_head"
            ]
        );
        assert_eq!(units[0].params.len(), 2);
        // depth 4, 3 chunks: chunks of 4 // 3 = 1 block, as the official code (4 units).
        let units = plan_units(&backbone(), 4, &sharded(3), 0, 2);
        assert_eq!(units.len(), 6);
    }

    #[test]
    fn the_slices_of_all_ranks_tile_the_padded_unit_exactly_once() {
        for world in [1usize, 2, 3, 4, 5] {
            let mut covered = vec![0u32; 14];
            for rank in 0..world {
                let units = plan_units(&backbone(), 4, &sharded(0), rank, world);
                let u = &units[0];
                assert_eq!(u.padded(world) % world as i64, 0);
                assert!(u.padded(world) - u.numel < world as i64, "padding < W");
                let mut at = 0;
                for p in u.pieces() {
                    assert_eq!(p.at, at, "pieces are contiguous in the slice");
                    at += p.len;
                    for k in 0..p.len {
                        covered[(u.offsets[p.param] + p.start + k) as usize] += 1;
                    }
                }
                assert!(at <= u.shard_len);
            }
            assert!(covered.iter().all(|&c| c == 1), "W={world}: {covered:?}");
        }
    }
}
