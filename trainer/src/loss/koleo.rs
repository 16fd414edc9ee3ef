//! KoLeo regulariser (Kozachenko–Leonenko entropy estimate, Sablayrolles et al. 2018) on the
//! student's backbone CLS tokens, as the reference `KoLeoLoss`.

use tch::{Kind, Tensor};

use super::{LossError, expect_2d};

/// `eps` of the reference: normalisation floor, pairwise-distance offset and log offset.
pub const KOLEO_EPS: f64 = 1e-8;

/// KoLeo loss of one block of vectors `[n, D]` (n ≥ 2):
/// L2-normalise rows, find each row's nearest neighbour by largest dot product (itself
/// excluded), and return `-mean(log(‖x_i − x_nn + eps‖₂ + eps))`. Always float32.
pub fn koleo_loss(x: &Tensor) -> Result<Tensor, LossError> {
    let (n, _) = expect_2d("KoLeo input", x, None, None)?;
    if n < 2 {
        return Err(LossError::Shape {
            name: "KoLeo input",
            expected: "[n ≥ 2, D] (each row needs a neighbour)".into(),
            got: x.size(),
        });
    }
    // The reference disables autocast here: the estimate is sensitive to low precision.
    let x = x.to_kind(Kind::Float);
    let norm = x
        .norm_scalaropt_dim(2.0, &[-1i64][..], true)
        .clamp_min(KOLEO_EPS)
        .expand_as(&x);
    let x = &x / norm;
    // The neighbour index carries no gradient, so the search can run without autograd.
    let nn = tch::no_grad(|| {
        let dots = x.mm(&x.tr());
        let _ = dots.diagonal(0, 0, 1).fill_(-1.0);
        dots.argmax(1, false)
    });
    let distances = Tensor::pairwise_distance(&x, &x.index_select(0, &nn), 2.0, KOLEO_EPS, false);
    Ok(-(distances + KOLEO_EPS).log().mean(None::<Kind>))
}

/// `Σ_c KoLeo(block c)` over the `n_crops` crop-major blocks of `cls_tokens` (the reference
/// never compares two crops of the same image). The training step multiplies this by
/// `dino.koleo_loss_weight` and reports half of that product.
pub fn koleo_per_crop_sum(cls_tokens: &Tensor, n_crops: usize) -> Result<Tensor, LossError> {
    let (rows, _) = expect_2d("KoLeo CLS tokens", cls_tokens, None, None)?;
    if n_crops == 0 || rows % n_crops as i64 != 0 {
        return Err(LossError::Shape {
            name: "KoLeo CLS tokens",
            expected: format!("[{n_crops}·B, D] (crop-major)"),
            got: cls_tokens.size(),
        });
    }
    let mut total: Option<Tensor> = None;
    for block in cls_tokens.chunk(n_crops as i64, 0) {
        let l = koleo_loss(&block)?;
        total = Some(match total {
            None => l,
            Some(acc) => acc + l,
        });
    }
    Ok(total.expect("n_crops > 0"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn evenly_spread_points_have_lower_loss_than_clustered_ones() {
        let spread =
            Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0, -1.0]).view([4, 2]);
        let clustered =
            Tensor::from_slice(&[1.0f32, 0.0, 1.0, 0.01, 1.0, 0.02, 1.0, 0.03]).view([4, 2]);
        let a = koleo_loss(&spread).unwrap().double_value(&[]);
        let b = koleo_loss(&clustered).unwrap().double_value(&[]);
        // Nearest neighbours of the square's corners are at distance √2.
        assert!((a + 2f64.sqrt().ln()).abs() < 1e-5, "{a}");
        assert!(b > a);
    }

    #[test]
    fn loss_ignores_the_scale_of_each_row() {
        let x = Tensor::randn([5, 3], (Kind::Float, Device::Cpu));
        let scales = Tensor::from_slice(&[1.0f32, 2.0, 0.5, 10.0, 3.0]).view([5, 1]);
        let a = koleo_loss(&x).unwrap().double_value(&[]);
        let b = koleo_loss(&(&x * scales)).unwrap().double_value(&[]);
        assert!((a - b).abs() < 1e-5);
    }

    #[test]
    fn gradient_flows_to_the_inputs() {
        let x = Tensor::randn([4, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        koleo_loss(&x).unwrap().backward();
        assert!(x.grad().abs().sum(None::<Kind>).double_value(&[]) > 0.0);
    }

    #[test]
    fn per_crop_sum_adds_the_blocks_and_rejects_uneven_rows() {
        let x = Tensor::randn([6, 3], (Kind::Float, Device::Cpu));
        let sum = koleo_per_crop_sum(&x, 2).unwrap().double_value(&[]);
        let a = koleo_loss(&x.narrow(0, 0, 3)).unwrap().double_value(&[]);
        let b = koleo_loss(&x.narrow(0, 3, 3)).unwrap().double_value(&[]);
        assert!((sum - (a + b)).abs() < 1e-6);
        assert!(koleo_per_crop_sum(&x, 4).is_err());
        assert!(koleo_loss(&x.narrow(0, 0, 1)).is_err());
    }
}
