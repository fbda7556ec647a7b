"""Programmatic dependent launch (PDL) for the kernels of a decode step.

A decode step at small batch is a chain of a few hundred short kernels (int8 GEMVs of 5-30 us, norms,
RoPE, attention and activation rounding of 1-5 us each), and without PDL each kernel starts only after
the previous one has finished and its memory is flushed: every boundary is a launch gap and a ramp-up
in which the memory system idles. With PDL (compute capability 9.0+, CUDA's
``cudaLaunchAttributeProgrammaticStreamSerialization``; Triton's ``launch_pdl``) a kernel may start while
the previous one still runs, and it must wait (``griddepcontrol.wait``) before it touches anything that
kernel wrote. The contract of every kernel launched through :func:`pdl_launch`:

- it calls :func:`pdl_wait` before its first load of an activation and before any store;
- what it does before that reads only data no kernel of the step writes (the GEMVs: their weights, which
  they ask L2 for with :func:`prefetch_l2` while the previous kernel finishes).

A kernel that is not launched with PDL waits for its predecessor as always, and a PDL launch after a
kernel that never signals (cuBLAS, NCCL) starts when that kernel's blocks exit, so mixing is safe. The
waits chain: a kernel cannot finish before its own wait returned, so waiting for the previous kernel
waits for all before it. ``SHARDSERVE_PDL=0`` turns it off (``set_pdl`` in benchmarks, for an A/B in one
process); it is off under the Triton interpreter and below compute capability 9.0.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from shardserve.model_executor.kernels import TRITON_INTERPRET

_enabled = os.environ.get("SHARDSERVE_PDL", "1") != "0"


def set_pdl(enabled: bool) -> None:
    """Turn PDL on or off for launches from now on (kernels already captured in a CUDA graph keep theirs)."""
    global _enabled
    _enabled = enabled


@functools.cache
def _capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_enabled(x: torch.Tensor) -> bool:
    """Whether launches for tensors like ``x`` use PDL: CUDA, compute capability 9.0+, not interpreted, and
    not turned off (``SHARDSERVE_PDL=0``, :func:`set_pdl`)."""
    return _enabled and x.is_cuda and not TRITON_INTERPRET and _capable(x.device.index or 0)


def pdl_launch(x: torch.Tensor) -> dict[str, bool]:
    """Keywords for a Triton launch of a kernel that takes ``PDL: tl.constexpr``: ``PDL`` and Triton's
    ``launch_pdl`` together (one without the other would race or gain nothing), or nothing when PDL is off."""
    return {"PDL": True, "launch_pdl": True} if pdl_enabled(x) else {}


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Under PDL: wait for the previous kernel (and its memory), then let the next kernel launch; its blocks
    take free SM slots and wait in turn, so its launch latency overlaps this kernel. A no-op without PDL.
    Short kernels call it first; the GEMVs after asking L2 for their first weight tiles (:func:`prefetch_l2`)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptr):
    """Ask L2 for the 32-byte sector at each address of ``ptr`` (PTX ``prefetch.global.L2``: a hint, no
    result, no fault); every address must lie in a tensor."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0 unused", "=r,l", [ptr.to(tl.int64, bitcast=True)],
                              dtype=tl.int32, is_pure=False, pack=1)  # fmt: skip
