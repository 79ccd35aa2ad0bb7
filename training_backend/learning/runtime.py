"""Process-wide settings for the processes that train and predict (trainer child, CLI).

``keep_freed_memory`` stops glibc from handing freed memory back to the kernel after every
forward pass. By default a U-Net forward on a 512² image allocates and frees tens of MB of
activations per call; glibc returns them to the kernel (``munmap`` / heap trim) and the next
call page-faults them in again, zero-filled: on the 2-core CPU we develop on that was 60,000
minor page faults and about a third of the time of one forward pass. With a fixed mmap threshold
and a trim threshold above any realistic heap, freed activations are reused instead; the price
is that the process keeps its peak heap until it exits, which is what a trainer wants. It is
not called in the GUI process.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's largest allowed mmap threshold on 64-bit (HEAP_MAX_SIZE / 2): bigger blocks are mmapped
_MMAP_THRESHOLD = 32 * 1024 * 1024
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int
_done = False


def keep_freed_memory() -> bool:
    """Tune glibc malloc as described in the module docstring (once; a no-op elsewhere).

    Returns:
        True when the settings are in effect (Linux with glibc), False otherwise.
    """
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the mmap threshold first: setting it also stops glibc's dynamic adjustment of both
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    _done = ok
    return ok
