//! Parity of the losses against the reference fixture `losses` (targets, centers, DINO /
//! iBOT / KoLeo values for both centering modes). Shapes and options come from the JSON.

use tch::{Kind, Tensor};

use super::centering::{CenterState, CenteringMode, TeacherCenter};
use super::{DinoLoss, DinoLossConfig, IbotLoss, IbotLossConfig, koleo_loss, koleo_per_crop_sum};
use crate::dist::Single;
use crate::parity_fixture::{Fixture, assert_close, assert_scalar_close};

/// Forward outputs (targets, centers) agree to this relative error (fixture README).
const FORWARD_TOL: f64 = 1e-5;

struct Setup {
    fx: Fixture,
    teacher_temp: f64,
    student_temp: f64,
    momentum: f64,
    n_global: usize,
    n_local: usize,
    loss_tol: f64,
}

fn setup() -> Setup {
    let fx = Fixture::load("losses");
    assert_eq!(
        fx.i64_at("/config/world_size"),
        1,
        "losses fixture: only single-process references can be replayed"
    );
    let iterations = fx.i64_at("/config/sinkhorn_iterations");
    assert_eq!(
        iterations as usize,
        super::centering::SINKHORN_ITERATIONS,
        "fixture uses a different Sinkhorn–Knopp iteration count"
    );
    assert_eq!(
        fx.f64_at("/config/koleo_eps"),
        super::koleo::KOLEO_EPS,
        "fixture uses a different KoLeo epsilon"
    );
    Setup {
        teacher_temp: fx.f64_at("/config/teacher_temp"),
        student_temp: fx.f64_at("/config/student_temp"),
        momentum: fx.f64_at("/config/center_momentum"),
        n_global: fx.i64_at("/config/n_global_crops") as usize,
        n_local: fx.i64_at("/config/n_local_crops") as usize,
        loss_tol: fx.f64_at("/tolerance/rel"),
        fx,
    }
}

fn modes(fx: &Fixture) -> Vec<(String, CenteringMode)> {
    let expect = fx.at("/expect").as_object().expect("expect object");
    let modes: Vec<_> = expect
        .iter()
        .filter(|(_, v)| v.get("dino_raw_global").is_some())
        .map(|(k, _)| (k.clone(), k.parse::<CenteringMode>().expect("known mode")))
        .collect();
    assert!(!modes.is_empty(), "losses fixture lists no centering mode");
    modes
}

fn dino_loss(s: &Setup) -> DinoLoss {
    let k = s.fx.i64_at("/config/dino_K");
    let mut loss = DinoLoss::new(
        &DinoLossConfig {
            out_dim: k,
            student_temp: s.student_temp,
            center_momentum: s.momentum,
            sinkhorn_iterations: super::centering::SINKHORN_ITERATIONS,
        },
        tch::Device::Cpu,
    )
    .unwrap();
    *loss.center_mut() = TeacherCenter::from_state(
        CenterState {
            center: s.fx.t("dino.center_before").copy(),
            pending: None,
        },
        s.momentum,
    )
    .unwrap();
    loss
}

fn ibot_loss(s: &Setup) -> IbotLoss {
    let k = s.fx.i64_at("/config/ibot_K");
    let mut loss = IbotLoss::new(
        &IbotLossConfig {
            out_dim: k,
            student_temp: s.student_temp,
            center_momentum: s.momentum,
            sinkhorn_iterations: super::centering::SINKHORN_ITERATIONS,
        },
        tch::Device::Cpu,
    )
    .unwrap();
    *loss.center_mut() = TeacherCenter::from_state(
        CenterState {
            center: s.fx.t("ibot.center_before").copy(),
            pending: None,
        },
        s.momentum,
    )
    .unwrap();
    loss
}

fn dino_targets(s: &Setup, mode: CenteringMode) -> Tensor {
    let mut loss = dino_loss(s);
    loss.teacher_targets(mode, s.fx.t("dino.teacher_logits"), s.teacher_temp, &Single)
        .unwrap()
}

#[test]
fn dino_centered_softmax_and_center_update_match_the_reference() {
    let s = setup();
    let mut loss = dino_loss(&s);
    let logits = s.fx.t("dino.teacher_logits");
    let targets = loss.softmax_center_teacher(logits, s.teacher_temp).unwrap();
    assert_close(
        "dino softmax_center_teacher",
        &targets,
        s.fx.t("dino.softmax_center_teacher"),
        FORWARD_TOL,
    );
    loss.update_center(logits, &Single).unwrap();
    assert_close(
        "dino center (pending)",
        loss.center().center(),
        s.fx.t("dino.center_before"),
        0.0,
    );
    loss.center_mut().apply_pending();
    assert_close(
        "dino center_after",
        loss.center().center(),
        s.fx.t("dino.center_after"),
        FORWARD_TOL,
    );
}

#[test]
fn dino_sinkhorn_knopp_targets_match_the_reference() {
    let s = setup();
    let loss = dino_loss(&s);
    let q = loss
        .sinkhorn_knopp_teacher(s.fx.t("dino.teacher_logits"), s.teacher_temp, &Single)
        .unwrap();
    assert_close(
        "dino sinkhorn_knopp_teacher",
        &q,
        s.fx.t("dino.sinkhorn_knopp_teacher"),
        FORWARD_TOL,
    );
}

