//! The NCCL [`Collective`] for CUDA worlds, through `cudarc` with dynamic loading: nothing
//! CUDA is linked at build time, `libnccl.so` (the torch wheel's `libnccl.so.2`, see
//! `scripts/env.sh`) is opened the first time a CUDA world of more than one rank is formed, so
//! CPU builds, CI and CPU worlds never load it.
//!
//! Forming the group: the TCP rendezvous ([`TcpCollective`], authenticated) runs first; rank 0
//! creates the NCCL unique id and broadcasts its 128 bytes over it; every rank then calls
//! `ncclCommInitRank` on its own device. NCCL reads its own environment (`NCCL_*`, e.g. the
//! fabric profile the operator injects: `NCCL_SOCKET_IFNAME`, `NCCL_IB_HCA`, `NCCL_DEBUG`) when
//! the communicator is created, exactly as under torch; Dinoflow neither reads nor rewrites it.
//!
//! CUDA tensors go through NCCL on the default stream (tch never switches streams), in place on
//! `Tensor::data_ptr()`; CPU tensors (logged losses, agreements between ranks) through the TCP
//! group. A watchdog thread polls `ncclCommGetAsyncError` while an operation is in flight; an
//! asynchronous error, or an operation older than the op timeout, aborts the communicator and
//! ends the process with the retryable exit code, so a dead peer is a gang restart, not a hang.
//!
//! Not run on a GPU yet (no GPU has been available to this project): `bench/gpu/check.sh` is
//! the prepared check.
#![allow(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cudarc::nccl::result as nccl;
use cudarc::nccl::sys;
use tch::{Device, Kind, Tensor};

use super::tcp::TcpCollective;
use super::{COLLECTIVE_FAILED, Collective, CollectiveError};

/// Which backend a world uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// One process: no communication.
    Single,
    /// CPU devices: the TCP ring.
    Tcp,
    /// CUDA devices: NCCL (bootstrapped over TCP).
    Nccl,
}

/// The backend for `world_size` processes computing on `device`.
pub fn backend_for(device: Device, world_size: usize) -> Backend {
    match (world_size, device) {
        (0 | 1, _) => Backend::Single,
        (_, Device::Cuda(_)) => Backend::Nccl,
        _ => Backend::Tcp,
    }
}

/// NCCL's type for a tensor dtype; `None`: not carried by NCCL.
pub fn nccl_type(kind: Kind) -> Option<sys::ncclDataType_t> {
    use sys::ncclDataType_t as T;
    Some(match kind {
        Kind::Float => T::ncclFloat32,
        Kind::Double => T::ncclFloat64,
        Kind::Half => T::ncclFloat16,
        Kind::BFloat16 => T::ncclBfloat16,
        Kind::Int64 => T::ncclInt64,
        Kind::Int => T::ncclInt32,
        Kind::Int8 => T::ncclInt8,
        Kind::Uint8 => T::ncclUint8,
        _ => return None,
    })
}

/// What an NCCL result code means for the operator of the job.
pub fn describe(code: sys::ncclResult_t) -> &'static str {
    use sys::ncclResult_t as R;
    match code {
        R::ncclSuccess => "success",
        R::ncclUnhandledCudaError => "a CUDA call failed inside NCCL",
        R::ncclSystemError => {
            "a system call failed (network or socket: check NCCL_SOCKET_IFNAME / NCCL_IB_* of the fabric profile)"
        }
        R::ncclInternalError => "NCCL internal error",
        R::ncclInvalidArgument => "invalid argument (a bug: report it)",
        R::ncclInvalidUsage => "invalid usage (ranks issued different collectives?)",
        R::ncclRemoteError => "a remote rank failed or exited",
        _ => "unknown NCCL error",
    }
}

fn nccl_err(what: &str, e: &nccl::NcclError) -> CollectiveError {
    CollectiveError::Rendezvous(format!("NCCL {what}: {} ({:?})", describe(e.0), e.0))
}

/// The communicator handle; NCCL allows its use from any thread of the process.
struct Comm(sys::ncclComm_t);
// SAFETY: an ncclComm_t is an opaque handle NCCL synchronises internally; operations are
// serialised by this module (one in flight at a time).
unsafe impl Send for Comm {}
// SAFETY: as above; the watchdog only calls ncclCommGetAsyncError / ncclCommAbort, which
// NCCL documents as callable concurrently with operations.
unsafe impl Sync for Comm {}

/// The NCCL group of this process.
pub struct NcclCollective {
    rank: usize,
    world_size: usize,
    ordinal: usize,
    comm: Arc<Comm>,
    tcp: Arc<TcpCollective>,
    /// Milliseconds since `epoch` when the operation in flight started; 0 when idle.
    in_flight: Arc<AtomicU64>,
    epoch: Instant,
    lock: std::sync::Mutex<()>,
}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCollective")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("device", &self.ordinal)
            .finish()
    }
}

