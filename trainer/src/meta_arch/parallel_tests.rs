//! Sharded against replicated training on CPU over TCP: the same global batch split over W
//! ranks gives W=1's losses and weights, and SHARD_GRAD_OP holds 1/W of the gradient and
//! optimizer state.

use std::sync::{Arc, Mutex};

use tch::{Device, Kind, Tensor};

use super::test_support::{tiny_config, values};
use super::{MetaArch, MetaArchConfig, SslBatch, TargetSource};
use crate::dist::tcp::tests::{local_group, on_every_rank};
use crate::dist::{Collective, Single};
use crate::parallel::{MemoryBytes, ModuleParallel, ParallelConfig, Sharding};

pub(crate) const GLOBAL_BATCH: i64 = 4;
const ITERATIONS: usize = 6;
/// Largest |difference| allowed between W=1 and W>1 (fp32): the objective at every iteration,
/// and every final student and teacher weight. Measured (6 iterations, W=2 and 4, every
/// layout below): losses within 7.2e-7, weights within 6.4e-7 (a few fp32 ulps: sums over
/// ranks and the sharded global norm round differently). The bounds leave ~3x margin.
pub(crate) const LOSS_TOL: f64 = 2e-6;
pub(crate) const WEIGHT_TOL: f64 = 2e-6;

pub(crate) fn config(parallel: ParallelConfig) -> MetaArchConfig {
    let mut cfg = tiny_config();
    // Stochastic depth draws per sample from the global generator, and KoLeo is a per-rank
    // quantity by definition (nearest neighbours within the rank's own batch, as in the
    // reference), so neither can be compared across world sizes.
    cfg.student.drop_path_rate = 0.0;
    cfg.koleo_loss_weight = 0.0;
    cfg.parallel = parallel;
    cfg
}

pub(crate) fn layout(sharding: Sharding, block_chunks: u32) -> ParallelConfig {
    let m = ModuleParallel {
        sharding,
        reduce_kind: Kind::Float,
    };
    ParallelConfig {
        backbone: m,
        dino_head: m,
        ibot_head: m,
        block_chunks,
    }
}

/// A small deterministic generator, independent of torch's global one.
struct Lcg(u64);

impl Lcg {
    /// Uniform values in `[-scale, scale)`.
    fn tensor(&mut self, shape: &[i64], scale: f64) -> Tensor {
        let n: i64 = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (((self.0 >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) * scale) as f32
            })
            .collect();
        Tensor::from_slice(&v).reshape(shape)
    }
}

/// A model whose initial weights do not depend on torch's global generator: every variable
/// the init draws at random is redrawn from a local generator (constants such as LayerNorm
/// weights and zero biases stay), and the teacher copies the student.
pub(crate) fn new_arch(cfg: MetaArchConfig) -> MetaArch {
    let arch = MetaArch::new(cfg, Device::Cpu).unwrap();
    let mut rng = Lcg(7);
    let mut vars: Vec<(String, Tensor)> = arch.student.vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (_, v) in &vars {
            let constant = v.numel() < 2 || (v.max() - v.min()).double_value(&[]) == 0.0;
            if !constant {
                v.detach().copy_(&rng.tensor(&v.size(), 0.1));
            }
        }
    });
    super::copy_weights(&arch.teacher.vs, &arch.student.vs);
    arch
}

/// Images `[lo, lo + n)` of the fixed global batch of iteration `it`, collated.
pub(crate) fn batch(it: usize, lo: i64, n: i64) -> SslBatch {
    // From a local generator, not torch's global one, which tests on other threads share.
    let mut rng = Lcg(1000 + it as u64);
    let g = rng.tensor(&[2, GLOBAL_BATCH, 3, 56, 56], 1.0);
    let l = rng.tensor(&[2, GLOBAL_BATCH, 3, 28, 28], 1.0);
    // Exactly 4 masked patches per crop: the iBOT patch center divides the all-reduced sum
    // by (this rank's count × W), as the reference does, which is the global mean only when
    // every rank masks as many patches.
    let m = rng
        .tensor(&[2, GLOBAL_BATCH, 16], 1.0)
        .argsort(-1, false)
        .argsort(-1, false)
        .lt(4);
    let masks = m.narrow(1, lo, n).reshape([2 * n, 16]);
    let indices = masks.flatten(0, -1).nonzero().squeeze_dim(1);
    let count = masks.sum_dim_intlist(-1, false, Kind::Float).clamp_min(1.0);
    let weight = count.reciprocal().unsqueeze(-1).expand([2 * n, 16], false);
    let masks_weight = weight.masked_select(&masks);
    let k = indices.size()[0];
    SslBatch {
        global_crops: g.narrow(1, lo, n).reshape([2 * n, 3, 56, 56]),
        local_crops: l.narrow(1, lo, n).reshape([2 * n, 3, 28, 28]),
        masks,
        mask_indices_list: indices,
        masks_weight,
        n_masked_patches: k,
        upperbound: k + 5,
    }
}

