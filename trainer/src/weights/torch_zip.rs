//! Reader for PyTorch's `torch.save` zip format (`.pth`), tensors only.
//!
//! Hand-written because libtorch's C++ loader exposed by tch (`Tensor::loadz_multi`) accepts only
//! a flat `str → Tensor` dict, while official training checkpoints nest the state dict
//! (`{"teacher": {...}}`) and carry non-tensor entries. The pickle subset here is what
//! `torch.save` emits (protocol 2, persistent ids for storages, `_rebuild_tensor_v2`); anything
//! that is not a tensor is kept as an opaque value and skipped when flattening.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use tch::{Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum TorchZipError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not a PyTorch zip checkpoint ({0}); re-save it with torch.save in PyTorch >= 1.6")]
    Zip(#[from] zip::result::ZipError),
    #[error("no data.pkl in the archive; is this a torch.save file?")]
    NoPickle,
    #[error("pickle: {0}")]
    Pickle(String),
    #[error("storage {key}: {message}")]
    Storage { key: String, message: String },
}

fn perr<T>(msg: impl Into<String>) -> Result<T, TorchZipError> {
    Err(TorchZipError::Pickle(msg.into()))
}

// Payloads that are never interpreted still show in `Debug` output of pickle errors.
#[allow(dead_code)]
#[derive(Debug, Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String, String),
    /// `(storage kind, key in data/, element count)`.
    Storage(Kind, String, i64),
    Tensor(TensorSpec),
    /// A reduced object we do not interpret (e.g. optimizer or argparse objects).
    Opaque,
    Mark,
}

