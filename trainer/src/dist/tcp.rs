//! A TCP [`Collective`] for CPU runs and tests: the ranks meet at rank 0
//! (`MASTER_ADDR:MASTER_PORT`, authenticated with the job's token), learn each other's
//! addresses from it, and then run bandwidth-optimal ring algorithms (ring reduce-scatter +
//! all-gather, chunked and pipelined: each rank sends ≈ 2·N·(W−1)/W bytes per all-reduce,
//! whatever W). The first algorithm, a star through rank 0 (rank 0 moves 2·(W−1)·N bytes), is
//! kept selectable ([`Algorithm::Star`]) as the benchmark's baseline.
//!
//! Hand-written on purpose: tch exposes no torch.distributed process group (gloo/MPI live
//! behind libtorch's Python bindings), and the Rust MPI bindings need a system MPI plus an
//! `mpirun` that pods do not have. GPU runs use NCCL.
//!
//! Guarantees: every rank ends with bitwise the same result (each chunk is summed once and
//! its bytes distributed); every operation starts with a header (op, sequence number, dtype,
//! length) checked against the neighbour's, so ranks issuing different collectives fail with
//! [`CollectiveError::Mismatch`] instead of deadlocking; a peer silent past the op timeout is
//! an error naming it; after a failure every link is shut so the other ranks fail at once too.
//! Wire formats: [`rendezvous`] (handshake), [`wire`] (headers and payloads).
use std::io;
use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tch::{Kind, Tensor};

use super::{Collective, CollectiveError};

mod auth;
mod rendezvous;
mod ring;
mod star;
mod sum;
mod wire;

pub use auth::AuthKey;
use rendezvous::{Links, Star};
use wire::{
    Header, OP_ALL_GATHER, OP_BARRIER, OP_BROADCAST, OP_REDUCE_SCATTER, OP_SUM, bytes_of,
    code_of_kind, store,
};

/// How the collectives move data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Algorithm {
    /// Ring reduce-scatter / all-gather and a chain broadcast (the default).
    #[default]
    Ring,
    /// Everything through rank 0 (the original backend; the benchmark's baseline).
    Star,
}

/// How to form the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpConfig {
    pub rank: usize,
    pub world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// Identity of the run (job and attempt); ranks with a different one are refused.
    pub session: String,
    /// The job's token (`DINOFLOW_PROGRESS_TOKEN`): handshakes carry an HMAC under it.
    pub auth: AuthKey,
    /// How long ranks wait for each other at start (pods are scheduled at different times).
    pub rendezvous_timeout: Duration,
    /// How long one collective may wait for a peer before the run is declared hung.
    pub op_timeout: Duration,
    pub algorithm: Algorithm,
}

struct State {
    links: Links,
    seq: u64,
    /// Set after a failed operation: the streams are then in an unknown state.
    poisoned: Option<String>,
}

/// The TCP group of this process.
pub struct TcpCollective {
    rank: usize,
    world_size: usize,
    algorithm: Algorithm,
    state: Mutex<State>,
    sent: AtomicU64,
}

impl std::fmt::Debug for TcpCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpCollective")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("algorithm", &self.algorithm)
            .finish()
    }
}

