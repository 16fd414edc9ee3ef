//! Multi-iteration parity with the reference (`train_trajectory` fixture): consecutive
//! iterations with the real schedules (lr warm-up, frozen last layer, teacher-temperature
//! warm-up, cosine wd/momentum), AdamW moments, step counts and lazy centers carried across
//! iterations, crops at a resolution other than the model's (local pos-embed interpolated).
//! Everything — architecture, heads, schedules, step count, tolerances — comes from the JSON.

use serde_json::Value;
use tch::{Kind, Tensor};

use super::parity_tests::{arch_from_fixture, collated_batch};
use super::{MetaArch, TargetSource};
use crate::dist::Single;
use crate::optim::{Schedules, SchedulesConfig, scaled_lr};
use crate::parity_fixture::{Fixture, assert_f64_exact};
use crate::precision::Precision;

/// The five schedules of the fixture's merged config, built by our own `build_schedulers`.
fn schedules_from_fixture(fx: &Fixture) -> Schedules {
    let cfg = &fx.json["config"]["cfg"];
    let num = |v: &Value| v.as_f64().unwrap_or_else(|| panic!("{v} is not a number"));
    let count = |v: &Value| v.as_u64().unwrap_or_else(|| panic!("{v} is not a count")) as usize;
    let (optim, teacher) = (&cfg["optim"], &cfg["teacher"]);
    let rule = optim["scaling_rule"].as_str().unwrap().parse().unwrap();
    let lr = scaled_lr(
        rule,
        num(&optim["base_lr"]),
        count(&cfg["train"]["batch_size_per_gpu"]),
        count(&fx.json["config"]["world_size"]),
    );
    assert_f64_exact("scaled lr (cfg.optim.lr)", lr, num(&optim["lr"]));
    Schedules::new(&SchedulesConfig {
        lr,
        min_lr: num(&optim["min_lr"]),
        epochs: count(&optim["epochs"]),
        warmup_epochs: count(&optim["warmup_epochs"]),
        weight_decay: num(&optim["weight_decay"]),
        weight_decay_end: num(&optim["weight_decay_end"]),
        momentum_teacher: num(&teacher["momentum_teacher"]),
        final_momentum_teacher: num(&teacher["final_momentum_teacher"]),
        warmup_teacher_temp: num(&teacher["warmup_teacher_temp"]),
        teacher_temp: num(&teacher["teacher_temp"]),
        warmup_teacher_temp_epochs: count(&teacher["warmup_teacher_temp_epochs"]),
        freeze_last_layer_epochs: count(&optim["freeze_last_layer_epochs"]),
        epoch_length: count(&cfg["train"]["OFFICIAL_EPOCH_LENGTH"]),
    })
    .unwrap()
}

/// `||ours − ref||₂ / ||ref||₂` (the absolute norm when the reference is all zeros).
fn rel_l2(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.size(), reference.size(), "shape mismatch");
    let r = reference.to_kind(Kind::Double);
    let diff = (ours.to_kind(Kind::Double) - &r).norm().double_value(&[]);
    let scale = r.norm().double_value(&[]);
    if scale == 0.0 { diff } else { diff / scale }
}

/// Compares every stored `{stage}.{who}.*` tensor with our network's weights, each within the
/// fixture's `weights_rel_l2` bound of `after.{who}.<name>`. Returns the failures.
fn weight_failures(fx: &Fixture, arch: &MetaArch, stage: &str, who: &str) -> Vec<String> {
    let vars = match who {
        "student" => arch.student.vs.variables(),
        "teacher" => arch.teacher.vs.variables(),
        other => panic!("unknown network {other}"),
    };
    let bounds = &fx.json["tolerance"]["weights_rel_l2"];
    let keys = fx.keys_with_prefix(&format!("{stage}.{who}."));
    assert!(
        !keys.is_empty(),
        "train_trajectory: no {stage}.{who}.* tensors"
    );
    assert_eq!(
        keys.len(),
        vars.len(),
        "{stage}.{who}: every parameter is stored"
    );
    let mut failures = Vec::new();
    let mut worst = (0.0f64, String::new());
    for key in keys {
        let name = &key[stage.len() + who.len() + 2..];
        let bound = bounds[format!("after.{who}.{name}")]
            .as_f64()
            .unwrap_or_else(|| panic!("train_trajectory: no weights_rel_l2 bound for {key}"));
        let ours = vars
            .get(name)
            .unwrap_or_else(|| panic!("{key}: no such parameter in our network"));
        let e = rel_l2(ours, fx.t(&key));
        if e / bound > worst.0 {
            worst = (e / bound, format!("{key} {e:.3e} (bound {bound:.1e})"));
        }
        if e > bound {
            failures.push(format!("{key}: relative L2 error {e:.3e} > {bound:.3e}"));
        }
    }
    eprintln!("{stage}.{who}: closest to its bound: {}", worst.1);
    failures
}

