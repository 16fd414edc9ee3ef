//! `dinoflow-trainer train`: config -> output directory -> metrics -> components -> resume
//! -> loop, with every failure mapped to the exit-code contract.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use dinoflow_api::exit_codes::{NON_FINITE_LOSS, PERMANENT_FAILURE, STOPPED_BY_SIGNAL};
use dinoflow_api::{ConfigError, TrainingConfig};

use tch::Device;

use super::components::{Data, Model};
use super::{
    BatchSource, LoopError, LoopSettings, NoProgress, Outcome, ProgressHook, Schedules, TrainLoop,
    Trainable,
};
use crate::checkpoint::{self, CheckpointError, CheckpointManager, ResumeMode, check_compatible};
use crate::cli::TrainArgs;
use crate::config;
use crate::data::{DataError, Dataset, LoaderConfig, open_dataset};
use crate::dist::{self, Collective, DistEnv};
use crate::eval::{EvalInputs, EvalTransform, LabelledSplit};
use crate::launch::env::JobKind;
use crate::masking::MaskGenerator;
use crate::meta_arch::MetaArch;
use crate::metrics::{JsonlLog, MetricsError, MetricsServer, RunLabels, TrainerMetrics};
use crate::optim;
use crate::progress_client::ProgressReporter;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "output directory {path}: {reason}. Set training.output.dir or --output-dir to a writable directory"
    )]
    OutputDir { path: PathBuf, reason: String },
    /// A missing or empty dataset, or another input no retry can fix.
    #[error("{0}")]
    Permanent(String),
    /// Something a restart may fix (I/O hiccup, lost peer).
    #[error("{0}")]
    Transient(String),
    #[error("resume: {0}")]
    Resume(#[source] CheckpointError),
    #[error(transparent)]
    Loop(#[from] LoopError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
}

impl TrainError {
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Config(_) | Self::OutputDir { .. } | Self::Permanent(_) => PERMANENT_FAILURE,
            // An explicit checkpoint that does not verify, or a refused config change: a
            // restart would meet the same checkpoint.
            Self::Resume(
                CheckpointError::Incompatible { .. }
                | CheckpointError::NotFound { .. }
                | CheckpointError::Corrupt { .. },
            ) => PERMANENT_FAILURE,
            Self::Loop(LoopError::NonFiniteLoss { .. }) => NON_FINITE_LOSS,
            Self::Loop(LoopError::Restore { .. }) => PERMANENT_FAILURE,
            _ => 1,
        }
    }
}

impl Outcome {
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Finished { .. } => 0,
            Self::Stopped { .. } => STOPPED_BY_SIGNAL,
        }
    }
}

/// What the model/data side gives the loop.
#[derive(Debug)]
pub struct Components<M, D, S> {
    pub model: M,
    pub data: D,
    pub schedules: S,
    pub flops_per_image: Option<f64>,
    pub num_classes: i64,
}

