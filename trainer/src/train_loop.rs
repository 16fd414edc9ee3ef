//! The training loop, top to bottom: schedules -> step (teacher EMA included) -> one read of
//! its losses -> metrics -> evaluation -> checkpoint. It is generic over three small traits so
//! the loop itself can be tested with a toy model; [`components`] holds the real ViT, losses
//! and loader behind them and `crate::pretrain` / `crate::distill` wire them from a config.
//! (Over 500 lines: the loop and the traits it is generic over are one contract, read together.)
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tch::{Kind, Tensor};

use crate::checkpoint::{
    BestCheckpoint, CheckpointError, CheckpointManager, CheckpointReader, Chunk, ShardSnapshot,
    VerifiedCheckpoint, split_replicated,
};
use crate::dist::{self, World};
use crate::eval::{EvalConfig, EvalError, EvalInputs, Evaluator};
use crate::metrics::{JsonlLog, MetricsError, Progress, TrainerMetrics};
use crate::model::DinoVisionTransformer;

pub use crate::optim::ScheduleValues;

/// Schedules are pure functions of the iteration, so a resume is exact by construction.
pub trait Schedules {
    fn at(&self, iteration: u64) -> ScheduleValues;
}

/// Named loss terms of one step, e.g. `dino_local_crops_loss`, `ibot_loss`, `koleo_loss`;
/// `total` is the optimised sum.
pub type LossTerms = Vec<(String, f64)>;

/// The model side: student, teacher and optimiser.
pub trait Trainable {
    type Batch;
    /// The losses of one step as the step left them (on the device for the real model).
    type Losses;
    /// One optimisation step of the student on `batch` with the schedule values, the teacher
    /// EMA included (the only place it happens). It reads nothing to the host: on a GPU each
    /// read would stall the device queue mid-step.
    fn train_step(
        &mut self,
        batch: &Self::Batch,
        values: &ScheduleValues,
    ) -> Result<Self::Losses, StepError>;
    /// The losses of a step on the host (one read, averaged over the ranks): every rank must
    /// call it at the same iterations.
    fn read_losses(&self, losses: &Self::Losses) -> LossTerms;
    /// Tensor groups to checkpoint (`student`, `teacher`, `optimizer`, `loss_state`, ...).
    fn state(&self) -> BTreeMap<String, Vec<(String, Tensor)>>;
    /// Restores what `state` returned.
    fn load_state(
        &mut self,
        state: BTreeMap<String, Vec<(String, Tensor)>>,
    ) -> Result<(), StepError>;
    /// The pieces of the checkpointed tensors this rank writes, by group; every rank writes
    /// its own at the same time. The default splits the replicated [`Self::state`] evenly
    /// over the ranks; a sharded model returns the chunks it owns (its flat shard's
    /// intersection with each parameter, AdamW moments included).
    fn state_chunks(&self, rank: usize, world_size: usize) -> BTreeMap<String, Vec<Chunk>> {
        split_replicated(self.state(), rank, world_size)
    }
    /// Restores from a checkpoint written by any world size and layout: `source` serves any
    /// range of any tensor (`group/name`). The default assembles whole tensors for
    /// [`Self::load_state`]; a sharded model reads only the ranges its shard needs.
    fn load_chunks(&mut self, source: &CheckpointReader) -> Result<(), StepError> {
        let groups = source.groups().map_err(|e| StepError(e.to_string()))?;
        self.load_state(groups)
    }
    /// JSON state that is not tensors (loss-scaler state, ...).
    fn json_state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    fn load_json_state(&mut self, _state: &serde_json::Value) -> Result<(), StepError> {
        Ok(())
    }
    /// Called once when the run starts at iteration 0, never when it resumes from a
    /// checkpoint: loads the configured initial weights (`model.pretrainedWeights`,
    /// `model.weights`).
    fn start_fresh(&mut self) -> Result<(), StepError> {
        Ok(())
    }
    /// Run identity beyond the config (e.g. the frozen teacher's checksum): added to the
    /// checkpoint's guarded fields, so a resume under a different one is refused.
    fn guarded(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }
    /// The backbone evaluated (and exported): the teacher in pretraining, the student EMA in
    /// distillation; None for a model without one.
    fn final_backbone(&self) -> Option<&DinoVisionTransformer> {
        None
    }
    /// The labelled splits this rank evaluates on and the compute dtype (None: this rank does
    /// not evaluate). The command wiring puts them in the model; the loop hands them, with
    /// [`Self::final_backbone`], to an [`Evaluator`].
    fn eval_inputs(&self) -> Option<(&EvalInputs, Kind)> {
        None
    }
    /// Gradient and optimizer-state bytes this rank holds (`training.sharding` decides how
    /// many); None for a model that does not account for them.
    fn state_bytes(&self) -> Option<crate::parallel::MemoryBytes> {
        None
    }
    /// Where the last step's time went, where it can be measured without a device sync (the
    /// CPU); None otherwise.
    fn step_phases(&self) -> Option<crate::meta_arch::StepPhases> {
        None
    }
}

