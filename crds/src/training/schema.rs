//! Schema helpers: defaults move from the OpenAPI schema into the field docs, and CEL
//! expressions can read "the value in effect" of a field that may be unset.
//!
//! Why defaults must not stay in the schema: the API server would write every default into the
//! stored object, and then a `preset` could no longer tell the user's values from defaults.
//! Defaults are applied by the trainer (and by [`crate::load`]) instead, so the schema documents
//! them (`kubectl explain` shows "Default: ...") and CEL rules substitute them.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use schemars::Schema;
use schemars::transform::transform_subschemas;
use serde_json::Value;

use super::{Preset, TrainingConfig};
use crate::presets;

/// Moves each `default` of the schema tree into its description ("Default: `x`.").
pub fn defaults_to_docs(schema: &mut Schema) {
    if let Some(obj) = schema.as_object_mut()
        && let Some(default) = obj.remove("default")
        && !default.is_null()
        && !default.is_object()
    {
        let shown = serde_json::to_string(&default).unwrap_or_default();
        let desc = obj
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let sep = if desc.is_empty() { "" } else { " " };
        obj.insert(
            "description".into(),
            Value::String(format!("{desc}{sep}Default: {shown}.")),
        );
    }
    transform_subschemas(&mut defaults_to_docs, schema);
}

/// The resolved `training` of "no preset" and of each preset, as JSON.
fn resolved_defaults() -> &'static BTreeMap<Option<&'static str>, Value> {
    static CELL: OnceLock<BTreeMap<Option<&'static str>, Value>> = OnceLock::new();
    CELL.get_or_init(|| {
        let mut out = BTreeMap::new();
        let plain = serde_json::to_value(TrainingConfig::default()).expect("serialises");
        out.insert(None, plain);
        for preset in presets::ALL {
            out.insert(Some(presets::name(preset)), resolve_preset(preset));
        }
        out
    })
}

fn resolve_preset(preset: Preset) -> Value {
    let user = serde_json::json!({ "preset": presets::name(preset) });
    let merged = presets::apply(user).expect("known preset");
    let cfg: TrainingConfig = serde_json::from_value(merged).expect("preset values deserialise");
    serde_json::to_value(cfg).expect("serialises")
}

fn lookup<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(value, |v, key| v.get(key))
}

/// A JSON value as a CEL literal.
fn literal(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) if n.is_f64() => {
            let s = n.to_string();
            // CEL needs a '.' or exponent to read a double.
            if s.contains(['.', 'e', 'E']) {
                s
            } else {
                format!("{s}.0")
            }
        }
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'")),
        Value::Array(items) => {
            format!(
                "[{}]",
                items.iter().map(literal).collect::<Vec<_>>().join(", ")
            )
        }
        Value::Object(_) => unreachable!("rules only read leaves"),
    }
}

/// CEL expression for the value in effect of a leaf of `training` (`self` = the training
/// object): the user's value if set, else the preset's, else the official default.
pub fn eff(path: &str) -> String {
    let defaults = resolved_defaults();
    let plain = lookup(&defaults[&None], path)
        .unwrap_or_else(|| panic!("no default for training.{path}"))
        .clone();
    let mut fallback = literal(&plain);
    for preset in presets::ALL.iter().rev() {
        let name = presets::name(*preset);
        let v = lookup(&defaults[&Some(name)], path).expect("same shape");
        if *v != plain {
            fallback = format!("(self.preset == '{name}' ? {} : {fallback})", literal(v));
        }
    }
    if fallback != literal(&plain) {
        fallback = format!("(has(self.preset) ? {fallback} : {})", literal(&plain));
    }
    format!("({} ? self.{path} : {fallback})", has(path))
}

/// CEL `has()` chain for a (possibly nested) optional field of `training`.
pub fn has(path: &str) -> String {
    let parts: Vec<&str> = path.split('.').collect();
    (1..=parts.len())
        .map(|n| format!("has(self.{})", parts[..n].join(".")))
        .collect::<Vec<_>>()
        .join(" && ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_value_of_a_field_no_preset_touches_is_its_default() {
        assert_eq!(
            eff("optim.clipGrad"),
            "(has(self.optim) && has(self.optim.clipGrad) ? self.optim.clipGrad : 3.0)"
        );
    }

    #[test]
    fn effective_value_of_a_preset_field_branches_on_the_preset() {
        let e = eff("optim.baseLr");
        assert!(e.contains("self.preset == 'vitl14' ? 0.0002"), "{e}");
        assert!(e.contains(": 0.004)"), "{e}");
        let arch = eff("model.arch");
        assert!(
            arch.contains("self.preset == 'vitg14' ? 'vit_giant2'"),
            "{arch}"
        );
    }

    #[test]
    fn integral_doubles_become_cel_doubles() {
        assert_eq!(literal(&serde_json::json!(1.0)), "1.0");
        assert_eq!(literal(&serde_json::json!(224)), "224");
        assert_eq!(literal(&serde_json::json!([0.32, 1.0])), "[0.32, 1.0]");
    }
}
