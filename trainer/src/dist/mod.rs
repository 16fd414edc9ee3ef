//! Cross-rank communication used by the losses and the training step.
//!
//! Everything that the reference implementation reduces with `torch.distributed` (teacher
//! centers, Sinkhorn–Knopp sums, the iBOT masked-patch count, logged losses) goes through the
//! [`Collective`] trait, so the maths is written once and the transport (NCCL, gloo, ...) is
//! chosen at start-up. [`Single`] is the world-size-1 backend; [`tcp::TcpCollective`] the
//! CPU backend for several processes ([`init`] picks from the torchrun environment).
//!
//! [`World`] is built once per process from that environment and passed down: it owns the
//! collective and is the one place that knows this process's rank, local rank and device.
//!
//! Data parallelism follows DDP/FSDP: every rank holds the whole model, gradients are
//! averaged across ranks after backward ([`average_gradients`]), so the replicas stay
//! identical and only rank 0 needs to write checkpoints.

use std::sync::Arc;
use std::time::Duration;

use tch::{Kind, Tensor};

use dinoflow_api::contract as c;

use crate::env::{EnvError, Lookup};

pub mod nccl;
pub mod tcp;
mod world;

pub use world::{World, WorldError};

/// Why a collective operation or the rendezvous failed.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("rendezvous: {0}")]
    Rendezvous(String),
    #[error("{what} rank {peer}: {source} (did that rank exit or hang?)")]
    Io {
        peer: usize,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "ranks issue different collectives: rank {rank} runs {theirs}, this rank {ours} (a bug, or ranks with different configs)"
    )]
    Mismatch {
        rank: usize,
        theirs: String,
        ours: String,
    },
    #[error("the TCP collective cannot carry {0:?} tensors")]
    UnsupportedKind(Kind),
    #[error("an earlier collective failed: {0}")]
    Poisoned(String),
}

/// A group of ranks that can sum tensors across all members.
///
/// Implementations must be collective: every rank calls the same methods in the same order
/// with tensors of the same shape and dtype.
pub trait Collective: Send + Sync {
    /// Number of ranks in the group (≥ 1).
    fn world_size(&self) -> usize;

    /// This process's rank, in `0..world_size()`.
    fn rank(&self) -> usize;

    /// Replaces `t` on every rank by the element-wise sum of `t` over all ranks.
    ///
    /// A transport failure (a peer died or hung past the timeout) cannot be handled by one
    /// rank: backends end the process with a retryable exit code and the gang restarts.
    fn all_reduce_sum(&self, t: &mut Tensor);

    /// Replaces `t` on every rank by rank 0's `t`.
    fn broadcast_from_root(&self, t: &mut Tensor) {
        if self.rank() != 0 {
            let _ = tch::no_grad(|| t.zero_());
        }
        self.all_reduce_sum(t);
    }

    /// Sums `input` (1-D, `world_size() · n` elements, the same shape on every rank) over the
    /// ranks and returns this rank's chunk of the sum: elements `[rank·n, (rank+1)·n)`.
    ///
    /// The default goes through a full all-reduce; backends override it with a real
    /// reduce-scatter that moves `(W−1)/W · N` bytes per rank.
    fn reduce_scatter_sum(&self, input: &Tensor) -> Tensor {
        let w = self.world_size() as i64;
        let n = input.numel() as i64 / w;
        assert_eq!(
            n * w,
            input.numel() as i64,
            "reduce_scatter_sum: length not a multiple of the world size"
        );
        let mut full = input.flatten(0, -1).copy();
        self.all_reduce_sum(&mut full);
        full.narrow(0, self.rank() as i64 * n, n).copy()
    }

    /// Concatenates every rank's `shard` (1-D, `n` elements, the same on every rank) in rank
    /// order: rank r's shard lands at `[r·n, (r+1)·n)` of the result on every rank.
    fn all_gather(&self, shard: &Tensor) -> Tensor {
        let w = self.world_size() as i64;
        let n = shard.numel() as i64;
        let mut full = Tensor::zeros([w * n], (shard.kind(), shard.device()));
        full.narrow(0, self.rank() as i64 * n, n)
            .copy_(&shard.flatten(0, -1));
        self.all_reduce_sum(&mut full);
        full
    }

