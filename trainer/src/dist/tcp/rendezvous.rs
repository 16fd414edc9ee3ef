//! Forming the group: every rank meets rank 0 on `MASTER_ADDR:MASTER_PORT` (authenticated, see
//! [`super::auth`]), rank 0 sends everyone the address list of the gang, and each rank opens
//! its ring link to its successor.
//!
//! Handshake, little endian. Rank 0 → joining rank: `DFLW`, u32 version, 32-byte challenge.
//! Joining rank → rank 0: `DFLW`, u32 version, u32 rank, u32 world size, u16 data port, u8
//! has-token, u32 length + session (job/attempt), 32-byte challenge of its own, 32-byte tag
//! (HMAC of all that and rank 0's challenge). Rank 0 → joining rank: u8 1 + u32 length +
//! reason (refused), or u8 0 + tag over both challenges (rank 0 holds the token too). Once all
//! joined, rank 0 → each rank: u8 0, 32-byte gang nonce, W × (u8 address length (0: rank 0's
//! own, as the joining rank reached it), address, u16 port), tag; or u8 1 + reason when ranks
//! never came. Ring link, rank r → r+1: `DFLR`, u32 r, u32 r+1, tag over the gang nonce;
//! reply u8 0.
//! (Over 500 lines: both sides of the handshake and the ring links are one protocol, best read
//! together.)
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::super::CollectiveError;
use super::TcpConfig;
use super::auth;
use super::wire::{MAGIC, RING_MAGIC, VERSION, read_string, read_u32, string_bytes};

/// The connections of one rank.
pub(super) struct Links {
    /// Rank 0: a stream per other rank (index = rank − 1); others: the stream to rank 0.
    /// Carries the star algorithm.
    pub(super) star: Star,
    /// `(to rank + 1, from rank − 1)`; `None` in a group of one.
    pub(super) ring: Option<(TcpStream, TcpStream)>,
}

pub(super) enum Star {
    Root(Vec<TcpStream>),
    Leaf(TcpStream),
}

impl Links {
    pub(super) fn streams(&self) -> Vec<&TcpStream> {
        let mut out: Vec<&TcpStream> = match &self.star {
            Star::Root(peers) => peers.iter().collect(),
            Star::Leaf(root) => vec![root],
        };
        if let Some((next, prev)) = &self.ring {
            out.extend([next, prev]);
        }
        out
    }
}

/// A joined rank, as rank 0 sees it.
struct Member {
    stream: TcpStream,
    ip: IpAddr,
    data_port: u16,
    nonce: [u8; auth::LEN],
}

fn rdzv(m: String) -> CollectiveError {
    CollectiveError::Rendezvous(m)
}

