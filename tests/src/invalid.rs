//! The table of invalid manifests in `tests/data/invalid/`.
//!
//! Format of one case, `<name>.yaml`: the first line is `# expect: <substring>`, the text the
//! API server's rejection must contain (it names the field). Then one YAML document, the
//! manifest with one mistake. A case may hold several documents: all but the last are applied
//! for real first (with their `status`, written through the status subresource), and the last
//! one, an update of them, must be rejected — this is how immutability rules are tested.
use std::path::{Path, PathBuf};

use crate::{HarnessError, yaml_files};

const HEADER: &str = "# expect:";

#[derive(Debug, Clone)]
pub struct InvalidCase {
    pub path: PathBuf,
    /// Substring the API server's error message must contain.
    pub expect: String,
    pub manifest: String,
}

impl InvalidCase {
    /// The file name without `.yaml`, used as the case's name in failure reports.
    pub fn name(&self) -> String {
        self.path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// Loads every case in `dir`; a file without a `# expect:` first line is an error naming it.
pub fn load_invalid_cases(dir: &Path) -> Result<Vec<InvalidCase>, HarnessError> {
    let mut cases = Vec::new();
    for path in yaml_files(dir)? {
        let manifest = std::fs::read_to_string(&path).map_err(HarnessError::io(&path))?;
        let expect = manifest
            .lines()
            .next()
            .and_then(|line| line.strip_prefix(HEADER))
            .map(str::trim)
            .filter(|expect| !expect.is_empty())
            .ok_or_else(|| HarnessError::Manifest {
                path: path.clone(),
                message: format!(
                    "first line must be `{HEADER} <text the API server's error contains>`"
                ),
            })?
            .to_owned();
        cases.push(InvalidCase {
            path,
            expect,
            manifest,
        });
    }
    Ok(cases)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_case_without_an_expect_header_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bad.yaml"), "apiVersion: v1\n").unwrap();
        let err = load_invalid_cases(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("bad.yaml") && err.contains("# expect:"),
            "{err}"
        );
    }

    #[test]
    fn the_expect_header_gives_the_substring_and_the_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("neg-lr.yaml"),
            "# expect:  spec.training.optim.baseLr \napiVersion: v1\n",
        )
        .unwrap();
        let cases = load_invalid_cases(dir.path()).unwrap();
        assert_eq!(cases.len(), 1);
        assert_eq!(cases[0].expect, "spec.training.optim.baseLr");
        assert_eq!(cases[0].name(), "neg-lr");
    }
}