/// The data side. The batch of iteration `i` must be a function of (seed, rank, i) so that
/// a resumed run sees exactly the batches an uninterrupted one would have.
pub trait BatchSource {
    type Batch;
    fn next_batch(&mut self) -> Result<Self::Batch, StepError>;
    /// Images per batch on this rank (for throughput).
    fn images_per_batch(&self) -> u64;
    /// Where the source stands, to be restored with `seek`.
    fn position(&self) -> serde_json::Value;
    fn seek(&mut self, position: &serde_json::Value) -> Result<(), StepError>;
    /// Running total of images skipped because they could not be decoded.
    fn skipped_images(&self) -> u64 {
        0
    }
    /// Batches prepared ahead and waiting to be consumed (None: the source has no queue).
    fn queue_depth(&self) -> Option<usize> {
        None
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StepError(pub String);

#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error(
        "loss became non-finite at iteration {iteration}: {terms}; last finite values (iteration {last_iteration}): {last_finite}"
    )]
    NonFiniteLoss {
        iteration: u64,
        terms: String,
        last_iteration: u64,
        last_finite: String,
    },
    #[error("training step at iteration {iteration}: {source}")]
    Step {
        iteration: u64,
        #[source]
        source: StepError,
    },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("evaluation: {0}")]
    Eval(#[from] EvalError),
    #[error("divergence records: {0}; remove the file to resume without skipping its data window")]
    Divergence(String),
    #[error("checkpoint {path} does not fit this run: {source}")]
    Restore {
        path: std::path::PathBuf,
        #[source]
        source: StepError,
    },
}

/// How the loop ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Finished {
        iteration: u64,
    },
    /// SIGTERM (or SIGINT) arrived; a checkpoint was written at `iteration`.
    Stopped {
        iteration: u64,
    },
}

/// Cadences and identity of the run.
#[derive(Debug, Clone)]
pub struct LoopSettings {
    pub total_iterations: u64,
    pub log_every: u64,
    /// 0 disables periodic checkpoints (the final one and the SIGTERM one are still written).
    pub checkpoint_every: u64,
    /// 0 disables periodic evaluation; `eval_at_start`/`eval_at_end` still apply.
    pub eval_every: u64,
    pub eval_at_start: bool,
    pub eval_at_end: bool,
    pub eval: Option<EvalConfig>,
    pub world_size: usize,
    pub config_hash: String,
    pub guarded: BTreeMap<String, String>,
    /// The job (`Kind/namespace/name`) recorded in every shard, None outside a cluster.
    pub job: Option<String>,
    /// Training FLOPs per image and peak FLOP/s of the device; MFU is reported when both
    /// are known.
    pub flops_per_image: Option<f64>,
    pub peak_flops: Option<f64>,
    /// The curriculum phases in order, the first from iteration 0; empty without a
    /// curriculum (no phase is reported then).
    pub phases: Vec<LoopPhase>,
    /// Divergence rollback is on (`DINOFLOW_DIVERGENCE_ROLLBACK`): a restore skips the data
    /// windows that diverged after its checkpoint ([`divergence`]).
    pub skip_diverged_data: bool,
    /// `checkpoint.bestMetric`: a checkpoint written at an evaluation's iteration with the
    /// highest value so far becomes the best, kept on disk and reported.
    pub best_metric: Option<String>,
}

