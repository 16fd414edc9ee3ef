//! The wire format of the TCP collective (see the parent module's docs): the handshake's
//! constants, an operation's header, dtype codes and tensor payloads.
use std::io::{self, Read, Write};

use tch::{Device, Kind, Tensor};

pub(super) const MAGIC: &[u8; 4] = b"DFLW";
/// First bytes of a ring link's handshake (one rank to its successor).
pub(super) const RING_MAGIC: &[u8; 4] = b"DFLR";
/// 2: authenticated rendezvous (challenge, HMAC), address exchange and ring links.
pub(super) const VERSION: u32 = 2;
pub(super) const OP_SUM: u8 = 1;
pub(super) const OP_BROADCAST: u8 = 2;
pub(super) const OP_REDUCE_SCATTER: u8 = 3;
pub(super) const OP_ALL_GATHER: u8 = 4;
pub(super) const OP_BARRIER: u8 = 5;
/// Longest handshake message accepted (the session string).
pub(super) const MAX_SESSION: u32 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Header {
    pub(super) op: u8,
    pub(super) seq: u64,
    pub(super) kind: u8,
    pub(super) numel: u64,
    pub(super) bytes: u64,
}

impl Header {
    pub(super) const LEN: usize = 26;

    pub(super) fn encode(&self) -> [u8; Self::LEN] {
        let mut buf = [0u8; Self::LEN];
        buf[0] = self.op;
        buf[1..9].copy_from_slice(&self.seq.to_le_bytes());
        buf[9] = self.kind;
        buf[10..18].copy_from_slice(&self.numel.to_le_bytes());
        buf[18..26].copy_from_slice(&self.bytes.to_le_bytes());
        buf
    }

    pub(super) fn write(&self, w: &mut impl Write) -> io::Result<()> {
        w.write_all(&self.encode())
    }

    pub(super) fn read(r: &mut impl Read) -> io::Result<Self> {
        let mut buf = [0u8; 26];
        r.read_exact(&mut buf)?;
        let u64_at = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().expect("8 bytes"));
        Ok(Self {
            op: buf[0],
            seq: u64_at(1),
            kind: buf[9],
            numel: u64_at(10),
            bytes: u64_at(18),
        })
    }

    pub(super) fn describe(&self) -> String {
        let op = match self.op {
            OP_SUM => "all_reduce_sum",
            OP_BROADCAST => "broadcast",
            OP_REDUCE_SCATTER => "reduce_scatter_sum",
            OP_ALL_GATHER => "all_gather",
            OP_BARRIER => "barrier",
            _ => "unknown op",
        };
        let kind = kind_of_code(self.kind).map_or_else(|| "?".to_string(), |k| format!("{k:?}"));
        format!("#{} {op} of {} {kind}", self.seq, self.numel)
    }
}

/// Element types the wire format carries.
pub(super) const KINDS: [(Kind, u8); 9] = [
    (Kind::Float, 1),
    (Kind::Double, 2),
    (Kind::Half, 3),
    (Kind::BFloat16, 4),
    (Kind::Int64, 5),
    (Kind::Int, 6),
    (Kind::Int16, 7),
    (Kind::Int8, 8),
    (Kind::Uint8, 9),
];

pub(super) fn code_of_kind(kind: Kind) -> Option<u8> {
    KINDS.iter().find(|(k, _)| *k == kind).map(|(_, c)| *c)
}

pub(super) fn kind_of_code(code: u8) -> Option<Kind> {
    KINDS.iter().find(|(_, c)| *c == code).map(|(k, _)| *k)
}

/// A tensor's contiguous CPU bytes.
pub(super) fn bytes_of(t: &Tensor) -> Vec<u8> {
    let c = t.detach().to_device(Device::Cpu).contiguous();
    let numel = c.numel();
    let mut buf = vec![0u8; numel * c.kind().elt_size_in_bytes()];
    c.copy_data_u8(&mut buf, numel);
    buf
}

pub(super) fn read_payload(r: &mut impl Read, len: u64) -> io::Result<Vec<u8>> {
    let len = usize::try_from(len).map_err(|_| io::Error::other("payload too large"))?;
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// Writes `bytes` (a tensor of `t`'s shape and dtype) into `t`, on `t`'s device.
pub(super) fn store(t: &mut Tensor, bytes: &[u8]) {
    let src = Tensor::from_data_size(bytes, &t.size(), t.kind());
    tch::no_grad(|| t.copy_(&src));
}

pub(super) fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

pub(super) fn read_string(r: &mut impl Read) -> io::Result<String> {
    let len = read_u32(r)?.min(MAX_SESSION);
    let bytes = read_payload(r, u64::from(len))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// A u32 length and the string's bytes (the reader is [`read_string`]).
pub(super) fn string_bytes(s: &str) -> Vec<u8> {
    let bytes = &s.as_bytes()[..s.len().min(MAX_SESSION as usize)];
    let mut out = (bytes.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}
