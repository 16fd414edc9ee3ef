//! [`ShardedStudent`]: gradient reduction, global-norm clipping, the sharded AdamW update and
//! the all-gather of the updated shards, for a student with at least one sharded sub-module.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use super::units::{Piece, Unit, plan_units};
use super::{ParallelConfig, Sharding};
use crate::dist::{Collective, any_rank};
use crate::optim::{AdamW, AdamWConfig, ClipTensors, OptimError, ParamMultipliers};
use crate::precision::{DynamicLossScaler, StepDecision};

/// Gradient and optimizer-state bytes one rank holds between steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryBytes {
    /// Reduced gradients kept for the update (the rank's shard, or the whole gradient).
    pub gradients: u64,
    /// AdamW moments (fp32 `m` and `v`) and step counters.
    pub optimizer_state: u64,
}

impl MemoryBytes {
    pub fn total(&self) -> u64 {
        self.gradients + self.optimizer_state
    }

    /// A replicated student: every parameter's `.grad` and the whole AdamW state.
    pub fn replicated(optimizer: &AdamW, params: &[Tensor]) -> Self {
        let gradients = params
            .iter()
            .map(Tensor::grad)
            .filter(Tensor::defined)
            .map(|g| bytes(&g))
            .sum();
        Self {
            gradients,
            optimizer_state: state_bytes(optimizer),
        }
    }
}

