//! The ring algorithms and the authenticated rendezvous, end to end over loopback.
use std::net::TcpListener;
use std::time::Duration;

use tch::{Device, Kind, Tensor};

use super::tests::{group_with, local_group, on_every_rank};
use super::wire::{Header, bytes_of};
use super::{Algorithm, AuthKey, TcpCollective, TcpConfig};
use crate::dist::CollectiveError;

/// Rank `r`'s input: values whose sums are exact in every dtype used (multiples of 1/4).
fn input(rank: usize, len: i64, kind: Kind) -> Tensor {
    let i = Tensor::arange(len, (Kind::Double, Device::Cpu));
    ((i.remainder(97) * 0.25) - 3.0 + 1.5 * rank as f64).to_kind(kind)
}

fn expected(world: usize, len: i64, kind: Kind) -> Tensor {
    (0..world)
        .map(|r| input(r, len, kind))
        .reduce(|a, b| a + b)
        .unwrap()
}

#[test]
fn ring_all_reduce_sums_odd_lengths_and_dtypes_at_two_three_and_four_ranks() {
    // Lengths below, at and above the world size, not divisible by it, and one that spans
    // several segments.
    let cases = [
        (Kind::Float, 1),
        (Kind::Float, 7),
        (Kind::Float, 1001),
        (Kind::Float, 300_001),
        (Kind::Double, 13),
        (Kind::Int64, 5),
        (Kind::Int64, 262_147),
    ];
    for world in [2, 3, 4] {
        let group = local_group(world);
        let out = on_every_rank(&group, move |rank, c| {
            cases
                .iter()
                .map(|&(kind, len)| {
                    let mut t = input(rank, len, kind);
                    c.try_all_reduce_sum(&mut t).unwrap();
                    bytes_of(&t)
                })
                .collect::<Vec<_>>()
        });
        for (i, &(kind, len)) in cases.iter().enumerate() {
            let want = bytes_of(&expected(world, len, kind));
            for (rank, o) in out.iter().enumerate() {
                assert!(o[i] == want, "W={world} rank {rank}: {kind:?} of {len}");
            }
        }
    }
}

#[test]
fn every_rank_ends_with_bitwise_the_same_sum_of_inexact_values() {
    for world in [3, 4] {
        let group = local_group(world);
        let out = on_every_rank(&group, |rank, c| {
            tch::manual_seed(rank as i64);
            let mut t = Tensor::randn([100_003], (Kind::Float, Device::Cpu)) * 1e3;
            let mut h = Tensor::randn([4_099], (Kind::Float, Device::Cpu)).to_kind(Kind::Half);
            c.try_all_reduce_sum(&mut t).unwrap();
            c.try_all_reduce_sum(&mut h).unwrap();
            (bytes_of(&t), bytes_of(&h))
        });
        assert!(out.iter().all(|o| *o == out[0]), "W={world}");
    }
}

#[test]
fn each_rank_sends_two_n_w_minus_one_over_w_bytes_per_all_reduce() {
    let world = 4;
    let n_bytes = 1 << 22; // 4 MiB of f32, divisible by W
    let group = local_group(world);
    let out = on_every_rank(&group, move |rank, c| {
        let before = c.bytes_sent();
        let mut t = input(rank, (n_bytes / 4) as i64, Kind::Float);
        c.try_all_reduce_sum(&mut t).unwrap();
        let all_reduce = c.bytes_sent() - before;
        let before = c.bytes_sent();
        let _ = c.try_reduce_scatter_sum(&t).unwrap();
        let reduce_scatter = c.bytes_sent() - before;
        let before = c.bytes_sent();
        let _ = c
            .try_all_gather(&t.narrow(0, 0, (n_bytes / 4 / world) as i64))
            .unwrap();
        (all_reduce, reduce_scatter, c.bytes_sent() - before)
    });
    let header = Header::LEN as u64;
    let share = (n_bytes / world) as u64 * (world as u64 - 1);
    for (ar, rs, ag) in out {
        assert_eq!(ar, 2 * share + header);
        assert_eq!(rs, share + header);
        assert_eq!(ag, share + header);
    }
}