    /// Returns once every rank has called it. The default is a one-element all-reduce;
    /// backends override it with something cheaper.
    fn barrier(&self) {
        if self.world_size() > 1 {
            let mut t = Tensor::from_slice(&[0i64]);
            self.all_reduce_sum(&mut t);
        }
    }
}

impl<C: Collective + ?Sized> Collective for Arc<C> {
    fn world_size(&self) -> usize {
        (**self).world_size()
    }
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn all_reduce_sum(&self, t: &mut Tensor) {
        (**self).all_reduce_sum(t);
    }
    fn broadcast_from_root(&self, t: &mut Tensor) {
        (**self).broadcast_from_root(t);
    }
    fn reduce_scatter_sum(&self, input: &Tensor) -> Tensor {
        (**self).reduce_scatter_sum(input)
    }
    fn all_gather(&self, shard: &Tensor) -> Tensor {
        (**self).all_gather(shard)
    }
    fn barrier(&self) {
        (**self).barrier();
    }
}

/// Exit code of a rank whose collective failed: retryable (the operator restarts the gang).
pub use dinoflow_api::exit_codes::COLLECTIVE_FAILED;

/// Ends the process after a failed collective: the other ranks are blocked or gone, no local
/// recovery exists, and unwinding through the training step would only delay the restart.
pub(crate) fn abort(rank: usize, e: &CollectiveError) -> ! {
    tracing::error!(rank, "collective failed: {e}");
    eprintln!("error: rank {rank}: collective failed: {e}");
    std::process::exit(COLLECTIVE_FAILED)
}

/// Where this process sits in a multi-process run (torchrun's variables).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub tcp: tcp::TcpConfig,
}

/// Default time ranks wait for each other at start (torchrun's rendezvous default).
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(900);
/// Default time one collective may wait (torch.distributed's default timeout).
const OP_TIMEOUT: Duration = Duration::from_secs(1800);

impl DistEnv {
    /// `None` when neither `RANK` nor `WORLD_SIZE` is set (a plain one-process run). A half
    /// set environment is an error, as in the official code: guessing would hang or split.
    pub fn from_lookup<F: Fn(&str) -> Option<String>>(
        env: &Lookup<F>,
    ) -> Result<Option<Self>, EnvError> {
        if env.get(c::RANK).is_none() && env.get(c::WORLD_SIZE).is_none() {
            return Ok(None);
        }
        let rank: usize = env.required_parsed(c::RANK, "a non-negative integer")?;
        let world_size: usize = env.required_parsed(c::WORLD_SIZE, "a positive integer")?;
        if world_size == 0 || rank >= world_size {
            return Err(EnvError::Invalid {
                name: c::RANK,
                value: rank.to_string(),
                reason: format!("must be below WORLD_SIZE={world_size}"),
                fix: "use `dinoflow-trainer launch`, which numbers the processes".into(),
            });
        }
        let rendezvous = crate::env::rendezvous(env)?;
        let seconds = |name: &'static str, default: Duration| {
            env.parsed::<u64>(name, "a number of seconds")
                .map(|v| v.map_or(default, Duration::from_secs))
        };
        let job = [c::NAMESPACE, c::JOB, c::RUN_ATTEMPT].map(|n| env.get(n).unwrap_or_default());
        Ok(Some(Self {
            rank,
            world_size,
            local_rank: env
                .parsed(c::LOCAL_RANK, "a non-negative integer")?
                .unwrap_or(0),
            tcp: tcp::TcpConfig {
                rank,
                world_size,
                master_addr: rendezvous.master_addr,
                master_port: rendezvous.master_port,
                session: job.join("/"),
                auth: tcp::AuthKey::new(env.get(c::PROGRESS_TOKEN).as_deref()),
                rendezvous_timeout: seconds(
                    c::DINOFLOW_RENDEZVOUS_TIMEOUT_SECONDS,
                    RENDEZVOUS_TIMEOUT,
                )?,
                op_timeout: seconds(c::DINOFLOW_COLLECTIVE_TIMEOUT_SECONDS, OP_TIMEOUT)?,
                algorithm: tcp::Algorithm::Ring,
            },
        }))
    }
}

