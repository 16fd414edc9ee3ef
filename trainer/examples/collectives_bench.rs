//! All-reduce benchmark of the TCP collective (`bench/collectives/run.sh`): the ring against
//! the star baseline, in the same run, on loopback, W ranks as threads of this process.
//!
//! For each world size and algorithm: form a group, one warm-up all-reduce, then `reps` timed
//! all-reduces of `mib` MiB of fp32 (time per rep = the slowest rank's, median over reps), and
//! the busiest rank's bytes sent by one all-reduce against the bandwidth-optimal 2·N·(W−1)/W.
//! Every result is checked against the exact sum, so a fast wrong answer cannot pass.
//!
//!     collectives_bench [--worlds 2,4,8] [--mib 64] [--reps 3]
use std::net::TcpListener;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use dinoflow_trainer::dist::tcp::{Algorithm, AuthKey, TcpCollective, TcpConfig};
use tch::{Device, Kind, Tensor};

fn config(rank: usize, world_size: usize, port: u16, algorithm: Algorithm) -> TcpConfig {
    TcpConfig {
        rank,
        world_size,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        session: "bench/collectives/0".into(),
        auth: AuthKey::new(Some("bench-token")),
        rendezvous_timeout: Duration::from_secs(60),
        op_timeout: Duration::from_secs(600),
        algorithm,
    }
}

fn group(world: usize, algorithm: Algorithm) -> Vec<Arc<TcpCollective>> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let leaves: Vec<_> = (1..world)
        .map(|rank| {
            std::thread::spawn(move || {
                TcpCollective::rendezvous(&config(rank, world, port, algorithm)).unwrap()
            })
        })
        .collect();
    let root = TcpCollective::serve(listener, &config(0, world, port, algorithm)).unwrap();
    let mut out = vec![Arc::new(root)];
    out.extend(leaves.into_iter().map(|h| Arc::new(h.join().unwrap())));
    out
}

struct Row {
    seconds: Vec<f64>,
    busiest_bytes: u64,
}

/// Rank `rank`'s input: integers below 2^24 in fp32, so every summation order is exact.
fn input(numel: i64, rank: usize) -> Tensor {
    Tensor::arange(numel, (Kind::Float, Device::Cpu)).remainder(1024) + rank as f64
}

fn run(world: usize, algorithm: Algorithm, numel: i64, reps: usize) -> Row {
    let ranks = group(world, algorithm);
    let start = Arc::new(Barrier::new(world));
    let handles: Vec<_> = ranks
        .into_iter()
        .enumerate()
        .map(|(rank, c)| {
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                let input = input(numel, rank);
                let want = Tensor::arange(numel, (Kind::Float, Device::Cpu)).remainder(1024)
                    * world as f64
                    + (world * (world - 1) / 2) as f64;
                let mut t = input.copy();
                c.try_all_reduce_sum(&mut t).unwrap(); // warm-up
                let mut times = Vec::new();
                let mut bytes = 0;
                for _ in 0..reps {
                    let mut t = input.copy();
                    start.wait();
                    let before = c.bytes_sent();
                    let t0 = Instant::now();
                    c.try_all_reduce_sum(&mut t).unwrap();
                    times.push(t0.elapsed().as_secs_f64());
                    bytes = c.bytes_sent() - before;
                    assert!(t.equal(&want), "wrong sum at rank {rank}");
                }
                (times, bytes)
            })
        })
        .collect();
    let per_rank: Vec<(Vec<f64>, u64)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let seconds = (0..reps)
        .map(|i| per_rank.iter().map(|(t, _)| t[i]).fold(0.0, f64::max))
        .collect();
    Row {
        seconds,
        busiest_bytes: per_rank.iter().map(|(_, b)| *b).max().unwrap(),
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut worlds = vec![2usize, 4, 8];
    let mut mib = 64usize;
    let mut reps = 3usize;
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let value = pair.get(1).expect("every flag takes a value");
        match pair[0].as_str() {
            "--worlds" => worlds = value.split(',').map(|w| w.parse().unwrap()).collect(),
            "--mib" => mib = value.parse().unwrap(),
            "--reps" => reps = value.parse().unwrap(),
            other => panic!("unknown flag {other}; use --worlds 2,4,8 --mib 64 --reps 3"),
        }
    }
    // One intra-op thread per rank: the ranks themselves are the parallelism.
    tch::set_num_threads(1);
    let n_bytes = (mib << 20) as u64;
    let numel = (n_bytes / 4) as i64;
    println!(
        "all-reduce of {mib} MiB fp32 on loopback, ranks as threads of one process, {reps} timed reps (slowest rank's time; median)"
    );
    println!();
    println!(
        "| W | algorithm | busiest rank sent (MiB) | 2·N·(W−1)/W (MiB) | sent / optimal | time, median (s) | times (s) | star time / ring time |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for &w in &worlds {
        let optimal = 2 * n_bytes * (w as u64 - 1) / w as u64;
        let star = run(w, Algorithm::Star, numel, reps);
        let ring = run(w, Algorithm::Ring, numel, reps);
        let speedup = median(&star.seconds) / median(&ring.seconds);
        for (name, row) in [("star (before)", &star), ("ring", &ring)] {
            let times: Vec<String> = row.seconds.iter().map(|s| format!("{s:.3}")).collect();
            println!(
                "| {w} | {name} | {:.1} | {:.1} | {:.3} | {:.3} | {} | {} |",
                row.busiest_bytes as f64 / (1 << 20) as f64,
                optimal as f64 / (1 << 20) as f64,
                row.busiest_bytes as f64 / optimal as f64,
                median(&row.seconds),
                times.join(", "),
                if name == "ring" {
                    format!("{speedup:.2}×")
                } else {
                    String::new()
                },
            );
        }
    }
}
