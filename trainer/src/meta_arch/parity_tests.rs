//! Parity of one full training step with the reference (`train_step` fixture), and the
//! bf16/fp16 steps against the fp32 one. The setup is built from the fixture's JSON config.

use serde_json::Value;
use tch::{Device, Kind, Tensor};

use super::{MetaArch, MetaArchConfig, SslBatch, StepReport, TargetSource};
use crate::dist::Single;
use crate::loss::CenteringMode;
use crate::model::DinoHeadConfig;
use crate::model::parity_tests::vit_config_from_fixture;
use crate::optim::{AdamWConfig, ParamGroupConfig, ScheduleValues};
use crate::parity_fixture::{Fixture, assert_close};
use crate::precision::Precision;
use crate::weights;

/// The meta-architecture of a training fixture (`train_step`, `train_trajectory`): every
/// setting from its JSON `config` (`arch`, the merged official `cfg`, and `adamw` where the
/// generator records it; otherwise `cfg.optim.adamw_beta1/2` and PyTorch's default eps, which
/// the reference never overrides).
pub(super) fn config_from_fixture(fx: &Fixture, precision: Precision) -> MetaArchConfig {
    let c = &fx.json["config"];
    let cfg = &c["cfg"];
    let num = |v: &Value| v.as_f64().unwrap();
    let int = |v: &Value| v.as_i64().unwrap();
    let student = vit_config_from_fixture(
        &c["arch"],
        Some(&cfg["student"]),
        int(&cfg["crops"]["global_crops_size"]),
    );
    let head = |section: &Value| DinoHeadConfig {
        in_dim: student.embed_dim,
        out_dim: int(&section["head_n_prototypes"]),
        hidden_dim: int(&section["head_hidden_dim"]),
        bottleneck_dim: int(&section["head_bottleneck_dim"]),
        nlayers: int(&section["head_nlayers"]),
        mlp_bias: true,
    };
    let adamw = match c.get("adamw") {
        Some(a) => {
            let betas = a["betas"].as_array().unwrap();
            AdamWConfig {
                beta1: num(&betas[0]),
                beta2: num(&betas[1]),
                eps: num(&a["eps"]),
            }
        }
        None => AdamWConfig {
            beta1: num(&cfg["optim"]["adamw_beta1"]),
            beta2: num(&cfg["optim"]["adamw_beta2"]),
            ..AdamWConfig::default()
        },
    };
    MetaArchConfig {
        dino_head: head(&cfg["dino"]),
        ibot_head: cfg["ibot"]["separate_head"]
            .as_bool()
            .unwrap()
            .then(|| head(&cfg["ibot"])),
        dino_loss_weight: num(&cfg["dino"]["loss_weight"]),
        koleo_loss_weight: num(&cfg["dino"]["koleo_loss_weight"]),
        ibot_loss_weight: num(&cfg["ibot"]["loss_weight"]),
        centering: cfg["train"]["centering"]
            .as_str()
            .unwrap()
            .parse::<CenteringMode>()
            .unwrap(),
        n_local_crops: int(&cfg["crops"]["local_crops_number"]),
        clip_grad: num(&cfg["optim"]["clip_grad"]),
        param_groups: ParamGroupConfig {
            layerwise_decay: num(&cfg["optim"]["layerwise_decay"]),
            patch_embed_lr_mult: num(&cfg["optim"]["patch_embed_lr_mult"]),
        },
        adamw,
        precision,
        ..MetaArchConfig::official(student.clone())
    }
}

fn batch_from_fixture(fx: &Fixture) -> SslBatch {
    collated_batch(fx, "collated.")
}