/// The group of this process: [`Single`] for one process, TCP for CPU worlds, NCCL
/// (bootstrapped over TCP) when the process computes on CUDA ([`nccl::backend_for`]).
pub fn init(
    env: Option<&DistEnv>,
    device: tch::Device,
) -> Result<Arc<dyn Collective>, CollectiveError> {
    let Some(env) = env else {
        return Ok(Arc::new(Single));
    };
    match nccl::backend_for(device, env.world_size) {
        nccl::Backend::Single => Ok(Arc::new(Single)),
        nccl::Backend::Tcp => Ok(Arc::new(tcp::TcpCollective::rendezvous(&env.tcp)?)),
        nccl::Backend::Nccl => {
            let tcp = Arc::new(tcp::TcpCollective::rendezvous(&env.tcp)?);
            let ordinal = match device {
                tch::Device::Cuda(i) => i,
                _ => 0,
            };
            Ok(Arc::new(nccl::NcclCollective::init(
                tcp,
                ordinal,
                env.tcp.op_timeout,
            )?))
        }
    }
}

/// Averages gradients over the ranks (DDP/FSDP semantics: each rank's loss is a mean over its
/// own batch, so the mean of the gradients is the gradient of the global batch's mean loss).
pub fn average_gradients(collective: &dyn Collective, grads: &mut [Tensor]) {
    let world = collective.world_size();
    if world == 1 {
        return;
    }
    in_buckets(grads, |bucket| {
        collective.all_reduce_sum(bucket);
        let _ = bucket.g_div_scalar_(world as f64);
    });
}

/// Sums tensors over the ranks in place, bucketed per dtype (the 16-bit reduce of
/// [`crate::parallel::average_gradients_by_kind`]).
pub fn sum_gradients(collective: &dyn Collective, grads: &mut [Tensor]) {
    if collective.world_size() == 1 {
        return;
    }
    in_buckets(grads, |bucket| collective.all_reduce_sum(bucket));
}

/// Makes every rank's `tensors` equal to rank 0's (DDP's broadcast of the initial module
/// states).
pub fn broadcast_parameters(collective: &dyn Collective, tensors: &mut [Tensor]) {
    if collective.world_size() == 1 {
        return;
    }
    in_buckets(tensors, |bucket| collective.broadcast_from_root(bucket));
}

/// Applies `f` to the tensors flattened into one buffer per dtype and copies the result
/// back, so a whole model costs one collective per dtype instead of one per tensor.
fn in_buckets(tensors: &mut [Tensor], mut f: impl FnMut(&mut Tensor)) {
    let mut kinds: Vec<Kind> = Vec::new();
    for t in tensors.iter() {
        if !kinds.contains(&t.kind()) {
            kinds.push(t.kind());
        }
    }
    tch::no_grad(|| {
        for kind in kinds {
            let idx: Vec<usize> = (0..tensors.len())
                .filter(|&i| tensors[i].kind() == kind)
                .collect();
            let flat: Vec<Tensor> = idx.iter().map(|&i| tensors[i].reshape([-1])).collect();
            let mut bucket = Tensor::cat(&flat, 0);
            f(&mut bucket);
            let mut offset = 0;
            for &i in &idx {
                let n = tensors[i].numel() as i64;
                let part = bucket.narrow(0, offset, n).view_as(&tensors[i]);
                tensors[i].copy_(&part);
                offset += n;
            }
        }
    });
}

/// Means of `values` over the ranks (the official trainer logs loss values reduced this way);
/// identical on every rank, so decisions taken on them (stop on a non-finite loss) agree.
pub fn mean_over_ranks(collective: &dyn Collective, values: &mut [f64]) {
    if collective.world_size() == 1 || values.is_empty() {
        return;
    }
    let mut t = Tensor::from_slice(values);
    collective.all_reduce_sum(&mut t);
    let sums = Vec::<f64>::try_from(&t).unwrap_or_default();
    let n = collective.world_size() as f64;
    for (v, s) in values.iter_mut().zip(sums) {
        *v = s / n;
    }
}

