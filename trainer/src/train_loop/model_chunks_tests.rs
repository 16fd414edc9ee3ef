//! The real model's sharded checkpoint (`Model::state_chunks` / `Model::load_chunks`): two
//! ranks train the tiny model with `SHARD_GRAD_OP`, checkpoint (each rank its AdamW pieces),
//! and train on. Resumed on the same two ranks, the state round-trips bitwise, only this
//! rank's moments are loaded (the replicated optimizer stays empty) and the continuation is
//! bitwise the uninterrupted one; resumed on one rank without sharding, it continues with the
//! same losses and weights within the sharding equivalence tolerance.
use std::collections::BTreeMap;
use std::sync::Arc;

use tch::Tensor;

use super::components::{Model, TrainBatch};
use super::{StepError, Trainable};
use crate::checkpoint::{CheckpointManager, CheckpointReader, Chunk, ShardSnapshot};
use crate::dist::tcp::tests::local_group;
use crate::dist::{Collective, Single};
use crate::meta_arch::TargetSource;
use crate::meta_arch::parallel_tests::{
    GLOBAL_BATCH, LOSS_TOL, WEIGHT_TOL, batch, config, layout, max_diff, new_arch,
};
use crate::meta_arch::test_support::values;
use crate::parallel::Sharding;

/// Iterations before the checkpoint, and after it.
const BEFORE: u64 = 2;
const AFTER: u64 = 2;

fn model(sharding: Sharding, rank: usize, collective: Box<dyn Collective>) -> Model {
    Model {
        arch: new_arch(config(layout(sharding, 0))),
        seed: 0,
        rank,
        collective,
        eval: None,
        init: None,
    }
}

/// Trains iterations `range` on this rank's part of the fixed global batches; the logged
/// objective of each.
fn train(m: &mut Model, range: std::ops::Range<u64>) -> Vec<f64> {
    let world = m.collective.world_size() as i64;
    let per_rank = GLOBAL_BATCH / world;
    range
        .map(|it| {
            let b = TrainBatch {
                iteration: it,
                ssl: batch(it as usize, m.rank as i64 * per_rank, per_rank),
            };
            let losses = m.step(&b, &values(), TargetSource::Ema).unwrap();
            m.read(&losses)
                .iter()
                .find(|(k, _)| k == "total_loss")
                .map(|(_, v)| *v)
                .expect("a total loss")
        })
        .collect()
}

