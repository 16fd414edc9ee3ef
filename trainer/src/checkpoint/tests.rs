//! Sharded checkpoints: every rank writes, rank 0 seals, any layout reads back.
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use super::manifest::{FORMAT_V1, FileEntry, MANIFEST_FILE, hash_file};
use super::*;
use crate::dist::tcp::tests::{local_group, on_every_rank};

/// The replicated state every rank of the tests holds: two groups, odd sizes.
fn state(scale: f64) -> BTreeMap<String, Vec<(String, Tensor)>> {
    let f = |n: i64| Tensor::arange(n, (Kind::Float, Device::Cpu)) * scale;
    BTreeMap::from([
        (
            "student".to_string(),
            vec![
                ("w".to_string(), f(35).view([5, 7])),
                ("b".to_string(), f(3)),
            ],
        ),
        (
            "optimizer".to_string(),
            vec![
                ("w.exp_avg".to_string(), f(35).view([5, 7]) + 0.5),
                (
                    "w.step".to_string(),
                    Tensor::from_slice(&[7i64 * scale as i64]),
                ),
            ],
        ),
    ])
}

fn part(iteration: u64, job: &str, rank: usize, world: usize) -> ShardSnapshot {
    ShardSnapshot {
        iteration,
        config_hash: "cfg".into(),
        guarded: BTreeMap::from([("training.model".to_string(), "tiny".to_string())]),
        job: Some(job.to_string()),
        chunks: split_replicated(state(iteration as f64), rank, world),
        json: if rank == 0 {
            BTreeMap::from([(
                "data_position".to_string(),
                serde_json::json!({"iteration": iteration}),
            )])
        } else {
            BTreeMap::new()
        },
    }
}

/// Saves checkpoint `iteration` of job `job` from `world` ranks joined over TCP.
fn save_on(root: &Path, iteration: u64, job: &'static str, world: usize) -> PathBuf {
    let group = local_group(world);
    // Opened once, before any rank writes (opening removes unfinished temporary directories).
    let mgr = CheckpointManager::open(root, 5).unwrap();
    let out = on_every_rank(&group, move |rank, c| {
        mgr.save_shard(&part(iteration, job, rank, world), c)
            .map(|s| s.map(|v| v.path))
            .map_err(|e| e.to_string())
    });
    out[0].clone().unwrap().expect("rank 0 seals")
}

fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    n.sort();
    n
}

fn assert_same(
    a: &BTreeMap<String, Vec<(String, Tensor)>>,
    b: &BTreeMap<String, Vec<(String, Tensor)>>,
) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (group, tensors) in a {
        let other: BTreeMap<_, _> = b[group].iter().map(|(n, t)| (n, t)).collect();
        assert_eq!(tensors.len(), other.len(), "{group}");
        for (name, t) in tensors {
            let u = other[name];
            assert_eq!((u.kind(), u.size()), (t.kind(), t.size()), "{group}/{name}");
            assert!(u.equal(t), "{group}/{name} differs");
        }
    }
}

#[test]
fn every_rank_writes_its_shard_and_rank_zero_seals_one_manifest_over_all() {
    let dir = tempfile::tempdir().unwrap();
    let path = save_on(dir.path(), 4, "PretrainJob/ns/a", 3);
    assert_eq!(path, dir.path().join("ckpt-000000004"));
    let ckpt = verify(&path).unwrap();
    let m = &ckpt.manifest;
    assert_eq!((m.format.as_str(), m.world_size), (manifest::FORMAT, 3));
    assert_eq!(m.job.as_deref(), Some("PretrainJob/ns/a"));
    let ranks: Vec<(usize, &str)> = m
        .shards
        .iter()
        .map(|s| (s.rank, s.header.as_str()))
        .collect();
    assert_eq!(
        ranks,
        [
            (0, "shard-00000.json"),
            (1, "shard-00001.json"),
            (2, "shard-00002.json")
        ]
    );
    // Each rank's files, the headers and rank 0's documents, all checksummed.
    for rank in 0..3 {
        for group in ["student", "optimizer"] {
            let f = shard::group_file(group, rank);
            assert!(
                m.files.contains_key(&f),
                "{f} missing: {:?}",
                m.files.keys()
            );
        }
    }
    assert!(m.files.contains_key("data_position.json"));
    let mut listed: Vec<String> = m.files.keys().cloned().collect();
    listed.push(MANIFEST_FILE.into());
    listed.sort();
    assert_eq!(names(&path), listed, "nothing unlisted in the directory");
    // Whole again, bitwise, whatever split wrote it.
    let loaded = CheckpointManager::load(&ckpt).unwrap();
    assert_same(&loaded.tensors, &state(4.0));
    assert_eq!(loaded.json["data_position"]["iteration"], 4);
    assert!(
        !loaded.json.contains_key("shard-00000"),
        "headers are not documents"
    );
}

