//! The ConfigMap with the resolved trainer config, mounted read-only into every pod.
//!
//! It holds the job as a manifest (`apiVersion`, `kind`, `metadata`, `spec` without
//! `cluster`), which the trainer loads like the file kubectl applied. For a DistillJob whose
//! teacher is a PretrainJob, `spec.teacher` is resolved to that job's final checkpoint.

use k8s_openapi::api::core::v1::ConfigMap;

use super::{child_meta, names};
use crate::job::{API_VERSION, JobRef};
use crate::{Error, Result};

/// Key of the config file in the ConfigMap.
pub const CONFIG_KEY: &str = "config.yaml";
/// Directory the ConfigMap is mounted at.
pub const CONFIG_DIR: &str = "/etc/dinoflow";

/// Path of the trainer config inside a pod.
pub fn config_path() -> String {
    format!("{CONFIG_DIR}/{CONFIG_KEY}")
}

/// The trainer's view of the job: `spec` (its `cluster` dropped), with the teacher resolved.
pub fn trainer_document(
    job: &JobRef,
    spec: &serde_json::Value,
    teacher_checkpoint: Option<&str>,
) -> serde_json::Value {
    let mut spec = spec.clone();
    if let Some(obj) = spec.as_object_mut() {
        obj.remove("cluster");
        if let Some(path) = teacher_checkpoint {
            let model = obj.get("teacher").and_then(|t| t.get("model")).cloned();
            let mut teacher =
                serde_json::json!({ "checkpoint": { "path": path, "format": "dinoflow" } });
            if let Some(model) = model {
                teacher["model"] = model;
            }
            obj.insert("teacher".into(), teacher);
        }
    }
    serde_json::json!({
        "apiVersion": API_VERSION,
        "kind": job.kind.as_str(),
        "metadata": { "name": job.name, "namespace": job.namespace },
        "spec": spec,
    })
}

/// ConfigMap holding the trainer document as YAML.
pub fn config_map(
    job: &JobRef,
    spec: &serde_json::Value,
    teacher_checkpoint: Option<&str>,
) -> Result<ConfigMap> {
    let doc = trainer_document(job, spec, teacher_checkpoint);
    let yaml = serde_yaml_ng::to_string(&doc).map_err(Error::Yaml)?;
    Ok(ConfigMap {
        metadata: child_meta(job, names::config_map(job)),
        data: Some([(CONFIG_KEY.to_string(), yaml)].into()),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobKind;

    #[test]
    fn config_map_holds_the_job_as_a_manifest_without_cluster() {
        let job = JobRef::test("vitl");
        let spec = serde_json::json!({
            "training": {"optim": {"baseLr": 0.004}},
            "cluster": {"nodes": 2}
        });
        let cm = config_map(&job, &spec, None).unwrap();
        let yaml = &cm.data.unwrap()[CONFIG_KEY];
        let back: serde_json::Value = serde_yaml_ng::from_str(yaml).unwrap();
        assert_eq!(back["kind"], "PretrainJob");
        assert_eq!(back["apiVersion"], "dinoflow.dev/v1alpha1");
        assert_eq!(back["metadata"]["name"], "vitl");
        assert_eq!(back["spec"]["training"]["optim"]["baseLr"], 0.004);
        assert!(back["spec"].get("cluster").is_none());
        assert_eq!(cm.metadata.name.as_deref(), Some("vitl-config"));
        assert_eq!(cm.metadata.labels.unwrap()["dinoflow.dev/job"], "vitl");
    }

    #[test]
    fn distill_teacher_job_is_resolved_to_its_checkpoint() {
        let job = JobRef {
            kind: JobKind::Distill,
            ..JobRef::test("small")
        };
        let spec = serde_json::json!({"teacher": {"pretrainJob": "big"}, "training": {}});
        let doc = trainer_document(&job, &spec, Some("/ckpt/big/iter-1000"));
        assert_eq!(doc["kind"], "DistillJob");
        assert_eq!(
            doc["spec"]["teacher"],
            serde_json::json!({"checkpoint": {"path": "/ckpt/big/iter-1000", "format": "dinoflow"}})
        );
    }
}
