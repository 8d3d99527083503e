"""Orbax checkpoints of a training run: the train state and the Grain iterator state, saved together.

Layout of a work dir:

    <workdir>/config.json            the resolved config of the run
    <workdir>/tokenizer.json         the text tower's tokenizer (for export)
    <workdir>/checkpoints/<step>/state   train state (step, params, opt_state, ema, nonfinite_streak)
    <workdir>/checkpoints/<step>/data    the input iterator's JSON state after the same step

Saves are asynchronous; every `every_steps` steps and/or `every_minutes` minutes; the last `keep` are kept,
plus the best by `best_metric` when set. The work dir may be a local folder or a `gs://` URL: paths go through
`clsp_jax.storage` (etils.epath), never `os.path`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from clsp_jax import storage


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
    """`<workdir>/checkpoints` (a local work dir made absolute, a gs:// one kept as a URL)."""
    return storage.resolve(workdir) / "checkpoints"


def make_manager(workdir: str | os.PathLike, *, every_steps: int | None = None, every_minutes: float | None = None,
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


def restore_params(workdir: str | os.PathLike, step: int | None = None, use_ema: bool = False):
    """(params as a nested dict of numpy arrays, config dict, step) of a run, without its optimizer state.

    For export and evaluation: reads the saved state's `params` (or `ema`) into host memory, whatever the
    topology that saved it.
    """
    # Handlers named, so the saved tree's metadata can be read (it gives the restore targets below).
    manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=ocp.CheckpointManagerOptions(
        read_only=True, create=False), item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                                      "data": ocp.JsonCheckpointHandler()})
    steps = manager.all_steps()
    if not steps:
        raise FileNotFoundError(f"no checkpoints under {checkpoint_dir(workdir)}")
    step = max(steps) if step is None else step
    if step not in steps:
        raise ValueError(f"no checkpoint at step {step}; available: {sorted(steps)}")
    key = "ema" if use_ema else "params"
    saved = manager.item_metadata(step)["state"].tree
    if saved.get(key) is None:
        raise ValueError(f"the checkpoint at step {step} has no EMA weights (train.ema_decay was off)")
    # Only `key`, as host numpy arrays: the devices and mesh that wrote the checkpoint (several processes, an
    # FSDP mesh) need not exist here, and the optimizer state is never read.
    wanted = {key: saved[key]}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=wanted, restore_args=restore_args, partial_restore=True)))["state"]
    params = restored[key]
    config = json.loads((storage.resolve(workdir) / "config.json").read_text())
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
