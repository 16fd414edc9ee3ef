//! Times Dinoflow's training step (`MetaArch::train_step`: forward, losses, backward,
//! clipping, AdamW, EMA) on synthetic, already-collated crops, as
//! `../shared/bench/official_dinov2_step.py` times the official one, and prints one JSON line
//! with the same keys (median and minimum step, images/s, peak memory, first and last losses)
//! plus the FLOPs per image of `flops.rs` and the MFU when `DINOFLOW_PEAK_FLOPS` is set.
//!
//! ```text
//! step_bench --config CONFIG.yaml [--steps 20] [--warmup 5] [--threads N] [--clock wall|process]
//! ```
//!
//! `--clock process` times each step in CPU seconds of the whole process (all threads, as
//! Python's `time.process_time`) instead of wall seconds: on a loaded shared machine the wall
//! time mostly measures the wait for a core, the CPU time the work done (CPU only).
//!
//! CONFIG is a `training:` block or a PretrainJob (presets resolve as for `train`); its
//! batch, crops, masks, precision and schedules are used, its data is not read. The device is
//! CUDA:0 when libtorch sees a GPU, else the CPU (`DINOFLOW_BENCH_DEVICE=cpu` forces it).
//! Each step reads its losses to the host, as the official timer does with `.item()`, so
//! every step ends with the device idle. Peak memory: on CUDA the device's used memory
//! (`cuMemGetInfo`: the caching allocator's reserved high-water, at least the allocated
//! peak, so never an under-estimate), sampled after every step; on the CPU the process's peak
//! resident set (`VmHWM`), as `torch.cuda.max_memory_allocated` is replaced by `ru_maxrss` in
//! the official CPU wrapper.

use std::time::Instant;

use dinoflow_trainer::config::{flops_per_image, meta_arch_config};
use dinoflow_trainer::dist::Single;
use dinoflow_trainer::meta_arch::{MetaArch, TargetSource};
use dinoflow_trainer::optim::{ScheduleValues, Schedules};
use dinoflow_trainer::synthetic;
use tch::Device;

struct Args {
    config: String,
    steps: usize,
    warmup: usize,
    threads: Option<i32>,
    process_clock: bool,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        config: String::new(),
        steps: 20,
        warmup: 5,
        threads: None,
        process_clock: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--config" => a.config = value()?,
            "--steps" => a.steps = value()?.parse().map_err(|e| format!("--steps: {e}"))?,
            "--warmup" => a.warmup = value()?.parse().map_err(|e| format!("--warmup: {e}"))?,
            "--threads" => {
                a.threads = Some(value()?.parse().map_err(|e| format!("--threads: {e}"))?)
            }
            "--clock" => match value()?.as_str() {
                "wall" => a.process_clock = false,
                "process" => a.process_clock = true,
                other => return Err(format!("--clock: wall or process, got {other}")),
            },
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    if a.config.is_empty() || a.steps == 0 {
        return Err(
            "usage: step_bench --config FILE [--steps N>0] [--warmup N] [--threads N] \
             [--clock wall|process]"
                .into(),
        );
    }
    Ok(a)
}

/// Device memory in use (bytes) on CUDA device 0, through the driver (the caching allocator
/// holds what it reserved, so after the steps this is its high-water mark).
fn cuda_used_bytes() -> Option<u64> {
    use cudarc::driver::result;
    // cudarc's dynamic loading panics when libcuda is missing: no figure then.
    std::panic::catch_unwind(|| {
        // Device 0's primary context, libtorch's own, bound to this thread for the query.
        let _ctx = cudarc::driver::CudaContext::new(0).ok()?;
        let (free, total) = result::mem_get_info().ok()?;
        Some((total - free) as u64)
    })
    .ok()
    .flatten()
}

/// CPU seconds used by all threads of this process so far (`/proc/self/task/*/schedstat`:
/// nanoseconds on a CPU), as `CLOCK_PROCESS_CPUTIME_ID`.
fn process_cpu_seconds() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    let ns: u64 = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    ns as f64 / 1e9
}

fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

