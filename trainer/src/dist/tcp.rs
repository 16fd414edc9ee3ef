//! A TCP [`Collective`] for CPU runs and tests: rank 0 listens on `MASTER_PORT`, every other
//! rank connects to `MASTER_ADDR:MASTER_PORT`, and reductions go through rank 0 (a star).
//!
//! Hand-written on purpose: tch exposes no torch.distributed process group (gloo/MPI live
//! behind libtorch's Python bindings), and the Rust MPI bindings need a system MPI plus an
//! `mpirun` that pods do not have. The star costs O(world) bandwidth at rank 0, which is fine
//! for the CPU smoke runs and tests this backend exists for; GPU runs use NCCL.
//!
//! Sums are taken on rank 0 in rank order and the result bytes are sent to everyone, so every
//! rank ends with bitwise the same tensor (needed for replicas that stay identical).
//!
//! Wire format (little endian). Handshake, leaf → root: `DFLW`, u32 protocol version, u32
//! rank, u32 world size, u32 length + session bytes (job/attempt, so a stale pod of an older
//! attempt cannot join); root → leaf: u8 0 (accepted) or 1 plus a u32-length message. Each
//! operation: a header (u8 op, u64 sequence number, u8 dtype code, u64 element count, u64
//! payload bytes) followed by the payload. Leaves always send their header first so rank 0
//! can detect ranks that issue different collectives instead of deadlocking.
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tch::{Device, Tensor};

use super::{Collective, CollectiveError};

mod wire;

use wire::{
    Header, MAGIC, OP_BROADCAST, OP_SUM, VERSION, bytes_of, code_of_kind, read_payload,
    read_string, read_u32, store,
};

/// How to form the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpConfig {
    pub rank: usize,
    pub world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// Identity of the run (job and attempt); ranks with a different one are refused.
    pub session: String,
    /// How long ranks wait for each other at start (pods are scheduled at different times).
    pub rendezvous_timeout: Duration,
    /// How long one collective may wait for a peer before the run is declared hung.
    pub op_timeout: Duration,
}

enum Links {
    /// Rank 0: a stream per other rank, index = rank - 1.
    Root(Vec<TcpStream>),
    Leaf(TcpStream),
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
    state: Mutex<State>,
}

impl std::fmt::Debug for TcpCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpCollective")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .finish()
    }
}