#[derive(Debug, Clone)]
struct TensorSpec {
    kind: Kind,
    key: String,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

fn storage_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "FloatStorage" => Kind::Float,
        "DoubleStorage" => Kind::Double,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

fn as_ints(v: &Value) -> Result<Vec<i64>, TorchZipError> {
    match v {
        Value::Tuple(items) | Value::List(items) => items
            .iter()
            .map(|i| match i {
                Value::Int(n) => Ok(*n),
                other => perr(format!("expected an int in a shape, got {other:?}")),
            })
            .collect(),
        other => perr(format!("expected a shape tuple, got {other:?}")),
    }
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TorchZipError> {
        if self.pos + n > self.data.len() {
            return perr("truncated data.pkl");
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, TorchZipError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, TorchZipError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn line(&mut self) -> Result<String, TorchZipError> {
        let start = self.pos;
        while self.pos < self.data.len() && self.data[self.pos] != b'\n' {
            self.pos += 1;
        }
        let s = String::from_utf8_lossy(&self.data[start..self.pos]).into_owned();
        self.pos += 1;
        Ok(s)
    }
    fn pop(&mut self) -> Result<Value, TorchZipError> {
        self.stack.pop().map_or_else(|| perr("stack underflow"), Ok)
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>, TorchZipError> {
        let Some(idx) = self.stack.iter().rposition(|v| matches!(v, Value::Mark)) else {
            return perr("MARK not found");
        };
        let items = self.stack.split_off(idx + 1);
        self.stack.pop();
        Ok(items)
    }
    fn top_mut(&mut self) -> Result<&mut Value, TorchZipError> {
        self.stack
            .last_mut()
            .map_or_else(|| perr("stack underflow"), Ok)
    }
    fn str_bytes(&mut self, n: usize) -> Result<Value, TorchZipError> {
        Ok(Value::Str(
            String::from_utf8_lossy(self.take(n)?).into_owned(),
        ))
    }

    fn reduce(&mut self, callable: Value, args: Value) -> Result<Value, TorchZipError> {
        let Value::Global(module, name) = callable else {
            return Ok(Value::Opaque);
        };
        let args = match args {
            Value::Tuple(a) => a,
            _ => return Ok(Value::Opaque),
        };
        Ok(match (module.as_str(), name.as_str()) {
            ("collections", "OrderedDict") => Value::Dict(Vec::new()),
            ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => {
                let [
                    Value::Storage(kind, key, _),
                    Value::Int(offset),
                    size,
                    stride,
                    ..,
                ] = &args[..]
                else {
                    return perr(format!("unexpected _rebuild_tensor_v2 arguments {args:?}"));
                };
                Value::Tensor(TensorSpec {
                    kind: *kind,
                    key: key.clone(),
                    offset: *offset,
                    size: as_ints(size)?,
                    stride: as_ints(stride)?,
                })
            }
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                args.into_iter().next().unwrap_or(Value::Opaque)
            }
            _ => Value::Opaque,
        })
    }

    fn run(mut self) -> Result<Value, TorchZipError> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME
                }
                b'.' => return self.pop(),
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b'(' => self.stack.push(Value::Mark),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let b = self.take(2)?;
                    self.stack
                        .push(Value::Int(u16::from_le_bytes([b[0], b[1]]) as i64));
                }
                0x8a => {
                    // LONG1: little-endian two's complement of n bytes.
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        self.stack.push(Value::Opaque);
                    } else {
                        let mut v: i64 = 0;
                        for (i, byte) in b.iter().enumerate() {
                            v |= (*byte as i64) << (8 * i);
                        }
                        if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                            v -= 1i64 << (8 * n);
                        }
                        self.stack.push(Value::Int(v));
                    }
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.stack.push(Value::Float(f64::from_be_bytes(a)));
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.str_bytes(n)?;
                    self.stack.push(v);
                }
                0x8c | b'U' | b'C' => {
                    let n = self.u8()? as usize;
                    let v = self.str_bytes(n)?;
                    self.stack.push(v);
                }
                b'T' | b'B' => {
                    let n = self.u32()? as usize;
                    let v = self.str_bytes(n)?;
                    self.stack.push(v);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global(module, name));
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.stack.push(Value::Global(m, n)),
                        _ => return perr("STACK_GLOBAL needs two strings"),
                    }
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    let v = self.top_mut()?.clone();
                    self.memo.insert(i, v);
                }
                b'r' => {
                    let i = self.u32()?;
                    let v = self.top_mut()?.clone();
                    self.memo.insert(i, v);
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    let v = self.top_mut()?.clone();
                    self.memo.insert(i, v);
                }
                b'h' | b'j' => {
                    let i = if op == b'h' {
                        self.u8()? as u32
                    } else {
                        self.u32()?
                    };
                    let Some(v) = self.memo.get(&i).cloned() else {
                        return perr(format!("memo {i} missing"));
                    };
                    self.stack.push(v);
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return perr("stack underflow in TUPLEn");
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items));
                }
                b'Q' => {
                    // BINPERSID: ('storage', storage_type, key, location, numel)
                    let pid = self.pop()?;
                    let Value::Tuple(items) = pid else {
                        return perr("persistent id is not a tuple");
                    };
                    let v = match &items[..] {
                        [
                            Value::Str(tag),
                            Value::Global(_, ty),
                            Value::Str(key),
                            _,
                            Value::Int(numel),
                        ] if tag == "storage" => {
                            let Some(kind) = storage_kind(ty) else {
                                return Err(TorchZipError::Storage {
                                    key: key.clone(),
                                    message: format!("unsupported storage type {ty}"),
                                });
                            };
                            Value::Storage(kind, key.clone(), *numel)
                        }
                        other => return perr(format!("unsupported persistent id {other:?}")),
                    };
                    self.stack.push(v);
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.reduce(callable, args)?;
                    self.stack.push(v);
                }
                0x81 => {
                    // NEWOBJ
                    let _args = self.pop()?;
                    let _cls = self.pop()?;
                    self.stack.push(Value::Opaque);
                }
                b'b' => {
                    // BUILD: object state (e.g. an OrderedDict's `_metadata`); not needed.
                    self.pop()?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    if let Value::Dict(d) = self.top_mut()? {
                        d.push((k, v));
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if let Value::Dict(d) = self.top_mut()? {
                        let mut it = items.into_iter();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            d.push((k, v));
                        }
                    }
                }
                b'a' => {
                    let v = self.pop()?;
                    if let Value::List(l) = self.top_mut()? {
                        l.push(v);
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    if let Value::List(l) = self.top_mut()? {
                        l.extend(items);
                    }
                }
                b'0' => {
                    self.pop()?;
                }
                b'2' => {
                    let v = self.top_mut()?.clone();
                    self.stack.push(v);
                }
                other => {
                    return perr(format!(
                        "unsupported pickle opcode 0x{other:02x} at byte {}",
                        self.pos - 1
                    ));
                }
            }
        }
    }
}

