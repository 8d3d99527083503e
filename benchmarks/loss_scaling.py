"""Sharded contrastive losses vs global batch size on 8 fake CPU devices: time and per-device memory.

    python -m benchmarks.loss_scaling [--batches 64 256 1024 4096] [--dim 512] [--iters 3] [--json OUT]

For each loss (infonce, multi_positive with K=2 captions, siglip = the sigmoid loss's ppermute ring) and
global batch B over a (data=8) mesh, the jitted loss + gradient w.r.t. the embeddings (and temperature) is
compiled and timed; memory is XLA's per-device buffer assignment (`memory_analysis()`). The softmax losses hold the
local rows against every column, [B/8, K*B] logits per device (so memory grows with B^2/8); the sigmoid
ring holds one [B/8, B/8] block at a time. "logits MiB" is that analytic size of one float32 logits block
set: infonce B_l*B, multi_positive 2*K*B_l*B (both directions), siglip B_l*B_l. "gathered MiB" is the
all-gathered features each device holds for the softmax losses (audio + text, [B, D] each, text [B, K, D]
for multi_positive) and, for the ring, the text blocks its rematerialised scan saves ((devices-1) x
[B_l, D]); at D=512 these dominate the logits until B_l ~ D.

XLA_FLAGS gets --xla_force_host_platform_device_count=8 before JAX starts (run it as its own process).
"""

import os

_DEVICES = 8
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Intra-op threads off: jax 0.11's XLA:CPU deadlocks when several fake devices run FFTs at once.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_DEVICES}"
                               " --xla_cpu_multi_thread_eigen=false").strip()

import argparse  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common  # noqa: E402
from clsp_jax import perf  # noqa: E402
from clsp_jax import losses, sharding  # noqa: E402

CAPTIONS = 2  # multi_positive: global + fine-grained caption per clip


def _inputs(name: str, batch: int, dim: int):
    """(args, argnums to differentiate) of loss `name` on random unit embeddings."""
    keys = jax.random.split(jax.random.key(0), 2)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    audio = unit(jax.random.normal(keys[0], (batch, dim)))
    scale = jnp.asarray(1 / 0.07, jnp.float32)
    if name == "multi_positive":
        return (audio, unit(jax.random.normal(keys[1], (batch, CAPTIONS, dim))), scale), (0, 1, 2)
    text = unit(jax.random.normal(keys[1], (batch, dim)))
    if name == "siglip":
        return (audio, text, jnp.asarray(10.0, jnp.float32), jnp.asarray(-10.0, jnp.float32)), (0, 1, 2, 3)
    return (audio, text, scale), (0, 1, 2)


# Named as the objectives that train with them (clsp_jax.losses.OBJECTIVES).
LOSSES = {"infonce": losses.infonce_loss, "multi_positive": losses.multi_positive_loss, "siglip": losses.sigmoid_loss}


def logits_bytes(name: str, batch: int) -> int:
    local = batch // _DEVICES
    return 4 * {"infonce": local * batch, "multi_positive": 2 * CAPTIONS * local * batch, "siglip": local * local}[name]


def gathered_bytes(name: str, batch: int, dim: int) -> int:
    local = batch // _DEVICES
    return 4 * dim * {"infonce": 2 * batch, "multi_positive": (1 + CAPTIONS) * batch,
                      "siglip": (_DEVICES - 1) * local}[name]


def measure(name: str, batch: int, dim: int, mesh, warmup: int, iters: int) -> dict:
    args, argnums = _inputs(name, batch, dim)
    args = tuple(jax.device_put(x, sharding.batch_sharding(mesh, x.ndim)) if x.ndim else x for x in args)
    loss = losses.sharded(LOSSES[name], mesh)
    fn = jax.jit(jax.value_and_grad(lambda *a: loss(*a)[0], argnums=argnums))
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - start
    times = perf.time_calls(lambda: compiled(*args), warmup, iters)
    mem = perf.memory_stats(compiled)
    return {"loss": name, "global_batch": batch, "local_batch": batch // _DEVICES, "compile_s": compile_s,
            **common.summary(times), "memory_per_device": mem, "logits_bytes_per_device": logits_bytes(name, batch),
            "gathered_bytes_per_device": gathered_bytes(name, batch, dim)}


def run(args) -> dict:
    if jax.device_count() != _DEVICES:
        raise SystemExit(f"expected {_DEVICES} devices, got {jax.device_count()} (XLA_FLAGS={os.environ.get('XLA_FLAGS')})")
    mesh = sharding.make_mesh((_DEVICES, 1, 1))
    info = common.machine()
    print(f"machine: {info}")
    print(f"{'loss':15s} {'B':>6s} {'B/dev':>6s} {'fwd+bwd s':>10s} {'temp MiB/dev':>13s} {'args MiB/dev':>13s} "
          f"{'logits MiB':>11s} {'gathered MiB':>13s}", flush=True)
    rows = []
    for name in args.losses:
        for batch in args.batches:
            r = measure(name, batch, args.dim, mesh, args.warmup, args.iters)
            rows.append(r)
            m = r["memory_per_device"]
            print(f"{name:15s} {batch:6d} {r['local_batch']:6d} {r['median_s']:10.4f} "
                  f"{m.get('temp_size_in_bytes', 0) / 2**20:13.2f} {m.get('argument_size_in_bytes', 0) / 2**20:13.2f} "
                  f"{r['logits_bytes_per_device'] / 2**20:11.2f} {r['gathered_bytes_per_device'] / 2**20:13.2f}",
                  flush=True)
    return {"benchmark": "loss_scaling", "machine": info, "devices": _DEVICES, "dim": args.dim, "rows": rows}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024, 4096], help="global batch sizes")
    p.add_argument("--dim", type=int, default=512, help="embedding size (the paper's joint dim)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json")
    args = p.parse_args(argv)
    bad = [b for b in args.batches if b % _DEVICES]
    if bad:
        p.error(f"global batch sizes must divide by {_DEVICES}: {bad}")
    common.write_json(args.json, run(args))


if __name__ == "__main__":
    main()
