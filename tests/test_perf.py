"""`clsp_jax.perf.release_host_memory`: freed heap memory goes back to the OS."""

import ctypes

import pytest

from clsp_jax import perf


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_release_host_memory_returns_freed_heap_pages():
    if perf._libc_malloc_trim() is None:
        pytest.fail("this test needs glibc's malloc_trim (CI and the documented platforms are glibc Linux)")
    malloc, free = ctypes.CDLL(None).malloc, ctypes.CDLL(None).free
    malloc.restype, malloc.argtypes, free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
    # 256 MiB in 2 KiB blocks, every 16th kept: the heap cannot shrink from its top, so the freed pages stay
    # resident until they are released.
    blocks = [malloc(2048) for _ in range(1 << 17)]
    for b in blocks:
        ctypes.memset(b, 1, 2048)
    kept = blocks[::16]
    for i, b in enumerate(blocks):
        if i % 16:
            free(b)
    before = _resident_bytes()
    perf.release_host_memory()
    after = _resident_bytes()
    for b in kept:
        free(b)
    assert before - after > 128 << 20, (before, after)
