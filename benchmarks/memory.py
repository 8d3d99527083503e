"""Per-device memory of the sharded train step, from abstract shapes only (nothing is allocated).

    python -m benchmarks.memory --config configs/clsp_base.py --fake-devices 8 --mesh 1,8,1 \
        [--batch-clips 8 --clip-seconds 4 --text-length 64] [--remat layer] [--no-compile] [--json OUT]
        [--config.key=value ...]

Prints (1) the train state's bytes per device under the mesh's parameter shardings (params, optimizer
state, EMA, running average), (2) the sharding report: the largest weights left fully replicated, and whether
`sharding.check_no_large_replicated` accepts the layout, and (3) unless --no-compile, XLA's memory analysis
of the compiled step (arguments, outputs, aliased = donated, temporaries, generated code) per device. The
step is lowered from `jax.ShapeDtypeStruct`s carrying their shardings, so a 724M-parameter model compiles
for 8 devices on a laptop. `--fake-devices N` makes XLA:CPU expose N devices (set before JAX starts).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Sequence


def parse_args(argv: Sequence[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fake-devices", type=int, default=0, help="expose this many XLA:CPU devices (0: real ones)")
    p.add_argument("--mesh", default="", help="(data, fsdp, tensor) as 'a,b,c' (default: the config's train.mesh)")
    p.add_argument("--batch-clips", type=int, default=8, help="clips per global batch")
    p.add_argument("--clip-seconds", type=float, default=4.0, help="padded clip length")
    p.add_argument("--text-length", type=int, default=64, help="tokens per caption")
    p.add_argument("--remat", choices=("none", "layer", "layer_save_dots"), help="sets config.model.remat")
    p.add_argument("--no-compile", action="store_true", help="only the state bytes and the sharding report")
    p.add_argument("--json", help="write the results here")
    return p.parse_known_args(argv)


def _bytes_per_device(tree, shardings) -> int:
    """Bytes one device holds of `tree` (ShapeDtypeStructs) under `shardings` (the largest device's share)."""
    import jax
    import numpy as np

    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        total += math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
    return total


def run(args, config) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks import common
    from clsp_jax import perf
    from clsp_jax import losses, optim, sharding
    from clsp_jax.models.clsp import CLSPNet
    from clsp_jax.train.state import state_from_params, state_shardings
    from clsp_jax.train.step import make_train_step
    from clsp_jax.train.trainer import DTYPES, resolve_config

    config = resolve_config(config)  # the objective (from data.stage unless loss.objective names one)

    t = config.train
    if args.remat:
        with config.unlocked():
            config.model.remat = args.remat
    mesh_shape = [int(v) for v in args.mesh.split(",")] if args.mesh else list(t.mesh)
    mesh = sharding.make_mesh(mesh_shape)
    dtype = DTYPES[t.compute_dtype]
    net = nnx.eval_shape(lambda: CLSPNet(config.model.to_dict(), rngs=nnx.Rngs(0), dtype=dtype,
                                         param_dtype=jnp.float32))
    graphdef, params, rest = nnx.split(net, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    tx, schedule = optim.make_optimizer(config.optim.to_dict(), params)
    ema = config.optim.get("ema_decay") is not None
    average = bool(config.optim.get("average_period"))
    state = jax.eval_shape(lambda p: state_from_params(p, tx, ema, average), params)
    shardings = state_shardings(state, mesh)

    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    state_bytes = {k: _bytes_per_device(state[k], shardings[k]) for k in ("params", "opt_state", "ema", "average")
                   if k in state}
    replicated = sharding.replicated_report(params, shardings["params"], top=5)
    try:
        sharding.check_no_large_replicated(params, shardings["params"], mesh)
        check = "ok"
    except ValueError as e:
        check = str(e)
    result = {
        "benchmark": "memory",
        "devices": jax.device_count(),
        "platform": jax.devices()[0].platform,
        "mesh": dict(mesh.shape),
        "compute_dtype": t.compute_dtype,
        "remat": config.model.get("remat", "none"),
        "objective": config.loss.objective,
        "parameters": n_params,
        "state_bytes_per_device": state_bytes,
        "largest_replicated": replicated,
        "check_no_large_replicated": check,
    }
    if not args.no_compile:
        captions = losses.OBJECTIVES[config.loss.objective].captions
        b, n, l = args.batch_clips, round(args.clip_seconds * config.data.sample_rate), args.text_length
        batch = {"audio": ((b, n), jnp.float32), "audio_lens": ((b,), jnp.int32),
                 "input_ids": ((b, captions, l), jnp.int32), "attention_mask": ((b, captions, l), jnp.int32)}
        if captions == 3:
            batch["negative_valid"] = ((b,), jnp.bool_)
        batch = {k: jax.ShapeDtypeStruct(shape, dt, sharding=sharding.batch_sharding(mesh, len(shape)))
                 for k, (shape, dt) in batch.items()}
        abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                      state, shardings)
        step_fn = make_train_step(graphdef, rest, tx, schedule, objective=config.loss.objective,
                                  loss_cfg=config.loss.to_dict(), seed=int(t.seed),
                                  ema_decay=config.optim.get("ema_decay"), frozen=list(config.optim.frozen),
                                  mesh=mesh, average_period=config.optim.get("average_period"))
        step = sharding.JittedTrainStep(step_fn, shardings, mesh)
        start = time.perf_counter()
        programs = step.compile(abstract_state, batch)
        result["compile_s"] = round(time.perf_counter() - start, 1)
        result["batch"] = {"clips": b, "clip_seconds": args.clip_seconds, "captions": captions, "text_length": l}
        result["step_memory_per_device"] = perf.memory_stats(*programs)  # each field the larger program's
    report(result)
    common.write_json(args.json, result)
    return result


def report(r: dict) -> None:
    from benchmarks.common import gib

    print(f"{r['devices']} {r['platform']} devices, mesh {r['mesh']}, {r['parameters'] / 1e6:.1f}M parameters, "
          f"compute {r['compute_dtype']}, remat {r['remat']}, objective {r['objective']}")
    s = r["state_bytes_per_device"]
    print(f"train state per device: params {gib(s['params'])}, optimizer {gib(s['opt_state'])}, "
          f"ema {gib(s['ema'])}, " + (f"running average {gib(s['average'])}, " if "average" in s else "")
          + f"total {gib(sum(s.values()))}")
    print("largest fully replicated weights:")
    for path, n in r["largest_replicated"]:
        print(f"  {path}: {n:,} elements ({gib(4 * n)} float32)")
    print(f"check_no_large_replicated: {r['check_no_large_replicated']}")
    if "step_memory_per_device" in r:
        b = r["batch"]
        print(f"compiled step ({b['clips']} clips x {b['clip_seconds']} s, {b['captions']} x {b['text_length']} "
              f"tokens; compile {r['compile_s']} s), per device:")
        for k, v in r["step_memory_per_device"].items():
            print(f"  {k.replace('_in_bytes', '')}: {gib(v)}")


def main(argv: Sequence[str] | None = None) -> None:
    args, rest = parse_args(argv)
    if args.fake_devices:  # read when XLA's CPU backend starts, i.e. at the first device query below
        os.environ["JAX_PLATFORMS"] = "cpu"
        # Intra-op threads off: jax 0.11's XLA:CPU deadlocks when several fake devices run FFTs at once.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.fake_devices}"
                                   + " --xla_cpu_multi_thread_eigen=false").strip()
    from benchmarks import common

    run(args, common.load_config(rest))


if __name__ == "__main__":
    main()
