//! Resuming on another world size: ranks joined over TCP train a toy model whose AdamW-style
//! moments are either replicated or sharded (each rank keeps the moments of its slice of the
//! parameters, as `SHARD_GRAD_OP` does), checkpoint, and resume on 4 → 2 → 1 → 4 ranks,
//! alternating sharded and replicated. Every resume must restore parameters and both moments
//! bitwise, and the data order must go on at the checkpoint's global sample.
use std::sync::Mutex;

use super::*;
use crate::checkpoint::ChunkSource;
use crate::data::sampler::Segment;
use crate::dist::Collective;
use crate::dist::tcp::tests::local_group;
use tch::{Device, Kind};

/// Parameters of the toy model.
const N: i64 = 10;
/// Samples per rank and iteration.
const BATCH: usize = 3;

fn slice(rank: usize, world: usize) -> (i64, i64) {
    (
        N * rank as i64 / world as i64,
        N * (rank as i64 + 1) / world as i64,
    )
}

/// Least squares with Adam moments; `sharded`: this rank holds the moments of its slice only.
struct Toy {
    sharded: bool,
    rank: usize,
    world: usize,
    c: Arc<dyn Collective>,
    w: Tensor,
    m: Tensor,
    v: Tensor,
}

impl Toy {
    fn new(sharded: bool, c: Arc<dyn Collective>) -> Self {
        let (rank, world) = (c.rank(), c.world_size());
        let (lo, hi) = slice(rank, world);
        let len = if sharded { hi - lo } else { N };
        let z = |n| Tensor::zeros([n], (Kind::Float, Device::Cpu));
        Self {
            sharded,
            rank,
            world,
            w: Tensor::linspace(-1.0, 1.0, N, (Kind::Float, Device::Cpu)),
            m: z(len),
            v: z(len),
            c,
        }
    }

    /// Parameters and the whole moments, assembled from every rank (a collective).
    fn full_state(&self) -> [Tensor; 3] {
        let whole = |t: &Tensor| {
            if !self.sharded {
                return t.copy();
            }
            let (lo, hi) = slice(self.rank, self.world);
            let mut full = Tensor::zeros([N], (Kind::Float, Device::Cpu));
            full.narrow(0, lo, hi - lo).copy_(t);
            self.c.all_reduce_sum(&mut full);
            full
        };
        [self.w.copy(), whole(&self.m), whole(&self.v)]
    }
}

impl Trainable for Toy {
    type Batch = (Tensor, Tensor);
    type Losses = LossTerms;

    fn train_step(
        &mut self,
        (x, y): &Self::Batch,
        v: &ScheduleValues,
    ) -> Result<LossTerms, StepError> {
        let err = x.mv(&self.w) - y;
        let mut grad = x.tr().mv(&err) * (2.0 / BATCH as f64);
        self.c.all_reduce_sum(&mut grad);
        let grad = grad / self.world as f64;
        let (lo, hi) = slice(self.rank, self.world);
        let g = if self.sharded {
            grad.narrow(0, lo, hi - lo)
        } else {
            grad
        };
        self.m = &self.m * 0.9 + &g * 0.1;
        self.v = &self.v * 0.999 + g.square() * 0.001;
        let step = -(&self.m / (self.v.sqrt() + 1e-8)) * v.lr;
        if self.sharded {
            // Each rank updates its slice; the sum over ranks is the whole update.
            let mut delta = Tensor::zeros([N], (Kind::Float, Device::Cpu));
            delta.narrow(0, lo, hi - lo).copy_(&step);
            self.c.all_reduce_sum(&mut delta);
            self.w = &self.w + delta;
        } else {
            self.w = &self.w + step;
        }
        let mut loss = [err.square().mean(Kind::Float).double_value(&[])];
        dist::mean_over_ranks(self.c.as_ref(), &mut loss);
        Ok(vec![("total".into(), loss[0])])
    }

    fn read_losses(&self, losses: &LossTerms) -> LossTerms {
        losses.clone()
    }

    fn state(&self) -> BTreeMap<String, Vec<(String, Tensor)>> {
        let mut out = BTreeMap::from([(
            "student".to_string(),
            vec![("w".to_string(), self.w.shallow_clone())],
        )]);
        if !self.sharded {
            out.insert(
                "optimizer".into(),
                vec![
                    ("w.exp_avg".into(), self.m.shallow_clone()),
                    ("w.exp_avg_sq".into(), self.v.shallow_clone()),
                ],
            );
        }
        out
    }

