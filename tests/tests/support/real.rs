//! The real node of the e2e tests that run jobs as containers: one fresh control plane and node
//! (`scripts/node.sh`: kubelet, containerd, runc, CNI bridge, CoreDNS) per test binary, with the
//! CPU trainer image of `scripts/images.sh` imported into it. Pods reach the host only at its
//! address on the node's bridge, so the in-process operator's progress endpoint listens there,
//! and a selector-less headless Service `dinoflow-operator` in `dinoflow-system` (the chart's
//! name, which the test TLS certificate covers) has that address as its one endpoint: trainers
//! find the operator through CoreDNS by the name they would use in a cluster.
//!
//! Statics are never dropped: the cluster's `--owner-pid` watchdog runs `scripts/cluster.sh
//! down` when the test binary exits, and that takes the node down first.
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use dinoflow_e2e::{RealNode, TestCluster, build_workspace_binary, repo_root};

/// The value of [`dinoflow_e2e::NODE_LABEL`] on the real node (the jobs' nodeSelector).
pub const NODE_LABEL_VALUE: &str = "real";

/// Host of the progress endpoint as pods see it: the chart's Service name.
pub const OPERATOR_HOST: &str = "dinoflow-operator.dinoflow-system.svc";

/// Where the dataset of the tiny example lives, on the host and in the trainer pods (a
/// read-only hostPath volume: the image holds no data).
pub const DATASET_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// A control plane, its node and the trainer image, shared by the tests of one binary.
pub struct RealWorld {
    pub cluster: TestCluster,
    pub node: RealNode,
    /// Reference of the CPU trainer image, imported into the node's containerd.
    pub image: String,
    /// The host's address on the node's bridge.
    pub host_ip: IpAddr,
}

/// The binary's real world, started on first use (about a minute: the control plane and the
/// image build run side by side, then the node and the image import).
pub fn real_world() -> &'static RealWorld {
    static REAL: OnceLock<RealWorld> = OnceLock::new();
    REAL.get_or_init(|| {
        let started = Instant::now();
        let (cluster, image) = std::thread::scope(|s| {
            let image = s.spawn(trainer_image);
            let cluster = TestCluster::start_fresh().expect("control plane up");
            (
                cluster,
                image.join().expect("the image build does not panic"),
            )
        });
        eprintln!(
            "[e2e] control plane and image ready in {:.0?}",
            started.elapsed()
        );
        let label = format!("{}={NODE_LABEL_VALUE}", dinoflow_e2e::NODE_LABEL);
        let node = RealNode::start(&cluster, &[&label]).expect("real node up");
        let (reference, archive) = image;
        node.import(&archive).expect("trainer image imported");
        let host_ip = node
            .env("DNS_IP")
            .expect("node.env has DNS_IP")
            .parse()
            .expect("DNS_IP is an address");
        super::install_crds(&cluster);
        operator_service(&cluster, host_ip);
        eprintln!(
            "[e2e] real node with {reference} ready in {:.0?}",
            started.elapsed()
        );
        RealWorld {
            cluster,
            node,
            image: reference,
            host_ip,
        }
    })
}

/// Builds the operator and trainer binaries (the script needs both) and the CPU trainer image
/// from them (cached by its inputs): its reference and oci-archive.
fn trainer_image() -> (String, PathBuf) {
    let operator = build_workspace_binary("dinoflow-operator", "dinoflow-operator")
        .unwrap_or_else(|e| panic!("{e}"));
    super::trainer();
    let out = Command::new(repo_root().join("scripts/images.sh"))
        .arg("--bin-dir")
        .arg(operator.parent().unwrap())
        .output()
        .expect("run scripts/images.sh");
    assert!(
        out.status.success(),
        "scripts/images.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let (reference, archive) = stdout
        .lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(reference, _)| {
            reference.contains("dinoflow-trainer:") && reference.ends_with("-cpu")
        })
        .unwrap_or_else(|| panic!("no CPU trainer image in scripts/images.sh's output:\n{stdout}"));
    (reference.to_owned(), PathBuf::from(archive))
}

/// The Service pods reach the operator by, its one endpoint the host's bridge address.
fn operator_service(cluster: &TestCluster, host_ip: IpAddr) {
    let (name, ns) = OPERATOR_HOST
        .strip_suffix(".svc")
        .and_then(|h| h.split_once('.'))
        .unwrap();
    let manifest = format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: {ns}}}
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {ns}}}
spec:
  clusterIP: None
  ports: [{{name: progress, port: 9090}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-host
  namespace: {ns}
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: progress, port: 9090, protocol: TCP}}]
endpoints: [{{addresses: ["{host_ip}"]}}]
"#
    );
    let file = cluster.dir().unwrap().join("operator-service.yaml");
    std::fs::write(&file, manifest).unwrap();
    cluster
        .kubectl(["apply", "-f", file.to_str().unwrap()])
        .unwrap()
        .ok()
        .unwrap_or_else(|e| panic!("{e}"));
}
