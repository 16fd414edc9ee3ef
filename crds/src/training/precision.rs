//! `training.precision` (FSDP mixed-precision dtypes, loss scaling) and `training.sharding`
//! (FSDP sharding strategy), per module as in the official `compute_precision` section.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A floating-point type (official `fp32` / `fp16` / `bf16`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// 32-bit IEEE float.
    Fp32,
    /// 16-bit IEEE half float; needs dynamic loss scaling (`gradScaler`).
    Fp16,
    /// bfloat16.
    Bf16,
}

/// Declares a mixed-precision struct whose defaults depend on where it sits: the official
/// config gives the student heads an fp32 reduce dtype and everything else fp16, and a partial
/// block (say only `paramDtype`) must keep the rest of *its own* defaults.
macro_rules! mixed_precision {
    ($(#[$doc:meta])* $name:ident, reduce = $reduce:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
        #[serde(default, rename_all = "camelCase", deny_unknown_fields)]
        pub struct $name {
            /// Dtype of parameters during forward/backward (official `param_dtype`). The
            /// trainer computes the whole step in one dtype, so all six modules must agree.
            pub param_dtype: Dtype,
            /// Dtype gradients are communicated in across ranks (official `reduce_dtype`),
            /// accumulated back into fp32. The teacher has no gradients, so on a teacher
            /// module it has no effect (as in the official FSDP wrapping) and only fp16 or the
            /// module's paramDtype is accepted there.
            pub reduce_dtype: Dtype,
            /// Dtype of buffers (official `buffer_dtype`); must be fp32.
            pub buffer_dtype: Dtype,
        }

        impl Default for $name {
            fn default() -> Self {
                Self { param_dtype: Dtype::Fp16, reduce_dtype: $reduce, buffer_dtype: Dtype::Fp32 }
            }
        }
    };
}

mixed_precision!(
    /// FSDP mixed precision of a backbone or teacher head (official default fp16/fp16/fp32).
    MixedPrecision,
    reduce = Dtype::Fp16
);
mixed_precision!(
    /// FSDP mixed precision of a student head (official default fp16/fp32/fp32).
    HeadMixedPrecision,
    reduce = Dtype::Fp32
);

/// Mixed precision of the student's modules (official `compute_precision.student`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct StudentPrecision {
    /// The student backbone.
    pub backbone: MixedPrecision,
    /// The student DINO head.
    pub dino_head: HeadMixedPrecision,
    /// The student iBOT head (when `ibot.separateHead`).
    pub ibot_head: HeadMixedPrecision,
}

/// Mixed precision of the teacher's modules (official `compute_precision.teacher`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct TeacherPrecision {
    /// The teacher backbone.
    pub backbone: MixedPrecision,
    /// The teacher DINO head.
    pub dino_head: MixedPrecision,
    /// The teacher iBOT head (when `ibot.separateHead`).
    pub ibot_head: MixedPrecision,
}

/// Dynamic loss scaling for fp16 (torch `ShardedGradScaler` defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct LossScaleConfig {
    /// Initial loss scale, > 0.
    pub init_scale: f64,
    /// Factor the scale grows by after `growthInterval` finite steps, > 1.
    pub growth_factor: f64,
    /// Factor the scale shrinks by after a non-finite gradient, in (0, 1).
    pub backoff_factor: f64,
    /// Consecutive finite steps before the scale grows.
    #[schemars(range(min = 1))]
    pub growth_interval: u32,
}

impl Default for LossScaleConfig {
    fn default() -> Self {
        Self {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

/// Numeric precision (official `compute_precision` minus the sharding strategies).
/// For plain fp32 set every dtype to `fp32` and `gradScaler: false`; for bf16 set the
/// `paramDtype`s to `bf16` (no loss scaling needed).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct PrecisionConfig {
    /// Use dynamic loss scaling (official `compute_precision.grad_scaler`).
    pub grad_scaler: bool,
    /// Loss-scaling parameters, used when `gradScaler` is true.
    pub loss_scale: LossScaleConfig,
    /// Student modules.
    pub student: StudentPrecision,
    /// Teacher modules.
    pub teacher: TeacherPrecision,
}

impl Default for PrecisionConfig {
    fn default() -> Self {
        Self {
            grad_scaler: true,
            loss_scale: LossScaleConfig::default(),
            student: StudentPrecision::default(),
            teacher: TeacherPrecision::default(),
        }
    }
}

impl PrecisionConfig {
    /// (param, reduce, buffer) dtype of the six modules: student then teacher, each backbone,
    /// DINO head, iBOT head.
    pub fn module_dtypes(&self) -> [(Dtype, Dtype, Dtype); 6] {
        let (s, t) = (&self.student, &self.teacher);
        let h = |m: &HeadMixedPrecision| (m.param_dtype, m.reduce_dtype, m.buffer_dtype);
        let f = |m: &MixedPrecision| (m.param_dtype, m.reduce_dtype, m.buffer_dtype);
        [
            f(&s.backbone),
            h(&s.dino_head),
            h(&s.ibot_head),
            f(&t.backbone),
            f(&t.dino_head),
            f(&t.ibot_head),
        ]
    }

    /// Every dtype of every module, to decide e.g. whether fp16 appears anywhere.
    pub fn all_dtypes(&self) -> Vec<Dtype> {
        self.module_dtypes()
            .into_iter()
            .flat_map(|(p, r, b)| [p, r, b])
            .collect()
    }
}

/// FSDP sharding strategy (official `sharding_strategy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ShardingStrategy {
    /// Shard parameters, gradients and optimiser state. Refused: re-gathering parameters
    /// inside backward needs autograd hooks libtorch's Rust binding lacks; use SHARD_GRAD_OP.
    FullShard,
    /// Shard gradients and optimiser state; parameters stay gathered between forward and backward.
    ShardGradOp,
    /// Plain data parallelism.
    NoShard,
}

/// Sharding strategy of each module of one network. A student module's units (the backbone,
/// or its `model.blockChunks` chunks, and each head) are reduce-scattered and their AdamW
/// state kept per rank under SHARD_GRAD_OP, all-reduced and replicated under NO_SHARD. The
/// teacher has neither gradients nor optimiser state: under both strategies every rank keeps a
/// full copy, updated by the EMA locally.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct ModuleSharding {
    /// The backbone.
    pub backbone: ShardingStrategy,
    /// The DINO head.
    pub dino_head: ShardingStrategy,
    /// The iBOT head (when `ibot.separateHead`).
    pub ibot_head: ShardingStrategy,
}

impl Default for ModuleSharding {
    fn default() -> Self {
        Self {
            backbone: ShardingStrategy::ShardGradOp,
            dino_head: ShardingStrategy::ShardGradOp,
            ibot_head: ShardingStrategy::ShardGradOp,
        }
    }
}

/// FSDP sharding (official `compute_precision.{student,teacher}.*.sharding_strategy`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct ShardingConfig {
    /// Student modules.
    pub student: ModuleSharding,
    /// Teacher modules.
    pub teacher: ModuleSharding,
}
