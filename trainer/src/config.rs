//! Maps `dinoflow_api::TrainingConfig` onto the trainer modules' own parameter structs, and
//! derives the run's identity (config hash, guarded fields) for checkpoints.
use std::collections::BTreeMap;

use dinoflow_api::TrainingConfig;
use dinoflow_api::training::{
    Arch, Centering, DatasetSplit, Dtype, FfnLayer as ApiFfn, ScalingRule, ShardingStrategy,
};

use crate::checkpoint::manifest::hash_bytes;
use crate::data::augment::{ColorJitterConfig, CropExtras};
use crate::data::{DatasetKind, ImageNetSplit, LoaderConfig, MultiCropConfig};
use crate::eval::{EvalConfig, KnnConfig, LinearConfig};
use crate::loss::CenteringMode;
use crate::masking::MaskCollateConfig;
use crate::meta_arch::MetaArchConfig;
use crate::model::{DinoHeadConfig, FfnLayer, VitConfig};
use crate::optim::{AdamWConfig, LrScalingRule, ParamGroupConfig, SchedulesConfig, scaled_lr};
use crate::parallel::{ModuleParallel, ParallelConfig, Sharding};
use crate::precision::LossScalerConfig;
use crate::precision::Precision;

/// A config value the trainer modules cannot take, at its YAML path.
#[derive(Debug, thiserror::Error)]
#[error("training.{field}: {message}")]
pub struct MappingError {
    pub field: &'static str,
    pub message: String,
}

/// sha256 of the canonical JSON of the resolved config (serde_json orders map keys, so equal
/// configs hash equal whatever the YAML's key order).
pub fn config_hash(training: &TrainingConfig) -> String {
    let value = serde_json::to_value(training).expect("configs serialise to JSON");
    hash_bytes(value.to_string().as_bytes())
}

/// The config values whose change would silently change a resumed run: the architecture
/// (backbone and heads), the batch size and the dataset. Keyed by YAML path.
pub fn guarded_fields(training: &TrainingConfig) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    out.insert("training.model".into(), json(&training.model));
    out.insert("training.dino".into(), json(&training.dino));
    out.insert("training.ibot".into(), json(&training.ibot));
    out.insert(
        "training.train.batchSizePerGpu".into(),
        training.train.batch_size_per_gpu.to_string(),
    );
    out.insert("training.data.kind".into(), json(&training.data.kind));
    out.insert("training.data.path".into(), training.data.path.clone());
    out
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("config sections serialise to JSON")
}

/// The evaluation hooks' settings, or None when both k-NN and the linear probe are off.
pub fn eval_config(training: &TrainingConfig, num_classes: i64) -> Option<EvalConfig> {
    let e = &training.evaluation;
    if !e.knn.enabled && !e.linear_probe.enabled {
        return None;
    }
    Some(EvalConfig {
        num_classes,
        knn: KnnConfig {
            ks: if e.knn.enabled {
                e.knn.k.iter().map(|&k| k as usize).collect()
            } else {
                Vec::new()
            },
            temperature: e.knn.temperature,
            ..KnnConfig::default()
        },
        linear: e.linear_probe.enabled.then(|| LinearConfig {
            learning_rates: e.linear_probe.learning_rates.clone(),
            epochs: e.linear_probe.epochs as usize,
            batch_size: i64::from(e.linear_probe.batch_size),
            seed: training.train.seed as i64,
            ..LinearConfig::default()
        }),
    })
}

/// The student backbone (`training.model`); `img_size` is the global crop size, as the
/// official `build_model` does.
pub fn vit_config(t: &TrainingConfig) -> Result<VitConfig, MappingError> {
    let m = &t.model;
    let (embed_dim, depth, num_heads) = match (m.arch.dims(), m.embed_dim, m.depth, m.num_heads) {
        (Some(d), ..) if m.arch != Arch::Custom => d,
        (_, Some(e), Some(d), Some(h)) => (e, d, h),
        _ => {
            return Err(MappingError {
                field: "model",
                message: "arch custom needs embedDim, depth and numHeads".into(),
            });
        }
    };
    Ok(VitConfig {
        img_size: i64::from(t.crops.global_crops_size),
        patch_size: i64::from(m.patch_size),
        // The loader always yields RGB (grayscale images are replicated over 3 channels).
        in_chans: 3,
        embed_dim: i64::from(embed_dim),
        depth: i64::from(depth),
        num_heads: i64::from(num_heads),
        mlp_ratio: 4.0,
        qkv_bias: m.qkv_bias,
        proj_bias: m.proj_bias,
        ffn_bias: m.ffn_bias,
        drop_path_rate: m.drop_path_rate,
        drop_path_uniform: m.drop_path_uniform,
        layerscale: (m.layerscale > 0.0).then_some(m.layerscale),
        ffn_layer: match m.ffn_layer {
            ApiFfn::Mlp => FfnLayer::Mlp,
            ApiFfn::Swiglu | ApiFfn::Swiglufused => FfnLayer::SwiGluFused,
            ApiFfn::Identity => FfnLayer::Identity,
        },
        num_register_tokens: i64::from(m.num_register_tokens),
        interpolate_antialias: m.interpolate_antialias,
        interpolate_offset: m.interpolate_offset,
    })
}