#[test]
fn the_star_baseline_moves_everything_through_rank_zero_with_the_same_result() {
    let world = 3;
    let len = 10_001;
    let group = group_with(world, |c| c.algorithm = Algorithm::Star);
    let out = on_every_rank(&group, move |rank, c| {
        let mut t = input(rank, len, Kind::Float);
        c.try_all_reduce_sum(&mut t).unwrap();
        let rs = c
            .try_reduce_scatter_sum(&input(rank, 6, Kind::Float))
            .unwrap();
        let ag = c
            .try_all_gather(&Tensor::from_slice(&[rank as i64]))
            .unwrap();
        c.try_barrier().unwrap();
        (bytes_of(&t), c.bytes_sent(), bytes_of(&rs), bytes_of(&ag))
    });
    let n = (len * 4) as u64;
    let h = Header::LEN as u64;
    assert_eq!(out[0].0, bytes_of(&expected(world, len, Kind::Float)));
    assert!(out.iter().all(|o| o.0 == out[0].0));
    // Rank 0 sent the result to both others; the leaves their input once.
    assert!(out[0].1 >= 2 * (n + h), "{}", out[0].1);
    assert!(out[1].1 >= n + h && out[1].1 < 2 * n);
    assert_eq!(
        out[1].2,
        bytes_of(&expected(world, 6, Kind::Float).narrow(0, 2, 2))
    );
    assert_eq!(out[2].3, bytes_of(&Tensor::from_slice(&[0i64, 1, 2])));
}

#[test]
fn broadcast_reduce_scatter_all_gather_and_barrier_on_the_ring() {
    let world = 4;
    let group = local_group(world);
    let out = on_every_rank(&group, move |rank, c| {
        let mut big = input(rank, 700_001, Kind::Float);
        c.try_broadcast_from_root(&mut big).unwrap();
        let rs = c
            .try_reduce_scatter_sum(&input(rank, 4 * 3, Kind::Double))
            .unwrap();
        let ag = c
            .try_all_gather(&Tensor::from_slice(&[rank as i64 * 10, -1]))
            .unwrap();
        c.try_barrier().unwrap();
        (
            bytes_of(&big),
            bytes_of(&rs),
            Vec::<i64>::try_from(&ag).unwrap(),
        )
    });
    let sums = expected(world, 12, Kind::Double);
    for (rank, (big, rs, ag)) in out.iter().enumerate() {
        assert!(
            *big == bytes_of(&input(0, 700_001, Kind::Float)),
            "rank {rank}"
        );
        assert_eq!(*rs, bytes_of(&sums.narrow(0, 3 * rank as i64, 3)));
        assert_eq!(*ag, vec![0, -1, 10, -1, 20, -1, 30, -1]);
    }
}

#[test]
fn a_barrier_waits_for_the_slowest_rank() {
    let group = local_group(3);
    let out = on_every_rank(&group, |rank, c| {
        if rank == 2 {
            std::thread::sleep(Duration::from_millis(300));
        }
        let start = std::time::Instant::now();
        c.try_barrier().unwrap();
        start.elapsed()
    });
    assert!(out[0] >= Duration::from_millis(250), "{:?}", out[0]);
    assert!(out[1] >= Duration::from_millis(250), "{:?}", out[1]);
}

#[test]
fn ranks_issuing_different_collectives_on_the_ring_all_fail() {
    let group = local_group(3);
    let out = on_every_rank(&group, |rank, c| {
        let t = Tensor::zeros([6], (Kind::Float, Device::Cpu));
        if rank == 2 {
            c.try_all_gather(&t).map(|_| ()).map_err(|e| e.to_string())
        } else {
            c.try_all_reduce_sum(&mut t.copy())
                .map_err(|e| e.to_string())
        }
    });
    // Rank 0's predecessor is rank 2, which runs something else.
    let root = out[0].as_ref().unwrap_err();
    assert!(
        root.contains("rank 2 runs #1 all_gather of 6 Float")
            && root.contains("this rank #1 all_reduce_sum of 6 Float"),
        "{root}"
    );
    assert!(out[1].is_err() && out[2].is_err());
}

