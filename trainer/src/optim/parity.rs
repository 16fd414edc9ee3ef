//! Parity of schedules, parameter-group multipliers, clipping, AdamW and the teacher EMA
//! against the reference fixtures `schedules` and `train_step`.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;
use tch::{Kind, Tensor};

use super::{
    AdamW, AdamWConfig, LrScalingRule, ParamGroupConfig, ParamMultipliers, Schedules,
    SchedulesConfig, clip_grad_norm, ema_update, fuse_param_groups, scaled_lr,
    student_param_multipliers,
};
use crate::parity_fixture::{
    Fixture, OrderedObject, assert_f64_exact, assert_scalar_close, fixture_json_text, rel_err,
};

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number"))
}

fn count(v: &Value, key: &str) -> usize {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a count")) as usize
}

#[test]
fn schedules_match_the_reference_exactly_at_every_listed_iteration() {
    let fx = Fixture::load("schedules");
    let setup = fx.at("/schedule/setup");
    let rule: LrScalingRule = setup["scaling_rule"].as_str().unwrap().parse().unwrap();
    let lr = scaled_lr(
        rule,
        num(setup, "base_lr"),
        count(setup, "batch_size_per_gpu"),
        count(setup, "world_size"),
    );
    assert_f64_exact("scaled lr", lr, num(setup, "lr"));
    let cfg = SchedulesConfig {
        lr,
        min_lr: num(setup, "min_lr"),
        epochs: count(setup, "epochs"),
        warmup_epochs: count(setup, "warmup_epochs"),
        weight_decay: num(setup, "weight_decay"),
        weight_decay_end: num(setup, "weight_decay_end"),
        momentum_teacher: num(setup, "momentum_teacher"),
        final_momentum_teacher: num(setup, "final_momentum_teacher"),
        warmup_teacher_temp: num(setup, "warmup_teacher_temp"),
        teacher_temp: num(setup, "teacher_temp"),
        warmup_teacher_temp_epochs: count(setup, "warmup_teacher_temp_epochs"),
        freeze_last_layer_epochs: count(setup, "freeze_last_layer_epochs"),
        epoch_length: count(setup, "OFFICIAL_EPOCH_LENGTH"),
    };
    let schedules = Schedules::new(&cfg).unwrap();
    assert_eq!(schedules.lr.len(), count(setup, "total_iters"));
    let iterations = fx.at("/schedule/iterations").as_array().unwrap();
    assert!(!iterations.is_empty());
    for it in iterations {
        let it = it.as_u64().unwrap() as usize;
        let want = fx.at(&format!("/schedule/values/{it}"));
        let got = schedules.at(it);
        for (name, ours) in [
            ("lr", got.lr),
            ("wd", got.wd),
            ("momentum", got.momentum),
            ("teacher_temp", got.teacher_temp),
            ("last_layer_lr", got.last_layer_lr),
        ] {
            assert_f64_exact(&format!("{name} at iteration {it}"), ours, num(want, name));
        }
    }
}

#[derive(Deserialize)]
struct ParamGroupsFixture {
    param_groups: ParamGroupsSection,
}

#[derive(Deserialize)]
struct ParamGroupsSection {
    setup: Value,
    per_param: OrderedObject,
    per_param_chunked_names: OrderedObject,
    fused_groups: Vec<Value>,
}

fn multipliers_of(v: &Value) -> ParamMultipliers {
    ParamMultipliers {
        lr_mult: num(v, "lr_mult"),
        wd_mult: num(v, "wd_mult"),
        is_last_layer: v["is_last_layer"].as_bool().expect("is_last_layer flag"),
    }
}

fn assert_same_multipliers(key: &str, ours: &ParamMultipliers, want: &ParamMultipliers) {
    assert_f64_exact(&format!("lr_mult of {key}"), ours.lr_mult, want.lr_mult);
    assert_f64_exact(&format!("wd_mult of {key}"), ours.wd_mult, want.wd_mult);
    assert_eq!(
        ours.is_last_layer, want.is_last_layer,
        "is_last_layer of {key}"
    );
}

