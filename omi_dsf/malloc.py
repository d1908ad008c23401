"""glibc's malloc for the processes that hold whole volumes: the worker (the infer step's 100 MB
request and 52 MB answer), the reference AI service, KServe's and MLServer's model servers.

glibc gives every allocation above its mmap threshold (at most 32 MB) fresh pages from the kernel and
returns them on free, so each copy of a volume -- gRPC's, protobuf's, a server's conversions -- pays
a page fault per 4 KB page: about 1 GB/s instead of memory speed (the MLServer runtime's request
conversion 0.2 s for a 200-slice volume, 0.035 s without the faults). With these settings large blocks
come from the heap and freed ones are used again, and a process keeps up to `KEEP` of freed memory at
its heap's top rather than handing it back (also after a larger peak, such as the model's own
temporaries between two requests): its resident size stays up to `KEEP` above what it uses.

`keep_freed_memory()` sets them in this process (mallopt, at start: the worker and the reference
service); `ENVIRONMENT` holds the same as glibc's environment variables for a process started here
(KServe's and MLServer's servers, `servers._env`), as a provider sets them in its container.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

KEEP = 1 << 30   # freed memory a process keeps at its heap's top (glibc's top pad) when it trims the rest
ENVIRONMENT = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TOP_PAD_": str(KEEP)}
_M_TOP_PAD, _M_MMAP_MAX = -2, -4   # mallopt's parameters (malloc.h)

log = logging.getLogger(__name__)


def keep_freed_memory() -> bool:
    """`ENVIRONMENT`'s settings for this process, from now on; False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.debug("no glibc mallopt: malloc settings left as they are")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TOP_PAD, KEEP))