/// Loads the config named by `args` and runs it with the components `build` makes, as a job
/// of `kind` (the kind the progress reports name).
pub fn train_with<M, D, S, B>(
    args: &TrainArgs,
    kind: JobKind,
    build: B,
) -> Result<Outcome, TrainError>
where
    M: Trainable,
    D: BatchSource<Batch = M::Batch>,
    S: Schedules,
    B: FnOnce(
        &TrainingConfig,
        &Path,
        &Arc<dyn Collective>,
    ) -> Result<Components<M, D, S>, TrainError>,
{
    let resolved = dinoflow_api::load_training_config(&args.config)?;
    let mut training = resolved.training;
    if let Some(dir) = &args.output_dir {
        training.output.dir = dir.display().to_string();
    }
    let out = PathBuf::from(&training.output.dir);
    prepare_output_dir(&out)?;
    let peak_flops = peak_flops(std::env::var("DINOFLOW_PEAK_FLOPS").ok().as_deref())?;
    if let Some(threads) = std::env::var("DINOFLOW_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
    {
        tch::set_num_threads(threads);
    }

    // RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT from `launch`; unset: one process.
    let dist_env = DistEnv::from_lookup(&crate::launch::env::process_env())
        .map_err(|e| TrainError::Permanent(e.to_string()))?;
    let local_rank = dist_env.as_ref().map_or(0, |d| d.local_rank);
    // DINOFLOW_PROGRESS_ENDPOINT and its token: where rank 0 reports to the operator.
    let (identity, progress_target) =
        crate::launch::env::job_and_progress(&crate::launch::env::process_env(), kind)
            .map_err(|e| TrainError::Permanent(e.to_string()))?;
    let collective = dist::init(dist_env.as_ref())
        .map_err(|e| TrainError::Transient(format!("distributed setup: {e}")))?;
    let rank = collective.rank();

    let metrics = TrainerMetrics::with_labels(&RunLabels::new(identity.as_ref(), kind, rank))?;
    metrics
        .run_attempt
        .set(identity.as_ref().map_or(0, |i| i64::from(i.run_attempt)));
    // One scrape target per pod: the node's first process serves the metrics.
    let _server = match training.logging.metrics_port {
        _ if local_rank != 0 => None,
        0 => None,
        port => Some(MetricsServer::start(
            ([0, 0, 0, 0], port as u16).into(),
            metrics.clone(),
        )?),
    };
    let mut jsonl = JsonlLog::open(&out.join("metrics.jsonl"))?;
    // Opening removes unfinished checkpoints: rank 0 does it before the others look.
    if rank != 0 {
        dist::barrier(collective.as_ref());
    }
    let checkpoints = CheckpointManager::open(
        out.join("checkpoints"),
        training.checkpoint.keep_last as usize,
    )
    .map_err(|e| TrainError::OutputDir {
        path: out.join("checkpoints"),
        reason: e.to_string(),
    })?;
    if rank == 0 {
        dist::barrier(collective.as_ref());
    }

    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).map_err(|e| {
            TrainError::Transient(format!("cannot install the signal handler: {e}"))
        })?;
    }

    let Components {
        mut model,
        mut data,
        schedules,
        flops_per_image,
        num_classes,
    } = build(&training, &out, &collective)?;
    let total = training.total_iterations();
    let settings = LoopSettings {
        total_iterations: args.max_iterations.map_or(total, |m| m.min(total)),
        log_every: u64::from(training.logging.every_iterations),
        checkpoint_every: training
            .checkpoint
            .period(training.train.official_epoch_length),
        eval_every: u64::from(training.evaluation.period_iterations),
        eval_at_start: true,
        eval_at_end: true,
        // Only rank 0 has evaluation inputs (`build_components`); the others wait for it at
        // the next collective.
        eval: config::eval_config(&training, num_classes),
        world_size: collective.world_size(),
        config_hash: config::config_hash(&training),
        guarded: {
            let mut guarded = config::guarded_fields(&training);
            guarded.extend(model.guarded());
            guarded
        },
        flops_per_image,
        peak_flops,
    };
    let resume_from = match &args.resume {
        ResumeMode::Never => None,
        ResumeMode::Auto => checkpoints.latest_verified().map_err(TrainError::Resume)?,
        ResumeMode::Path(path) => Some(checkpoint::verify(path).map_err(TrainError::Resume)?),
    };
    if let Some(ckpt) = &resume_from {
        for warning in check_compatible(&ckpt.manifest, &ckpt.path, &settings.guarded, args.force)
            .map_err(TrainError::Resume)?
        {
            tracing::warn!("resuming with --force despite a changed config: {warning}");
        }
    }
    let mut reporter = match progress_target {
        Some(target) if rank == 0 => Some(ProgressReporter::start(target).map_err(|e| {
            TrainError::Transient(format!("cannot start the progress reporter: {e}"))
        })?),
        _ => None,
    };
    let mut no_progress = NoProgress;
    let progress: &mut dyn ProgressHook = match &mut reporter {
        Some(r) => r,
        None => &mut no_progress,
    };
    let mut lp = TrainLoop {
        model: &mut model,
        data: &mut data,
        schedules: &schedules,
        settings,
        checkpoints: &checkpoints,
        metrics: &metrics,
        jsonl: &mut jsonl,
        stop,
        collective: collective.as_ref(),
        progress,
    };
    let start = match &resume_from {
        Some(ckpt) => {
            let it = lp.restore(ckpt)?;
            tracing::info!(iteration = it, path = %ckpt.path.display(), "resumed from checkpoint");
            it
        }
        None => 0,
    };
    // A rank that cannot see rank 0's checkpoints would train another model in lockstep.
    dist::ensure_same_on_every_rank(collective.as_ref(), start, "start iteration").map_err(
        |e| {
            TrainError::Permanent(format!(
                "{e}: every rank must see the same checkpoints; put training.output.dir on storage shared by all pods"
            ))
        },
    )?;
    tracing::info!(start, total = lp.settings.total_iterations, output = %out.display(), "training");
    let outcome = lp.run(start)?;
    if collective.world_size() > 1 {
        // Replicas must end identical; the digest lets a test or a human compare ranks.
        tracing::info!(
            rank,
            student_sha256 = %dist::digest(model.state().get("student").into_iter().flatten()),
            "final student weights"
        );
    }
    Ok(outcome)
}

