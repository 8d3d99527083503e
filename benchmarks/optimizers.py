"""The optimizer's own cost: one jitted update (tx.update + apply_updates, state donated) of AdamW against
ScaledAdam on a config's parameters, with random gradients; no forward or backward pass.

    python -m benchmarks.optimizers --config configs/tiny.py [--iters 20] [--json OUT] [--config.key=value ...]

For each optimizer (optim.optimizer = "adamw", then "scaled_adam"; every other optim key as the config
sets it, so frozen parameters stay frozen) it prints the compile time and the median wall time of one
update, and the ratio ScaledAdam / AdamW. ScaledAdam's size update runs on every `size_update_period`-th
update only, so the median is taken over whole periods of calls. Parameters are random normal arrays of the
network's shapes (the values do not change the cost).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence


def parse_args(argv: Sequence[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=20, help="timed updates per optimizer (after a warm-up)")
    p.add_argument("--json", help="write the results here")
    return p.parse_known_args(argv)


def run(args, config) -> dict:
    import jax
    import numpy as np
    import optax
    from flax import nnx

    from benchmarks import common
    from clsp_jax import perf
    from clsp_jax import optim
    from clsp_jax.train.trainer import new_net, resolve_config

    config = resolve_config(config)
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: new_net(config, 0)), nnx.Param))
    rng = np.random.default_rng(0)
    random_like = lambda x: jax.numpy.asarray(0.02 * rng.standard_normal(x.shape, np.float32))
    params = jax.tree.map(random_like, abstract)
    grads = jax.tree.map(random_like, abstract)
    leaves = jax.tree.leaves(abstract)
    result = {"machine": common.machine(), "parameters": int(sum(x.size for x in leaves)),
              "tensors": len(leaves), "frozen": list(config.optim.frozen), "optimizers": {}}
    for name in ("adamw", "scaled_adam"):
        tx, _ = optim.make_optimizer(dict(config.optim.to_dict(), optimizer=name), abstract)

        def update(params, opt_state, grads):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        start = time.perf_counter()
        step = jax.jit(update, donate_argnums=(0, 1)).lower(params, jax.eval_shape(tx.init, params), grads).compile()
        compile_s = time.perf_counter() - start
        state = {"params": jax.tree.map(jax.numpy.copy, params), "opt": jax.jit(tx.init)(params)}

        def call():
            state["params"], state["opt"] = step(state["params"], state["opt"], grads)
            return state["params"]

        period = int(config.optim.size_update_period)
        iters = -(-args.iters // period) * period  # whole size-update periods
        times = perf.time_calls(call, warmup=period, iters=iters)
        result["optimizers"][name] = {"compile_s": round(compile_s, 2), **common.summary(times),
                                      "mean_s": float(np.mean(times))}
        print(f"{name}: compile {compile_s:.1f} s, update median {1e3 * np.median(times):.2f} ms, "
              f"mean {1e3 * np.mean(times):.2f} ms", flush=True)
    o = result["optimizers"]
    result["ratio_median"] = o["scaled_adam"]["median_s"] / o["adamw"]["median_s"]
    result["ratio_mean"] = o["scaled_adam"]["mean_s"] / o["adamw"]["mean_s"]
    print(f"{result['parameters'] / 1e6:.1f}M parameters in {result['tensors']} tensors; "
          f"ScaledAdam / AdamW per update: median {result['ratio_median']:.2f}x, mean {result['ratio_mean']:.2f}x")
    common.write_json(args.json, result)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    from benchmarks import common

    args, rest = parse_args(argv)
    run(args, common.load_config(rest))


if __name__ == "__main__":
    main()