/// The whole meta-architecture: backbone, heads, loss weights, optimizer and precision.
pub fn meta_arch_config(t: &TrainingConfig) -> Result<MetaArchConfig, MappingError> {
    let student = vit_config(t)?;
    let head = |n: u32, hidden: u32, bottleneck: u32, layers: u32| DinoHeadConfig {
        in_dim: student.embed_dim,
        out_dim: i64::from(n),
        hidden_dim: i64::from(hidden),
        bottleneck_dim: i64::from(bottleneck),
        nlayers: i64::from(layers),
        ..DinoHeadConfig::official(student.embed_dim)
    };
    let (d, i) = (&t.dino, &t.ibot);
    let dino_head = head(
        d.head_n_prototypes,
        d.head_hidden_dim,
        d.head_bottleneck_dim,
        d.head_nlayers,
    );
    let ibot_head = i.separate_head.then(|| {
        head(
            i.head_n_prototypes,
            i.head_hidden_dim,
            i.head_bottleneck_dim,
            i.head_nlayers,
        )
    });
    Ok(MetaArchConfig {
        dino_head,
        ibot_head,
        dino_loss_weight: d.loss_weight,
        koleo_loss_weight: d.koleo_loss_weight,
        ibot_loss_weight: i.loss_weight,
        centering: match t.loss.centering {
            Centering::Centering => CenteringMode::Centering,
            Centering::SinkhornKnopp => CenteringMode::SinkhornKnopp,
        },
        n_local_crops: i64::from(t.crops.local_crops_number),
        clip_grad: t.optim.clip_grad,
        student_temp: t.loss.student_temp,
        center_momentum: t.loss.center_momentum,
        sinkhorn_iterations: t.loss.sinkhorn_knopp_iterations as usize,
        param_groups: ParamGroupConfig {
            layerwise_decay: t.optim.layerwise_decay,
            patch_embed_lr_mult: t.optim.patch_embed_lr_mult,
        },
        adamw: AdamWConfig {
            beta1: t.optim.adamw_beta1,
            beta2: t.optim.adamw_beta2,
            // The config has no eps: the official code leaves PyTorch's default.
            ..AdamWConfig::default()
        },
        loss_scaler: loss_scaler_config(t),
        precision: match t.precision.student.backbone.param_dtype {
            Dtype::Fp32 => Precision::Fp32,
            Dtype::Bf16 => Precision::Bf16,
            Dtype::Fp16 => Precision::Fp16,
        },
        grad_scaler: t.precision.grad_scaler,
        parallel: parallel_config(t)?,
        student,
    })
}

/// The student's sharding, reduce dtypes and unit granularity (`training.sharding.student`,
/// `training.precision.student.*.reduceDtype`, `training.model.blockChunks`). `FULL_SHARD` is
/// refused by the CRD's rules already; this repeats the refusal for files given directly.
pub fn parallel_config(t: &TrainingConfig) -> Result<ParallelConfig, MappingError> {
    let (s, p) = (&t.sharding.student, &t.precision.student);
    let module = |field: &'static str, sharding: ShardingStrategy, reduce: Dtype| {
        let sharding = match sharding {
            ShardingStrategy::NoShard => Sharding::NoShard,
            ShardingStrategy::ShardGradOp => Sharding::ShardGradOp,
            ShardingStrategy::FullShard => {
                return Err(MappingError {
                    field,
                    message: FULL_SHARD_REFUSAL.into(),
                });
            }
        };
        Ok(ModuleParallel {
            sharding,
            reduce_kind: kind_of(reduce),
        })
    };
    Ok(ParallelConfig {
        backbone: module(
            "sharding.student.backbone",
            s.backbone,
            p.backbone.reduce_dtype,
        )?,
        dino_head: module(
            "sharding.student.dinoHead",
            s.dino_head,
            p.dino_head.reduce_dtype,
        )?,
        ibot_head: module(
            "sharding.student.ibotHead",
            s.ibot_head,
            p.ibot_head.reduce_dtype,
        )?,
        block_chunks: t.model.block_chunks,
    })
}