/// The collated batch stored under `prefix` (`collated.`, `step3.collated.`).
pub(super) fn collated_batch(fx: &Fixture, prefix: &str) -> SslBatch {
    let t = |name: &str| fx.t(&format!("{prefix}{name}"));
    SslBatch {
        global_crops: t("global_crops").shallow_clone(),
        local_crops: t("local_crops").shallow_clone(),
        masks: t("masks").shallow_clone(),
        mask_indices_list: t("mask_indices_list").shallow_clone(),
        masks_weight: t("masks_weight").shallow_clone(),
        n_masked_patches: t("n_masked_patches").int64_value(&[0]),
        upperbound: t("upperbound").int64_value(&[0]),
    }
}

fn hyper_from_fixture(fx: &Fixture) -> ScheduleValues {
    let a = &fx.json["applied"];
    let n = |k: &str| a[k].as_f64().unwrap();
    ScheduleValues {
        lr: n("lr"),
        wd: n("weight_decay"),
        momentum: n("momentum"),
        teacher_temp: n("teacher_temp"),
        last_layer_lr: n("last_layer_lr"),
    }
}

/// Student and teacher set to `before.student.*` (the teacher is a bit-identical copy).
pub(super) fn arch_from_fixture(fx: &Fixture, precision: Precision) -> MetaArch {
    let arch = MetaArch::new(config_from_fixture(fx, precision), Device::Cpu).unwrap();
    let sd = fx.state_dict("before.student.");
    weights::load_state_dict(&arch.student.vs, &sd).unwrap();
    weights::load_state_dict(&arch.teacher.vs, &sd).unwrap();
    arch
}

fn run_step(fx: &Fixture, precision: Precision) -> (MetaArch, StepReport) {
    let mut arch = arch_from_fixture(fx, precision);
    if precision == Precision::Fp16 {
        // A moderate initial scale keeps this single step from being skipped for overflow.
        arch.loss_scaler = Some(
            crate::precision::DynamicLossScaler::new(crate::precision::LossScalerConfig {
                init_scale: 256.0,
                ..Default::default()
            })
            .unwrap(),
        );
    }
    let out = arch
        .train_step(
            &batch_from_fixture(fx),
            &hyper_from_fixture(fx),
            &Single,
            TargetSource::Ema,
        )
        .unwrap()
        .read(&Single);
    (arch, out)
}

fn clip_coef(out: &StepReport, submodule: &str) -> f64 {
    out.clip
        .iter()
        .find(|(n, _)| n == submodule)
        .map_or(1.0, |(_, s)| s.clip_coef)
}

