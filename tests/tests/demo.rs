//! README's main command, `scripts/demo.sh`, run as a user runs it, after a set-up that looks
//! slow to the script: a cold machine spends half an hour in set-up and build, and a timeout
//! that counted from the script's start instead of its own step killed every cold demo. The
//! demo takes the production path: images, the local cluster with its real node, `helm
//! install`, `kubectl apply`, and the trainer runs as a container on the node.
use std::path::Path;
use std::process::Command;

use dinoflow_e2e::{repo_root, without_cargo_package_env};

/// Stops the demo's cluster whatever the test's outcome (the demo leaves it up on purpose).
struct ClusterDown<'a>(&'a Path);

impl Drop for ClusterDown<'_> {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo_root().join("scripts/cluster.sh"))
            .args(["down", "--dir"])
            .arg(self.0)
            .status();
    }
}

#[test]
fn the_demo_succeeds_after_a_set_up_longer_than_its_timeouts() {
    let scratch = tempfile::tempdir().expect("scratch dir");
    let cluster_dir = scratch.path().join("cluster");
    let _down = ClusterDown(&cluster_dir);
    // Set-up and build "took" far longer than any wait's timeout; each wait must still get its
    // own full 300 s.
    let mut demo = Command::new("bash");
    // demo.sh runs cargo build: without the env of this test's package, or build scripts
    // rerun (binaries.rs).
    let out = without_cargo_package_env(&mut demo)
        .arg(repo_root().join("scripts/demo.sh"))
        .env("DINOFLOW_DEMO_SIMULATE_SLOW_SETUP", "100000")
        .env("DINOFLOW_DEMO_TIMEOUT", "300")
        .env("DINOFLOW_CLUSTER_DIR", &cluster_dir)
        .env("DINOFLOW_DEMO_DIR", scratch.path().join("demo"))
        .output()
        .expect("run scripts/demo.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "scripts/demo.sh failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("Succeeded") && stdout.contains("[demo] checkpoint (verified"),
        "the demo did not report a Succeeded job and its checkpoint:\n{stdout}"
    );
    assert!(
        stdout.contains("[demo] helm install") && stdout.contains("[demo] operator pod ready"),
        "the operator was not installed with helm as a pod:\n{stdout}"
    );
    let trainer = stdout
        .lines()
        .find(|l| l.starts_with("[demo] trainer pod "))
        .unwrap_or_else(|| panic!("no trainer pod line:\n{stdout}"));
    assert!(
        trainer.contains("on node localhost") && trainer.contains("containerd://"),
        "the trainer did not run as a container on the real node: {trainer}"
    );
    // The checkpoint the status names is on the host, in the output PersistentVolume.
    let checkpoint = stdout
        .lines()
        .find_map(|l| l.split_once(", on this host ").map(|(_, p)| p.trim()))
        .unwrap_or_else(|| panic!("no checkpoint path:\n{stdout}"));
    let on_host = repo_root().join(checkpoint);
    let on_host = if Path::new(checkpoint).is_absolute() {
        Path::new(checkpoint).to_path_buf()
    } else {
        on_host
    };
    assert!(on_host.exists(), "{} is not there", on_host.display());
}