#[test]
fn param_group_multipliers_match_the_reference_for_flat_and_chunked_names() {
    let fx: ParamGroupsFixture = serde_json::from_str(&fixture_json_text("schedules")).unwrap();
    let pg = fx.param_groups;
    let cfg = ParamGroupConfig {
        layerwise_decay: num(&pg.setup, "layerwise_decay"),
        patch_embed_lr_mult: num(&pg.setup, "patch_embed_lr_mult"),
    };
    let depth = count(&pg.setup, "num_blocks");
    for table in [&pg.per_param, &pg.per_param_chunked_names] {
        assert!(!table.0.is_empty());
        let mut ours = Vec::new();
        for (key, want) in &table.0 {
            let got = student_param_multipliers(key, depth, &cfg).unwrap();
            assert_same_multipliers(key, &got, &multipliers_of(want));
            ours.push((key.clone(), got));
        }
        let groups = fuse_param_groups(&ours);
        assert_eq!(
            groups.len(),
            pg.fused_groups.len(),
            "number of fused groups"
        );
        for (i, (g, want)) in groups.iter().zip(&pg.fused_groups).enumerate() {
            let lr = num(want, "lr_multiplier");
            assert_f64_exact(&format!("group {i} lr"), g.multipliers.lr_mult, lr);
            let wd = num(want, "wd_multiplier");
            assert_f64_exact(&format!("group {i} wd"), g.multipliers.wd_mult, wd);
            assert_eq!(
                g.multipliers.is_last_layer,
                want["is_last_layer"].as_bool().unwrap(),
                "group {i} last layer"
            );
            assert_eq!(g.params.len(), count(want, "n_params"), "group {i} size");
        }
    }
}

/// The student keys of the train-step fixture, grouped by submodule.
fn student_keys(fx: &Fixture) -> BTreeMap<String, Vec<String>> {
    let mut by_sub: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for k in fx.keys_with_prefix("before.student.") {
        let key = k["before.student.".len()..].to_string();
        let sub = key.split('.').next().unwrap().to_string();
        by_sub.entry(sub).or_default().push(key);
    }
    assert!(!by_sub.is_empty(), "train_step: no student parameters");
    by_sub
}

/// Per-submodule clipping of the stored raw gradients; returns the clipped gradients.
fn clipped_grads(fx: &Fixture) -> BTreeMap<String, Tensor> {
    let max_norm = fx.f64_at("/config/clip_grad");
    let grad_tol = fx.f64_at("/tolerance/grad_rel");
    let mut out = BTreeMap::new();
    for (sub, keys) in student_keys(fx) {
        let mut grads: Vec<Tensor> = keys
            .iter()
            .map(|k| fx.t(&format!("grad.student.{k}")).copy())
            .collect();
        let stats = clip_grad_norm(&mut grads, max_norm);
        assert_scalar_close(
            &format!("{sub} grad norm"),
            stats.total_norm,
            fx.f64_at(&format!("/expect/grad_norm_before_clip/{sub}")),
            grad_tol,
        );
        assert_scalar_close(
            &format!("{sub} clip coef"),
            stats.clip_coef,
            fx.f64_at(&format!("/expect/clip_coef/{sub}")),
            grad_tol,
        );
        out.extend(keys.into_iter().zip(grads));
    }
    out
}

#[test]
fn per_submodule_clipping_matches_the_reference_norms_and_coefficients() {
    let fx = Fixture::load("train_step");
    let clipped = clipped_grads(&fx);
    let max_norm = fx.f64_at("/config/clip_grad");
    // After clipping no submodule exceeds the limit.
    for (sub, keys) in student_keys(&fx) {
        let grads: Vec<Tensor> = keys.iter().map(|k| clipped[k].shallow_clone()).collect();
        let norm = super::grad_total_norm(&grads).double_value(&[]);
        assert!(norm <= max_norm * (1.0 + 1e-6), "{sub}: {norm}");
    }
}