struct Run {
    /// Objective per iteration (mean over ranks, as logged).
    losses: Vec<f64>,
    /// Final student and teacher variables.
    weights: Vec<(String, Tensor)>,
    memory: MemoryBytes,
}

fn train(cfg: MetaArchConfig, collective: &dyn Collective) -> Run {
    let (rank, world) = (collective.rank(), collective.world_size() as i64);
    let mut arch = new_arch(cfg);
    let per_rank = GLOBAL_BATCH / world;
    let mut losses = Vec::new();
    for it in 0..ITERATIONS {
        let b = batch(it, rank as i64 * per_rank, per_rank);
        let out = arch
            .train_step(&b, &values(), collective, TargetSource::Ema)
            .unwrap();
        losses.push(out.read(collective).losses.objective);
    }
    let mut weights = Vec::new();
    for (group, vs) in [("student", &arch.student.vs), ("teacher", &arch.teacher.vs)] {
        for (k, v) in vs.variables() {
            weights.push((format!("{group}.{k}"), v.detach().copy()));
        }
    }
    weights.sort_by(|a, b| a.0.cmp(&b.0));
    Run {
        losses,
        weights,
        memory: arch.memory_bytes(),
    }
}

fn train_on(world: usize, cfg: MetaArchConfig) -> Vec<Run> {
    let group = local_group(world);
    let cfg = Arc::new(cfg);
    on_every_rank(&group, move |_, c| train((*cfg).clone(), c))
}

pub(crate) fn max_diff(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|((ka, ta), (kb, tb))| {
            assert_eq!(ka, kb);
            (ta - tb).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}

#[test]
fn sharded_and_replicated_runs_match_a_single_rank() {
    tch::set_num_threads(1);
    let reference = train(config(layout(Sharding::NoShard, 0)), &Single);
    assert!(reference.losses.iter().all(|l| l.is_finite()));
    let cases = [
        ("NO_SHARD", layout(Sharding::NoShard, 0)),
        ("SHARD_GRAD_OP", layout(Sharding::ShardGradOp, 0)),
        (
            "SHARD_GRAD_OP, blockChunks 2",
            layout(Sharding::ShardGradOp, 2),
        ),
        ("SHARD_GRAD_OP backbone, NO_SHARD heads", {
            let mut p = layout(Sharding::ShardGradOp, 1);
            p.dino_head.sharding = Sharding::NoShard;
            p
        }),
    ];
    for world in [2usize, 4] {
        for (name, parallel) in &cases {
            let runs = train_on(world, config(*parallel));
            let loss_diff = runs[0]
                .losses
                .iter()
                .zip(&reference.losses)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            let weight_diff = max_diff(&runs[0].weights, &reference.weights);
            eprintln!(
                "W={world} {name}: max |Δloss| {loss_diff:.3e}, max |Δweight| {weight_diff:.3e}, losses {:?} vs {:?}",
                runs[0].losses, reference.losses
            );
            assert!(
                loss_diff <= LOSS_TOL,
                "W={world} {name}: losses differ by {loss_diff}"
            );
            assert!(
                weight_diff <= WEIGHT_TOL,
                "W={world} {name}: weights differ by {weight_diff}"
            );
            for (r, run) in runs.iter().enumerate().skip(1) {
                assert_eq!(
                    run.losses, runs[0].losses,
                    "W={world} {name}: rank {r}'s losses"
                );
                assert_eq!(
                    max_diff(&run.weights, &runs[0].weights),
                    0.0,
                    "W={world} {name}: rank {r}'s replica"
                );
            }
        }
    }
}

#[test]
fn shard_grad_op_holds_a_quarter_of_the_gradient_and_optimizer_state_at_four_ranks() {
    tch::set_num_threads(1);
    let replicated = train_on(4, config(layout(Sharding::NoShard, 0)));
    let sharded = train_on(4, config(layout(Sharding::ShardGradOp, 2)));
    let full = replicated[0].memory.total();
    assert!(full > 0);
    for (r, run) in sharded.iter().enumerate() {
        let mine = run.memory.total() as f64;
        eprintln!(
            "rank {r}: SHARD_GRAD_OP {} B ({} grad + {} optimizer) vs NO_SHARD {full} B: {:.4}",
            run.memory.total(),
            run.memory.gradients,
            run.memory.optimizer_state,
            mine / full as f64
        );
        assert!(
            mine <= full as f64 / 4.0 * 1.05,
            "rank {r}: {mine} B vs {full} B replicated"
        );
    }
    for run in &replicated {
        assert_eq!(run.memory.total(), full, "every replica holds everything");
    }
}

/// Records the dtype and length of every tensor summed (a [`Replicated`] group of 2).
struct Recording {
    inner: crate::dist::tests::Replicated,
    seen: Mutex<Vec<(Kind, i64)>>,
}

impl Collective for Recording {
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn rank(&self) -> usize {
        0
    }
    fn all_reduce_sum(&self, t: &mut Tensor) {
        self.seen.lock().unwrap().push((t.kind(), t.numel() as i64));
        self.inner.all_reduce_sum(t);
    }
}

#[test]
fn gradients_travel_in_each_sub_modules_reduce_dtype() {
    for sharding in [Sharding::NoShard, Sharding::ShardGradOp] {
        let mut parallel = layout(sharding, 0);
        parallel.backbone.reduce_kind = Kind::BFloat16;
        parallel.dino_head.reduce_kind = Kind::Half;
        let mut arch = MetaArch::new(config(parallel), Device::Cpu).unwrap();
        let numel = |m: &str| -> i64 {
            arch.student
                .submodule_variables(m)
                .iter()
                .map(|(_, v)| v.numel() as i64)
                .sum()
        };
        let (backbone, head) = (numel("backbone"), numel("dino_head"));
        let group = Recording {
            inner: crate::dist::tests::Replicated::new(2),
            seen: Mutex::new(Vec::new()),
        };
        arch.train_step(&batch(0, 0, 2), &values(), &group, TargetSource::Ema)
            .unwrap();
        let seen = group.seen.into_inner().unwrap();
        // Sharded units are padded to a multiple of W = 2.
        let padded = |n: i64| {
            if sharding == Sharding::ShardGradOp {
                n + n % 2
            } else {
                n
            }
        };
        assert!(
            seen.contains(&(Kind::BFloat16, padded(backbone))),
            "{sharding:?}: {seen:?}"
        );
        assert!(
            seen.contains(&(Kind::Half, padded(head))),
            "{sharding:?}: {seen:?}"
        );
        let weights = arch.student.vs.variables();
        assert!(
            weights
                .values()
                .all(|w| w.kind() == Kind::Float && w.isfinite().all().int64_value(&[]) == 1)
        );
    }
}

/// Saved chunks of any ranks, read back by range.
#[derive(Default)]
struct MemorySource(Vec<crate::checkpoint::Chunk>);

impl crate::checkpoint::ChunkSource for MemorySource {
    fn read(
        &self,
        name: &str,
        offset: i64,
        len: i64,
    ) -> Result<Tensor, crate::checkpoint::CheckpointError> {
        let out = Tensor::full([len], f64::NAN, (Kind::Double, Device::Cpu));
        let mut kind = Kind::Float;
        for c in self.0.iter().filter(|c| c.name == name) {
            kind = c.data.kind();
            let (a, b) = (
                c.offset.max(offset),
                (c.offset + c.data.numel() as i64).min(offset + len),
            );
            if a < b {
                out.narrow(0, a - offset, b - a)
                    .copy_(&c.data.narrow(0, a - c.offset, b - a).to_kind(Kind::Double));
            }
        }
        if out.isnan().any().int64_value(&[]) == 1 {
            return Err(crate::checkpoint::CheckpointError::Corrupt {
                path: name.into(),
                reason: format!("[{offset}, {}) not covered", offset + len),
            });
        }
        Ok(out.to_kind(kind))
    }

    fn shape(&self, name: &str) -> Option<Vec<i64>> {
        self.0
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.shape.clone())
    }
}

