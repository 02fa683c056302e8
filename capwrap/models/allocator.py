"""Give freed tensor memory back to the operating system, for the low-memory mode.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves a large request with its
own memory mapping, returned to the system when freed — but after the first such block is freed it
raises that size limit (up to 32 MiB) and serves smaller requests from its heap, which it keeps for
reuse. A training step or a model taking turns frees many tensors of a few MiB (a block's
activations, a layer's weights), so the process's resident memory climbs to the sum of every
step's transients even though little is alive: on a 22-block TinyLlama-shaped model one
reverse fine-tuning step peaked at 9.8 GB resident with 4.6 GB alive before it, and at 5.9 GB with
the limit fixed at 1 MiB (``benchmarks/RESULTS.md``).

:func:`return_freed_memory` fixes glibc's limit (``mallopt(M_MMAP_THRESHOLD, ...)``, the setting
``MALLOC_MMAP_THRESHOLD_`` makes at start-up), so that every tensor of at least that size is its own
mapping and goes back to the system when freed. It is process-wide and lasts; it costs a page
fault per page of each new large tensor (about 15% on the step above, far more for small models
that allocate a few MiB in tight loops). A :class:`~capwrap.models.residency.Residency`
(``diagnose(memory="low")``) calls it when a member's weights take at least
:data:`LARGE_MODEL_BYTES`: where memory matters, not for small models. Elsewhere than glibc
(macOS, musl) it does nothing and says so.

Examples:
    >>> LARGE_MODEL_BYTES // 2**20
    256
"""

from __future__ import annotations

import ctypes
import functools

__all__ = ["LARGE_MODEL_BYTES", "MMAP_THRESHOLD", "return_freed_memory"]

#: Allocations of at least this many bytes get their own mapping, returned to the system when freed.
MMAP_THRESHOLD = 1 << 20
#: A Residency sets the threshold when a member's weights take at least this many bytes.
LARGE_MODEL_BYTES = 256 * 2**20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


@functools.cache
def return_freed_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """Make the C library return freed allocations of ``threshold`` bytes or more to the system
    (see the module docstring). Returns whether it could (``False`` where ``malloc`` is not
    glibc's). Called again with the same threshold, it does nothing more."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, threshold) == 1
