"""Runs ../shared/bench/official_dinov2_step.py (the official DINOv2 step timer) on the CPU,
unchanged: this file only patches, before the timer runs, what that script and the official
code need a GPU, FSDP or compiled xFormers for, then executes the timer as __main__.

    python3 official_cpu.py TIMER --ref .ref --config vitl14 --batch 4 --steps 10 --warmup 2 --opts ...

What is patched (no maths changes; everything else is the official code the timer calls):
- one thread (`torch.set_num_threads(1)`), as the Dinoflow side; with OFFICIAL_CLOCK=process
  the timer's clock counts CPU seconds of the process instead of wall seconds;
- CUDA placement: `Module.to(cuda)` and `Tensor.cuda()` stay on the CPU; `torch.cuda`'s
  synchronize/set_device/reset_peak_memory_stats are no-ops (CPU ops finish when they return);
  `max_memory_allocated` is the process's peak RSS (what Dinoflow reports on a CPU) and the
  device name is the CPU's;
- the crops stay fp32 (the timer casts them to fp16 for FSDP's fp16 compute, which does not
  exist here: parameters and activations are fp32 on the CPU, as Dinoflow's fp32 step);
- the one-process group is gloo, not NCCL (`iBOTPatchLoss`/Sinkhorn all-reduce through it);
- FSDP at world size 1: the wrap is the identity, with the two FSDP attributes the training
  step uses (`params` for the EMA's foreach lists, `clip_grad_norm_` = torch's clip over the
  sub-module, the same maths on one process), and resharding the teacher is a no-op;
- xFormers: ../official/xformers_stub.py (its doc says what it provides and why that is the
  same maths).
"""
import os, resource, runpy, sys

import torch
import torch.distributed as dist

torch.set_num_threads(1)
# OFFICIAL_CLOCK=process: the timer's perf_counter becomes process_time (CPU seconds of all
# threads), as step_bench's `--clock process`: on a loaded shared machine wall time mostly
# measures the wait for a core.
if os.environ.get("OFFICIAL_CLOCK") == "process":
    import time

    time.perf_counter = time.process_time


def _cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return "cpu: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def _is_cuda(d):
    return (isinstance(d, torch.device) and d.type == "cuda") or (isinstance(d, str) and d.startswith("cuda"))


_module_to = torch.nn.Module.to
torch.nn.Module.to = lambda self, *a, **k: self if (a and _is_cuda(a[0])) or _is_cuda(k.get("device")) else _module_to(self, *a, **k)
torch.Tensor.cuda = lambda self, *a, **k: self
torch.cuda.synchronize = lambda *a, **k: None
torch.cuda.set_device = lambda *a, **k: None
torch.cuda.reset_peak_memory_stats = lambda *a, **k: None
torch.cuda.max_memory_allocated = lambda *a, **k: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
torch.cuda.get_device_name = lambda *a, **k: _cpu_name()
_init_pg = dist.init_process_group
dist.init_process_group = lambda *a, **k: _init_pg(backend="gloo", **{x: y for x, y in k.items() if x != "backend"})


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "official"))
import xformers_stub  # noqa: E402

xformers_stub.install()
os.environ["REF_SDPA_NESTED"] = "1"

timer = sys.argv[1]
ref = os.path.abspath(sys.argv[sys.argv.index("--ref") + 1]) if "--ref" in sys.argv else os.environ.get("DINOV2_REF", ".ref")
sys.path.insert(0, ref)
import dinov2.train.ssl_meta_arch as sma  # noqa: E402


def _no_fsdp(_cfg, modules_to_wrap=()):
    def wrap(m):
        m.params = list(m.parameters())
        m.clip_grad_norm_ = lambda max_norm: torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm)
        return m
    return wrap


import dinov2.data  # noqa: E402

_collate = dinov2.data.collate_data_and_cast
# The timer casts the crops to fp16 for FSDP's fp16 compute; without FSDP the CPU step runs
# in fp32 (parameters and activations), so the crops stay fp32 as Dinoflow's fp32 step's do.
dinov2.data.collate_data_and_cast = lambda *a, **k: _collate(*a, **{**k, "dtype": torch.float32})
sma.get_fsdp_wrapper = _no_fsdp
sma.get_fsdp_modules = lambda m: [m]
sma.reshard_fsdp_model = lambda m: None
sys.argv = [timer] + sys.argv[2:]
runpy.run_path(timer, run_name="__main__")
