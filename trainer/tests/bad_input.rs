//! Bad input, end to end through the binary: one table of broken inputs, each run against an
//! output directory that already holds an earlier run (a verified checkpoint at iteration 3 and
//! its metrics.jsonl). Every case must give its documented behaviour (README, "Bad input") and
//! leave what was written before intact.
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use image::{ImageFormat, Rgb, RgbImage};

mod common;
use common::TinyJob;

/// Exit codes of the contract (`dinoflow_api::exit_codes`).
const DONE: i32 = 0;
const PERMANENT: i32 = 78;
/// Any other code is retried by the operator; the trainer uses 1.
const RETRYABLE: i32 = 1;

fn config(dir: &Path, kind: &str, data: &Path) -> PathBuf {
    TinyJob {
        data_kind: kind.into(),
        data_path: data.display().to_string(),
        ..TinyJob::default()
    }
    .write(dir, &format!("{kind}.yaml"))
}

fn train(config: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dinoflow-trainer"))
        .arg("train")
        .arg("--config")
        .arg(config)
        .arg("--output-dir")
        .arg(out)
        .args(extra)
        .env("DINOFLOW_THREADS", "1")
        .env("OMP_NUM_THREADS", "1")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("the trainer binary runs")
}

fn encoded(seed: u32, format: ImageFormat) -> Vec<u8> {
    let img = RgbImage::from_fn(40, 36, |x, y| {
        Rgb([
            (x * 5 + seed * 31) as u8,
            (y * 7 + seed * 11) as u8,
            ((x + y) * 3) as u8,
        ])
    });
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// Eight good images in two class folders, half PNG, half JPEG.
fn good_folder(data: &Path) {
    for (c, class) in ["a", "b"].iter().enumerate() {
        std::fs::create_dir_all(data.join(class)).unwrap();
        for i in 0..4 {
            let seed = (c * 4 + i) as u32;
            let (ext, format) = if i % 2 == 0 {
                ("png", ImageFormat::Png)
            } else {
                ("jpg", ImageFormat::Jpeg)
            };
            std::fs::write(
                data.join(class).join(format!("{i}.{ext}")),
                encoded(seed, format),
            )
            .unwrap();
        }
    }
}

/// A WebDataset shard of `n` JPEGs with `.cls` labels.
fn shard(n: u32, first: u32) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: String, data: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        b.append_data(&mut header, name, data).unwrap();
    };
    for i in first..first + n {
        add(format!("{i:04}.jpg"), &encoded(i, ImageFormat::Jpeg));
        add(format!("{i:04}.cls"), format!("{}\n", i % 2).as_bytes());
    }
    b.into_inner().unwrap()
}

fn good_shards(data: &Path) {
    std::fs::create_dir_all(data).unwrap();
    std::fs::write(data.join("shard-0000.tar"), shard(8, 0)).unwrap();
}

fn reset(data: &Path, kind: &str) {
    if data.exists() {
        std::fs::remove_dir_all(data).unwrap();
    }
    match kind {
        "webdataset" => good_shards(data),
        _ => good_folder(data),
    }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Every file under `dir`, relative, with its bytes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).unwrap().to_path_buf();
                out.push((rel, std::fs::read(&path).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// What was written before is still there: every checkpoint file byte for byte, and
/// metrics.jsonl still starts with the earlier lines.
fn assert_kept(case: &str, before: &[(PathBuf, Vec<u8>)], out: &Path) {
    for (rel, bytes) in before {
        let now = std::fs::read(out.join(rel))
            .unwrap_or_else(|e| panic!("{case}: {} lost: {e}", rel.display()));
        if rel.ends_with("metrics.jsonl") {
            assert!(now.starts_with(bytes), "{case}: metrics.jsonl rewritten");
        } else {
            assert!(&now == bytes, "{case}: {} changed", rel.display());
        }
    }
}

fn ckpt(out: &Path, it: u64) -> PathBuf {
    out.join("checkpoints").join(format!("ckpt-{it:09}"))
}

/// Iterations of the train lines of metrics.jsonl, in file order.
fn iterations(out: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "train")
        .filter_map(|v| v["iteration"].as_u64())
        .collect()
}

/// `skipped_images` of the last train line of metrics.jsonl.
fn skipped_images(out: &Path) -> u64 {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .rfind(|v| v["type"] == "train")
        .and_then(|v| v["skipped_images"].as_u64())
        .expect("train lines carry skipped_images")
}

/// A small tmpfs mounted for the test's lifetime; None (with the reason) where this process
/// may not mount.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, options: &str) -> Result<Self, String> {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if out.status.success() {
            Ok(Self(dir.to_path_buf()))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    fn remount(&self, options: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success(), "remount {options} failed");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Fills the file system holding `dir` up to `leave` free bytes.
fn fill(dir: &Path, leave: u64) {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 4096];
    let mut written = 0u64;
    while f.write_all(&chunk).is_ok() {
        written += chunk.len() as u64;
    }
    drop(f);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(written.saturating_sub(leave)).unwrap();
}

