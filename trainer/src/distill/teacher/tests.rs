use std::path::Path;

use dinoflow_api::distill::{CheckpointFormat, TeacherCheckpoint, TeacherSource};
use tch::Device;

use super::*;
use crate::distill::run::check_heads;
use crate::distill::test_support::{tiny_training, write_pretrain_checkpoint};

fn source(path: &Path, format: CheckpointFormat, model: Option<ModelConfig>) -> TeacherSource {
    TeacherSource {
        pretrain_job: None,
        checkpoint: Some(TeacherCheckpoint {
            path: path.display().to_string(),
            format,
        }),
        model,
    }
}

fn testdata(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/src/weights/testdata")).join(name)
}

#[test]
fn a_dinoflow_checkpoint_gives_its_ema_teacher_with_heads_frozen() {
    let dir = tempfile::tempdir().unwrap();
    let training = tiny_training(32, 24);
    let (ckpt, arch) = write_pretrain_checkpoint(dir.path(), &training);
    let src = source(&ckpt, CheckpointFormat::Dinoflow, None);
    let t = load_teacher(&src, Device::Cpu, dir.path()).unwrap();
    let expected = arch.teacher.vs.variables();
    let got = t.net.vs.variables();
    assert_eq!(got.len(), expected.len());
    for (k, v) in &got {
        assert!(v.equal(&expected[k]), "{k}");
        assert!(!v.requires_grad(), "{k} must be frozen");
    }
    assert_eq!(t.net.dino_head.config.out_dim, 24);
    assert_eq!(t.patch_size, 7);
    let manifest = crate::checkpoint::Manifest::read(&ckpt).unwrap();
    assert_eq!(
        t.identity.sha256,
        manifest.files["teacher.safetensors"].sha256
    );
    assert_eq!(t.identity.format, "dinoflow");
}

#[test]
fn a_missing_or_torn_checkpoint_is_refused_naming_the_path_field() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("ckpt-000000001");
    let err = load_teacher(
        &source(&missing, CheckpointFormat::Dinoflow, None),
        Device::Cpu,
        dir.path(),
    )
    .unwrap_err();
    assert_eq!(err.field, "spec.teacher.checkpoint.path");
    assert!(err.message.contains("ckpt-000000001"), "{err}");
    // A checkpoint whose teacher file was altered after the manifest was written.
    let (ckpt, _) = write_pretrain_checkpoint(&dir.path().join("c"), &tiny_training(32, 24));
    std::fs::write(ckpt.join("teacher.safetensors"), b"torn").unwrap();
    let err = load_teacher(
        &source(&ckpt, CheckpointFormat::Dinoflow, None),
        Device::Cpu,
        dir.path(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("sha256") || err.contains("size"), "{err}");
}

#[test]
fn a_student_with_another_prototype_count_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, _) = write_pretrain_checkpoint(dir.path(), &tiny_training(32, 24));
    let t = load_teacher(
        &source(&ckpt, CheckpointFormat::Dinoflow, None),
        Device::Cpu,
        dir.path(),
    )
    .unwrap();
    let student = config::meta_arch_config(&tiny_training(16, 20)).unwrap();
    let err = check_heads(&t, &student).unwrap_err();
    assert_eq!(err.field, "spec.training.dino.headNPrototypes");
    assert!(
        err.message.contains("20") && err.message.contains("set it to 24"),
        "{err}"
    );
    let mut other_ibot = tiny_training(16, 24);
    other_ibot.ibot.separate_head = true;
    other_ibot.ibot.head_n_prototypes = 12;
    let err = check_heads(&t, &config::meta_arch_config(&other_ibot).unwrap()).unwrap_err();
    assert_eq!(err.field, "spec.training.ibot.headNPrototypes");
    // Same counts, smaller student: accepted.
    check_heads(
        &t,
        &config::meta_arch_config(&tiny_training(16, 24)).unwrap(),
    )
    .unwrap();
}

#[test]
fn a_backbone_only_release_file_is_refused_with_the_reason() {
    let src = source(
        &testdata("tiny_hub_backbone.pth"),
        CheckpointFormat::OfficialPth,
        Some(ModelConfig::default()),
    );
    let err = load_teacher(&src, Device::Cpu, Path::new("/nonexistent")).unwrap_err();
    assert_eq!(err.field, "spec.teacher.checkpoint.path");
    assert!(
        err.message.contains("backbone-only") && err.message.contains("teacher_checkpoint.pth"),
        "{err}"
    );
}

