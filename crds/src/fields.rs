//! The registry of spec fields (`crds/fields.txt`): every leaf of `spec.training` and
//! `spec.cluster` is consumed, with the test that shows its effect, or refused, with the rule
//! that refuses it. [`check`] walks the CRD's OpenAPI schema against it, so a field added
//! without either fails the test below.
//!
//! Line format: `<path> <status> <evidence>`, `#` starts a comment. `<path>` is dotted from
//! `training`/`cluster`, `[]` marks list items, a trailing `/**` covers a whole embedded
//! Kubernetes object (passed to the pod as it is). Status:
//! - `consumed <file>::<test fn>`: the test (its `fn` must exist in that file) shows the effect;
//! - `refused rule`: a `training` rule ([`crate::training::rules`]) names the field or its
//!   section (`precision`), so the
//!   API server (CEL) and the trainer (exit 78) both refuse what the trainer cannot honour;
//! - `pending <who>`: owned by work in progress elsewhere; listed by name, not yet a failure.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

/// The registry file, relative to the workspace root.
pub const REGISTRY: &str = "crds/fields.txt";

/// One registry line.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub path: String,
    /// Covers every leaf under `path` (`/**`).
    pub subtree: bool,
    pub status: Status,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    Consumed { file: String, test: String },
    Refused,
    Pending(String),
}

/// Parses the registry text; errors name the line.
pub fn parse(text: &str) -> Result<Vec<Entry>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (path, status) = (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
        );
        let rest = parts.collect::<Vec<_>>().join(" ");
        let rest = rest.as_str();
        let bad = |why: &str| format!("{REGISTRY}:{}: {why}: {line}", n + 1);
        let status = match status {
            "consumed" => {
                let (file, test) = rest
                    .split_once("::")
                    .ok_or_else(|| bad("consumed needs <file>::<test fn>"))?;
                Status::Consumed {
                    file: file.into(),
                    test: test.into(),
                }
            }
            "refused" if rest == "rule" => Status::Refused,
            "pending" if !rest.is_empty() => Status::Pending(rest.into()),
            _ => {
                return Err(bad(
                    "status must be consumed, refused rule or pending <who>",
                ));
            }
        };
        let (path, subtree) = match path.strip_suffix("/**") {
            Some(p) => (p, true),
            None => (path, false),
        };
        out.push(Entry {
            path: path.into(),
            subtree,
            status,
        });
    }
    Ok(out)
}

/// Every leaf path of `schema` under `prefix`: objects with properties are descended, arrays
/// of such objects too (`[]`); anything else (scalars, lists of scalars, maps) is a leaf.
pub fn leaves(schema: &Value, prefix: &str, out: &mut Vec<String>) {
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, sub) in props {
            leaves(sub, &format!("{prefix}.{name}"), out);
        }
        return;
    }
    let items = schema.get("items");
    if schema.get("type").and_then(Value::as_str) == Some("array")
        && items.is_some_and(|i| i.get("properties").is_some())
    {
        leaves(items.expect("checked"), &format!("{prefix}[]"), out);
        return;
    }
    out.push(prefix.to_string());
}

/// What the walk found.
#[derive(Debug, Default)]
pub struct Report {
    /// Leaves in the schema with no entry.
    pub unregistered: Vec<String>,
    /// Entries that name no field of the schema (a removed or renamed field).
    pub stale: Vec<String>,
    /// Entries whose evidence does not hold (missing test fn, no rule).
    pub bad_evidence: Vec<String>,
    /// Pending leaves with their owner.
    pub pending: Vec<(String, String)>,
}

impl Report {
    pub fn failures(&self) -> usize {
        self.unregistered.len() + self.stale.len() + self.bad_evidence.len()
    }
}