/// Why `FULL_SHARD` is refused (the CRD rule's message says the same).
pub const FULL_SHARD_REFUSAL: &str = dinoflow_api::training::FULL_SHARD_REFUSAL;

fn kind_of(d: Dtype) -> tch::Kind {
    match d {
        Dtype::Fp32 => tch::Kind::Float,
        Dtype::Fp16 => tch::Kind::Half,
        Dtype::Bf16 => tch::Kind::BFloat16,
    }
}

/// Training FLOPs per image of one step, for the MFU estimate.
pub fn flops_per_image(t: &TrainingConfig, arch: &MetaArchConfig) -> f64 {
    let shape = crate::flops::StepShape {
        batch_size: t.train.batch_size_per_gpu as usize,
        global_crops_size: i64::from(t.crops.global_crops_size),
        local_crops_size: i64::from(t.crops.local_crops_size),
        masks: mask_collate_config(t),
    };
    crate::flops::training_flops_per_image(arch, &shape)
}

/// How often the loop logs, checkpoints and evaluates, in iterations (0: never periodically).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cadences {
    pub log_every: u64,
    pub checkpoint_every: u64,
    pub eval_every: u64,
}

/// `checkpoint.bestMetric`, checked against the metrics the configured evaluations report
/// (`crate::eval::EvalReport::flat`).
pub fn best_metric(t: &TrainingConfig) -> Result<Option<String>, MappingError> {
    let Some(metric) = &t.checkpoint.best_metric else {
        return Ok(None);
    };
    let e = &t.evaluation;
    let mut reported = Vec::new();
    if e.knn.enabled {
        for k in &e.knn.k {
            reported.push(format!("knn_top1_k{k}"));
            reported.push(format!("knn_top5_k{k}"));
        }
    }
    if e.linear_probe.enabled {
        reported.extend(["linear_top1".to_string(), "linear_val_top1".to_string()]);
    }
    if reported.contains(metric) {
        return Ok(Some(metric.clone()));
    }
    Err(MappingError {
        field: "checkpoint.bestMetric",
        message: if reported.is_empty() {
            format!(
                "{metric:?} needs an evaluation: enable evaluation.knn or evaluation.linearProbe"
            )
        } else {
            format!(
                "{metric:?} is not reported by the configured evaluations; use one of {}",
                reported.join(", ")
            )
        },
    })
}

/// `logging.everyIterations`, `checkpoint.periodIterations` (3 official epochs when unset) and
/// `evaluation.periodIterations`.
pub fn cadences(t: &TrainingConfig) -> Cadences {
    Cadences {
        log_every: u64::from(t.logging.every_iterations),
        checkpoint_every: t.checkpoint.period(t.train.official_epoch_length),
        eval_every: u64::from(t.evaluation.period_iterations),
    }
}

/// The data loader of this rank: `train.batchSizePerGpu`, `data.numWorkers`, `train.seed`
/// and the crops.
pub fn loader_config(
    t: &TrainingConfig,
    rank: usize,
    world_size: usize,
) -> Result<LoaderConfig, MappingError> {
    Ok(LoaderConfig {
        batch_size: t.train.batch_size_per_gpu as usize,
        num_workers: t.data.num_workers as usize,
        seed: t.train.seed,
        rank,
        world_size,
        crops: multi_crop_config(t)?,
        ..LoaderConfig::default()
    })
}

/// The fp16 dynamic loss scaler's settings (`precision.lossScale`); used only when the
/// student computes in fp16.
pub fn loss_scaler_config(t: &TrainingConfig) -> LossScalerConfig {
    let s = &t.precision.loss_scale;
    LossScalerConfig {
        init_scale: s.init_scale,
        growth_factor: s.growth_factor,
        backoff_factor: s.backoff_factor,
        growth_interval: s.growth_interval,
    }
}

/// The peak learning rate after the scaling rule (official `optim.lr`, 0 = derive it).
pub fn peak_lr(t: &TrainingConfig, world_size: usize) -> f64 {
    if t.optim.lr > 0.0 {
        return t.optim.lr;
    }
    match t.optim.scaling_rule {
        ScalingRule::SqrtWrt1024 => scaled_lr(
            LrScalingRule::SqrtWrt1024,
            t.optim.base_lr,
            t.train.batch_size_per_gpu as usize,
            world_size,
        ),
        ScalingRule::None => t.optim.base_lr,
    }
}

