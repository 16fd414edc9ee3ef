//! DINOv2 pretraining (`PretrainJob`): the components [`crate::job::run`] trains, wired from a
//! `training:` config for this process's [`World`]: the meta-architecture (replicas started
//! from rank 0's weights), the official schedules, the data loader with iBOT mask collation,
//! and on rank 0 the labelled splits of the evaluation hooks.
use std::path::Path;
use std::sync::Arc;

use dinoflow_api::TrainingConfig;

use crate::config::{self, MappingError};
use crate::curriculum::{Curriculum, PhasedSchedules};
use crate::data::{DataError, Dataset, open_dataset};
use crate::dist::{self, World};
use crate::eval::{EvalError, EvalInputs, EvalTransform, LabelledSplit};
use crate::masking::{MaskGenerator, MaskingError};
use crate::meta_arch::{MetaArch, MetaArchError};
use crate::optim::ScheduleError;
use crate::train_loop::components::{Data, DataPhase, Model};
use crate::train_loop::{Components, LoopPhase};

/// Why building the pretraining model, data and schedules failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A `training:` field that does not map onto the model, crops or heads.
    #[error(transparent)]
    Mapping(#[from] MappingError),
    #[error("training.model: {0}")]
    Model(#[source] MetaArchError),
    #[error("training.optim: {0}")]
    Schedule(#[source] ScheduleError),
    #[error("training.data: {0}")]
    Data(#[source] DataError),
    #[error(transparent)]
    Masks(#[from] MaskingError),
    #[error(transparent)]
    EvalInputs(#[from] EvalInputsError),
}

/// Why the labelled splits of the evaluation hooks could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EvalInputsError {
    #[error("training.data.valPath: {0}")]
    ValData(#[source] DataError),
    #[error(
        "{field}: {source}. Point it at labelled data, or turn evaluation off with \
         training.evaluation.knn.enabled: false and linearProbe.enabled: false"
    )]
    Unlabelled {
        field: &'static str,
        #[source]
        source: EvalError,
    },
    #[error(transparent)]
    Crops(#[from] MappingError),
    #[error(
        "training.evaluation.maxTrainImages: must be >= 1; remove it to use the whole \
         training split"
    )]
    NoTrainImages,
}

/// The real components: DINOv2 meta-architecture, data loader with mask collation, official
/// schedules, on the world's device.
pub fn build_components(
    training: &TrainingConfig,
    world: &World,
) -> Result<Components<Model, Data, PhasedSchedules>, BuildError> {
    let device = world.device();
    let seed = training.train.seed;
    let arch_cfg = config::meta_arch_config(training)?;
    let flops_per_image = Some(config::flops_per_image(training, &arch_cfg));
    let patch = arch_cfg.student.patch_size as usize;
    let curriculum = Curriculum::from_config(training)?;
    // The same seed for init on every rank, as the official `fix_random_seeds`.
    tch::manual_seed(seed as i64);
    let arch = MetaArch::new(arch_cfg, device).map_err(BuildError::Model)?;
    // Start every replica from rank 0's weights (DDP's initial broadcast): the same seed
    // gives the same init only on identical hardware and libraries.
    for vs in [&arch.student.vs, &arch.teacher.vs] {
        // Name order: the buckets must line up on every rank (a HashMap's order does not).
        let sorted: std::collections::BTreeMap<_, _> = vs.variables().into_iter().collect();
        let mut vars: Vec<tch::Tensor> = sorted.into_values().collect();
        dist::broadcast_parameters(world.collective().as_ref(), &mut vars);
    }
    // Each phase's learning rate follows the scaling rule for its batch (`curriculum`).
    let schedules =
        PhasedSchedules::new(&curriculum, world.world_size()).map_err(BuildError::Schedule)?;

    let path = Path::new(&training.data.path);
    let dataset = open_dataset(&config::dataset_kind(training), path).map_err(BuildError::Data)?;
    let num_classes = dataset.num_classes().unwrap_or(0) as i64;
    let loader = config::loader_config(training, world.rank(), world.world_size())?;
    let mut data_phases = Vec::new();
    let mut loop_phases = Vec::new();
    for phase in curriculum.phases() {
        let t = &phase.training;
        data_phases.push(DataPhase {
            name: phase.name.clone(),
            start: phase.start,
            batch_size: t.train.batch_size_per_gpu as usize,
            crops: config::multi_crop_config(t)?,
            // The iBOT mask grid follows the global crop (crop / patch a side).
            masks: MaskGenerator::for_global_crops(t.crops.global_crops_size as usize, patch)?,
        });
        loop_phases.push(LoopPhase {
            name: phase.name.clone(),
            start: phase.start,
            flops_per_image: Some(config::flops_per_image(t, &config::meta_arch_config(t)?)),
            describe: phase.describe(),
        });
    }
    if !curriculum.is_configured() {
        loop_phases.clear();
    }
    // Only rank 0 evaluates (the replicas are identical), so only it opens the val split.
    let eval = if world.is_main() {
        eval_inputs(training, &dataset)?
    } else {
        None
    };
    let data = Data::with_phases(
        dataset,
        loader,
        data_phases,
        config::mask_collate_config(training),
        device,
    )
    .map_err(BuildError::Data)?;
    Ok(Components {
        model: Model {
            arch,
            seed,
            rank: world.rank(),
            collective: Box::new(Arc::clone(world.collective())),
            eval,
            init: crate::pretrained::from_config(training, &crate::weights::torch_home()),
        },
        data,
        schedules,
        flops_per_image,
        num_classes,
        phases: loop_phases,
    })
}

/// Images per evaluation forward (official k-NN `batch_size`).
const EVAL_BATCH_SIZE: usize = 256;

/// The labelled splits of the evaluation hooks: the training dataset as the k-NN reference
/// (official protocol) and `training.data.valPath` as the reported split. None when both hooks
/// are off or no `valPath` is set (the schema documents that evaluation is then skipped).
pub fn eval_inputs(
    training: &TrainingConfig,
    train: &Arc<dyn Dataset>,
) -> Result<Option<EvalInputs>, EvalInputsError> {
    if config::eval_config(training, 0).is_none() {
        return Ok(None);
    }
    let Some(val_path) = &training.data.val_path else {
        tracing::info!("evaluation skipped: training.data.valPath is not set");
        return Ok(None);
    };
    let val = open_dataset(&config::val_dataset_kind(training), Path::new(val_path))
        .map_err(EvalInputsError::ValData)?;
    let labelled = |name, dataset, field: &'static str| {
        LabelledSplit::new(name, dataset)
            .map_err(|source| EvalInputsError::Unlabelled { field, source })
    };
    let crops = config::multi_crop_config(training)?;
    let mut reference = labelled("train", Arc::clone(train), "training.data.path")?;
    if let Some(max) = training.evaluation.max_train_images {
        if max == 0 {
            return Err(EvalInputsError::NoTrainImages);
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
