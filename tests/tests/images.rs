//! The container images of `scripts/images.sh`, built (or taken from its cache) and run with
//! podman under runc as a node would run them: the operator image as uid 1000, and the CPU
//! trainer image as uid 1000 with a read-only root filesystem and only /tmp writable (the
//! operator's pod defaults), launching the tiny example for a few iterations and writing
//! checkpoints that the image's own `export` then verifies. The names must be the ones the
//! chart, the operator and the examples use. Each test keeps podman's images and containers in
//! a private store that it deletes afterwards.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dinoflow_e2e::{build_workspace_binary, container_images, repo_root, wait_for};
use serde_yaml_ng::Value;

/// The images the script printed: reference -> oci-archive.
fn images() -> &'static BTreeMap<String, PathBuf> {
    container_images().unwrap_or_else(|e| panic!("{e}"))
}

fn yaml(path: &str) -> Value {
    serde_yaml_ng::from_str(&std::fs::read_to_string(repo_root().join(path)).unwrap()).unwrap()
}

fn app_version() -> String {
    yaml("charts/dinoflow/Chart.yaml")["appVersion"]
        .as_str()
        .unwrap()
        .to_string()
}

fn operator_ref() -> String {
    let values = yaml("charts/dinoflow/values.yaml");
    let repo = values["image"]["repository"].as_str().unwrap();
    assert_eq!(values["image"]["tag"].as_str(), Some(""), "tag: appVersion");
    format!("{repo}:{}", app_version())
}

/// The chart's default trainer image (the GPU one) and its CPU variant.
fn trainer_refs() -> (String, String) {
    let values = yaml("charts/dinoflow/values.yaml");
    let repo = values["trainerImage"]["repository"].as_str().unwrap();
    assert_eq!(values["trainerImage"]["tag"].as_str(), Some(""));
    let gpu = format!("{repo}:{}", app_version());
    let cpu = format!("{gpu}-cpu");
    (gpu, cpu)
}

/// podman with its own store (vfs: no mounts to leave behind), removed on drop.
struct Podman {
    dir: tempfile::TempDir,
}

impl Podman {
    fn new() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("dinoflow-images-test")
                .tempdir()
                .unwrap(),
        }
    }

    fn cmd(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.arg("--root")
            .arg(self.dir.path().join("root"))
            .arg("--runroot")
            .arg(self.dir.path().join("run"))
            .args(["--storage-driver", "vfs"]);
        cmd
    }

    fn ok(&self, args: &[&str]) -> Output {
        let out = self.cmd().args(args).output().expect("podman");
        assert!(
            out.status.success(),
            "podman {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn load(&self, archive: &Path) {
        self.ok(&["load", "--quiet", "--input", archive.to_str().unwrap()]);
    }

    /// `podman run` as the node runs a trainer pod: runc (crun refuses this host's cgroup
    /// layout), no network, no capabilities, no privilege escalation, limits within the hard
    /// ones. `extra`: further run options, then the image and its arguments.
    fn run(&self, extra: &[&str]) -> Output {
        let mut cmd = self.cmd();
        cmd.args([
            "run",
            "--rm",
            "--runtime",
            "/usr/sbin/runc",
            "--network",
            "none",
        ])
        .args(["--cap-drop", "all", "--security-opt", "no-new-privileges"])
        .args([
            "--ulimit",
            &format!("nofile={0}:{0}", hard_limit("-Hn", 8192)),
        ])
        .args([
            "--ulimit",
            &format!("nproc={0}:{0}", hard_limit("-Hu", 4096)),
        ])
        .args(extra);
        cmd.output().expect("podman run")
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.cmd().args(["rm", "--all", "--force"]).output();
        let _ = self.cmd().args(["rmi", "--all", "--force"]).output();
    }
}

