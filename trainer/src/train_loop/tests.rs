//! The loop with a toy model: least squares on batches derived from (seed, iteration).
use super::*;
use tch::{Device, Kind};

struct Toy {
    student: Tensor,
    teacher: Tensor,
    momentum_buf: Tensor,
    poison_at: Option<u64>,
    steps: u64,
}

impl Toy {
    fn new() -> Self {
        Self {
            student: Tensor::zeros([4], (Kind::Float, Device::Cpu)),
            teacher: Tensor::zeros([4], (Kind::Float, Device::Cpu)),
            momentum_buf: Tensor::zeros([4], (Kind::Float, Device::Cpu)),
            poison_at: None,
            steps: 0,
        }
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
        let w = self.student.detach().set_requires_grad(true);
        let loss = (x.mv(&w) - y).square().mean(Kind::Float);
        loss.backward();
        tch::no_grad(|| {
            self.momentum_buf = &self.momentum_buf * 0.9 + w.grad();
            self.student = &self.student - &self.momentum_buf * v.lr;
        });
        // Teacher EMA, part of the step as in the real model.
        let m = v.momentum;
        self.teacher = &self.teacher * m + &self.student * (1.0 - m);
        self.steps += 1;
        let mut value = loss.double_value(&[]);
        if self.poison_at == Some(self.steps) {
            value = f64::NAN;
        }
        Ok(vec![("mse".into(), value), ("total".into(), value)])
    }
    fn read_losses(&self, losses: &LossTerms) -> LossTerms {
        losses.clone()
    }
    fn state(&self) -> BTreeMap<String, Vec<(String, Tensor)>> {
        [
            (
                "student".to_string(),
                vec![("w".to_string(), self.student.shallow_clone())],
            ),
            (
                "teacher".to_string(),
                vec![("w".to_string(), self.teacher.shallow_clone())],
            ),
            (
                "optimizer".to_string(),
                vec![("momentum.w".to_string(), self.momentum_buf.shallow_clone())],
            ),
        ]
        .into()
    }
    fn load_state(
        &mut self,
        mut s: BTreeMap<String, Vec<(String, Tensor)>>,
    ) -> Result<(), StepError> {
        let mut take = |g: &str| {
            s.remove(g)
                .and_then(|mut v| v.pop())
                .map(|(_, t)| t)
                .ok_or_else(|| StepError(format!("missing {g}")))
        };
        self.student = take("student")?;
        self.teacher = take("teacher")?;
        self.momentum_buf = take("optimizer")?;
        Ok(())
    }
}

struct Data {
    seed: i64,
    next: u64,
}

impl BatchSource for Data {
    type Batch = (Tensor, Tensor);
    fn next_batch(&mut self) -> Result<Self::Batch, StepError> {
        // Per-iteration seeding: the batch is a function of (seed, iteration) only.
        tch::manual_seed(self.seed * 1_000_003 + self.next as i64);
        self.next += 1;
        let x = Tensor::randn([8, 4], (Kind::Float, Device::Cpu));
        let y = x.mv(&Tensor::from_slice(&[1.0f32, -2.0, 0.5, 3.0]));
        Ok((x, y))
    }
    fn images_per_batch(&self) -> u64 {
        8
    }
    fn position(&self) -> serde_json::Value {
        serde_json::json!({ "next": self.next, "samples": self.next * 8 })
    }
    fn seek(&mut self, p: &serde_json::Value) -> Result<(), StepError> {
        // The sample count wins, as in the real loader (a divergence skip moves only it).
        self.next = match p["samples"].as_u64() {
            Some(samples) => samples / 8,
            None => p["next"]
                .as_u64()
                .ok_or_else(|| StepError("bad position".into()))?,
        };
        Ok(())
    }
}

struct Cosine(u64);
impl Schedules for Cosine {
    fn at(&self, it: u64) -> ScheduleValues {
        let c = 0.5 * (1.0 + (std::f64::consts::PI * it as f64 / self.0 as f64).cos());
        ScheduleValues {
            lr: 0.05 * c,
            wd: 0.04,
            momentum: 0.996,
            teacher_temp: 0.07,
            last_layer_lr: 0.05 * c,
        }
    }
}