impl TcpCollective {
    /// Forms the group: rank 0 binds `0.0.0.0:master_port` and waits for the others; the
    /// others connect to `master_addr:master_port`, retrying until the rendezvous timeout
    /// (the rank-0 pod's DNS name may not resolve yet). Every rank also listens on an
    /// ephemeral port for its ring predecessor.
    pub fn rendezvous(cfg: &TcpConfig) -> Result<Self, CollectiveError> {
        if cfg.rank == 0 {
            let deadline = Instant::now() + cfg.rendezvous_timeout;
            let listener = loop {
                match TcpListener::bind(("0.0.0.0", cfg.master_port)) {
                    Ok(l) => break l,
                    // The previous attempt's rank 0 may still hold the port for a moment.
                    Err(e) if Instant::now() < deadline => {
                        tracing::debug!("cannot bind port {}: {e}; retrying", cfg.master_port);
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Err(e) => {
                        return Err(CollectiveError::Rendezvous(format!(
                            "rank 0 cannot listen on MASTER_PORT={}: {e}",
                            cfg.master_port
                        )));
                    }
                }
            };
            Self::serve(listener, cfg)
        } else {
            Ok(Self::new(cfg, rendezvous::join(cfg)?))
        }
    }

    /// Rank 0 on an already bound listener (tests bind port 0).
    pub fn serve(listener: TcpListener, cfg: &TcpConfig) -> Result<Self, CollectiveError> {
        Ok(Self::new(cfg, rendezvous::serve(listener, cfg)?))
    }

    fn new(cfg: &TcpConfig, links: Links) -> Self {
        Self {
            rank: cfg.rank,
            world_size: cfg.world_size,
            algorithm: cfg.algorithm,
            state: Mutex::new(State {
                links,
                seq: 0,
                poisoned: None,
            }),
            sent: AtomicU64::new(0),
        }
    }

    /// Bytes this rank has written to its links so far (headers and payloads), for tests
    /// and the benchmark.
    pub fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Sums `t` over all ranks; every rank gets bitwise the same result.
    pub fn try_all_reduce_sum(&self, t: &mut Tensor) -> Result<(), CollectiveError> {
        self.op(OP_SUM, t.kind(), t.numel(), |links, mine, sent| {
            match (self.algorithm, links) {
                (Algorithm::Star, Links { star, .. }) => star_op(star, mine, t, sent),
                (Algorithm::Ring, Links { ring: None, .. }) => Ok(()),
                (Algorithm::Ring, Links { ring: Some(r), .. }) => {
                    let mut buf = bytes_of(t);
                    let chunks = ring::chunks(t.numel(), elt(t.kind()), self.world_size);
                    self.ring(r, sent)
                        .all_reduce(mine, &mut buf, &chunks, adder(t.kind())?)?;
                    store(t, &buf);
                    Ok(())
                }
            }
        })
    }

    /// Replaces `t` on every rank by rank `0`'s `t`.
    pub fn try_broadcast_from_root(&self, t: &mut Tensor) -> Result<(), CollectiveError> {
        self.op(
            OP_BROADCAST,
            t.kind(),
            t.numel(),
            |links, mine, sent| match (self.algorithm, links) {
                (Algorithm::Star, Links { star, .. }) => star_op(star, mine, t, sent),
                (Algorithm::Ring, Links { ring: None, .. }) => Ok(()),
                (Algorithm::Ring, Links { ring: Some(r), .. }) => {
                    let mut buf = bytes_of(t);
                    self.ring(r, sent).broadcast(mine, &mut buf)?;
                    if self.rank != 0 {
                        store(t, &buf);
                    }
                    Ok(())
                }
            },
        )
    }

    /// [`Collective::reduce_scatter_sum`] with the error returned.
    pub fn try_reduce_scatter_sum(&self, input: &Tensor) -> Result<Tensor, CollectiveError> {
        let w = self.world_size;
        let n = input.numel() / w;
        assert_eq!(
            n * w,
            input.numel(),
            "reduce_scatter_sum: length not a multiple of the world size"
        );
        if self.algorithm == Algorithm::Star {
            // The baseline goes through a full all-reduce, as the trait's default does.
            let mut full = input.flatten(0, -1).copy();
            self.try_all_reduce_sum(&mut full)?;
            return Ok(full.narrow(0, (self.rank * n) as i64, n as i64).copy());
        }
        let kind = input.kind();
        self.op(
            OP_REDUCE_SCATTER,
            kind,
            input.numel(),
            |links, mine, sent| {
                let mut buf = bytes_of(input);
                let chunks = ring::equal_chunks(n * elt(kind), w);
                if let Some(r) = &links.ring {
                    self.ring(r, sent)
                        .reduce_scatter(mine, &mut buf, &chunks, adder(kind)?)?;
                }
                let mine = &buf[chunks[self.rank].clone()];
                Ok(Tensor::from_data_size(mine, &[n as i64], kind).to_device(input.device()))
            },
        )
    }

    /// [`Collective::all_gather`] with the error returned.
    pub fn try_all_gather(&self, shard: &Tensor) -> Result<Tensor, CollectiveError> {
        let (w, n, kind) = (self.world_size, shard.numel(), shard.kind());
        if self.algorithm == Algorithm::Star {
            let mut full = Tensor::zeros([(w * n) as i64], (kind, shard.device()));
            full.narrow(0, (self.rank * n) as i64, n as i64)
                .copy_(&shard.flatten(0, -1));
            self.try_all_reduce_sum(&mut full)?;
            return Ok(full);
        }
        self.op(OP_ALL_GATHER, kind, n, |links, mine, sent| {
            let chunks = ring::equal_chunks(n * elt(kind), w);
            let mut buf = vec![0u8; n * elt(kind) * w];
            buf[chunks[self.rank].clone()].copy_from_slice(&bytes_of(shard));
            if let Some(r) = &links.ring {
                self.ring(r, sent).all_gather(mine, &mut buf, &chunks)?;
            }
            Ok(Tensor::from_data_size(&buf, &[(w * n) as i64], kind).to_device(shard.device()))
        })
    }

    /// Returns once every rank has entered the barrier.
    pub fn try_barrier(&self) -> Result<(), CollectiveError> {
        if self.algorithm == Algorithm::Star {
            let mut t = Tensor::from_slice(&[0i64]);
            return self.try_all_reduce_sum(&mut t);
        }
        self.op(OP_BARRIER, Kind::Uint8, 1, |links, mine, sent| {
            // A one-byte all-gather: after W−1 steps every rank has heard from every rank.
            if let Some(r) = &links.ring {
                let mut buf = vec![0u8; self.world_size];
                let chunks = ring::equal_chunks(1, self.world_size);
                self.ring(r, sent).all_gather(mine, &mut buf, &chunks)?;
            }
            Ok(())
        })
    }

    fn ring<'a>(
        &self,
        (next, prev): &'a (TcpStream, TcpStream),
        sent: &'a AtomicU64,
    ) -> ring::Ring<'a> {
        ring::Ring {
            rank: self.rank,
            world: self.world_size,
            next,
            prev,
            sent,
        }
    }

    /// Runs one operation under the lock: sequence number, header, poisoning on failure.
    fn op<R>(
        &self,
        op: u8,
        kind: Kind,
        numel: usize,
        f: impl FnOnce(&Links, Header, &AtomicU64) -> Result<R, CollectiveError>,
    ) -> Result<R, CollectiveError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = &state.poisoned {
            return Err(CollectiveError::Poisoned(why.clone()));
        }
        let code = code_of_kind(kind).ok_or(CollectiveError::UnsupportedKind(kind))?;
        state.seq += 1;
        let numel = numel as u64;
        let mine = Header {
            op,
            seq: state.seq,
            kind: code,
            numel,
            bytes: numel * kind.elt_size_in_bytes() as u64,
        };
        let result = f(&state.links, mine, &self.sent);
        if let Err(e) = &result {
            state.poisoned = Some(e.to_string());
            // Wake the other ranks now rather than at their timeout: the run cannot go on.
            for s in state.links.streams() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
        result
    }
}