/// `DINOFLOW_PEAK_FLOPS`: peak FLOP/s of one device, for MFU; unset means MFU is not reported.
fn peak_flops(value: Option<&str>) -> Result<Option<f64>, TrainError> {
    let Some(v) = value else { return Ok(None) };
    match v.trim().parse::<f64>() {
        Ok(p) if p.is_finite() && p > 0.0 => Ok(Some(p)),
        _ => Err(TrainError::Permanent(format!(
            "DINOFLOW_PEAK_FLOPS={v:?} is not a positive number; set it to the device's peak \
             FLOP/s (e.g. 989e12 for an H100 SXM in bf16) or unset it to skip MFU"
        ))),
    }
}

/// Creates the output directory and proves it writable before any work is done.
fn prepare_output_dir(out: &Path) -> Result<(), TrainError> {
    let err = |reason: String| TrainError::OutputDir {
        path: out.to_path_buf(),
        reason,
    };
    std::fs::create_dir_all(out).map_err(|e| err(format!("cannot create it: {e}")))?;
    let probe = out.join(format!(".write-probe-{}", std::process::id()));
    std::fs::write(&probe, b"probe").map_err(|e| err(format!("not writable: {e}")))?;
    std::fs::remove_file(&probe).map_err(|e| err(format!("cannot remove a file in it: {e}")))?;
    Ok(())
}

/// The binary's entry, to become `main.rs` once `dinoflow_api::load` is merged: validate
/// prints the resolved config or exits 78 naming the YAML path; train maps outcomes and
/// errors to the exit-code contract.
pub fn main_entry(cli: crate::cli::Cli) -> i32 {
    use crate::cli::Command;
    match cli.command {
        Command::Validate { config } => match dinoflow_api::load::load_training_config(&config) {
            Ok(resolved) => {
                print!("{}", dinoflow_api::load::render_yaml(&resolved));
                0
            }
            Err(e) => {
                eprintln!("error: {}: {e}", config.display());
                e.exit_code()
            }
        },
        Command::Launch(args) => crate::launch::run(&args),
        Command::Distill(args) => {
            report(crate::distill::run::distill(&args).map(|o| o.exit_code()))
        }
        Command::Export(args) => report(crate::export::export(&args.source, &args.out).map(|_| 0)),
        Command::Eval(args) => report(crate::eval::command::run(&args).and_then(|r| {
            println!("{r}");
            match &args.out {
                Some(out) => std::fs::write(out, format!("{r:#}\n"))
                    .map(|()| 0)
                    .map_err(|e| TrainError::Permanent(format!("--out {}: {e}", out.display()))),
                None => Ok(0),
            }
        })),
        Command::Train(args) => {
            report(train_with(&args, JobKind::Pretrain, build_components).map(|o| o.exit_code()))
        }
    }
}