fn bytes(t: &Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

fn state_bytes(optimizer: &AdamW) -> u64 {
    optimizer
        .names()
        .filter_map(|n| optimizer.state(n))
        .map(|s| bytes(&s.exp_avg) + bytes(&s.exp_avg_sq) + 8)
        .sum()
}

/// The student's flat units, this rank's slices and the AdamW state of those slices.
#[derive(Debug)]
pub struct ShardedStudent {
    rank: usize,
    world: usize,
    pub(super) units: Vec<Unit>,
    pub(super) pieces: Vec<Vec<Piece>>,
    /// AdamW over this rank's pieces (views into the full parameters), in unit/piece order;
    /// slot names are the student variable names.
    pub(super) optimizer: AdamW,
    /// Last reduced gradient slice of each unit (fp32, `shard_len`).
    grads: Vec<Tensor>,
}

impl ShardedStudent {
    /// Lays out the student's variables (per sub-module, sorted by name) for rank `rank` of
    /// `world`; `multipliers` gives each variable's lr/wd multipliers.
    pub fn new(
        submodules: &[(&'static str, Vec<(String, Tensor)>)],
        multipliers: &BTreeMap<String, ParamMultipliers>,
        depth: i64,
        cfg: &ParallelConfig,
        adamw: AdamWConfig,
        rank: usize,
        world: usize,
    ) -> Result<Self, OptimError> {
        let units = plan_units(submodules, depth, cfg, rank, world);
        let pieces: Vec<Vec<Piece>> = units.iter().map(Unit::pieces).collect();
        let mut slots = Vec::new();
        for (u, ps) in units.iter().zip(&pieces) {
            for p in ps {
                let (name, var) = &u.params[p.param];
                let mult = *multipliers
                    .get(name)
                    .ok_or_else(|| OptimError::UnknownParam(name.clone()))?;
                slots.push((name.clone(), piece_view(var, p), mult));
            }
        }
        let grads = units
            .iter()
            .map(|u| Tensor::zeros([u.shard_len], (Kind::Float, device(u))))
            .collect();
        Ok(Self {
            rank,
            world,
            units,
            pieces,
            optimizer: AdamW::new(adamw, slots)?,
            grads,
        })
    }

    /// `(rank, world size)` the layout was made for.
    pub fn placement(&self) -> (usize, usize) {
        (self.rank, self.world)
    }

    pub fn units(&self) -> &[Unit] {
        &self.units
    }

    /// The AdamW over this rank's pieces (slot names are student variable names).
    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    /// Reference `apply_optim_scheduler` on this rank's pieces.
    pub fn apply_schedule(&mut self, lr: f64, wd: f64, last_layer_lr: f64) {
        self.optimizer.apply_schedule(lr, wd, last_layer_lr);
    }

    /// Gradient and optimizer-state bytes this rank holds.
    pub fn memory(&self) -> MemoryBytes {
        MemoryBytes {
            gradients: self.grads.iter().map(bytes).sum(),
            optimizer_state: state_bytes(&self.optimizer),
        }
    }

    /// Backward of `objective` (already scaled in fp16), then per unit: reduce, (unscale),
    /// clip each sub-module by its global norm, AdamW on this rank's slices and all-gather
    /// the updated slices into the full parameters. Returns the clip statistics per
    /// sub-module and whether the update was applied (fp16 can skip it).
    pub fn backward_and_step(
        &mut self,
        objective: &Tensor,
        collective: &dyn Collective,
        scaler: Option<&mut DynamicLossScaler>,
        clip_grad: f64,
    ) -> Result<(Vec<(String, ClipTensors)>, bool), OptimError> {
        let has_grad = self.backward_and_reduce(objective, collective);
        let mut found_non_finite = false;
        let decide = scaler.is_some();
        if let Some(s) = &scaler {
            found_non_finite = s.unscale(&mut self.grads);
            if self.world > 1 {
                // Each rank saw only its slices: skip everywhere if any slice overflowed.
                found_non_finite = any_rank(collective, found_non_finite);
            }
        }
        let clip = if clip_grad > 0.0 {
            self.clip(collective, clip_grad)
        } else {
            Vec::new()
        };
        let applied = match scaler {
            Some(s) if decide => s.update(found_non_finite) == StepDecision::Apply,
            _ => true,
        };
        if applied {
            self.update(&has_grad)?;
            self.gather(collective);
        }
        Ok((clip, applied))
    }

    /// Gradients of all unit parameters without accumulating into `.grad` (nothing full-size
    /// survives the reduction), reduced unit by unit. Returns which parameters got one.
    fn backward_and_reduce(
        &mut self,
        objective: &Tensor,
        collective: &dyn Collective,
    ) -> Vec<Vec<bool>> {
        let params: Vec<&Tensor> = self
            .units
            .iter()
            .flat_map(|u| u.params.iter().map(|(_, v)| v))
            .collect();
        let mut grads = Tensor::run_backward(&[objective], &params, false, false).into_iter();
        let w = self.world as f64;
        let mut has_grad = Vec::with_capacity(self.units.len());
        tch::no_grad(|| {
            for (u, out) in self.units.iter().zip(&mut self.grads) {
                let mut flat = Vec::with_capacity(u.params.len() + 1);
                let mut got = Vec::with_capacity(u.params.len());
                for (_, v) in &u.params {
                    let g = grads.next().expect("one gradient per parameter");
                    got.push(g.defined());
                    flat.push(if g.defined() {
                        g.to_kind(Kind::Float).reshape([-1])
                    } else {
                        Tensor::zeros([v.numel() as i64], (Kind::Float, v.device()))
                    });
                }
                let pad = u.padded(self.world) - u.numel;
                if pad > 0 {
                    flat.push(Tensor::zeros([pad], (Kind::Float, device(u))));
                }
                let flat = Tensor::cat(&flat, 0);
                *out = reduce(u, flat, collective, w);
                has_grad.push(got);
            }
        });
        has_grad
    }

    /// Per sub-module: the global norm over every rank's slices, then the official
    /// `clip_grad_norm_` coefficient applied to this rank's slices.
    fn clip(&mut self, collective: &dyn Collective, max_norm: f64) -> Vec<(String, ClipTensors)> {
        let mut subs: Vec<&'static str> = Vec::new();
        for u in &self.units {
            if !subs.contains(&u.submodule) {
                subs.push(u.submodule);
            }
        }
        tch::no_grad(|| {
            let sq = |u: &Unit, g: &Tensor, sharding: Sharding| {
                if u.sharding == sharding {
                    g.square().sum(Kind::Float)
                } else {
                    Tensor::zeros([], (Kind::Float, g.device()))
                }
            };
            let per_sub = |sharding: Sharding| -> Vec<Tensor> {
                subs.iter()
                    .map(|s| {
                        let parts: Vec<Tensor> = self
                            .units
                            .iter()
                            .zip(&self.grads)
                            .filter(|(u, _)| u.submodule == *s)
                            .map(|(u, g)| sq(u, g, sharding))
                            .collect();
                        Tensor::stack(&parts, 0).sum(Kind::Float)
                    })
                    .collect()
            };
            let mut sharded = Tensor::stack(&per_sub(Sharding::ShardGradOp), 0);
            if self.world > 1 {
                collective.all_reduce_sum(&mut sharded);
            }
            let replicated = Tensor::stack(&per_sub(Sharding::NoShard), 0);
            let norms = (sharded + replicated).sqrt();
            let mut out = Vec::new();
            for (i, s) in subs.iter().enumerate() {
                let total = norms.get(i as i64);
                let coef = ((&total + 1e-6).reciprocal() * max_norm).clamp_max(1.0);
                for (u, g) in self.units.iter().zip(&mut self.grads) {
                    if u.submodule == *s {
                        let _ = g.g_mul_(&coef);
                    }
                }
                out.push((
                    s.to_string(),
                    ClipTensors {
                        total_norm: total,
                        clip_coef: coef,
                    },
                ));
            }
            out
        })
    }

    /// AdamW on this rank's pieces. A parameter without a gradient this step is skipped before
    /// its first update and then sees a zero gradient, as a replicated optimizer whose
    /// `zero_grad` keeps zeroed `.grad` tensors does.
    fn update(&mut self, has_grad: &[Vec<bool>]) -> Result<(), OptimError> {
        let mut grads = Vec::with_capacity(self.optimizer.len());
        for ((u, ps), (g, got)) in self
            .units
            .iter()
            .zip(&self.pieces)
            .zip(self.grads.iter().zip(has_grad))
        {
            for p in ps {
                let name = &u.params[p.param].0;
                grads.push(if got[p.param] {
                    Some(g.narrow(0, p.at, p.len))
                } else if self.optimizer.state(name).is_some() {
                    Some(g.narrow(0, p.at, p.len).zeros_like())
                } else {
                    None
                });
            }
        }
        self.optimizer.step_with_grads(&grads)
    }

    /// Every rank's updated slices of each sharded unit into the full parameters.
    fn gather(&self, collective: &dyn Collective) {
        tch::no_grad(|| {
            for (u, ps) in self.units.iter().zip(&self.pieces) {
                if u.sharding == Sharding::NoShard || self.world == 1 {
                    continue; // the update was applied to the full parameters in place
                }
                let mut parts: Vec<Tensor> = ps
                    .iter()
                    .map(|p| piece_view(&u.params[p.param].1, p))
                    .collect();
                let used: i64 = ps.iter().map(|p| p.len).sum();
                if used < u.shard_len {
                    parts.push(Tensor::zeros(
                        [u.shard_len - used],
                        (Kind::Float, device(u)),
                    ));
                }
                let full = collective.all_gather(&Tensor::cat(&parts, 0));
                for ((_, v), &off) in u.params.iter().zip(&u.offsets) {
                    let n = v.numel() as i64;
                    let mut dst = v.detach();
                    dst.copy_(&full.narrow(0, off, n).view_as(v));
                }
            }
        });
    }
}

/// Elements `[start, start + len)` of `var`, flattened, sharing its storage (AdamW updates the
/// full parameter through it).
pub(super) fn piece_view(var: &Tensor, p: &Piece) -> Tensor {
    tch::no_grad(|| var.detach().view([-1]).narrow(0, p.start, p.len))
}

fn device(u: &Unit) -> tch::Device {
    u.params
        .first()
        .map_or(tch::Device::Cpu, |(_, v)| v.device())
}

/// The mean over ranks of one unit's flat gradient, in the unit's reduce dtype: this rank's
/// slice when sharded, the whole when replicated. fp32 sums first and divides after (as DDP);
/// a 16-bit reduce divides first so the sum cannot overflow (FSDP's pre-divide).
fn reduce(u: &Unit, flat: Tensor, collective: &dyn Collective, w: f64) -> Tensor {
    let low = u.reduce_kind != Kind::Float;
    let mut x = if low {
        (flat / w).to_kind(u.reduce_kind)
    } else {
        flat
    };
    let out = match u.sharding {
        Sharding::NoShard => {
            if w > 1.0 {
                collective.all_reduce_sum(&mut x);
            }
            x
        }
        Sharding::ShardGradOp => collective.reduce_scatter_sum(&x),
    };
    let out = out.to_kind(Kind::Float);
    if low || w == 1.0 { out } else { out / w }
}
