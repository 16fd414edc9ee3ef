"""A stand-in for the few xFormers pieces the official DINOv2 code imports, for machines where
compiled xFormers kernels are not available (any CPU; a GPU whose xformers wheel does not match
torch, or a device call whose carry has no room for the ~100 MB wheel). Semantics as
xFormers documents them, in plain torch:
- `fmha.BlockDiagonalMask`: built from sequence lengths or a list of tensors (concatenated on
  the token axis), `q_seqinfo.seqstart_py`, and `split` back to per-input tensors;
- `unbind` (torch.unbind), `index_select_cat` (cat of the flattened row selections) and
  `scaled_index_add` (`input.index_add(0, index, source * scaling, alpha)`), used by the
  official blocks' batch-subset stochastic depth;
- `memory_efficient_attention` raises: ../shared/bench/official_dinov2_step.py replaces it by
  torch SDPA per run of equal blocks (REF_SDPA_NESTED=1, its default).
`SwiGLU` and `cross_entropy` are left out on purpose, so the official code takes its own
pure-torch fallbacks (SwiGLUFFN, the log-softmax iBOT loss): same maths.

    import xformers_stub; xformers_stub.install()   # before anything imports dinov2
"""
import sys
import types

import torch


class BlockDiagonalMask:
    """xformers.ops.fmha.BlockDiagonalMask as the official code uses it: built from sequence
    lengths or from a list of [1, n, d] tensors (concatenated on the token axis), split back."""

    def __init__(self, seqlens):
        self.seqlens = list(seqlens)
        starts = [0]
        for n in self.seqlens:
            starts.append(starts[-1] + n)
        self.q_seqinfo = types.SimpleNamespace(seqstart_py=starts)
        self._batch_sizes = None

    @classmethod
    def from_seqlens(cls, seqlens):
        return cls(seqlens)

    @classmethod
    def from_tensor_list(cls, tensors):
        seqlens = [t.shape[1] for t in tensors for _ in range(t.shape[0])]
        mask = cls(seqlens)
        mask._batch_sizes = [t.shape[0] for t in tensors]
        return mask, torch.cat([t.reshape(1, -1, *t.shape[2:]) for t in tensors], dim=1)

    def split(self, x):
        sizes = self._batch_sizes or [1] * len(self.seqlens)
        out, pos, i = [], 0, 0
        for b in sizes:
            n = self.seqlens[i]
            out.append(x[:, pos:pos + b * n].reshape(b, n, *x.shape[2:]))
            pos, i = pos + b * n, i + b
        return out


def _mea(*_a, **_k):
    raise RuntimeError("memory_efficient_attention: the timer's SDPA replacement should be active (REF_SDPA_NESTED=1)")


def _index_select_cat(sources, indices):
    return torch.cat([s[i].flatten() for s, i in zip(sources, indices)])


def _scaled_index_add(input, index, source, scaling=None, alpha=1.0):
    if scaling is not None:
        source = source * scaling
    return torch.index_add(input, 0, index, source, alpha=alpha)


def install():
    """Registers the stand-in as `xformers` and `xformers.ops` in sys.modules."""
    xformers = types.ModuleType("xformers")
    ops = types.ModuleType("xformers.ops")
    ops.fmha = types.SimpleNamespace(BlockDiagonalMask=BlockDiagonalMask)
    ops.memory_efficient_attention = _mea
    ops.unbind = torch.unbind
    ops.index_select_cat = _index_select_cat
    ops.scaled_index_add = _scaled_index_add
    xformers.ops = ops
    sys.modules.update({"xformers": xformers, "xformers.ops": ops})
