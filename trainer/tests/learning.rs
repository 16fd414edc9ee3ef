//! Learning on real images, end to end through the binary: the Fashion-MNIST example job
//! (`manifests/examples/tiny-cpu-fashion-mnist.yaml`), cut to its first iterations, must
//! raise the evaluation hook's k-NN top-1 on the 10k test images by at least 5 points over
//! the same model at initialisation, as recorded in metrics.jsonl. The whole-run figures are
//! in bench/learning/README.md.
use std::path::{Path, PathBuf};
use std::process::Command;

const ITERATIONS: u64 = 40;

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples/tiny-cpu-fashion-mnist.yaml")
}

/// `(iteration, k-NN top-1 at k=20, linear-probe test top-1)` of every evaluation line.
fn evaluations(out: &Path) -> Vec<(u64, f64, f64)> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["type"] == "eval")
        .map(|v| {
            let knn = v["report"]["knn"]
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["k"] == 20)
                .expect("the example reports k=20")["top1"]
                .as_f64()
                .unwrap();
            let linear = v["report"]["linear"]["test_top1"].as_f64().unwrap();
            (v["iteration"].as_u64().unwrap(), knn, linear)
        })
        .collect()
}

#[test]
fn the_fashion_mnist_example_raises_knn_accuracy_over_its_initialisation() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let status = Command::new(env!("CARGO_BIN_EXE_dinoflow-trainer"))
        .args(["train", "--config"])
        .arg(example())
        .arg("--output-dir")
        .arg(&out)
        .args(["--max-iterations", &ITERATIONS.to_string()])
        .env("RUST_LOG", "warn")
        .status()
        .unwrap();
    assert!(status.success(), "trainer exited with {status}");
    let evals = evaluations(&out);
    let (first, last) = (evals.first().unwrap(), evals.last().unwrap());
    assert_eq!(first.0, 0, "{evals:?}");
    assert_eq!(last.0, ITERATIONS, "{evals:?}");
    assert!(
        last.1 >= first.1 + 5.0,
        "k-NN top-1 went from {:.2} at initialisation to {:.2} after {ITERATIONS} iterations",
        first.1,
        last.1
    );
    assert!((0.0..=100.0).contains(&last.2), "{evals:?}");
}
