//! The real components behind the loop's traits: [`MetaArch`] as [`Trainable`], the data
//! [`Loader`] plus iBOT mask collation as [`BatchSource`], the official cosine schedules as
//! [`Schedules`].
use std::collections::BTreeMap;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use super::{BatchSource, LossTerms, ScheduleValues, Schedules, StepError, Trainable};
use crate::checkpoint::{CheckpointReader, Chunk, split_replicated};
use crate::data::sampler::sample_rng;
use crate::data::{DataError, Dataset, Loader, LoaderConfig, MultiCropConfig};
use crate::dist::Collective;
use crate::eval::EvalInputs;
use crate::loss::{CenterState, TeacherCenter};
use crate::masking::{MaskCollateConfig, MaskGenerator, collate_masks};
use crate::meta_arch::{LossValues, MetaArch, SslBatch, StepLosses, TargetSource};
use crate::model::DinoVisionTransformer;
use crate::optim::{self, AdamWParamState};
use crate::precision::{DynamicLossScaler, LossScalerState};

/// One iteration's input: the collated crops and masks, and the iteration they belong to
/// (it seeds the step's stochastic depth).
#[derive(Debug)]
pub struct TrainBatch {
    pub iteration: u64,
    pub ssl: SslBatch,
}

/// The DINOv2 meta-architecture with the seed that makes its randomness a function of the
/// iteration.
pub struct Model {
    pub arch: MetaArch,
    pub seed: u64,
    pub rank: usize,
    pub collective: Box<dyn Collective>,
    /// Labelled splits for the evaluation hooks; None skips evaluation.
    pub eval: Option<EvalInputs>,
    /// Initial weights of a run started from scratch (`model.pretrainedWeights`/`weights`).
    pub init: Option<crate::pretrained::Init>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("seed", &self.seed)
            .field("rank", &self.rank)
            .finish()
    }
}

fn terms(l: &LossValues) -> LossTerms {
    let mut out = vec![("total_loss".to_string(), l.objective)];
    for (name, v) in [
        ("dino_local_crops_loss", l.dino_local_crops_loss),
        ("dino_global_crops_loss", l.dino_global_crops_loss),
        ("koleo_loss", l.koleo_loss),
        ("ibot_loss", l.ibot_loss),
    ] {
        if let Some(v) = v {
            out.push((name.to_string(), v));
        }
    }
    out
}

/// Derives a torch seed from (seed, rank, iteration): drop-path masks then repeat exactly
/// after a resume, whatever the process did before.
fn step_seed(seed: u64, rank: usize, iteration: u64) -> i64 {
    use rand::RngCore;
    // usize::MAX marks "not an image of the batch" so the stream differs from the loader's.
    (sample_rng(seed, rank, iteration, usize::MAX).next_u64() >> 1) as i64
}

fn step_err(e: impl std::fmt::Display) -> StepError {
    StepError(e.to_string())
}

impl Model {
    /// One optimisation step at the schedule values `v` with the targets from `targets` (see
    /// `MetaArch::train_step`); the losses stay on the device. Stochastic depth draws from a
    /// seed of the iteration, so a resumed run repeats it exactly.
    pub(crate) fn step(
        &mut self,
        batch: &TrainBatch,
        v: &ScheduleValues,
        targets: TargetSource<'_>,
    ) -> Result<StepLosses, StepError> {
        tch::manual_seed(step_seed(self.seed, self.rank, batch.iteration));
        // A curriculum phase may change the local-crop count: take it from the batch
        // (`[n·B, 3, l, l]` local crops beside `[2·B, 3, g, g]` global ones); the step still
        // checks the shapes against it.
        let images = batch.ssl.global_crops.size().first().copied().unwrap_or(0) / 2;
        if images > 0 {
            let local = batch.ssl.local_crops.size().first().copied().unwrap_or(0);
            self.arch.config.n_local_crops = local / images;
        }
        let collective = self.collective.as_ref();
        self.arch
            .train_step(&batch.ssl, v, collective, targets)
            .map(|outcome| outcome.losses)
            .map_err(step_err)
    }

    /// The losses of a step as named terms, averaged over the ranks (one host read).
    pub(crate) fn read(&self, losses: &StepLosses) -> LossTerms {
        terms(&losses.read(self.collective.as_ref()))
    }
}

