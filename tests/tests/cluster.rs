//! The local control plane itself: scripts/cluster.sh up/down/status, side by side, cleanup.
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dinoflow_e2e::{CACHE_ENV, TestCluster, cluster_script, processes_mentioning, wait_for};

/// Clusters of these tests start one after the other: the start-up time is asserted, and on
/// two cores three clusters starting at once would measure the machine, not the script.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn script(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new("bash")
        .arg(cluster_script())
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .expect("bash runs scripts/cluster.sh")
}

#[test]
fn a_cluster_is_ready_within_a_minute_and_down_leaves_no_process() {
    let _serial = serial();
    let started = Instant::now();
    let cluster = TestCluster::start_fresh().expect("cluster up");
    let took = started.elapsed();
    eprintln!("cluster up in {took:.1?}");
    assert!(
        took < Duration::from_secs(60),
        "cluster took {took:?} to become ready"
    );

    let readyz = cluster
        .kubectl(["get", "--raw", "/readyz"])
        .unwrap()
        .ok()
        .unwrap();
    assert_eq!(readyz.trim(), "ok");
    let dir = cluster
        .dir()
        .expect("a fresh cluster owns its dir")
        .to_path_buf();
    let status = script(&["status"], &dir);
    let status_text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "status: {status_text}");
    for component in [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
    ] {
        assert!(
            status_text.contains(&format!("{component:<24} running")),
            "{status_text}"
        );
    }
    assert!(
        processes_mentioning(&dir).len() >= 4,
        "the components run with {dir:?} in their arguments"
    );

    cluster.stop().expect("cluster down");
    assert_eq!(
        processes_mentioning(&dir),
        Vec::<u32>::new(),
        "processes left after down"
    );
    assert!(
        !dir.exists(),
        "an ephemeral cluster's dir is removed by down"
    );
}

#[test]
fn two_clusters_run_side_by_side_without_sharing_state() {
    let _serial = serial();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(TestCluster::start_fresh);
        let b = s.spawn(TestCluster::start_fresh);
        (
            a.join().unwrap().expect("cluster a up"),
            b.join().unwrap().expect("cluster b up"),
        )
    });
    let server = |c: &TestCluster| {
        c.kubectl([
            "config",
            "view",
            "--minify",
            "-o",
            "jsonpath={.clusters[0].cluster.server}",
        ])
        .unwrap()
        .ok()
        .unwrap()
    };
    assert_ne!(
        server(&a),
        server(&b),
        "each cluster has its own apiserver port"
    );

    a.kubectl(["create", "configmap", "only-in-a", "-n", "default"])
        .unwrap()
        .ok()
        .unwrap();
    let in_b = b
        .kubectl(["get", "configmap", "only-in-a", "-n", "default"])
        .unwrap();
    assert!(
        !in_b.success() && in_b.stderr.contains("NotFound"),
        "{in_b:?}"
    );

    let (dir_a, dir_b) = (
        a.dir().unwrap().to_path_buf(),
        b.dir().unwrap().to_path_buf(),
    );
    drop(a);
    // Stopping one leaves the other serving.
    let readyz = b
        .kubectl(["get", "--raw", "/readyz"])
        .unwrap()
        .ok()
        .unwrap();
    assert_eq!(readyz.trim(), "ok");
    drop(b);
    assert!(processes_mentioning(&dir_a).is_empty() && processes_mentioning(&dir_b).is_empty());
}

#[test]
fn the_watchdog_stops_a_cluster_whose_owner_process_died() {
    let _serial = serial();
    let mut owner = Command::new("sleep")
        .arg("600")
        .spawn()
        .expect("spawn sleep");
    let dir = tempfile::Builder::new()
        .prefix("dinoflow-cluster-")
        .tempdir()
        .unwrap()
        .keep();
    let pid = owner.id().to_string();
    let up = script(&["up", "--owner-pid", &pid, "--ephemeral"], &dir);
    assert!(
        up.status.success(),
        "up failed: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    assert!(!processes_mentioning(&dir).is_empty());

    owner.kill().unwrap();
    owner.wait().unwrap();
    let gone = wait_for(Duration::from_secs(30), || {
        (processes_mentioning(&dir).is_empty() && !dir.exists()).then_some(())
    });
    assert!(
        gone.is_some(),
        "left running: {:?}",
        processes_mentioning(&dir)
    );
}

#[test]
fn up_without_the_control_plane_binaries_fails_naming_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new("bash")
        .arg(cluster_script())
        .args(["up", "--dir"])
        .arg(dir.path())
        .env(CACHE_ENV, dir.path().join("no-cache"))
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("not found") && stderr.contains("scripts/setup.sh"),
        "{stderr}"
    );
}

#[test]
fn env_prints_an_export_line_for_the_kubeconfig() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("kubeconfig"), "").unwrap();
    let output = script(&["env"], dir.path());
    assert!(output.status.success());
    let line = String::from_utf8_lossy(&output.stdout);
    let expected = dir.path().join("kubeconfig");
    assert_eq!(
        line.trim(),
        format!("export KUBECONFIG={}", expected.display())
    );
}