#[test]
fn an_official_training_checkpoint_with_heads_loads_with_the_given_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let training = tiny_training(32, 24);
    let (_, arch) = write_pretrain_checkpoint(&dir.path().join("c"), &training);
    // The official layout: `teacher.` prefix, chunked blocks (block_chunks 2).
    let sd: Vec<(String, Tensor)> = arch
        .teacher
        .vs
        .variables()
        .into_iter()
        .map(|(k, v)| {
            let k = k.replace("backbone.blocks.1.", "backbone.blocks.1.1.");
            let k = k.replace("backbone.blocks.0.", "backbone.blocks.0.0.");
            (format!("teacher.{k}"), v.detach().copy())
        })
        .collect();
    let file = dir.path().join("teacher_checkpoint.safetensors");
    let named: Vec<(&str, &Tensor)> = sd.iter().map(|(k, v)| (k.as_str(), v)).collect();
    Tensor::write_safetensors(&named, &file).unwrap();
    let src = source(
        &file,
        CheckpointFormat::OfficialPth,
        Some(training.model.clone()),
    );
    let t = load_teacher(&src, Device::Cpu, dir.path()).unwrap();
    let expected = arch.teacher.vs.variables();
    for (k, v) in t.net.vs.variables() {
        assert!(v.equal(&expected[&k]), "{k}");
    }
    assert_eq!(t.identity.format, "officialPth");
    // The wrong architecture is a key/shape mismatch that names the model field.
    let wrong = ModelConfig {
        depth: Some(3),
        ..training.model
    };
    let err = load_teacher(
        &source(&file, CheckpointFormat::OfficialPth, Some(wrong)),
        Device::Cpu,
        dir.path(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("blocks.2") && err.contains("spec.teacher.model"),
        "{err}"
    );
}

#[test]
fn hub_names_resolve_in_the_torch_hub_cache_and_unknown_ones_are_refused() {
    let home = tempfile::tempdir().unwrap();
    assert_eq!(
        hub_file(home.path(), "dinov2_vitg14_reg"),
        home.path()
            .join("hub/checkpoints/dinov2_vitg14_reg_pretrain.pth")
    );
    let g = hub_model("dinov2_vitg14_reg").unwrap();
    assert_eq!(
        (g.arch, g.ffn_layer, g.num_register_tokens),
        (Arch::VitGiant2, FfnLayer::Swiglufused, 4)
    );
    let s = hub_model("dinov2_vits14").unwrap();
    assert_eq!(
        (s.arch, s.num_register_tokens, s.patch_size),
        (Arch::VitSmall, 0, 14)
    );
    assert!(
        hub_model("dinov3_vit7b16")
            .unwrap_err()
            .message
            .contains("dinov2_vitl14")
    );
    let src = TeacherSource {
        pretrain_job: None,
        checkpoint: Some(TeacherCheckpoint {
            path: "dinov2_vits14".into(),
            format: CheckpointFormat::OfficialHub,
        }),
        model: None,
    };
    let err = load_teacher(&src, Device::Cpu, home.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("dinov2_vits14_pretrain.pth") && err.contains("TORCH_HOME"),
        "{err}"
    );
    // A hub file is backbone-only: refused with the reason, not silently given random heads.
    let dst = hub_file(home.path(), "dinov2_vits14");
    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
    std::fs::copy(testdata("tiny_hub_backbone.pth"), &dst).unwrap();
    let err = load_teacher(&src, Device::Cpu, home.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("backbone-only"), "{err}");
}

#[test]
fn an_unresolved_pretrain_job_is_refused_with_the_local_fix() {
    let src = TeacherSource {
        pretrain_job: Some("big".into()),
        checkpoint: None,
        model: None,
    };
    let err = load_teacher(&src, Device::Cpu, Path::new("/x")).unwrap_err();
    assert_eq!(err.field, "spec.teacher.pretrainJob");
    assert!(
        err.message.contains("spec.teacher.checkpoint.path"),
        "{err}"
    );
}
