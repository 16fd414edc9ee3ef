//! The losses of one step: left on the device by the step, read to the host in one go when the
//! caller asks for them.

use tch::{Kind, Tensor};

use crate::dist::Collective;
use crate::host_sync;

/// The losses of one step as the step left them: scalar tensors on the device, detached from
/// the graph. Nothing is read to the host until [`Self::read`].
#[derive(Debug)]
pub struct StepLosses {
    pub dino_local_crops_loss: Option<Tensor>,
    pub dino_global_crops_loss: Option<Tensor>,
    /// The weighted KoLeo term of both global crops together (reported halved).
    pub koleo: Option<Tensor>,
    /// The iBOT term of both global crops together, before its weight (reported halved).
    pub ibot: Option<Tensor>,
    /// What was back-propagated (before loss scaling).
    pub objective: Tensor,
}

impl StepLosses {
    /// Every term in one host read (one sync on a GPU), then averaged over the ranks as the
    /// official trainer reduces its `loss_dict` before logging and before its NaN check, so
    /// every rank takes the same decision; every rank must call it at the same iterations.
    pub fn read(&self, collective: &dyn Collective) -> LossValues {
        let terms = [
            &self.dino_local_crops_loss,
            &self.dino_global_crops_loss,
            &self.koleo,
            &self.ibot,
        ];
        let present: Vec<Tensor> = terms
            .into_iter()
            .flatten()
            .chain([&self.objective])
            .map(|t| t.to_kind(Kind::Double))
            .collect();
        // f32 -> f64 is exact, so these are the values `double_value` gave term by term.
        let read = host_sync::f64s(&Tensor::stack(&present, 0));
        let mut read = read.into_iter();
        let mut next = |t: &Option<Tensor>| t.as_ref().map(|_| read.next().unwrap_or(f64::NAN));
        let (local, global, koleo, ibot) = (
            next(terms[0]),
            next(terms[1]),
            next(terms[2]),
            next(terms[3]),
        );
        let mut values = LossValues {
            dino_local_crops_loss: local,
            dino_global_crops_loss: global,
            // Halved in f64 after the read, as the official `loss_dict` (and the old step) did.
            koleo_loss: koleo.map(|v| v / 2.0),
            ibot_loss: ibot.map(|v| v / 2.0),
            objective: read.next().unwrap_or(f64::NAN),
        };
        values.mean_over_ranks(collective);
        values
    }
}

/// The losses of one step, as the official `loss_dict` reports them, plus the objective
/// that was back-propagated (before loss scaling).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LossValues {
    pub dino_local_crops_loss: Option<f64>,
    pub dino_global_crops_loss: Option<f64>,
    pub koleo_loss: Option<f64>,
    pub ibot_loss: Option<f64>,
    pub objective: f64,
}

impl LossValues {
    /// Averages the values over the ranks.
    fn mean_over_ranks(&mut self, collective: &dyn Collective) {
        let mut slots: Vec<&mut f64> = [
            self.dino_local_crops_loss.as_mut(),
            self.dino_global_crops_loss.as_mut(),
            self.koleo_loss.as_mut(),
            self.ibot_loss.as_mut(),
        ]
        .into_iter()
        .flatten()
        .chain([&mut self.objective])
        .collect();
        let mut values: Vec<f64> = slots.iter().map(|v| **v).collect();
        crate::dist::mean_over_ranks(collective, &mut values);
        for (slot, v) in slots.iter_mut().zip(values) {
            **slot = v;
        }
    }
}