#[test]
fn parity_train_step_matches_the_reference_losses_gradients_and_weights() {
    let fx = Fixture::load("train_step");
    let tol = &fx.json["tolerance"];
    let (loss_tol, grad_tol, w_tol) = (
        tol["loss_rel"].as_f64().unwrap(),
        tol["grad_rel"].as_f64().unwrap(),
        tol["weights_rel"].as_f64().unwrap(),
    );
    let expect = &fx.json["expect"];
    let batch = batch_from_fixture(&fx);
    assert_eq!(
        batch.n_masked(),
        expect["n_masked_patches"].as_i64().unwrap()
    );
    assert_eq!(batch.upperbound, expect["upperbound"].as_i64().unwrap());

    // Teacher head outputs before the step.
    let arch0 = arch_from_fixture(&fx, Precision::Fp32);
    let t = arch0
        .teacher
        .teacher_head_outputs(&batch, Kind::Float, arch0.config.do_ibot())
        .unwrap();
    assert_close(
        "debug.teacher_cls_after_head",
        &t.cls_after_head,
        fx.t("debug.teacher_cls_after_head"),
        1e-5,
    );
    if let Some(p) = &t.masked_patches_after_head {
        assert_close(
            "debug.teacher_ibot_after_head",
            p,
            fx.t("debug.teacher_ibot_after_head"),
            1e-5,
        );
    }
    drop(arch0);

    let (mut arch, out) = run_step(&fx, Precision::Fp32);
    assert!(out.applied);

    // Losses.
    let l = &out.losses;
    let ours = [
        ("dino_local_crops_loss", l.dino_local_crops_loss),
        ("dino_global_crops_loss", l.dino_global_crops_loss),
        ("koleo_loss", l.koleo_loss),
        ("ibot_loss", l.ibot_loss),
    ];
    for (name, v) in ours {
        let reference = expect["loss_dict"][name].as_f64().unwrap();
        let v = v.unwrap_or_else(|| panic!("{name} missing"));
        assert!(
            (v - reference).abs() <= loss_tol * reference.abs(),
            "{name}: {v} vs {reference}"
        );
    }
    let objective = expect["objective"].as_f64().unwrap();
    assert!(
        (l.objective - objective).abs() <= loss_tol * objective.abs(),
        "objective {} vs {objective}",
        l.objective
    );

    // Per-submodule gradient norms and clip coefficients.
    for (name, stats) in &out.clip {
        let norm = expect["grad_norm_before_clip"][name].as_f64().unwrap();
        let coef = expect["clip_coef"][name].as_f64().unwrap();
        assert!(
            (stats.total_norm - norm).abs() <= grad_tol * norm,
            "{name} norm {} vs {norm}",
            stats.total_norm
        );
        assert!(
            (stats.clip_coef - coef).abs() <= grad_tol * coef,
            "{name} coef {} vs {coef}",
            stats.clip_coef
        );
    }
    assert_eq!(
        out.clip.len(),
        expect["grad_norm_before_clip"].as_object().unwrap().len()
    );

    // Gradients: the step leaves the clipped gradients in place; raw = clipped / our coef.
    let d = arch.config.student.embed_dim;
    let student_vars = arch.student.vs.variables();
    let teacher_vars = arch.teacher.vs.variables();
    let grads = fx.keys_with_prefix("grad.student.");
    assert_eq!(
        grads.len(),
        student_vars.len(),
        "every student parameter has a reference gradient"
    );
    for key in &grads {
        let name = &key["grad.student.".len()..];
        let submodule = name.split('.').next().unwrap();
        let coef = clip_coef(&out, submodule);
        let var = &student_vars[name];
        let ours = var.grad() / coef;
        let reference = fx.t(key);
        if name.ends_with("attn.qkv.bias") {
            // The key-bias third has a true gradient of 0: compare it absolutely.
            let key_bias = |t: &Tensor| t.narrow(0, d, d);
            let diff = (key_bias(&ours) - key_bias(reference))
                .abs()
                .max()
                .double_value(&[]);
            assert!(diff < 1e-7, "{name} key-bias gradient {diff}");
            for part in [0, 2] {
                assert_close(
                    name,
                    &ours.narrow(0, part * d, d),
                    &reference.narrow(0, part * d, d),
                    grad_tol,
                );
            }
        } else {
            assert_close(name, &ours, reference, grad_tol);
        }
    }

    // Weights after AdamW (student) and EMA (teacher).
    let momentum = fx.json["applied"]["momentum"].as_f64().unwrap();
    for (who, vars, factor) in [
        ("student", &student_vars, 1.0),
        ("teacher", &teacher_vars, 1.0 - momentum),
    ] {
        for key in fx.keys_with_prefix(&format!("after.{who}.")) {
            let name = &key[format!("after.{who}.").len()..];
            let submodule = name.split('.').next().unwrap();
            let reference = fx.t(&key);
            let ours = &vars[name];
            let clipped_ref = fx.t(&format!("grad.student.{name}"))
                * expect["clip_coef"][submodule].as_f64().unwrap();
            let big = clipped_ref.abs().ge(1e-6);
            let scale = reference.abs().max().double_value(&[]);
            let diff = (ours - reference).abs();
            let big_err = diff.masked_select(&big).max().double_value(&[]) / scale;
            assert!(
                big_err <= w_tol,
                "{key}: relative error {big_err:.3e} on elements with a clear gradient"
            );
            let lr = fx.json["param_groups"][name]["lr"].as_f64().unwrap();
            let small = big.logical_not();
            if bool::try_from(small.any()).unwrap() {
                let small_err = diff.masked_select(&small).max().double_value(&[]);
                // A float32 ulp of the weight is allowed on top of the lr bound.
                let slack = 2.0 * f64::from(f32::EPSILON) * scale;
                assert!(
                    small_err <= factor * lr + slack,
                    "{key}: {small_err:.3e} > lr bound {:.3e}",
                    factor * lr
                );
            }
        }
    }

    // Centers: the batch center is pending right after the step and folded in by the next call.
    let dino_center = arch.dino_loss.center().center().shallow_clone();
    assert_close(
        "center.dino.buffer_after_step",
        &dino_center,
        fx.t("center.dino.buffer_after_step"),
        1e-5,
    );
    arch.dino_loss.center_mut().apply_pending();
    assert_close(
        "center.dino.after_apply",
        arch.dino_loss.center().center(),
        fx.t("center.dino.after_apply"),
        1e-5,
    );
    if let Some(ibot) = arch.ibot_loss.as_mut() {
        assert_close(
            "center.ibot.buffer_after_step",
            ibot.center().center(),
            fx.t("center.ibot.buffer_after_step"),
            1e-5,
        );
        ibot.center_mut().apply_pending();
        assert_close(
            "center.ibot.after_apply",
            ibot.center().center(),
            fx.t("center.ibot.after_apply"),
            1e-5,
        );
    }
}