/// The iteration after which `mid.student.*` was stored, read from its tensor-table entry
/// ("... after iteration N ...").
fn mid_iteration(fx: &Fixture) -> usize {
    let key = fx
        .keys_with_prefix("mid.student.")
        .into_iter()
        .next()
        .expect("train_trajectory: no mid.student.* tensors");
    let desc = fx.json["tensors"][&key]["desc"]
        .as_str()
        .unwrap_or_default();
    desc.split("after iteration ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{key}: no 'after iteration N' in its description {desc:?}"))
}

#[test]
fn parity_train_trajectory_matches_the_reference_losses_and_weights_at_every_iteration() {
    let fx = Fixture::load("train_trajectory");
    assert_eq!(
        fx.i64_at("/config/world_size"),
        1,
        "train_trajectory: only single-process references can be replayed"
    );
    let loss_tol = fx.f64_at("/tolerance/loss_rel");
    let steps = fx.at("/expect/steps").as_array().unwrap();
    assert_eq!(steps.len() as i64, fx.i64_at("/config/steps"));
    let schedules = schedules_from_fixture(&fx);
    let mut arch = arch_from_fixture(&fx, Precision::Fp32);
    let mid_after = mid_iteration(&fx);
    let mut failures = Vec::new();

    for (i, step) in steps.iter().enumerate() {
        let it = step["iteration"].as_u64().unwrap() as usize;
        assert_eq!(it, i, "iterations are consecutive from 0");
        // Our schedules reproduce the reference's values exactly at this iteration.
        let values = schedules.at(it);
        let want = &step["schedules"];
        for (name, ours) in [
            ("lr", values.lr),
            ("wd", values.wd),
            ("momentum", values.momentum),
            ("teacher_temp", values.teacher_temp),
            ("last_layer_lr", values.last_layer_lr),
        ] {
            assert_f64_exact(
                &format!("{name} at iteration {it}"),
                ours,
                want[name].as_f64().unwrap(),
            );
        }

        let batch = collated_batch(&fx, &format!("step{it}.collated."));
        let out = arch
            .train_step(&batch, &values, &Single, TargetSource::Ema)
            .unwrap()
            .read(&Single);
        assert!(out.applied);

        let l = &out.losses;
        for (name, ours) in [
            ("dino_local_crops_loss", l.dino_local_crops_loss),
            ("dino_global_crops_loss", l.dino_global_crops_loss),
            ("koleo_loss", l.koleo_loss),
            ("ibot_loss", l.ibot_loss),
        ] {
            let reference = step["loss_dict"][name].as_f64().unwrap();
            let ours = ours.unwrap_or_else(|| panic!("iteration {it}: {name} missing"));
            let e = (ours - reference).abs() / reference.abs();
            eprintln!("iteration {it} {name}: ours {ours:.9} ref {reference:.9} rel {e:.2e}");
            if e > loss_tol {
                failures.push(format!(
                    "iteration {it} {name}: ours {ours} vs reference {reference} (relative {e:.3e} > {loss_tol:.1e})"
                ));
            }
        }
        // Gradient norms: the fixture states no bound of their own; they are scalar
        // reductions of the same float32 graph as the losses, so the loss bound applies.
        let norms = step["grad_norm_before_clip"].as_object().unwrap();
        assert_eq!(
            out.clip.len(),
            norms.len(),
            "iteration {it}: clipped submodules"
        );
        for (name, stats) in &out.clip {
            let reference = norms[name.as_str()].as_f64().unwrap();
            let e = (stats.total_norm - reference).abs() / reference;
            eprintln!(
                "iteration {it} {name} grad norm: ours {:.7} ref {reference:.7} rel {e:.2e}",
                stats.total_norm
            );
            if e > loss_tol {
                failures.push(format!(
                    "iteration {it} {name} gradient norm: ours {} vs reference {reference} (relative {e:.3e} > {loss_tol:.1e})",
                    stats.total_norm
                ));
            }
        }

        if it == mid_after {
            failures.extend(weight_failures(&fx, &arch, "mid", "student"));
        }
    }

    failures.extend(weight_failures(&fx, &arch, "after", "student"));
    failures.extend(weight_failures(&fx, &arch, "after", "teacher"));

    // Centers after the last iteration's pending update is folded in: teacher-head outputs
    // averaged over eight iterations, held to the loss bound (no bound of their own either).
    arch.dino_loss.center_mut().apply_pending();
    let mut centers = vec![("center.dino.after_apply", arch.dino_loss.center().center())];
    if let Some(ibot) = arch.ibot_loss.as_mut() {
        ibot.center_mut().apply_pending();
    }
    if let Some(ibot) = arch.ibot_loss.as_ref() {
        centers.push(("center.ibot.after_apply", ibot.center().center()));
    }
    assert_eq!(centers.len(), fx.keys_with_prefix("center.").len());
    for (key, ours) in centers {
        let e = rel_l2(ours, fx.t(key));
        eprintln!("{key}: relative L2 error {e:.3e}");
        if e > loss_tol {
            failures.push(format!("{key}: relative L2 error {e:.3e} > {loss_tol:.1e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} disagreements with the reference trajectory:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