/// Checks the registry against the schema's leaves; `root` is the workspace root (for the
/// test files) and `rule_fields` the fields the `training` rules name.
pub fn check(
    leaf_paths: &[String],
    entries: &[Entry],
    root: &Path,
    rule_fields: &[&str],
) -> Report {
    let mut report = Report::default();
    let covers = |e: &Entry, leaf: &str| {
        leaf == e.path
            || (e.subtree
                && (leaf.starts_with(&format!("{}.", e.path))
                    || leaf.starts_with(&format!("{}[]", e.path))))
    };
    for leaf in leaf_paths {
        match entries.iter().find(|e| covers(e, leaf)) {
            None => report.unregistered.push(leaf.clone()),
            Some(Entry {
                status: Status::Pending(who),
                ..
            }) => report.pending.push((leaf.clone(), who.clone())),
            Some(_) => {}
        }
    }
    let mut sources: BTreeMap<String, Option<String>> = BTreeMap::new();
    for e in entries {
        if !leaf_paths.iter().any(|l| covers(e, l)) {
            report.stale.push(e.path.clone());
        }
        match &e.status {
            Status::Consumed { file, test } => {
                let text = sources
                    .entry(file.clone())
                    .or_insert_with(|| std::fs::read_to_string(root.join(file)).ok());
                let found = text
                    .as_deref()
                    .is_some_and(|t| t.contains(&format!("fn {test}(")));
                if !found {
                    report
                        .bad_evidence
                        .push(format!("{}: no `fn {test}(` in {file}", e.path));
                }
            }
            Status::Refused => {
                let field = e.path.strip_prefix("training.").unwrap_or(&e.path);
                // A rule on a section (e.g. `precision`) may refuse values of its leaves.
                let named = rule_fields
                    .iter()
                    .any(|r| field == *r || field.starts_with(&format!("{r}.")));
                if !named {
                    report.bad_evidence.push(format!(
                        "{}: refused, but no training rule names {field}",
                        e.path
                    ));
                }
            }
            Status::Pending(_) => {}
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PretrainJob;
    use kube_core::CustomResourceExt;

    fn root() -> std::path::PathBuf {
        std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
    }

    fn schema_leaves() -> Vec<String> {
        let crd = serde_json::to_value(PretrainJob::crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let mut out = Vec::new();
        for top in ["training", "cluster"] {
            leaves(&spec["properties"][top], top, &mut out);
        }
        out
    }

    /// The acceptance test of "no silent field": a new leaf without a registry entry, an entry
    /// whose test does not exist, or a refusal without a rule fails here.
    #[test]
    fn every_training_and_cluster_field_is_consumed_with_a_test_or_refused() {
        let text = std::fs::read_to_string(root().join(REGISTRY)).unwrap();
        let entries = parse(&text).unwrap();
        let rules = crate::training::rules::rules();
        let rule_fields: Vec<&str> = rules.iter().map(|r| r.field).collect();
        let leaves = schema_leaves();
        assert!(
            leaves.len() > 150,
            "the walk found only {} leaves",
            leaves.len()
        );
        let report = check(&leaves, &entries, &root(), &rule_fields);
        for (leaf, who) in &report.pending {
            println!("pending: {leaf} ({who})");
        }
        assert!(
            report.failures() == 0,
            "{REGISTRY} is out of date.\nfields neither consumed nor refused: {:#?}\n\
             entries for fields that do not exist: {:#?}\nevidence that does not hold: {:#?}\n\
             Add the field with the test that shows its effect, or a rule that refuses it.",
            report.unregistered,
            report.stale,
            report.bad_evidence
        );
    }

    #[test]
    fn an_unregistered_leaf_a_missing_test_and_a_ruleless_refusal_are_reported() {
        let entries = parse(
            "training.a consumed crds/src/fields.rs::parse\n\
             training.b consumed crds/src/fields.rs::no_such_test\n\
             training.c refused rule\n\
             training.d pending issue 10\n\
             cluster.pod/** consumed crds/src/fields.rs::check\n\
             training.gone consumed crds/src/fields.rs::parse # removed field",
        )
        .unwrap();
        let leaves: Vec<String> = [
            "training.a",
            "training.b",
            "training.c",
            "training.d",
            "training.new",
            "cluster.pod.spec.x",
        ]
        .map(String::from)
        .to_vec();
        let r = check(&leaves, &entries, &root(), &["a"]);
        assert_eq!(r.unregistered, ["training.new"]);
        assert_eq!(r.stale, ["training.gone"]);
        assert_eq!(r.bad_evidence.len(), 2, "{:?}", r.bad_evidence);
        assert!(r.bad_evidence[0].contains("no_such_test"));
        assert!(r.bad_evidence[1].contains("no training rule names c"));
        assert_eq!(r.pending, [("training.d".into(), "issue 10".into())]);
        assert!(parse("training.x maybe").is_err());
    }
}
