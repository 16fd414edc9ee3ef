//! `loader-bench decoders DIR` — JPEG decode throughput of the candidate decoders.
//! `loader-bench loader DIR [--workers N] [--batch-size B] [--batches K] [--local-crops L]` —
//! images/s of the Dinoflow loader (2 global 224 + L local 96 crops) on an image folder.
//! Both print one JSON object per line; `run.sh` puts them next to the Python reference.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use dinoflow_trainer::data::{
    Dataset, Loader, LoaderConfig, MultiCropConfig, dataset::ImageFolder, decode::decode_rgb,
};
use serde_json::json;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("decoders") if args.len() == 2 => decoders(Path::new(&args[1])),
        Some("loader") if args.len() >= 2 => loader(Path::new(&args[1]), &args[2..]),
        _ => Err("usage: loader-bench decoders DIR | loader DIR [--workers N] [--batch-size B] [--batches K] [--local-crops L]".into()),
    };
    if let Err(e) = result {
        eprintln!("loader-bench: {e}");
        std::process::exit(2);
    }
}

fn jpeg_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jpg"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("no .jpg files in {}", dir.display()));
    }
    Ok(files)
}

/// Times each decoder over the same in-memory files (best of 3 passes, one thread).
fn decoders(dir: &Path) -> Result<(), String> {
    let blobs: Vec<Vec<u8>> = jpeg_files(dir)?
        .iter()
        .map(std::fs::read)
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    type Decode = fn(&[u8]) -> usize;
    let candidates: [(&str, Decode); 3] = [
        ("zune-jpeg (strict, direct; used)", |b| {
            decode_rgb(b, "bench").map(|i| i.len()).unwrap_or(0)
        }),
        ("image::load_from_memory (zune-jpeg inside)", |b| {
            image::load_from_memory(b)
                .map(|i| i.into_rgb8().len())
                .unwrap_or(0)
        }),
        ("jpeg-decoder", |b| {
            jpeg_decoder::Decoder::new(b)
                .decode()
                .map(|v| v.len())
                .unwrap_or(0)
        }),
    ];
    for (name, decode) in candidates {
        // CPU time over 3 passes: wall time on a shared machine measures the neighbours.
        let cpu0 = process_cpu_seconds()?;
        let mut bytes = 0;
        for _ in 0..3 {
            bytes = blobs.iter().map(|b| decode(b)).sum::<usize>();
        }
        let cpu = process_cpu_seconds()? - cpu0;
        if bytes == 0 {
            return Err(format!("{name} decoded nothing"));
        }
        let n = 3 * blobs.len();
        println!(
            "{}",
            json!({"side": "rust", "what": "decode", "decoder": name, "images": n, "images_per_cpu_second": n as f64 / cpu})
        );
    }
    Ok(())
}

fn flag(rest: &[String], name: &str, default: usize) -> Result<usize, String> {
    match rest.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => rest
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{name} needs a number")),
    }
}

fn loader(dir: &Path, rest: &[String]) -> Result<(), String> {
    let workers = flag(rest, "--workers", 1)?;
    let batch_size = flag(rest, "--batch-size", 16)?;
    let batches = flag(rest, "--batches", 10)?;
    let local = flag(rest, "--local-crops", 8)?;
    let dataset: Arc<dyn Dataset> = Arc::new(ImageFolder::open(dir).map_err(|e| e.to_string())?);
    let cfg = LoaderConfig {
        batch_size,
        num_workers: workers,
        prefetch: workers + 1,
        crops: MultiCropConfig {
            local_crops_number: local,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut loader = Loader::new(dataset, cfg).map_err(|e| e.to_string())?;
    // The first batch pays for thread start-up and page cache; it is not timed.
    loader.next_batch().map_err(|e| e.to_string())?;
    let (t, cpu0) = (Instant::now(), process_cpu_seconds()?);
    for _ in 0..batches {
        loader.next_batch().map_err(|e| e.to_string())?;
    }
    let (secs, cpu) = (t.elapsed().as_secs_f64(), process_cpu_seconds()? - cpu0);
    let images = (batches * batch_size) as f64;
    println!(
        "{}",
        json!({"side": "rust", "what": "loader", "workers": workers, "images": images, "wall_seconds": secs,
               "cpu_seconds": cpu, "images_per_s": images / secs, "images_per_cpu_second": images / cpu})
    );
    Ok(())
}

/// User + system CPU time of the whole process (all threads), from `/proc/self/stat`. On a
/// shared machine wall time measures the neighbours; CPU time measures the work ("per core").
fn process_cpu_seconds() -> Result<f64, String> {
    let stat =
        std::fs::read_to_string("/proc/self/stat").map_err(|e| format!("/proc/self/stat: {e}"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or("unexpected /proc/self/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or("unexpected /proc/self/stat")
    };
    // Linux reports these in USER_HZ, which is 100 on every mainstream configuration.
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}
