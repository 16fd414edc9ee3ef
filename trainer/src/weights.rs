//! State-dict IO: official DINOv2 weights in, our teacher backbone out.
//!
//! Accepted inputs: the hub backbone state dicts (`dinov2_vits14_pretrain.pth`, official key
//! names at the top level), `teacher_checkpoint.pth` from official training (`{"teacher":
//! state_dict}`, so keys read `teacher.backbone.*`, `teacher.dino_head.*`, ...), our own
//! safetensors exports, and the `blocks.<chunk>.<i>` layout that `block_chunks > 0` produces.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor, nn};

pub mod torch_zip;

/// Named tensors, sorted by key.
pub type StateDict = BTreeMap<String, Tensor>;

/// A tensor whose shape differs between the model and the state dict.
#[derive(Debug, Clone, PartialEq)]
pub struct ShapeMismatch {
    pub key: String,
    pub model: Vec<i64>,
    pub file: Vec<i64>,
}

/// Every difference between a model's parameters and a state dict.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyMismatch {
    /// In the model, not in the state dict.
    pub missing: Vec<String>,
    /// In the state dict, not in the model.
    pub unexpected: Vec<String>,
    pub mis_shaped: Vec<ShapeMismatch>,
}

impl KeyMismatch {
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mis_shaped.is_empty()
    }
}

impl fmt::Display for KeyMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "state dict does not match the model:")?;
        if !self.missing.is_empty() {
            write!(
                f,
                " missing keys ({}): {};",
                self.missing.len(),
                self.missing.join(", ")
            )?;
        }
        if !self.unexpected.is_empty() {
            write!(
                f,
                " unexpected keys ({}): {};",
                self.unexpected.len(),
                self.unexpected.join(", ")
            )?;
        }
        if !self.mis_shaped.is_empty() {
            let items: Vec<String> = self
                .mis_shaped
                .iter()
                .map(|m| format!("{} (model {:?}, file {:?})", m.key, m.model, m.file))
                .collect();
            write!(
                f,
                " mis-shaped keys ({}): {};",
                items.len(),
                items.join(", ")
            )?;
        }
        write!(
            f,
            " check the architecture settings (arch, patch_size, num_register_tokens, ffn_layer, heads)"
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read weights file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: tch::TchError,
    },
    #[error("cannot write weights file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: tch::TchError,
    },
    #[error("cannot read PyTorch checkpoint {path}: {source}")]
    Checkpoint {
        path: PathBuf,
        #[source]
        source: torch_zip::TorchZipError,
    },
    #[error(
        "weights file {0}: unknown format, expected .safetensors or a PyTorch zip checkpoint (.pth, .pt, .bin)"
    )]
    UnknownFormat(PathBuf),
    #[error("{0}")]
    Mismatch(KeyMismatch),
    #[error("tensor {key}: {message}")]
    BadTensor { key: String, message: String },
}

/// Reads a state dict from `.safetensors` or from a PyTorch `torch.save` zip file.
/// Nested dicts (such as `{"teacher": {...}}`) are flattened with `.`-joined keys.
pub fn read_state_dict(path: &Path) -> Result<StateDict, WeightsError> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default();
    let read_err = |source| WeightsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let named = match ext {
        "safetensors" => Tensor::read_safetensors(path).map_err(read_err)?,
        "pth" | "pt" | "bin" | "rth" => {
            torch_zip::read_torch_zip(path).map_err(|source| WeightsError::Checkpoint {
                path: path.to_path_buf(),
                source,
            })?
        }
        _ => return Err(WeightsError::UnknownFormat(path.to_path_buf())),
    };
    Ok(named.into_iter().collect())
}

/// Keys under `prefix` (e.g. `"teacher.backbone."`), with the prefix removed.
pub fn select_prefix(sd: &StateDict, prefix: &str) -> StateDict {
    sd.iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(prefix)
                .map(|rest| (rest.to_string(), v.shallow_clone()))
        })
        .collect()
}

/// Rewrites the chunked block layout `blocks.<chunk>.<i>.` to the flat `blocks.<i>.`.
///
/// With `block_chunks > 0` the official model wraps consecutive blocks in chunk modules
/// (padded with parameter-free identities), so block `i` keeps its global index `i` inside
/// chunk `c`; dropping the chunk index gives the flat key.
pub fn unchunk_key(key: &str) -> String {
    let parts: Vec<&str> = key.split('.').collect();
    let is_index = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let mut out = Vec::with_capacity(parts.len());
    let mut i = 0;
    while i < parts.len() {
        out.push(parts[i]);
        if parts[i] == "blocks"
            && i + 2 < parts.len()
            && is_index(parts[i + 1])
            && is_index(parts[i + 2])
        {
            i += 2; // skip the chunk index; the block index is pushed next round
            out.push(parts[i]);
        }
        i += 1;
    }
    out.join(".")
}