impl Model {
    /// Student, teacher and loss centers from whole tensors (every layout holds them whole).
    fn load_replicated(
        &mut self,
        mut state: BTreeMap<String, Vec<(String, Tensor)>>,
    ) -> Result<(), StepError> {
        let mut group = |name: &str| {
            state
                .remove(name)
                .map(|v| v.into_iter().collect::<BTreeMap<_, _>>())
                .ok_or_else(|| StepError(format!("the checkpoint has no {name} tensors")))
        };
        let (student, teacher, mut loss) =
            (group("student")?, group("teacher")?, group("loss_state")?);
        load_vars(&self.arch.student.vs, &student, "student")?;
        load_vars(&self.arch.teacher.vs, &teacher, "teacher")?;
        let momentum = self.arch.config.center_momentum;
        let device = self.arch.student.vs.device();
        *self.arch.dino_loss.center_mut() = take_center(&mut loss, "dino_loss", momentum, device)?;
        if let Some(ibot) = &mut self.arch.ibot_loss {
            *ibot.center_mut() = take_center(&mut loss, "ibot_loss", momentum, device)?;
        }
        Ok(())
    }

    /// The whole AdamW state into the replicated optimizer.
    fn load_optimizer(&mut self, mut opt: BTreeMap<String, Tensor>) -> Result<(), StepError> {
        let names: Vec<String> = self.arch.optimizer.names().map(str::to_string).collect();
        let mut states = Vec::new();
        for name in names {
            let (Some(m), Some(v), Some(step)) = (
                opt.remove(&format!("{name}.exp_avg")),
                opt.remove(&format!("{name}.exp_avg_sq")),
                opt.remove(&format!("{name}.step")),
            ) else {
                continue; // never stepped (e.g. a frozen last layer before its first update)
            };
            states.push((
                name,
                AdamWParamState {
                    exp_avg: m,
                    exp_avg_sq: v,
                    step: step.int64_value(&[0]) as u64,
                },
            ));
        }
        self.arch
            .optimizer
            .load_state_dict(states)
            .map_err(step_err)?;

        Ok(())
    }
}

impl Trainable for Model {
    type Batch = TrainBatch;
    type Losses = StepLosses;

    fn train_step(
        &mut self,
        batch: &TrainBatch,
        v: &ScheduleValues,
    ) -> Result<StepLosses, StepError> {
        self.step(batch, v, TargetSource::Ema)
    }

    fn read_losses(&self, losses: &StepLosses) -> LossTerms {
        self.read(losses)
    }

    fn state(&self) -> BTreeMap<String, Vec<(String, Tensor)>> {
        let mut out = BTreeMap::new();
        out.insert(
            "student".into(),
            self.arch
                .student
                .vs
                .variables()
                .into_iter()
                .map(|(k, t)| (k, t.detach().copy()))
                .collect(),
        );
        out.insert(
            "teacher".into(),
            self.arch
                .teacher
                .vs
                .variables()
                .into_iter()
                .map(|(k, t)| (k, t.detach().copy()))
                .collect(),
        );
        let mut opt = Vec::new();
        for (name, st) in self.arch.optimizer.state_dict() {
            opt.push((format!("{name}.exp_avg"), st.exp_avg));
            opt.push((format!("{name}.exp_avg_sq"), st.exp_avg_sq));
            opt.push((
                format!("{name}.step"),
                Tensor::from_slice(&[st.step as i64]),
            ));
        }
        out.insert("optimizer".into(), opt);
        let mut loss = Vec::new();
        push_center(&mut loss, "dino_loss", self.arch.dino_loss.center().state());
        if let Some(ibot) = &self.arch.ibot_loss {
            push_center(&mut loss, "ibot_loss", ibot.center().state());
        }
        out.insert("loss_state".into(), loss);
        out
    }

    fn load_state(
        &mut self,
        mut state: BTreeMap<String, Vec<(String, Tensor)>>,
    ) -> Result<(), StepError> {
        let opt = state
            .remove("optimizer")
            .ok_or_else(|| StepError("the checkpoint has no optimizer tensors".into()))?;
        self.load_replicated(state)?;
        self.load_optimizer(opt.into_iter().collect())
    }

    fn state_bytes(&self) -> Option<crate::parallel::MemoryBytes> {
        Some(self.arch.memory_bytes())
    }

    /// Sharded AdamW state (SHARD_GRAD_OP on several ranks) is saved as each rank's pieces;
    /// everything else (parameters, teacher, centers) is replicated and split evenly.
    fn state_chunks(&self, rank: usize, world_size: usize) -> BTreeMap<String, Vec<Chunk>> {
        let mut state = self.state();
        let Some(sharded) = &self.arch.sharded else {
            return split_replicated(state, rank, world_size);
        };
        state.remove("optimizer");
        let mut out = split_replicated(state, rank, world_size);
        let optimizer = out.entry("optimizer".to_string()).or_default();
        for c in sharded.chunks() {
            if let Some(name) = c.name.strip_prefix("optimizer/") {
                optimizer.push(Chunk {
                    name: name.to_string(),
                    ..c
                });
            }
        }
        out
    }