/// Checks that `value` is the same on every rank; the error names this rank's and rank 0's.
pub fn ensure_same_on_every_rank(
    collective: &dyn Collective,
    value: u64,
    what: &str,
) -> Result<(), String> {
    if collective.world_size() == 1 {
        return Ok(());
    }
    let mut t = Tensor::from_slice(&[value as i64]);
    collective.broadcast_from_root(&mut t);
    let root = t.int64_value(&[0]) as u64;
    if root == value {
        Ok(())
    } else {
        Err(format!(
            "rank {} has {what} {value} but rank 0 has {root}",
            collective.rank()
        ))
    }
}

/// SHA-256 over named tensors in name order: equal digests on two ranks mean bitwise equal
/// replicas.
pub fn digest<'t>(tensors: impl IntoIterator<Item = &'t (String, Tensor)>) -> String {
    use sha2::Digest;
    let mut sorted: Vec<&(String, Tensor)> = tensors.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut hasher = sha2::Sha256::new();
    for (name, t) in sorted {
        let c = t.to_device(tch::Device::Cpu).contiguous();
        let mut buf = vec![0u8; c.numel() * c.kind().elt_size_in_bytes()];
        c.copy_data_u8(&mut buf, c.numel());
        hasher.update(name.as_bytes());
        hasher.update(&buf);
    }
    hex::encode(hasher.finalize())
}

/// Returns once every rank has called it.
pub fn barrier(collective: &dyn Collective) {
    collective.barrier();
}

/// True on every rank when `local` is true on any rank (e.g. a stop signal that reached one
/// rank a moment before the others).
pub fn any_rank(collective: &dyn Collective, local: bool) -> bool {
    if collective.world_size() == 1 {
        return local;
    }
    let mut t = Tensor::from_slice(&[i64::from(local)]);
    collective.all_reduce_sum(&mut t);
    t.int64_value(&[0]) > 0
}

/// The trivial group of one process: reductions are the identity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Single;

impl Collective for Single {
    fn world_size(&self) -> usize {
        1
    }

    fn rank(&self) -> usize {
        0
    }

    fn all_reduce_sum(&self, _t: &mut Tensor) {}
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Test double for a multi-rank group: every rank is assumed to hold the same tensor, so
    /// the sum is `world_size × t`. Records how many reductions were issued.
    #[derive(Debug)]
    pub(crate) struct Replicated {
        pub world_size: usize,
        pub calls: Mutex<usize>,
    }

    impl Replicated {
        pub(crate) fn new(world_size: usize) -> Self {
            Self {
                world_size,
                calls: Mutex::new(0),
            }
        }
    }

    impl Collective for Replicated {
        fn world_size(&self) -> usize {
            self.world_size
        }
        fn rank(&self) -> usize {
            0
        }
        fn all_reduce_sum(&self, t: &mut Tensor) {
            *self.calls.lock().unwrap() += 1;
            let _ = t.g_mul_scalar_(self.world_size as i64);
        }
    }

