//! One training job, whatever its kind: config -> output directory -> world -> metrics ->
//! components (built by the caller: [`crate::pretrain`] or [`crate::distill`]) -> resume ->
//! [`TrainLoop`]. Shared by `train` and `distill`; the exit code of each failure is decided
//! by the command layer, from the typed errors here.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use dinoflow_api::contract::{self as c, JobKind};
use dinoflow_api::{ConfigError, TrainingConfig};

use crate::checkpoint::{self, CheckpointError, CheckpointManager, ResumeMode, check_compatible};
use crate::cli::TrainArgs;
use crate::config;
use crate::dist::{self, World, WorldError};
use crate::env::{self, EnvError};
use crate::metrics::{JsonlLog, MetricsError, MetricsServer, RunLabels, TrainerMetrics};
use crate::progress_client::ProgressReporter;
use crate::train_loop::{
    BatchSource, Components, LoopError, LoopSettings, NoProgress, Outcome, ProgressHook, RunStart,
    Schedules, TrainLoop, Trainable,
};

/// Why a job failed before, around or inside the loop; `B` is the error of the job kind's
/// component builder (`pretrain::BuildError`, `distill::run::BuildError`).
#[derive(Debug, thiserror::Error)]
pub enum JobError<B: std::error::Error + 'static> {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "output directory {path}: {what}: {source}. Set training.output.dir or --output-dir to a writable directory"
    )]
    OutputDir {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "output directory {path}: {source}. Set training.output.dir or --output-dir to a writable directory"
    )]
    CheckpointDir {
        path: PathBuf,
        #[source]
        source: CheckpointError,
    },
    #[error(
        "DINOFLOW_PEAK_FLOPS={value:?} is not a positive number; set it to the device's peak \
         FLOP/s (e.g. 989e12 for an H100 SXM in bf16) or unset it to skip MFU"
    )]
    PeakFlops { value: String },
    /// The progress variables of the environment contract.
    #[error(transparent)]
    Env(#[from] EnvError),
    #[error(transparent)]
    World(#[from] WorldError),
    #[error("cannot install the signal handler: {0}")]
    Signals(#[source] std::io::Error),
    #[error("cannot start the progress reporter: {0}")]
    Progress(#[source] std::io::Error),
    #[error(transparent)]
    Build(B),
    #[error("resume: {0}")]
    Resume(#[source] CheckpointError),
    /// The ranks would start from different iterations. Retryable: a caching filesystem
    /// shows one pod the newest checkpoint later than the others.
    #[error(
        "{detail}: every rank must see the same checkpoints. Exiting to be restarted (a caching filesystem may not show every pod the newest checkpoint yet); if this repeats, put training.output.dir on storage shared by all pods"
    )]
    RanksDisagree { detail: String },
    /// `model.pretrainedWeights` / `model.weights` could not be loaded.
    #[error("initial weights: {0}")]
    Init(#[source] crate::train_loop::StepError),
    /// A config value the loop cannot take (`checkpoint.bestMetric`).
    #[error(transparent)]
    Mapping(#[from] crate::config::MappingError),
    #[error(transparent)]
    Loop(#[from] LoopError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
}

/// Loads the config named by `args` and runs it as a job of `kind` (the kind the progress
/// reports name) with the components `build` makes for this process's [`World`].
pub fn run<M, D, S, E, B>(args: &TrainArgs, kind: JobKind, build: B) -> Result<Outcome, JobError<E>>
where
    M: Trainable,
    D: BatchSource<Batch = M::Batch>,
    S: Schedules,
    E: std::error::Error + 'static,
    B: FnOnce(&TrainingConfig, &World) -> Result<Components<M, D, S>, E>,
{
    let resolved = dinoflow_api::load_training_config(&args.config)?;
    let mut training = resolved.training;
    if let Some(dir) = &args.output_dir {
        training.output.dir = dir.display().to_string();
    }
    let out = PathBuf::from(&training.output.dir);
    prepare_output_dir(&out)?;
    let process_env = env::process_env();
    // Set but empty is an error here, unlike the contract's other variables.
    let peak_flops = peak_flops((process_env.0)(c::DINOFLOW_PEAK_FLOPS).as_deref())?;
    if let Some(threads) = (process_env.0)(c::DINOFLOW_THREADS).and_then(|t| t.parse().ok()) {
        tch::set_num_threads(threads);
    }
    // DINOFLOW_PROGRESS_ENDPOINT and its token: where rank 0 reports to the operator.
    let (identity, progress_target) = env::job_and_progress(&process_env, kind)?;
    let skip_diverged_data = process_env
        .parsed::<bool>(c::DIVERGENCE_ROLLBACK, "true or false")?
        .unwrap_or(false);
    // RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT from `launch`; unset: one process.
    let world = World::from_env(&process_env)?;
    let collective = world.collective().as_ref();

    let metrics =
        TrainerMetrics::with_labels(&RunLabels::new(identity.as_ref(), kind, world.rank()))?;
    metrics
        .run_attempt
        .set(identity.as_ref().map_or(0, |i| i64::from(i.run_attempt)));
    // One scrape target per pod: the node's first process serves the metrics.
    let _server = match training.logging.metrics_port {
        _ if !world.is_node_main() => None,
        0 => None,
        port => Some(MetricsServer::start(
            ([0, 0, 0, 0], port as u16).into(),
            metrics.clone(),
        )?),
    };
    let mut jsonl = JsonlLog::open(&out.join("metrics.jsonl"))?;
    // Opening removes unfinished checkpoints: rank 0 does it before the others look.
    if !world.is_main() {
        dist::barrier(collective);
    }
    let checkpoints = CheckpointManager::open(
        out.join("checkpoints"),
        training.checkpoint.keep_last as usize,
    )
    .map_err(|source| JobError::CheckpointDir {
        path: out.join("checkpoints"),
        source,
    })?;
    if world.is_main() {
        dist::barrier(collective);
    }

    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).map_err(JobError::Signals)?;
    }

    // Rank 0 reports from here on: building the model, opening the dataset and loading
    // initial weights can take minutes at scale, and count as a long phase (heartbeats), so a
    // slow start is not taken for a hang.
    let mut reporter = match progress_target {
        Some(target) if world.is_main() => {
            Some(ProgressReporter::start(target).map_err(JobError::Progress)?)
        }
        _ => None,
    };
    let mut no_progress = NoProgress;
    let progress: &mut dyn ProgressHook = match &mut reporter {
        Some(r) => r,
        None => &mut no_progress,
    };
    progress.long_phase(true);
    let Components {
        mut model,
        mut data,
        schedules,
        flops_per_image,
        num_classes,
        phases,
    } = build(&training, &world).map_err(JobError::Build)?;
    let total = training.total_iterations();
    let cadences = config::cadences(&training);
    let settings = LoopSettings {
        total_iterations: args.max_iterations.map_or(total, |m| m.min(total)),
        log_every: cadences.log_every,
        checkpoint_every: cadences.checkpoint_every,
        eval_every: cadences.eval_every,
        eval_at_start: true,
        eval_at_end: true,
        // Only rank 0 has evaluation inputs (`pretrain::build_components`); the others wait
        // for it at the next collective.
        eval: config::eval_config(&training, num_classes),
        world_size: world.world_size(),
        config_hash: config::config_hash(&training),
        job: identity
            .as_ref()
            .map(|i| format!("{}/{}/{}", i.kind.as_str(), i.namespace, i.name)),
        guarded: {
            let mut guarded = config::guarded_fields(&training);
            guarded.extend(model.guarded());
            guarded
        },
        flops_per_image,
        peak_flops,
        phases,
        skip_diverged_data,
        best_metric: config::best_metric(&training)?,
    };
    let resume_from = match &args.resume {
        ResumeMode::Never => None,
        ResumeMode::Auto => checkpoints.latest_verified().map_err(JobError::Resume)?,
        ResumeMode::Path(path) => Some(checkpoint::verify(path).map_err(JobError::Resume)?),
    };
    if let Some(ckpt) = &resume_from {
        for warning in check_compatible(&ckpt.manifest, &ckpt.path, &settings.guarded, args.force)
            .map_err(JobError::Resume)?
        {
            tracing::warn!("resuming with --force despite a changed config: {warning}");
        }
    }
    if let Some(ckpt) = &resume_from {
        log_reshard(&training, ckpt, world.world_size());
    }
    progress.run_started(&RunStart {
        world_size: world.world_size(),
        resumed: resume_from.as_ref().map(|c| {
            (
                c.path.as_path(),
                c.manifest.iteration,
                c.manifest.world_size,
            )
        }),
    });
    let mut lp = TrainLoop {
        model: &mut model,
        data: &mut data,
        schedules: &schedules,
        settings,
        checkpoints: &checkpoints,
        metrics: &metrics,
        jsonl: &mut jsonl,
        stop,
        world: &world,
        progress,
    };
    let start = match &resume_from {
        Some(ckpt) => {
            let it = lp.restore(ckpt)?;
            tracing::info!(iteration = it, path = %ckpt.path.display(), "resumed from checkpoint");
            it
        }
        None => {
            lp.model.start_fresh().map_err(JobError::Init)?;
            0
        }
    };
    lp.progress.long_phase(false);
    // A rank that cannot see rank 0's checkpoints would train another model in lockstep.
    dist::ensure_same_on_every_rank(collective, start, "start iteration")
        .map_err(|detail| JobError::RanksDisagree { detail })?;
    tracing::info!(start, total = lp.settings.total_iterations, output = %out.display(), "training");
    let outcome = lp.run(start)?;
    if world.world_size() > 1 {
        // Replicas must end identical; the digest lets a test or a human compare ranks.
        tracing::info!(
            rank = world.rank(),
            student_sha256 = %dist::digest(model.state().get("student").into_iter().flatten()),
            "final student weights"
        );
    }
    Ok(outcome)
}

/// A resume on another world size reshards: every rank reads the ranges its layout needs
/// from whichever old ranks' chunks hold them (parameters and optimizer state exactly), and
/// the data order continues at the checkpoint's global sample. `batchSizePerGpu` is a
/// guarded field, so the global batch becomes `batchSizePerGpu × world size` and the peak
/// learning rate follows the reference's scaling rule for it, as a fresh run on this world
/// size would have; both are logged beside the change.
fn log_reshard(
    training: &TrainingConfig,
    ckpt: &checkpoint::VerifiedCheckpoint,
    world_size: usize,
) {
    let from = ckpt.manifest.world_size;
    if from == world_size {
        return;
    }
    let per_rank = training.train.batch_size_per_gpu as usize;
    tracing::warn!(
        iteration = ckpt.manifest.iteration,
        path = %ckpt.path.display(),
        from_world_size = from,
        to_world_size = world_size,
        global_batch_before = per_rank * from,
        global_batch = per_rank * world_size,
        peak_lr_before = config::peak_lr(training, from),
        peak_lr = config::peak_lr(training, world_size),
        "resharding: the checkpoint was written by {from} ranks and resumes on {world_size}; parameters and optimizer state are re-sliced exactly and the data order continues at its global sample"
    );
}

/// `DINOFLOW_PEAK_FLOPS`: peak FLOP/s of one device, for MFU; unset means MFU is not reported.
pub(crate) fn peak_flops<B: std::error::Error + 'static>(
    value: Option<&str>,
) -> Result<Option<f64>, JobError<B>> {
    let Some(v) = value else { return Ok(None) };
    match v.trim().parse::<f64>() {
        Ok(p) if p.is_finite() && p > 0.0 => Ok(Some(p)),
        _ => Err(JobError::PeakFlops { value: v.into() }),
    }
}

/// Creates the output directory and proves it writable before any work is done.
pub(crate) fn prepare_output_dir<B: std::error::Error + 'static>(
    out: &Path,
) -> Result<(), JobError<B>> {
    let err = |what: &'static str| {
        move |source| JobError::OutputDir {
            path: out.to_path_buf(),
            what,
            source,
        }
    };
    std::fs::create_dir_all(out).map_err(err("cannot create it"))?;
    let probe = out.join(format!(".write-probe-{}", std::process::id()));
    std::fs::write(&probe, b"probe").map_err(err("not writable"))?;
    std::fs::remove_file(&probe).map_err(err("cannot remove a file in it"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MappingError;

    #[test]
    fn peak_flops_is_optional_but_must_be_a_positive_number_when_set() {
        assert_eq!(peak_flops::<MappingError>(None).unwrap(), None);
        assert_eq!(
            peak_flops::<MappingError>(Some("989e12")).unwrap(),
            Some(989e12)
        );
        for bad in ["0", "-1", "fast", "inf"] {
            let err = peak_flops::<MappingError>(Some(bad)).unwrap_err();
            assert!(matches!(err, JobError::PeakFlops { .. }), "{err}");
            assert!(err.to_string().contains("DINOFLOW_PEAK_FLOPS"), "{err}");
        }
    }

    #[test]
    fn an_unwritable_output_directory_names_the_flag_and_keeps_the_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let err = prepare_output_dir::<MappingError>(&file.join("out")).unwrap_err();
        assert!(err.to_string().contains("--output-dir"), "{err}");
        assert!(std::error::Error::source(&err).is_some(), "{err}");
    }
}
