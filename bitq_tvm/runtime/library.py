"""Load an exported library so that its weights are resident once, not twice.

``tvm.runtime.load_module`` rebuilds the Relax executable, constants included, from the data blob
``__tvm_ffi__library_bin`` of the mapped ``.so``: the packed weights end up in memory as tensors,
and the blob's pages (read once, at load) stay resident as file-backed memory, so a process holds
every weight byte twice (measured 2.00x the stored bytes, ``bench/bench_weight_bound.py``).
:func:`load_library` loads the module, then tells the kernel those pages are not needed
(``madvise(MADV_DONTNEED)`` on the pages wholly inside the blob): they are clean, read-only file
pages, so nothing is lost; if anything touched them again they would be re-read from the file.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["LIBRARY_BLOB_SYMBOL", "load_library", "release_library_blob"]

# The symbol TVM's exported libraries keep their serialized modules under.
LIBRARY_BLOB_SYMBOL = "__tvm_ffi__library_bin"
_MADV_DONTNEED = 4  # Linux


def release_library_blob(path: str) -> int:
    """Drop the resident pages of the loaded library ``path``'s data blob; returns the bytes
    released (0 where it does not apply: not Linux, no blob, library not loaded)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        handle = ctypes.CDLL(os.path.abspath(path), mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        address = ctypes.addressof(ctypes.c_char.in_dll(handle, LIBRARY_BLOB_SYMBOL))
    except (OSError, ValueError):
        return 0
    size = ctypes.c_uint64.from_address(address).value + 8  # the blob's length header and data
    if size > os.path.getsize(path):
        return 0  # not the layout this code knows: leave the pages alone
    page = os.sysconf("SC_PAGE_SIZE")
    start, end = -(-address // page) * page, (address + size) // page * page
    if end <= start:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return end - start if libc.madvise(start, end - start, _MADV_DONTNEED) == 0 else 0


def load_library(path: str):
    """``tvm.runtime.load_module(path)``, with the library's data blob released afterwards
    (:func:`release_library_blob`): run it with ``relax.VirtualMachine(load_library(path), dev)``."""
    import tvm

    module = tvm.runtime.load_module(path)
    release_library_blob(path)
    return module
