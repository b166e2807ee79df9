"""Keep a CPU run's resident memory near what its tensors hold, with glibc's malloc.

glibc serves a block above its mmap threshold with a mapping of its own, handed back to the system when freed, and
smaller blocks from heaps that only give memory back from the top. The threshold starts at 128 KiB but rises to the
size of every mapped block freed, up to 32 MiB. A forward pass frees activations of a few MiB from the first layer
on, so from then on they come from the heap; the tensors each layer keeps (checkpointed inputs, saved activations)
sit between the freed ones, whose holes the next layer's tensors do not fill, and the process grows by about the
size of a layer's temporaries at every layer. DPO with LoRA on SmolLM2-135M, 8 pairs of 256 + 256 tokens with
gradient checkpointing: autograd keeps 0.72 GiB, yet the process peaked at 6.7 GiB; with the threshold fixed at
4 MiB, 2.1 GiB.

Setting the threshold with `mallopt` fixes it (glibc then stops moving it), as glibc's own `MALLOC_MMAP_THRESHOLD_`
environment variable does. Stages that train on the CPU call `fix_mmap_threshold` when they build their models. A
block above the threshold costs a fresh mapping (page faults) each time, which is why the threshold is a few MiB and
not lower. `DVPO_MALLOC_MMAP_THRESHOLD` chooses it in bytes, or `dynamic` keeps glibc's moving threshold; a
`MALLOC_MMAP_THRESHOLD_` that is set is left as the user's choice. Other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import os
import platform

from lightning.pytorch.utilities import rank_zero_info

DEFAULT_MMAP_THRESHOLD = 4 * 2**20  # bytes
OPTION = "DVPO_MALLOC_MMAP_THRESHOLD"
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MAX_MMAP_THRESHOLD = 32 * 2**20  # glibc refuses more on 64-bit systems


def chosen_mmap_threshold() -> int | None:
    """The threshold to set in bytes, or None to leave malloc as it is (see the module docstring)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or platform.libc_ver()[0] != "glibc":
        return None
    value = os.environ.get(OPTION, "").strip()
    if value == "dynamic":
        return None
    if not value:
        return DEFAULT_MMAP_THRESHOLD
    if not value.isdigit() or not 0 < int(value) <= MAX_MMAP_THRESHOLD:
        raise ValueError(
            f"{OPTION} must be a number of bytes from 1 to {MAX_MMAP_THRESHOLD} or 'dynamic' (glibc's own moving "
            f"threshold); got {value!r}"
        )
    return int(value)


def fix_mmap_threshold() -> int | None:
    """Fix glibc's mmap threshold (see the module docstring) unless the environment says otherwise; returns the
    threshold set, or None."""
    threshold = chosen_mmap_threshold()
    if threshold is None:
        return None
    # The process's own symbols hold glibc's: no library search (`find_library` runs `ldconfig` at every call).
    if ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, threshold) != 1:
        return None
    rank_zero_info(
        f"glibc malloc: mmap threshold fixed at {threshold} bytes, so freed activations return to the system "
        f"({OPTION}=dynamic keeps glibc's moving threshold)"
    )
    return threshold