    #[test]
    fn single_is_rank_zero_of_one_and_leaves_tensors_unchanged() {
        let single = Single;
        assert_eq!(single.world_size(), 1);
        assert_eq!(single.rank(), 0);
        let mut t = Tensor::from_slice(&[1.0f32, -2.0, 3.5]);
        single.all_reduce_sum(&mut t);
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![1.0, -2.0, 3.5]);
    }

    #[test]
    fn reduce_scatter_and_all_gather_place_chunks_by_rank() {
        let group = tcp::tests::local_group(3);
        let out = tcp::tests::on_every_rank(&group, |rank, c| {
            // Rank r contributes [r, r+1, ..., r+5].
            let input = Tensor::arange(6, (Kind::Float, tch::Device::Cpu)) + rank as f64;
            let mine = c.reduce_scatter_sum(&input);
            let shard = Tensor::from_slice(&[10.0f32 * rank as f32, 10.0 * rank as f32 + 1.0]);
            let all = c.all_gather(&shard);
            (
                Vec::<f32>::try_from(&mine).unwrap(),
                Vec::<f32>::try_from(&all).unwrap(),
            )
        });
        for (rank, (mine, all)) in out.iter().enumerate() {
            // Element k summed over ranks 0..3: 3k + (0 + 1 + 2).
            let expected: Vec<f32> = (2 * rank..2 * rank + 2)
                .map(|k| 3.0 * k as f32 + 3.0)
                .collect();
            assert_eq!(mine, &expected, "rank {rank}'s chunk");
            assert_eq!(all, &vec![0.0, 1.0, 10.0, 11.0, 20.0, 21.0]);
        }
    }

    #[test]
    fn gradients_are_averaged_and_parameters_broadcast_across_tcp_ranks() {
        let group = tcp::tests::local_group(2);
        let out = tcp::tests::on_every_rank(&group, |rank, c| {
            let r = rank as f32;
            let mut grads = vec![
                Tensor::from_slice(&[1.0f32 + r, 2.0 + r]).view([1, 2]),
                Tensor::from_slice(&[10.0f64 * (f64::from(r) + 1.0)]),
                Tensor::from_slice(&[4.0f32 * r]),
            ];
            average_gradients(c, &mut grads);
            let mut params = vec![
                Tensor::from_slice(&[r, r + 1.0]),
                Tensor::from_slice(&[7 + rank as i64]),
            ];
            broadcast_parameters(c, &mut params);
            let mut losses = [1.0 + f64::from(r), f64::from(r)];
            mean_over_ranks(c, &mut losses);
            (
                Vec::<f32>::try_from(&grads[0].view([-1])).unwrap(),
                Vec::<f64>::try_from(&grads[1]).unwrap(),
                Vec::<f32>::try_from(&grads[2]).unwrap(),
                grads[0].size(),
                Vec::<f32>::try_from(&params[0]).unwrap(),
                params[1].int64_value(&[0]),
                losses,
                any_rank(c, rank == 1),
                any_rank(c, false),
            )
        });
        for o in &out {
            assert_eq!(o.0, vec![1.5, 2.5]);
            assert_eq!(o.1, vec![15.0]);
            assert_eq!(o.2, vec![2.0]);
            assert_eq!(o.3, [1, 2]);
            assert_eq!(o.4, vec![0.0, 1.0]);
            assert_eq!(o.5, 7);
            assert_eq!(o.6, [1.5, 0.5]);
            assert!(o.7);
            assert!(!o.8);
        }
    }

    #[test]
    fn a_half_set_distributed_environment_is_an_error_naming_the_variable() {
        use crate::env::tests::lookup;
        assert_eq!(DistEnv::from_lookup(&lookup(&[])).unwrap(), None);
        let err = DistEnv::from_lookup(&lookup(&[("RANK", "1"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert_eq!(err.name(), "MASTER_ADDR");
        let err = DistEnv::from_lookup(&lookup(&[("WORLD_SIZE", "2")])).unwrap_err();
        assert_eq!(err.name(), "RANK");
        let full = [
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
            ("DINOFLOW_NAMESPACE", "ml"),
            ("DINOFLOW_JOB", "tiny"),
            ("DINOFLOW_RUN_ATTEMPT", "2"),
        ];
        let env = DistEnv::from_lookup(&lookup(&full)).unwrap().unwrap();
        assert_eq!((env.rank, env.world_size, env.local_rank), (1, 2, 1));
        assert_eq!(env.tcp.session, "ml/tiny/2");
        assert_eq!(env.tcp.op_timeout, OP_TIMEOUT);
        let mut bad = full.to_vec();
        bad[0] = ("RANK", "2");
        assert_eq!(
            DistEnv::from_lookup(&lookup(&bad)).unwrap_err().name(),
            "RANK"
        );
    }

    #[test]
    fn the_job_token_keys_the_rendezvous_and_without_one_it_is_unauthenticated() {
        use crate::env::tests::lookup;
        let base = [
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
        ];
        let env = DistEnv::from_lookup(&lookup(&base)).unwrap().unwrap();
        assert!(!env.tcp.auth.is_set());
        let mut with = base.to_vec();
        with.push(("DINOFLOW_PROGRESS_TOKEN", "t0k"));
        let env = DistEnv::from_lookup(&lookup(&with)).unwrap().unwrap();
        assert_eq!(env.tcp.auth, tcp::AuthKey::new(Some("t0k")));
        assert_eq!(format!("{:?}", env.tcp.auth), "AuthKey(<redacted>)");
    }

    #[test]
    fn a_cpu_world_of_several_ranks_forms_over_tcp_without_nccl() {
        // Two CPU ranks through `init`: the NCCL library is never probed (none is installed
        // here, and probing it would fail the rendezvous).
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let env = move |rank: usize| DistEnv {
            rank,
            world_size: 2,
            local_rank: rank,
            tcp: tcp::TcpConfig {
                rank,
                world_size: 2,
                master_addr: "127.0.0.1".into(),
                master_port: port,
                session: "ml/cpu/0".into(),
                auth: tcp::AuthKey::default(),
                rendezvous_timeout: Duration::from_secs(20),
                op_timeout: Duration::from_secs(20),
                algorithm: tcp::Algorithm::Ring,
            },
        };
        let leaf = std::thread::spawn(move || {
            let c = init(Some(&env(1)), tch::Device::Cpu).unwrap();
            let mut t = Tensor::from_slice(&[2.0f32]);
            c.all_reduce_sum(&mut t);
            t.double_value(&[0])
        });
        let root = init(Some(&env(0)), tch::Device::Cpu).unwrap();
        let mut t = Tensor::from_slice(&[1.0f32]);
        root.all_reduce_sum(&mut t);
        assert_eq!(t.double_value(&[0]), 3.0);
        assert_eq!(leaf.join().unwrap(), 3.0);
    }

    #[test]
    fn ranks_that_disagree_on_a_value_are_told_so() {
        let group = tcp::tests::local_group(2);
        let out = tcp::tests::on_every_rank(&group, |rank, c| {
            let same = ensure_same_on_every_rank(c, 5, "start iteration");
            let differ = ensure_same_on_every_rank(c, 5 + rank as u64, "start iteration");
            (same, differ)
        });
        assert!(out.iter().all(|(same, _)| same.is_ok()));
        assert!(out[0].1.is_ok());
        assert_eq!(
            out[1].1.as_ref().unwrap_err(),
            "rank 1 has start iteration 6 but rank 0 has 5"
        );
    }

    #[test]
    fn the_digest_depends_on_names_and_bits_not_on_order() {
        let a = ("a".to_string(), Tensor::from_slice(&[1.0f32, 2.0]));
        let b = ("b".to_string(), Tensor::from_slice(&[0.0f32]));
        let b_neg = ("b".to_string(), Tensor::from_slice(&[-0.0f32]));
        assert_eq!(digest([&a, &b]), digest([&b, &a]));
        assert_ne!(digest([&a, &b]), digest([&a, &b_neg]));
    }

    #[test]
    fn one_process_needs_no_sockets() {
        let c = init(None, tch::Device::Cpu).unwrap();
        assert_eq!((c.rank(), c.world_size()), (0, 1));
        let mut g = vec![Tensor::from_slice(&[3.0f32])];
        average_gradients(c.as_ref(), &mut g);
        assert_eq!(Vec::<f32>::try_from(&g[0]).unwrap(), vec![3.0]);
    }

    #[test]
    fn replicated_double_sums_over_its_ranks() {
        let group = Replicated::new(4);
        let mut t = Tensor::from_slice(&[1.0f32, 2.0]);
        group.all_reduce_sum(&mut t);
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![4.0, 8.0]);
        assert_eq!(*group.calls.lock().unwrap(), 1);
    }
}
