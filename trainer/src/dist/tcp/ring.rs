//! The bandwidth-optimal algorithms over the ring `rank → rank + 1 (mod W)`: reduce-scatter and
//! all-gather (an all-reduce is both, so each rank sends ≈ 2·N·(W−1)/W bytes whatever W), and a
//! chain broadcast from rank 0.
//!
//! The tensor's bytes are cut into W balanced chunks (chunk c: elements `[c·n/W, (c+1)·n/W)`),
//! each chunk into segments of at most [`SEGMENT`] bytes. A sender thread writes to the
//! successor while this thread reads from the predecessor, so a segment is forwarded as soon
//! as it has arrived and been summed (pipelining) and two ranks writing to each other never
//! deadlock on full socket buffers.
//!
//! Determinism: chunk c is summed once, along the ring from rank c+1 to rank c
//! (`((x[c+1] + x[c+2]) + …) + x[c]`), and the all-gather copies those bytes to everyone, so
//! every rank ends with bitwise the same tensor.
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::mpsc;

use super::super::CollectiveError;
use super::sum::AddFn;
use super::wire::Header;

/// Largest piece written at once: small enough to pipeline, large enough that per-segment
/// overhead is negligible.
pub(super) const SEGMENT: usize = 1 << 20;

/// One rank's two ring links.
pub(super) struct Ring<'a> {
    pub(super) rank: usize,
    pub(super) world: usize,
    /// To `rank + 1`.
    pub(super) next: &'a TcpStream,
    /// From `rank − 1`.
    pub(super) prev: &'a TcpStream,
    /// Bytes this rank has written to its links (headers included).
    pub(super) sent: &'a AtomicU64,
}

/// Byte ranges of the W chunks of `numel` elements of `elt` bytes.
pub(super) fn chunks(numel: usize, elt: usize, world: usize) -> Vec<Range<usize>> {
    let bound = |c: usize| c * numel / world * elt;
    (0..world).map(|c| bound(c)..bound(c + 1)).collect()
}

/// Byte ranges of `n` equal chunks of `len` bytes each.
pub(super) fn equal_chunks(len: usize, world: usize) -> Vec<Range<usize>> {
    (0..world).map(|c| c * len..(c + 1) * len).collect()
}

fn segments(r: &Range<usize>) -> impl Iterator<Item = Range<usize>> {
    let end = r.end;
    (r.start..r.end)
        .step_by(SEGMENT)
        .map(move |s| s..(s + SEGMENT).min(end))
}

