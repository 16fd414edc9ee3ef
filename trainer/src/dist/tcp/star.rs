//! The original algorithm of the TCP collective, kept selectable ([`super::Algorithm::Star`])
//! as the baseline of `bench/collectives`: every rank sends its tensor to rank 0, which sums in
//! rank order and sends the result back, so rank 0 moves 2·(W−1)·N bytes per all-reduce.
//!
//! Leaves always send their header first so rank 0 can detect ranks that issue different
//! collectives instead of deadlocking.
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};

use tch::{Device, Tensor};

use super::super::CollectiveError;
use super::io_err;
use super::wire::{Header, OP_SUM, bytes_of, read_payload, store};

pub(super) fn root_op(
    peers: &mut [&TcpStream],
    mine: Header,
    t: &mut Tensor,
    sent: &AtomicU64,
) -> Result<(), CollectiveError> {
    // Receive in rank order: the sum order, hence the result, is then fixed.
    let mut acc = (mine.op == OP_SUM).then(|| t.detach().to_device(Device::Cpu).copy());
    for (i, peer) in peers.iter_mut().enumerate() {
        let rank = i + 1;
        let theirs = Header::read(peer).map_err(io_err(rank, "receiving a header from"))?;
        let expected_bytes = if mine.op == OP_SUM { mine.bytes } else { 0 };
        if (
            theirs.op,
            theirs.seq,
            theirs.kind,
            theirs.numel,
            theirs.bytes,
        ) != (mine.op, mine.seq, mine.kind, mine.numel, expected_bytes)
        {
            return Err(CollectiveError::Mismatch {
                rank,
                theirs: theirs.describe(),
                ours: mine.describe(),
            });
        }
        if let Some(acc) = &mut acc {
            let bytes = read_payload(peer, theirs.bytes).map_err(io_err(rank, "receiving from"))?;
            let other = Tensor::from_data_size(&bytes, &t.size(), t.kind());
            let _ = acc.g_add_(&other);
        }
    }
    let out = match acc {
        Some(acc) => {
            let bytes = bytes_of(&acc);
            store(t, &bytes);
            bytes
        }
        None => bytes_of(t),
    };
    let reply = Header {
        bytes: out.len() as u64,
        ..mine
    };
    for (i, peer) in peers.iter_mut().enumerate() {
        reply
            .write(peer)
            .and_then(|()| peer.write_all(&out))
            .map_err(io_err(i + 1, "sending the result to"))?;
        sent.fetch_add((Header::LEN + out.len()) as u64, Ordering::Relaxed);
    }
    Ok(())
}

pub(super) fn leaf_op(
    root: &mut &TcpStream,
    mine: Header,
    t: &mut Tensor,
    sent: &AtomicU64,
) -> Result<(), CollectiveError> {
    if mine.op == OP_SUM {
        let bytes = bytes_of(t);
        mine.write(root)
            .and_then(|()| root.write_all(&bytes))
            .map_err(io_err(0, "sending to"))?;
        sent.fetch_add((Header::LEN + bytes.len()) as u64, Ordering::Relaxed);
    } else {
        Header { bytes: 0, ..mine }
            .write(root)
            .map_err(io_err(0, "sending to"))?;
        sent.fetch_add(Header::LEN as u64, Ordering::Relaxed);
    }
    let reply = Header::read(root).map_err(io_err(0, "receiving the result from"))?;
    if (reply.op, reply.seq, reply.bytes) != (mine.op, mine.seq, mine.bytes) {
        return Err(CollectiveError::Mismatch {
            rank: 0,
            theirs: reply.describe(),
            ours: mine.describe(),
        });
    }
    let bytes = read_payload(root, reply.bytes).map_err(io_err(0, "receiving the result from"))?;
    store(t, &bytes);
    Ok(())
}