    fn load_state(
        &mut self,
        mut s: BTreeMap<String, Vec<(String, Tensor)>>,
    ) -> Result<(), StepError> {
        assert!(!self.sharded, "the sharded toy loads through load_chunks");
        let mut take = |g: &str, n: &str| {
            s.get_mut(g)
                .and_then(|v| v.iter().position(|(k, _)| k == n).map(|i| v.remove(i).1))
                .ok_or_else(|| StepError(format!("missing {g}/{n}")))
        };
        self.w = take("student", "w")?;
        self.m = take("optimizer", "w.exp_avg")?;
        self.v = take("optimizer", "w.exp_avg_sq")?;
        Ok(())
    }

    fn state_chunks(&self, rank: usize, world_size: usize) -> BTreeMap<String, Vec<Chunk>> {
        if !self.sharded {
            return split_replicated(self.state(), rank, world_size);
        }
        let mut out = split_replicated(self.state(), rank, world_size);
        let (lo, _) = slice(rank, world_size);
        let chunk = |name: &str, t: &Tensor| Chunk {
            name: name.into(),
            shape: vec![N],
            offset: lo,
            data: t.copy(),
        };
        out.insert(
            "optimizer".into(),
            vec![chunk("w.exp_avg", &self.m), chunk("w.exp_avg_sq", &self.v)],
        );
        out
    }

    fn load_chunks(&mut self, source: &CheckpointReader) -> Result<(), StepError> {
        if !self.sharded {
            let groups = source.groups().map_err(|e| StepError(e.to_string()))?;
            return self.load_state(groups);
        }
        let read = |name: &str, lo, len| {
            source
                .read(name, lo, len)
                .map_err(|e| StepError(e.to_string()))
        };
        let (lo, hi) = slice(self.rank, self.world);
        self.w = read("student/w", 0, N)?;
        self.m = read("optimizer/w.exp_avg", lo, hi - lo)?;
        self.v = read("optimizer/w.exp_avg_sq", lo, hi - lo)?;
        Ok(())
    }
}

/// Batches from the global sample stream as the real loader draws it (`Segment`): the
/// position it checkpoints is the next iteration and the global samples consumed before it.
struct Stream {
    segment: Segment,
    rank: usize,
    next: u64,
    drawn: Arc<Mutex<Vec<u64>>>,
}

impl BatchSource for Stream {
    type Batch = (Tensor, Tensor);
    fn next_batch(&mut self) -> Result<Self::Batch, StepError> {
        let positions: Vec<u64> = (0..BATCH)
            .map(|b| self.segment.position(self.rank, self.next, b))
            .collect();
        self.drawn.lock().unwrap().extend(&positions);
        self.next += 1;
        let g = Tensor::from_slice(&positions.iter().map(|&p| p as f32).collect::<Vec<_>>());
        let x = (g.unsqueeze(1) * 0.37
            + Tensor::arange(N, (Kind::Float, Device::Cpu)).unsqueeze(0))
        .sin();
        let y = x.mv(&Tensor::linspace(0.5, -0.5, N, (Kind::Float, Device::Cpu)));
        Ok((x, y))
    }
    fn images_per_batch(&self) -> u64 {
        BATCH as u64
    }
    fn position(&self) -> serde_json::Value {
        serde_json::json!({"iteration": self.next, "samples": self.segment.samples_before(self.next)})
    }
    fn seek(&mut self, p: &serde_json::Value) -> Result<(), StepError> {
        let (it, samples) = (p["iteration"].as_u64(), p["samples"].as_u64());
        let (Some(it), Some(samples)) = (it, samples) else {
            return Err(StepError(format!("bad position {p}")));
        };
        self.segment = Segment {
            start_iteration: it,
            start_sample: samples,
            batch_size: BATCH,
            world_size: self.segment.world_size,
        };
        self.next = it;
        Ok(())
    }
}

struct Constant;
impl Schedules for Constant {
    fn at(&self, _: u64) -> ScheduleValues {
        ScheduleValues {
            lr: 0.05,
            wd: 0.0,
            momentum: 0.9,
            teacher_temp: 0.07,
            last_layer_lr: 0.05,
        }
    }
}

/// What one leg of the chain saw: the state right after the resume (None when fresh) and at
/// the end, assembled on rank 0, and the global positions every rank drew.
struct Leg {
    restored: Option<[Tensor; 3]>,
    end: [Tensor; 3],
}

/// Trains `world` ranks (`sharded` or not) to iteration `until`, resuming from the newest
/// checkpoint under `dir` unless it is the first leg.
fn leg(
    dir: &std::path::Path,
    world: usize,
    sharded: bool,
    until: u64,
    drawn: &Arc<Mutex<Vec<u64>>>,
) -> Leg {
    let group = local_group(world);
    let ckpts = CheckpointManager::open(dir.join("checkpoints"), 10).unwrap();
    let threads: Vec<_> = group
        .into_iter()
        .enumerate()
        .map(|(rank, c)| {
            let (dir, drawn, ckpts) = (dir.to_path_buf(), Arc::clone(drawn), ckpts.clone());
            std::thread::spawn(move || {
                rank_leg(&dir, rank, c, world, sharded, until, &drawn, &ckpts)
            })
        })
        .collect();
    let mut out: Vec<Leg> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    out.swap_remove(0)
}

