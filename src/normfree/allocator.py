"""Keep freed memory inside the process, so CPU training does not page-fault.

PyTorch's CPU tensors come from ``malloc``. glibc serves blocks above a
threshold (128 KiB, rising to at most 32 MiB) with ``mmap`` and gives them back
to the kernel on ``free``; the next training step asks for the same
activation-sized blocks again and the kernel must fault in and zero every page
anew. Measured with ``benchmarks/bench_methods.py`` on a 2-core VM:
ResNet-50 at 128x128, batch 64 (``none``): 600,000-860,000 page faults per
training step and 14.7-16.4 img/s, against 2,000-3,700 faults and 21 img/s
with freed memory kept; WRN-16-4 at 32x32, batch 128: +10-16% img/s for bn,
none and nf; ``normfree train`` of WRN-16-4 on CIFAR-10 at batch 128: 80-83
instead of 74-77 img/s.

:func:`retain_freed_memory` sets glibc's ``mallopt`` so that large blocks come
from the heap (``M_MMAP_MAX`` = 0) and the heap is never trimmed
(``M_TRIM_THRESHOLD`` = -1): memory freed by one step is reused by the next.
The resident size then stays at its peak instead of shrinking between steps,
as with PyTorch's CUDA caching allocator, jemalloc or tcmalloc. It changes the
whole process, so the library never calls it on its own: the ``normfree``
command does, unless ``NORMFREE_SYSTEM_MALLOC=1`` is set, and so does the
benchmark.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

#: set to 1 to keep the C library's own allocator settings in the ``normfree`` command
ENV_OPT_OUT = "NORMFREE_SYSTEM_MALLOC"


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (see the module docstring).

    Returns True when both settings were applied, False where they cannot be
    (no glibc ``mallopt``, e.g. macOS or Windows): nothing is changed then.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))


def configure_from_environment() -> bool:
    """:func:`retain_freed_memory` unless ``NORMFREE_SYSTEM_MALLOC`` is set to 1; returns whether it applied."""
    if os.environ.get(ENV_OPT_OUT, "0") not in ("", "0"):
        return False
    return retain_freed_memory()