    /// Whole tensors for the replicated state; then, when this run shards its student, only
    /// the AdamW pieces its new layout needs (never the whole moments), whatever world size or
    /// sharding wrote them.
    fn load_chunks(&mut self, source: &CheckpointReader) -> Result<(), StepError> {
        self.arch
            .prepare_parallel(self.rank, self.collective.world_size())
            .map_err(step_err)?;
        if self.arch.sharded.is_none() {
            return self.load_state(source.groups().map_err(step_err)?);
        }
        let mut groups = BTreeMap::new();
        for name in ["student", "teacher", "loss_state"] {
            let group = source.group(name).map_err(step_err)?;
            if !group.is_empty() {
                groups.insert(name.to_string(), group);
            }
        }
        self.load_replicated(groups)?;
        if let Some(sharded) = &mut self.arch.sharded {
            sharded.load_chunks(source).map_err(step_err)?;
        }
        Ok(())
    }

    fn start_fresh(&mut self) -> Result<(), StepError> {
        let Some(init) = &self.init else {
            return Ok(());
        };
        let applied = init.apply(&self.arch).map_err(step_err)?;
        tracing::info!(
            source = ?init,
            tensors = applied.tensors,
            resized_pos_embed = ?applied.resized_pos_embed,
            "initial weights loaded"
        );
        Ok(())
    }

    /// The teacher backbone, as the official evaluation uses.
    fn final_backbone(&self) -> Option<&DinoVisionTransformer> {
        Some(&self.arch.teacher.backbone)
    }

    fn eval_inputs(&self) -> Option<(&EvalInputs, Kind)> {
        let kind = self.arch.config.precision.compute_kind();
        self.eval.as_ref().map(|inputs| (inputs, kind))
    }

    fn step_phases(&self) -> Option<crate::meta_arch::StepPhases> {
        self.arch.last_step_phases
    }

    fn json_state(&self) -> serde_json::Value {
        serde_json::json!({ "loss_scaler": self.arch.loss_scaler.as_ref().map(DynamicLossScaler::state) })
    }

    fn load_json_state(&mut self, state: &serde_json::Value) -> Result<(), StepError> {
        let saved: Option<LossScalerState> =
            serde_json::from_value(state["loss_scaler"].clone()).map_err(step_err)?;
        if let (Some(scaler), Some(saved)) = (&mut self.arch.loss_scaler, saved) {
            // The configured factors, the checkpointed scale and growth tracker.
            scaler.restore(saved).map_err(step_err)?;
        }
        Ok(())
    }
}

/// A center and its pending (recorded, not yet applied) batch statistic: the official loss
/// applies it lazily at the next step, so a checkpoint between the two must keep it.
fn push_center(out: &mut Vec<(String, Tensor)>, prefix: &str, s: CenterState) {
    out.push((format!("{prefix}.center"), s.center));
    if let Some((sum, divisor)) = s.pending {
        out.push((format!("{prefix}.pending_sum"), sum));
        out.push((
            format!("{prefix}.pending_divisor"),
            Tensor::from_slice(&[divisor]),
        ));
    }
}

fn take_center(
    loss: &mut BTreeMap<String, Tensor>,
    prefix: &str,
    momentum: f64,
    device: Device,
) -> Result<TeacherCenter, StepError> {
    let center = loss
        .remove(&format!("{prefix}.center"))
        .ok_or_else(|| StepError(format!("the checkpoint has no {prefix}.center")))?
        .to_device(device);
    let pending = match (
        loss.remove(&format!("{prefix}.pending_sum")),
        loss.remove(&format!("{prefix}.pending_divisor")),
    ) {
        (Some(sum), Some(div)) => Some((sum.to_device(device), div.int64_value(&[0]))),
        _ => None,
    };
    TeacherCenter::from_state(CenterState { center, pending }, momentum).map_err(step_err)
}

