//! Harness for Dinoflow's end-to-end tests: a real control plane started by
//! `scripts/cluster.sh` (etcd, kube-apiserver, kube-controller-manager, kube-scheduler), with
//! `kubectl` and a kube [`Client`](kube::Client) bound to it.
//!
//! Tests that need the control plane fail, never skip, when its binaries are missing; the
//! message says to run `scripts/setup.sh`. Set `DINOFLOW_TEST_KUBECONFIG` to run the tests
//! against a cluster that is already up instead of starting one.
mod api_fault_proxy;
mod apply;
mod binaries;
mod cluster;
mod error;
mod fault_proxy;
mod images;
mod invalid;
mod kubectl;
mod paths;
mod poll;
mod prometheus;
mod real_node;

pub use api_fault_proxy::{ApiFaultProxy, Injected, Injection};
pub use apply::{apply_object, parse_manifests};
pub use binaries::{build_workspace_binary, without_cargo_package_env};
pub use cluster::{KUBECONFIG_ENV, NODE_LABEL, TestCluster};
pub use error::HarnessError;
pub use fault_proxy::FaultProxy;
pub use images::{app_version, container_images};
pub use invalid::{InvalidCase, load_invalid_cases};
pub use kubectl::KubectlOutput;
pub use paths::{
    CACHE_ENV, cache_dir, cluster_script, find_binary, processes_mentioning, repo_root, yaml_files,
};
pub use poll::{wait_for, wait_until};
pub use prometheus::{Prometheus, url_encode};
pub use real_node::{REAL_NODE_NAME, RealNode, node_script};