#[test]
fn adamw_step_and_teacher_ema_reproduce_the_reference_weights() {
    let fx = Fixture::load("train_step");
    let optim = fx.at("/config/cfg/optim");
    let group_cfg = ParamGroupConfig {
        layerwise_decay: num(optim, "layerwise_decay"),
        patch_embed_lr_mult: num(optim, "patch_embed_lr_mult"),
    };
    let depth = fx.i64_at("/config/arch/depth") as usize;
    let betas = fx.at("/config/adamw/betas").as_array().unwrap();
    let adamw_cfg = AdamWConfig {
        beta1: betas[0].as_f64().unwrap(),
        beta2: betas[1].as_f64().unwrap(),
        eps: fx.f64_at("/config/adamw/eps"),
    };
    let applied = fx.at("/applied");
    let table = fx.at("/param_groups");

    let clipped = clipped_grads(&fx);
    let keys: Vec<String> = student_keys(&fx).into_values().flatten().collect();
    let student: Vec<Tensor> = keys
        .iter()
        .map(|k| fx.t(&format!("before.student.{k}")).copy())
        .collect();
    let params = keys
        .iter()
        .zip(&student)
        .map(|(k, p)| {
            let m = student_param_multipliers(k, depth, &group_cfg).unwrap();
            assert_same_multipliers(k, &m, &multipliers_of(&table[k.as_str()]));
            (k.clone(), p.shallow_clone(), m)
        })
        .collect();
    let mut opt = AdamW::new(adamw_cfg, params).unwrap();
    opt.apply_schedule(
        num(applied, "lr"),
        num(applied, "weight_decay"),
        num(applied, "last_layer_lr"),
    );
    for k in &keys {
        let want = &table[k.as_str()];
        let (lr, wd) = opt.hyper(k).unwrap();
        assert_f64_exact(&format!("lr of {k}"), lr, num(want, "lr"));
        assert_f64_exact(
            &format!("weight decay of {k}"),
            wd,
            num(want, "weight_decay"),
        );
    }
    let grads: Vec<Option<Tensor>> = keys
        .iter()
        .map(|k| Some(clipped[k].shallow_clone()))
        .collect();
    opt.step_with_grads(&grads).unwrap();

    // Optimizer alone on the reference's clipped gradients: reproduces after.student to
    // float32 round-off.
    let mut worst = 0.0f64;
    for (k, p) in keys.iter().zip(&student) {
        let e = rel_err(p, fx.t(&format!("after.student.{k}")));
        worst = worst.max(e);
        assert!(e <= 1e-6, "after.student.{k}: relative error {e:.3e}");
    }
    eprintln!("AdamW worst relative error over student parameters: {worst:.3e}");

    let momentum = num(applied, "momentum");
    let teacher: Vec<Tensor> = keys
        .iter()
        .map(|k| fx.t(&format!("before.student.{k}")).copy())
        .collect();
    ema_update(&teacher, &student, momentum).unwrap();
    let weights_tol = fx.f64_at("/tolerance/weights_rel");
    let mut worst = 0.0f64;
    for (k, t) in keys.iter().zip(&teacher) {
        let reference = fx.t(&format!("after.teacher.{k}"));
        let e = rel_err(t, reference);
        worst = worst.max(e);
        assert!(
            e <= weights_tol,
            "after.teacher.{k}: relative error {e:.3e}"
        );
        // Elementwise, the EMA of identical inputs may differ only by float32 round-off.
        let abs = (t - reference).abs().max().double_value(&[]);
        let scale = reference.abs().max().double_value(&[]).max(1.0);
        assert!(
            abs <= 4.0 * f32::EPSILON as f64 * scale,
            "after.teacher.{k}: |diff| {abs:.3e}"
        );
    }
    eprintln!("EMA worst relative error over teacher parameters: {worst:.3e}");
    assert!(student.iter().all(|p| p.kind() == Kind::Float));
}