/// A curriculum phase as the loop reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct LoopPhase {
    pub name: String,
    /// First iteration (0-based) of the phase.
    pub start: u64,
    /// Training FLOPs per image at the phase's crops and batch (replaces
    /// [`LoopSettings::flops_per_image`] during the phase).
    pub flops_per_image: Option<f64>,
    /// Crop sizes, local-crop count and batch size, as metrics.jsonl records them.
    pub describe: serde_json::Value,
}

impl LoopSettings {
    /// Index of the phase that iteration `iteration` (0-based) trains in.
    fn phase_index(&self, iteration: u64) -> Option<usize> {
        self.phases.iter().rposition(|p| p.start <= iteration)
    }
}

/// One finished iteration, as progress reports carry it.
#[derive(Debug, Clone, Copy)]
pub struct IterationReport<'r> {
    pub iteration: u64,
    pub total_iterations: u64,
    pub losses: &'r LossTerms,
    pub lr: f64,
    /// Set on logging iterations (the throughput window ends there).
    pub images_per_second: Option<f64>,
    /// The curriculum phase the iteration trained in (None without a curriculum).
    pub phase: Option<&'r str>,
    /// Estimated MFU of that window, when the peak FLOP/s are known.
    pub mfu: Option<f64>,
}

/// How a run starts, as progress reports carry it.
#[derive(Debug, Clone, Copy)]
pub struct RunStart<'r> {
    pub world_size: usize,
    /// The checkpoint resumed from: its directory, iteration and the world size that wrote it.
    pub resumed: Option<(&'r std::path::Path, u64, usize)>,
}

/// Where progress goes besides metrics.jsonl and Prometheus: the operator's gRPC stream on
/// rank 0 (`progress_client`). Implementations must return at once, never block the loop.
pub trait ProgressHook {
    /// The run starts: fresh, or resumed from a checkpoint (possibly of another world size).
    fn run_started(&mut self, _start: &RunStart<'_>) {}
    fn iteration(&mut self, _report: &IterationReport<'_>) {}
    /// A verified checkpoint; `best` is (metric, value) when it is the new best checkpoint.
    fn checkpoint(&mut self, _iteration: u64, _path: &std::path::Path, _best: Option<(&str, f64)>) {
    }
    fn evaluation(&mut self, _iteration: u64, _metrics: &[(String, f64)]) {}
    /// The loop enters (`true`) or leaves (`false`) a phase without iterations (evaluation,
    /// checkpoint write), during which a reporter may heartbeat.
    fn long_phase(&mut self, _active: bool) {}
}

/// What the model/data side gives the loop (built by `crate::pretrain` or `crate::distill`).
#[derive(Debug)]
pub struct Components<M, D, S> {
    pub model: M,
    pub data: D,
    pub schedules: S,
    pub flops_per_image: Option<f64>,
    pub num_classes: i64,
    /// The curriculum phases as the loop reports them (empty without a curriculum).
    pub phases: Vec<LoopPhase>,
}

/// No progress reporting (tests, runs without an operator, ranks other than 0).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl ProgressHook for NoProgress {}

pub struct TrainLoop<'a, M: Trainable, D: BatchSource<Batch = M::Batch>, S: Schedules> {
    pub model: &'a mut M,
    pub data: &'a mut D,
    pub schedules: &'a S,
    pub settings: LoopSettings,
    pub checkpoints: &'a CheckpointManager,
    pub metrics: &'a TrainerMetrics,
    pub jsonl: &'a mut JsonlLog,
    /// Set by the SIGTERM/SIGINT handler.
    pub stop: Arc<AtomicBool>,
    /// The ranks of the run. They agree on when to stop; each writes its shard of every
    /// checkpoint; only the main rank writes metrics.jsonl and seals checkpoints.
    pub world: &'a World,
    pub progress: &'a mut dyn ProgressHook,
}

impl<M: Trainable, D: BatchSource<Batch = M::Batch>, S: Schedules> std::fmt::Debug
    for TrainLoop<'_, M, D, S>
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainLoop")
            .field("settings", &self.settings)
            .finish()
    }
}

