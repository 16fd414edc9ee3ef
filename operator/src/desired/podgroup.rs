//! Gang scheduling: a Volcano or scheduler-plugins PodGroup with `minMember` = nodes.
//! Built as unstructured objects, so their CRDs only need to exist when a job chooses them.

use dinoflow_api::cluster::{ClusterSpec, GangMode};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};

use super::{child_meta, names};
use crate::job::JobRef;

/// Scheduler name of Volcano.
pub const VOLCANO_SCHEDULER: &str = "volcano";
/// Pod annotation Volcano reads to find a pod's group.
pub const VOLCANO_GROUP_ANNOTATION: &str = "scheduling.k8s.io/group-name";
/// Default scheduler name of a scheduler-plugins install (its "second scheduler").
pub const SCHEDULER_PLUGINS_SCHEDULER: &str = "scheduler-plugins-scheduler";
/// Pod label the coscheduling plugin reads to find a pod's group.
pub const SCHEDULER_PLUGINS_GROUP_LABEL: &str = "scheduling.x-k8s.io/pod-group";

/// API resource of the PodGroup kind a mode uses; None without gang scheduling.
pub fn api_resource(mode: GangMode) -> Option<ApiResource> {
    let gvk = match mode {
        GangMode::None => return None,
        GangMode::Volcano => GroupVersionKind::gvk("scheduling.volcano.sh", "v1beta1", "PodGroup"),
        GangMode::SchedulerPlugins => {
            GroupVersionKind::gvk("scheduling.x-k8s.io", "v1alpha1", "PodGroup")
        }
    };
    Some(ApiResource::from_gvk_with_plural(&gvk, "podgroups"))
}

/// The PodGroup of the job, or None when the job uses no gang scheduling.
pub fn pod_group(job: &JobRef, cluster: &ClusterSpec) -> Option<DynamicObject> {
    let ar = api_resource(cluster.gang_scheduling.mode)?;
    let mut spec = serde_json::json!({ "minMember": cluster.nodes });
    match cluster.gang_scheduling.mode {
        GangMode::Volcano => {
            if let Some(queue) = &cluster.gang_scheduling.queue {
                spec["queue"] = queue.clone().into();
            }
            if let Some(pc) = &cluster.priority_class_name {
                spec["priorityClassName"] = pc.clone().into();
            }
        }
        GangMode::SchedulerPlugins => {
            if let Some(t) = cluster.gang_scheduling.timeout_seconds {
                spec["scheduleTimeoutSeconds"] = t.into();
            }
        }
        GangMode::None => {}
    }
    let mut obj = DynamicObject::new(&names::pod_group(job), &ar);
    obj.metadata = child_meta(job, names::pod_group(job));
    obj.data = serde_json::json!({ "spec": spec });
    Some(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_gang_scheduling_means_no_pod_group() {
        assert!(pod_group(&JobRef::test("j"), &ClusterSpec::default()).is_none());
    }

    #[test]
    fn volcano_pod_group_has_min_member_nodes_and_queue() {
        let mut cluster = ClusterSpec {
            nodes: 12,
            ..Default::default()
        };
        cluster.gang_scheduling.mode = GangMode::Volcano;
        cluster.gang_scheduling.queue = Some("research".into());
        let pg = pod_group(&JobRef::test("j"), &cluster).unwrap();
        let types = pg.types.as_ref().unwrap();
        assert_eq!(types.api_version, "scheduling.volcano.sh/v1beta1");
        assert_eq!(types.kind, "PodGroup");
        assert_eq!(pg.data["spec"]["minMember"], 12);
        assert_eq!(pg.data["spec"]["queue"], "research");
        assert_eq!(pg.metadata.owner_references.unwrap()[0].name, "j");
    }

    #[test]
    fn scheduler_plugins_pod_group_carries_the_timeout() {
        let mut cluster = ClusterSpec {
            nodes: 4,
            ..Default::default()
        };
        cluster.gang_scheduling.mode = GangMode::SchedulerPlugins;
        cluster.gang_scheduling.timeout_seconds = Some(120);
        let pg = pod_group(&JobRef::test("j"), &cluster).unwrap();
        assert_eq!(
            pg.types.as_ref().unwrap().api_version,
            "scheduling.x-k8s.io/v1alpha1"
        );
        assert_eq!(pg.data["spec"]["minMember"], 4);
        assert_eq!(pg.data["spec"]["scheduleTimeoutSeconds"], 120);
    }
}
