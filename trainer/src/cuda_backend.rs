//! Loads libtorch's CUDA backend before anything asks libtorch about CUDA.
//!
//! libtorch registers CUDA (its hooks, kernels and allocator) from the static initialisers of
//! `libtorch_cuda.so`. Nothing in tch calls a symbol of that library, so the linker's
//! `--as-needed` drops it from the trainer binary and `tch::Cuda::is_available()` would say
//! `false` on a GPU machine. Linking it with `--no-as-needed` would fix that too, but would make
//! every image carry the CUDA libraries (several GB) even for CPU runs; loading it at start-up
//! instead keeps the CPU image small and gives the GPU image CUDA. libtorch caches its CUDA
//! hooks at the first query, so this must run before `tch::Cuda::*` is first called.
use std::path::Path;
use std::sync::OnceLock;

/// The library, as the dynamic loader finds it (`LD_LIBRARY_PATH`, the image's library path).
pub const LIBRARY: &str = "libtorch_cuda.so";

/// What start-up found, for the log line that says why a run is on the CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CudaBackend {
    /// No NVIDIA driver on this machine: the library is not loaded (a CPU run pays nothing).
    NoDriver,
    /// Loaded: libtorch can now see the GPUs.
    Loaded,
    /// A driver is there but the library could not be loaded: the run falls back to the CPU.
    Unavailable(String),
}

static STATE: OnceLock<CudaBackend> = OnceLock::new();

/// Loads the backend once per process when an NVIDIA driver is present.
pub fn load() -> &'static CudaBackend {
    STATE.get_or_init(|| {
        if !driver_present() {
            return CudaBackend::NoDriver;
        }
        match open() {
            Ok(()) => CudaBackend::Loaded,
            Err(e) => CudaBackend::Unavailable(e),
        }
    })
}

/// The device nodes the NVIDIA driver creates (also inside a container given a GPU).
fn driver_present() -> bool {
    Path::new("/dev/nvidiactl").exists() || Path::new("/proc/driver/nvidia/version").exists()
}

/// `dlopen` with `RTLD_GLOBAL`, kept open for the life of the process (its registrations live
/// in libtorch's global tables). The one unsafe call of this module: a `dlopen` has no safe
/// form.
#[allow(unsafe_code)]
fn open() -> Result<(), String> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    // SAFETY: loading runs libtorch_cuda's static initialisers, which only register CUDA
    // implementations with libtorch (already loaded: this binary links it).
    let library = unsafe { Library::open(Some(LIBRARY), RTLD_NOW | RTLD_GLOBAL) }
        .map_err(|e| e.to_string())?;
    std::mem::forget(library);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The library and every CUDA library it needs resolve here (no GPU, no driver), and loading
    /// them leaves libtorch working and honest about having no GPU. A missing piece in the
    /// installation would fail here, not silently on a GPU machine.
    #[test]
    fn the_cuda_backend_loads_without_a_gpu_and_libtorch_still_reports_none() {
        open().expect("libtorch_cuda.so must load from the torch install on LD_LIBRARY_PATH");
        assert!(!tch::Cuda::is_available(), "this machine has no GPU");
        let t = tch::Tensor::from_slice(&[1.0f32, 2.0]).sum(tch::Kind::Float);
        assert_eq!(t.double_value(&[]), 3.0);
    }
}
