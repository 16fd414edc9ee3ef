//! Test support for every parity test (model, losses, masking, optimisation, train step): loads a reference
//! fixture (`NAME.json` + optional `NAME.safetensors`) from `DINOFLOW_PARITY_FIXTURES`, else
//! `../shared/fixtures/parity` beside the workspace. A missing fixture fails the test: parity
//! is never skipped silently.

use std::collections::HashMap;
use std::path::PathBuf;

use serde_json::Value;
use tch::{Kind, Tensor};

/// The fixture directory.
pub(crate) fn fixture_dir() -> PathBuf {
    std::env::var_os("DINOFLOW_PARITY_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shared/fixtures/parity"
            ))
        })
}

/// One loaded fixture.
#[derive(Debug)]
pub(crate) struct Fixture {
    pub name: String,
    pub json: Value,
    pub tensors: HashMap<String, Tensor>,
}

impl Fixture {
    /// Loads `NAME.json` and, when the JSON lists tensors, `NAME.safetensors` (checking every
    /// listed tensor exists with its listed shape).
    pub fn load(name: &str) -> Self {
        let dir = fixture_dir();
        let json_path = dir.join(format!("{name}.json"));
        let text = std::fs::read_to_string(&json_path).unwrap_or_else(|e| {
            panic!(
                "parity fixture {} is required (set DINOFLOW_PARITY_FIXTURES): {e}",
                json_path.display()
            )
        });
        let json: Value = serde_json::from_str(&text).expect("fixture JSON parses");
        let table = json["tensors"].as_object().cloned().unwrap_or_default();
        let mut tensors = HashMap::new();
        if !table.is_empty() {
            let path = dir.join(format!("{name}.safetensors"));
            tensors = Tensor::read_safetensors(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                .into_iter()
                .collect();
            for (key, meta) in &table {
                let t: &Tensor = tensors
                    .get(key)
                    .unwrap_or_else(|| panic!("{name}: tensor {key} listed but not stored"));
                let shape: Vec<i64> = meta["shape"]
                    .as_array()
                    .expect("shape list")
                    .iter()
                    .map(|v| v.as_i64().expect("integer dim"))
                    .collect();
                assert_eq!(t.size(), shape, "{name}: shape of {key}");
            }
        }
        Self {
            name: name.to_string(),
            json,
            tensors,
        }
    }

    /// A stored tensor (panics naming the fixture when absent).
    pub fn t(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("{}: no tensor {key}", self.name))
    }

    /// Tensors under `prefix` as a state dict, keys with the prefix stripped.
    pub fn state_dict(&self, prefix: &str) -> crate::weights::StateDict {
        self.keys_with_prefix(prefix)
            .into_iter()
            .map(|k| {
                (
                    k[prefix.len()..].to_string(),
                    self.tensors[&k].shallow_clone(),
                )
            })
            .collect()
    }

    /// Stored tensor names starting with `prefix`, sorted.
    pub fn keys_with_prefix(&self, prefix: &str) -> Vec<String> {
        let mut keys: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        keys.sort();
        keys
    }

    /// The JSON value at a JSON pointer (`/expect/centering/dino_raw_local`).
    pub fn at(&self, pointer: &str) -> &Value {
        self.json
            .pointer(pointer)
            .unwrap_or_else(|| panic!("{}: no JSON value at {pointer}", self.name))
    }

    /// A number at a JSON pointer.
    pub fn f64_at(&self, pointer: &str) -> f64 {
        self.at(pointer)
            .as_f64()
            .unwrap_or_else(|| panic!("{}: {pointer} is not a number", self.name))
    }

    /// An integer at a JSON pointer.
    pub fn i64_at(&self, pointer: &str) -> i64 {
        self.at(pointer)
            .as_i64()
            .unwrap_or_else(|| panic!("{}: {pointer} is not an integer", self.name))
    }
}

/// `max|ours − ref| / max|ref|` (the absolute difference when the reference is all zeros).
pub(crate) fn rel_err(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.size(), reference.size(), "shape mismatch");
    let o = ours.to_kind(Kind::Double);
    let r = reference.to_kind(Kind::Double);
    let diff = (&o - &r).abs().max().double_value(&[]);
    let scale = r.abs().max().double_value(&[]);
    if scale == 0.0 { diff } else { diff / scale }
}

/// Asserts `rel_err ≤ tol`, naming the quantity.
pub(crate) fn assert_close(what: &str, ours: &Tensor, reference: &Tensor, tol: f64) {
    let e = rel_err(ours, reference);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.1e}");
}

/// Asserts that a float64 value equals a JSON-printed reference value. serde_json's default
/// float parser (without the workspace-wide `float_roundtrip` feature) may land one ulp off the
/// printed value, so "exact" allows 2 ulps.
pub(crate) fn assert_f64_exact(what: &str, ours: f64, reference: f64) {
    let ulps = (ours - reference).abs() / (f64::EPSILON * reference.abs().max(f64::MIN_POSITIVE));
    assert!(
        ulps <= 2.0,
        "{what}: ours {ours:?} vs reference {reference:?} ({ulps:.1} ulp apart)"
    );
}

/// Asserts a scalar relative error `|ours − ref| / |ref| ≤ tol`.
pub(crate) fn assert_scalar_close(what: &str, ours: f64, reference: f64, tol: f64) {
    let e = (ours - reference).abs() / reference.abs().max(f64::MIN_POSITIVE);
    assert!(
        e <= tol,
        "{what}: ours {ours} vs reference {reference} (relative error {e:.3e} > {tol:.1e})"
    );
}

/// A JSON object with its key order kept (serde_json's `Map` sorts keys unless the
/// workspace-wide `preserve_order` feature is on; the parameter tables are ordered).
#[derive(Debug, Default)]
pub(crate) struct OrderedObject(pub Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for OrderedObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = OrderedObject;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    entries.push((k, v));
                }
                Ok(OrderedObject(entries))
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// Reads the raw JSON text of fixture `name` (for order-preserving parsing).
pub(crate) fn fixture_json_text(name: &str) -> String {
    let path = fixture_dir().join(format!("{name}.json"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