#[test]
fn a_dead_ring_neighbour_is_named_and_a_hung_one_times_out() {
    let mut group = local_group(3);
    drop(group.pop());
    let out = on_every_rank(&group, |_, c| {
        let mut t = Tensor::ones([4], (Kind::Float, Device::Cpu));
        c.try_all_reduce_sum(&mut t).unwrap_err().to_string()
    });
    assert!(out[0].contains("rank 2"), "{}", out[0]);

    let group = group_with(2, |c| c.op_timeout = Duration::from_millis(300));
    let start = std::time::Instant::now();
    let mut t = Tensor::ones([4], (Kind::Float, Device::Cpu));
    let err = group[0].try_all_reduce_sum(&mut t).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(matches!(&err, CollectiveError::Io { peer: 1, .. }), "{err}");
}

fn config(rank: usize, world_size: usize, port: u16, token: Option<&str>) -> TcpConfig {
    TcpConfig {
        rank,
        world_size,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        session: "ml/tiny/0".into(),
        auth: AuthKey::new(token),
        rendezvous_timeout: Duration::from_secs(20),
        op_timeout: Duration::from_secs(20),
        algorithm: Algorithm::Ring,
    }
}

/// Rank 0 with `root_token`; a rank 1 with `intruder` tries first, then the right one joins.
fn intruder_then_member(
    root_token: Option<&'static str>,
    intruder: Option<&'static str>,
) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let root = std::thread::spawn(move || {
        TcpCollective::serve(listener, &config(0, 2, port, root_token)).map(|_| ())
    });
    let err = TcpCollective::rendezvous(&config(1, 2, port, intruder))
        .map(|_| ())
        .unwrap_err()
        .to_string();
    let good = TcpCollective::rendezvous(&config(1, 2, port, root_token)).unwrap();
    root.join().unwrap().unwrap();
    let mut t = Tensor::from_slice(&[1.0f32]);
    drop(good.try_all_reduce_sum(&mut t));
    err
}

#[test]
fn a_rank_with_another_jobs_token_is_refused_and_the_right_one_still_joins() {
    let err = intruder_then_member(Some("job-a-token"), Some("job-b-token"));
    assert!(err.contains("rank 0 refused this rank"), "{err}");
    assert!(err.contains("job token"), "{err}");
    assert!(
        !err.contains("job-a-token") && !err.contains("job-b-token"),
        "{err}"
    );
}

#[test]
fn every_rank_needs_the_token_when_rank_zero_has_one() {
    let err = intruder_then_member(Some("job-a-token"), None);
    assert!(
        err.contains("DINOFLOW_PROGRESS_TOKEN is unset on this rank but set on rank 0"),
        "{err}"
    );
}

#[test]
fn a_gang_sharing_a_token_works() {
    let group = group_with(3, |c| c.auth = AuthKey::new(Some("s3cret")));
    let out = on_every_rank(&group, |rank, c| {
        let mut t = Tensor::from_slice(&[rank as f64]);
        c.try_all_reduce_sum(&mut t).unwrap();
        t.double_value(&[0])
    });
    assert_eq!(out, vec![3.0, 3.0, 3.0]);
}

#[test]
fn a_joined_rank_learns_which_ranks_never_came() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let root = std::thread::spawn(move || {
        let cfg = TcpConfig {
            rendezvous_timeout: Duration::from_millis(500),
            ..config(0, 3, port, None)
        };
        TcpCollective::serve(listener, &cfg).map(|_| ())
    });
    let err = TcpCollective::rendezvous(&config(1, 3, port, None))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("rank 0 gave up: ranks 2 did not join"),
        "{err}"
    );
    assert!(root.join().unwrap().is_err());
}
