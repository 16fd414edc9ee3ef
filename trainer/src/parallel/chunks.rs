//! A sharded student as checkpoint [`Chunk`]s, and back from any world size.
//!
//! Names are `<group>/<name>` with the groups and names of the replicated checkpoint:
//! `student/<variable>` (the rank's pieces of each parameter), `optimizer/<variable>.exp_avg`,
//! `optimizer/<variable>.exp_avg_sq` (the same pieces) and `optimizer/<variable>.step` (`[1]`
//! int64, written by the rank holding the parameter's first element). A replicated checkpoint
//! read through a [`ChunkSource`] with these names therefore loads into a sharded student and
//! the other way round.

use tch::{Kind, Tensor};

use super::sharded::{ShardedStudent, piece_view};
use crate::checkpoint::{CheckpointError, Chunk, ChunkSource};
use crate::optim::{AdamWParamState, OptimError};

/// The checkpoint name of tensor `name` of group `group` (`student`, `optimizer`, `teacher`).
pub fn qualified(group: &str, name: &str) -> String {
    format!("{group}/{name}")
}

/// Why a sharded state could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ShardLoadError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Optim(#[from] OptimError),
    #[error(
        "checkpoint tensor {name} has shape {saved:?}, the model's is {model:?} (a checkpoint of another architecture?)"
    )]
    Shape {
        name: String,
        saved: Option<Vec<i64>>,
        model: Vec<i64>,
    },
}

impl ShardedStudent {
    /// This rank's pieces of the student parameters and of their AdamW state.
    pub fn chunks(&self) -> Vec<Chunk> {
        let mut out = Vec::new();
        for (u, ps) in self.units.iter().zip(&self.pieces) {
            for p in ps {
                let (name, var) = &u.params[p.param];
                let shape = var.size();
                let chunk = |group: &str, suffix: &str, data: Tensor| Chunk {
                    name: qualified(group, &format!("{name}{suffix}")),
                    shape: shape.clone(),
                    offset: p.start,
                    data,
                };
                out.push(chunk("student", "", piece_view(var, p).copy()));
                if let Some(st) = self.optimizer.state(name) {
                    out.push(chunk("optimizer", ".exp_avg", st.exp_avg.copy()));
                    out.push(chunk("optimizer", ".exp_avg_sq", st.exp_avg_sq.copy()));
                    if p.start == 0 {
                        out.push(Chunk {
                            name: qualified("optimizer", &format!("{name}.step")),
                            shape: vec![1],
                            offset: 0,
                            data: Tensor::from_slice(&[st.step as i64]),
                        });
                    }
                }
            }
        }
        out
    }

    /// Loads the full student parameters and this rank's AdamW pieces from `source`, whatever
    /// world size or sharding wrote it. A parameter without saved moments keeps none (it had
    /// not been updated yet).
    pub fn load_chunks(&mut self, source: &dyn ChunkSource) -> Result<(), ShardLoadError> {
        for u in &self.units {
            for (name, var) in &u.params {
                let key = qualified("student", name);
                let model = var.size();
                let saved = source.shape(&key);
                if saved.as_ref() != Some(&model) {
                    return Err(ShardLoadError::Shape {
                        name: key,
                        saved,
                        model,
                    });
                }
                let full = source.read(&key, 0, var.numel() as i64)?;
                tch::no_grad(|| {
                    var.detach().copy_(
                        &full
                            .to_kind(var.kind())
                            .to_device(var.device())
                            .view_as(var),
                    );
                });
            }
        }
        let mut states = Vec::new();
        for (u, ps) in self.units.iter().zip(&self.pieces) {
            for p in ps {
                let name = &u.params[p.param].0;
                let step_key = qualified("optimizer", &format!("{name}.step"));
                if source.shape(&step_key).is_none() {
                    continue;
                }
                let read = |suffix: &str| {
                    source
                        .read(
                            &qualified("optimizer", &format!("{name}{suffix}")),
                            p.start,
                            p.len,
                        )
                        .map(|t| t.to_kind(Kind::Float))
                };
                states.push((
                    name.clone(),
                    AdamWParamState {
                        exp_avg: read(".exp_avg")?,
                        exp_avg_sq: read(".exp_avg_sq")?,
                        step: source.read(&step_key, 0, 1)?.int64_value(&[0]) as u64,
                    },
                ));
            }
        }
        self.optimizer.load_state_dict(states)?;
        Ok(())
    }
}