#[test]
fn a_world_of_one_writes_the_first_formats_group_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = save_on(dir.path(), 2, "j", 1);
    let n = names(&path);
    assert_eq!(
        n,
        [
            "data_position.json",
            "manifest.json",
            "optimizer.safetensors",
            "shard-00000.json",
            "student.safetensors"
        ]
    );
    // Exactly what the first format wrote for the group: whole tensors under their names.
    let student: BTreeMap<String, Tensor> =
        Tensor::read_safetensors(path.join("student.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    assert!(student["w"].equal(&state(2.0)["student"][0].1));
}

#[test]
fn the_reader_serves_any_range_from_the_overlapping_chunks_of_any_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let path = save_on(dir.path(), 3, "j", 3);
    let reader = CheckpointReader::open(&verify(&path).unwrap()).unwrap();
    let whole = state(3.0)["student"][0].1.reshape([-1]);
    assert_eq!(reader.shape("student/w"), Some(vec![5, 7]));
    // Every range of the 35 elements, across the 3 ranks' chunk borders (11, 23).
    for offset in 0..35 {
        for len in 0..=(35 - offset) {
            let got = reader.read("student/w", offset, len).unwrap();
            assert!(
                got.equal(&whole.narrow(0, offset, len)),
                "[{offset}, {})",
                offset + len
            );
        }
    }
    let step = reader.read("optimizer/w.step", 0, 1).unwrap();
    assert_eq!(step.int64_value(&[0]), 21);
    let names: Vec<&str> = reader.names().collect();
    assert_eq!(
        names,
        [
            "optimizer/w.exp_avg",
            "optimizer/w.step",
            "student/b",
            "student/w"
        ]
    );
}

#[test]
fn a_range_no_saved_chunk_covers_is_an_error_naming_the_tensor_and_the_gap() {
    let dir = tempfile::tempdir().unwrap();
    let group = local_group(2);
    let mgr = CheckpointManager::open(dir.path(), 3).unwrap();
    // Rank 0 saves elements [0, 4) of a 10-element tensor, rank 1 [6, 10): 4 and 5 are lost.
    on_every_rank(&group, move |rank, c| {
        let (offset, n) = if rank == 0 { (0, 4) } else { (6, 4) };
        let chunk = Chunk {
            name: "v".into(),
            shape: vec![10],
            offset,
            data: Tensor::arange_start(offset, offset + n, (Kind::Float, Device::Cpu)),
        };
        let p = ShardSnapshot {
            iteration: 1,
            chunks: BTreeMap::from([("student".to_string(), vec![chunk])]),
            ..ShardSnapshot::default()
        };
        mgr.save_shard(&p, c).unwrap();
    });
    let reader =
        CheckpointReader::open(&verify(&dir.path().join("ckpt-000000001")).unwrap()).unwrap();
    assert!(
        reader
            .read("student/v", 6, 4)
            .unwrap()
            .equal(&Tensor::arange_start(6, 10, (Kind::Float, Device::Cpu)))
    );
    let err = reader.read("student/v", 2, 6).unwrap_err().to_string();
    assert!(
        err.contains("tensor student/v")
            && err.contains("[2, 8)")
            && err.contains("from element 4"),
        "{err}"
    );
    let err = reader.read("student/nope", 0, 1).unwrap_err().to_string();
    assert!(
        err.contains("student/nope") && err.contains("no shard holds"),
        "{err}"
    );
}