pub fn schedules_config(t: &TrainingConfig, world_size: usize) -> SchedulesConfig {
    let (o, te) = (&t.optim, &t.teacher);
    SchedulesConfig {
        lr: peak_lr(t, world_size),
        min_lr: o.min_lr,
        epochs: o.epochs as usize,
        warmup_epochs: o.warmup_epochs as usize,
        weight_decay: o.weight_decay,
        weight_decay_end: o.weight_decay_end,
        momentum_teacher: te.momentum_teacher,
        final_momentum_teacher: te.final_momentum_teacher,
        warmup_teacher_temp: te.warmup_teacher_temp,
        teacher_temp: te.teacher_temp,
        warmup_teacher_temp_epochs: te.warmup_teacher_temp_epochs as usize,
        freeze_last_layer_epochs: o.freeze_last_layer_epochs as usize,
        epoch_length: t.train.official_epoch_length as usize,
    }
}

/// The multi-crop augmentation (`training.crops`).
pub fn multi_crop_config(t: &TrainingConfig) -> Result<MultiCropConfig, MappingError> {
    let c = &t.crops;
    let a = &c.augmentation;
    let defaults = MultiCropConfig::default();
    Ok(MultiCropConfig {
        global_crops_size: c.global_crops_size,
        local_crops_size: c.local_crops_size,
        local_crops_number: c.local_crops_number as usize,
        global_crops_scale: (
            c.global_crops_scale[0] as f32,
            c.global_crops_scale[1] as f32,
        ),
        local_crops_scale: (c.local_crops_scale[0] as f32, c.local_crops_scale[1] as f32),
        hflip_p: a.horizontal_flip_probability as f32,
        color_jitter: ColorJitterConfig {
            brightness: a.brightness as f32,
            contrast: a.contrast as f32,
            saturation: a.saturation as f32,
            hue: a.hue as f32,
            p: a.color_jitter_probability as f32,
        },
        grayscale_p: a.grayscale_probability as f32,
        blur_sigma: (a.blur_sigma[0] as f32, a.blur_sigma[1] as f32),
        global1: CropExtras {
            blur_p: a.global1_blur_probability as f32,
            solarize_p: 0.0,
        },
        global2: CropExtras {
            blur_p: a.global2_blur_probability as f32,
            solarize_p: a.global2_solarize_probability as f32,
        },
        local: CropExtras {
            blur_p: a.local_blur_probability as f32,
            solarize_p: 0.0,
        },
        mean: rgb(&a.normalize_mean, "crops.augmentation.normalizeMean")?,
        std: rgb(&a.normalize_std, "crops.augmentation.normalizeStd")?,
        ..defaults
    })
}

/// One value (grayscale data) applies to all three channels; three are per channel.
fn rgb(v: &[f64], field: &'static str) -> Result<[f32; 3], MappingError> {
    match v {
        [x] => Ok([*x as f32; 3]),
        [r, g, b] => Ok([*r as f32, *g as f32, *b as f32]),
        _ => Err(MappingError {
            field,
            message: format!(
                "needs 1 or 3 values (the loader yields RGB), got {}",
                v.len()
            ),
        }),
    }
}

pub fn mask_collate_config(t: &TrainingConfig) -> MaskCollateConfig {
    MaskCollateConfig {
        mask_ratio_min_max: (t.ibot.mask_ratio_min_max[0], t.ibot.mask_ratio_min_max[1]),
        mask_sample_probability: t.ibot.mask_sample_probability,
    }
}

/// The dataset reader for `training.data.kind` (training data: `data.split` of ImageNet).
pub fn dataset_kind(t: &TrainingConfig) -> DatasetKind {
    dataset_kind_for_split(t, "train", imagenet_split(t.data.split))
}

/// The reader for `training.data.valPath`: same kind; an IDX folder gives its `t10k` files,
/// ImageNet its `VAL` split (the official evaluation's `ImageNet:split=VAL`).
pub fn val_dataset_kind(t: &TrainingConfig) -> DatasetKind {
    dataset_kind_for_split(t, "t10k", ImageNetSplit::Val)
}

fn imagenet_split(split: DatasetSplit) -> ImageNetSplit {
    match split {
        DatasetSplit::Train => ImageNetSplit::Train,
        DatasetSplit::Val => ImageNetSplit::Val,
        DatasetSplit::Test => ImageNetSplit::Test,
    }
}

