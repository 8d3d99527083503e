"""Speed measurements the trainer and the benchmarks share: wall-clock timing of jitted calls, the device's
measured peak matmul FLOP/s, and XLA's FLOP and memory analyses of a compiled executable; and giving the
compiler's freed host memory back to the OS after a compilation, and start-up's programs before one."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from clsp_jax import YNN_FLAG


def time_calls(fn: Callable[[], object], warmup: int, iters: int) -> list[float]:
    """Wall seconds of `iters` calls of `fn` (each waited for with block_until_ready) after `warmup` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def peak_matmul_flops(dtype, size: int, iters: int | None = None) -> dict:
    """The best of `iters` [size, size] @ [size, size] matmuls in `dtype` on the default device: FLOP/s
    this device reaches now (on CPU with YNNPACK, XLA's faster matmul library for this shape). Default iters:
    3 on CPU (seconds each), 20 on accelerators (milliseconds each).
    Returns {"size", "dtype", "flops_per_s", "times_s"}."""
    iters = iters or (3 if jax.devices()[0].platform == "cpu" else 20)
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (size, size), dtype)
    b = jax.random.normal(key_b, (size, size), dtype)
    lowered = jax.jit(jnp.matmul).lower(a, b)
    matmul = None
    if jax.devices()[0].platform == "cpu":
        # XLA:CPU's fastest square matmul is YNNPACK's (about twice its Eigen one), which clsp_jax turns off for
        # the networks' programs (`clsp_jax.prefer_eigen_dots`): the peak keeps it.
        try:
            matmul = lowered.compile(compiler_options={YNN_FLAG: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"})
        except jax.errors.JaxRuntimeError:  # a jaxlib without that option
            pass
    matmul = matmul or lowered.compile()
    times = time_calls(lambda: matmul(a, b), warmup=1, iters=iters)
    return {"size": size, "dtype": jnp.dtype(dtype).name, "flops_per_s": 2.0 * size**3 / min(times),
            "times_s": [round(t, 4) for t in times]}


def default_peak_size() -> int:
    """The matmul size of `peak_matmul_flops` that saturates the default device: 4096 on CPU, 8192 else."""
    return 4096 if jax.devices()[0].platform == "cpu" else 8192


def memory_stats(*compiled) -> dict:
    """Per-device bytes of compiled executables that run one after the other (XLA's buffer assignment):
    each field the largest of theirs ({} when XLA gives no analysis)."""
    analyses = [c.memory_analysis() for c in compiled]
    if not analyses or any(m is None for m in analyses):
        return {}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes", "peak_memory_in_bytes")
    return {k: max(int(getattr(m, k)) for m in analyses) for k in keys if hasattr(analyses[0], k)}


def xla_flops(compiled) -> float:
    """FLOPs of one call of a compiled executable per device, as XLA's cost analysis counts them (NaN when
    the backend reports none)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per executable
        cost = cost[0]
    return float((cost or {}).get("flops", float("nan")))


@functools.cache
def _libc_malloc_trim():
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return getattr(libc, "malloc_trim", None)


def use_compilation_cache(path: str) -> None:
    """JAX's persistent compilation cache in `path` for every program, down to the few hundred small ones of
    the network's eager initialisation (seconds each time otherwise)."""
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def release_host_memory() -> None:
    """Give the host memory that freed allocations still hold back to the OS (glibc's `malloc_trim`; a no-op
    elsewhere). XLA:CPU's compiler frees most of what it allocated when a compilation ends, but glibc keeps it
    in its heaps, so a process's resident memory stays at the compilation's peak and the step's buffers come
    on top. Called after compiling the train step, before it runs."""
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)


def release_compiled_programs() -> None:
    """Drop every program JAX has compiled or traced in this process so far, then `release_host_memory`.

    For start-up, before the train step compiles: the network's eager initialisation alone compiles a few
    hundred small programs that never run again, and their executables and traces stay resident while the
    compiler holds the step's program, the process's peak. A program that is called again compiles again (or
    loads from the persistent compilation cache)."""
    jax.clear_caches()
    gc.collect()
    release_host_memory()
