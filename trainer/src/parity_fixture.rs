//! Test support: loading the reference parity fixtures (`../shared/fixtures/parity`).
//!
//! A fixture `NAME` is `NAME.json` (config, expectations, tolerances, tensor table) plus
//! `NAME.safetensors`. The directory comes from `DINOFLOW_PARITY_FIXTURES`, else the shared
//! folder beside the workspace. A missing fixture fails the test: parity must not be skipped.

use std::collections::HashMap;
use std::path::PathBuf;

use serde_json::Value;
use tch::{Kind, Tensor};

pub fn fixture_dir() -> PathBuf {
    std::env::var_os("DINOFLOW_PARITY_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shared/fixtures/parity"
            ))
        })
}

#[derive(Debug)]
pub struct Fixture {
    pub name: String,
    pub json: Value,
    pub tensors: HashMap<String, Tensor>,
}

impl Fixture {
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
        let st = dir.join(format!("{name}.safetensors"));
        let tensors: HashMap<String, Tensor> = Tensor::read_safetensors(&st)
            .unwrap_or_else(|e| panic!("{}: {e}", st.display()))
            .into_iter()
            .collect();
        // The JSON table is the authoritative list of tensors and shapes.
        let table = json["tensors"].as_object().expect("tensors table");
        for (key, meta) in table {
            let t = tensors
                .get(key)
                .unwrap_or_else(|| panic!("{name}: tensor {key} listed but not stored"));
            let shape: Vec<i64> = meta["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect();
            assert_eq!(t.size(), shape, "{name}: shape of {key}");
        }
        Self {
            name: name.to_string(),
            json,
            tensors,
        }
    }

    pub fn t(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("{}: no tensor {key}", self.name))
    }

    /// Keys that start with `prefix`, sorted.
    pub fn keys_with_prefix(&self, prefix: &str) -> Vec<String> {
        let mut k: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        k.sort();
        k
    }

    /// `prefix`-stripped state dict.
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

    pub fn f64_at(&self, pointer: &str) -> f64 {
        self.json
            .pointer(pointer)
            .and_then(Value::as_f64)
            .unwrap_or_else(|| panic!("{}: no number at {pointer}", self.name))
    }
}

/// `max|ours - ref| / max|ref|` (absolute difference when the reference is all zeros).
pub fn rel_err(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.size(), reference.size(), "shape mismatch");
    let o = ours.to_kind(Kind::Double);
    let r = reference.to_kind(Kind::Double);
    let diff = (&o - &r).abs().max().double_value(&[]);
    let scale = r.abs().max().double_value(&[]);
    if scale == 0.0 { diff } else { diff / scale }
}

/// Asserts `rel_err <= tol` with a message naming the tensor.
pub fn assert_close(what: &str, ours: &Tensor, reference: &Tensor, tol: f64) {
    let e = rel_err(ours, reference);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.1e}");
}