fn elt(kind: Kind) -> usize {
    kind.elt_size_in_bytes()
}

fn adder(kind: Kind) -> Result<sum::AddFn, CollectiveError> {
    sum::adder_for(kind).ok_or(CollectiveError::UnsupportedKind(kind))
}

fn star_op(
    star: &Star,
    mine: Header,
    t: &mut Tensor,
    sent: &AtomicU64,
) -> Result<(), CollectiveError> {
    // `&TcpStream` reads and writes: the lock in `op` serialises operations.
    match star {
        Star::Root(peers) => {
            let mut peers: Vec<&TcpStream> = peers.iter().collect();
            star::root_op(&mut peers, mine, t, sent)
        }
        Star::Leaf(root) => star::leaf_op(&mut &*root, mine, t, sent),
    }
}

fn io_err(peer: usize, what: &'static str) -> impl Fn(io::Error) -> CollectiveError {
    move |source| CollectiveError::Io { peer, what, source }
}

impl Collective for TcpCollective {
    fn world_size(&self) -> usize {
        self.world_size
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn all_reduce_sum(&self, t: &mut Tensor) {
        if let Err(e) = self.try_all_reduce_sum(t) {
            super::abort(self.rank, &e);
        }
    }

    fn broadcast_from_root(&self, t: &mut Tensor) {
        if let Err(e) = self.try_broadcast_from_root(t) {
            super::abort(self.rank, &e);
        }
    }

    fn reduce_scatter_sum(&self, input: &Tensor) -> Tensor {
        self.try_reduce_scatter_sum(input)
            .unwrap_or_else(|e| super::abort(self.rank, &e))
    }

    fn all_gather(&self, shard: &Tensor) -> Tensor {
        self.try_all_gather(shard)
            .unwrap_or_else(|e| super::abort(self.rank, &e))
    }

    fn barrier(&self) {
        if let Err(e) = self.try_barrier() {
            super::abort(self.rank, &e);
        }
    }
}

#[cfg(test)]
mod ring_tests;

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use super::*;
    use tch::{Device, Kind};