enum Expect {
    /// Exit 78 before any training; stderr holds every string.
    Permanent(Vec<String>),
    /// The run finishes (iteration 6 checkpointed); `logged_once` appears exactly once in
    /// stderr, and `skipped` images are counted in metrics.jsonl.
    Finishes { logged_once: String, skipped: u64 },
}

type BreakInput = Box<dyn Fn(&Path) -> Option<String>>;

struct Case {
    name: &'static str,
    kind: &'static str,
    /// Breaks the input (the data folder starts good). Returns another output directory when
    /// the case is about the output directory; otherwise the copy of the earlier run is used.
    break_it: BreakInput,
    expect: Expect,
}

#[test]
fn each_broken_input_gives_its_documented_behaviour_and_keeps_what_was_written() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let data = root.join("data");
    let configs = [
        ("imagefolder", config(root, "imagefolder", &data)),
        ("webdataset", config(root, "webdataset", &data)),
    ];
    let cfg = |kind: &str| configs.iter().find(|(k, _)| *k == kind).unwrap().1.clone();

    // The earlier run each case builds on: 3 iterations, checkpoint at 3.
    let mut templates = Vec::new();
    for (kind, config) in &configs {
        reset(&data, kind);
        let out = root.join(format!("before-{kind}"));
        let run = train(config, &out, &["--max-iterations", "3"]);
        assert_eq!(
            run.status.code(),
            Some(DONE),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        assert!(ckpt(&out, 3).join("manifest.json").exists());
        templates.push((*kind, out));
    }
    let template = |kind: &str| {
        templates
            .iter()
            .find(|(k, _)| *k == kind)
            .unwrap()
            .1
            .clone()
    };

    let d = data.display().to_string();
    let truncated = data.join("a/9-truncated.jpg");
    let text = data.join("b/9-notes.jpg");
    let cut_shard = data.join("shard-0001.tar");
    let cases = vec![
        Case {
            name: "missing dataset path",
            kind: "imagefolder",
            break_it: Box::new(|data| {
                std::fs::remove_dir_all(data).unwrap();
                None
            }),
            expect: Expect::Permanent(vec![
                "data.path".into(),
                d.clone(),
                "does not exist".into(),
                "point data.path at".into(),
            ]),
        },
        Case {
            name: "empty folder",
            kind: "imagefolder",
            break_it: Box::new(|data| {
                std::fs::remove_dir_all(data).unwrap();
                std::fs::create_dir_all(data.join("a")).unwrap();
                None
            }),
            expect: Expect::Permanent(vec![
                "data.path".into(),
                d.clone(),
                "yields no images".into(),
                "point data.path at".into(),
            ]),
        },
        Case {
            name: "truncated JPEG",
            kind: "imagefolder",
            break_it: Box::new(|data| {
                let jpeg = encoded(42, ImageFormat::Jpeg);
                std::fs::write(data.join("a/9-truncated.jpg"), &jpeg[..jpeg.len() / 2]).unwrap();
                None
            }),
            expect: Expect::Finishes {
                logged_once: truncated.display().to_string(),
                skipped: 1,
            },
        },
        Case {
            name: "non-image file with an image name",
            kind: "imagefolder",
            break_it: Box::new(|data| {
                std::fs::write(data.join("b/9-notes.jpg"), b"shopping list: eggs\n").unwrap();
                None
            }),
            expect: Expect::Finishes {
                logged_once: text.display().to_string(),
                skipped: 1,
            },
        },
        Case {
            name: "tar shard cut short",
            kind: "webdataset",
            break_it: Box::new(|data| {
                let whole = shard(6, 100);
                // Cut inside the fourth member's data: three images before it stay usable.
                std::fs::write(data.join("shard-0001.tar"), &whole[..whole.len() / 2]).unwrap();
                None
            }),
            expect: Expect::Finishes {
                logged_once: cut_shard.display().to_string(),
                skipped: 0,
            },
        },
        Case {
            name: "only tar shard cut before its first image",
            kind: "webdataset",
            break_it: Box::new(|data| {
                let whole = shard(8, 0);
                std::fs::write(data.join("shard-0000.tar"), &whole[..300]).unwrap();
                None
            }),
            expect: Expect::Permanent(vec![
                "data.path".into(),
                d.clone(),
                "yields no images".into(),
                "point data.path at".into(),
            ]),
        },
        Case {
            name: "output directory under a regular file",
            kind: "imagefolder",
            break_it: Box::new(|data| {
                let file = data.with_file_name("a-file");
                std::fs::write(&file, b"keep me").unwrap();
                Some(file.join("out").display().to_string())
            }),
            expect: Expect::Permanent(vec![
                "output directory".into(),
                "a-file/out".into(),
                "--output-dir".into(),
            ]),
        },
    ];

    for case in &cases {
        eprintln!("case: {}", case.name);
        reset(&data, case.kind);
        let out = root.join(format!("out-{}", case.name.replace(' ', "-")));
        copy_tree(&template(case.kind), &out);
        let before = snapshot(&out);
        let out = match (case.break_it)(&data) {
            Some(other) => PathBuf::from(other),
            None => out,
        };
        let run = train(&cfg(case.kind), &out, &[]);
        let stderr = String::from_utf8_lossy(&run.stderr);
        match &case.expect {
            Expect::Permanent(needles) => {
                assert_eq!(
                    run.status.code(),
                    Some(PERMANENT),
                    "{}: {stderr}",
                    case.name
                );
                for needle in needles {
                    assert!(
                        stderr.contains(needle.as_str()),
                        "{}: no {needle:?} in {stderr}",
                        case.name
                    );
                }
                assert!(!stderr.contains("panicked"), "{}: {stderr}", case.name);
            }
            Expect::Finishes {
                logged_once,
                skipped,
            } => {
                assert_eq!(run.status.code(), Some(DONE), "{}: {stderr}", case.name);
                assert_eq!(
                    stderr.matches(logged_once.as_str()).count(),
                    1,
                    "{}: {logged_once} must be logged exactly once: {stderr}",
                    case.name
                );
                assert_eq!(skipped_images(&out), *skipped, "{}", case.name);
                assert!(
                    ckpt(&out, 6).join("manifest.json").exists(),
                    "{}",
                    case.name
                );
                // Resumed from the earlier checkpoint rather than starting over.
                assert_eq!(iterations(&out), [1, 2, 3, 4, 5, 6], "{}", case.name);
            }
        }
        if case.name.starts_with("output directory") {
            assert_eq!(std::fs::read(root.join("a-file")).unwrap(), b"keep me");
        }
        let kept = root.join(format!("out-{}", case.name.replace(' ', "-")));
        assert_kept(case.name, &before, &kept);
    }

    // Cases that need a file system of their own: a read-only output directory and a full one.
    let mnt = root.join("mnt");
    match Tmpfs::mount(&mnt, "size=8m") {
        Err(reason) => {
            eprintln!("SKIPPED read-only and disk-full cases: cannot mount a tmpfs here ({reason})")
        }
        Ok(fs) => {
            // Read-only: refused before any work, nothing touched.
            reset(&data, "imagefolder");
            let out = mnt.join("run");
            copy_tree(&template("imagefolder"), &out);
            let before = snapshot(&out);
            fs.remount("ro");
            let run = train(&cfg("imagefolder"), &out, &[]);
            let stderr = String::from_utf8_lossy(&run.stderr);
            assert_eq!(run.status.code(), Some(PERMANENT), "read-only: {stderr}");
            assert!(stderr.contains(&out.display().to_string()), "{stderr}");
            assert!(stderr.contains("not writable"), "{stderr}");
            assert!(stderr.contains("--output-dir"), "{stderr}");
            assert_kept("read-only output directory", &before, &out);
            fs.remount("rw");

            // Disk full: resumes from 3, trains to 6, and the checkpoint at 6 does not fit.
            fill(&mnt, 64 * 1024);
            let run = train(&cfg("imagefolder"), &out, &[]);
            let stderr = String::from_utf8_lossy(&run.stderr);
            assert_eq!(run.status.code(), Some(RETRYABLE), "disk full: {stderr}");
            assert!(stderr.contains("No space left on device"), "{stderr}");
            assert!(stderr.contains("iteration 6"), "{stderr}");
            assert!(stderr.contains("Free space on that volume"), "{stderr}");
            assert!(!ckpt(&out, 6).exists(), "a torn checkpoint became visible");
            let leftovers: Vec<_> = std::fs::read_dir(out.join("checkpoints"))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .filter(|n| n.to_string_lossy().starts_with('.'))
                .collect();
            assert!(
                leftovers.is_empty(),
                "temporary files hold the space: {leftovers:?}"
            );
            assert_kept("disk full", &before, &out);
            // Once there is room again the next start resumes from the checkpoint at 3.
            std::fs::remove_file(mnt.join("filler")).unwrap();
            let run = train(&cfg("imagefolder"), &out, &[]);
            let stderr = String::from_utf8_lossy(&run.stderr);
            assert_eq!(run.status.code(), Some(DONE), "after disk full: {stderr}");
            assert!(ckpt(&out, 6).join("manifest.json").exists());
            // 1-3 before, 4-6 of the run that hit the full disk, 4-6 again after resuming at 3.
            assert_eq!(iterations(&out), [1, 2, 3, 4, 5, 6, 4, 5, 6]);
        }
    }
}
