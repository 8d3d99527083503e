"""`clsp_jax.perf.release_host_memory`: freed heap memory goes back to the OS; `release_compiled_programs`:
compiled programs dropped, and compiled again when called; `use_compilation_cache`: every program written,
and read by the next process. The XLA:CPU flag that importing clsp_jax sets (`clsp_jax.prefer_eigen_dots`),
and the peak matmul rate that ignores it."""

import ctypes
import subprocess
import sys
from importlib import metadata

import jax
import jax.numpy as jnp
import pytest

import clsp_jax
from clsp_jax import perf

ON_JAXLIB_0_10 = metadata.version("jaxlib").startswith("0.10.")


def test_prefer_eigen_dots_adds_the_flag_once_and_leaves_set_flags_alone():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert clsp_jax.prefer_eigen_dots(env) is ON_JAXLIB_0_10
    if ON_JAXLIB_0_10:
        assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2 --xla_cpu_experimental_ynn_fusion_type="
    assert not clsp_jax.prefer_eigen_dots(env)  # already there (or not this jaxlib): unchanged
    chosen = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT"}
    assert not clsp_jax.prefer_eigen_dots(chosen) and chosen["XLA_FLAGS"].endswith("TYPE_DOT")
    kept = {"CLSP_KEEP_XLA_FLAGS": "1"}
    assert not clsp_jax.prefer_eigen_dots(kept) and "XLA_FLAGS" not in kept


@pytest.mark.skipif(not ON_JAXLIB_0_10, reason="the flag is set on jaxlib 0.10.x only")
def test_this_process_compiles_matmuls_without_ynnpack_and_the_peak_with_it():
    x = jnp.ones((256, 256))
    assert "ynn_fusion" not in jax.jit(jnp.matmul).lower(x, x).compile().as_text()
    ynn = jax.jit(jnp.matmul).lower(x, x).compile(
        compiler_options={clsp_jax.YNN_FLAG: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"})
    assert "ynn_fusion" in ynn.as_text()  # the option perf.peak_matmul_flops compiles with
    peak = perf.peak_matmul_flops(jnp.float32, 256, iters=2)
    assert peak["flops_per_s"] > 0 and len(peak["times_s"]) == 2


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


def test_release_compiled_programs_drops_compiled_programs_that_then_compile_again():
    double = jax.jit(lambda x: 2 * x)
    assert float(double(jnp.float32(3))) == 6.0 and double._cache_size() == 1
    perf.release_compiled_programs()
    assert double._cache_size() == 0
    assert float(double(jnp.float32(4))) == 8.0 and double._cache_size() == 1


def test_use_compilation_cache_writes_every_program_and_a_new_process_reads_it(tmp_path):
    """Even a program that compiles in milliseconds is written; a second process loads it instead of compiling.
    (In child processes: the cache, once on, stays on for the process.)"""
    script = ("import sys, jax, jax.numpy as jnp\n"
              "from clsp_jax import perf\n"
              "hits = []\n"
              "jax.monitoring.register_event_listener(lambda e, **kw: hits.append(e) if e.endswith('cache_hits') else None)\n"
              "perf.use_compilation_cache(sys.argv[1])\n"
              "assert float(jax.jit(lambda x: 3 * x + 1)(jnp.float32(2))) == 7.0\n"
              "print('hits', len(hits))\n")
    runs = [subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    hits = [int(run.stdout.split()[-1]) for run in runs]
    assert hits[0] == 0 and hits[1] >= 1, hits
    assert any(tmp_path.iterdir())