    fn config(world_size: usize, port: u16) -> TcpConfig {
        TcpConfig {
            rank: 0,
            world_size,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            session: "ml/tiny/0".into(),
            auth: AuthKey::default(),
            rendezvous_timeout: Duration::from_secs(20),
            op_timeout: Duration::from_secs(20),
            algorithm: Algorithm::Ring,
        }
    }

    /// A group of `world_size` ranks in threads of this process.
    pub(crate) fn local_group(world_size: usize) -> Vec<Arc<TcpCollective>> {
        group_with(world_size, |_| {})
    }

    /// [`local_group`] with `tweak` applied to every rank's config.
    pub(crate) fn group_with(
        world_size: usize,
        tweak: impl Fn(&mut TcpConfig) + Send + Sync + 'static,
    ) -> Vec<Arc<TcpCollective>> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let tweak = Arc::new(tweak);
        let leaves: Vec<_> = (1..world_size)
            .map(|rank| {
                let tweak = Arc::clone(&tweak);
                std::thread::spawn(move || {
                    let mut cfg = TcpConfig {
                        rank,
                        ..config(world_size, port)
                    };
                    tweak(&mut cfg);
                    TcpCollective::rendezvous(&cfg).unwrap()
                })
            })
            .collect();
        let mut cfg = config(world_size, port);
        tweak(&mut cfg);
        let root = TcpCollective::serve(listener, &cfg).unwrap();
        let mut group = vec![Arc::new(root)];
        group.extend(leaves.into_iter().map(|h| Arc::new(h.join().unwrap())));
        group
    }

    /// Runs `f(rank, collective)` on every rank at once and returns the results by rank.
    pub(crate) fn on_every_rank<T: Send + 'static>(
        group: &[Arc<TcpCollective>],
        f: impl Fn(usize, &TcpCollective) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let f = Arc::new(f);
        let handles: Vec<_> = group
            .iter()
            .enumerate()
            .map(|(rank, c)| {
                let (c, f) = (Arc::clone(c), Arc::clone(&f));
                std::thread::spawn(move || f(rank, &c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn three_ranks_sum_to_the_same_tensor_everywhere() {
        let group = local_group(3);
        let out = on_every_rank(&group, |rank, c| {
            let r = rank as f32;
            let mut t = Tensor::from_slice(&[r, 10.0 * r, 0.5]).view([3, 1]);
            c.try_all_reduce_sum(&mut t).unwrap();
            assert_eq!(t.size(), [3, 1]);
            let mut n = Tensor::from_slice(&[rank as i64 + 1]);
            c.try_all_reduce_sum(&mut n).unwrap();
            (
                Vec::<f32>::try_from(&t.view([-1])).unwrap(),
                n.int64_value(&[0]),
            )
        });
        for (values, count) in out {
            assert_eq!(values, vec![3.0, 30.0, 1.5]);
            assert_eq!(count, 6);
        }
    }

    #[test]
    fn a_broadcast_gives_every_rank_rank_zeros_tensor() {
        let group = local_group(2);
        let out = on_every_rank(&group, |rank, c| {
            let mut t = Tensor::from_slice(&[rank as f64 + 7.0, -0.0]);
            c.try_broadcast_from_root(&mut t).unwrap();
            Vec::<f64>::try_from(&t).unwrap()
        });
        assert_eq!(out[0], out[1]);
        assert_eq!(out[1][0], 7.0);
        assert!(out[1][1].is_sign_negative());
    }

    #[test]
    fn ranks_issuing_different_collectives_fail_instead_of_hanging() {
        let group = local_group(2);
        let out = on_every_rank(&group, |rank, c| {
            let mut t = Tensor::zeros([2 + rank as i64], (Kind::Float, Device::Cpu));
            c.try_all_reduce_sum(&mut t).map_err(|e| e.to_string())
        });
        let root = out[0].as_ref().unwrap_err();
        assert!(root.contains("rank 1"), "{root}");
        assert!(
            root.contains("of 3 Float") && root.contains("of 2 Float"),
            "{root}"
        );
        // The leaf sees rank 0 go away; later operations fail at once.
        assert!(out[1].is_err());
        let mut t = Tensor::zeros([1], (Kind::Float, Device::Cpu));
        assert!(matches!(
            group[0].try_all_reduce_sum(&mut t),
            Err(CollectiveError::Poisoned(_))
        ));
    }

    #[test]
    fn a_rank_of_another_run_is_refused_and_the_right_one_still_joins() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stale = std::thread::spawn(move || {
            TcpCollective::rendezvous(&TcpConfig {
                rank: 1,
                session: "ml/tiny/-1".into(),
                ..config(2, port)
            })
            .map(|_| ())
            .unwrap_err()
            .to_string()
        });
        let stale_err = {
            let listener = listener.try_clone().unwrap();
            let root = std::thread::spawn(move || TcpCollective::serve(listener, &config(2, port)));
            let err = stale.join().unwrap();
            let good = TcpCollective::rendezvous(&TcpConfig {
                rank: 1,
                ..config(2, port)
            });
            assert!(good.is_ok());
            assert!(root.join().unwrap().is_ok());
            err
        };
        assert!(stale_err.contains("another job or attempt"), "{stale_err}");
    }

    #[test]
    fn rank_zero_gives_up_naming_the_ranks_that_never_joined() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let err = TcpCollective::serve(
            listener,
            &TcpConfig {
                rendezvous_timeout: Duration::from_millis(200),
                ..config(3, port)
            },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("ranks 1, 2 did not join"), "{err}");
    }

    #[test]
    fn a_dead_peer_is_an_error_not_a_hang() {
        let mut group = local_group(2);
        let leaf = group.pop().unwrap();
        drop(leaf);
        let mut t = Tensor::ones([4], (Kind::Float, Device::Cpu));
        let err = group[0].try_all_reduce_sum(&mut t).unwrap_err().to_string();
        assert!(err.contains("rank 1"), "{err}");
    }
}
