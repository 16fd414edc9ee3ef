use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, ExitStatus};

use crate::{HarnessError, find_binary};

/// What one kubectl run printed; [`KubectlOutput::ok`] turns a failure into an error that
/// carries kubectl's stderr.
#[derive(Debug)]
pub struct KubectlOutput {
    pub args: Vec<String>,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl KubectlOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// stdout when kubectl succeeded, else an error naming the command and its stderr.
    pub fn ok(self) -> Result<String, HarnessError> {
        if self.success() {
            Ok(self.stdout)
        } else {
            Err(HarnessError::Kubectl {
                args: self.args.join(" "),
                status: self.status,
                stderr: self.stderr,
            })
        }
    }
}

pub(crate) fn run<I, S>(kubeconfig: &Path, args: I) -> Result<KubectlOutput, HarnessError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let kubectl = find_binary("kubectl")?;
    let args: Vec<String> = args
        .into_iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect();
    let output = Command::new(&kubectl)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(&args)
        .output()
        .map_err(HarnessError::io(&kubectl))?;
    Ok(KubectlOutput {
        args,
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}