fn load_vars(
    vs: &tch::nn::VarStore,
    saved: &BTreeMap<String, Tensor>,
    what: &str,
) -> Result<(), StepError> {
    let vars = vs.variables();
    if vars.len() != saved.len() {
        return Err(StepError(format!(
            "{what}: checkpoint has {} tensors, the model {}",
            saved.len(),
            vars.len()
        )));
    }
    tch::no_grad(|| {
        for (name, mut var) in vars {
            let src = saved
                .get(&name)
                .ok_or_else(|| StepError(format!("{what}: checkpoint lacks {name}")))?;
            if src.size() != var.size() {
                return Err(StepError(format!(
                    "{what}.{name}: checkpoint shape {:?}, model {:?}",
                    src.size(),
                    var.size()
                )));
            }
            var.copy_(src);
        }
        Ok(())
    })
}

/// What the data side switches at a curriculum phase: batch size, crops, mask grid.
#[derive(Debug, Clone)]
pub struct DataPhase {
    /// Reported name (`crate::curriculum::Phase::name`).
    pub name: String,
    /// First iteration of the phase.
    pub start: u64,
    pub batch_size: usize,
    pub crops: MultiCropConfig,
    pub masks: MaskGenerator,
}

/// The data loader plus the iBOT mask collation of the official `collate_data_and_cast`.
/// Masks draw from a generator keyed by (seed, rank, iteration), like the crops. With a
/// curriculum, the loader is restarted at each phase's first iteration with the phase's crops
/// and batch size, continuing the global sample order where the last phase stopped.
pub struct Data {
    /// Seed, rank, world size, workers; the batch size and crops of the current phase.
    cfg: LoaderConfig,
    phases: Vec<DataPhase>,
    /// Index in `phases` of the loader's phase.
    current: usize,
    loader: Loader,
    collate: MaskCollateConfig,
    device: Device,
    /// Images per rank of the batch `next_batch` returned last (for throughput).
    last_batch_size: usize,
}

impl std::fmt::Debug for Data {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Data")
            .field("loader", &self.loader)
            .field("phase", &self.phases[self.current].name)
            .finish()
    }
}

impl Data {
    /// One phase from iteration 0 (no curriculum): `cfg`'s batch size and crops throughout.
    pub fn new(
        dataset: Arc<dyn Dataset>,
        cfg: LoaderConfig,
        masks: MaskGenerator,
        collate: MaskCollateConfig,
        device: Device,
    ) -> Result<Self, DataError> {
        let phase = DataPhase {
            name: crate::curriculum::BASE_PHASE.into(),
            start: 0,
            batch_size: cfg.batch_size,
            crops: cfg.crops.clone(),
            masks,
        };
        Self::with_phases(dataset, cfg, vec![phase], collate, device)
    }

    /// The phases in order, the first from iteration 0; `cfg` gives the rest of the loader
    /// settings (its batch size and crops are replaced by each phase's).
    pub fn with_phases(
        dataset: Arc<dyn Dataset>,
        cfg: LoaderConfig,
        phases: Vec<DataPhase>,
        collate: MaskCollateConfig,
        device: Device,
    ) -> Result<Self, DataError> {
        if phases.first().is_none_or(|p| p.start != 0) {
            return Err(DataError::InvalidConfig {
                field: "curriculum.phases",
                message: "the first data phase must start at iteration 0".into(),
            });
        }
        let current = phases
            .iter()
            .rposition(|p| p.start <= cfg.start_iteration)
            .unwrap_or(0);
        let mut cfg = cfg;
        let start_sample = cfg
            .start_sample
            .unwrap_or_else(|| samples_before(&phases, cfg.start_iteration, cfg.world_size));
        cfg.start_sample = Some(start_sample);
        let loader_cfg = phase_config(&cfg, &phases, current);
        let loader = Loader::new(dataset, loader_cfg)?;
        Ok(Self {
            last_batch_size: phases[current].batch_size,
            cfg,
            phases,
            current,
            loader,
            collate,
            device,
        })
    }

    /// Restarts the loader in the phase of `iteration`, at global sample `sample`.
    fn enter(&mut self, iteration: u64, sample: u64) -> Result<(), DataError> {
        let index = self
            .phases
            .iter()
            .rposition(|p| p.start <= iteration)
            .unwrap_or(0);
        let base = LoaderConfig {
            start_iteration: iteration,
            start_sample: Some(sample),
            ..self.cfg.clone()
        };
        self.loader
            .restart(phase_config(&base, &self.phases, index))?;
        self.current = index;
        Ok(())
    }

    /// The phase of the next batch.
    pub fn phase(&self) -> &DataPhase {
        &self.phases[self.current]
    }
}

