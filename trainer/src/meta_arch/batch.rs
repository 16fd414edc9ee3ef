//! One collated batch and the shape checks every step runs before touching the networks.

use tch::{Kind, Tensor};

use crate::model::ModelError;

/// One collated batch, as the official `collate_data_and_cast` produces it.
#[derive(Debug)]
pub struct SslBatch {
    /// `[2·B, 3, H, W]`, crop-major.
    pub global_crops: Tensor,
    /// `[n_local·B, 3, h, w]`, crop-major (may have zero rows when there are no local crops).
    pub local_crops: Tensor,
    /// `[2·B, N]` bool, `true` = masked.
    pub masks: Tensor,
    /// `[n]` int64: positions of `true` in `masks.flatten()`.
    pub mask_indices_list: Tensor,
    /// `[n]` float: `1 / masked count` of each masked patch's image.
    pub masks_weight: Tensor,
    /// `n` (summed over ranks by the Sinkhorn-Knopp iBOT targets).
    pub n_masked_patches: i64,
    /// Rows of the padded masked-token buffers (`≥ n`).
    pub upperbound: i64,
}

impl SslBatch {
    pub fn n_masked(&self) -> i64 {
        self.mask_indices_list.size()[0]
    }

    /// Checks the shapes against each other and against the local-crop count.
    pub fn validate(&self, n_local_crops: i64) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::BadInput(m));
        let g = self.global_crops.size();
        if g.len() != 4 || g[0] % 2 != 0 || g[0] == 0 {
            return bad(format!("global_crops must be [2*B, 3, H, W], got {g:?}"));
        }
        let b = g[0] / 2;
        let l = self.local_crops.size();
        if n_local_crops > 0 && (l.len() != 4 || l[0] != n_local_crops * b) {
            return bad(format!(
                "local_crops must be [{}*{b}, 3, h, w], got {l:?}",
                n_local_crops
            ));
        }
        let m = self.masks.size();
        if m.len() != 2 || m[0] != g[0] || self.masks.kind() != Kind::Bool {
            return bad(format!(
                "masks must be bool [{}, N], got {:?} {m:?}",
                g[0],
                self.masks.kind()
            ));
        }
        let n = self.n_masked();
        if self.masks_weight.size() != [n] {
            return bad(format!(
                "masks_weight must have {n} entries, got {:?}",
                self.masks_weight.size()
            ));
        }
        if self.upperbound < n {
            return bad(format!(
                "upperbound {} is smaller than the {n} masked patches",
                self.upperbound
            ));
        }
        Ok(())
    }
}
