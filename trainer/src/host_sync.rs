//! Every read of tensor values onto the host on the training-step path goes through here. On a
//! GPU each read waits for the device queue to drain, so the step itself does none unless the
//! caller asks for numbers (`meta_arch::StepOutcome::read`); a unit test counts them with
//! [`reads`] and a source scan keeps direct reads out of the step's modules.

use tch::{Device, Kind, Tensor};

#[cfg(test)]
thread_local! {
    /// Reads on this thread (tests run on their own threads, so counts do not mix).
    static READS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn count() {
    #[cfg(test)]
    READS.with(|r| r.set(r.get() + 1));
}

/// Host reads made on this thread so far.
#[cfg(test)]
pub fn reads() -> u64 {
    READS.with(std::cell::Cell::get)
}

/// The values of `t`, flattened, as f64 (exact for every float and int32 kind): one read.
pub fn f64s(t: &Tensor) -> Vec<f64> {
    count();
    let host = t
        .to_kind(Kind::Double)
        .flatten(0, -1)
        .to_device(Device::Cpu);
    Vec::<f64>::try_from(&host).unwrap_or_default()
}

/// Whether every element of `t` is true (non-zero): one read.
pub fn all(t: &Tensor) -> bool {
    count();
    bool::try_from(t.all()).unwrap_or(false)
}

/// The value of a one-element integer tensor: one read.
pub fn i64_scalar(t: &Tensor) -> i64 {
    count();
    t.int64_value(&[0])
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Direct reads (a sync each on a GPU) that must go through this module instead.
    const DIRECT_READS: [&str; 7] = [
        "double_value(",
        "int64_value(",
        "try_from(&",
        "try_from(t",
        ".equal(",
        ".allclose(",
        "is_nonzero(",
    ];

    /// The production part of a source file: up to its first `#[cfg(test)]`.
    fn production(path: &Path) -> String {
        let text = std::fs::read_to_string(path).unwrap();
        match text.find("#[cfg(test)]") {
            Some(i) => text[..i].to_string(),
            None => text,
        }
    }

    #[test]
    fn the_step_path_reads_tensors_only_through_this_module() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = vec![src.join("precision.rs")];
        for dir in ["meta_arch", "loss", "optim", "model"] {
            for entry in std::fs::read_dir(src.join(dir)).unwrap() {
                files.push(entry.unwrap().path());
            }
        }
        let mut found = Vec::new();
        for file in files {
            let name = file.file_name().unwrap().to_string_lossy().to_string();
            // Test-only files: fixtures and parity checks read whatever they like.
            if name.contains("parity") || name.contains("test") {
                continue;
            }
            for (i, line) in production(&file).lines().enumerate() {
                if DIRECT_READS.iter().any(|p| line.contains(p)) {
                    found.push(format!("{}:{}: {}", file.display(), i + 1, line.trim()));
                }
            }
        }
        assert!(found.is_empty(), "direct host reads:\n{}", found.join("\n"));
    }
}