impl NcclCollective {
    /// Forms the NCCL group on CUDA device `ordinal` over an already formed TCP group.
    pub fn init(
        tcp: Arc<TcpCollective>,
        ordinal: usize,
        op_timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        // SAFETY: only probes whether the library can be opened.
        if !unsafe { sys::is_culib_present() } {
            return Err(CollectiveError::Rendezvous(
                "libnccl.so not found: the CUDA world needs NCCL (the torch wheel ships libnccl.so.2; put its directory on LD_LIBRARY_PATH, see scripts/env.sh)".into(),
            ));
        }
        let ctx = cudarc::driver::CudaContext::new(ordinal)
            .map_err(|e| CollectiveError::Rendezvous(format!("CUDA device {ordinal}: {e:?}")))?;
        ctx.bind_to_thread()
            .map_err(|e| CollectiveError::Rendezvous(format!("CUDA device {ordinal}: {e:?}")))?;
        let mut id = Tensor::zeros([128], (Kind::Uint8, Device::Cpu));
        if tcp.rank() == 0 {
            let uid = nccl::get_uniqueid().map_err(|e| nccl_err("unique id", &e))?;
            let bytes: Vec<u8> = uid.internal.iter().map(|&c| c as u8).collect();
            id = Tensor::from_slice(&bytes);
        }
        tcp.try_broadcast_from_root(&mut id)?;
        let bytes = Vec::<u8>::try_from(&id)
            .map_err(|e| CollectiveError::Rendezvous(format!("NCCL unique id: {e}")))?;
        let mut uid = sys::ncclUniqueId { internal: [0; 128] };
        for (d, s) in uid.internal.iter_mut().zip(bytes) {
            *d = s as ::core::ffi::c_char;
        }
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; every rank passes the same id and world size.
        unsafe { nccl::comm_init_rank(&mut comm, tcp.world_size() as i32, uid, tcp.rank() as i32) }
            .map_err(|e| nccl_err("communicator", &e))?;
        let this = Self {
            rank: tcp.rank(),
            world_size: tcp.world_size(),
            ordinal,
            comm: Arc::new(Comm(comm)),
            tcp,
            in_flight: Arc::new(AtomicU64::new(0)),
            epoch: Instant::now(),
            lock: std::sync::Mutex::new(()),
        };
        this.start_watchdog(op_timeout);
        tracing::info!(
            rank = this.rank,
            device = ordinal,
            "NCCL communicator ready"
        );
        Ok(this)
    }

    /// Polls for asynchronous errors and hung operations; ends the process on either.
    fn start_watchdog(&self, op_timeout: Duration) {
        let (comm, in_flight, epoch, rank) = (
            Arc::clone(&self.comm),
            Arc::clone(&self.in_flight),
            self.epoch,
            self.rank,
        );
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(100));
                let mut code = sys::ncclResult_t::ncclSuccess;
                // SAFETY: a live communicator and a valid out-pointer.
                let polled = unsafe { sys::ncclCommGetAsyncError(comm.0, &mut code) };
                let started = in_flight.load(Ordering::SeqCst);
                let hung = started != 0
                    && epoch.elapsed().as_millis() as u64 - started > op_timeout.as_millis() as u64;
                let why = if polled != sys::ncclResult_t::ncclSuccess {
                    Some(format!(
                        "ncclCommGetAsyncError failed: {}",
                        describe(polled)
                    ))
                } else if !matches!(
                    code,
                    sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
                ) {
                    Some(format!("asynchronous NCCL error: {}", describe(code)))
                } else if hung {
                    Some(format!(
                        "an NCCL operation did not finish within {op_timeout:?} (a peer hung or died)"
                    ))
                } else {
                    None
                };
                if let Some(why) = why {
                    // SAFETY: aborting a live communicator unblocks any kernel waiting on peers.
                    let _ = unsafe { nccl::comm_abort(comm.0) };
                    tracing::error!(rank, "{why}");
                    eprintln!("error: rank {rank}: collective failed: {why}");
                    std::process::exit(COLLECTIVE_FAILED);
                }
            }
        });
    }

    /// Runs one NCCL call on `t` (a CUDA tensor) and waits for it under the watchdog.
    fn run(
        &self,
        t: &Tensor,
        call: impl FnOnce(
            *mut ::core::ffi::c_void,
            usize,
            sys::ncclDataType_t,
        ) -> Result<(), nccl::NcclError>,
    ) {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let Some(dtype) = nccl_type(t.kind()) else {
            super::abort(self.rank, &CollectiveError::UnsupportedKind(t.kind()));
        };
        self.in_flight.store(
            (self.epoch.elapsed().as_millis() as u64).max(1),
            Ordering::SeqCst,
        );
        let result = call(t.data_ptr(), t.numel(), dtype);
        if let Err(e) = result {
            super::abort(self.rank, &nccl_err("operation", &e));
        }
        tch::Cuda::synchronize(self.ordinal as i64);
        self.in_flight.store(0, Ordering::SeqCst);
    }

    fn is_cuda(t: &Tensor) -> bool {
        matches!(t.device(), Device::Cuda(_))
    }
}