/// The full tensor `name` assembled from `source`.
fn full(source: &MemorySource, name: &str) -> Tensor {
    use crate::checkpoint::ChunkSource;
    let shape = source.shape(name).unwrap();
    let n: i64 = shape.iter().product();
    source.read(name, 0, n).unwrap()
}

#[test]
fn sharded_state_round_trips_through_chunks_into_any_world_size() {
    tch::set_num_threads(1);
    let cfg = config(layout(Sharding::ShardGradOp, 2));
    let group = local_group(2);
    let cfg2 = cfg.clone();
    let saved = on_every_rank(&group, move |_, c| {
        let mut arch = new_arch(cfg2.clone());
        for it in 0..2 {
            let b = batch(it, c.rank() as i64 * 2, 2);
            arch.train_step(&b, &values(), c, TargetSource::Ema)
                .unwrap();
        }
        arch.sharded.as_ref().unwrap().chunks()
    });
    let source = MemorySource(saved.into_iter().flatten().collect());
    let names: Vec<String> = source.0.iter().map(|c| c.name.clone()).collect();
    assert!(
        names.iter().any(|n| n.ends_with(".exp_avg_sq"))
            && names.iter().any(|n| n.ends_with(".step"))
    );
    for world in [2usize, 3, 4] {
        let mut again = Vec::new();
        for rank in 0..world {
            let mut arch = MetaArch::new(cfg.clone(), Device::Cpu).unwrap();
            arch.prepare_parallel(rank, world).unwrap();
            let sharded = arch.sharded.as_mut().unwrap();
            sharded.load_chunks(&source).unwrap();
            for (k, v) in arch.student.vs.variables() {
                assert!(
                    v.reshape([-1])
                        .equal(&full(&source, &format!("student/{k}"))),
                    "W={world}: {k}"
                );
            }
            again.extend(arch.sharded.as_ref().unwrap().chunks());
        }
        let again = MemorySource(again);
        let mut checked = 0;
        for name in names.iter().collect::<std::collections::BTreeSet<_>>() {
            assert!(
                full(&again, name).equal(&full(&source, name)),
                "W={world}: {name} after the round trip"
            );
            checked += 1;
        }
        assert!(checked > 0);
    }
}
