//! `spec.training`: the trainer configuration. Every default equals the official DINOv2
//! `dinov2/configs/ssl_default_config.yaml`; sections mirror its keys in camelCase (the official
//! `student` section is `model`, `train.centering` is `loss.centering`, `train.dataset_path` and
//! friends are `data`, `compute_precision` is split into `precision` and `sharding`).
//!
//! Deserialising a `TrainingConfig` directly does not apply `preset`; use
//! [`crate::load`] or the job spec types, which merge the preset first.

mod crops;
mod curriculum;
mod evaluation;
mod heads;
mod model;
mod optim;
mod precision;
pub mod rules;
pub use rules::FULL_SHARD_REFUSAL;
pub mod schema;
mod teacher;
mod train;

pub use crops::{AugmentationConfig, CropsConfig};
pub use curriculum::{CurriculumConfig, CurriculumPhase, MAX_PHASES};
pub use evaluation::{
    CheckpointConfig, EvaluationConfig, KnnConfig, LinearProbeConfig, LogFormat, LoggingConfig,
    MAX_GRID,
};
pub use heads::{DinoConfig, IbotConfig};
pub use model::{Arch, FfnLayer, ModelConfig};
pub use optim::{OptimConfig, ScalingRule};
pub use precision::{
    Dtype, HeadMixedPrecision, LossScaleConfig, MixedPrecision, ModuleSharding, PrecisionConfig,
    ShardingConfig, ShardingStrategy, StudentPrecision, TeacherPrecision,
};
pub use teacher::{Centering, LossConfig, TeacherConfig};
pub use train::{DataConfig, DatasetKind, DatasetSplit, OutputConfig, TrainConfig};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An official training recipe applied under the fields given next to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// Official `dinov2/configs/train/vitl14.yaml` (ViT-L/14, 500 epochs, ImageNet-22k).
    Vitl14,
    /// Official `dinov2/configs/train/vitg14.yaml` (ViT-g/14, 500 epochs, ImageNet-22k).
    Vitg14,
}

/// The DINOv2 training configuration, read identically by the API server (as
/// `spec.training`) and by the trainer. Unset fields take the official defaults; with `preset`
/// set, the preset's values come first and fields given here override them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
#[schemars(transform = schema::defaults_to_docs, transform = rules::attach_cel)]
pub struct TrainingConfig {
    /// Official recipe to start from (`vitl14` or `vitg14`); fields set next to it override
    /// the recipe's values.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preset: Option<Preset>,
    /// Student backbone (official `student`).
    pub model: ModelConfig,
    /// DINO image-level objective and head (official `dino`).
    pub dino: DinoConfig,
    /// iBOT patch-level objective and head (official `ibot`).
    pub ibot: IbotConfig,
    /// EMA teacher momentum and temperatures (official `teacher`).
    pub teacher: TeacherConfig,
    /// Centering and loss constants (official `train.centering` and loss-class constants).
    pub loss: LossConfig,
    /// Multi-crop and augmentation (official `crops`).
    pub crops: CropsConfig,
    /// Optimiser and schedules (official `optim`).
    pub optim: OptimConfig,
    /// Batch size, seed, epoch length (official `train`).
    pub train: TrainConfig,
    /// Training data (official `train.dataset_path`, `num_workers`, `cache_dataset`).
    pub data: DataConfig,
    /// Mixed precision and loss scaling (official `compute_precision`).
    pub precision: PrecisionConfig,
    /// FSDP sharding strategies (official `compute_precision.*.sharding_strategy`).
    pub sharding: ShardingConfig,
    /// Resolution curriculum.
    pub curriculum: CurriculumConfig,
    /// Periodic evaluation (official `evaluation`).
    pub evaluation: EvaluationConfig,
    /// Checkpoint cadence and retention.
    pub checkpoint: CheckpointConfig,
    /// Output directory (official `train.output_dir`).
    pub output: OutputConfig,
    /// Logging and metrics.
    pub logging: LoggingConfig,
}

