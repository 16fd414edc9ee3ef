//! Desired state: the objects a job should have, as pure functions of the job.
//!
//! Nothing here talks to the API server; the controller applies what these functions return.
//! Every child carries the job's labels and a controller owner reference, so
//! `kubectl get pods -l dinoflow.dev/job=<name>` finds the gang and deleting the job
//! garbage-collects it.

pub mod configmap;
pub mod names;
pub mod podgroup;
pub mod pods;
pub mod scrape;
pub mod secret;
pub mod service;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::job::JobRef;

pub use dinoflow_api::contract::{LABEL_JOB, LABEL_JOB_KIND, LABEL_NODE_RANK, LABEL_RUN_ATTEMPT};
/// Standard label naming the managing controller.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Value of [`LABEL_MANAGED_BY`].
pub const MANAGED_BY: &str = "dinoflow-operator";

/// Labels every child of `job` carries.
pub fn job_labels(job: &JobRef) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_JOB.to_string(), job.name.clone()),
        (LABEL_JOB_KIND.to_string(), job.kind.as_str().to_string()),
        (LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string()),
    ])
}

/// Metadata of a child named `name`: namespace, labels, owner reference.
pub fn child_meta(job: &JobRef, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(job.namespace.clone()),
        labels: Some(job_labels(job)),
        owner_references: Some(vec![job.owner_reference()]),
        ..Default::default()
    }
}