fn settings(total: u64) -> LoopSettings {
    LoopSettings {
        total_iterations: total,
        log_every: 5,
        checkpoint_every: 4,
        eval_every: 0,
        eval_at_start: false,
        eval_at_end: false,
        eval: None,
        world_size: 1,
        config_hash: "h".into(),
        job: None,
        guarded: BTreeMap::new(),
        flops_per_image: Some(1e3),
        peak_flops: Some(1e9),
        phases: Vec::new(),
        skip_diverged_data: false,
        best_metric: None,
    }
}

struct Run {
    outcome: Result<Outcome, LoopError>,
    model: Toy,
    jsonl: Vec<serde_json::Value>,
}

fn run(dir: &std::path::Path, total: u64, model: Toy, resume: bool, stop: bool) -> Run {
    run_with(dir, total, model, resume, stop, false)
}

fn run_with(
    dir: &std::path::Path,
    total: u64,
    model: Toy,
    resume: bool,
    stop: bool,
    skip_diverged_data: bool,
) -> Run {
    let mut model = model;
    let mut data = Data { seed: 3, next: 0 };
    let ckpts = CheckpointManager::open(dir.join("checkpoints"), 10).unwrap();
    let metrics = TrainerMetrics::new().unwrap();
    let mut jsonl = JsonlLog::open(&dir.join("metrics.jsonl")).unwrap();
    let schedules = Cosine(total.max(20));
    let mut lp = TrainLoop {
        model: &mut model,
        data: &mut data,
        schedules: &schedules,
        settings: LoopSettings {
            skip_diverged_data,
            ..settings(total)
        },
        checkpoints: &ckpts,
        metrics: &metrics,
        jsonl: &mut jsonl,
        stop: Arc::new(AtomicBool::new(stop)),
        world: &crate::dist::World::single(),
        progress: &mut super::NoProgress,
    };
    let start = if resume {
        lp.restore(&ckpts.latest_verified().unwrap().unwrap())
            .unwrap()
    } else {
        0
    };
    let outcome = lp.run(start);
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    Run {
        outcome,
        model,
        jsonl: text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect(),
    }
}

#[test]
fn a_finished_run_writes_losses_checkpoints_and_the_final_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(dir.path(), 10, Toy::new(), false, false);
    assert_eq!(r.outcome.unwrap(), Outcome::Finished { iteration: 10 });
    let train: Vec<_> = r.jsonl.iter().filter(|l| l["type"] == "train").collect();
    assert_eq!(train.len(), 10);
    assert!(
        train[9]["losses"]["mse"].as_f64().unwrap() < train[0]["losses"]["mse"].as_f64().unwrap()
    );
    assert!(train[4]["images_per_second"].as_f64().unwrap() > 0.0);
    assert!(train[4]["mfu"].as_f64().is_some());
    let ckpts: Vec<u64> = r
        .jsonl
        .iter()
        .filter(|l| l["type"] == "checkpoint")
        .map(|l| l["iteration"].as_u64().unwrap())
        .collect();
    assert_eq!(ckpts, [4, 8, 10]);
}

#[test]
fn resuming_from_a_checkpoint_matches_an_uninterrupted_run_bitwise() {
    let straight = tempfile::tempdir().unwrap();
    let full = run(straight.path(), 16, Toy::new(), false, false);
    let split = tempfile::tempdir().unwrap();
    // First half, "killed" after the checkpoint at 8: only the checkpoint survives.
    let _ = run(split.path(), 8, Toy::new(), false, false);
    let resumed = run(split.path(), 16, Toy::new(), true, false);
    assert!(resumed.model.student.equal(&full.model.student));
    assert!(resumed.model.teacher.equal(&full.model.teacher));
    let losses = |r: &Run| -> Vec<f64> {
        r.jsonl
            .iter()
            .filter(|l| l["type"] == "train")
            .map(|l| l["losses"]["total"].as_f64().unwrap())
            .collect()
    };
    let (a, b) = (losses(&full), losses(&resumed));
    assert_eq!(
        &a[..],
        &b[..],
        "the JSONL of the resumed run holds both halves in order"
    );
}

