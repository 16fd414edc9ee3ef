use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{self, Scope};
use serde::Deserialize;

use crate::HarnessError;

const FIELD_MANAGER: &str = "dinoflow-e2e";

/// Every non-empty document of a (multi-document) YAML manifest.
pub fn parse_manifests(text: &str) -> Result<Vec<DynamicObject>, serde_yaml_ng::Error> {
    let mut objects = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        let value = serde_yaml_ng::Value::deserialize(document)?;
        // A document of comments only parses as null.
        if !value.is_null() {
            objects.push(serde_yaml_ng::from_value(value)?);
        }
    }
    Ok(objects)
}

/// Server-side applies `object` (into `namespace` when the kind is namespaced) with strict
/// field validation, so unknown fields are rejected by the API server like `kubectl apply`
/// does. A `status` in the object is written afterwards through the status subresource
/// (skipped on a dry run, where there is no object to patch).
pub async fn apply_object(
    client: &Client,
    namespace: &str,
    object: &DynamicObject,
    dry_run: bool,
) -> Result<DynamicObject, HarnessError> {
    let invalid = |message: &str| HarnessError::Manifest {
        path: "<manifest>".into(),
        message: message.to_owned(),
    };
    let types = object
        .types
        .as_ref()
        .ok_or_else(|| invalid("apiVersion and kind are required"))?;
    let gvk = GroupVersionKind::try_from(types).map_err(|e| invalid(&e.to_string()))?;
    let name = object
        .metadata
        .name
        .clone()
        .ok_or_else(|| invalid("metadata.name is required (apply cannot use generateName)"))?;
    let (resource, caps) = discovery::pinned_kind(client, &gvk).await?;
    let mut body = object.clone();
    let api: Api<DynamicObject> = if caps.scope == Scope::Namespaced {
        body.metadata.namespace = Some(namespace.to_owned());
        Api::namespaced_with(client.clone(), namespace, &resource)
    } else {
        Api::all_with(client.clone(), &resource)
    };
    let status = body
        .data
        .as_object_mut()
        .and_then(|fields| fields.remove("status"));
    let mut params = PatchParams::apply(FIELD_MANAGER)
        .force()
        .validation_strict();
    if dry_run {
        params = params.dry_run();
    }
    let applied = api.patch(&name, &params, &Patch::Apply(&body)).await?;
    match status {
        Some(status) if !dry_run => {
            let patch = serde_json::json!({ "status": status });
            Ok(api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?)
        }
        _ => Ok(applied),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multi_document_manifest_parses_into_its_objects_skipping_comment_only_documents() {
        let text = "# expect: nothing\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n---\n# just a comment\n---\napiVersion: dinoflow.dev/v1alpha1\nkind: PretrainJob\nmetadata:\n  name: b\nspec:\n  training: {}\n";
        let objects = parse_manifests(text).unwrap();
        let names: Vec<_> = objects
            .iter()
            .map(|o| o.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(objects[1].types.as_ref().unwrap().kind, "PretrainJob");
        assert!(objects[1].data["spec"]["training"].is_object());
    }

    #[test]
    fn a_manifest_that_is_not_yaml_is_an_error() {
        assert!(parse_manifests("kind: [unclosed").is_err());
    }
}