/// A listener for the ring link from this rank's predecessor, on an ephemeral port of every
/// interface of `like`'s family.
fn data_listener(like: IpAddr) -> Result<TcpListener, CollectiveError> {
    let any = match like {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    TcpListener::bind((any, 0)).map_err(|e| rdzv(format!("cannot listen for ring links: {e}")))
}

/// Rank 0 on a bound listener: admits the others, sends the address list, opens the ring.
pub(super) fn serve(listener: TcpListener, cfg: &TcpConfig) -> Result<Links, CollectiveError> {
    let deadline = Instant::now() + cfg.rendezvous_timeout;
    let local = listener
        .local_addr()
        .map_err(|e| rdzv(format!("listener: {e}")))?;
    let data = data_listener(local.ip())?;
    let data_port = data.local_addr().map_err(|e| rdzv(e.to_string()))?.port();
    let mut members: Vec<Option<Member>> = (1..cfg.world_size).map(|_| None).collect();
    listener
        .set_nonblocking(true)
        .map_err(|e| rdzv(format!("listener: {e}")))?;
    if !cfg.auth.is_set() && cfg.world_size > 1 {
        tracing::warn!(
            "no {} set: the rendezvous is not authenticated (any process that knows the job and attempt can join)",
            dinoflow_api::contract::PROGRESS_TOKEN
        );
    }
    while members.iter().any(Option::is_none) {
        match listener.accept() {
            Ok((stream, from)) => {
                if let Some((rank, m)) = admit(stream, from, cfg, &members) {
                    members[rank - 1] = Some(m);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = members
                        .iter()
                        .enumerate()
                        .filter(|(_, m)| m.is_none())
                        .map(|(i, _)| (i + 1).to_string())
                        .collect();
                    let why = format!(
                        "ranks {} did not join within {:?}; check that every pod of the gang is running and can reach rank 0 on MASTER_PORT={}",
                        missing.join(", "),
                        cfg.rendezvous_timeout,
                        cfg.master_port
                    );
                    // Tell the ranks that came, so their error names the missing ones too.
                    for m in members.iter_mut().flatten() {
                        let _ = m.stream.write_all(&refusal(&why));
                    }
                    return Err(rdzv(why));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(rdzv(format!("accept: {e}"))),
        }
    }
    let mut members: Vec<Member> = members.into_iter().flatten().collect();
    let gang = auth::challenge();
    let mut table = Vec::new();
    put_addr(&mut table, None, data_port);
    for m in &members {
        put_addr(&mut table, Some(m.ip), m.data_port);
    }
    for (i, m) in members.iter_mut().enumerate() {
        let mut msg = vec![0u8];
        msg.extend_from_slice(&gang);
        msg.extend_from_slice(&table);
        msg.extend_from_slice(&cfg.auth.tag(&[b"gang", &m.nonce, &gang, &table]));
        m.stream
            .write_all(&msg)
            .map_err(|e| rdzv(format!("sending the address list to rank {}: {e}", i + 1)))?;
    }
    let mut addrs = vec![SocketAddr::new(local.ip(), data_port)];
    addrs.extend(members.iter().map(|m| SocketAddr::new(m.ip, m.data_port)));
    let ring = ring_links(cfg, &data, &addrs, &gang, deadline)?;
    let peers: Vec<TcpStream> = members.into_iter().map(|m| m.stream).collect();
    for p in &peers {
        set_op_timeouts(p, cfg)?;
    }
    tracing::info!(world_size = cfg.world_size, "rank 0: every rank joined");
    Ok(Links {
        star: Star::Root(peers),
        ring,
    })
}

/// Appends one address-table entry; `None` is rank 0 itself.
fn put_addr(table: &mut Vec<u8>, ip: Option<IpAddr>, port: u16) {
    match ip {
        None => table.push(0),
        Some(IpAddr::V4(v4)) => {
            table.push(4);
            table.extend_from_slice(&v4.octets());
        }
        Some(IpAddr::V6(v6)) => {
            table.push(16);
            table.extend_from_slice(&v6.octets());
        }
    }
    table.extend_from_slice(&port.to_le_bytes());
}

fn refusal(why: &str) -> Vec<u8> {
    let mut msg = vec![1u8];
    msg.extend_from_slice(&string_bytes(why));
    msg
}

/// Reads a joining rank's handshake; `None` when it was refused or was not a rank at all (the
/// wait goes on for the right process).
fn admit(
    mut s: TcpStream,
    from: SocketAddr,
    cfg: &TcpConfig,
    members: &[Option<Member>],
) -> Option<(usize, Member)> {
    let root_nonce = auth::challenge();
    let mut challenge = MAGIC.to_vec();
    challenge.extend_from_slice(&VERSION.to_le_bytes());
    challenge.extend_from_slice(&root_nonce);
    let setup = s
        .set_nonblocking(false)
        .and_then(|()| s.set_nodelay(true))
        .and_then(|()| s.set_read_timeout(Some(Duration::from_secs(10))))
        .and_then(|()| s.set_write_timeout(Some(Duration::from_secs(10))))
        .and_then(|()| s.write_all(&challenge));
    if let Err(e) = setup {
        tracing::warn!(%from, "ignoring a connection: {e}");
        return None;
    }
    let mut magic = [0u8; 4];
    let hello = s.read_exact(&mut magic).and_then(|()| {
        let version = read_u32(&mut s)?;
        let rank = read_u32(&mut s)?;
        let world = read_u32(&mut s)?;
        let mut port = [0u8; 2];
        s.read_exact(&mut port)?;
        let mut has_token = [0u8; 1];
        s.read_exact(&mut has_token)?;
        let session = read_string(&mut s)?;
        let mut nonce = [0u8; auth::LEN];
        s.read_exact(&mut nonce)?;
        let mut tag = [0u8; auth::LEN];
        s.read_exact(&mut tag)?;
        Ok((
            version,
            rank,
            world,
            port,
            has_token[0] != 0,
            session,
            nonce,
            tag,
        ))
    });
    let (version, rank, world, port, has_token, session, nonce, tag) = match hello {
        Ok(h) if &magic == MAGIC => h,
        Ok(_) | Err(_) => {
            tracing::warn!(%from, "ignoring a connection that is not a Dinoflow rank");
            return None;
        }
    };
    let token = dinoflow_api::contract::PROGRESS_TOKEN;
    let signed = [
        &b"join"[..],
        &root_nonce,
        &version.to_le_bytes(),
        &rank.to_le_bytes(),
        &world.to_le_bytes(),
        &port,
        &[u8::from(has_token)],
        session.as_bytes(),
        &nonce,
    ];
    let (rank, world) = (rank as usize, world as usize);
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
    } else if has_token != cfg.auth.is_set() {
        Some(format!(
            "{token} is {} on this rank but {} on rank 0; every rank of a gang needs the same job token",
            if has_token { "set" } else { "unset" },
            if cfg.auth.is_set() { "set" } else { "unset" },
        ))
    } else if !cfg.auth.verify(&signed, &tag) {
        Some(format!(
            "the handshake is not signed with rank 0's job token ({token} differs: a pod of another job?)"
        ))
    } else if rank == 0 || rank >= cfg.world_size {
        Some(format!("RANK={rank} is not in 1..{}", cfg.world_size))
    } else if members[rank - 1].is_some() {
        Some(format!("RANK={rank} already joined"))
    } else {
        None
    };
    if let Some(why) = why {
        tracing::warn!(%from, "refusing a rank: {why}");
        let _ = s.write_all(&refusal(&why));
        return None;
    }
    let mut ok = vec![0u8];
    ok.extend_from_slice(&cfg.auth.tag(&[
        b"accept",
        &nonce,
        &root_nonce,
        session.as_bytes(),
        &(rank as u32).to_le_bytes(),
    ]));
    if let Err(e) = s.write_all(&ok) {
        tracing::warn!(%from, rank, "lost a joining rank: {e}");
        return None;
    }
    tracing::debug!(rank, %from, "rank joined");
    Some((
        rank,
        Member {
            stream: s,
            ip: from.ip(),
            data_port: u16::from_le_bytes(port),
            nonce,
        },
    ))
}

/// A rank other than 0: meets rank 0, receives the address list, opens the ring.
pub(super) fn join(cfg: &TcpConfig) -> Result<Links, CollectiveError> {
    let deadline = Instant::now() + cfg.rendezvous_timeout;
    let mut backoff = Duration::from_millis(100);
    let mut logged = false;
    let target = format!("{}:{}", cfg.master_addr, cfg.master_port);
    let mut s = loop {
        match connect_once(&target) {
            Ok(s) => break s,
            Err(e) => {
                if Instant::now() >= deadline {
                    return Err(rdzv(format!(
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
    let fail = |m: String| rdzv(format!("rank {}: {m}", cfg.rank));
    let root_addr = s.peer_addr().map_err(|e| fail(e.to_string()))?;
    // Which address MASTER_ADDR resolved to: where a gang's DNS went wrong, this says so.
    tracing::info!(rank = cfg.rank, master = %target, address = %root_addr, "reached rank 0");
    let data = data_listener(root_addr.ip())?;
    let data_port = data.local_addr().map_err(|e| fail(e.to_string()))?.port();
    s.set_nodelay(true)
        .and_then(|()| s.set_read_timeout(Some(cfg.rendezvous_timeout)))
        .and_then(|()| s.set_write_timeout(Some(cfg.rendezvous_timeout)))
        .map_err(|e| fail(format!("socket options: {e}")))?;

    let mut magic = [0u8; 4];
    let mut root_nonce = [0u8; auth::LEN];
    let version = s
        .read_exact(&mut magic)
        .and_then(|()| read_u32(&mut s))
        .and_then(|v| s.read_exact(&mut root_nonce).map(|()| v))
        .map_err(|e| fail(format!("handshake from rank 0: {e}")))?;
    if &magic != MAGIC {
        return Err(fail(format!(
            "{target} is not a Dinoflow rank 0 (check MASTER_ADDR/MASTER_PORT)"
        )));
    }
    if version != VERSION {
        return Err(fail(format!(
            "rank 0 speaks protocol version {version}, this rank {VERSION} (trainer binaries of different versions)"
        )));
    }
    let nonce = auth::challenge();
    let (rank, world) = (cfg.rank as u32, cfg.world_size as u32);
    let port = data_port.to_le_bytes();
    let has_token = u8::from(cfg.auth.is_set());
    let session = cfg.session.as_bytes();
    let tag = cfg.auth.tag(&[
        b"join",
        &root_nonce,
        &VERSION.to_le_bytes(),
        &rank.to_le_bytes(),
        &world.to_le_bytes(),
        &port,
        &[has_token],
        session,
        &nonce,
    ]);
    let mut hello = MAGIC.to_vec();
    for v in [VERSION, rank, world] {
        hello.extend_from_slice(&v.to_le_bytes());
    }
    hello.extend_from_slice(&port);
    hello.push(has_token);
    hello.extend_from_slice(&string_bytes(&cfg.session));
    hello.extend_from_slice(&nonce);
    hello.extend_from_slice(&tag);
    s.write_all(&hello)
        .map_err(|e| fail(format!("handshake: {e}")))?;
    let reply = read_status(&mut s).map_err(|e| fail(format!("handshake reply: {e}")))?;
    if let Err(why) = reply {
        return Err(fail(format!("rank 0 refused this rank: {why}")));
    }
    let mut accept = [0u8; auth::LEN];
    s.read_exact(&mut accept)
        .map_err(|e| fail(format!("handshake reply: {e}")))?;
    let signed = [
        &b"accept"[..],
        &nonce,
        &root_nonce,
        session,
        &rank.to_le_bytes(),
    ];
    if !cfg.auth.verify(&signed, &accept) {
        return Err(fail(format!(
            "rank 0 at {target} does not hold this job's token: not this job's rank 0"
        )));
    }

    // Rank 0 answers once every rank has joined (or it gave up on one).
    s.set_read_timeout(Some(cfg.rendezvous_timeout + Duration::from_secs(10)))
        .map_err(|e| fail(format!("socket options: {e}")))?;
    let list = read_status(&mut s).map_err(|e| fail(format!("waiting for the gang: {e}")))?;
    if let Err(why) = list {
        return Err(fail(format!("rank 0 gave up: {why}")));
    }
    let (gang, table, addrs) = read_table(&mut s, cfg.world_size, root_addr.ip())
        .map_err(|e| fail(format!("address list: {e}")))?;
    let mut tag = [0u8; auth::LEN];
    s.read_exact(&mut tag)
        .map_err(|e| fail(format!("address list: {e}")))?;
    if !cfg.auth.verify(&[b"gang", &nonce, &gang, &table], &tag) {
        return Err(fail(
            "the address list is not signed with the job token".into(),
        ));
    }
    let ring = ring_links(cfg, &data, &addrs, &gang, deadline)?;
    set_op_timeouts(&s, cfg)?;
    Ok(Links {
        star: Star::Leaf(s),
        ring,
    })
}

/// `Ok(Ok(()))` for status 0, `Ok(Err(reason))` for a refusal.
fn read_status(s: &mut TcpStream) -> io::Result<Result<(), String>> {
    let mut status = [0u8; 1];
    s.read_exact(&mut status)?;
    if status[0] == 0 {
        Ok(Ok(()))
    } else {
        Ok(Err(read_string(s).unwrap_or_default()))
    }
}

type Table = ([u8; auth::LEN], Vec<u8>, Vec<SocketAddr>);

fn read_table(s: &mut TcpStream, world: usize, root_ip: IpAddr) -> io::Result<Table> {
    let mut gang = [0u8; auth::LEN];
    s.read_exact(&mut gang)?;
    let mut raw = Vec::new();
    let mut addrs = Vec::with_capacity(world);
    for _ in 0..world {
        let mut len = [0u8; 1];
        s.read_exact(&mut len)?;
        raw.push(len[0]);
        let ip = match len[0] {
            0 => root_ip,
            4 => {
                let mut b = [0u8; 4];
                s.read_exact(&mut b)?;
                raw.extend_from_slice(&b);
                IpAddr::from(b)
            }
            16 => {
                let mut b = [0u8; 16];
                s.read_exact(&mut b)?;
                raw.extend_from_slice(&b);
                IpAddr::from(b)
            }
            n => return Err(io::Error::other(format!("bad address length {n}"))),
        };
        let mut port = [0u8; 2];
        s.read_exact(&mut port)?;
        raw.extend_from_slice(&port);
        addrs.push(SocketAddr::new(ip, u16::from_le_bytes(port)));
    }
    Ok((gang, raw, addrs))
}

fn ring_signed(gang: &[u8], from: usize, to: usize) -> [Vec<u8>; 4] {
    [
        b"ring".to_vec(),
        gang.to_vec(),
        (from as u32).to_le_bytes().to_vec(),
        (to as u32).to_le_bytes().to_vec(),
    ]
}

/// Connects to the successor and accepts the predecessor (both proven members of this gang by
/// the gang nonce); `None` for a group of one.
fn ring_links(
    cfg: &TcpConfig,
    data: &TcpListener,
    addrs: &[SocketAddr],
    gang: &[u8],
    deadline: Instant,
) -> Result<Option<(TcpStream, TcpStream)>, CollectiveError> {
    let w = cfg.world_size;
    if w < 2 {
        return Ok(None);
    }
    let (rank, next, prev) = (cfg.rank, (cfg.rank + 1) % w, (cfg.rank + w - 1) % w);
    let fail = |m: String| rdzv(format!("rank {rank}: {m}"));
    // The successor's listener was bound before the list went out: a refused connect is a
    // network problem, but retry briefly in case of a transient one.
    let mut out = loop {
        match TcpStream::connect_timeout(&addrs[next], Duration::from_secs(5)) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                return Err(fail(format!(
                    "cannot open the ring link to rank {next} at {}: {e} (pods of a gang must reach each other on any TCP port)",
                    addrs[next]
                )));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let signed = ring_signed(gang, rank, next);
    let parts: Vec<&[u8]> = signed.iter().map(Vec::as_slice).collect();
    let mut hello = RING_MAGIC.to_vec();
    hello.extend_from_slice(&(rank as u32).to_le_bytes());
    hello.extend_from_slice(&(next as u32).to_le_bytes());
    hello.extend_from_slice(&cfg.auth.tag(&parts));
    out.set_nodelay(true)
        .and_then(|()| out.set_read_timeout(Some(cfg.rendezvous_timeout)))
        .and_then(|()| out.write_all(&hello))
        .map_err(|e| fail(format!("ring link to rank {next}: {e}")))?;

    data.set_nonblocking(true)
        .map_err(|e| fail(format!("ring listener: {e}")))?;
    let inbound = loop {
        match data.accept() {
            Ok((s, from)) => match admit_ring(s, gang, cfg, prev) {
                Ok(s) => break s,
                Err(why) => tracing::warn!(%from, "refusing a ring link: {why}"),
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(fail(format!(
                        "rank {prev} did not open its ring link to this rank within {:?} (did it exit, or can it not reach this pod?)",
                        cfg.rendezvous_timeout
                    )));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(fail(format!("ring accept: {e}"))),
        }
    };
    let mut ack = [0u8; 1];
    out.read_exact(&mut ack)
        .map_err(|e| fail(format!("rank {next} did not accept the ring link: {e}")))?;
    if ack[0] != 0 {
        return Err(fail(format!("rank {next} refused the ring link")));
    }
    for s in [&out, &inbound] {
        set_op_timeouts(s, cfg)?;
    }
    Ok(Some((out, inbound)))
}

fn admit_ring(
    mut s: TcpStream,
    gang: &[u8],
    cfg: &TcpConfig,
    prev: usize,
) -> Result<TcpStream, String> {
    s.set_nonblocking(false)
        .and_then(|()| s.set_nodelay(true))
        .and_then(|()| s.set_read_timeout(Some(Duration::from_secs(10))))
        .map_err(|e| e.to_string())?;
    let mut magic = [0u8; 4];
    let mut tag = [0u8; auth::LEN];
    let (from, to) = s
        .read_exact(&mut magic)
        .and_then(|()| Ok((read_u32(&mut s)? as usize, read_u32(&mut s)? as usize)))
        .and_then(|ft| s.read_exact(&mut tag).map(|()| ft))
        .map_err(|e| e.to_string())?;
    let signed = ring_signed(gang, from, to);
    let parts: Vec<&[u8]> = signed.iter().map(Vec::as_slice).collect();
    if &magic != RING_MAGIC || from != prev || to != cfg.rank || !cfg.auth.verify(&parts, &tag) {
        return Err(format!(
            "not rank {prev} of this gang (claims rank {from} → {to})"
        ));
    }
    s.write_all(&[0]).map_err(|e| e.to_string())?;
    Ok(s)
}

fn set_op_timeouts(s: &TcpStream, cfg: &TcpConfig) -> Result<(), CollectiveError> {
    s.set_read_timeout(Some(cfg.op_timeout))
        .and_then(|()| s.set_write_timeout(Some(cfg.op_timeout)))
        .map_err(|e| rdzv(format!("rank {}: socket options: {e}", cfg.rank)))
}

fn connect_once(target: &str) -> io::Result<TcpStream> {
    use std::net::ToSocketAddrs;
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