#[allow(clippy::too_many_arguments)]
fn rank_leg(
    dir: &std::path::Path,
    rank: usize,
    c: Arc<crate::dist::tcp::TcpCollective>,
    world: usize,
    sharded: bool,
    until: u64,
    drawn: &Arc<Mutex<Vec<u64>>>,
    ckpts: &CheckpointManager,
) -> Leg {
    let c: Arc<dyn Collective> = c;
    let world_ = crate::dist::World::new(Arc::clone(&c), rank, Device::Cpu);
    let mut model = Toy::new(sharded, Arc::clone(&c));
    let mut data = Stream {
        segment: Segment::from_start(BATCH, world),
        rank,
        next: 0,
        drawn: Arc::clone(drawn),
    };
    let metrics = TrainerMetrics::new().unwrap();
    let mut jsonl = JsonlLog::open(&dir.join(format!("metrics-{rank}.jsonl"))).unwrap();
    let mut lp = TrainLoop {
        model: &mut model,
        data: &mut data,
        schedules: &Constant,
        settings: LoopSettings {
            total_iterations: until,
            log_every: 100,
            checkpoint_every: 100,
            eval_every: 0,
            eval_at_start: false,
            eval_at_end: false,
            eval: None,
            world_size: world,
            config_hash: "h".into(),
            job: Some("PretrainJob/ns/chain".into()),
            guarded: BTreeMap::new(),
            flops_per_image: None,
            peak_flops: None,
            phases: Vec::new(),
            skip_diverged_data: false,
            best_metric: None,
        },
        checkpoints: ckpts,
        metrics: &metrics,
        jsonl: &mut jsonl,
        stop: Arc::new(AtomicBool::new(false)),
        world: &world_,
        progress: &mut NoProgress,
    };
    let latest = ckpts.latest_verified().unwrap();
    let (start, restored) = match &latest {
        Some(ckpt) => {
            let it = lp.restore(ckpt).unwrap();
            (it, Some(lp.model.full_state()))
        }
        None => (0, None),
    };
    assert_eq!(
        lp.run(start).unwrap(),
        Outcome::Finished { iteration: until }
    );
    Leg {
        restored,
        end: model.full_state(),
    }
}

fn assert_bitwise(a: &[Tensor; 3], b: &[Tensor; 3], what: &str) {
    for (name, (x, y)) in ["parameters", "exp_avg", "exp_avg_sq"]
        .iter()
        .zip(a.iter().zip(b))
    {
        assert!(x.equal(y), "{what}: {name} differ: {x:?} vs {y:?}");
    }
}

#[test]
fn a_run_resumed_on_4_then_2_then_1_then_4_ranks_restores_its_state_bitwise_and_its_data_order() {
    let dir = tempfile::tempdir().unwrap();
    let drawn = Arc::new(Mutex::new(Vec::new()));
    // (world size, sharded moments, last iteration of the leg).
    let chain = [(4, true, 3), (2, false, 5), (1, true, 8), (4, false, 10)];
    let mut previous: Option<[Tensor; 3]> = None;
    let mut samples = 0;
    let mut last = 0;
    for (world, sharded, until) in chain {
        let l = leg(dir.path(), world, sharded, until, &drawn);
        match (&previous, &l.restored) {
            (None, None) => {}
            (Some(p), Some(r)) => assert_bitwise(p, r, &format!("resume on {world} ranks")),
            _ => panic!("only the first leg starts fresh"),
        }
        // The checkpoint records the reshard's source: its writers' world size.
        let m = CheckpointManager::open(dir.path().join("checkpoints"), 10)
            .unwrap()
            .latest_verified()
            .unwrap()
            .unwrap()
            .manifest;
        assert_eq!(
            (m.iteration, m.world_size, m.shards.len()),
            (until, world, world)
        );
        assert!(
            l.end[1].abs().sum(Kind::Float).double_value(&[]) > 0.0,
            "moments moved"
        );
        samples += (until - last) * (BATCH * world) as u64;
        last = until;
        previous = Some(l.end);
    }
    // Every global sample position drawn exactly once across the three changes: none
    // skipped, none repeated.
    let mut seen = drawn.lock().unwrap().clone();
    seen.sort_unstable();
    assert_eq!(seen, (0..samples).collect::<Vec<_>>());
}