fn key_string(v: &Value) -> Option<String> {
    match v {
        Value::Str(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, TensorSpec)>) {
    let join = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match v {
        Value::Tensor(t) => out.push((prefix.to_string(), t.clone())),
        Value::Dict(items) => {
            for (k, v) in items {
                if let Some(k) = key_string(k) {
                    flatten(&join(&k), v, out);
                }
            }
        }
        Value::List(items) | Value::Tuple(items) => {
            for (i, v) in items.iter().enumerate() {
                flatten(&join(&i.to_string()), v, out);
            }
        }
        _ => {}
    }
}

fn element_size(kind: Kind) -> usize {
    match kind {
        Kind::Double | Kind::Int64 => 8,
        Kind::Float | Kind::Int => 4,
        Kind::Half | Kind::BFloat16 | Kind::Int16 => 2,
        _ => 1,
    }
}

/// Every tensor in a `torch.save` zip file, keyed by its `.`-joined path through nested
/// dicts and lists (`teacher.backbone.cls_token`).
pub fn read_torch_zip(path: &Path) -> Result<Vec<(String, Tensor)>, TorchZipError> {
    let file = std::fs::File::open(path)?;
    let mut archive = zip::ZipArchive::new(file)?;
    let pkl_name = archive
        .file_names()
        .find(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .map(str::to_string)
        .ok_or(TorchZipError::NoPickle)?;
    let root = pkl_name.trim_end_matches("data.pkl").to_string();
    let mut pkl = Vec::new();
    archive.by_name(&pkl_name)?.read_to_end(&mut pkl)?;
    if let Ok(mut f) = archive.by_name(&format!("{root}byteorder")) {
        let mut order = String::new();
        f.read_to_string(&mut order)?;
        if order.trim() != "little" {
            return perr(format!("byte order '{}' is not supported", order.trim()));
        }
    }
    let value = Machine {
        data: &pkl,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
    }
    .run()?;
    let mut specs = Vec::new();
    flatten("", &value, &mut specs);
    let mut storages: HashMap<String, Tensor> = HashMap::new();
    let mut out = Vec::with_capacity(specs.len());
    for (name, spec) in specs {
        if !storages.contains_key(&spec.key) {
            let mut bytes = Vec::new();
            archive
                .by_name(&format!("{root}data/{}", spec.key))?
                .read_to_end(&mut bytes)?;
            let elem = element_size(spec.kind);
            if bytes.len() % elem != 0 {
                return Err(TorchZipError::Storage {
                    key: spec.key.clone(),
                    message: format!("{} bytes is not a multiple of {elem}", bytes.len()),
                });
            }
            let numel = (bytes.len() / elem) as i64;
            let t = Tensor::f_from_data_size(&bytes, &[numel], spec.kind).map_err(|e| {
                TorchZipError::Storage {
                    key: spec.key.clone(),
                    message: e.to_string(),
                }
            })?;
            storages.insert(spec.key.clone(), t);
        }
        let storage = &storages[&spec.key];
        let t = storage
            .f_as_strided(spec.size.as_slice(), spec.stride.as_slice(), spec.offset)
            .map_err(|e| TorchZipError::Storage {
                key: spec.key.clone(),
                message: e.to_string(),
            })?
            .contiguous();
        out.push((name, t));
    }
    Ok(out)
}
