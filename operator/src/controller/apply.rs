//! The apply layer: server-side apply with a stable field manager, deletes that tolerate
//! objects already gone, and the write fence on every call.

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use dinoflow_api::status::JobStatus;

use crate::job::{API_VERSION, JobRef};
use crate::leader::Leadership;
use crate::{Error, Result};

/// Field manager of everything the controller writes.
pub const FIELD_MANAGER: &str = "dinoflow-operator";

/// Writes on behalf of one job, fenced by leadership.
pub struct Applier<'a> {
    pub client: &'a Client,
    pub leadership: &'a Leadership,
    pub job: &'a JobRef,
}

impl Applier<'_> {
    fn params() -> PatchParams {
        // force: the operator owns these fields even if a person edited them with kubectl.
        PatchParams::apply(FIELD_MANAGER).force()
    }

    /// Server-side applies a typed namespaced child.
    pub async fn apply<K>(&self, obj: &K) -> Result<()>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + Clone
            + Serialize
            + DeserializeOwned
            + std::fmt::Debug,
    {
        self.leadership.ensure()?;
        let api: Api<K> = Api::namespaced(self.client.clone(), &self.job.namespace);
        api.patch(&obj.name_any(), &Self::params(), &Patch::Apply(obj))
            .await?;
        Ok(())
    }

    /// Server-side applies an unstructured child (PodGroup).
    pub async fn apply_dynamic(
        &self,
        obj: &DynamicObject,
        ar: &kube::api::ApiResource,
    ) -> Result<()> {
        self.leadership.ensure()?;
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &self.job.namespace, ar);
        api.patch(&obj.name_any(), &Self::params(), &Patch::Apply(obj))
            .await?;
        Ok(())
    }

    /// Deletes a pod; one already gone is fine.
    pub async fn delete_pod(&self, name: &str) -> Result<()> {
        self.leadership.ensure()?;
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.job.namespace);
        match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes a pod at once (grace period 0, `kubectl delete --force`): for a pod whose
    /// node is gone, which no kubelet will ever confirm. One already gone is fine.
    pub async fn force_delete_pod(&self, name: &str) -> Result<()> {
        self.leadership.ensure()?;
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.job.namespace);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::background()
        };
        match api.delete(name, &params).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes the controller's half of the status, guarded by the job's resourceVersion so a
    /// decision made on a stale view of the job is refused (409) instead of double-counting.
    /// Returns the job's resourceVersion after the write (unchanged when nothing changed).
    pub async fn write_status<K>(
        &self,
        status: &JobStatus,
        resource_version: Option<&str>,
    ) -> Result<Option<String>>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
    {
        self.leadership.ensure()?;
        let api: Api<K> = Api::namespaced(self.client.clone(), &self.job.namespace);
        let mut patch = serde_json::json!({
            "apiVersion": API_VERSION,
            "kind": self.job.kind.as_str(),
            "status": controller_fields(status),
        });
        if let Some(rv) = resource_version {
            patch["metadata"] = serde_json::json!({ "resourceVersion": rv });
        }
        let written = api
            .patch_status(&self.job.name, &Self::params(), &Patch::Apply(&patch))
            .await?;
        Ok(written.meta().resource_version.clone())
    }

    /// Deletes the job itself (TTL after finishing); children follow by garbage collection.
    pub async fn delete_job<K>(&self) -> Result<()>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
    {
        self.leadership.ensure()?;
        let api: Api<K> = Api::namespaced(self.client.clone(), &self.job.namespace);
        match api
            .delete(&self.job.name, &DeleteParams::background())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(Error::Kube(e)),
        }
    }
}

/// The controller's fields of a status (everything the progress endpoint does not own).
pub fn controller_fields(status: &JobStatus) -> JobStatus {
    JobStatus {
        iteration: None,
        total_iterations: None,
        curriculum_phase: None,
        losses: Default::default(),
        learning_rate: None,
        images_per_second: None,
        last_checkpoint: None,
        evaluations: Vec::new(),
        last_progress_time: None,
        ..status.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::progress_fields;
    use dinoflow_api::status::JobPhase;

    #[test]
    fn controller_and_progress_fields_partition_the_status() {
        let full = JobStatus {
            phase: Some(JobPhase::Running),
            restarts: Some(2),
            iteration: Some(100),
            losses: [("total".to_string(), 1.5)].into(),
            ..Default::default()
        };
        let c = serde_json::to_value(controller_fields(&full)).unwrap();
        let p = serde_json::to_value(progress_fields(&full)).unwrap();
        assert_eq!(c, serde_json::json!({"phase": "Running", "restarts": 2}));
        assert_eq!(
            p,
            serde_json::json!({"iteration": 100, "losses": {"total": 1.5}})
        );
    }
}
