//! The apply layer: children created when absent and applied (server-side, stable field
//! manager) only when the job already owns them, deletes that tolerate objects already gone,
//! and the write fence on every call.

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
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
        // force: on the job's own objects (ownership is checked first) the operator owns these
        // fields even if a person edited them with kubectl.
        PatchParams::apply(FIELD_MANAGER).force()
    }

    /// Creates a typed namespaced child, or, when it exists and this job controls it, brings
    /// it up to date (a pod is kept as it is: see [`Existing`]), asking first what is most
    /// likely (see [`Expect`]). Never writes over an object the job does not own.
    pub async fn apply<K>(&self, obj: &K, expect: Expect) -> Result<()>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + Clone
            + Serialize
            + DeserializeOwned
            + std::fmt::Debug,
    {
        self.leadership.ensure()?;
        let api: Api<K> = Api::namespaced(self.client.clone(), &self.job.namespace);
        let kind = K::kind(&());
        let existing = if kind == "Pod" {
            Existing::Keep
        } else {
            Existing::Update
        };
        self.create_or_update(&api, obj, &kind, existing, expect)
            .await
    }

    /// [`Self::apply`] for an unstructured child (PodGroup).
    pub async fn apply_dynamic(
        &self,
        obj: &DynamicObject,
        ar: &ApiResource,
        expect: Expect,
    ) -> Result<()> {
        self.leadership.ensure()?;
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &self.job.namespace, ar);
        self.create_or_update(&api, obj, &ar.kind, Existing::Update, expect)
            .await
    }

    /// Create (or, when the object is expected to exist, read it first); on AlreadyExists
    /// read the object and, only if this job is its controller, apply over exactly the
    /// version read (a precondition: a replacement in between is a conflict, retried on a
    /// fresh look). Anything else is refused with the owner named.
    async fn create_or_update<K>(
        &self,
        api: &Api<K>,
        obj: &K,
        kind: &str,
        existing: Existing,
        expect: Expect,
    ) -> Result<()>
    where
        K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
    {
        let name = obj.name_any();
        let found = match expect {
            Expect::Present => api.get_opt(&name).await?,
            Expect::Absent => None,
        };
        let found = match found {
            Some(found) => found,
            None => {
                let create = PostParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                };
                match api.create(&create, obj).await {
                    Ok(_) => return Ok(()),
                    Err(kube::Error::Api(s)) if s.code == 409 && s.reason == "AlreadyExists" => {
                        api.get(&name).await?
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        check_owner(self.job, kind, &name, found.meta())?;
        if existing == Existing::Keep {
            return Ok(());
        }
        let mut update = obj.clone();
        update
            .meta_mut()
            .resource_version
            .clone_from(&found.meta().resource_version);
        api.patch(&name, &Self::params(), &Patch::Apply(&update))
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

/// Which round trip goes first for a child. A new gang's children are new: a create is one
/// round trip (then a read and an apply only if the name is taken). A later gang's (the next
/// attempt, a re-created pod) exist: a read, then the apply, saves the create refused with
/// AlreadyExists, one of three sequential round trips.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    Absent,
    Present,
}

/// What to do with a child that already exists and belongs to the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    /// Apply the desired state over it (Service, ConfigMap, Secret, PodGroup: their content
    /// can change between attempts, e.g. the teacher checkpoint).
    Update,
    /// Leave it as it is (pods: immutable, and one that exists is simply not yet in the cache).
    Keep,
}

/// Ok when `job` is the controller of the object `meta` describes; otherwise the refusal,
/// naming the object, its owner and the fix.
pub fn check_owner(job: &JobRef, kind: &str, name: &str, meta: &ObjectMeta) -> Result<()> {
    let controller = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    if controller.is_some_and(|o| o.uid == job.uid) {
        return Ok(());
    }
    let owner = match controller {
        Some(o) => format!("it belongs to {} {}", o.kind, o.name),
        None => "it has no controller".to_string(),
    };
    Err(Error::InvalidJob(format!(
        "{kind} {ns}/{name} already exists and {owner}, not to {job_kind} {job_name}; the \
         operator does not take over objects it did not create (a DistillJob x's children are \
         named x-distill..., as a PretrainJob x-distill's are): rename the job, or delete \
         that {kind}",
        ns = job.namespace,
        job_kind = job.kind.as_str(),
        job_name = job.name,
    )))
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
        mfu: None,
        last_checkpoint: None,
        best_checkpoint: None,
        evaluations: Vec::new(),
        world_size: None,
        last_reshard: None,
        last_progress_time: None,
        ..status.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::progress_fields;
    use dinoflow_api::status::JobPhase;

    fn owned_by(kind: &str, uid: &str, controller: bool) -> ObjectMeta {
        ObjectMeta {
            owner_references: Some(vec![
                k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                    api_version: API_VERSION.into(),
                    kind: kind.into(),
                    name: "vitl".into(),
                    uid: uid.into(),
                    controller: Some(controller),
                    block_owner_deletion: None,
                },
            ]),
            ..Default::default()
        }
    }

    #[test]
    fn only_a_child_the_job_controls_is_taken_as_its_own() {
        let job = JobRef::test("vitl");
        assert!(
            check_owner(
                &job,
                "Service",
                "vitl",
                &owned_by("PretrainJob", &job.uid, true)
            )
            .is_ok()
        );
        // Another job's Service (a PretrainJob vitl-distill's, met by a DistillJob vitl):
        // refused, naming the owner and the fix.
        let err = check_owner(
            &job,
            "Service",
            "vitl",
            &owned_by("DistillJob", "other", true),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("belongs to DistillJob vitl"), "{err}");
        assert!(err.contains("rename the job"), "{err}");
        // Not controlled (a person's object, or only a non-controller reference).
        let err = check_owner(&job, "ConfigMap", "vitl-config", &ObjectMeta::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("has no controller"), "{err}");
        assert!(check_owner(&job, "Pod", "p", &owned_by("PretrainJob", &job.uid, false)).is_err());
    }

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