#[test]
fn a_non_finite_loss_stops_with_the_last_finite_values() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = Toy::new();
    model.poison_at = Some(6);
    let r = run(dir.path(), 10, model, false, false);
    match r.outcome.unwrap_err() {
        LoopError::NonFiniteLoss {
            iteration,
            last_iteration,
            last_finite,
            ..
        } => {
            assert_eq!(iteration, 5);
            assert_eq!(last_iteration, 5);
            assert!(last_finite.contains("mse="), "{last_finite}");
        }
        other => panic!("expected NonFiniteLoss, got {other}"),
    }
}

/// The samples the newest checkpoint in `dir` resumes from.
fn checkpoint_samples(dir: &std::path::Path) -> (u64, u64) {
    let ckpts = CheckpointManager::open(dir.join("checkpoints"), 10).unwrap();
    let c = ckpts.latest_verified().unwrap().unwrap();
    let p = CheckpointReader::open(&c)
        .unwrap()
        .json("data_position")
        .unwrap()
        .unwrap();
    (c.manifest.iteration, p["samples"].as_u64().unwrap())
}

#[test]
fn a_divergence_rollback_resumes_before_it_and_skips_its_data_window() {
    let diverged = tempfile::tempdir().unwrap();
    let mut model = Toy::new();
    model.poison_at = Some(6); // iteration 5 (0-based); the checkpoint before it is at 4
    let r = run(diverged.path(), 10, model, false, false);
    assert!(matches!(
        r.outcome,
        Err(LoopError::NonFiniteLoss { iteration: 5, .. })
    ));
    let records = divergence::load(&diverged.path().join("checkpoints")).unwrap();
    assert_eq!(
        records,
        [divergence::Divergence {
            iteration: 5,
            samples_end: 6 * 8
        }]
    );
    let copy = tempfile::tempdir().unwrap();
    let cp = |to: &std::path::Path| {
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(diverged.path().join("checkpoints"))
            .arg(to)
            .status()
            .unwrap();
        assert!(status.success());
    };
    cp(copy.path());
    let plain = tempfile::tempdir().unwrap();
    cp(plain.path());

    // Rollback on: iterations 4..10 train on batches 6..12, skipping batches 4 and 5.
    let a = run_with(diverged.path(), 10, Toy::new(), true, false, true);
    assert_eq!(a.outcome.unwrap(), Outcome::Finished { iteration: 10 });
    assert_eq!(checkpoint_samples(diverged.path()), (10, 12 * 8));
    let skip: Vec<_> = a
        .jsonl
        .iter()
        .filter(|l| l["type"] == "divergence_skip")
        .collect();
    assert_eq!(skip.len(), 1);
    assert_eq!(
        (
            &skip[0]["checkpoint_iteration"],
            &skip[0]["diverged_at"],
            &skip[0]["from_sample"],
            &skip[0]["to_sample"]
        ),
        (&4.into(), &5.into(), &32.into(), &48.into())
    );
    // Deterministic: the same records and checkpoint give the same weights, bit for bit.
    let b = run_with(copy.path(), 10, Toy::new(), true, false, true);
    assert!(a.model.student.equal(&b.model.student));
    // Off (the default): the records are ignored and the window is trained again.
    let c = run_with(plain.path(), 10, Toy::new(), true, false, false);
    assert_eq!(checkpoint_samples(plain.path()), (10, 10 * 8));
    assert!(!a.model.student.equal(&c.model.student));
}

#[test]
fn a_stop_signal_writes_a_checkpoint_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(dir.path(), 10, Toy::new(), false, true);
    assert_eq!(r.outcome.unwrap(), Outcome::Stopped { iteration: 0 });
    let mgr = CheckpointManager::open(dir.path().join("checkpoints"), 10).unwrap();
    assert_eq!(
        mgr.latest_verified().unwrap().unwrap().manifest.iteration,
        0
    );
}
