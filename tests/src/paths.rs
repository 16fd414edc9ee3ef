use std::path::{Path, PathBuf};

use crate::HarnessError;

/// The workspace root (the directory holding `scripts/`, `crds/`, `manifests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits inside the workspace")
        .to_path_buf()
}

/// Overrides [`cache_dir`] (scripts/env.sh reads it too).
pub const CACHE_ENV: &str = "DINOFLOW_CACHE";

/// Where scripts/setup.sh keeps the venv and the control-plane binaries.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(CACHE_ENV) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".cache/dinoflow")
}

/// A control-plane binary: the cached build first (what cluster.sh uses), then PATH.
pub fn find_binary(name: &str) -> Result<PathBuf, HarnessError> {
    let cache_bin = cache_dir().join("bin");
    let cached = cache_bin.join(name);
    if cached.is_file() {
        return Ok(cached);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| HarnessError::MissingBinary {
            name: name.to_owned(),
            cache_bin,
        })
}

/// The `*.yaml` files directly inside `dir`, sorted by name.
pub fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>, HarnessError> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(HarnessError::io(dir))? {
        let path = entry.map_err(HarnessError::io(dir))?.path();
        if path
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml")
        {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// `scripts/cluster.sh` of this checkout.
pub fn cluster_script() -> PathBuf {
    repo_root().join("scripts/cluster.sh")
}

/// Pids of running processes whose command line mentions `needle` (a cluster's directory):
/// how the tests prove that `down` left nothing behind.
pub fn processes_mentioning(needle: &Path) -> Vec<u32> {
    let needle = needle.to_string_lossy();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != std::process::id())
        .filter(|pid| {
            // Zombies keep their pid but have an empty command line: they run nothing.
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|raw| {
                    String::from_utf8_lossy(&raw)
                        .replace('\0', " ")
                        .contains(&*needle)
                })
                .unwrap_or(false)
        })
        .collect()
}