/// The backbone weights in any of the official layouts, with hub key names: picks
/// `teacher.backbone.*` (official `teacher_checkpoint.pth`), else `backbone.*`, else the keys
/// as they are (hub files), and flattens chunked blocks.
pub fn backbone_state_dict(sd: &StateDict) -> StateDict {
    let chosen = ["teacher.backbone.", "backbone."]
        .iter()
        .map(|p| select_prefix(sd, p))
        .find(|s| !s.is_empty())
        .unwrap_or_else(|| {
            sd.iter()
                .map(|(k, v)| (k.clone(), v.shallow_clone()))
                .collect()
        });
    chosen
        .into_iter()
        .map(|(k, v)| (unchunk_key(&k), v))
        .collect()
}

/// Compares a var store's variables with a state dict.
pub fn compare(vars: &HashMap<String, Tensor>, sd: &StateDict) -> KeyMismatch {
    let mut m = KeyMismatch::default();
    let mut model_keys: Vec<&String> = vars.keys().collect();
    model_keys.sort();
    for key in model_keys {
        match sd.get(key) {
            None => m.missing.push(key.clone()),
            Some(t) if t.size() != vars[key].size() => m.mis_shaped.push(ShapeMismatch {
                key: key.clone(),
                model: vars[key].size(),
                file: t.size(),
            }),
            Some(_) => {}
        }
    }
    m.unexpected = sd
        .keys()
        .filter(|k| !vars.contains_key(*k))
        .cloned()
        .collect();
    m
}

/// Copies `sd` into the variables of `vs`. Strict: any missing, unexpected or mis-shaped key
/// fails before anything is copied, and the error lists all of them.
pub fn load_state_dict(vs: &nn::VarStore, sd: &StateDict) -> Result<(), WeightsError> {
    let vars = vs.variables();
    let mismatch = compare(&vars, sd);
    if !mismatch.is_empty() {
        return Err(WeightsError::Mismatch(mismatch));
    }
    for (key, t) in sd {
        if !t.is_floating_point() {
            return Err(WeightsError::BadTensor {
                key: key.clone(),
                message: format!("{:?} is not floating point", t.kind()),
            });
        }
    }
    tch::no_grad(|| {
        for (key, var) in &vars {
            let src = sd[key].to_device(var.device()).to_kind(var.kind());
            var.shallow_clone().copy_(&src);
        }
    });
    Ok(())
}

/// The variables of `vs` under `prefix` (e.g. `"backbone."`), prefix removed, as fp32 CPU
/// contiguous tensors (ready to be written).
pub fn export_state_dict(vs: &nn::VarStore, prefix: &str) -> StateDict {
    vs.variables()
        .into_iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(prefix).map(|rest| {
                let t = tch::no_grad(|| {
                    v.detach()
                        .to_device(tch::Device::Cpu)
                        .to_kind(Kind::Float)
                        .contiguous()
                });
                (rest.to_string(), t)
            })
        })
        .collect()
}

