"""Orbax checkpoints of a training run: the train state and the Grain iterator state, saved together.

Layout of a work dir:

    <workdir>/config.json            the resolved config of the run
    <workdir>/tokenizer.json         the text tower's tokenizer (for export)
    <workdir>/checkpoints/<step>/state   train state (step, params, opt_state, ema, nonfinite_streak)
    <workdir>/checkpoints/<step>/data    the input iterator's JSON state after the same step

Saves are asynchronous; every `every_steps` steps and/or `every_minutes` minutes; the last `keep` are kept,
plus the best by `best_metric` when set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, *, every_steps: int | None = None, every_minutes: float | None = None,
                 keep: int = 3, best_metric: str | None = None, best_mode: str = "max",
                 read_only: bool = False) -> ocp.CheckpointManager:
    save_policies = []
    if every_steps:
        save_policies.append(policies.FixedIntervalPolicy(int(every_steps)))
    if every_minutes:
        save_policies.append(policies.ContinuousCheckpointingPolicy(minimum_interval_secs=int(every_minutes * 60)))
    preserve = [policies.LatestN(n=keep)]
    if best_metric:
        preserve.append(policies.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min", n=1,
                                       keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy(save_policies) if save_policies else None,
        preservation_policy=policies.AnyPreservationPolicy(preserve),
        read_only=read_only,
        create=not read_only,
        enable_async_checkpointing=True,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=("state", "data"))


def save(manager: ocp.CheckpointManager, step: int, state, data_state: Mapping, *, metrics=None,
         force: bool = False) -> bool:
    """Saves (asynchronously) when the policy says so or `force`; returns whether a save started."""
    return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      data=ocp.args.JsonSave(dict(data_state))),
                        metrics=metrics, force=force)


def abstract_like(state, shardings=None):
    """ShapeDtypeStructs (with shardings) describing `state`, the target of a restore."""
    if shardings is None:
        return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def restore(manager: ocp.CheckpointManager, abstract_state, step: int | None = None):
    """-> (state, data_state) of `step` (default the latest)."""
    step = manager.latest_step() if step is None else step
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]


def restore_params(workdir: str, step: int | None = None, use_ema: bool = False):
    """(params as a nested dict of numpy arrays, config dict, step) of a run, without its optimizer state.

    For export and evaluation: reads the saved state's `params` (or `ema`) item with no target, on host.
    """
    manager = make_manager(workdir, read_only=True)
    steps = manager.all_steps()
    if not steps:
        raise FileNotFoundError(f"no checkpoints under {checkpoint_dir(workdir)}")
    step = max(steps) if step is None else step
    if step not in steps:
        raise ValueError(f"no checkpoint at step {step}; available: {sorted(steps)}")
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))["state"]
    params = restored.get("ema") if use_ema else restored["params"]
    if params is None:
        raise ValueError(f"the checkpoint at step {step} has no EMA weights (train.ema_decay was off)")
    with open(os.path.join(os.path.abspath(workdir), "config.json")) as f:
        config = json.load(f)
    from flax import nnx

    from clsp_jax.models.clsp import CLSPNet

    template = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: CLSPNet(config["model"], rngs=nnx.Rngs(0))),
                                          nnx.Param))
    return _match_keys(params, template), config, step


def _match_keys(tree, template):
    """`tree` with the key types of `template` (a restore without target turns int keys into strings)."""
    if not isinstance(template, Mapping):
        return tree
    return {k: _match_keys(tree[k] if k in tree else tree[str(k)], v) for k, v in template.items()}