fn dataset_kind_for_split(
    t: &TrainingConfig,
    idx_split: &str,
    imagenet: ImageNetSplit,
) -> DatasetKind {
    use dinoflow_api::training::DatasetKind as K;
    match t.data.kind {
        K::Idx => DatasetKind::Idx {
            split: idx_split.into(),
        },
        K::Webdataset => DatasetKind::Tar,
        K::Imagenet => DatasetKind::ImageNet {
            extra: t.data.extra_path.as_ref().map(std::path::PathBuf::from),
            split: imagenet,
        },
        K::Imagefolder | K::Imagenet22k => DatasetKind::ImageFolder,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_metric_must_be_one_the_evaluations_report() {
        let mut t = TrainingConfig::default();
        assert_eq!(best_metric(&t).unwrap(), None);
        t.checkpoint.best_metric = Some("knn_top1_k20".into());
        assert_eq!(best_metric(&t).unwrap().as_deref(), Some("knn_top1_k20"));
        t.checkpoint.best_metric = Some("knn_top1_k7".into());
        let e = best_metric(&t).unwrap_err().to_string();
        assert!(
            e.starts_with("training.checkpoint.bestMetric:") && e.contains("knn_top1_k20"),
            "{e}"
        );
        t.checkpoint.best_metric = Some("linear_top1".into());
        assert!(best_metric(&t).is_err());
        t.evaluation.linear_probe.enabled = true;
        assert!(best_metric(&t).is_ok());
        t.evaluation.knn.enabled = false;
        t.evaluation.linear_probe.enabled = false;
        let e = best_metric(&t).unwrap_err().to_string();
        assert!(e.contains("needs an evaluation"), "{e}");
    }

    #[test]
    fn adamw_betas_and_loss_scale_of_the_config_reach_the_meta_arch() {
        let mut t = TrainingConfig::default();
        t.optim.adamw_beta1 = 0.8;
        t.optim.adamw_beta2 = 0.95;
        let s = &mut t.precision.loss_scale;
        s.init_scale = 1024.0;
        s.growth_factor = 4.0;
        s.backoff_factor = 0.125;
        s.growth_interval = 7;
        let c = meta_arch_config(&t).unwrap();
        assert_eq!((c.adamw.beta1, c.adamw.beta2), (0.8, 0.95));
        assert_eq!(c.adamw.eps, 1e-8, "PyTorch's default, as the official code");
        assert_eq!(
            c.loss_scaler,
            LossScalerConfig {
                init_scale: 1024.0,
                growth_factor: 4.0,
                backoff_factor: 0.125,
                growth_interval: 7,
            }
        );
    }

    #[test]
    fn sharding_reduce_dtypes_block_chunks_and_grad_scaler_reach_the_meta_arch() {
        use dinoflow_api::training::ShardingStrategy as S;
        let mut t = TrainingConfig::default();
        t.model.block_chunks = 4;
        t.sharding.student.dino_head = S::NoShard;
        t.precision.student.ibot_head.reduce_dtype = Dtype::Bf16;
        t.precision.grad_scaler = false;
        let arch = meta_arch_config(&t).unwrap();
        let p = arch.parallel;
        assert_eq!(p.block_chunks, 4);
        assert_eq!(
            (
                p.backbone.sharding,
                p.dino_head.sharding,
                p.ibot_head.sharding
            ),
            (
                Sharding::ShardGradOp,
                Sharding::NoShard,
                Sharding::ShardGradOp
            )
        );
        // Official reduce dtypes: fp16 backbone, fp32 heads.
        assert_eq!(
            (
                p.backbone.reduce_kind,
                p.dino_head.reduce_kind,
                p.ibot_head.reduce_kind
            ),
            (tch::Kind::Half, tch::Kind::Float, tch::Kind::BFloat16)
        );
        assert!(!arch.grad_scaler);
        t.precision.grad_scaler = true;
        assert!(meta_arch_config(&t).unwrap().grad_scaler);
    }

    #[test]
    fn full_shard_is_refused_naming_the_field_and_the_alternative() {
        use dinoflow_api::training::ShardingStrategy as S;
        let mut t = TrainingConfig::default();
        t.sharding.student.dino_head = S::FullShard;
        let err = meta_arch_config(&t).unwrap_err().to_string();
        assert!(
            err.starts_with("training.sharding.student.dinoHead: FULL_SHARD is not supported")
                && err.contains("autograd hooks"),
            "{err}"
        );
        let violations = dinoflow_api::training::rules::check(&t);
        assert!(
            violations
                .iter()
                .any(|v| v.field == "sharding" && v.message.contains("use SHARD_GRAD_OP")),
            "{violations:?}"
        );
    }

    #[test]
    fn the_param_dtypes_set_the_compute_precision_and_must_agree() {
        let mut t = TrainingConfig::default();
        assert_eq!(meta_arch_config(&t).unwrap().precision, Precision::Fp16);
        for m in [
            &mut t.precision.student.backbone.param_dtype,
            &mut t.precision.student.dino_head.param_dtype,
            &mut t.precision.student.ibot_head.param_dtype,
            &mut t.precision.teacher.backbone.param_dtype,
            &mut t.precision.teacher.dino_head.param_dtype,
            &mut t.precision.teacher.ibot_head.param_dtype,
        ] {
            *m = Dtype::Bf16;
        }
        assert_eq!(meta_arch_config(&t).unwrap().precision, Precision::Bf16);
        let agree = dinoflow_api::training::rules::check(&t);
        assert!(
            !agree.iter().any(|v| v.message.contains("paramDtype")),
            "{agree:?}"
        );
        // One module in another dtype: refused, naming precision.
        t.precision.teacher.ibot_head.param_dtype = Dtype::Fp32;
        let violations = dinoflow_api::training::rules::check(&t);
        assert!(
            violations
                .iter()
                .any(|v| v.field == "precision" && v.message.contains("paramDtype")),
            "{violations:?}"
        );
    }

    #[test]
    fn equal_configs_hash_equal_and_a_changed_lr_changes_the_hash() {
        let a = TrainingConfig::default();
        let mut b = TrainingConfig::default();
        assert_eq!(config_hash(&a), config_hash(&b));
        b.optim.base_lr *= 2.0;
        assert_ne!(config_hash(&a), config_hash(&b));
        // The learning rate is not guarded: changing it on resume is a deliberate choice.
        assert_eq!(guarded_fields(&a), guarded_fields(&b));
    }

    #[test]
    fn batch_size_and_dataset_are_guarded() {
        let a = TrainingConfig::default();
        let mut b = TrainingConfig::default();
        b.train.batch_size_per_gpu += 1;
        b.data.path = "/other".into();
        let (ga, gb) = (guarded_fields(&a), guarded_fields(&b));
        assert_ne!(
            ga["training.train.batchSizePerGpu"],
            gb["training.train.batchSizePerGpu"]
        );
        assert_ne!(ga["training.data.path"], gb["training.data.path"]);
    }

    #[test]
    fn the_tiny_example_maps_onto_a_small_vit_with_grayscale_statistics_broadcast() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../manifests/examples/tiny-cpu-fashion-mnist.yaml"
        );
        let t = dinoflow_api::load_training_config(path).unwrap().training;
        let m = meta_arch_config(&t).unwrap();
        assert_eq!(
            (m.student.embed_dim, m.student.depth, m.student.patch_size),
            (64, 4, 7)
        );
        assert_eq!(m.student.img_size, 28);
        assert_eq!(m.dino_head.out_dim, 256);
        assert_eq!(m.n_local_crops, 2);
        let crops = multi_crop_config(&t).unwrap();
        assert_eq!(crops.mean, [0.286; 3]);
        // sqrt rule: 0.004 * sqrt(64 / 1024).
        assert!((peak_lr(&t, 1) - 0.001).abs() < 1e-12);
    }

    /// Evidence for `crds/fields.txt`: a non-default value of each field mapped here reaches
    /// the module that acts on it (whose own tests show the effect of that setting).
    #[test]
    fn a_non_default_value_of_every_mapped_field_reaches_its_module() {
        let mut t = TrainingConfig::default();
        t.model.arch = Arch::Custom;
        (t.model.embed_dim, t.model.depth, t.model.num_heads) = (Some(48), Some(3), Some(4));
        t.model.patch_size = 8;
        t.model.drop_path_rate = 0.25;
        t.model.drop_path_uniform = false;
        t.model.layerscale = 0.0;
        t.model.qkv_bias = false;
        t.model.proj_bias = false;
        t.model.ffn_bias = false;
        t.model.ffn_layer = ApiFfn::Swiglufused;
        t.model.num_register_tokens = 4;
        t.model.interpolate_antialias = true;
        t.model.interpolate_offset = 0.0;
        t.dino.head_n_prototypes = 300;
        t.dino.head_hidden_dim = 40;
        t.dino.head_bottleneck_dim = 20;
        t.dino.head_nlayers = 2;
        t.dino.loss_weight = 0.5;
        t.dino.koleo_loss_weight = 0.2;
        t.ibot.separate_head = true;
        t.ibot.head_n_prototypes = 200;
        t.ibot.head_hidden_dim = 30;
        t.ibot.head_bottleneck_dim = 10;
        t.ibot.head_nlayers = 1;
        t.ibot.loss_weight = 0.7;
        t.ibot.mask_ratio_min_max = [0.2, 0.4];
        t.ibot.mask_sample_probability = 0.3;
        t.loss.centering = Centering::SinkhornKnopp;
        t.loss.student_temp = 0.2;
        t.loss.center_momentum = 0.8;
        t.loss.sinkhorn_knopp_iterations = 5;
        t.optim.clip_grad = 1.5;
        t.optim.layerwise_decay = 0.8;
        t.optim.patch_embed_lr_mult = 0.3;
        t.crops.global_crops_size = 64;
        t.crops.local_crops_size = 32;
        t.crops.local_crops_number = 3;
        t.crops.global_crops_scale = [0.4, 0.9];
        t.crops.local_crops_scale = [0.1, 0.3];
        let a = &mut t.crops.augmentation;
        a.horizontal_flip_probability = 0.1;
        (a.brightness, a.contrast, a.saturation, a.hue) = (0.1, 0.2, 0.3, 0.05);
        a.color_jitter_probability = 0.6;
        a.grayscale_probability = 0.3;
        a.blur_sigma = [0.5, 1.5];
        a.global1_blur_probability = 0.9;
        a.global2_blur_probability = 0.2;
        a.local_blur_probability = 0.4;
        a.global2_solarize_probability = 0.25;
        a.normalize_mean = vec![0.1, 0.2, 0.3];
        a.normalize_std = vec![0.4, 0.5, 0.6];

        let m = meta_arch_config(&t).unwrap();
        let v = &m.student;
        assert_eq!(
            (v.embed_dim, v.depth, v.num_heads, v.patch_size),
            (48, 3, 4, 8)
        );
        assert_eq!((v.drop_path_rate, v.drop_path_uniform), (0.25, false));
        assert_eq!(v.layerscale, None);
        assert_eq!((v.qkv_bias, v.proj_bias, v.ffn_bias), (false, false, false));
        assert_eq!(v.ffn_layer, FfnLayer::SwiGluFused);
        assert_eq!(v.num_register_tokens, 4);
        assert_eq!((v.interpolate_antialias, v.interpolate_offset), (true, 0.0));
        assert_eq!(v.img_size, 64);
        let d = &m.dino_head;
        assert_eq!(
            (d.out_dim, d.hidden_dim, d.bottleneck_dim, d.nlayers),
            (300, 40, 20, 2)
        );
        let i = m.ibot_head.as_ref().expect("separate iBOT head");
        assert_eq!(
            (i.out_dim, i.hidden_dim, i.bottleneck_dim, i.nlayers),
            (200, 30, 10, 1)
        );
        assert_eq!(
            (m.dino_loss_weight, m.koleo_loss_weight, m.ibot_loss_weight),
            (0.5, 0.2, 0.7)
        );
        assert_eq!(m.centering, CenteringMode::SinkhornKnopp);
        assert_eq!((m.student_temp, m.center_momentum), (0.2, 0.8));
        assert_eq!(m.sinkhorn_iterations, 5);
        assert_eq!(m.n_local_crops, 3);
        assert_eq!(m.clip_grad, 1.5);
        assert_eq!(
            (
                m.param_groups.layerwise_decay,
                m.param_groups.patch_embed_lr_mult
            ),
            (0.8, 0.3)
        );

        let c = multi_crop_config(&t).unwrap();
        assert_eq!(
            (
                c.global_crops_size,
                c.local_crops_size,
                c.local_crops_number
            ),
            (64, 32, 3)
        );
        assert_eq!(
            (c.global_crops_scale, c.local_crops_scale),
            ((0.4, 0.9), (0.1, 0.3))
        );
        assert_eq!(c.hflip_p, 0.1);
        let j = &c.color_jitter;
        assert_eq!(
            (j.brightness, j.contrast, j.saturation, j.hue, j.p),
            (0.1, 0.2, 0.3, 0.05, 0.6)
        );
        assert_eq!(c.grayscale_p, 0.3);
        assert_eq!(c.blur_sigma, (0.5, 1.5));
        assert_eq!(
            (c.global1.blur_p, c.global2.blur_p, c.local.blur_p),
            (0.9, 0.2, 0.4)
        );
        assert_eq!(
            (
                c.global1.solarize_p,
                c.global2.solarize_p,
                c.local.solarize_p
            ),
            (0.0, 0.25, 0.0)
        );
        assert_eq!((c.mean, c.std), ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6]));

        let k = mask_collate_config(&t);
        assert_eq!(
            (k.mask_ratio_min_max, k.mask_sample_probability),
            ((0.2, 0.4), 0.3)
        );
    }

    #[test]
    fn schedules_loader_and_cadences_take_their_fields() {
        let mut t = TrainingConfig::default();
        t.optim.epochs = 7;
        t.optim.warmup_epochs = 2;
        t.optim.base_lr = 0.01;
        t.optim.min_lr = 1e-5;
        t.optim.weight_decay = 0.05;
        t.optim.weight_decay_end = 0.3;
        t.optim.freeze_last_layer_epochs = 3;
        t.teacher.momentum_teacher = 0.9;
        t.teacher.final_momentum_teacher = 0.99;
        t.teacher.warmup_teacher_temp = 0.03;
        t.teacher.teacher_temp = 0.06;
        t.teacher.warmup_teacher_temp_epochs = 4;
        t.train.official_epoch_length = 11;
        t.train.batch_size_per_gpu = 5;
        t.train.seed = 42;
        t.data.num_workers = 3;
        let s = schedules_config(&t, 1);
        assert_eq!((s.epochs, s.warmup_epochs, s.epoch_length), (7, 2, 11));
        assert_eq!(
            (s.min_lr, s.weight_decay, s.weight_decay_end),
            (1e-5, 0.05, 0.3)
        );
        assert_eq!(s.freeze_last_layer_epochs, 3);
        assert_eq!((s.momentum_teacher, s.final_momentum_teacher), (0.9, 0.99));
        assert_eq!((s.warmup_teacher_temp, s.teacher_temp), (0.03, 0.06));
        assert_eq!(s.warmup_teacher_temp_epochs, 4);
        // sqrt rule: 0.01 * sqrt(5 / 1024); an explicit optim.lr wins; scalingRule none keeps it.
        assert!((s.lr - 0.01 * (5.0f64 / 1024.0).sqrt()).abs() < 1e-15);
        t.optim.scaling_rule = ScalingRule::None;
        assert_eq!(peak_lr(&t, 4), 0.01);
        t.optim.lr = 0.5;
        assert_eq!(peak_lr(&t, 4), 0.5);
        let l = loader_config(&t, 1, 2).unwrap();
        assert_eq!((l.batch_size, l.num_workers, l.seed), (5, 3, 42));
        assert_eq!((l.rank, l.world_size), (1, 2));

        t.logging.every_iterations = 3;
        t.evaluation.period_iterations = 9;
        assert_eq!(
            cadences(&t),
            Cadences {
                log_every: 3,
                checkpoint_every: 33, // unset: 3 official epochs of 11
                eval_every: 9
            }
        );
        t.checkpoint.period_iterations = Some(4);
        assert_eq!(cadences(&t).checkpoint_every, 4);
    }

    #[test]
    fn evaluation_fields_reach_the_hooks_and_both_off_means_no_evaluation() {
        let mut t = TrainingConfig::default();
        t.evaluation.knn.k = vec![3, 5];
        t.evaluation.knn.temperature = 0.1;
        t.evaluation.linear_probe.enabled = true;
        t.evaluation.linear_probe.learning_rates = vec![0.01, 0.1];
        t.evaluation.linear_probe.epochs = 2;
        t.evaluation.linear_probe.batch_size = 16;
        t.train.seed = 9;
        let e = eval_config(&t, 10).unwrap();
        assert_eq!((e.knn.ks.as_slice(), e.knn.temperature), (&[3, 5][..], 0.1));
        let l = e.linear.as_ref().expect("linear probe on");
        assert_eq!(
            (l.learning_rates.as_slice(), l.epochs),
            (&[0.01, 0.1][..], 2)
        );
        assert_eq!((l.batch_size, l.seed), (16, 9));
        t.evaluation.knn.enabled = false;
        assert!(eval_config(&t, 10).unwrap().knn.ks.is_empty());
        t.evaluation.linear_probe.enabled = false;
        assert!(eval_config(&t, 10).is_none());
    }

    #[test]
    fn imagenet_reads_its_split_and_extra_path_and_evaluates_on_val() {
        let mut t = TrainingConfig::default();
        t.data.split = DatasetSplit::Val;
        t.data.extra_path = Some("/extra".into());
        let extra = Some(std::path::PathBuf::from("/extra"));
        assert_eq!(
            dataset_kind(&t),
            DatasetKind::ImageNet {
                extra: extra.clone(),
                split: ImageNetSplit::Val
            }
        );
        t.data.split = DatasetSplit::Train;
        assert_eq!(
            val_dataset_kind(&t),
            DatasetKind::ImageNet {
                extra,
                split: ImageNetSplit::Val
            }
        );
    }

    #[test]
    fn official_knn_settings_map_through() {
        let cfg = eval_config(&TrainingConfig::default(), 10).unwrap();
        assert_eq!(cfg.knn.ks, [10, 20, 100, 200]);
        assert_eq!(cfg.knn.temperature, 0.07);
    }
}