impl TcpCollective {
    /// Forms the group: rank 0 binds `0.0.0.0:master_port` and waits for the others; the
    /// others connect to `master_addr:master_port`, retrying until the rendezvous timeout
    /// (the rank-0 pod's DNS name may not resolve yet).
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
            Self::join(cfg)
        }
    }

    /// Rank 0 on an already bound listener (tests bind port 0).
    pub fn serve(listener: TcpListener, cfg: &TcpConfig) -> Result<Self, CollectiveError> {
        let rdzv = |m: String| CollectiveError::Rendezvous(m);
        let deadline = Instant::now() + cfg.rendezvous_timeout;
        let mut peers: Vec<Option<TcpStream>> = (1..cfg.world_size).map(|_| None).collect();
        listener
            .set_nonblocking(true)
            .map_err(|e| rdzv(format!("listener: {e}")))?;
        while peers.iter().any(Option::is_none) {
            match listener.accept() {
                Ok((stream, from)) => {
                    if let Some((rank, stream)) = admit(stream, from, cfg, &peers)? {
                        peers[rank - 1] = Some(stream);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<String> = peers
                            .iter()
                            .enumerate()
                            .filter(|(_, p)| p.is_none())
                            .map(|(i, _)| (i + 1).to_string())
                            .collect();
                        return Err(rdzv(format!(
                            "ranks {} did not join within {:?}; check that every pod of the gang is running and can reach rank 0 on MASTER_PORT={}",
                            missing.join(", "),
                            cfg.rendezvous_timeout,
                            cfg.master_port
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(rdzv(format!("accept: {e}"))),
            }
        }
        let peers: Vec<TcpStream> = peers.into_iter().flatten().collect();
        for p in &peers {
            p.set_read_timeout(Some(cfg.op_timeout))
                .and_then(|()| p.set_write_timeout(Some(cfg.op_timeout)))
                .map_err(|e| rdzv(format!("socket options: {e}")))?;
        }
        tracing::info!(world_size = cfg.world_size, "rank 0: every rank joined");
        Ok(Self {
            rank: 0,
            world_size: cfg.world_size,
            state: Mutex::new(State {
                links: Links::Root(peers),
                seq: 0,
                poisoned: None,
            }),
        })
    }

    fn join(cfg: &TcpConfig) -> Result<Self, CollectiveError> {
        let deadline = Instant::now() + cfg.rendezvous_timeout;
        let mut backoff = Duration::from_millis(100);
        let mut logged = false;
        let target = format!("{}:{}", cfg.master_addr, cfg.master_port);
        let stream = loop {
            match connect_once(&target) {
                Ok(s) => break s,
                Err(e) => {
                    if Instant::now() >= deadline {
                        return Err(CollectiveError::Rendezvous(format!(
                            "rank {} cannot reach rank 0 at MASTER_ADDR:MASTER_PORT={target} within {:?}: {e}",
                            cfg.rank, cfg.rendezvous_timeout
                        )));
                    }
                    if !logged {
                        tracing::info!("waiting for rank 0 at {target}: {e}");
                        logged = true;
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        };
        let rdzv = |m: String| CollectiveError::Rendezvous(format!("rank {}: {m}", cfg.rank));
        let mut s = stream;
        s.set_nodelay(true)
            .and_then(|()| s.set_read_timeout(Some(cfg.rendezvous_timeout)))
            .map_err(|e| rdzv(format!("socket options: {e}")))?;
        let session = cfg.session.as_bytes();
        let mut hello = Vec::with_capacity(20 + session.len());
        hello.extend_from_slice(MAGIC);
        for v in [
            VERSION,
            cfg.rank as u32,
            cfg.world_size as u32,
            session.len() as u32,
        ] {
            hello.extend_from_slice(&v.to_le_bytes());
        }
        hello.extend_from_slice(session);
        s.write_all(&hello)
            .map_err(|e| rdzv(format!("handshake: {e}")))?;
        let mut status = [0u8; 1];
        s.read_exact(&mut status)
            .map_err(|e| rdzv(format!("handshake reply: {e}")))?;
        if status[0] != 0 {
            let msg = read_string(&mut s).unwrap_or_default();
            return Err(rdzv(format!("rank 0 refused this rank: {msg}")));
        }
        s.set_read_timeout(Some(cfg.op_timeout))
            .and_then(|()| s.set_write_timeout(Some(cfg.op_timeout)))
            .map_err(|e| rdzv(format!("socket options: {e}")))?;
        Ok(Self {
            rank: cfg.rank,
            world_size: cfg.world_size,
            state: Mutex::new(State {
                links: Links::Leaf(s),
                seq: 0,
                poisoned: None,
            }),
        })
    }

    /// Sums `t` over all ranks; every rank gets bitwise the same result.
    pub fn try_all_reduce_sum(&self, t: &mut Tensor) -> Result<(), CollectiveError> {
        self.op(OP_SUM, t)
    }

    /// Replaces `t` on every rank by rank `0`'s `t`.
    pub fn try_broadcast_from_root(&self, t: &mut Tensor) -> Result<(), CollectiveError> {
        self.op(OP_BROADCAST, t)
    }

    fn op(&self, op: u8, t: &mut Tensor) -> Result<(), CollectiveError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = &state.poisoned {
            return Err(CollectiveError::Poisoned(why.clone()));
        }
        let kind = t.kind();
        let code = code_of_kind(kind).ok_or(CollectiveError::UnsupportedKind(kind))?;
        state.seq += 1;
        let numel = t.numel() as u64;
        let mine = Header {
            op,
            seq: state.seq,
            kind: code,
            numel,
            bytes: numel * kind.elt_size_in_bytes() as u64,
        };
        let result = match &mut state.links {
            Links::Root(peers) => root_op(peers, mine, t),
            Links::Leaf(root) => leaf_op(root, mine, t),
        };
        if let Err(e) = &result {
            state.poisoned = Some(e.to_string());
            // Wake the other ranks now rather than at their timeout: the run cannot go on.
            let streams: Vec<&TcpStream> = match &state.links {
                Links::Root(peers) => peers.iter().collect(),
                Links::Leaf(root) => vec![root],
            };
            for s in streams {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
        result
    }
}

fn connect_once(target: &str) -> io::Result<TcpStream> {
    let addrs: Vec<SocketAddr> = target.to_socket_addrs()?.collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn refuse(mut s: TcpStream, why: &str) {
    let mut msg = vec![1u8];
    msg.extend_from_slice(&(why.len() as u32).to_le_bytes());
    msg.extend_from_slice(why.as_bytes());
    let _ = s.write_all(&msg);
}

/// Reads a joining rank's handshake; `Ok(None)` when it was refused (the wait goes on for
/// the right process).
fn admit(
    mut s: TcpStream,
    from: SocketAddr,
    cfg: &TcpConfig,
    peers: &[Option<TcpStream>],
) -> Result<Option<(usize, TcpStream)>, CollectiveError> {
    let setup = s
        .set_nonblocking(false)
        .and_then(|()| s.set_nodelay(true))
        .and_then(|()| s.set_read_timeout(Some(Duration::from_secs(10))));
    if let Err(e) = setup {
        tracing::warn!(%from, "ignoring a connection: {e}");
        return Ok(None);
    }
    let mut magic = [0u8; 4];
    let hello = s.read_exact(&mut magic).and_then(|()| {
        let version = read_u32(&mut s)?;
        let rank = read_u32(&mut s)?;
        let world = read_u32(&mut s)?;
        let session = read_string(&mut s)?;
        Ok((version, rank as usize, world as usize, session))
    });
    let (version, rank, world, session) = match hello {
        Ok(h) if &magic == MAGIC => h,
        Ok(_) | Err(_) => {
            tracing::warn!(%from, "ignoring a connection that is not a Dinoflow rank");
            return Ok(None);
        }
    };
    let why = if version != VERSION {
        Some(format!(
            "protocol version {version}, rank 0 speaks {VERSION}"
        ))
    } else if world != cfg.world_size {
        Some(format!(
            "WORLD_SIZE={world} but rank 0 has WORLD_SIZE={}",
            cfg.world_size
        ))
    } else if session != cfg.session {
        Some(format!(
            "run {session:?} but rank 0 runs {:?} (a pod of another job or attempt)",
            cfg.session
        ))
    } else if rank == 0 || rank >= cfg.world_size {
        Some(format!("RANK={rank} is not in 1..{}", cfg.world_size))
    } else if peers[rank - 1].is_some() {
        Some(format!("RANK={rank} already joined"))
    } else {
        None
    };
    if let Some(why) = why {
        tracing::warn!(%from, "refusing a rank: {why}");
        refuse(s, &why);
        return Ok(None);
    }
    s.write_all(&[0u8])
        .map_err(|e| CollectiveError::Rendezvous(format!("rank {rank}: {e}")))?;
    tracing::debug!(rank, %from, "rank joined");
    Ok(Some((rank, s)))
}

fn io_err(peer: usize, what: &'static str) -> impl Fn(io::Error) -> CollectiveError {
    move |source| CollectiveError::Io { peer, what, source }
}

fn root_op(peers: &mut [TcpStream], mine: Header, t: &mut Tensor) -> Result<(), CollectiveError> {
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
    }
    Ok(())
}

fn leaf_op(root: &mut TcpStream, mine: Header, t: &mut Tensor) -> Result<(), CollectiveError> {
    if mine.op == OP_SUM {
        let bytes = bytes_of(t);
        mine.write(root)
            .and_then(|()| root.write_all(&bytes))
            .map_err(io_err(0, "sending to"))?;
    } else {
        Header { bytes: 0, ..mine }
            .write(root)
            .map_err(io_err(0, "sending to"))?;
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
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use super::*;
    use tch::Kind;

    fn config(world_size: usize, port: u16) -> TcpConfig {
        TcpConfig {
            rank: 0,
            world_size,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            session: "ml/tiny/0".into(),
            rendezvous_timeout: Duration::from_secs(20),
            op_timeout: Duration::from_secs(20),
        }
    }

    /// A group of `world_size` ranks in threads of this process.
    pub(crate) fn local_group(world_size: usize) -> Vec<Arc<TcpCollective>> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let leaves: Vec<_> = (1..world_size)
            .map(|rank| {
                std::thread::spawn(move || {
                    TcpCollective::rendezvous(&TcpConfig {
                        rank,
                        ..config(world_size, port)
                    })
                    .unwrap()
                })
            })
            .collect();
        let root = TcpCollective::serve(listener, &config(world_size, port)).unwrap();
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
