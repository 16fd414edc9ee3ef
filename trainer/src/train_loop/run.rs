//! `dinoflow-trainer train`: config -> output directory -> metrics -> components -> resume
//! -> loop, with every failure mapped to the exit-code contract.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use dinoflow_api::exit_codes::{NON_FINITE_LOSS, PERMANENT_FAILURE};
use dinoflow_api::{ConfigError, TrainingConfig};

use tch::Device;

use super::components::{Data, Model};
use super::{BatchSource, LoopError, LoopSettings, Outcome, Schedules, TrainLoop, Trainable};
use crate::checkpoint::{self, CheckpointError, CheckpointManager, ResumeMode, check_compatible};
use crate::cli::TrainArgs;
use crate::config;
use crate::data::{DataError, LoaderConfig, open_dataset};
use crate::masking::MaskGenerator;
use crate::meta_arch::MetaArch;
use crate::metrics::{JsonlLog, MetricsError, MetricsServer, TrainerMetrics};
use crate::optim;

/// Exit code of a run stopped by SIGTERM/SIGINT after writing its checkpoint: 128 + 15, as
/// a shell reports it. It is retryable by contract, so a stopped gang resumes.
pub const STOPPED_BY_SIGNAL: i32 = 143;

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

/// Loads the config named by `args` and runs it with the components `build` makes.
pub fn train_with<M, D, S, B>(args: &TrainArgs, build: B) -> Result<Outcome, TrainError>
where
    M: Trainable,
    D: BatchSource<Batch = M::Batch>,
    S: Schedules,
    B: FnOnce(&TrainingConfig, &Path) -> Result<Components<M, D, S>, TrainError>,
{
    let resolved = dinoflow_api::load_training_config(&args.config)?;
    let mut training = resolved.training;
    if let Some(dir) = &args.output_dir {
        training.output.dir = dir.display().to_string();
    }
    let out = PathBuf::from(&training.output.dir);
    prepare_output_dir(&out)?;
    if let Some(threads) = std::env::var("DINOFLOW_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
    {
        tch::set_num_threads(threads);
    }

    let metrics = TrainerMetrics::new()?;
    let _server = match training.logging.metrics_port {
        0 => None,
        port => Some(MetricsServer::start(
            ([0, 0, 0, 0], port as u16).into(),
            metrics.clone(),
        )?),
    };
    let mut jsonl = JsonlLog::open(&out.join("metrics.jsonl"))?;
    let checkpoints = CheckpointManager::open(
        out.join("checkpoints"),
        training.checkpoint.keep_last as usize,
    )
    .map_err(|e| TrainError::OutputDir {
        path: out.join("checkpoints"),
        reason: e.to_string(),
    })?;

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
    } = build(&training, &out)?;
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
        eval: config::eval_config(&training, num_classes),
        world_size: 1,
        config_hash: config::config_hash(&training),
        guarded: config::guarded_fields(&training),
        flops_per_image,
        peak_flops: std::env::var("DINOFLOW_PEAK_FLOPS")
            .ok()
            .and_then(|p| p.parse().ok()),
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
    let mut lp = TrainLoop {
        model: &mut model,
        data: &mut data,
        schedules: &schedules,
        settings,
        checkpoints: &checkpoints,
        metrics: &metrics,
        jsonl: &mut jsonl,
        stop,
    };
    let start = match &resume_from {
        Some(ckpt) => {
            let it = lp.restore(ckpt)?;
            tracing::info!(iteration = it, path = %ckpt.path.display(), "resumed from checkpoint");
            it
        }
        None => 0,
    };
    tracing::info!(start, total = lp.settings.total_iterations, output = %out.display(), "training");
    Ok(lp.run(start)?)
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
        Command::Train(args) => match train_with(&args, build_components) {
            Ok(outcome) => outcome.exit_code(),
            Err(e) => {
                eprintln!("error: {e}");
                e.exit_code()
            }
        },
    }
}

fn data_error(e: DataError) -> TrainError {
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
) -> Result<Components<Model, Data, optim::Schedules>, TrainError> {
    let permanent = |e: &dyn std::fmt::Display| TrainError::Permanent(e.to_string());
    let device = Device::cuda_if_available();
    let world_size = 1;
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
    let schedules = optim::Schedules::new(&config::schedules_config(training, world_size))
        .map_err(|e| permanent(&format!("training.optim: {e}")))?;

    let path = Path::new(&training.data.path);
    let dataset = open_dataset(&config::dataset_kind(training), path).map_err(data_error)?;
    let num_classes = dataset.num_classes().unwrap_or(0) as i64;
    let loader = LoaderConfig {
        batch_size: training.train.batch_size_per_gpu as usize,
        num_workers: training.data.num_workers as usize,
        seed,
        rank: 0,
        world_size,
        crops: config::multi_crop_config(training).map_err(|e| permanent(&e))?,
        ..LoaderConfig::default()
    };
    let masks = MaskGenerator::for_global_crops(global, patch).map_err(|e| permanent(&e))?;
    let data = Data::new(
        dataset,
        loader,
        masks,
        config::mask_collate_config(training),
        device,
    )
    .map_err(data_error)?;
    Ok(Components {
        model: Model::single(arch, seed),
        data,
        schedules,
        flops_per_image,
        num_classes,
    })
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
