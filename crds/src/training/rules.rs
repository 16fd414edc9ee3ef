//! Cross-field and range rules of `training`, written once and enforced twice: as CEL
//! `x-kubernetes-validations` on the CRD (the API server rejects the object) and as
//! [`check`] in Rust (the trainer refuses the same file with exit code 78).
//!
//! Every rule names the field, the constraint and the fix. CEL sees `self` = the `training`
//! object, where unset fields are absent, so rules read fields through [`eff`] (user value, else
//! preset value, else official default).

use schemars::Schema;

use super::schema::{eff, has};
use super::{Arch, DatasetKind, DatasetSplit, Dtype, ShardingStrategy, TrainingConfig};

/// The six modules of `precision` and `sharding`, as YAML paths below them.
const MODULES: [&str; 6] = [
    "student.backbone",
    "student.dinoHead",
    "student.ibotHead",
    "teacher.backbone",
    "teacher.dinoHead",
    "teacher.ibotHead",
];

/// Why `FULL_SHARD` is refused (the trainer's own check says the same).
pub const FULL_SHARD_REFUSAL: &str = "FULL_SHARD is not supported: it frees each unit's parameters between uses and re-gathers them inside backward, which needs autograd hooks libtorch's Rust binding does not have (SHARD_GRAD_OP shards the gradients and AdamW state, the bulk of the memory, and keeps parameters gathered)";

/// Why `model.activationCheckpointing` is refused.
pub const ACTIVATION_CHECKPOINTING_REFUSAL: &str = "must be false: activation checkpointing is not supported, because recomputing a block's activations inside the backward pass needs custom autograd functions or autograd hooks, which libtorch's Rust binding (tch) does not expose";

/// (param, reduce, buffer) dtype of the six modules, in [`MODULES`] order.
fn module_dtypes(c: &TrainingConfig, pick: fn((Dtype, Dtype, Dtype)) -> Dtype) -> Vec<Dtype> {
    c.precision.module_dtypes().into_iter().map(pick).collect()
}

/// One rule.
pub struct Rule {
    /// Field named by the message, relative to `training` (`optim.baseLr`).
    pub field: &'static str,
    /// What must hold (`must be > 0`).
    pub constraint: &'static str,
    /// How to fix it.
    pub fix: &'static str,
    /// The CEL expression (true = valid).
    pub cel: fn() -> String,
    /// The Rust check: `Some(what was found)` when violated.
    pub check: fn(&TrainingConfig) -> Option<String>,
}

impl Rule {
    /// The API server's message.
    pub fn message(&self) -> String {
        format!("training.{}: {}; {}", self.field, self.constraint, self.fix)
    }
}

/// A violated rule, as the trainer reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    /// Field relative to `training`.
    pub field: &'static str,
    /// `must be > 0, got -1; use a positive value`.
    pub message: String,
}

fn pos(x: f64) -> Option<String> {
    (x.is_nan() || x <= 0.0).then(|| x.to_string())
}
fn prob(x: f64) -> Option<String> {
    (!(0.0..=1.0).contains(&x)).then(|| x.to_string())
}
fn nonneg(x: f64) -> Option<String> {
    (x.is_nan() || x < 0.0).then(|| x.to_string())
}
fn unit_open_closed(x: f64) -> Option<String> {
    (x.is_nan() || x <= 0.0 || x > 1.0).then(|| x.to_string())
}
fn unit_closed_open(x: f64) -> Option<String> {
    (x.is_nan() || !(0.0..1.0).contains(&x)).then(|| x.to_string())
}
fn pair(p: [f64; 2]) -> String {
    format!("[{}, {}]", p[0], p[1])
}

fn cel_prob(path: &str) -> String {
    let v = eff(path);
    format!("{v} >= 0.0 && {v} <= 1.0")
}

/// Declares rules on probabilities in [0, 1].
macro_rules! probability_rules {
    ($($field:literal => |$c:ident| $get:expr),* $(,)?) => {
        [$(Rule {
            field: $field,
            constraint: "must be a probability in [0, 1]",
            fix: "use a value between 0 and 1",
            cel: || cel_prob($field),
            check: |$c| prob($get),
        }),*]
    };
}

/// Refuses a teacher module's `reduceDtype` other than fp16 (the official value) or the
/// module's own `paramDtype`: the teacher has no gradients, so nothing is ever reduced in this
/// dtype (in the official FSDP wrapping neither), and any other value would read as a setting
/// that took effect. One rule per module, so the message names the leaf.
macro_rules! teacher_reduce_dtype_rule {
    ($module:literal, $field:ident) => {
        Rule {
            field: concat!("precision.teacher.", $module, ".reduceDtype"),
            constraint: "must be fp16 (the official value) or this module's paramDtype: the teacher has no gradients, so nothing is reduced in this dtype (the official code ignores it too)",
            fix: "leave it unset, or set it to fp16 or to the module's paramDtype",
            cel: || {
                let r = eff(concat!("precision.teacher.", $module, ".reduceDtype"));
                let p = eff(concat!("precision.teacher.", $module, ".paramDtype"));
                format!("{r} == 'fp16' || {r} == {p}")
            },
            check: |c| {
                let m = &c.precision.teacher.$field;
                (m.reduce_dtype != Dtype::Fp16 && m.reduce_dtype != m.param_dtype)
                    .then(|| format!("{:?}", m.reduce_dtype).to_lowercase())
            },
        }
    };
}