impl Ring<'_> {
    fn prev_rank(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    fn next_rank(&self) -> usize {
        (self.rank + 1) % self.world
    }

    /// Chunk `rank − k (mod W)`.
    fn back(&self, k: usize) -> usize {
        (self.rank + self.world * 2 - k) % self.world
    }

    /// Exchanges headers with the neighbours (a predecessor issuing a different collective is
    /// a [`CollectiveError::Mismatch`] rather than a deadlock), then runs `body` with the
    /// sender thread running.
    fn exchange<R>(
        &self,
        mine: Header,
        body: impl FnOnce(&mut Pipe<'_>) -> Result<R, CollectiveError>,
    ) -> Result<R, CollectiveError> {
        // The header goes out before anything is checked, so a neighbour that finds a
        // mismatch first still lets this rank read the header and report the mismatch too.
        let mut next = self.next;
        next.write_all(&mine.encode())
            .map_err(|source| CollectiveError::Io {
                peer: self.next_rank(),
                what: "sending a header to",
                source,
            })?;
        self.sent.fetch_add(Header::LEN as u64, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let (back_tx, back_rx) = mpsc::channel::<Vec<u8>>();
        // Which side failed first: its error is the cause, the other's a consequence.
        let first_failure = AtomicU8::new(NONE);
        let failed_first = |who: u8| {
            first_failure
                .compare_exchange(NONE, who, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        };
        std::thread::scope(|s| {
            let sender = s.spawn(|| -> io::Result<()> {
                let mut next = self.next;
                for buf in rx {
                    if let Err(e) = next.write_all(&buf) {
                        if failed_first(SENDER) {
                            // Unblock the reader: this operation cannot complete.
                            let _ = self.prev.shutdown(Shutdown::Both);
                        }
                        return Err(e);
                    }
                    self.sent.fetch_add(buf.len() as u64, Ordering::Relaxed);
                    let _ = back_tx.send(buf);
                }
                Ok(())
            });
            let mut pipe = Pipe {
                tx: Some(tx),
                pool: back_rx,
                prev: self.prev,
                prev_rank: self.prev_rank(),
            };
            let result = (|| {
                let theirs =
                    Header::read(&mut pipe.prev).map_err(pipe.io_err("receiving a header from"))?;
                if (
                    theirs.op,
                    theirs.seq,
                    theirs.kind,
                    theirs.numel,
                    theirs.bytes,
                ) != (mine.op, mine.seq, mine.kind, mine.numel, mine.bytes)
                {
                    return Err(CollectiveError::Mismatch {
                        rank: pipe.prev_rank,
                        theirs: theirs.describe(),
                        ours: mine.describe(),
                    });
                }
                body(&mut pipe)
            })();
            pipe.tx = None;
            if result.is_err() && failed_first(READER) {
                let _ = self.next.shutdown(Shutdown::Both);
            }
            let sent = sender.join().expect("the ring's sender thread panicked");
            match (result, sent) {
                (Ok(r), Ok(())) => Ok(r),
                (_, Err(source)) if first_failure.load(Ordering::SeqCst) == SENDER => {
                    Err(CollectiveError::Io {
                        peer: self.next_rank(),
                        what: "sending to",
                        source,
                    })
                }
                (Err(e), _) => Err(e),
                (Ok(_), Err(source)) => Err(CollectiveError::Io {
                    peer: self.next_rank(),
                    what: "sending to",
                    source,
                }),
            }
        })
    }

    /// Sums `buf` (the bytes of a tensor cut into `chunks`) over the ranks; on return this
    /// rank's chunk holds the sum, the other chunks are scratch.
    fn reduce_scatter_in(
        &self,
        pipe: &mut Pipe<'_>,
        buf: &mut [u8],
        chunks: &[Range<usize>],
        add: AddFn,
    ) -> Result<(), CollectiveError> {
        for seg in segments(&chunks[self.back(1)]) {
            pipe.send_copy(&buf[seg]);
        }
        for step in 0..self.world - 1 {
            let last = step == self.world - 2;
            for seg in segments(&chunks[self.back(2 + step)]) {
                let mut b = pipe.recv(seg.len())?;
                add(&mut b, &buf[seg.clone()]);
                if last {
                    buf[seg].copy_from_slice(&b);
                } else {
                    pipe.send(b);
                }
            }
        }
        Ok(())
    }

    /// Fills every chunk of `buf` from the rank owning it (this rank's is already there).
    fn all_gather_in(
        &self,
        pipe: &mut Pipe<'_>,
        buf: &mut [u8],
        chunks: &[Range<usize>],
    ) -> Result<(), CollectiveError> {
        for seg in segments(&chunks[self.rank]) {
            pipe.send_copy(&buf[seg]);
        }
        for step in 0..self.world - 1 {
            let last = step == self.world - 2;
            for seg in segments(&chunks[self.back(1 + step)]) {
                let b = pipe.recv(seg.len())?;
                buf[seg].copy_from_slice(&b);
                if !last {
                    pipe.send(b);
                }
            }
        }
        Ok(())
    }

    pub(super) fn all_reduce(
        &self,
        mine: Header,
        buf: &mut [u8],
        chunks: &[Range<usize>],
        add: AddFn,
    ) -> Result<(), CollectiveError> {
        self.exchange(mine, |pipe| {
            self.reduce_scatter_in(pipe, buf, chunks, add)?;
            self.all_gather_in(pipe, buf, chunks)
        })
    }

    pub(super) fn reduce_scatter(
        &self,
        mine: Header,
        buf: &mut [u8],
        chunks: &[Range<usize>],
        add: AddFn,
    ) -> Result<(), CollectiveError> {
        self.exchange(mine, |pipe| self.reduce_scatter_in(pipe, buf, chunks, add))
    }

    pub(super) fn all_gather(
        &self,
        mine: Header,
        buf: &mut [u8],
        chunks: &[Range<usize>],
    ) -> Result<(), CollectiveError> {
        self.exchange(mine, |pipe| self.all_gather_in(pipe, buf, chunks))
    }

    /// Rank 0's `buf` to everyone, down the chain 0 → 1 → … → W−1, segment by segment.
    pub(super) fn broadcast(&self, mine: Header, buf: &mut [u8]) -> Result<(), CollectiveError> {
        self.exchange(mine, |pipe| {
            let all = 0..buf.len();
            if self.rank == 0 {
                for seg in segments(&all) {
                    pipe.send_copy(&buf[seg]);
                }
                return Ok(());
            }
            for seg in segments(&all) {
                let b = pipe.recv(seg.len())?;
                buf[seg].copy_from_slice(&b);
                if self.rank + 1 < self.world {
                    pipe.send(b);
                }
            }
            Ok(())
        })
    }
}

const NONE: u8 = 0;
const READER: u8 = 1;
const SENDER: u8 = 2;

/// This thread's side of an operation: reads from the predecessor, queues for the sender.
struct Pipe<'a> {
    tx: Option<mpsc::Sender<Vec<u8>>>,
    /// Buffers the sender has written, reused so segments do not page-fault fresh memory.
    pool: mpsc::Receiver<Vec<u8>>,
    prev: &'a TcpStream,
    prev_rank: usize,
}

impl Pipe<'_> {
    fn io_err(&self, what: &'static str) -> impl Fn(io::Error) -> CollectiveError {
        let peer = self.prev_rank;
        move |source| CollectiveError::Io { peer, what, source }
    }

    /// Queues `buf` for the successor. A gone sender thread has failed: its error is
    /// reported when the operation ends.
    fn send(&self, buf: Vec<u8>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(buf);
        }
    }

    fn send_copy(&self, bytes: &[u8]) {
        let mut b = self.buffer(bytes.len());
        b.copy_from_slice(bytes);
        self.send(b);
    }

    fn buffer(&self, len: usize) -> Vec<u8> {
        match self.pool.try_recv() {
            Ok(mut b) => {
                b.truncate(len);
                b.resize(len, 0);
                b
            }
            Err(_) => vec![0; len],
        }
    }

    fn recv(&mut self, len: usize) -> Result<Vec<u8>, CollectiveError> {
        let mut b = self.buffer(len);
        self.prev
            .read_exact(&mut b)
            .map_err(self.io_err("receiving from"))?;
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_element_once_even_when_the_length_does_not_divide() {
        for (numel, world) in [(10, 3), (2, 4), (0, 2), (7, 7), (1 << 21, 8)] {
            let c = chunks(numel, 4, world);
            assert_eq!(c.len(), world);
            assert_eq!(c[0].start, 0);
            assert_eq!(c[world - 1].end, numel * 4);
            assert!(c.windows(2).all(|w| w[0].end == w[1].start));
            assert!(c.iter().all(|r| r.len() % 4 == 0));
            let lens: Vec<usize> = c.iter().map(|r| r.len() / 4).collect();
            assert!(lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 1);
        }
        let segs: Vec<_> = segments(&(3..SEGMENT * 2 + 10)).collect();
        assert_eq!(
            segs,
            vec![
                3..SEGMENT + 3,
                SEGMENT + 3..2 * SEGMENT + 3,
                2 * SEGMENT + 3..2 * SEGMENT + 10
            ]
        );
    }
}
