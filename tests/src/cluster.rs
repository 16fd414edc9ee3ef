use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::{HarnessError, KubectlOutput, cluster_script, kubectl};

/// Names a kubeconfig of a cluster that is already up; the tests then use it instead of
/// starting their own (and leave it running).
pub const KUBECONFIG_ENV: &str = "DINOFLOW_TEST_KUBECONFIG";

/// The label a test's Node carries (value: the test's namespace) and its pods select, so that
/// concurrent tests, each with its own node agent, never run each other's pods.
pub const NODE_LABEL: &str = "dinoflow.dev/e2e-node";

/// A local control plane for a test: started by `scripts/cluster.sh up` in a temporary
/// directory, stopped with `down` when dropped. The script gets this process as
/// `--owner-pid`, so a watchdog also stops it if the test process dies without dropping it.
#[derive(Debug)]
pub struct TestCluster {
    kubeconfig: PathBuf,
    /// Set when this value started the cluster and so must stop it.
    dir: Option<PathBuf>,
}

impl TestCluster {
    /// The cluster named by `DINOFLOW_TEST_KUBECONFIG`, else a fresh one.
    pub fn start() -> Result<Self, HarnessError> {
        match std::env::var_os(KUBECONFIG_ENV) {
            Some(kubeconfig) => Ok(Self {
                kubeconfig: kubeconfig.into(),
                dir: None,
            }),
            None => Self::start_fresh(),
        }
    }

    /// Always a fresh cluster in a new temporary directory (for tests of the cluster itself).
    pub fn start_fresh() -> Result<Self, HarnessError> {
        // A second try: ports are picked free but another process (a parallel test's cluster)
        // can still take one before our component binds it.
        match Self::start_in_new_dir() {
            Ok(cluster) => Ok(cluster),
            Err(first) => {
                eprintln!("control plane did not come up, retrying once: {first}");
                Self::start_in_new_dir()
            }
        }
    }

    fn start_in_new_dir() -> Result<Self, HarnessError> {
        let tmp = std::env::temp_dir();
        let dir = tempfile::Builder::new()
            .prefix("dinoflow-cluster-")
            .tempdir_in(&tmp)
            .map_err(HarnessError::io(&tmp))?
            // `down` removes the directory itself (it is marked --ephemeral), also when the
            // watchdog runs it after this process is gone.
            .keep();
        let pid = std::process::id().to_string();
        let progress = run_script(
            "up",
            &dir,
            ["--owner-pid", pid.as_str(), "--ephemeral"].map(OsStr::new),
        )?;
        // Shown with the test's output when it fails: where the start-up time went.
        eprint!("{progress}");
        Ok(Self {
            kubeconfig: dir.join("kubeconfig"),
            dir: Some(dir),
        })
    }

    /// One cluster shared by all tests of this test binary, started on first use. It is
    /// stopped by the watchdog when the test binary exits (statics are never dropped).
    /// Panics with the start-up error (e.g. missing binaries), so a test cannot pass without it.
    pub fn shared() -> &'static TestCluster {
        static SHARED: OnceLock<TestCluster> = OnceLock::new();
        SHARED.get_or_init(|| match Self::start() {
            Ok(cluster) => cluster,
            Err(err) => panic!("could not start the test control plane: {err}"),
        })
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The cluster's directory (logs, pid files) when this value started it.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Runs kubectl against this cluster; check [`KubectlOutput::success`] or call `ok()`.
    pub fn kubectl<I, S>(&self, args: I) -> Result<KubectlOutput, HarnessError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        kubectl::run(&self.kubeconfig, args)
    }

    /// A kube client authenticated as the cluster admin.
    pub async fn client(&self) -> Result<Client, HarnessError> {
        Ok(Client::try_from(self.config().await?)?)
    }

    /// The cluster admin's client configuration (e.g. to point a client at a proxy).
    pub async fn config(&self) -> Result<kube::Config, HarnessError> {
        let to_err = |source| HarnessError::Kubeconfig {
            kubeconfig: self.kubeconfig.clone(),
            source,
        };
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig).map_err(to_err)?;
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(to_err)
    }

    /// Creates a namespace named `<prefix>-<pid>-<n>` (unique even when several test
    /// binaries share one cluster) and returns its name.
    pub fn create_namespace(&self, prefix: &str) -> Result<String, HarnessError> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        self.kubectl(["create", "namespace", name.as_str()])?.ok()?;
        Ok(name)
    }

    /// Applies CRD files (server-side) and waits until each is Established.
    pub fn install_crds(&self, files: &[PathBuf]) -> Result<(), HarnessError> {
        for file in files {
            let file = file.as_os_str();
            self.kubectl([
                OsStr::new("apply"),
                OsStr::new("--server-side"),
                OsStr::new("--force-conflicts"),
                OsStr::new("-f"),
                file,
            ])?
            .ok()?;
            // Right after the apply the CRD can still have no status at all, which `kubectl
            // wait` reports as an error instead of waiting: try again a few times.
            let mut attempts = 0;
            loop {
                let out = self.kubectl([
                    OsStr::new("wait"),
                    OsStr::new("--for=condition=Established"),
                    OsStr::new("--timeout=60s"),
                    OsStr::new("-f"),
                    file,
                ])?;
                attempts += 1;
                if out.success() || attempts == 10 {
                    out.ok()?;
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
        }
        Ok(())
    }

    /// Stops the cluster now, reporting failure (drop does the same but can only log).
    pub fn stop(mut self) -> Result<(), HarnessError> {
        match self.dir.take() {
            Some(dir) => run_script("down", &dir, []).map(drop),
            None => Ok(()),
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take()
            && let Err(err) = run_script("down", &dir, [])
        {
            eprintln!("stopping the test control plane failed: {err}");
        }
    }
}

fn run_script<'a>(
    command: &str,
    dir: &Path,
    extra: impl IntoIterator<Item = &'a OsStr>,
) -> Result<String, HarnessError> {
    let script = cluster_script();
    let output = Command::new("bash")
        .arg(&script)
        .arg(command)
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .output()
        .map_err(HarnessError::io(&script))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.success() {
        Ok(format!("{stdout}{stderr}"))
    } else {
        Err(HarnessError::ClusterScript {
            command: command.to_owned(),
            dir: dir.to_path_buf(),
            status: output.status,
            output: format!("{stdout}{stderr}"),
        })
    }
}