impl TrainingConfig {
    /// Total training iterations (`optim.epochs` × `train.officialEpochLength`).
    pub fn total_iterations(&self) -> u64 {
        self.train.iterations(self.optim.epochs)
    }

    /// Every rule violation (the Rust mirror of the CRD's CEL rules); empty when valid.
    pub fn violations(&self) -> Vec<rules::Violation> {
        rules::check(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spot checks against `dinov2/configs/ssl_default_config.yaml`.
    #[test]
    fn defaults_equal_the_official_ssl_default_config() {
        let c = TrainingConfig::default();
        assert_eq!(c.preset, None);
        // student
        assert_eq!(c.model.arch, Arch::VitLarge);
        assert_eq!(c.model.patch_size, 16);
        assert_eq!(c.model.drop_path_rate, 0.3);
        assert_eq!(c.model.layerscale, 1.0e-5);
        assert!(c.model.drop_path_uniform);
        assert_eq!(c.model.pretrained_weights, "");
        assert_eq!(c.model.ffn_layer, FfnLayer::Mlp);
        assert_eq!(c.model.block_chunks, 0);
        assert!(c.model.qkv_bias && c.model.proj_bias && c.model.ffn_bias);
        assert_eq!(c.model.num_register_tokens, 0);
        assert!(!c.model.interpolate_antialias);
        assert_eq!(c.model.interpolate_offset, 0.1);
        assert_eq!(c.model.weights, "");
        // dino
        assert_eq!(c.dino.loss_weight, 1.0);
        assert_eq!(c.dino.head_n_prototypes, 65536);
        assert_eq!(c.dino.head_bottleneck_dim, 256);
        assert_eq!(c.dino.head_nlayers, 3);
        assert_eq!(c.dino.head_hidden_dim, 2048);
        assert_eq!(c.dino.koleo_loss_weight, 0.1);
        // ibot
        assert_eq!(c.ibot.loss_weight, 1.0);
        assert_eq!(c.ibot.mask_sample_probability, 0.5);
        assert_eq!(c.ibot.mask_ratio_min_max, [0.1, 0.5]);
        assert!(!c.ibot.separate_head);
        assert_eq!(c.ibot.head_n_prototypes, 65536);
        assert_eq!(c.ibot.head_bottleneck_dim, 256);
        assert_eq!(c.ibot.head_nlayers, 3);
        assert_eq!(c.ibot.head_hidden_dim, 2048);
        // train
        assert_eq!(c.train.batch_size_per_gpu, 64);
        assert_eq!(c.train.seed, 0);
        assert_eq!(c.train.official_epoch_length, 1250);
        assert_eq!(c.data.num_workers, 10);
        assert!(c.data.cache_dataset);
        assert_eq!(c.data.kind, DatasetKind::Imagenet);
        assert_eq!(c.data.split, DatasetSplit::Train);
        assert_eq!(c.output.dir, ".");
        assert_eq!(c.checkpoint.saveckp_freq, 20);
        assert_eq!(c.loss.centering, Centering::Centering);
        // teacher
        assert_eq!(c.teacher.momentum_teacher, 0.992);
        assert_eq!(c.teacher.final_momentum_teacher, 1.0);
        assert_eq!(c.teacher.warmup_teacher_temp, 0.04);
        assert_eq!(c.teacher.teacher_temp, 0.07);
        assert_eq!(c.teacher.warmup_teacher_temp_epochs, 30);
        // optim
        assert_eq!(c.optim.epochs, 100);
        assert_eq!(c.optim.weight_decay, 0.04);
        assert_eq!(c.optim.weight_decay_end, 0.4);
        assert_eq!(c.optim.base_lr, 0.004);
        assert_eq!(c.optim.lr, 0.0);
        assert_eq!(c.optim.warmup_epochs, 10);
        assert_eq!(c.optim.min_lr, 1.0e-6);
        assert_eq!(c.optim.clip_grad, 3.0);
        assert_eq!(c.optim.freeze_last_layer_epochs, 1);
        assert_eq!(c.optim.scaling_rule, ScalingRule::SqrtWrt1024);
        assert_eq!(c.optim.patch_embed_lr_mult, 0.2);
        assert_eq!(c.optim.layerwise_decay, 0.9);
        assert_eq!(c.optim.adamw_beta1, 0.9);
        assert_eq!(c.optim.adamw_beta2, 0.999);
        // crops
        assert_eq!(c.crops.global_crops_scale, [0.32, 1.0]);
        assert_eq!(c.crops.local_crops_number, 8);
        assert_eq!(c.crops.local_crops_scale, [0.05, 0.32]);
        assert_eq!(c.crops.global_crops_size, 224);
        assert_eq!(c.crops.local_crops_size, 96);
        // evaluation
        assert_eq!(c.evaluation.period_iterations, 12500);
        // compute_precision
        assert!(c.precision.grad_scaler);
        let fp16_fp16_fp32 = (Dtype::Fp16, Dtype::Fp16, Dtype::Fp32);
        let fp16_fp32_fp32 = (Dtype::Fp16, Dtype::Fp32, Dtype::Fp32);
        let t = |p: &MixedPrecision| (p.param_dtype, p.reduce_dtype, p.buffer_dtype);
        let h = |p: &HeadMixedPrecision| (p.param_dtype, p.reduce_dtype, p.buffer_dtype);
        assert_eq!(t(&c.precision.student.backbone), fp16_fp16_fp32);
        assert_eq!(h(&c.precision.student.dino_head), fp16_fp32_fp32);
        assert_eq!(h(&c.precision.student.ibot_head), fp16_fp32_fp32);
        assert_eq!(t(&c.precision.teacher.backbone), fp16_fp16_fp32);
        assert_eq!(t(&c.precision.teacher.dino_head), fp16_fp16_fp32);
        assert_eq!(t(&c.precision.teacher.ibot_head), fp16_fp16_fp32);
        for m in [&c.sharding.student, &c.sharding.teacher] {
            assert_eq!(m.backbone, ShardingStrategy::ShardGradOp);
            assert_eq!(m.dino_head, ShardingStrategy::ShardGradOp);
            assert_eq!(m.ibot_head, ShardingStrategy::ShardGradOp);
        }
        // Official trainer constants: checkpoint every 3 epochs, keep 3; 100 × 1250 iterations.
        assert_eq!(c.checkpoint.period(c.train.official_epoch_length), 3750);
        assert_eq!(c.checkpoint.keep_last, 3);
        assert_eq!(c.total_iterations(), 125_000);
    }

    #[test]
    fn a_partial_block_keeps_the_defaults_of_its_own_position() {
        let c: TrainingConfig = serde_yaml_ng::from_str(
            "precision: {student: {dinoHead: {paramDtype: bf16}}}\noptim: {epochs: 3}",
        )
        .unwrap();
        let head = &c.precision.student.dino_head;
        assert_eq!(
            (head.param_dtype, head.reduce_dtype),
            (Dtype::Bf16, Dtype::Fp32)
        );
        assert_eq!(c.precision.student.backbone.reduce_dtype, Dtype::Fp16);
        assert_eq!(c.optim.epochs, 3);
        assert_eq!(c.optim.base_lr, 0.004);
    }

    #[test]
    fn sqrt_scaling_rule_matches_the_official_formula() {
        let o = OptimConfig::default();
        assert!((o.scaled_lr(1024) - 0.004).abs() < 1e-12);
        assert!((o.scaled_lr(4096) - 0.008).abs() < 1e-12);
        let explicit = OptimConfig { lr: 0.01, ..o };
        assert_eq!(explicit.scaled_lr(4096), 0.01);
    }

    #[test]
    fn serialising_and_reading_back_gives_the_same_config() {
        let mut c = TrainingConfig {
            preset: Some(Preset::Vitg14),
            ..TrainingConfig::default()
        };
        c.curriculum.phases.push(CurriculumPhase {
            start_epoch: Some(3),
            global_crops_size: Some(448),
            ..Default::default()
        });
        let yaml = serde_yaml_ng::to_string(&c).unwrap();
        assert_eq!(serde_yaml_ng::from_str::<TrainingConfig>(&yaml).unwrap(), c);
    }
}