fn main() -> Result<(), String> {
    // As the trainer does: libtorch sees CUDA only once libtorch_cuda.so is loaded.
    dinoflow_trainer::cuda_backend::load();
    let a = args()?;
    if let Some(n) = a.threads {
        tch::set_num_threads(n);
        tch::set_num_interop_threads(n);
    }
    let resolved =
        dinoflow_api::load::load_training_config(&a.config).map_err(|e| e.to_string())?;
    let t = resolved.training;
    let device = match std::env::var("DINOFLOW_BENCH_DEVICE").as_deref() {
        Ok("cpu") => Device::Cpu,
        _ => Device::cuda_if_available(),
    };
    let arch_cfg = meta_arch_config(&t).map_err(|e| e.to_string())?;
    let flops = flops_per_image(&t, &arch_cfg);
    let patch = arch_cfg.student.patch_size;
    tch::manual_seed(0);
    let mut arch = MetaArch::new(arch_cfg, device).map_err(|e| e.to_string())?;
    let backbone_params: usize = arch
        .student
        .submodule_variables("backbone")
        .iter()
        .map(|(_, v)| v.numel())
        .sum();
    let schedules = Schedules::new(&dinoflow_trainer::config::schedules_config(&t, 1))
        .map_err(|e| e.to_string())?;
    let batches = (0..4)
        .map(|i| synthetic::batch(&t, patch as usize, i, device))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let single = Single;
    let mut times = Vec::new();
    let mut losses = Vec::new();
    let mut peak_used = 0u64;
    // Wall seconds of the step's parts (CPU only: `StepPhases`), per timed step.
    let mut phases: Vec<[f64; 4]> = Vec::new();
    for it in 0..a.warmup + a.steps {
        let values: ScheduleValues = schedules.at(it);
        let data = &batches[it % batches.len()];
        if device.is_cuda() {
            tch::Cuda::synchronize(0);
        }
        let (t0, c0) = (Instant::now(), process_cpu_seconds());
        let out = arch
            .train_step(data, &values, &single, TargetSource::Ema)
            .map_err(|e| e.to_string())?;
        // The losses' host read waits for the step, as `.item()` does in the official timer.
        let report = out.read(&single);
        if device.is_cuda() {
            tch::Cuda::synchronize(0);
        }
        let dt = if a.process_clock {
            process_cpu_seconds() - c0
        } else {
            t0.elapsed().as_secs_f64()
        };
        if device.is_cuda() {
            peak_used = peak_used.max(cuda_used_bytes().unwrap_or(0));
        }
        losses.push(report.losses);
        if it >= a.warmup {
            times.push(dt);
            if let Some(p) = arch.last_step_phases {
                phases.push(
                    [p.forward, p.backward, p.communication, p.optimizer].map(|d| d.as_secs_f64()),
                );
            }
        }
    }
    times.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    let batch_size = f64::from(t.train.batch_size_per_gpu);
    let images_per_s = batch_size / med;
    let peak = if device.is_cuda() {
        Some(peak_used)
    } else {
        peak_rss_bytes()
    };
    let peak_flops = std::env::var("DINOFLOW_PEAK_FLOPS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok());
    let loss_json = |l: &dinoflow_trainer::meta_arch::LossValues| {
        serde_json::json!({
            "dino_local_crops_loss": l.dino_local_crops_loss.map(|v| round(v, 4)),
            "dino_global_crops_loss": l.dino_global_crops_loss.map(|v| round(v, 4)),
            "koleo_loss": l.koleo_loss.map(|v| round(v, 4)),
            "ibot_loss": l.ibot_loss.map(|v| round(v, 4)),
        })
    };
    let phase_median = |i: usize| {
        let mut v: Vec<f64> = phases.iter().map(|p| p[i]).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).map(|x| round(*x, 4))
    };
    let line = serde_json::json!({
        "impl": "dinoflow",
        "config": a.config,
        "embed_dim": arch.config.student.embed_dim,
        "patch": patch,
        "batch_per_gpu": t.train.batch_size_per_gpu,
        "local_crops": t.crops.local_crops_number,
        "local_size": t.crops.local_crops_size,
        "precision": format!("{:?}", arch.config.precision),
        "backbone_params_M": round(backbone_params as f64 / 1e6, 1),
        "step_s_median": round(med, 4),
        "step_s_min": round(times[0], 4),
        "images_per_s": round(images_per_s, 3),
        "peak_mem_GiB": peak.map(|b| round(b as f64 / f64::from(1u32 << 30), 2)),
        "peak_mem_kind": if device.is_cuda() { "cuda used (cuMemGetInfo)" } else { "peak RSS" },
        "flops_per_image_G": round(flops / 1e9, 2),
        "mfu": peak_flops.map(|p| round(flops * images_per_s / p, 4)),
        "phases_wall_s_median": (!phases.is_empty()).then(|| serde_json::json!({
            "forward": phase_median(0),
            "backward": phase_median(1),
            "communication": phase_median(2),
            "optimizer": phase_median(3),
        })),
        "clock": if a.process_clock { "process CPU s" } else { "wall s" },
        "device": format!("{device:?}"),
        "threads": tch::get_num_threads(),
        "loss_first": loss_json(&losses[0]),
        "loss_last": loss_json(&losses[losses.len() - 1]),
    });
    println!("{line}");
    Ok(())
}