/// Writes a state dict as safetensors (the format PyTorch users load with
/// `safetensors.torch.load_file` and `model.load_state_dict`).
pub fn write_safetensors(sd: &StateDict, path: &Path) -> Result<(), WeightsError> {
    let named: Vec<(&str, &Tensor)> = sd.iter().map(|(k, v)| (k.as_str(), v)).collect();
    Tensor::write_safetensors(&named, path).map_err(|source| WeightsError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Newer PyTorch saves `weight_norm` as `parametrizations.weight.original0/1` (g, v).
pub fn rename_parametrized_weight_norm(sd: StateDict) -> StateDict {
    sd.into_iter()
        .map(|(k, v)| {
            let k = k
                .replace("parametrizations.weight.original0", "weight_g")
                .replace("parametrizations.weight.original1", "weight_v");
            (k, v)
        })
        .collect()
}

/// `$TORCH_HOME/hub/checkpoints/<name>_pretrain.pth`, where torch.hub stores DINOv2 weights.
pub fn hub_file(torch_home: &Path, name: &str) -> PathBuf {
    torch_home
        .join("hub/checkpoints")
        .join(format!("{name}_pretrain.pth"))
}

/// The torch hub root: `$TORCH_HOME`, else `$XDG_CACHE_HOME/torch`, else `~/.cache/torch`
/// (torch.hub's own order).
pub fn torch_home() -> PathBuf {
    if let Some(home) = std::env::var_os("TORCH_HOME") {
        return PathBuf::from(home);
    }
    if let Some(cache) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(cache).join("torch");
    }
    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/torch")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DinoVisionTransformer, VitConfig};
    use tch::Device;

    fn testdata(name: &str) -> PathBuf {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/src/weights/testdata")).join(name)
    }

    /// The tiny ViT of `testdata/make_tiny_checkpoints.py`.
    fn tiny_config() -> VitConfig {
        VitConfig {
            img_size: 28,
            embed_dim: 16,
            depth: 2,
            num_heads: 2,
            mlp_ratio: 1.0,
            num_register_tokens: 1,
            ..VitConfig::vit_small(14)
        }
    }

    fn assert_same(a: &StateDict, b: &StateDict) {
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (k, t) in a {
            assert_eq!(t.size(), b[k].size(), "{k}");
            assert!(t.equal(&b[k]), "{k} differs");
        }
    }

    #[test]
    fn chunked_block_keys_become_flat_and_other_keys_stay() {
        assert_eq!(
            unchunk_key("blocks.1.7.attn.qkv.weight"),
            "blocks.7.attn.qkv.weight"
        );
        assert_eq!(
            unchunk_key("backbone.blocks.3.20.ls1.gamma"),
            "backbone.blocks.20.ls1.gamma"
        );
        assert_eq!(
            unchunk_key("blocks.7.attn.qkv.weight"),
            "blocks.7.attn.qkv.weight"
        );
        assert_eq!(
            unchunk_key("dino_head.mlp.0.weight"),
            "dino_head.mlp.0.weight"
        );
    }

    #[test]
    fn a_hub_pth_reads_the_same_tensors_as_its_safetensors_twin() {
        let pth = read_state_dict(&testdata("tiny_hub_backbone.pth")).unwrap();
        let st = read_state_dict(&testdata("tiny_backbone.safetensors")).unwrap();
        assert_same(&pth, &st);
    }

    #[test]
    fn an_official_teacher_checkpoint_loads_into_the_backbone() {
        let sd = read_state_dict(&testdata("tiny_teacher_checkpoint.pth")).unwrap();
        assert!(sd.contains_key("teacher.backbone.blocks.1.1.ls2.gamma"));
        assert!(sd.contains_key("teacher.dino_head.last_layer.weight_g"));
        let backbone = backbone_state_dict(&sd);
        let vs = nn::VarStore::new(Device::Cpu);
        DinoVisionTransformer::new(&vs.root(), &tiny_config()).unwrap();
        load_state_dict(&vs, &backbone).unwrap();
        let expected = read_state_dict(&testdata("tiny_backbone.safetensors")).unwrap();
        assert_same(&export_state_dict(&vs, ""), &expected);
    }

    #[test]
    fn a_mismatched_state_dict_fails_listing_missing_unexpected_and_mis_shaped_keys() {
        let sd = read_state_dict(&testdata("tiny_backbone.safetensors")).unwrap();
        let cfg = VitConfig {
            depth: 3,
            num_register_tokens: 0,
            img_size: 42,
            ..tiny_config()
        };
        let vs = nn::VarStore::new(Device::Cpu);
        DinoVisionTransformer::new(&vs.root(), &cfg).unwrap();
        let before = vs.variables()["cls_token"].copy();
        let err = load_state_dict(&vs, &sd).unwrap_err();
        let WeightsError::Mismatch(m) = &err else {
            panic!("expected a mismatch, got {err}")
        };
        assert!(
            m.missing.contains(&"blocks.2.attn.qkv.weight".to_string()),
            "{m:?}"
        );
        assert_eq!(m.unexpected, vec!["register_tokens".to_string()]);
        assert_eq!(
            m.mis_shaped,
            vec![ShapeMismatch {
                key: "pos_embed".into(),
                model: vec![1, 10, 16],
                file: vec![1, 5, 16]
            }]
        );
        let text = err.to_string();
        for needle in [
            "missing keys",
            "blocks.2.norm1.weight",
            "unexpected keys (1): register_tokens",
            "pos_embed (model [1, 10, 16], file [1, 5, 16])",
        ] {
            assert!(text.contains(needle), "'{needle}' not in: {text}");
        }
        // Nothing was copied.
        assert!(vs.variables()["cls_token"].equal(&before));
    }

    #[test]
    fn exported_backbone_safetensors_round_trip_with_official_keys() {
        let vs = nn::VarStore::new(Device::Cpu);
        {
            let p = vs.root() / "backbone";
            DinoVisionTransformer::new(&p, &tiny_config()).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("teacher_backbone.safetensors");
        write_safetensors(&export_state_dict(&vs, "backbone."), &path).unwrap();
        let back = read_state_dict(&path).unwrap();
        assert!(back.contains_key("blocks.0.attn.qkv.weight") && back.contains_key("cls_token"));
        assert_same(&back, &export_state_dict(&vs, "backbone."));
    }

    #[test]
    fn unknown_file_extensions_are_rejected_with_the_accepted_formats() {
        let err = read_state_dict(Path::new("weights.npz"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(".safetensors") && err.contains(".pth"),
            "{err}"
        );
    }
}
