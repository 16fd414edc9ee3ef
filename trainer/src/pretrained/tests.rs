//! Sources written by the venv's PyTorch (`torch.save`, the official file layouts) from the
//! tensors of a tiny source model, then loaded into a tiny target model.
use std::process::Command;

use tch::Device;

use super::*;
use crate::config;

/// A tiny pretraining config; `global` sets the position-embedding grid (patch 7).
fn tiny(global: u32, depth: u32) -> TrainingConfig {
    let yaml = format!(
        "training:\n  model: {{arch: custom, embedDim: 16, depth: {depth}, numHeads: 2, \
         patchSize: 7, numRegisterTokens: 1}}\n  \
         dino: {{headNPrototypes: 32, headHiddenDim: 16, headBottleneckDim: 8, headNlayers: 2}}\n  \
         crops: {{globalCropsSize: {global}, localCropsSize: 14, localCropsNumber: 2}}\n  \
         data: {{path: /unused}}\n"
    );
    dinoflow_api::load_training_config_str(&yaml)
        .unwrap()
        .training
}

fn arch(t: &TrainingConfig, seed: i64) -> MetaArch {
    tch::manual_seed(seed);
    MetaArch::new(config::meta_arch_config(t).unwrap(), Device::Cpu).unwrap()
}

fn vars(vs: &tch::nn::VarStore) -> StateDict {
    vs.variables()
        .into_iter()
        .map(|(k, v)| (k, v.detach().copy()))
        .collect()
}

fn python() -> PathBuf {
    std::env::var_os("DINOFLOW_VENV")
        .map(|v| PathBuf::from(v).join("bin/python3"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| "python3".into())
}

/// `torch.save`s `sd` to `out`: flat (`nest` empty), or as `{nest: sd}`; `model` nesting also
/// gets an iteration and optimizer entry, as fvcore's training checkpoints have.
fn torch_save(sd: &StateDict, nest: &str, out: &Path) {
    let npz = out.with_extension("npz");
    let named: Vec<(&str, &Tensor)> = sd.iter().map(|(k, v)| (k.as_str(), v)).collect();
    Tensor::write_npz(&named, &npz).unwrap();
    let script = r#"
import sys, numpy as np, torch
d = np.load(sys.argv[1])
sd = {k: torch.from_numpy(d[k].copy()) for k in d.files}
nest = sys.argv[3]
obj = sd if nest == "" else {nest: sd}
if nest == "model":
    obj["iteration"] = 41
    obj["optimizer"] = {"state": {}, "param_groups": [{"lr": 0.1}]}
torch.save(obj, sys.argv[2])
"#;
    let status = Command::new(python())
        .args(["-c", script])
        .arg(&npz)
        .arg(out)
        .arg(nest)
        .status()
        .expect("the venv's python runs (source scripts/env.sh)");
    assert!(status.success(), "torch.save failed");
    std::fs::remove_file(npz).unwrap();
}

fn strip(sd: &StateDict, prefix: &str) -> StateDict {
    select_prefix(sd, prefix)
}

fn add_prefix(sd: &StateDict, prefix: &str) -> StateDict {
    sd.iter()
        .map(|(k, v)| (format!("{prefix}{k}"), v.shallow_clone()))
        .collect()
}

fn assert_equal(a: &StateDict, b: &StateDict, skip: &[&str]) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, t) in a {
        if !skip.contains(&k.as_str()) {
            assert!(t.equal(&b[k]), "{k} differs");
        }
    }
}

#[test]
fn hub_names_resolve_under_torch_home_and_other_values_are_paths() {
    let home = Path::new("/th");
    assert_eq!(
        resolve("dinov2_vitl14_reg", home),
        PathBuf::from("/th/hub/checkpoints/dinov2_vitl14_reg_pretrain.pth")
    );
    assert_eq!(
        resolve("/w/backbone.pth", home),
        PathBuf::from("/w/backbone.pth")
    );
    let mut t = tiny(28, 2);
    assert_eq!(from_config(&t, home), None);
    t.model.weights = "/w/model_final.pth".into();
    assert_eq!(
        from_config(&t, home),
        Some(Init::Full("/w/model_final.pth".into()))
    );
}

