//! GPU check (`bench/gpu/check.sh` starts one process per rank). Uses `RANK`, `WORLD_SIZE`,
//! `MASTER_ADDR`, `MASTER_PORT` like the trainer, and `GPU_CHECK`:
//! - `collectives` (default): CUDA is visible to the trainer, and all-reduce, reduce-scatter,
//!   all-gather and broadcast of CUDA tensors through NCCL give the exact expected values (NCCL
//!   even at `WORLD_SIZE=1`), plus the time of a 64 MiB all-reduce;
//! - `shard-step`: three `SHARD_GRAD_OP` training steps of the model in `SHARD_STEP_CONFIG` on
//!   CUDA (synthetic crops, a different batch per rank): finite losses, every rank holding at
//!   most 1/W (+5%) of the replicated gradient and AdamW bytes, and bitwise-equal students on
//!   every rank afterwards. Over NCCL when every rank has its own GPU; when ranks share one
//!   (a one-GPU machine) over the TCP ring on the same CUDA tensors, as NCCL refuses two ranks
//!   on one device.
use std::sync::Arc;
use std::time::{Duration, Instant};

use dinoflow_trainer::config::{meta_arch_config, schedules_config};
use dinoflow_trainer::dist::nccl::NcclCollective;
use dinoflow_trainer::dist::tcp::{Algorithm, AuthKey, TcpCollective, TcpConfig};
use dinoflow_trainer::dist::{self, Collective};
use dinoflow_trainer::meta_arch::{MetaArch, SUBMODULES, TargetSource};
use dinoflow_trainer::optim::Schedules;
use dinoflow_trainer::synthetic;
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
    // GPU_CHECK_DEVICE=cpu: the dry run of `shard-step` on a CPU machine (check.sh DRY_RUN=1).
    let cpu = std::env::var("GPU_CHECK_DEVICE").as_deref() == Ok("cpu");
    assert!(
        cpu || tch::Cuda::is_available(),
        "CUDA is not visible to the trainer (libtorch CUDA build? driver? LD_LIBRARY_PATH?)"
    );
    let gpus = if cpu {
        0
    } else {
        tch::Cuda::device_count() as usize
    };
    let ordinal = rank % gpus.max(1);
    let device = if cpu {
        Device::Cpu
    } else {
        Device::Cuda(ordinal)
    };
    println!("rank {rank}/{world}: {gpus} CUDA device(s) visible, using {device:?}");
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
    match std::env::var("GPU_CHECK").as_deref() {
        Ok("collectives") | Err(_) => {
            let c = NcclCollective::init(tcp, ordinal, Duration::from_secs(120)).unwrap();
            collectives(&c, device);
        }
        Ok("shard-step") => {
            if world <= gpus {
                let c = NcclCollective::init(tcp, ordinal, Duration::from_secs(120)).unwrap();
                shard_step(&c, device);
            } else {
                println!(
                    "rank {rank}: {world} ranks on {gpus} GPU(s): TCP ring on {device:?} tensors"
                );
                shard_step(tcp.as_ref(), device);
            }
        }
        Ok(other) => panic!("GPU_CHECK must be collectives or shard-step, not {other}"),
    }
}

fn collectives(c: &NcclCollective, device: Device) {
    let (rank, world) = (c.rank(), c.world_size());
    let ordinal = match device {
        Device::Cuda(o) => o,
        _ => unreachable!("the check runs on CUDA"),
    };
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

fn shard_step(c: &dyn Collective, device: Device) {
    let (rank, world) = (c.rank(), c.world_size());
    let path = var("SHARD_STEP_CONFIG");
    let t = dinoflow_api::load::load_training_config(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .training;
    let arch_cfg = meta_arch_config(&t).unwrap();
    assert!(
        arch_cfg.parallel.any_sharded(),
        "{path} must set training.sharding.student.* to SHARD_GRAD_OP"
    );
    let patch = arch_cfg.student.patch_size as usize;
    tch::manual_seed(0);
    let mut arch = MetaArch::new(arch_cfg, device).unwrap();
    // Rank 0's weights everywhere, as the trainer starts (pretrain.rs).
    for vs in [&arch.student.vs, &arch.teacher.vs] {
        let sorted: std::collections::BTreeMap<_, _> = vs.variables().into_iter().collect();
        let mut vars: Vec<Tensor> = sorted.into_values().collect();
        dist::broadcast_parameters(c, &mut vars);
    }
    let schedules = Schedules::new(&schedules_config(&t, world)).unwrap();
    for it in 0..3 {
        let batch = synthetic::batch(&t, patch, (rank * 1000 + it) as u64, device).unwrap();
        let start = Instant::now();
        let out = arch
            .train_step(&batch, &schedules.at(it), c, TargetSource::Ema)
            .unwrap();
        let report = out.read(c);
        let l = &report.losses;
        let values = [
            l.dino_local_crops_loss,
            l.dino_global_crops_loss,
            l.koleo_loss,
            l.ibot_loss,
        ];
        assert!(
            values.iter().flatten().all(|v| v.is_finite()),
            "iteration {it}: a non-finite loss {values:?}"
        );
        println!(
            "rank {rank}: iteration {it} {:.3} s, losses {values:?}, update applied {}",
            start.elapsed().as_secs_f64(),
            report.applied
        );
    }
    assert!(
        arch.sharded.is_some() || world == 1,
        "the step did not shard"
    );
    // The replicated student's fp32 gradient and AdamW moments (m, v): 12 bytes a parameter.
    let params: usize = SUBMODULES
        .iter()
        .flat_map(|m| arch.student.submodule_variables(m))
        .map(|(_, v)| v.numel())
        .sum();
    let full = 12 * params as u64;
    let held = arch.memory_bytes().total();
    let ratio = held as f64 / full as f64;
    println!("rank {rank}: holds {held} of {full} gradient + AdamW bytes ({ratio:.4})");
    assert!(
        ratio <= 1.05 / world as f64,
        "rank {rank} holds {ratio:.4} of the replicated bytes, more than 1/{world} + 5%"
    );
    let digest = dist::digest(&arch.student.vs.variables().into_iter().collect::<Vec<_>>());
    let short = u64::from_str_radix(&digest[..16], 16).unwrap();
    dist::ensure_same_on_every_rank(c, short, "student digest").unwrap();
    c.barrier();
    println!("rank {rank}: SHARD_GRAD_OP step check passed (student sha256 {digest})");
}
