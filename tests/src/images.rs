//! The container images of `scripts/images.sh`, built from the binaries this test build made
//! (or taken from the script's cache when their inputs did not change).
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use crate::{HarnessError, build_workspace_binary, repo_root};

/// Image reference -> oci-archive, for the operator and the CPU trainer image; built once per
/// test binary.
pub fn container_images() -> Result<&'static BTreeMap<String, PathBuf>, HarnessError> {
    static IMAGES: OnceLock<BTreeMap<String, PathBuf>> = OnceLock::new();
    static BUILDING: Mutex<()> = Mutex::new(());
    // The tests of one binary ask at once: one runs the script, the others take its result.
    let _one_at_a_time = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(images) = IMAGES.get() {
        return Ok(images);
    }
    let operator = build_workspace_binary("dinoflow-operator", "dinoflow-operator")?;
    build_workspace_binary("dinoflow-trainer", "dinoflow-trainer")?;
    let bin_dir = operator.parent().expect("a binary has a directory");
    let script = repo_root().join("scripts/images.sh");
    let out = Command::new(&script)
        .arg("--bin-dir")
        .arg(bin_dir)
        .output()
        .map_err(HarnessError::io(&script))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(HarnessError::Build {
            command: format!("scripts/images.sh --bin-dir {}", bin_dir.display()),
            output: stderr.into_owned(),
        });
    }
    eprint!("{stderr}");
    let mut images = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let (reference, archive) = line.split_once(' ').ok_or_else(|| HarnessError::Build {
            command: "scripts/images.sh".into(),
            output: format!("expected '<reference> <archive>', got {line:?}"),
        })?;
        let archive = PathBuf::from(archive);
        if !archive.is_file() {
            return Err(HarnessError::Build {
                command: "scripts/images.sh".into(),
                output: format!("{line}: no such archive"),
            });
        }
        images.insert(reference.to_owned(), archive);
    }
    Ok(IMAGES.get_or_init(|| images))
}

/// The chart's appVersion, the tag of every image.
pub fn app_version() -> Result<String, HarnessError> {
    let path = repo_root().join("charts/dinoflow/Chart.yaml");
    let text = std::fs::read_to_string(&path).map_err(HarnessError::io(&path))?;
    let chart: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&text).map_err(|e| HarnessError::Manifest {
            path: path.clone(),
            message: e.to_string(),
        })?;
    chart["appVersion"]
        .as_str()
        .map(str::to_owned)
        .ok_or(HarnessError::Manifest {
            path,
            message: "no appVersion".into(),
        })
}