/// `cap`, or the shell's hard limit when lower (runc may not raise it).
fn hard_limit(flag: &str, cap: u64) -> u64 {
    let out = Command::new("sh")
        .args(["-c", &format!("ulimit {flag}")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_or(cap, |hard: u64| hard.min(cap))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_images_are_the_ones_the_chart_the_operator_and_the_examples_name() {
    let (gpu, cpu) = trainer_refs();
    let built: Vec<&String> = images().keys().collect();
    assert_eq!(
        built,
        [&operator_ref(), &cpu],
        "scripts/images.sh without --gpu"
    );
    assert_eq!(
        dinoflow_operator::settings::DEFAULT_TRAINER_IMAGE,
        gpu,
        "the operator's default trainer image is the chart's"
    );
    assert_eq!(
        env!("CARGO_PKG_VERSION"),
        app_version(),
        "the chart's appVersion is the crates' version"
    );
    // CPU examples name the CPU image; the others the default (GPU) image or none.
    for entry in std::fs::read_dir(repo_root().join("manifests/examples")).unwrap() {
        let path = entry.unwrap().path();
        let rel = path.strip_prefix(repo_root()).unwrap().to_str().unwrap();
        let job = yaml(rel);
        let cluster = &job["spec"]["cluster"];
        let image = cluster["image"].as_str();
        if cluster["gpusPerNode"].as_i64() == Some(0) {
            assert_eq!(image, Some(cpu.as_str()), "{rel}");
        } else {
            assert!(image.is_none_or(|i| i == gpu), "{rel}: {image:?}");
        }
    }
}

/// Runs over the same cache (the tests of one binary, a demo beside the suite) take turns:
/// at once, they hashed each other's half-staged contexts, rebuilt, and deleted a context
/// under the other's build ("copier subprocess: EOF" in a cold CI run). Here a third party
/// holds the cache's lock while two runs start; both wait, then find the images cached.
#[test]
fn runs_over_the_same_cache_take_turns_and_find_the_images_cached() {
    let built = images();
    let out_dir = built.values().next().unwrap().parent().unwrap();
    let lock = out_dir.join(".lock");
    let holder = Command::new("flock")
        .arg(&lock)
        .args(["sleep", "4"])
        .spawn()
        .expect("run flock");
    // Start the runs only once the holder has the lock (a probe that cannot take it).
    let held = wait_for(std::time::Duration::from_secs(3), || {
        let probe = Command::new("flock")
            .arg("--nonblock")
            .arg(&lock)
            .arg("true")
            .status()
            .unwrap();
        (!probe.success()).then_some(())
    });
    assert!(held.is_some(), "flock did not take {}", lock.display());
    let operator = build_workspace_binary("dinoflow-operator", "dinoflow-operator").unwrap();
    let runs: Vec<_> = (0..2)
        .map(|_| {
            Command::new(repo_root().join("scripts/images.sh"))
                .arg("--bin-dir")
                .arg(operator.parent().unwrap())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("run scripts/images.sh")
        })
        .collect();
    let expected: String = built
        .iter()
        .map(|(reference, archive)| format!("{reference} {}\n", archive.display()))
        .collect();
    for run in runs {
        let out = run.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("waiting for another scripts/images.sh"),
            "{stderr}"
        );
        assert_eq!(stderr.matches(": cached (").count(), 2, "{stderr}");
    }
    assert!(holder.wait_with_output().unwrap().status.success());
}

#[test]
fn the_operator_image_runs_as_uid_1000_and_prints_its_version_and_help() {
    let reference = operator_ref();
    let podman = Podman::new();
    podman.load(&images()[&reference]);
    let user = podman.ok(&[
        "image",
        "inspect",
        "--format",
        "{{.Config.User}}",
        &reference,
    ]);
    assert_eq!(String::from_utf8_lossy(&user.stdout).trim(), "1000:1000");

    let version = podman.run(&["--read-only", &reference, "--version"]);
    assert!(version.status.success(), "{}", text(&version));
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("dinoflow-operator {}", app_version())
    );
    let help = podman.run(&["--read-only", &reference, "--help"]);
    assert!(help.status.success(), "{}", text(&help));
    let help = text(&help);
    assert!(
        help.contains("DINOFLOW_PROGRESS_KEY_FILE")
            && help.contains(&format!("[default: {}]", trainer_refs().0)),
        "{help}"
    );
}

#[test]
fn the_cpu_trainer_image_trains_the_tiny_example_as_uid_1000_on_a_read_only_root() {
    let reference = trainer_refs().1;
    let podman = Podman::new();
    podman.load(&images()[&reference]);
    let size = podman.ok(&["image", "inspect", "--format", "{{.Size}}", &reference]);
    eprintln!(
        "[images] {reference}: {} MB",
        String::from_utf8_lossy(&size.stdout)
            .trim()
            .parse::<u64>()
            .unwrap()
            / 1_000_000
    );

    // The tiny example, 4 iterations with a checkpoint every 2, no evaluation.
    let mut job = yaml("manifests/examples/tiny-cpu-fashion-mnist.yaml");
    let training = &mut job["spec"]["training"];
    training["optim"]["epochs"] = 1.into();
    training["train"]["officialEpochLength"] = 4.into();
    training["train"]["batchSizePerGpu"] = 16.into();
    training["evaluation"] =
        serde_yaml_ng::from_str("{knn: {enabled: false}, linearProbe: {enabled: false}}").unwrap();
    training["checkpoint"] = serde_yaml_ng::from_str("{periodIterations: 2, keepLast: 3}").unwrap();
    training["output"]["dir"] = "/out".into();
    training["logging"] = serde_yaml_ng::from_str("{everyIterations: 1, metricsPort: 0}").unwrap();
    let data = PathBuf::from(training["data"]["path"].as_str().unwrap());
    let data_dir = data.parent().unwrap().to_str().unwrap().to_string();

    let config_dir = podman.dir.path().join("config");
    let out_dir = podman.dir.path().join("out");
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::write(
        config_dir.join("config.yaml"),
        serde_yaml_ng::to_string(&job).unwrap(),
    )
    .unwrap();
    // The output volume is writable by the image's user only, as an fsGroup would make it.
    let chown = Command::new("chown")
        .args(["1000:1000", out_dir.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(chown.success());

    let mounts = [
        "-v".to_string(),
        format!("{data_dir}:{data_dir}:ro"),
        "-v".into(),
        format!("{}:/etc/dinoflow:ro", config_dir.display()),
        "-v".into(),
        format!("{}:/out", out_dir.display()),
    ];
    // Only /tmp is writable, as the operator's pod mounts its scratch emptyDir.
    let read_only = [
        "--read-only",
        "--read-only-tmpfs=false",
        "--tmpfs",
        "/tmp:rw,mode=1777",
    ];
    let run = |args: &[&str]| {
        let mut all: Vec<&str> = read_only.to_vec();
        all.extend(mounts.iter().map(String::as_str));
        all.extend(["-e", "NO_COLOR=1", "-e", "DINOFLOW_THREADS=1"]);
        all.extend(["-e", "OMP_NUM_THREADS=1"]);
        all.extend(args);
        podman.run(&all)
    };

    let validate = run(&[
        &reference,
        "validate",
        "--config",
        "/etc/dinoflow/config.yaml",
    ]);
    assert!(validate.status.success(), "{}", text(&validate));

    // What the operator's pod runs: the launcher with the env contract of one CPU process.
    let contract = [
        "MASTER_ADDR=127.0.0.1",
        "MASTER_PORT=29500",
        "NNODES=1",
        "NODE_RANK=0",
        "NPROC_PER_NODE=1",
        "WORLD_SIZE=1",
        "CUDA_VISIBLE_DEVICES=",
    ];
    let mut args: Vec<&str> = contract.iter().flat_map(|kv| ["-e", kv]).collect();
    args.extend([
        reference.as_str(),
        "launch",
        "train",
        "--config",
        "/etc/dinoflow/config.yaml",
    ]);
    let train = run(&args);
    let log = text(&train);
    assert!(train.status.success(), "{log}");
    assert!(log.contains("it 4/4"), "{log}");

    let checkpoint = out_dir.join("checkpoints/ckpt-000000004");
    assert!(
        checkpoint.join("manifest.json").is_file(),
        "no final checkpoint:\n{log}"
    );
    // Written by uid 1000, not root.
    for entry in std::fs::read_dir(&checkpoint).unwrap() {
        let meta = entry.unwrap().metadata().unwrap();
        assert_eq!((meta.uid(), meta.gid()), (1000, 1000));
    }
    // `export` takes the newest checkpoint that verifies (manifest, sha256 of every file).
    let export = run(&[
        &reference,
        "export",
        "--config",
        "/etc/dinoflow/config.yaml",
        "--out",
        "/out/backbone.safetensors",
    ]);
    let log = text(&export);
    assert!(export.status.success(), "{log}");
    assert!(
        log.contains("source=/out/checkpoints/ckpt-000000004"),
        "{log}"
    );
    assert!(out_dir.join("backbone.safetensors").is_file());

    // The root really is read-only: an export there fails.
    let denied = run(&[
        &reference,
        "export",
        "--config",
        "/etc/dinoflow/config.yaml",
        "--out",
        "/backbone.safetensors",
    ]);
    assert!(!denied.status.success(), "{}", text(&denied));
    assert!(
        text(&denied).contains("Read-only file system"),
        "{}",
        text(&denied)
    );
}