#[test]
fn a_torn_or_missing_shard_invalidates_the_whole_checkpoint_and_the_previous_one_is_used() {
    let dir = tempfile::tempdir().unwrap();
    save_on(dir.path(), 10, "j", 2);
    let newest = save_on(dir.path(), 20, "j", 2);
    let mgr = CheckpointManager::open(dir.path(), 5).unwrap();
    assert_eq!(
        mgr.latest_verified().unwrap().unwrap().manifest.iteration,
        20
    );

    // Rank 1's student shard cut short (a torn write the manifest did not see).
    let file = newest.join("student.rank-00001.safetensors");
    let bytes = fs::read(&file).unwrap();
    fs::write(&file, &bytes[..bytes.len() - 4]).unwrap();
    let scan = mgr.scan().unwrap();
    assert_eq!(scan.latest.unwrap().manifest.iteration, 10);
    assert!(
        scan.rejected[0].reason.contains("student.rank-00001"),
        "{}",
        scan.rejected[0].reason
    );

    // Restored, then the whole shard of rank 1 gone.
    fs::write(&file, &bytes).unwrap();
    assert_eq!(
        mgr.latest_verified().unwrap().unwrap().manifest.iteration,
        20
    );
    fs::remove_file(newest.join("shard-00001.json")).unwrap();
    let scan = mgr.scan().unwrap();
    assert_eq!(scan.latest.unwrap().manifest.iteration, 10);
    assert!(
        scan.rejected[0].reason.contains("shard-00001.json"),
        "{}",
        scan.rejected[0].reason
    );
}

#[test]
fn a_rank_that_fails_its_write_fails_the_checkpoint_on_every_rank_and_keeps_the_previous() {
    let dir = tempfile::tempdir().unwrap();
    save_on(dir.path(), 5, "j", 2);
    let group = local_group(2);
    let mgr = CheckpointManager::open(dir.path(), 5).unwrap();
    let out = on_every_rank(&group, move |rank, c| {
        let mut p = part(6, "j", rank, 2);
        if rank == 1 {
            // A group name with a missing sub-directory: rank 1's write fails half-way.
            let t = Tensor::from_slice(&[1.0f32]);
            p.chunks.insert(
                "missing/dir".into(),
                vec![Chunk {
                    name: "x".into(),
                    shape: vec![1],
                    offset: 0,
                    data: t,
                }],
            );
        }
        mgr.save_shard(&p, c).map(|_| ()).map_err(|e| e.to_string())
    });
    let rank0 = out[0].as_ref().unwrap_err();
    assert!(
        rank0.contains("another rank failed to write its shard"),
        "{rank0}"
    );
    assert!(
        out[1].as_ref().unwrap_err().contains("missing/dir"),
        "{:?}",
        out[1]
    );
    assert_eq!(
        names(dir.path()),
        ["ckpt-000000005"],
        "no temporary directory left"
    );
    let mgr = CheckpointManager::open(dir.path(), 5).unwrap();
    assert_eq!(
        mgr.latest_verified().unwrap().unwrap().manifest.iteration,
        5
    );
}

/// Replaces `file` of checkpoint `dst` by the same file of `src` and re-seals `dst`'s
/// manifest over it: what copying files between checkpoint directories by hand gives.
fn transplant(src: &Path, dst: &Path, files: &[&str]) {
    let mut m = Manifest::read(dst).unwrap();
    for f in files {
        fs::copy(src.join(f), dst.join(f)).unwrap();
        let (bytes, sha256) = hash_file(&dst.join(f)).unwrap();
        m.files.insert(f.to_string(), FileEntry { bytes, sha256 });
    }
    fs::write(
        dst.join(MANIFEST_FILE),
        serde_json::to_vec_pretty(&m).unwrap(),
    )
    .unwrap();
}

