//! A real node (kubelet, containerd, runc, CNI bridge, CoreDNS) beside a [`TestCluster`],
//! brought up and down by `scripts/node.sh`. Unlike the node agent it runs pods as containers
//! from images, each with its own network namespace and IP, and serves cluster DNS.
use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{HarnessError, TestCluster, repo_root};

/// The Node's name (`scripts/node.sh` registers it as `localhost`).
pub const REAL_NODE_NAME: &str = "localhost";

/// A started node; `down` runs when it is dropped (and `scripts/cluster.sh down` runs it too,
/// so the cluster's watchdog cleans up after a crashed test).
#[derive(Debug)]
pub struct RealNode {
    cluster_dir: PathBuf,
    env: HashMap<String, String>,
    running: bool,
}

impl RealNode {
    /// Starts the node beside `cluster` (one this process started: the node needs its CA and
    /// directory) and waits until it is Ready and CoreDNS serves. `labels` are `KEY=VALUE`.
    pub fn start(cluster: &TestCluster, labels: &[&str]) -> Result<Self, HarnessError> {
        let cluster_dir = cluster
            .dir()
            .ok_or_else(|| HarnessError::NodeScript {
                command: "up".into(),
                output: "a real node needs a cluster started by this test (TestCluster::start_fresh), not DINOFLOW_TEST_KUBECONFIG".into(),
            })?
            .to_path_buf();
        let mut args = vec![OsStr::new("--dir"), cluster_dir.as_os_str()];
        for label in labels {
            args.extend([OsStr::new("--label"), OsStr::new(label)]);
        }
        let progress = run_node_script("up", args)?;
        eprint!("{progress}");
        let env_file = cluster_dir.join("node/node.env");
        let text = std::fs::read_to_string(&env_file).map_err(HarnessError::io(&env_file))?;
        let env = text
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Ok(Self {
            cluster_dir,
            env,
            running: true,
        })
    }

    /// A value of `node.env` (BRIDGE, SUBNET, DNS_IP, CGROUP_ROOT, KUBELET_PORT, ...).
    pub fn env(&self, key: &str) -> Option<&str> {
        self.env.get(key).map(String::as_str)
    }

    /// The directory holding the node's state, configs and logs.
    pub fn dir(&self) -> PathBuf {
        self.cluster_dir.join("node")
    }

    /// Imports an oci-archive into the node's containerd (pods then use it with
    /// `imagePullPolicy: Never`).
    pub fn import(&self, archive: &Path) -> Result<(), HarnessError> {
        run_node_script(
            "import",
            [
                OsStr::new("--dir"),
                self.cluster_dir.as_os_str(),
                archive.as_os_str(),
            ],
        )
        .map(drop)
    }

    /// Gives `source`, an image in the node, the second name `target` (a new tag of the same
    /// image, as a registry would serve a re-tagged push).
    pub fn tag(&self, source: &str, target: &str) -> Result<(), HarnessError> {
        run_node_script(
            "tag",
            [
                OsStr::new("--dir"),
                self.cluster_dir.as_os_str(),
                OsStr::new(source),
                OsStr::new(target),
            ],
        )
        .map(drop)
    }

    /// SIGKILLs every process of the container `container_id` (`containerd://ID`, as a pod's
    /// status names it) through the node's containerd: no process gets to clean up, as when
    /// the OOM killer or a crash ends it. The kubelet then reports exit code 137.
    pub fn kill_container(&self, container_id: &str) -> Result<(), HarnessError> {
        let id =
            container_id
                .strip_prefix("containerd://")
                .ok_or_else(|| HarnessError::NodeScript {
                    command: "kill".into(),
                    output: format!("{container_id:?} is not a containerd container id"),
                })?;
        let socket = self
            .env("CONTAINERD_SOCKET")
            .ok_or_else(|| HarnessError::NodeScript {
                command: "kill".into(),
                output: "node.env has no CONTAINERD_SOCKET: restart the node (scripts/node.sh up)"
                    .into(),
            })?;
        let ctr = crate::find_binary("ctr")?;
        let output = Command::new(&ctr)
            .args(["-a", socket, "-n", "k8s.io", "tasks", "kill", "--all"])
            .args(["--signal", "SIGKILL", id])
            .output()
            .map_err(HarnessError::io(&ctr))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(HarnessError::NodeScript {
                command: format!("ctr tasks kill {id} ({})", output.status),
                output: String::from_utf8_lossy(&output.stderr).into_owned(),
            })
        }
    }

    /// The busybox test image (built once with buildah, cached): its archive and image name.
    pub fn busybox_image() -> Result<(PathBuf, String), HarnessError> {
        let out = run_node_script("busybox-image", [])?;
        let line = out
            .lines()
            .find(|l| !l.starts_with("[node]") && l.contains(".oci.tar "))
            .ok_or_else(|| HarnessError::NodeScript {
                command: "busybox-image".into(),
                output: out.clone(),
            })?;
        let (archive, name) = line.split_once(' ').expect("checked above");
        Ok((PathBuf::from(archive), name.to_owned()))
    }

    /// Stops the node and removes what it left on the host, reporting failure.
    pub fn stop(mut self) -> Result<(), HarnessError> {
        self.running = false;
        run_node_script("down", [OsStr::new("--dir"), self.cluster_dir.as_os_str()])
            .map(|out| eprint!("{out}"))
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        if self.running
            && let Err(err) =
                run_node_script("down", [OsStr::new("--dir"), self.cluster_dir.as_os_str()])
        {
            eprintln!("stopping the real node failed: {err}");
        }
    }
}

/// `scripts/node.sh` of this checkout.
pub fn node_script() -> PathBuf {
    repo_root().join("scripts/node.sh")
}

fn run_node_script<'a>(
    command: &str,
    args: impl IntoIterator<Item = &'a OsStr>,
) -> Result<String, HarnessError> {
    let script = node_script();
    let output = Command::new("bash")
        .arg(&script)
        .arg(command)
        .args(args)
        .output()
        .map_err(HarnessError::io(&script))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(text)
    } else {
        Err(HarnessError::NodeScript {
            command: format!("{command} ({})", output.status),
            output: text,
        })
    }
}
