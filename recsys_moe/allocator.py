"""The C allocator of a training process (trainer.allocator).

A training step allocates and frees the same activation buffers every step (a few MiB each at
batch 512, tens at 8192). glibc's defaults give big blocks back to the kernel when they are freed,
so the next step page-faults them in again: the expert kernels' fresh [batch, hidden] buffers
made a default-job step 1.4x slower in a profiled run (33 ms without allocator settings, 23 ms
with them and transparent huge pages, 1 thread).
`tuned` keeps freed memory in the process from the moment the trainer is built, through
mallopt, whatever launched it (launch/env.sh sets the same values through GLIBC_TUNABLES, for the
whole process from its start):

- M_MMAP_THRESHOLD 32 MiB (glibc's maximum): smaller blocks come from the heap;
- M_TRIM_THRESHOLD 1 GiB: freed heap memory is not returned to the OS below that;
- M_TOP_PAD 256 MiB: the heap grows in big steps.

The cost: memory freed after a peak stays with the process. Where GLIBC_TUNABLES is set at all
(launch/env.sh's values, the user's own, or empty to keep glibc's defaults) the environment
decides and nothing is changed here; `trainer.allocator=default` turns it off too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
TUNED = {
    "M_MMAP_THRESHOLD": (M_MMAP_THRESHOLD, 32 << 20),
    "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, 1 << 30),
    "M_TOP_PAD": (M_TOP_PAD, 256 << 20),
}


def keep_freed_memory() -> dict[str, int]:
    """Applies TUNED through glibc's mallopt; returns what was set ({} where nothing was: not
    glibc, or GLIBC_TUNABLES is set, so the environment decides)."""
    if platform.libc_ver()[0] != "glibc":
        return {}
    if "GLIBC_TUNABLES" in os.environ:
        return {}
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    applied = {}
    for name, (param, value) in TUNED.items():
        if libc.mallopt(param, value) != 1:
            raise RuntimeError(f"mallopt({name}, {value}) failed (trainer.allocator=tuned)")
        applied[name] = value
    log.info("allocator: %s (trainer.allocator=tuned)", applied)
    return applied
