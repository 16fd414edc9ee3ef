//! Workspace binaries the tests run (the trainer the node agent maps `dinoflow-trainer` to),
//! built on demand.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::HarnessError;

/// Builds `bin` of `package` with cargo into the target directory this executable lives in
/// and returns its path. `cargo test -p dinoflow-e2e` does not build other packages'
/// binaries, and a binary found on disk may be older than its sources, so the tests always
/// ask cargo: a no-op of about a second when it is fresh.
pub fn build_workspace_binary(package: &str, bin: &str) -> Result<PathBuf, HarnessError> {
    let exe = std::env::current_exe().map_err(HarnessError::io("current executable"))?;
    let (target, profile) = target_dir_of(&exe).ok_or_else(|| HarnessError::Build {
        command: format!("cargo build -p {package} --bin {bin}"),
        output: format!(
            "{} is not inside a cargo target directory (<target>/<profile>/[deps/]exe)",
            exe.display()
        ),
    })?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    without_cargo_package_env(&mut cmd)
        .args(["build", "-p", package, "--bin", bin])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(crate::repo_root());
    if profile == "release" {
        cmd.arg("--release");
    }
    let shown = format!(
        "CARGO_TARGET_DIR={} cargo build -p {package} --bin {bin}",
        target.display()
    );
    eprintln!("[e2e] building {bin}: {shown}");
    let output = cmd
        .output()
        .map_err(HarnessError::io(PathBuf::from(&cargo)))?;
    if !output.status.success() {
        return Err(HarnessError::Build {
            command: shown,
            output: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    let path = target.join(&profile).join(bin);
    if path.is_file() {
        Ok(path)
    } else {
        Err(HarnessError::Build {
            command: shown,
            output: format!("cargo succeeded but {} does not exist", path.display()),
        })
    }
}

/// Removes from `cmd` the variables cargo sets for a test binary (its package's name, version,
/// manifest dir, ...) and not for a `cargo build` from a shell, for a child that runs cargo.
/// Build scripts track some of them (ring's: `rerun-if-env-changed=CARGO_PKG_NAME`,
/// `CARGO_MANIFEST_DIR`, `OUT_DIR`, ...) and cargo compares the values in its own environment:
/// passed on, they would make the inner build rerun ring's build script and rebuild everything
/// above it (rustls, kube, the operator, the trainer), and the next `cargo test` rebuild it all
/// back.
pub fn without_cargo_package_env(cmd: &mut Command) -> &mut Command {
    for (name, _) in std::env::vars_os() {
        if is_test_only_cargo_var(&name.to_string_lossy()) {
            cmd.env_remove(name);
        }
    }
    cmd
}

fn is_test_only_cargo_var(name: &str) -> bool {
    [
        "CARGO_PKG_",
        "CARGO_MANIFEST_",
        "CARGO_CRATE_",
        "CARGO_BIN_",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
    ]
    .iter()
    .any(|prefix| name.starts_with(prefix))
        || name == "OUT_DIR"
}

/// (target dir, profile dir name) of an executable at `<target>/<profile>/[deps/]<exe>`.
fn target_dir_of(exe: &Path) -> Option<(PathBuf, String)> {
    let mut dir = exe.parent()?;
    if dir.file_name()? == "deps" {
        dir = dir.parent()?;
    }
    let profile = dir.file_name()?.to_string_lossy().into_owned();
    Some((dir.parent()?.to_path_buf(), profile))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variables_cargo_sets_for_tests_are_not_passed_to_the_inner_build() {
        for name in [
            "CARGO_PKG_NAME",
            "CARGO_PKG_VERSION_MAJOR",
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_LINKS",
            "CARGO_CRATE_NAME",
            "CARGO_BIN_EXE_dinoflow-node-agent",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
            "OUT_DIR",
        ] {
            assert!(is_test_only_cargo_var(name), "{name}");
        }
        // What the build needs, or the user set for it, stays.
        for name in [
            "CARGO",
            "CARGO_HOME",
            "CARGO_BUILD_JOBS",
            "CARGO_INCREMENTAL",
            "PATH",
        ] {
            assert!(!is_test_only_cargo_var(name), "{name}");
        }
    }

    #[test]
    fn the_target_dir_is_found_from_a_test_binary_or_a_binary() {
        assert_eq!(
            target_dir_of(Path::new("/t/debug/deps/e2e_training-abc")),
            Some((PathBuf::from("/t"), "debug".into()))
        );
        assert_eq!(
            target_dir_of(Path::new("/t/release/dinoflow-node-agent")),
            Some((PathBuf::from("/t"), "release".into()))
        );
    }
}
