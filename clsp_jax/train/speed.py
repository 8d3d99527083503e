"""Speed inside training: the compiled step's FLOPs per batch shape, the device's peak FLOP/s, and a
jax.profiler trace of chosen steps.

The trainer turns these into metrics.jsonl / progress-line figures: model TFLOP/s per device (XLA's FLOPs of
the steps in the progress window over its wall time, data waits included) and MFU (that over the peak).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence

import jax

from clsp_jax import perf, storage

log = logging.getLogger("clsp_jax.train")


class StepFlops:
    """FLOPs per device of one call of the jitted train step `step_fn` (a `sharding.JittedTrainStep`), from
    XLA's cost analysis of its two compiled programs, one figure per distinct batch shape (audio buckets,
    token lengths)."""

    def __init__(self, step_fn: Callable):
        self.step_fn, self.flops = step_fn, {}

    def __call__(self, state, batch: Mapping[str, jax.Array]) -> float:
        key = tuple((k, v.shape) for k, v in sorted(batch.items()))
        if key not in self.flops:
            # These compilations are the step's own: the jitted call that follows finds the programs cached.
            self.flops[key] = sum(perf.xla_flops(p) for p in self.step_fn.compile(state, batch))
            perf.release_host_memory()  # before the step's buffers are allocated
        return self.flops[key]


def peak_flops_per_device(train_config, dtype, size: int = 0) -> float:
    """FLOP/s of one device at its peak: `train.peak_tflops_per_device` x 1e12 when set, else measured once
    here with a `size`^2 matmul in `dtype` (0: `perf.default_peak_size()`), which takes seconds on a CPU."""
    given = train_config.get("peak_tflops_per_device")
    if given:
        return float(given) * 1e12
    peak = perf.peak_matmul_flops(dtype, size or perf.default_peak_size())
    log.info("peak: %.3f TFLOP/s per device, measured (a %d^2 %s matmul; set train.peak_tflops_per_device to "
             "skip this)", peak["flops_per_s"] / 1e12, peak["size"], peak["dtype"])
    return peak["flops_per_s"]


def profile_range(steps: Sequence[int]) -> tuple[int, int] | None:
    """`train.profile_steps` checked: (first, last) with 1 <= first <= last, or None for () (no trace)."""
    if not steps:
        return None
    if len(steps) != 2 or not 1 <= int(steps[0]) <= int(steps[1]):
        raise ValueError(f"train.profile_steps must be (first, last) with 1 <= first <= last, got {tuple(steps)}")
    return int(steps[0]), int(steps[1])


class StepProfiler:
    """A jax.profiler trace of the steps `first`..`last` (1-based, as metrics.jsonl numbers them) into
    <workdir>/profile, which `tensorboard --logdir <workdir>/profile` opens in its profile tab. Process 0
    only (one trace per run; several processes on one host would write the same file). A remote work dir
    gets the trace uploaded when it stops."""

    def __init__(self, steps: Sequence[int], workdir: str):
        steps = profile_range(steps)
        self.enabled = steps is not None and jax.process_index() == 0
        self.first, self.last = steps or (0, 0)
        self.target = os.path.join(os.fspath(workdir), "profile")
        self.local = tempfile.mkdtemp(prefix="clsp_profile_") if self.enabled and storage.is_remote(workdir) \
            else self.target
        self.tracing = False

    def before(self, step: int) -> None:
        """Called before step `step` is dispatched; a resumed run past `first` starts at its first step."""
        if self.enabled and not self.tracing and self.first <= step <= self.last:
            jax.profiler.start_trace(self.local)
            self.tracing = True

    def after(self, step: int, outputs) -> None:
        """Called after step `step` is dispatched with its outputs; the trace ends once they are computed."""
        if self.tracing and step >= self.last:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        if not self.tracing:
            return
        jax.profiler.stop_trace()
        self.tracing, self.enabled = False, False
        if self.local != self.target:
            storage.upload_tree(self.local, self.target)
            shutil.rmtree(self.local, ignore_errors=True)
        log.info("profile of steps %d-%d written to %s (tensorboard --logdir %s)", self.first, self.last,
                 self.target, self.target)
