//! What the operator needs to know about a job, independent of its kind.

use dinoflow_api::cluster::ClusterSpec;
use dinoflow_api::status::JobStatus;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// API group and version of the custom resources.
pub use dinoflow_api::load::API_VERSION;

/// The two kinds of job (shared with the trainer).
pub use dinoflow_api::contract::JobKind;

/// Identity of one job, as its children need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobRef {
    pub kind: JobKind,
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub generation: Option<i64>,
}

impl JobRef {
    /// The controller owner reference every child carries (garbage collection on deletion).
    pub fn owner_reference(&self) -> OwnerReference {
        OwnerReference {
            api_version: API_VERSION.into(),
            kind: self.kind.as_str().into(),
            name: self.name.clone(),
            uid: self.uid.clone(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }
    }

    /// Why the job's name cannot name its children, if it cannot. A custom resource's name
    /// is a DNS subdomain (`7b`, `vit.l` are valid), but the headless Service is named after
    /// the job and must be a DNS-1035 label, and each pod's hostname a DNS label: the API
    /// server would refuse them (422) on every attempt, however often it is retried.
    pub fn child_name_problem(&self) -> Option<String> {
        let name = &self.name;
        let starts_with_letter = name.starts_with(|c: char| c.is_ascii_lowercase());
        let label_chars = name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if starts_with_letter && label_chars {
            return None;
        }
        Some(format!(
            "metadata.name {name:?} cannot name the job's headless Service and pod hostnames: \
             it must start with a lowercase letter and hold only lowercase letters, digits and \
             '-' (a DNS-1035 label, no '.'); delete the job and create it again under such a \
             name, e.g. \"job-{}\"",
            name.replace('.', "-")
        ))
    }

    /// Test fixture.
    pub fn test(name: &str) -> Self {
        Self {
            kind: JobKind::Pretrain,
            name: name.into(),
            namespace: "ml".into(),
            uid: format!("uid-{name}"),
            generation: Some(1),
        }
    }
}

/// Where a DistillJob's teacher comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TeacherSource {
    /// A PretrainJob in the same namespace; the distillation waits until it has Succeeded.
    PretrainJob(String),
    /// A checkpoint path the pods can read; no waiting.
    Checkpoint(String),
}

/// A PretrainJob or DistillJob as the controller handles it.
pub trait TrainingJob:
    kube::Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + std::fmt::Debug
    + Serialize
    + DeserializeOwned
    + Send
    + Sync
    + 'static
{
    /// Which kind this is.
    const KIND: JobKind;

    /// `spec.cluster`.
    fn cluster(&self) -> &ClusterSpec;

    /// `spec` as a JSON value; the ConfigMap holds it (without `cluster`) for the trainer.
    fn spec_value(&self) -> Result<serde_json::Value>;

    /// `.status`, if any.
    fn job_status(&self) -> Option<&JobStatus>;

    /// The teacher of a DistillJob; None for a PretrainJob.
    fn teacher(&self) -> Option<TeacherSource> {
        None
    }

    /// The job's identity; fails on objects the API server did not produce.
    fn job_ref(&self) -> Result<JobRef> {
        let meta = self.meta();
        Ok(JobRef {
            kind: Self::KIND,
            name: meta
                .name
                .clone()
                .ok_or(Error::MissingField("metadata.name"))?,
            namespace: meta
                .namespace
                .clone()
                .ok_or(Error::MissingField("metadata.namespace"))?,
            uid: meta
                .uid
                .clone()
                .ok_or(Error::MissingField("metadata.uid"))?,
            generation: meta.generation,
        })
    }
}

mod api_impls;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_cannot_name_a_service_are_reported_with_the_fix() {
        for ok in ["vitl", "vit-l-14", "a7"] {
            assert_eq!(JobRef::test(ok).child_name_problem(), None, "{ok}");
        }
        for bad in ["7b", "vit.l", "-x"] {
            let why = JobRef::test(bad).child_name_problem().expect(bad);
            assert!(why.contains("metadata.name"), "{why}");
            assert!(why.contains("DNS-1035"), "{why}");
        }
        let why = JobRef::test("7b").child_name_problem().unwrap();
        assert!(why.contains("\"job-7b\""), "{why}");
    }
}
