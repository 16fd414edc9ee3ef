//! GPU check of the NCCL backend (`bench/gpu/check.sh` starts one process per GPU): CUDA is
//! visible to the trainer, and all-reduce, reduce-scatter, all-gather and broadcast of CUDA
//! tensors through NCCL give the exact expected values. Uses `RANK`, `WORLD_SIZE`,
//! `MASTER_ADDR`, `MASTER_PORT` like the trainer; NCCL is used even at `WORLD_SIZE=1`.
use std::sync::Arc;
use std::time::{Duration, Instant};

use dinoflow_trainer::dist::Collective;
use dinoflow_trainer::dist::nccl::NcclCollective;
use dinoflow_trainer::dist::tcp::{Algorithm, AuthKey, TcpCollective, TcpConfig};
use tch::{Device, Kind, Tensor};

fn var(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} must be set (bench/gpu/check.sh sets it)"))
}

fn main() {
    // As the trainer does: libtorch sees CUDA only once libtorch_cuda.so is loaded.
    dinoflow_trainer::cuda_backend::load();
    let rank: usize = var("RANK").parse().unwrap();
    let world: usize = var("WORLD_SIZE").parse().unwrap();
    assert!(
        tch::Cuda::is_available(),
        "CUDA is not visible to the trainer (libtorch CUDA build? driver?)"
    );
    let gpus = tch::Cuda::device_count() as usize;
    let ordinal = rank % gpus;
    let device = Device::Cuda(ordinal);
    println!("rank {rank}/{world}: {gpus} CUDA device(s) visible, using cuda:{ordinal}");
    let tcp = Arc::new(
        TcpCollective::rendezvous(&TcpConfig {
            rank,
            world_size: world,
            master_addr: var("MASTER_ADDR"),
            master_port: var("MASTER_PORT").parse().unwrap(),
            session: "bench/gpu/0".into(),
            auth: AuthKey::new(std::env::var("DINOFLOW_PROGRESS_TOKEN").ok().as_deref()),
            rendezvous_timeout: Duration::from_secs(120),
            op_timeout: Duration::from_secs(120),
            algorithm: Algorithm::Ring,
        })
        .unwrap(),
    );
    let c = NcclCollective::init(tcp, ordinal, Duration::from_secs(120)).unwrap();
    let w = world as f64;
    let r = rank as f64;
    for kind in [Kind::Float, Kind::BFloat16, Kind::Int64] {
        // all-reduce: rank r holds r + i; the sum is W·i + W(W−1)/2.
        let n = 1_000_003;
        let i = Tensor::arange(n, (Kind::Int64, device)).remainder(128);
        let mut t = (&i + rank as i64).to_kind(kind);
        c.all_reduce_sum(&mut t);
        let want = (&i * world as i64 + (world * (world - 1) / 2) as i64).to_kind(kind);
        assert!(t.equal(&want), "all-reduce {kind:?}");
        // reduce-scatter: W·3 elements of value r → this rank's 3 hold the sum of ranks.
        let input = Tensor::full([3 * world as i64], r, (kind, device));
        let mine = c.reduce_scatter_sum(&input);
        assert!(
            mine.equal(&Tensor::full([3], w * (w - 1.0) / 2.0, (kind, device))),
            "reduce-scatter {kind:?}"
        );
        // all-gather: rank r's shard [r, r] lands at [2r, 2r+2).
        let all = c.all_gather(&Tensor::full([2], r, (kind, device)));
        let want = Tensor::arange(world as i64, (Kind::Int64, device))
            .repeat_interleave_self_int(2, 0, None)
            .to_kind(kind);
        assert!(all.equal(&want), "all-gather {kind:?}");
        let mut b = Tensor::full([5], r + 7.0, (kind, device));
        c.broadcast_from_root(&mut b);
        assert!(
            b.equal(&Tensor::full([5], 7.0, (kind, device))),
            "broadcast {kind:?}"
        );
        println!("rank {rank}: {kind:?} all-reduce, reduce-scatter, all-gather, broadcast ok");
    }
    // 64 MiB fp32 all-reduce, timed.
    let mut t = Tensor::ones([16 << 20], (Kind::Float, device));
    c.all_reduce_sum(&mut t);
    tch::Cuda::synchronize(ordinal as i64);
    let start = Instant::now();
    for _ in 0..10 {
        c.all_reduce_sum(&mut t);
    }
    let s = start.elapsed().as_secs_f64() / 10.0;
    println!(
        "rank {rank}: 64 MiB fp32 all-reduce {:.2} ms, bus bandwidth {:.1} GB/s",
        s * 1e3,
        2.0 * (w - 1.0) / w * 64.0 * 1.048576e6 / s / 1e9
    );
    c.barrier();
    println!("rank {rank}: NCCL check passed");
}