/// Documented low-precision tolerances, relative to the fp32 step on the same inputs:
/// bf16 (8-bit mantissa): losses within 5e-2, gradient norms within 1e-1;
/// fp16 (11-bit mantissa, dynamic loss scaling): losses within 1e-2, gradient norms within
/// 5e-2. In both, every weight stays within twice its lr of the fp32 result (AdamW's first
/// step moves a weight by at most its lr).
#[test]
fn parity_bf16_and_fp16_train_steps_stay_within_tolerance_of_fp32() {
    let fx = Fixture::load("train_step");
    // The fp32 step equals the reference (previous test), so the reference values stand in.
    let expect = &fx.json["expect"];
    let fp32_weights = fx.keys_with_prefix("after.student.");
    let reference = fp32_weights
        .iter()
        .map(|k| (k.clone(), fx.t(k).shallow_clone()))
        .collect::<Vec<_>>();
    for (precision, loss_tol, norm_tol) in
        [(Precision::Bf16, 5e-2, 1e-1), (Precision::Fp16, 1e-2, 5e-2)]
    {
        let (arch, out) = run_step(&fx, precision);
        assert!(out.applied, "{precision:?} step skipped");
        let pairs = [
            (out.losses.dino_local_crops_loss, "dino_local_crops_loss"),
            (out.losses.dino_global_crops_loss, "dino_global_crops_loss"),
            (out.losses.koleo_loss, "koleo_loss"),
            (out.losses.ibot_loss, "ibot_loss"),
        ];
        for (low, name) in pairs {
            let (low, high) = (low.unwrap(), expect["loss_dict"][name].as_f64().unwrap());
            assert!(
                (low - high).abs() <= loss_tol * high.abs(),
                "{precision:?}: loss {low} vs fp32 {high}"
            );
        }
        for (name, low) in &out.clip {
            let high = expect["grad_norm_before_clip"][name].as_f64().unwrap();
            let e = (low.total_norm - high).abs() / high;
            assert!(
                e <= norm_tol,
                "{precision:?}: {name} grad norm {} vs {high}",
                low.total_norm
            );
        }
        let vars = arch.student.vs.variables();
        for (key, after32) in &reference {
            let name = &key["after.student.".len()..];
            let lr = fx.json["param_groups"][name]["lr"].as_f64().unwrap();
            let ours = &vars[name];
            assert_eq!(ours.kind(), Kind::Float, "master weights stay fp32");
            let diff = (ours - after32).abs().max().double_value(&[]);
            assert!(
                diff <= 2.0 * lr + 1e-6,
                "{precision:?}: {name} moved {diff} from fp32"
            );
        }
    }
}