#[test]
fn dino_local_and_global_losses_match_for_every_centering_mode() {
    let s = setup();
    let loss = dino_loss(&s);
    let global = s.fx.t("dino.student_global_logits");
    let local = (s.n_local > 0).then(|| s.fx.t("dino.student_local_logits"));
    assert_eq!(global.size()[0] as usize % s.n_global, 0);
    for (name, mode) in modes(&s.fx) {
        let targets = dino_targets(&s, mode);
        let out = loss
            .crop_losses(global, local, s.n_local, &targets)
            .unwrap();
        let e = |k: &str| s.fx.f64_at(&format!("/expect/{name}/{k}"));
        assert_scalar_close(
            &format!("{name} dino_raw_global"),
            out.raw_global.double_value(&[]),
            e("dino_raw_global"),
            s.loss_tol,
        );
        assert_scalar_close(
            &format!("{name} dino_global_crops_loss"),
            out.global.double_value(&[]),
            e("dino_global_crops_loss"),
            s.loss_tol,
        );
        if let (Some(raw), Some(norm)) = (&out.raw_local, &out.local) {
            assert_scalar_close(
                &format!("{name} dino_raw_local"),
                raw.double_value(&[]),
                e("dino_raw_local"),
                s.loss_tol,
            );
            assert_scalar_close(
                &format!("{name} dino_local_crops_loss"),
                norm.double_value(&[]),
                e("dino_local_crops_loss"),
                s.loss_tol,
            );
        }
    }
}

#[test]
fn ibot_masks_weight_follows_from_the_masks() {
    let s = setup();
    let masks = s.fx.t("ibot.masks");
    let counts = masks
        .sum_dim_intlist(&[-1i64][..], true, Kind::Float)
        .clamp_min(1.0);
    let weight =
        (counts.reciprocal() * masks.ones_like().to_kind(Kind::Float)).masked_select(masks);
    assert_close(
        "ibot masks_weight",
        &weight,
        s.fx.t("ibot.masks_weight"),
        0.0,
    );
    let n = s.fx.t("ibot.n_masked_patches").int64_value(&[0]);
    assert_eq!(n, masks.sum(Kind::Int64).int64_value(&[]));
    assert_eq!(n, s.fx.i64_at("/expect/n_masked_patches"));
}

#[test]
fn ibot_targets_and_center_update_match_the_reference() {
    let s = setup();
    let mut loss = ibot_loss(&s);
    let logits = s.fx.t("ibot.teacher_logits");
    let n = s.fx.t("ibot.n_masked_patches").int64_value(&[0]);
    let t = loss.softmax_center_teacher(logits, s.teacher_temp).unwrap();
    assert_close(
        "ibot softmax_center_teacher",
        &t,
        s.fx.t("ibot.softmax_center_teacher"),
        FORWARD_TOL,
    );
    loss.update_center(logits, &Single).unwrap();
    loss.center_mut().apply_pending();
    assert_close(
        "ibot center_after",
        loss.center().center(),
        s.fx.t("ibot.center_after"),
        FORWARD_TOL,
    );
    let q = loss
        .sinkhorn_knopp_teacher(logits, s.teacher_temp, n, &Single)
        .unwrap();
    assert_close(
        "ibot sinkhorn_knopp_teacher",
        &q,
        s.fx.t("ibot.sinkhorn_knopp_teacher"),
        FORWARD_TOL,
    );
}

#[test]
fn ibot_patch_loss_matches_for_every_centering_mode() {
    let s = setup();
    let logits = s.fx.t("ibot.teacher_logits");
    let n = s.fx.t("ibot.n_masked_patches").int64_value(&[0]);
    let n_images = s.fx.t("ibot.masks").size()[0];
    for (name, mode) in modes(&s.fx) {
        let mut loss = ibot_loss(&s);
        let targets = loss
            .teacher_targets(mode, logits, s.teacher_temp, n, &Single)
            .unwrap();
        let value = loss
            .forward_masked(
                s.fx.t("ibot.student_logits"),
                &targets,
                s.fx.t("ibot.masks_weight"),
                n_images,
            )
            .unwrap();
        let e = |k: &str| s.fx.f64_at(&format!("/expect/{name}/{k}"));
        assert_scalar_close(
            &format!("{name} ibot_forward_masked"),
            value.double_value(&[]),
            e("ibot_forward_masked"),
            s.loss_tol,
        );
        // Training scales by 2 (global crops processed together) × 1/n_global, shows half.
        let backprop = &value * 2.0 * (1.0 / s.n_global as f64);
        assert_scalar_close(
            &format!("{name} ibot_loss_backprop"),
            backprop.double_value(&[]),
            e("ibot_loss_backprop"),
            s.loss_tol,
        );
        assert_scalar_close(
            &format!("{name} ibot_loss_display"),
            (backprop / 2.0).double_value(&[]),
            e("ibot_loss_display"),
            s.loss_tol,
        );
    }
}

#[test]
fn koleo_terms_match_the_reference() {
    let s = setup();
    let cls = s.fx.t("koleo.cls_tokens");
    let expected: Vec<f64> =
        s.fx.at("/expect/koleo_per_chunk")
            .as_array()
            .expect("koleo_per_chunk list")
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
    assert_eq!(expected.len(), s.n_global);
    for (i, (chunk, want)) in cls
        .chunk(s.n_global as i64, 0)
        .iter()
        .zip(&expected)
        .enumerate()
    {
        let got = koleo_loss(chunk).unwrap().double_value(&[]);
        assert_scalar_close(&format!("koleo chunk {i}"), got, *want, s.loss_tol);
    }
    let weight = s.fx.f64_at("/config/koleo_loss_weight");
    let backprop = koleo_per_crop_sum(cls, s.n_global).unwrap() * weight;
    assert_scalar_close(
        "koleo_backprop",
        backprop.double_value(&[]),
        s.fx.f64_at("/expect/koleo_backprop"),
        s.loss_tol,
    );
    assert_scalar_close(
        "koleo_display",
        (backprop / 2.0).double_value(&[]),
        s.fx.f64_at("/expect/koleo_display"),
        s.loss_tol,
    );
}