#[test]
fn a_shard_from_another_job_is_refused_naming_both_jobs_and_nothing_is_touched() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    save_on(a.path(), 3, "PretrainJob/ns/a", 2);
    let ours = save_on(a.path(), 6, "PretrainJob/ns/a", 2);
    let theirs = save_on(b.path(), 6, "PretrainJob/ns/b", 2);
    transplant(
        &theirs,
        &ours,
        &[
            "shard-00001.json",
            "student.rank-00001.safetensors",
            "optimizer.rank-00001.safetensors",
        ],
    );
    let before = names(&ours);
    let err = verify(&ours).unwrap_err();
    assert!(err.is_bad_input());
    let msg = err.to_string();
    for want in [
        "shard-00001.json",
        "PretrainJob/ns/b",
        "PretrainJob/ns/a",
        "another job",
        "--resume PATH",
    ] {
        assert!(msg.contains(want), "{want} missing in: {msg}");
    }
    // Not skipped for the older one (a resume from 3 would overwrite 6 later): refused.
    let mgr = CheckpointManager::open(a.path(), 5).unwrap();
    assert!(mgr.scan().unwrap_err().is_bad_input());
    assert_eq!(names(a.path()), ["ckpt-000000003", "ckpt-000000006"]);
    assert_eq!(names(&ours), before);
}

#[test]
fn shards_that_disagree_on_the_iteration_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let older = save_on(dir.path(), 3, "j", 2);
    let newer = save_on(dir.path(), 6, "j", 2);
    transplant(
        &older,
        &newer,
        &[
            "shard-00001.json",
            "student.rank-00001.safetensors",
            "optimizer.rank-00001.safetensors",
        ],
    );
    let before = names(&newer);
    let err = verify(&newer).unwrap_err();
    assert!(err.is_bad_input(), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("shard-00001.json (rank 1) has iteration 3, the manifest 6"),
        "{msg}"
    );
    assert!(msg.contains("disagree"), "{msg}");
    // Refused, not skipped for the older checkpoint, and nothing is overwritten or removed.
    let mgr = CheckpointManager::open(dir.path(), 5).unwrap();
    assert!(mgr.scan().unwrap_err().is_bad_input());
    assert_eq!(names(dir.path()), ["ckpt-000000003", "ckpt-000000006"]);
    assert_eq!(names(&newer), before);
}

#[test]
fn a_checkpoint_of_the_first_format_still_verifies_and_loads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt-000000009");
    fs::create_dir(&path).unwrap();
    // What rank 0 alone wrote before sharded checkpoints: one file per group.
    let mut files = BTreeMap::new();
    for (group, tensors) in state(9.0) {
        let name = format!("{group}.safetensors");
        tensor_file::write(&path.join(&name), &tensors).unwrap();
        let (bytes, sha256) = hash_file(&path.join(&name)).unwrap();
        files.insert(name, FileEntry { bytes, sha256 });
    }
    fs::write(path.join("data_position.json"), br#"{"iteration": 9}"#).unwrap();
    let (bytes, sha256) = hash_file(&path.join("data_position.json")).unwrap();
    files.insert("data_position.json".into(), FileEntry { bytes, sha256 });
    let manifest = serde_json::json!({
        "format": FORMAT_V1, "iteration": 9, "worldSize": 1, "configHash": "c",
        "guarded": {}, "createdUnix": 0, "files": files,
    });
    fs::write(path.join(MANIFEST_FILE), manifest.to_string()).unwrap();

    let ckpt = CheckpointManager::open(dir.path(), 3)
        .unwrap()
        .latest_verified()
        .unwrap()
        .unwrap();
    assert_eq!(ckpt.manifest.iteration, 9);
    let loaded = CheckpointManager::load(&ckpt).unwrap();
    assert_same(&loaded.tensors, &state(9.0));
    assert_eq!(loaded.json["data_position"]["iteration"], 9);
    let reader = CheckpointReader::open(&ckpt).unwrap();
    let w = reader.read("student/w", 10, 5).unwrap();
    assert!(w.equal(&(Tensor::arange_start(10, 15, (Kind::Float, Device::Cpu)) * 9.0)));
}