/// Every rule of `training`.
pub fn rules() -> Vec<Rule> {
    let mut r = vec![
        // ---- model
        Rule {
            field: "model.patchSize",
            constraint: "must be >= 1",
            fix: "use the patch side in pixels, e.g. 14 or 16",
            cel: || format!("{} >= 1", eff("model.patchSize")),
            check: |c| (c.model.patch_size < 1).then(|| c.model.patch_size.to_string()),
        },
        Rule {
            field: "model.dropPathRate",
            constraint: "must be in [0, 1)",
            fix: "use a stochastic-depth rate such as 0.3",
            cel: || {
                let v = eff("model.dropPathRate");
                format!("{v} >= 0.0 && {v} < 1.0")
            },
            check: |c| unit_closed_open(c.model.drop_path_rate),
        },
        Rule {
            field: "model.layerscale",
            constraint: "must be >= 0",
            fix: "use 1.0e-5 (official) or 0 to disable LayerScale",
            cel: || format!("{} >= 0.0", eff("model.layerscale")),
            check: |c| nonneg(c.model.layerscale),
        },
        Rule {
            field: "model.arch",
            constraint: "custom needs model.embedDim, model.depth and model.numHeads",
            fix: "set all three or pick an official arch",
            cel: || {
                format!(
                    "{} != 'custom' || ({} && {} && {})",
                    eff("model.arch"),
                    has("model.embedDim"),
                    has("model.depth"),
                    has("model.numHeads")
                )
            },
            check: |c| {
                let m = &c.model;
                (m.arch == Arch::Custom
                    && (m.embed_dim.is_none() || m.depth.is_none() || m.num_heads.is_none()))
                .then(|| "arch custom without all of embedDim, depth, numHeads".into())
            },
        },
        Rule {
            field: "model.embedDim",
            constraint: "embedDim, depth and numHeads are only allowed with model.arch: custom",
            fix: "remove them or set model.arch: custom",
            cel: || {
                format!(
                    "{} == 'custom' || !({} || {} || {})",
                    eff("model.arch"),
                    has("model.embedDim"),
                    has("model.depth"),
                    has("model.numHeads")
                )
            },
            check: |c| {
                let m = &c.model;
                (m.arch != Arch::Custom
                    && (m.embed_dim.is_some() || m.depth.is_some() || m.num_heads.is_some()))
                .then(|| format!("{:?} with explicit dimensions", m.arch))
            },
        },
        Rule {
            field: "model.numHeads",
            constraint: "must divide model.embedDim",
            fix: "pick a head count that divides the embedding width, e.g. embedDim 192 with 3 heads",
            cel: || {
                format!(
                    "!({h} && {d}) || (self.model.numHeads > 0 && self.model.embedDim % self.model.numHeads == 0)",
                    h = has("model.numHeads"),
                    d = has("model.embedDim")
                )
            },
            check: |c| match (c.model.embed_dim, c.model.num_heads) {
                (Some(d), Some(h)) if h == 0 || d % h != 0 => {
                    Some(format!("{h} heads for embedDim {d}"))
                }
                _ => None,
            },
        },
        // ---- crops vs patch size
        Rule {
            field: "crops.globalCropsSize",
            constraint: "must be a multiple of training.model.patchSize",
            fix: "pick a crop size divisible by the patch size (224 for patch 14 or 16)",
            cel: || {
                let p = eff("model.patchSize");
                format!("{p} < 1 || {} % {p} == 0", eff("crops.globalCropsSize"))
            },
            check: |c| {
                let (g, p) = (c.crops.global_crops_size, c.model.patch_size);
                (p >= 1 && g % p != 0).then(|| format!("{g} with patchSize {p}"))
            },
        },
        Rule {
            field: "crops.localCropsSize",
            constraint: "must be a multiple of training.model.patchSize",
            fix: "pick a crop size divisible by the patch size (96 for patch 16, 98 for patch 14)",
            cel: || {
                let p = eff("model.patchSize");
                format!("{p} < 1 || {} % {p} == 0", eff("crops.localCropsSize"))
            },
            check: |c| {
                let (l, p) = (c.crops.local_crops_size, c.model.patch_size);
                (p >= 1 && l % p != 0).then(|| format!("{l} with patchSize {p}"))
            },
        },
        Rule {
            field: "crops.localCropsSize",
            constraint: "must be <= training.crops.globalCropsSize",
            fix: "local crops are the small views; make them smaller than the global crops",
            cel: || {
                format!(
                    "{} <= {}",
                    eff("crops.localCropsSize"),
                    eff("crops.globalCropsSize")
                )
            },
            check: |c| {
                (c.crops.local_crops_size > c.crops.global_crops_size).then(|| {
                    format!(
                        "{} > {}",
                        c.crops.local_crops_size, c.crops.global_crops_size
                    )
                })
            },
        },
        Rule {
            field: "crops.globalCropsScale",
            constraint: "min must be <= max",
            fix: "swap the two values",
            cel: || {
                let v = eff("crops.globalCropsScale");
                format!("{v}[0] <= {v}[1]")
            },
            check: |c| {
                let s = c.crops.global_crops_scale;
                (s[0] > s[1]).then(|| pair(s))
            },
        },
        Rule {
            field: "crops.globalCropsScale",
            constraint: "bounds must be in (0, 1]",
            fix: "use area fractions such as [0.32, 1.0]",
            cel: || {
                let v = eff("crops.globalCropsScale");
                format!("{v}.all(x, x > 0.0 && x <= 1.0)")
            },
            check: |c| {
                let s = c.crops.global_crops_scale;
                s.iter()
                    .any(|x| unit_open_closed(*x).is_some())
                    .then(|| pair(s))
            },
        },
        Rule {
            field: "crops.localCropsScale",
            constraint: "min must be <= max",
            fix: "swap the two values",
            cel: || {
                let v = eff("crops.localCropsScale");
                format!("{v}[0] <= {v}[1]")
            },
            check: |c| {
                let s = c.crops.local_crops_scale;
                (s[0] > s[1]).then(|| pair(s))
            },
        },
        Rule {
            field: "crops.localCropsScale",
            constraint: "bounds must be in (0, 1]",
            fix: "use area fractions such as [0.05, 0.32]",
            cel: || {
                let v = eff("crops.localCropsScale");
                format!("{v}.all(x, x > 0.0 && x <= 1.0)")
            },
            check: |c| {
                let s = c.crops.local_crops_scale;
                s.iter()
                    .any(|x| unit_open_closed(*x).is_some())
                    .then(|| pair(s))
            },
        },
        Rule {
            field: "crops.localCropsScale",
            constraint: "each bound must be <= the matching bound of training.crops.globalCropsScale",
            fix: "local crops cover less of the image than global crops; lower the local scale",
            cel: || {
                let (l, g) = (eff("crops.localCropsScale"), eff("crops.globalCropsScale"));
                format!("{l}[0] <= {g}[0] && {l}[1] <= {g}[1]")
            },
            check: |c| {
                let (l, g) = (c.crops.local_crops_scale, c.crops.global_crops_scale);
                (l[0] > g[0] || l[1] > g[1]).then(|| format!("{} vs global {}", pair(l), pair(g)))
            },
        },
        Rule {
            field: "crops.augmentation.hue",
            constraint: "must be in [0, 0.5]",
            fix: "use a hue jitter such as 0.1",
            cel: || {
                let v = eff("crops.augmentation.hue");
                format!("{v} >= 0.0 && {v} <= 0.5")
            },
            check: |c| {
                let h = c.crops.augmentation.hue;
                (h.is_nan() || !(0.0..=0.5).contains(&h)).then(|| h.to_string())
            },
        },
        Rule {
            field: "crops.augmentation.blurSigma",
            constraint: "needs 0 < min <= max",
            fix: "order the two sigmas min first, both positive, e.g. [0.1, 2.0]",
            cel: || {
                let v = eff("crops.augmentation.blurSigma");
                format!("{v}[0] > 0.0 && {v}[0] <= {v}[1]")
            },
            check: |c| {
                let s = c.crops.augmentation.blur_sigma;
                (!(s[0] > 0.0 && s[0] <= s[1])).then(|| pair(s))
            },
        },
        Rule {
            field: "crops.augmentation.normalizeStd",
            constraint: "must have one positive value per entry of normalizeMean",
            fix: "give as many standard deviations as means, all > 0",
            cel: || {
                let (s, m) = (
                    eff("crops.augmentation.normalizeStd"),
                    eff("crops.augmentation.normalizeMean"),
                );
                format!("size({s}) == size({m}) && {s}.all(x, x > 0.0)")
            },
            check: |c| {
                let a = &c.crops.augmentation;
                (a.normalize_std.len() != a.normalize_mean.len()
                    || a.normalize_std.iter().any(|x| pos(*x).is_some()))
                .then(|| format!("{:?} for means {:?}", a.normalize_std, a.normalize_mean))
            },
        },
        // ---- heads and losses
        Rule {
            field: "ibot.maskRatioMinMax",
            constraint: "needs 0 <= min <= max <= 1",
            fix: "order the two ratios min first, both between 0 and 1, e.g. [0.1, 0.5]",
            cel: || {
                let v = eff("ibot.maskRatioMinMax");
                format!("{v}[0] >= 0.0 && {v}[0] <= {v}[1] && {v}[1] <= 1.0")
            },
            check: |c| {
                let s = c.ibot.mask_ratio_min_max;
                (!(s[0] >= 0.0 && s[0] <= s[1] && s[1] <= 1.0)).then(|| pair(s))
            },
        },
        Rule {
            field: "dino.lossWeight",
            constraint: "dino.lossWeight and ibot.lossWeight must not both be 0",
            fix: "set at least one of them > 0, or nothing is trained",
            cel: || {
                format!(
                    "{} > 0.0 || {} > 0.0",
                    eff("dino.lossWeight"),
                    eff("ibot.lossWeight")
                )
            },
            check: |c| {
                (c.dino.loss_weight <= 0.0 && c.ibot.loss_weight <= 0.0)
                    .then(|| "both 0".to_string())
            },
        },
        Rule {
            field: "teacher.momentumTeacher",
            constraint: "must be <= training.teacher.finalMomentumTeacher",
            fix: "the EMA momentum rises during training; lower it or raise the final momentum",
            cel: || {
                format!(
                    "{} <= {}",
                    eff("teacher.momentumTeacher"),
                    eff("teacher.finalMomentumTeacher")
                )
            },
            check: |c| {
                let t = &c.teacher;
                (t.momentum_teacher > t.final_momentum_teacher)
                    .then(|| format!("{} > {}", t.momentum_teacher, t.final_momentum_teacher))
            },
        },
        Rule {
            field: "teacher.teacherTemp",
            constraint: "must be in (0, 1]",
            fix: "use a temperature such as 0.07",
            cel: || {
                let v = eff("teacher.teacherTemp");
                format!("{v} > 0.0 && {v} <= 1.0")
            },
            check: |c| unit_open_closed(c.teacher.teacher_temp),
        },
        Rule {
            field: "teacher.warmupTeacherTemp",
            constraint: "must be in (0, 1]",
            fix: "use a temperature such as 0.04",
            cel: || {
                let v = eff("teacher.warmupTeacherTemp");
                format!("{v} > 0.0 && {v} <= 1.0")
            },
            check: |c| unit_open_closed(c.teacher.warmup_teacher_temp),
        },
        Rule {
            field: "teacher.warmupTeacherTempEpochs",
            constraint: "must be <= training.optim.epochs",
            fix: "shorten the temperature warm-up or train longer",
            cel: || {
                format!(
                    "{} <= {}",
                    eff("teacher.warmupTeacherTempEpochs"),
                    eff("optim.epochs")
                )
            },
            check: |c| {
                (c.teacher.warmup_teacher_temp_epochs > c.optim.epochs).then(|| {
                    format!(
                        "{} > {}",
                        c.teacher.warmup_teacher_temp_epochs, c.optim.epochs
                    )
                })
            },
        },
        Rule {
            field: "loss.studentTemp",
            constraint: "must be in (0, 1]",
            fix: "use the official 0.1",
            cel: || {
                let v = eff("loss.studentTemp");
                format!("{v} > 0.0 && {v} <= 1.0")
            },
            check: |c| unit_open_closed(c.loss.student_temp),
        },
        // ---- optimisation
        Rule {
            field: "optim.epochs",
            constraint: "must be >= 1",
            fix: "train for at least one official epoch",
            cel: || format!("{} >= 1", eff("optim.epochs")),
            check: |c| (c.optim.epochs < 1).then(|| c.optim.epochs.to_string()),
        },
        Rule {
            field: "optim.baseLr",
            constraint: "must be > 0",
            fix: "use a positive learning rate, e.g. 0.004",
            cel: || format!("{} > 0.0", eff("optim.baseLr")),
            check: |c| pos(c.optim.base_lr),
        },
        Rule {
            field: "optim.lr",
            constraint: "must be >= 0",
            fix: "leave it 0 to derive it from baseLr, or give a positive learning rate",
            cel: || format!("{} >= 0.0", eff("optim.lr")),
            check: |c| nonneg(c.optim.lr),
        },
        Rule {
            field: "optim.minLr",
            constraint: "must be >= 0 and <= training.optim.baseLr",
            fix: "the cosine schedule decays to minLr; pick a value below baseLr",
            cel: || {
                let m = eff("optim.minLr");
                format!("{m} >= 0.0 && {m} <= {}", eff("optim.baseLr"))
            },
            check: |c| {
                (c.optim.min_lr.is_nan()
                    || c.optim.min_lr < 0.0
                    || c.optim.min_lr > c.optim.base_lr)
                    .then(|| format!("{} with baseLr {}", c.optim.min_lr, c.optim.base_lr))
            },
        },
        Rule {
            field: "optim.warmupEpochs",
            constraint: "must be <= training.optim.epochs",
            fix: "shorten the warm-up or train longer",
            cel: || format!("{} <= {}", eff("optim.warmupEpochs"), eff("optim.epochs")),
            check: |c| {
                (c.optim.warmup_epochs > c.optim.epochs)
                    .then(|| format!("{} > {}", c.optim.warmup_epochs, c.optim.epochs))
            },
        },
        Rule {
            field: "optim.freezeLastLayerEpochs",
            constraint: "must be <= training.optim.epochs",
            fix: "freeze the last layer for fewer epochs or train longer",
            cel: || {
                format!(
                    "{} <= {}",
                    eff("optim.freezeLastLayerEpochs"),
                    eff("optim.epochs")
                )
            },
            check: |c| {
                (c.optim.freeze_last_layer_epochs > c.optim.epochs)
                    .then(|| format!("{} > {}", c.optim.freeze_last_layer_epochs, c.optim.epochs))
            },
        },
        Rule {
            field: "optim.weightDecay",
            constraint: "must be >= 0",
            fix: "use the official 0.04",
            cel: || format!("{} >= 0.0", eff("optim.weightDecay")),
            check: |c| nonneg(c.optim.weight_decay),
        },
        Rule {
            field: "optim.weightDecayEnd",
            constraint: "must be >= 0",
            fix: "use the official 0.4",
            cel: || format!("{} >= 0.0", eff("optim.weightDecayEnd")),
            check: |c| nonneg(c.optim.weight_decay_end),
        },
        Rule {
            field: "optim.clipGrad",
            constraint: "must be >= 0",
            fix: "use 3.0 (official) or 0 to disable clipping",
            cel: || format!("{} >= 0.0", eff("optim.clipGrad")),
            check: |c| nonneg(c.optim.clip_grad),
        },
        Rule {
            field: "optim.patchEmbedLrMult",
            constraint: "must be >= 0",
            fix: "use the official 0.2",
            cel: || format!("{} >= 0.0", eff("optim.patchEmbedLrMult")),
            check: |c| nonneg(c.optim.patch_embed_lr_mult),
        },
        Rule {
            field: "optim.layerwiseDecay",
            constraint: "must be in (0, 1]",
            fix: "use 0.9 (official) or 1.0 to disable layer-wise decay",
            cel: || {
                let v = eff("optim.layerwiseDecay");
                format!("{v} > 0.0 && {v} <= 1.0")
            },
            check: |c| unit_open_closed(c.optim.layerwise_decay),
        },
        Rule {
            field: "optim.adamwBeta1",
            constraint: "must be in [0, 1)",
            fix: "use the official 0.9",
            cel: || {
                let v = eff("optim.adamwBeta1");
                format!("{v} >= 0.0 && {v} < 1.0")
            },
            check: |c| unit_closed_open(c.optim.adamw_beta1),
        },
        Rule {
            field: "optim.adamwBeta2",
            constraint: "must be in [0, 1)",
            fix: "use the official 0.999",
            cel: || {
                let v = eff("optim.adamwBeta2");
                format!("{v} >= 0.0 && {v} < 1.0")
            },
            check: |c| unit_closed_open(c.optim.adamw_beta2),
        },
        // ---- train, data
        Rule {
            field: "train.batchSizePerGpu",
            constraint: "must be >= 1",
            fix: "give at least one image per GPU",
            cel: || format!("{} >= 1", eff("train.batchSizePerGpu")),
            check: |c| (c.train.batch_size_per_gpu < 1).then(|| "0".into()),
        },
        Rule {
            field: "train.officialEpochLength",
            constraint: "must be >= 1",
            fix: "use the official 1250 iterations per epoch",
            cel: || format!("{} >= 1", eff("train.officialEpochLength")),
            check: |c| (c.train.official_epoch_length < 1).then(|| "0".into()),
        },
        Rule {
            field: "data.path",
            constraint: "is required",
            fix: "set it to where the training images are (for kind idx, the *-images-idx3-ubyte[.gz] file)",
            cel: || format!("{} && self.data.path != ''", has("data.path")),
            check: |c| {
                c.data
                    .path
                    .trim()
                    .is_empty()
                    .then(|| "an empty path".into())
            },
        },
        Rule {
            field: "data.extraPath",
            constraint: "is only read with data.kind imagenet (the official entries-<SPLIT>.npy files)",
            fix: "remove it, or set data.kind: imagenet for the official ImageNet-1k layout",
            cel: || {
                format!(
                    "!({}) || {} == 'imagenet'",
                    has("data.extraPath"),
                    eff("data.kind")
                )
            },
            check: |c| {
                (c.data.extra_path.is_some() && c.data.kind != DatasetKind::Imagenet)
                    .then(|| format!("kind {:?}", c.data.kind))
            },
        },
        Rule {
            field: "data.split",
            constraint: "only data.kind imagenet has splits",
            fix: "remove it (other kinds read data.path as it is), or set data.kind: imagenet",
            cel: || {
                format!(
                    "{} == 'TRAIN' || {} == 'imagenet'",
                    eff("data.split"),
                    eff("data.kind")
                )
            },
            check: |c| {
                (c.data.split != DatasetSplit::Train && c.data.kind != DatasetKind::Imagenet)
                    .then(|| format!("{:?} with kind {:?}", c.data.split, c.data.kind))
            },
        },
        Rule {
            field: "model.activationCheckpointing",
            constraint: ACTIVATION_CHECKPOINTING_REFUSAL,
            fix: "remove it or set it to false; to save memory use sharding.student.*: SHARD_GRAD_OP and fp16/bf16 param dtypes",
            cel: || format!("!{}", eff("model.activationCheckpointing")),
            check: |c| c.model.activation_checkpointing.then(|| "true".into()),
        },
        Rule {
            field: "data.cacheDataset",
            constraint: "must be true: the dataset index (file list, tar member offsets, ImageNet entries) is always held in memory, and the official trainer never reads this key either",
            fix: "remove it or set it to true",
            cel: || eff("data.cacheDataset"),
            check: |c| (!c.data.cache_dataset).then(|| "false".into()),
        },
        Rule {
            field: "model.weights",
            constraint: "model.weights and model.pretrainedWeights are exclusive",
            fix: "keep model.weights to start from a whole training checkpoint (backbones and heads), or model.pretrainedWeights to start the backbones only",
            cel: || {
                format!(
                    "{} == '' || {} == ''",
                    eff("model.weights"),
                    eff("model.pretrainedWeights")
                )
            },
            check: |c| {
                (!c.model.weights.is_empty() && !c.model.pretrained_weights.is_empty())
                    .then(|| "both set".into())
            },
        },
        // ---- precision
        Rule {
            field: "precision.gradScaler",
            constraint: "fp16 parameters need dynamic loss scaling",
            fix: "set precision.gradScaler: true, or use bf16 or fp32 paramDtypes",
            cel: || {
                let fp16 = [
                    "student.backbone",
                    "student.dinoHead",
                    "student.ibotHead",
                    "teacher.backbone",
                    "teacher.dinoHead",
                    "teacher.ibotHead",
                ]
                .iter()
                .map(|m| format!("{} == 'fp16'", eff(&format!("precision.{m}.paramDtype"))))
                .collect::<Vec<_>>()
                .join(" || ");
                format!("{} || !({fp16})", eff("precision.gradScaler"))
            },
            check: |c| {
                let p = &c.precision;
                let params = [
                    p.student.backbone.param_dtype,
                    p.student.dino_head.param_dtype,
                    p.student.ibot_head.param_dtype,
                    p.teacher.backbone.param_dtype,
                    p.teacher.dino_head.param_dtype,
                    p.teacher.ibot_head.param_dtype,
                ];
                (!p.grad_scaler && params.contains(&Dtype::Fp16))
                    .then(|| "gradScaler false with fp16 parameters".into())
            },
        },
        Rule {
            field: "precision.lossScale.initScale",
            constraint: "must be > 0",
            fix: "use the torch default 65536",
            cel: || format!("{} > 0.0", eff("precision.lossScale.initScale")),
            check: |c| pos(c.precision.loss_scale.init_scale),
        },
        Rule {
            field: "precision.lossScale.growthFactor",
            constraint: "must be > 1",
            fix: "use the torch default 2.0",
            cel: || format!("{} > 1.0", eff("precision.lossScale.growthFactor")),
            check: |c| {
                let g = c.precision.loss_scale.growth_factor;
                (g.is_nan() || g <= 1.0).then(|| g.to_string())
            },
        },
        Rule {
            field: "precision.lossScale.backoffFactor",
            constraint: "must be in (0, 1)",
            fix: "use the torch default 0.5",
            cel: || {
                let v = eff("precision.lossScale.backoffFactor");
                format!("{v} > 0.0 && {v} < 1.0")
            },
            check: |c| {
                let b = c.precision.loss_scale.backoff_factor;
                (b.is_nan() || b <= 0.0 || b >= 1.0).then(|| b.to_string())
            },
        },
        Rule {
            field: "precision.lossScale.growthInterval",
            constraint: "must be >= 1",
            fix: "use the torch default 2000",
            cel: || format!("{} >= 1", eff("precision.lossScale.growthInterval")),
            check: |c| (c.precision.loss_scale.growth_interval < 1).then(|| "0".into()),
        },
        Rule {
            field: "precision",
            constraint: "every paramDtype must be the same: the trainer runs the whole step (student and teacher, backbone and heads) in one compute dtype",
            fix: "set all six paramDtypes to one of fp32, bf16 or fp16",
            cel: || {
                let first = eff("precision.student.backbone.paramDtype");
                MODULES
                    .iter()
                    .map(|m| format!("{} == {first}", eff(&format!("precision.{m}.paramDtype"))))
                    .collect::<Vec<_>>()
                    .join(" && ")
            },
            check: |c| {
                let dtypes = module_dtypes(c, |d| d.0);
                dtypes
                    .iter()
                    .any(|d| *d != dtypes[0])
                    .then(|| format!("{dtypes:?}").to_lowercase())
            },
        },
        Rule {
            field: "precision",
            constraint: "every bufferDtype must be fp32: the trainer keeps all buffers (the loss centers included) in fp32",
            fix: "set bufferDtype: fp32 (the official value) on every module",
            cel: || {
                MODULES
                    .iter()
                    .map(|m| format!("{} == 'fp32'", eff(&format!("precision.{m}.bufferDtype"))))
                    .collect::<Vec<_>>()
                    .join(" && ")
            },
            check: |c| {
                let dtypes = module_dtypes(c, |d| d.2);
                dtypes
                    .iter()
                    .any(|d| *d != Dtype::Fp32)
                    .then(|| format!("{dtypes:?}").to_lowercase())
            },
        },
        teacher_reduce_dtype_rule!("backbone", backbone),
        teacher_reduce_dtype_rule!("dinoHead", dino_head),
        teacher_reduce_dtype_rule!("ibotHead", ibot_head),
        // ---- sharding
        Rule {
            field: "sharding",
            constraint: FULL_SHARD_REFUSAL,
            fix: "use SHARD_GRAD_OP (the official default: gradients and AdamW state sharded) or NO_SHARD",
            cel: || {
                MODULES
                    .iter()
                    .map(|m| format!("{} != 'FULL_SHARD'", eff(&format!("sharding.{m}"))))
                    .collect::<Vec<_>>()
                    .join(" && ")
            },
            check: |c| {
                let (s, t) = (&c.sharding.student, &c.sharding.teacher);
                [
                    s.backbone,
                    s.dino_head,
                    s.ibot_head,
                    t.backbone,
                    t.dino_head,
                    t.ibot_head,
                ]
                .contains(&ShardingStrategy::FullShard)
                .then(|| "FULL_SHARD".into())
            },
        },
        // ---- curriculum
        Rule {
            field: "curriculum.phases",
            constraint: "each phase needs exactly one of startIteration or startEpoch",
            fix: "give every phase one start, in iterations or in epochs",
            cel: || {
                format!(
                    "!({}) || self.curriculum.phases.all(p, has(p.startIteration) != has(p.startEpoch))",
                    has("curriculum.phases")
                )
            },
            check: |c| {
                c.curriculum
                    .phases
                    .iter()
                    .position(|p| p.start_iteration.is_some() == p.start_epoch.is_some())
                    .map(|i| format!("phase {i}"))
            },
        },
        Rule {
            field: "curriculum.phases",
            constraint: "all phases must use the same unit",
            fix: "use startIteration in every phase or startEpoch in every phase",
            cel: || {
                format!(
                    "!({}) || self.curriculum.phases.all(p, has(p.startIteration)) || self.curriculum.phases.all(p, has(p.startEpoch))",
                    has("curriculum.phases")
                )
            },
            check: |c| {
                let ph = &c.curriculum.phases;
                let it = ph.iter().filter(|p| p.start_iteration.is_some()).count();
                let ep = ph.iter().filter(|p| p.start_epoch.is_some()).count();
                (it > 0 && ep > 0).then(|| format!("{it} by iteration, {ep} by epoch"))
            },
        },
        Rule {
            field: "curriculum.phases",
            constraint: "must start in strictly increasing order",
            fix: "sort the phases by start and remove duplicate starts",
            cel: || {
                let starts = "self.curriculum.phases.map(p, has(p.startIteration) ? p.startIteration : (has(p.startEpoch) ? p.startEpoch : 0))";
                format!(
                    "!({}) || ({starts}.isSorted() && {starts}.all(s, {starts}.filter(t, t == s).size() == 1))",
                    has("curriculum.phases")
                )
            },
            check: |c| {
                let starts: Vec<u64> = c
                    .curriculum
                    .phases
                    .iter()
                    .map(|p| {
                        p.start_iteration
                            .or(p.start_epoch.map(u64::from))
                            .unwrap_or(0)
                    })
                    .collect();
                starts
                    .windows(2)
                    .any(|w| w[0] >= w[1])
                    .then(|| format!("starts {starts:?}"))
            },
        },
        Rule {
            field: "curriculum.phases",
            constraint: "every phase must start before the end of training",
            fix: "start phases before optim.epochs (or epochs × train.officialEpochLength iterations)",
            cel: || {
                let (e, l) = (eff("optim.epochs"), eff("train.officialEpochLength"));
                format!(
                    "!({}) || self.curriculum.phases.all(p, has(p.startEpoch) ? p.startEpoch < {e} : (!has(p.startIteration) || p.startIteration < {e} * {l}))",
                    has("curriculum.phases")
                )
            },
            check: |c| {
                let total = c.total_iterations();
                let len = c.train.official_epoch_length;
                c.curriculum
                    .phases
                    .iter()
                    .filter_map(|p| p.start(len))
                    .find(|s| *s >= total)
                    .map(|s| format!("iteration {s} of {total}"))
            },
        },
        Rule {
            field: "curriculum.phases",
            constraint: "phase crop sizes must be multiples of training.model.patchSize",
            fix: "pick crop sizes divisible by the patch size",
            cel: || {
                let p = eff("model.patchSize");
                format!(
                    "!({}) || {p} < 1 || self.curriculum.phases.all(q, (!has(q.globalCropsSize) || q.globalCropsSize % {p} == 0) && (!has(q.localCropsSize) || q.localCropsSize % {p} == 0))",
                    has("curriculum.phases")
                )
            },
            check: |c| {
                let p = c.model.patch_size;
                if p < 1 {
                    return None;
                }
                c.curriculum.phases.iter().enumerate().find_map(|(i, q)| {
                    let bad = |s: Option<u32>| s.is_some_and(|s| s % p != 0);
                    (bad(q.global_crops_size) || bad(q.local_crops_size))
                        .then(|| format!("phase {i} with patchSize {p}"))
                })
            },
        },
        // ---- evaluation, checkpoint, logging
        Rule {
            field: "evaluation.knn.k",
            constraint: "every k must be >= 1",
            fix: "use neighbour counts such as [10, 20, 100, 200]",
            cel: || format!("{}.all(k, k >= 1)", eff("evaluation.knn.k")),
            check: |c| {
                let k = &c.evaluation.knn.k;
                (k.is_empty() || k.contains(&0)).then(|| format!("{k:?}"))
            },
        },
        Rule {
            field: "evaluation.knn.temperature",
            constraint: "must be > 0",
            fix: "use the official 0.07",
            cel: || format!("{} > 0.0", eff("evaluation.knn.temperature")),
            check: |c| pos(c.evaluation.knn.temperature),
        },
        Rule {
            field: "evaluation.linearProbe.learningRates",
            constraint: "every learning rate must be > 0",
            fix: "list positive learning rates",
            cel: || {
                format!(
                    "{}.all(x, x > 0.0)",
                    eff("evaluation.linearProbe.learningRates")
                )
            },
            check: |c| {
                let lrs = &c.evaluation.linear_probe.learning_rates;
                (lrs.is_empty() || lrs.iter().any(|x| pos(*x).is_some()))
                    .then(|| format!("{lrs:?}"))
            },
        },
        Rule {
            field: "checkpoint.keepLast",
            constraint: "must be >= 1",
            fix: "keep at least the latest checkpoint, or resuming is impossible",
            cel: || format!("{} >= 1", eff("checkpoint.keepLast")),
            check: |c| (c.checkpoint.keep_last < 1).then(|| "0".into()),
        },
        Rule {
            field: "checkpoint.saveckpFreq",
            constraint: "must stay at the official 20: the official trainer ignores this key and so does Dinoflow",
            fix: "remove it; set the checkpoint cadence with training.checkpoint.periodIterations",
            cel: || format!("{} == 20", eff("checkpoint.saveckpFreq")),
            check: |c| {
                (c.checkpoint.saveckp_freq != 20).then(|| c.checkpoint.saveckp_freq.to_string())
            },
        },
        Rule {
            field: "logging.metricsPort",
            constraint: "must be a port number (0 disables the endpoint)",
            fix: "use a value in 0..65535, e.g. 9464",
            cel: || {
                let v = eff("logging.metricsPort");
                format!("{v} >= 0 && {v} <= 65535")
            },
            check: |c| (c.logging.metrics_port > 65535).then(|| c.logging.metrics_port.to_string()),
        },
    ];
    r.extend(probability_rules![
        "ibot.maskSampleProbability" => |c| c.ibot.mask_sample_probability,
        "teacher.finalMomentumTeacher" => |c| c.teacher.final_momentum_teacher,
        "loss.centerMomentum" => |c| c.loss.center_momentum,
        "crops.augmentation.horizontalFlipProbability" => |c| c.crops.augmentation.horizontal_flip_probability,
        "crops.augmentation.colorJitterProbability" => |c| c.crops.augmentation.color_jitter_probability,
        "crops.augmentation.grayscaleProbability" => |c| c.crops.augmentation.grayscale_probability,
        "crops.augmentation.global1BlurProbability" => |c| c.crops.augmentation.global1_blur_probability,
        "crops.augmentation.global2BlurProbability" => |c| c.crops.augmentation.global2_blur_probability,
        "crops.augmentation.localBlurProbability" => |c| c.crops.augmentation.local_blur_probability,
        "crops.augmentation.global2SolarizeProbability" => |c| c.crops.augmentation.global2_solarize_probability,
    ]);
    r.push(Rule {
        field: "teacher.momentumTeacher",
        constraint: "must be in [0, 1]",
        fix: "use an EMA momentum such as 0.992",
        cel: || cel_prob("teacher.momentumTeacher"),
        check: |c| prob(c.teacher.momentum_teacher),
    });
    r
}

/// Runs every rule in Rust; the violations in rule order.
pub fn check(cfg: &TrainingConfig) -> Vec<Violation> {
    rules()
        .iter()
        .filter_map(|rule| {
            (rule.check)(cfg).map(|got| Violation {
                field: rule.field,
                message: format!("{}, got {got}; {}", rule.constraint, rule.fix),
            })
        })
        .collect()
}

/// Schema transform: attaches every rule as an `x-kubernetes-validations` entry.
pub fn attach_cel(schema: &mut Schema) {
    for rule in rules() {
        let cel = kube_core::Rule::new((rule.cel)())
            .message(rule.message().as_str())
            .field_path(format!(".{}", rule.field));
        kube_core::validate(schema, cel).expect("rules serialise");
    }
}