#[test]
fn pretrained_weights_initialise_student_and_teacher_backbones_and_keep_random_heads() {
    let dir = tempfile::tempdir().unwrap();
    // The release layout: official backbone keys at the top level, in the hub cache.
    let source = arch(&tiny(28, 2), 1);
    let released = strip(&vars(&source.teacher.vs), "backbone.");
    let hub = dir.path().join("hub/checkpoints");
    std::fs::create_dir_all(&hub).unwrap();
    torch_save(&released, "", &hub.join("dinov2_vits14_pretrain.pth"));

    // The target trains at 56 px: a 8x8 grid where the file has 4x4.
    let mut t = tiny(56, 2);
    t.model.pretrained_weights = "dinov2_vits14".into();
    let target = arch(&t, 2);
    let heads_before: StateDict = vars(&target.student.vs)
        .into_iter()
        .filter(|(k, _)| !k.starts_with("backbone."))
        .collect();
    let init = from_config(&t, dir.path()).unwrap();
    let applied = init.apply(&target).unwrap();
    assert_eq!(applied.resized_pos_embed, [(4, 8)]);

    let student = vars(&target.student.vs);
    let backbone = strip(&student, "backbone.");
    assert_equal(&backbone, &released, &["pos_embed"]);
    // The resized embedding is what the source model itself uses at 56 px.
    let at_56 = source
        .teacher
        .backbone
        .interpolate_pos_encoding(56, 56)
        .unwrap();
    assert!(backbone["pos_embed"].allclose(&at_56, 1e-6, 1e-7, false));
    assert_eq!(backbone["pos_embed"].size(), [1, 65, 16]);
    // The teacher starts as a copy of the student; the heads keep their (shared) init.
    assert_equal(&vars(&target.teacher.vs), &student, &[]);
    for (k, v) in &heads_before {
        assert!(student[k].equal(v), "{k} changed");
    }
}

#[test]
fn a_backbone_of_another_architecture_is_refused_listing_every_difference() {
    let dir = tempfile::tempdir().unwrap();
    let deeper = arch(&tiny(28, 3), 1);
    let file = dir.path().join("deeper.pth");
    torch_save(&strip(&vars(&deeper.teacher.vs), "backbone."), "", &file);
    let target = arch(&tiny(28, 2), 2);
    let before = vars(&target.student.vs);
    let err = Init::Backbone(file).apply(&target).unwrap_err().to_string();
    for needle in [
        "training.model.pretrainedWeights",
        "deeper.pth",
        "unexpected keys",
        "backbone.blocks.2.attn.qkv.weight",
    ] {
        assert!(err.contains(needle), "'{needle}' not in: {err}");
    }
    assert_equal(&vars(&target.student.vs), &before, &[]);
    let missing = Init::Backbone(dir.path().join("nope.pth"))
        .apply(&target)
        .unwrap_err()
        .to_string();
    assert!(missing.contains("does not exist"), "{missing}");
}

#[test]
fn weights_initialise_backbones_and_heads_from_a_full_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let t = tiny(28, 2);
    let source = arch(&t, 1);
    // A teacher that differs from its student, as after training.
    tch::no_grad(|| {
        for (_, v) in source.teacher.vs.variables() {
            let mut v = v.shallow_clone();
            let _ = v.g_add_scalar_(0.5);
        }
    });
    let (s, te) = (vars(&source.student.vs), vars(&source.teacher.vs));

    // Official fvcore checkpoint: {"model": {student.*, teacher.*}, "iteration", "optimizer"}.
    let mut model = add_prefix(&s, "student.");
    model.extend(add_prefix(&te, "teacher."));
    let fvcore = dir.path().join("model_0000041.rank_0.pth");
    torch_save(&model, "model", &fvcore);
    let target = arch(&t, 2);
    Init::Full(fvcore).apply(&target).unwrap();
    assert_equal(&vars(&target.student.vs), &s, &[]);
    assert_equal(&vars(&target.teacher.vs), &te, &[]);

    // Official teacher_checkpoint.pth ({"teacher": ...}): both networks start from it.
    let teacher_only = dir.path().join("teacher_checkpoint.pth");
    torch_save(&te, "teacher", &teacher_only);
    let target = arch(&t, 3);
    Init::Full(teacher_only).apply(&target).unwrap();
    assert_equal(&vars(&target.student.vs), &te, &[]);
    assert_equal(&vars(&target.teacher.vs), &te, &[]);

    // A backbone-only file is not a training checkpoint: the error points to the other field.
    let backbone = dir.path().join("backbone.pth");
    torch_save(&strip(&te, "backbone."), "", &backbone);
    let err = Init::Full(backbone)
        .apply(&arch(&t, 4))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("training.model.weights") && err.contains("pretrainedWeights"),
        "{err}"
    );
}