fn weights(m: &Model) -> Vec<(String, Tensor)> {
    let mut out: Vec<(String, Tensor)> = Vec::new();
    for (group, vs) in [
        ("student", &m.arch.student.vs),
        ("teacher", &m.arch.teacher.vs),
    ] {
        for (k, v) in vs.variables() {
            out.push((format!("{group}.{k}"), v.detach().copy()));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Chunks flattened to (group/name@offset, shape, data), sorted: comparable across saves.
fn flat(chunks: BTreeMap<String, Vec<Chunk>>) -> Vec<(String, Vec<i64>, Tensor)> {
    let mut out: Vec<_> = chunks
        .into_iter()
        .flat_map(|(g, cs)| {
            cs.into_iter()
                .map(move |c| (format!("{g}/{}@{}", c.name, c.offset), c.shape, c.data))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn same(a: &[(String, Vec<i64>, Tensor)], b: &[(String, Vec<i64>, Tensor)]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.0 == y.0 && x.1 == y.1 && x.2.equal(&y.2))
}

fn load(m: &mut Model, ckpts: &CheckpointManager) -> Result<(), StepError> {
    let ckpt = ckpts.latest_verified().unwrap().expect("a checkpoint");
    let reader = CheckpointReader::open(&ckpt).unwrap();
    m.load_chunks(&reader)
}

struct RankRun {
    saved: Vec<(String, Vec<i64>, Tensor)>,
    losses: Vec<f64>,
    weights: Vec<(String, Tensor)>,
}

#[test]
fn a_sharded_checkpoint_of_the_real_model_round_trips_and_resumes_like_an_unsharded_one() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let ckpts = CheckpointManager::open(dir.path().join("checkpoints"), 3).unwrap();

    // Uninterrupted on 2 ranks, checkpointing after BEFORE iterations.
    let runs: Vec<RankRun> = {
        let handles: Vec<_> = local_group(2)
            .into_iter()
            .enumerate()
            .map(|(rank, c)| {
                let ckpts = ckpts.clone();
                std::thread::spawn(move || {
                    let mut m = model(Sharding::ShardGradOp, rank, Box::new(Arc::clone(&c)));
                    train(&mut m, 0..BEFORE);
                    assert!(m.arch.sharded.is_some(), "SHARD_GRAD_OP on 2 ranks shards");
                    let chunks = m.state_chunks(rank, 2);
                    let part = ShardSnapshot {
                        iteration: BEFORE,
                        config_hash: "h".into(),
                        guarded: BTreeMap::new(),
                        job: None,
                        chunks: m.state_chunks(rank, 2),
                        json: BTreeMap::new(),
                    };
                    ckpts.save_shard(&part, c.as_ref()).unwrap();
                    let losses = train(&mut m, BEFORE..BEFORE + AFTER);
                    RankRun {
                        saved: flat(chunks),
                        losses,
                        weights: weights(&m),
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    };
    assert!(
        runs[0]
            .saved
            .iter()
            .any(|(n, _, _)| n.starts_with("optimizer/")),
        "the checkpoint holds AdamW pieces"
    );

    // Resumed on 2 ranks, sharded: the same chunks, no whole moments, the same continuation.
    let resumed: Vec<RankRun> = {
        let handles: Vec<_> = local_group(2)
            .into_iter()
            .enumerate()
            .map(|(rank, c)| {
                let ckpts = ckpts.clone();
                std::thread::spawn(move || {
                    let mut m = model(Sharding::ShardGradOp, rank, Box::new(c));
                    load(&mut m, &ckpts).unwrap();
                    assert!(
                        m.arch.optimizer.state_dict().is_empty(),
                        "rank {rank}: the whole AdamW moments were loaded beside the shard"
                    );
                    let saved = flat(m.state_chunks(rank, 2));
                    let losses = train(&mut m, BEFORE..BEFORE + AFTER);
                    RankRun {
                        saved,
                        losses,
                        weights: weights(&m),
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    };
    for (rank, (run, back)) in runs.iter().zip(&resumed).enumerate() {
        assert!(
            same(&run.saved, &back.saved),
            "rank {rank}: state_chunks after load_chunks differ from the saved ones"
        );
        assert_eq!(run.losses, back.losses, "rank {rank}: resumed losses");
        assert_eq!(
            max_diff(&run.weights, &back.weights),
            0.0,
            "rank {rank}: resumed weights"
        );
    }

    // Resumed on 1 rank, replicated: the whole moments, and the same training within the
    // tolerance measured for sharded against replicated steps.
    let mut one = model(Sharding::NoShard, 0, Box::new(Single));
    load(&mut one, &ckpts).unwrap();
    assert!(one.arch.sharded.is_none());
    assert!(!one.arch.optimizer.state_dict().is_empty());
    let losses = train(&mut one, BEFORE..BEFORE + AFTER);
    let loss_diff = losses
        .iter()
        .zip(&runs[0].losses)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    let weight_diff = max_diff(&weights(&one), &runs[0].weights);
    eprintln!(
        "sharded W=2 vs unsharded W=1 resume: max |Δloss| {loss_diff:.3e}, max |Δweight| {weight_diff:.3e}"
    );
    assert!(loss_diff <= LOSS_TOL, "losses differ by {loss_diff}");
    assert!(weight_diff <= WEIGHT_TOL, "weights differ by {weight_diff}");
}