/// The loader config of phase `index`: `base` with the phase's batch, crops and end.
fn phase_config(base: &LoaderConfig, phases: &[DataPhase], index: usize) -> LoaderConfig {
    let p = &phases[index];
    LoaderConfig {
        batch_size: p.batch_size,
        crops: p.crops.clone(),
        end_iteration: phases.get(index + 1).map(|n| n.start),
        ..base.clone()
    }
}

/// Global samples the iterations before `iteration` consume on `world_size` ranks.
fn samples_before(phases: &[DataPhase], iteration: u64, world_size: usize) -> u64 {
    phases
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let end = phases
                .get(i + 1)
                .map_or(iteration, |n| n.start.min(iteration));
            end.saturating_sub(p.start) * (p.batch_size * world_size) as u64
        })
        .sum()
}

impl BatchSource for Data {
    type Batch = TrainBatch;

    fn next_batch(&mut self) -> Result<TrainBatch, StepError> {
        let next = self.loader.position();
        if self
            .phases
            .get(self.current + 1)
            .is_some_and(|p| p.start <= next)
        {
            let sample = self.loader.sample_position();
            self.enter(next, sample).map_err(step_err)?;
            tracing::info!(
                iteration = next,
                phase = %self.phase().name,
                global_crops_size = self.phase().crops.global_crops_size,
                batch_size_per_gpu = self.phase().batch_size,
                "curriculum phase starts"
            );
        }
        let b = self.loader.next_batch().map_err(step_err)?;
        let n_images = b.global_shape[0];
        let mut rng = sample_rng(self.cfg.seed, self.cfg.rank, b.iteration, usize::MAX - 1);
        let phase = &self.phases[self.current];
        let m = collate_masks(n_images, &phase.masks, &self.collate, &mut rng).map_err(step_err)?;
        self.last_batch_size = phase.batch_size;
        let d = self.device;
        let ssl = SslBatch {
            global_crops: b.global_tensor().to_device(d),
            local_crops: b.local_tensor().to_device(d),
            masks: m.masks.to_device(d),
            mask_indices_list: m.mask_indices_list.to_device(d),
            masks_weight: m.masks_weight.to_kind(Kind::Float).to_device(d),
            n_masked_patches: m.n_masked_patches,
            upperbound: m.upperbound,
        };
        Ok(TrainBatch {
            iteration: b.iteration,
            ssl,
        })
    }

    fn images_per_batch(&self) -> u64 {
        self.last_batch_size as u64
    }

    /// The next iteration, the global samples (all ranks) consumed before it — the data
    /// order continues from there even under another batch or world size — and the
    /// curriculum phase that iteration trains in.
    fn position(&self) -> serde_json::Value {
        let next = self.loader.position();
        let phase = self
            .phases
            .iter()
            .rev()
            .find(|p| p.start <= next)
            .map_or("", |p| p.name.as_str());
        serde_json::json!({
            "iteration": next,
            "samples": self.loader.sample_position(),
            "phase": phase,
        })
    }

    /// Restarts the workers at the saved iteration and global sample position, in the phase
    /// of that iteration: batches are a function of those, so nothing else needs restoring.
    /// A position without `samples` (written before it was recorded) comes from a run that
    /// kept its world size.
    fn seek(&mut self, position: &serde_json::Value) -> Result<(), StepError> {
        let it = position["iteration"]
            .as_u64()
            .ok_or_else(|| StepError(format!("data position {position} has no iteration")))?;
        let samples = match position.get("samples") {
            None => samples_before(&self.phases, it, self.cfg.world_size),
            Some(s) => s.as_u64().ok_or_else(|| {
                StepError(format!("data position {position}: samples is not a count"))
            })?,
        };
        let saved_phase = position["phase"].as_str();
        let phase = self
            .phases
            .iter()
            .rev()
            .find(|p| p.start <= it)
            .map(|p| p.name.as_str());
        if saved_phase.is_some_and(|s| Some(s) != phase) {
            tracing::warn!(
                iteration = it,
                checkpoint_phase = saved_phase,
                config_phase = phase,
                "training.curriculum changed since the checkpoint: resuming in the phase the \
                 config gives for this iteration"
            );
        }
        if (it, samples) != (self.loader.position(), self.loader.sample_position()) {
            self.enter(it, samples).map_err(step_err)?;
        }
        Ok(())
    }

    fn skipped_images(&self) -> u64 {
        self.loader
            .skipped_counter()
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn queue_depth(&self) -> Option<usize> {
        Some(self.loader.queue_depth())
    }
}

impl Schedules for optim::Schedules {
    fn at(&self, iteration: u64) -> ScheduleValues {
        optim::Schedules::at(self, iteration as usize)
    }
}