fn null_stream() -> sys::cudaStream_t {
    std::ptr::null_mut()
}

impl Collective for NcclCollective {
    fn world_size(&self) -> usize {
        self.world_size
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn all_reduce_sum(&self, t: &mut Tensor) {
        if !Self::is_cuda(t) {
            return self.tcp.all_reduce_sum(t);
        }
        let c = t.contiguous();
        let comm = self.comm.0;
        self.run(&c, |p, n, dt| {
            // SAFETY: `p` is `n` elements of device memory owned by `c`, alive for the call.
            unsafe { nccl::all_reduce(p, p, n, dt, sys::ncclRedOp_t::ncclSum, comm, null_stream()) }
                .map(drop)
        });
        if c.data_ptr() != t.data_ptr() {
            tch::no_grad(|| t.copy_(&c));
        }
    }

    fn broadcast_from_root(&self, t: &mut Tensor) {
        if !Self::is_cuda(t) {
            return self.tcp.broadcast_from_root(t);
        }
        let c = t.contiguous();
        let comm = self.comm.0;
        self.run(&c, |p, n, dt| {
            // SAFETY: as in all_reduce_sum.
            unsafe { nccl::broadcast(p, p, n, dt, 0, comm, null_stream()) }.map(drop)
        });
        if c.data_ptr() != t.data_ptr() {
            tch::no_grad(|| t.copy_(&c));
        }
    }

    fn reduce_scatter_sum(&self, input: &Tensor) -> Tensor {
        if !Self::is_cuda(input) {
            return self.tcp.reduce_scatter_sum(input);
        }
        let w = self.world_size;
        let n = input.numel() / w;
        assert_eq!(
            n * w,
            input.numel(),
            "reduce_scatter_sum: length not a multiple of the world size"
        );
        let src = input.flatten(0, -1).contiguous();
        let out = Tensor::empty([n as i64], (input.kind(), input.device()));
        let (comm, dst) = (self.comm.0, out.data_ptr());
        self.run(&src, |p, _, dt| {
            // SAFETY: `p` holds W·n elements, `dst` n, both device memory alive for the call.
            unsafe {
                nccl::reduce_scatter(
                    p,
                    dst,
                    n,
                    dt,
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    null_stream(),
                )
            }
            .map(drop)
        });
        out
    }

    fn all_gather(&self, shard: &Tensor) -> Tensor {
        if !Self::is_cuda(shard) {
            return self.tcp.all_gather(shard);
        }
        let src = shard.flatten(0, -1).contiguous();
        let out = Tensor::empty(
            [(shard.numel() * self.world_size) as i64],
            (shard.kind(), shard.device()),
        );
        let (comm, dst) = (self.comm.0, out.data_ptr());
        self.run(&src, |p, n, dt| {
            // SAFETY: `p` holds n elements, `dst` W·n, both device memory alive for the call.
            unsafe { nccl::all_gather(p, dst, n, dt, comm, null_stream()) }.map(drop)
        });
        out
    }

    fn barrier(&self) {
        self.tcp.barrier();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_worlds_of_several_ranks_use_nccl_and_nothing_else_does() {
        assert_eq!(backend_for(Device::Cpu, 1), Backend::Single);
        assert_eq!(backend_for(Device::Cuda(0), 1), Backend::Single);
        assert_eq!(backend_for(Device::Cpu, 4), Backend::Tcp);
        assert_eq!(backend_for(Device::Cuda(3), 8), Backend::Nccl);
    }

    #[test]
    fn dtypes_map_to_nccls_and_errors_to_reasons() {
        assert_eq!(
            nccl_type(Kind::Float),
            Some(sys::ncclDataType_t::ncclFloat32)
        );
        assert_eq!(
            nccl_type(Kind::BFloat16),
            Some(sys::ncclDataType_t::ncclBfloat16)
        );
        assert_eq!(nccl_type(Kind::Bool), None);
        assert!(describe(sys::ncclResult_t::ncclRemoteError).contains("remote rank"));
        assert!(describe(sys::ncclResult_t::ncclSystemError).contains("NCCL_SOCKET_IFNAME"));
    }
}