/// The exit code of a command's result, printing its error.
fn report(result: Result<i32, TrainError>) -> i32 {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

/// CUDA device of this process (`LOCAL_RANK` picks among the node's GPUs), else the CPU.
pub(crate) fn local_device() -> Device {
    if !tch::Cuda::is_available() {
        return Device::Cpu;
    }
    let local: usize = std::env::var("LOCAL_RANK")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    Device::Cuda(local % tch::Cuda::device_count().max(1) as usize)
}

pub(crate) fn data_error(e: DataError) -> TrainError {
    if e.is_permanent() {
        TrainError::Permanent(format!("training.data: {e}"))
    } else {
        TrainError::Transient(format!("training.data: {e}"))
    }
}

/// The real components: DINOv2 meta-architecture, data loader with mask collation, official
/// schedules. One process, CUDA when present.
pub fn build_components(
    training: &TrainingConfig,
    _out: &Path,
    collective: &Arc<dyn Collective>,
) -> Result<Components<Model, Data, optim::Schedules>, TrainError> {
    let permanent = |e: &dyn std::fmt::Display| TrainError::Permanent(e.to_string());
    let device = local_device();
    let (rank, world_size) = (collective.rank(), collective.world_size());
    let seed = training.train.seed;
    let arch_cfg = config::meta_arch_config(training).map_err(|e| permanent(&e))?;
    let flops_per_image = Some(config::flops_per_image(training, &arch_cfg));
    let (patch, global) = (
        arch_cfg.student.patch_size as usize,
        training.crops.global_crops_size as usize,
    );
    // The same seed for init on every rank, as the official `fix_random_seeds`.
    tch::manual_seed(seed as i64);
    let arch =
        MetaArch::new(arch_cfg, device).map_err(|e| permanent(&format!("training.model: {e}")))?;
    // Start every replica from rank 0's weights (DDP's initial broadcast): the same seed
    // gives the same init only on identical hardware and libraries.
    for vs in [&arch.student.vs, &arch.teacher.vs] {
        // Name order: the buckets must line up on every rank (a HashMap's order does not).
        let sorted: std::collections::BTreeMap<_, _> = vs.variables().into_iter().collect();
        let mut vars: Vec<tch::Tensor> = sorted.into_values().collect();
        dist::broadcast_parameters(collective.as_ref(), &mut vars);
    }
    let schedules = optim::Schedules::new(&config::schedules_config(training, world_size))
        .map_err(|e| permanent(&format!("training.optim: {e}")))?;

    let path = Path::new(&training.data.path);
    let dataset = open_dataset(&config::dataset_kind(training), path).map_err(data_error)?;
    let num_classes = dataset.num_classes().unwrap_or(0) as i64;
    let loader = LoaderConfig {
        batch_size: training.train.batch_size_per_gpu as usize,
        num_workers: training.data.num_workers as usize,
        seed,
        rank,
        world_size,
        crops: config::multi_crop_config(training).map_err(|e| permanent(&e))?,
        ..LoaderConfig::default()
    };
    let masks = MaskGenerator::for_global_crops(global, patch).map_err(|e| permanent(&e))?;
    // Only rank 0 evaluates (the replicas are identical), so only it opens the val split.
    let eval = if rank == 0 {
        eval_inputs(training, &dataset)?
    } else {
        None
    };
    let data = Data::new(
        dataset,
        loader,
        masks,
        config::mask_collate_config(training),
        device,
    )
    .map_err(data_error)?;
    Ok(Components {
        model: Model {
            arch,
            seed,
            rank,
            collective: Box::new(Arc::clone(collective)),
            eval,
        },
        data,
        schedules,
        flops_per_image,
        num_classes,
    })
}

/// Images per evaluation forward (official k-NN `batch_size`).
const EVAL_BATCH_SIZE: usize = 256;

/// The labelled splits of the evaluation hooks: the training dataset as the k-NN reference
/// (official protocol) and `training.data.valPath` as the reported split. None when both hooks
/// are off or no `valPath` is set (the schema documents that evaluation is then skipped).
pub(crate) fn eval_inputs(
    training: &TrainingConfig,
    train: &Arc<dyn Dataset>,
) -> Result<Option<EvalInputs>, TrainError> {
    if config::eval_config(training, 0).is_none() {
        return Ok(None);
    }
    let Some(val_path) = &training.data.val_path else {
        tracing::info!("evaluation skipped: training.data.valPath is not set");
        return Ok(None);
    };
    let val = open_dataset(&config::val_dataset_kind(training), Path::new(val_path))
        .map_err(|e| TrainError::Permanent(format!("training.data.valPath: {e}")))?;
    let labelled = |name, dataset, field: &str| {
        LabelledSplit::new(name, dataset).map_err(|e| {
            TrainError::Permanent(format!(
                "{field}: {e}. Point it at labelled data, or turn evaluation off with \
                 training.evaluation.knn.enabled: false and linearProbe.enabled: false"
            ))
        })
    };
    let crops =
        config::multi_crop_config(training).map_err(|e| TrainError::Permanent(e.to_string()))?;
    let mut reference = labelled("train", Arc::clone(train), "training.data.path")?;
    if let Some(max) = training.evaluation.max_train_images {
        if max == 0 {
            return Err(TrainError::Permanent(
                "training.evaluation.maxTrainImages: must be >= 1; remove it to use the whole \
                 training split"
                    .into(),
            ));
        }
        reference = reference.subsample(max as usize);
    }
    Ok(Some(EvalInputs {
        train: reference,
        test: labelled("validation", val, "training.data.valPath")?,
        transform: EvalTransform::official(crops.global_crops_size, crops.mean, crops.std),
        batch_size: EVAL_BATCH_SIZE,
        threads: (training.data.num_workers as usize).max(1),
        n_last_blocks: 4,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unwritable_output_directory_is_a_permanent_failure() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let err = prepare_output_dir(&file.join("out")).unwrap_err();
        assert_eq!(err.exit_code(), PERMANENT_FAILURE);
        assert!(err.to_string().contains("--output-dir"), "{err}");
    }

    #[test]
    fn peak_flops_is_optional_but_must_be_a_positive_number_when_set() {
        assert_eq!(peak_flops(None).unwrap(), None);
        assert_eq!(peak_flops(Some("989e12")).unwrap(), Some(989e12));
        for bad in ["0", "-1", "fast", "inf"] {
            let err = peak_flops(Some(bad)).unwrap_err();
            assert_eq!(err.exit_code(), PERMANENT_FAILURE);
            assert!(err.to_string().contains("DINOFLOW_PEAK_FLOPS"), "{err}");
        }
    }

    #[test]
    fn exit_codes_follow_the_contract() {
        let nan = TrainError::Loop(LoopError::NonFiniteLoss {
            iteration: 3,
            terms: String::new(),
            last_iteration: 2,
            last_finite: String::new(),
        });
        assert_eq!(nan.exit_code(), NON_FINITE_LOSS);
        let refused = TrainError::Resume(CheckpointError::Incompatible {
            path: "/c".into(),
            diffs: vec![],
        });
        assert_eq!(refused.exit_code(), PERMANENT_FAILURE);
        assert_eq!(TrainError::Transient("peer lost".into()).exit_code(), 1);
        assert_eq!(
            Outcome::Stopped { iteration: 4 }.exit_code(),
            STOPPED_BY_SIGNAL
        );
        assert_eq!(Outcome::Finished { iteration: 4 }.exit_code(), 0);
    }
}