impl<M: Trainable, D: BatchSource<Batch = M::Batch>, S: Schedules> TrainLoop<'_, M, D, S> {
    /// Restores model, data position and loop state from a verified checkpoint; returns the
    /// iteration to continue from.
    pub fn restore(&mut self, checkpoint: &VerifiedCheckpoint) -> Result<u64, LoopError> {
        let reader = CheckpointReader::open(checkpoint)?;
        let restore_err = |source: StepError| LoopError::Restore {
            path: checkpoint.path.clone(),
            source,
        };
        self.model.load_chunks(&reader).map_err(restore_err)?;
        if let Some(state) = reader.json("model_state")? {
            self.model.load_json_state(&state).map_err(restore_err)?;
        }
        let mut position = reader
            .json("data_position")?
            .ok_or_else(|| restore_err(StepError("no data_position.json".into())))?;
        // A position written before global sample counts existed comes from a run of one
        // batch and world size from iteration 0: on another world size, its sample count is
        // the checkpoint's iteration times the writers' global batch (batchSizePerGpu is
        // guarded, so the same per rank).
        let writers = checkpoint.manifest.world_size;
        if let (Some(it), None, true) = (
            position
                .get("iteration")
                .and_then(serde_json::Value::as_u64),
            position.get("samples"),
            writers != self.settings.world_size,
        ) {
            position["samples"] = (it * self.data.images_per_batch() * writers as u64).into();
        }
        if self.settings.skip_diverged_data {
            self.skip_diverged(checkpoint.manifest.iteration, &mut position)?;
        }
        self.data.seek(&position).map_err(restore_err)?;
        Ok(checkpoint.manifest.iteration)
    }

    /// Moves `position` past the data windows that diverged after the checkpoint at
    /// `iteration` (see [`divergence`]).
    fn skip_diverged(
        &mut self,
        iteration: u64,
        position: &mut serde_json::Value,
    ) -> Result<(), LoopError> {
        let root = self.checkpoints.root();
        let records = divergence::load(root).map_err(|e| LoopError::Divergence(e.to_string()))?;
        let Some(samples) = position.get("samples").and_then(serde_json::Value::as_u64) else {
            if !records.is_empty() {
                tracing::warn!(
                    "divergence records found, but the checkpoint's data position has no sample count; not skipping"
                );
            }
            return Ok(());
        };
        if let Some(skip) = divergence::skip_for(&records, iteration, samples) {
            tracing::warn!(
                checkpoint_iteration = iteration,
                diverged_at = skip.diverged_at,
                from_sample = skip.from_sample,
                to_sample = skip.to_sample,
                "divergence rollback: resuming from the checkpoint of iteration {iteration} and skipping global samples {}..{} (the data of iterations {iteration}..={})",
                skip.from_sample,
                skip.to_sample,
                skip.diverged_at
            );
            position["samples"] = skip.to_sample.into();
            self.write_line(&serde_json::json!({
                "type": "divergence_skip",
                "checkpoint_iteration": iteration,
                "diverged_at": skip.diverged_at,
                "from_sample": skip.from_sample,
                "to_sample": skip.to_sample,
            }))?;
        }
        Ok(())
    }

    /// Records where the data stood at a non-finite loss, for a rollback that skips it. The
    /// run fails with exit 79 either way, so a failed record is only logged.
    fn record_divergence(&self, iteration: u64) {
        let Some(samples_end) = self.data.position()["samples"].as_u64() else {
            tracing::warn!("the data position has no sample count; divergence not recorded");
            return;
        };
        let d = divergence::Divergence {
            iteration,
            samples_end,
        };
        match divergence::record(self.checkpoints.root(), self.world.rank(), d) {
            Ok(()) => tracing::info!(iteration, samples_end, "divergence recorded"),
            Err(e) => tracing::warn!(error = %e, "could not record the divergence"),
        }
    }

    /// Runs from `start` (the number of iterations already done) to the total.
    pub fn run(&mut self, start: u64) -> Result<Outcome, LoopError> {
        let total = self.settings.total_iterations;
        self.metrics.total_iterations.set(total as i64);
        self.metrics.iteration.set(start as i64);
        let mut progress = Progress::new(self.settings.log_every, total);
        let mut last_checkpoint = Instant::now();
        let mut last_finite: Option<(u64, LossTerms)> = None;
        let mut reported_state_bytes = false;
        if self.settings.eval_at_start && start == 0 {
            self.evaluate(0)?;
        }
        let mut iteration = start;
        while iteration < total {
            // Agreed across ranks: a signal may reach one rank an iteration before another.
            if dist::any_rank(self.collective(), self.stop.load(Ordering::SeqCst)) {
                self.checkpoint(iteration, None)?;
                tracing::warn!(
                    iteration,
                    "stop signal received: checkpoint written, exiting"
                );
                return Ok(Outcome::Stopped { iteration });
            }
            // Schedules.
            let values = self.schedules.at(iteration);
            // Step. The queue is sampled before the take: 0 means this step waits for data.
            if let Some(depth) = self.data.queue_depth() {
                self.metrics.loader_queue_depth.set(depth as i64);
            }
            let wait = Instant::now();
            let batch = self
                .data
                .next_batch()
                .map_err(|source| LoopError::Step { iteration, source })?;
            let (data_wait, compute) = (wait.elapsed(), Instant::now());
            let pending = self
                .model
                .train_step(&batch, &values)
                .map_err(|source| LoopError::Step { iteration, source })?;
            // The step's only host read, after all of its work is queued: metrics.jsonl and the
            // progress stream carry every iteration's losses, so every iteration reads them,
            // and the non-finite check below runs on each read. A non-finite loss has already
            // gone through the update by then; nothing of it is logged or checkpointed, as the
            // run stops here (exit 79).
            let losses = self.model.read_losses(&pending);
            if let Some(bytes) = self.model.state_bytes() {
                self.metrics.set_training_state_bytes(bytes);
                if !reported_state_bytes {
                    // After the first step every moment exists: the steady-state figure.
                    tracing::info!(
                        "this rank holds {} B of gradients and {} B of optimizer state ({:.1} MiB together)",
                        bytes.gradients,
                        bytes.optimizer_state,
                        bytes.total() as f64 / (1024.0 * 1024.0)
                    );
                    reported_state_bytes = true;
                }
            }
            if losses.iter().any(|(_, v)| !v.is_finite()) {
                let (last_iteration, last) = last_finite.unwrap_or((iteration, Vec::new()));
                let err = LoopError::NonFiniteLoss {
                    iteration,
                    terms: fmt_terms(&losses),
                    last_iteration,
                    last_finite: fmt_terms(&last),
                };
                tracing::error!("{err}");
                self.record_divergence(iteration);
                return Err(err);
            }
            // Compute time includes the read above, which waits for the queued step.
            self.metrics.observe_iteration(data_wait, compute.elapsed());
            if let Some(phases) = self.model.step_phases() {
                self.metrics.observe_step_phases(&phases);
            }
            iteration += 1;
            // Metrics.
            self.record(iteration, &values, &losses, &mut progress, last_checkpoint)?;
            last_finite = Some((iteration, losses));
            // Evaluation.
            let eval_due =
                self.settings.eval_every > 0 && iteration.is_multiple_of(self.settings.eval_every);
            let mut score = None;
            if eval_due || (iteration == total && self.settings.eval_at_end) {
                let flat = self.evaluate(iteration)?;
                score = self
                    .settings
                    .best_metric
                    .as_ref()
                    .and_then(|m| flat.iter().find(|(k, _)| k == m).map(|(_, v)| *v));
            }
            // Checkpoint.
            let ckpt_due = self.settings.checkpoint_every > 0
                && iteration.is_multiple_of(self.settings.checkpoint_every);
            if ckpt_due || iteration == total {
                self.checkpoint(iteration, score)?;
                last_checkpoint = Instant::now();
            }
        }
        Ok(Outcome::Finished { iteration })
    }

    fn record(
        &mut self,
        iteration: u64,
        values: &ScheduleValues,
        losses: &LossTerms,
        progress: &mut Progress,
        last_checkpoint: Instant,
    ) -> Result<(), LoopError> {
        let m = self.metrics;
        m.iteration.set(iteration as i64);
        for (term, v) in losses {
            m.loss.with_label_values(&[term.as_str()]).set(*v);
        }
        m.lr.set(values.lr);
        m.weight_decay.set(values.wd);
        m.teacher_momentum.set(values.momentum);
        m.teacher_temperature.set(values.teacher_temp);
        m.set_skipped_images(self.data.skipped_images());
        m.checkpoint_age_seconds
            .set(last_checkpoint.elapsed().as_secs_f64());
        let images = self.data.images_per_batch() * self.settings.world_size as u64;
        m.images_total.inc_by(images);
        // The iteration just done is `iteration - 1` (0-based).
        let phase_index = self.settings.phase_index(iteration - 1);
        let phase = phase_index.map(|i| &self.settings.phases[i]);
        // Throughput is per phase: the window closes at a phase's last iteration.
        let phase_ends = phase_index
            .and_then(|i| self.settings.phases.get(i + 1))
            .is_some_and(|next| next.start == iteration);
        let mut line = serde_json::json!({
            "type": "train",
            "iteration": iteration,
            "time": unix_now(),
            "losses": losses.iter().cloned().collect::<BTreeMap<_, _>>(),
            "lr": values.lr,
            "wd": values.wd,
            "momentum": values.momentum,
            "teacher_temp": values.teacher_temp,
            "skipped_images": self.data.skipped_images(),
        });
        if let Some(phase) = phase {
            line["phase"] = phase.name.clone().into();
            line["curriculum"] = phase.describe.clone();
        }
        let p = progress.on_iteration_closing(iteration, images, losses, values.lr, phase_ends);
        // FLOPs per image follow the phase's crops.
        let flops = phase.map_or(self.settings.flops_per_image, |p| p.flops_per_image);
        let mfu = match (&p, flops, self.settings.peak_flops) {
            (Some(p), Some(flops), Some(peak)) => {
                Some(flops * p.images_per_second / (peak * self.settings.world_size as f64))
            }
            _ => None,
        };
        self.progress.iteration(&IterationReport {
            iteration,
            total_iterations: self.settings.total_iterations,
            losses,
            lr: values.lr,
            images_per_second: p.as_ref().map(|p| p.images_per_second),
            phase: phase.map(|p| p.name.as_str()),
            mfu,
        });
        if let Some(p) = p {
            tracing::info!("{}", p.text);
            m.images_per_second.set(p.images_per_second);
            m.eta_seconds.set(p.eta_seconds);
            line["images_per_second"] = p.images_per_second.into();
            line["eta_seconds"] = p.eta_seconds.into();
            if let Some(mfu) = mfu {
                m.set_mfu(mfu);
                line["mfu"] = mfu.into();
            }
            m.record_memory();
        }
        self.write_line(&line)
    }

    /// Appends to metrics.jsonl on rank 0 (the losses are already averaged over the ranks).
    fn write_line(&mut self, line: &serde_json::Value) -> Result<(), LoopError> {
        if self.world.is_main() {
            self.jsonl.record(line)?;
        }
        Ok(())
    }

    /// Evaluates the teacher (rank 0; the others get nothing) and returns the flat metrics.
    fn evaluate(&mut self, iteration: u64) -> Result<Vec<(String, f64)>, LoopError> {
        let Some(config) = self.settings.eval.clone() else {
            return Ok(Vec::new());
        };
        let (Some(backbone), Some((inputs, kind))) =
            (self.model.final_backbone(), self.model.eval_inputs())
        else {
            return Ok(Vec::new());
        };
        let evaluator = Evaluator {
            inputs,
            config: &config,
            kind,
        };
        let started = Instant::now();
        self.progress.long_phase(true);
        let report = evaluator.evaluate(backbone);
        self.progress.long_phase(false);
        let report = report?;
        let flat = report.flat();
        self.metrics.evaluation(iteration, started.elapsed(), &flat);
        tracing::info!(
            iteration,
            seconds = started.elapsed().as_secs_f64(),
            "evaluation: {}",
            flat.iter()
                .map(|(k, v)| format!("{k}={v:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        self.progress.evaluation(iteration, &flat);
        self.write_line(&serde_json::json!({
            "type": "eval", "iteration": iteration, "time": unix_now(), "report": report,
        }))?;
        Ok(flat)
    }

    /// Every rank writes its shard of the checkpoint at the same time; rank 0 also writes
    /// the replicated JSON documents, seals the manifest and reports it.
    /// `score`: the best metric's value from the evaluation at this iteration (rank 0).
    fn checkpoint(&mut self, iteration: u64, score: Option<f64>) -> Result<(), LoopError> {
        let started = Instant::now();
        let main = self.world.is_main();
        let mut json = BTreeMap::new();
        if main {
            json.insert("data_position".to_string(), self.data.position());
            json.insert("model_state".to_string(), self.model.json_state());
        }
        let part = ShardSnapshot {
            iteration,
            config_hash: self.settings.config_hash.clone(),
            guarded: self.settings.guarded.clone(),
            job: self.settings.job.clone(),
            chunks: self
                .model
                .state_chunks(self.world.rank(), self.world.world_size()),
            json,
        };
        self.progress.long_phase(true);
        let saved = self.checkpoints.save_shard(&part, self.collective());
        self.progress.long_phase(false);
        let Some(saved) = saved? else {
            self.metrics.checkpoint_written(iteration, None);
            return Ok(());
        };
        self.metrics
            .checkpoint_written(iteration, Some((started.elapsed(), saved.path.as_path())));
        tracing::info!(iteration, path = %saved.path.display(), seconds = started.elapsed().as_secs_f64(), "checkpoint written");
        let best = match (&self.settings.best_metric, score) {
            (Some(metric), Some(value)) => {
                let candidate = BestCheckpoint {
                    iteration,
                    metric: metric.clone(),
                    value,
                };
                self.checkpoints
                    .offer_best(&candidate)?
                    .then_some(candidate)
            }
            _ => None,
        };
        self.progress.checkpoint(
            iteration,
            &saved.path,
            best.as_ref().map(|b| (b.metric.as_str(), b.value)),
        );
        let mut line = serde_json::json!({
            "type": "checkpoint", "iteration": iteration, "time": unix_now(), "path": saved.path,
        });
        if let Some(b) = &best {
            tracing::info!(iteration, metric = %b.metric, value = b.value, "new best checkpoint");
            line["best"] = serde_json::json!({ "metric": b.metric, "value": b.value });
        }
        self.write_line(&line)?;
        Ok(())
    }

    fn collective(&self) -> &dyn dist::Collective {
        self.world.collective().as_ref()
    }
}

fn fmt_terms(terms: &LossTerms) -> String {
    if terms.is_empty() {
        return "none (the first step already failed)".into();
    }
    terms
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

pub mod components;
pub mod divergence;
#[cfg(test)]
mod model_chunks_tests;
#[cfg(test)]
mod reshard_tests;
#[cfg(test)]
mod tests;
