"""Orbax checkpoints of a training run: the train state and the Grain iterator state, saved together.

Layout of a work dir:

    <workdir>/config.json            the resolved config of the run
    <workdir>/tokenizer.json         the text tower's tokenizer (for export)
    <workdir>/checkpoints/<step>/state   train state (step, params, opt_state, ema, nonfinite_streak[, average])
    <workdir>/checkpoints/<step>/data    the input iterator's JSON state after the same step

Saves are asynchronous; every `every_steps` steps and/or `every_minutes` minutes; the last `keep` are kept,
plus the best by `best_metric` when set. The work dir may be a local folder or a `gs://` URL: paths go through
`clsp_jax.storage` (etils.epath), never `os.path`.

Checkpoints that cannot be trusted after a crash or a full disk:

- A step folder without Orbax's commit marker (`commit_success.txt`, written last), or without the files every
  save writes (`_CHECKPOINT_METADATA`, `state/_METADATA`, `data/metadata`), is never taken as a checkpoint:
  before a run opens its checkpoints, `set_aside_incomplete` renames it to `<step>.corrupt-<n>` beside the
  others (never deleting it), so neither the resume nor the retention of the last `keep` counts it. Orbax's own
  `<step>.orbax-checkpoint-tmp*` folders of saves that never finished are removed.
- `restore_newest` tries the checkpoints newest first; one that fails to restore (a torn array file) is
  reported in one line, set aside the same way, and the next older one is tried.
- `Saver` reports a save that fails (no space, no permission) in one line, removes its partial folder and lets
  the next save retry; the checkpoints already saved are never touched by a failed save.
With several processes, process 0 alone renames and removes folders, and every process takes the same decision
(`clsp_jax.distributed.all_agree`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import sys
import types
from collections.abc import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from clsp_jax import averaging, distributed, storage
from clsp_jax.cli import one_line

log = logging.getLogger(__name__)
COMMIT_MARKER = "commit_success.txt"  # Orbax writes it last, locally and on GCS
ORBAX_TMP = ".orbax-checkpoint-tmp"  # Orbax's suffix of a save in progress (local work dirs)
# What every complete save holds besides the commit marker, checked without reading any array.
REQUIRED = ("_CHECKPOINT_METADATA", "state", "state/_METADATA", "data", "data/metadata")


class CheckpointError(ValueError):
    """The checkpoints of a work dir cannot be used as asked (one line for the user)."""


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
        save_policies.append(IntervalSinceStart(minimum_interval_secs=int(every_minutes * 60)))
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


@dataclasses.dataclass(kw_only=True)
class IntervalSinceStart(policies.ContinuousCheckpointingPolicy):
    """Orbax's time-based policy, with the interval also counted from when the run (this policy) started.

    Orbax's own saves as soon as there is no previous checkpoint (the first step of a fresh run) and counts
    from the restored checkpoint's save time on resume (so a resumed run saves at its first step too)."""

    started: datetime.datetime = dataclasses.field(
        default_factory=lambda: datetime.datetime.now(tz=datetime.timezone.utc))

    def should_save(self, step, previous_steps, *, context) -> bool:
        since = types.SimpleNamespace(step=-1, metrics=None, time=self.started)
        if previous_steps and previous_steps[-1].time > self.started:
            since = previous_steps[-1]
        return super().should_save(step, [since], context=context)


class _ReportedElsewhere(logging.Filter):
    """Drops the error records, with their tracebacks, that Orbax's threads (through absl) and asyncio (a
    failed write's unawaited futures; the gathered reads of a restore whose arrays failed after the first)
    log for a checkpoint that fails to save or restore: `Saver` and `restore_newest` report each such failure
    in one line. Other records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if record.name == "asyncio":
            return "orbax" not in record.getMessage() and not _raised_in_orbax(record.exc_info)
        return "/orbax/" not in record.pathname.replace(os.sep, "/")


def _raised_in_orbax(exc_info) -> bool:
    """Whether a record's exception passed through Orbax's code (a frame of its traceback is Orbax's)."""
    traceback = exc_info[2] if exc_info else None
    while traceback is not None:
        if "/orbax/" in traceback.tb_frame.f_code.co_filename.replace(os.sep, "/"):
            return True
        traceback = traceback.tb_next
    return False


def _late_callback(traceback) -> bool:
    """Whether a traceback lies wholly in asyncio's event loop: a callback that tensorstore hands to the loop
    of a failed save after Orbax has closed that loop ("Event loop is closed"), printed from C."""
    frames = []
    while traceback is not None:
        frames.append(traceback.tb_frame.f_code.co_filename.replace(os.sep, "/"))
        traceback = traceback.tb_next
    return bool(frames) and all(f.endswith("asyncio/base_events.py") for f in frames)


def _orbax_coroutine(obj) -> bool:
    """Whether `obj` is a coroutine of Orbax's: one of a failed read or write, collected unawaited after the
    failure was raised (and reported) through the save or restore that started it."""
    code = getattr(obj, "cr_code", None)
    return code is not None and "/orbax/" in code.co_filename.replace(os.sep, "/")


def quiet_reported_errors() -> None:
    """Installs `_ReportedElsewhere` on the loggers Orbax's and asyncio's records come through, and drops the
    late "Event loop is closed" callbacks of a failed save (`_late_callback`) and the "Exception ignored in"
    reports of Orbax's coroutines collected after a failed read (`_orbax_coroutine`); once per process."""
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ReportedElsewhere) for f in logger.filters):
            logger.addFilter(_ReportedElsewhere())
    if getattr(sys.excepthook, "drops_late_callbacks", False):
        return
    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

    def quiet_excepthook(kind, value, traceback):
        if not (kind is RuntimeError and str(value) == "Event loop is closed" and _late_callback(traceback)):
            excepthook(kind, value, traceback)

    def quiet_unraisablehook(unraisable):
        late = (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
                and _late_callback(unraisable.exc_traceback))
        if not (late or _orbax_coroutine(unraisable.object)):
            unraisablehook(unraisable)

    quiet_excepthook.drops_late_callbacks = True
    sys.excepthook, sys.unraisablehook = quiet_excepthook, quiet_unraisablehook


def step_folders(workdir: str | os.PathLike) -> dict[int, epath.Path]:
    """{step: folder} of every folder of `<workdir>/checkpoints` named by a step number, committed or not."""
    directory = checkpoint_dir(workdir)
    if not directory.is_dir():
        return {}
    return {int(p.name): p for p in directory.iterdir() if p.name.isdigit()}


def incomplete(folder: epath.Path) -> str | None:
    """Why the step folder `folder` is not a whole checkpoint, judged by the names in it (no array is read);
    None when nothing is missing."""
    if not (folder / COMMIT_MARKER).exists():
        return f"uncommitted (no {COMMIT_MARKER}: its save never finished)"
    missing = [name for name in REQUIRED if not (folder / name).exists()]
    return f"incomplete (no {', '.join(missing)})" if missing else None


def usable_steps(workdir: str | os.PathLike) -> tuple[list[int], dict[int, str]]:
    """(ascending steps of the whole checkpoints, {step: why not} of the other step folders), read-only: for
    export and evaluation, which may run beside a training run that is writing its next checkpoint."""
    usable, skipped = [], {}
    for step, folder in sorted(step_folders(workdir).items()):
        reason = incomplete(folder)
        if reason is None:
            usable.append(step)
        else:
            skipped[step] = reason
    return usable, skipped


def set_aside_folders(workdir: str | os.PathLike) -> list[str]:
    """Names of the step folders set aside in `<workdir>/checkpoints` (by this run or an earlier one)."""
    directory = checkpoint_dir(workdir)
    return sorted(p.name for p in directory.iterdir() if ".corrupt-" in p.name) if directory.is_dir() else []


def _set_aside(folder: epath.Path, reason: str) -> None:
    """Renames the unusable step folder to `<step>.corrupt-<n>` beside it (process 0 only; never deletes it);
    logs one line on process 0."""
    if jax.process_index() != 0:
        return
    n = 1
    while (target := folder.parent / f"{folder.name}.corrupt-{n}").exists():
        n += 1
    folder.rename(target)
    log.warning("checkpoint %s is %s: moved aside to %s", folder, reason, target.name)


def set_aside_incomplete(workdir: str | os.PathLike) -> None:
    """Before a training run opens its checkpoints: sets aside every step folder that is not a whole
    checkpoint (`incomplete`) and removes Orbax's temporary folders of saves that never finished. Process 0
    does it; every process waits for it."""
    if jax.process_index() == 0:
        for step, folder in sorted(step_folders(workdir).items()):
            reason = incomplete(folder)
            if reason is not None:
                _set_aside(folder, reason)
        _remove_partial_saves(workdir)
    distributed.barrier("clsp_checkpoints_checked")


def _remove_partial_saves(workdir: str | os.PathLike, step: int | None = None) -> None:
    """Removes Orbax's temporary folders (`<step>.orbax-checkpoint-tmp*`, all or those of `step`) and, for
    `step`, its uncommitted final folder (a failed save on GCS): partial saves, never restorable."""
    directory = checkpoint_dir(workdir)
    if not directory.is_dir():
        return
    for folder in directory.iterdir():
        name = folder.name
        if ORBAX_TMP in name and (step is None or name.split(ORBAX_TMP)[0] == str(step)):
            folder.rmtree(missing_ok=True)
        elif step is not None and name == str(step) and not (folder / COMMIT_MARKER).exists():
            folder.rmtree(missing_ok=True)


def restore_newest(manager: ocp.CheckpointManager, abstract_state, workdir: str | os.PathLike):
    """-> (state, data_state, step) of the newest checkpoint that restores, or None when none does.

    A checkpoint that fails to restore (on any process: a torn array file, a file gone) is reported in one
    line, set aside (`<step>.corrupt-<n>`, by process 0) and the next older one is tried; the manager is then
    reloaded, so that its retention never counts the checkpoint set aside."""
    folders = step_folders(workdir)
    for step in sorted(manager.all_steps(), reverse=True):
        error = None
        try:
            state, data_state = restore(manager, abstract_state, step)
        except Exception as e:  # noqa: BLE001 - any failure to read means: try the next older one
            error = one_line(e)
        if distributed.all_agree(f"clsp_restored_{step}", error is None):
            return state, data_state, step
        _set_aside(folders[step], f"unreadable ({error or 'it failed to restore on another process'})")
        distributed.barrier(f"clsp_set_aside_{step}")
        manager.reload()
    return None


class Saver:
    """The trainer's saves through `manager`, which survive a save that fails.

    A failed save (no space left, no permission; raised when it starts or, as saves are asynchronous, when it
    is waited for) is reported in one line, its partial folder removed, and the run goes on: the next save (by
    the policy) retries, and the checkpoints already saved stay (Orbax deletes old ones only after a new one
    has committed). Training on is the choice because a disk may get space back while the run goes on (other
    jobs' files removed, a quota raised), and then nothing is lost; if it does not, the run loses what it would
    have lost by stopping: the steps since the last checkpoint (`wait` tells the caller about the final save).
    """

    def __init__(self, manager: ocp.CheckpointManager, workdir: str | os.PathLike):
        self.manager, self.workdir = manager, workdir
        self.in_flight: int | None = None  # the step of the asynchronous save not yet waited for
        self.failed: list[int] = []  # steps whose save failed
        self.attempts = 0  # numbers the cross-process agreements (a step's save may be tried twice)

    def save(self, step: int, state, data_state: Mapping, *, metrics=None, force: bool = False) -> bool:
        """Starts a save of `step` when the policy says so or `force`; returns whether one started."""
        if not force and not self.manager.should_save(step):
            return False
        self.wait()  # the previous save's failure is reported as its own, and this save still starts
        self.attempts += 1
        try:
            save(self.manager, step, state, data_state, metrics=metrics, force=True)
            error = None
        except Exception as e:  # noqa: BLE001 - a save that cannot start is reported, not fatal
            error = one_line(e)
        if not distributed.all_agree(f"clsp_save_started_{self.attempts}", error is None):
            self._failed(step, error)
            return False
        self.in_flight = step
        return True

    def poll(self) -> None:
        """With one process: reports a failed save as soon as it has failed (and removes its partial folder,
        which would otherwise fill the disk until the next save). With several, the processes do not finish
        a save at the same step, so its outcome is only looked at together, at the next save or the end."""
        if self.in_flight is not None and jax.process_count() == 1 and not self.manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> bool:
        """Waits for the save in flight (if any); False, after reporting it, if it failed."""
        if self.in_flight is None:
            return True
        step, self.in_flight = self.in_flight, None
        try:
            self.manager.wait_until_finished()
            error = None
        except Exception as e:  # noqa: BLE001
            error = one_line(e)
        if distributed.all_agree(f"clsp_save_done_{self.attempts}", error is None):
            return True
        self._failed(step, error)
        return False

    def _failed(self, step: int, error: str | None) -> None:
        self.failed.append(step)
        if jax.process_index() == 0:
            _remove_partial_saves(self.workdir, step)
        distributed.barrier(f"clsp_save_cleaned_{self.attempts}")
        self.manager.reload()  # what is on disk now: the failed step gone, every older checkpoint kept
        log.warning("the checkpoint at step %d could not be saved (%s); checkpoints kept: %s; the next save "
                    "retries", step, error or "it failed on another process", self.manager.all_steps() or "none")


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


def restore_params(workdir: str | os.PathLike, step: int | None = None, use_ema: bool = False,
                   averaged: bool = False):
    """(params as a nested dict of numpy arrays, config dict, step) of a run, without its optimizer state.

    For export and evaluation: reads the saved state's `params` (or `ema`, or with `averaged` the float32
    rounding of icefall's running average, `restore_average`) into host memory, whatever the topology that
    saved it. Read-only: only whole checkpoints (`usable_steps`) count; a step folder that is not one, a
    checkpoint whose arrays do not read back, or one without the weights asked for raises CheckpointError
    (one line).
    """
    if use_ema and averaged:
        raise CheckpointError("choose the EMA or the averaged weights, not both")
    if averaged:
        weights, count, config, step = restore_average(workdir, step)
        if count == 0:
            raise CheckpointError(f"the checkpoint at step {step} has no averaged weights yet (the first fold is "
                                  f"at step optim.average_period = {config.get('optim', {}).get('average_period')})")
        return jax.tree.map(lambda x: x.astype(np.float32), weights), config, step
    key = "ema" if use_ema else "params"
    params, config, step = _restore_item(workdir, step, key, "no EMA weights (train.ema_decay was off)")
    return _match_keys(params, _param_template(config)), config, step


def restore_average(workdir: str | os.PathLike, step: int | None = None):
    """(weights, count, config dict, step): icefall's running average saved at `step` (default the latest),
    `clsp_jax.averaging`. weights: float64 numpy arrays nested as the params (mean + compensation); count:
    the snapshots it holds (0 before the first fold, when the weights are zeros). A run without averaging:
    CheckpointError."""
    average, config, step = _restore_item(workdir, step, "average",
                                          "no averaged weights (optim.average_period was off)")
    template = _param_template(config)
    weights = averaging.average_value({k: _match_keys(average[k], template) for k in ("mean", "comp")})
    return weights, int(average["count"]), config, step


def _restore_item(workdir, step: int | None, key: str, missing: str):
    """(the saved state's `key` subtree as host numpy arrays, config dict, step); `missing` completes the
    error "the checkpoint at step N has ..." when the state has no `key`."""
    steps, skipped = usable_steps(workdir)
    if step is None:
        if not steps:
            raise CheckpointError(f"no usable checkpoint under {checkpoint_dir(workdir)}"
                                  + "".join(f"; step {s} is {why}" for s, why in skipped.items()))
        step = steps[-1]
    elif step in skipped:
        raise CheckpointError(f"the checkpoint at step {step} is {skipped[step]}; usable steps: {steps or 'none'}")
    elif step not in steps:
        raise CheckpointError(f"no checkpoint at step {step}; usable steps: {steps or 'none'}")
    # Handlers named, so the saved tree's metadata can be read (it gives the restore targets below).
    manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=ocp.CheckpointManagerOptions(
        read_only=True, create=False), item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                                      "data": ocp.JsonCheckpointHandler()})
    try:
        saved = manager.item_metadata(step)["state"].tree
        if saved.get(key) is None:
            raise CheckpointError(f"the checkpoint at step {step} has {missing}")
        # Only `key`, as host numpy arrays: the devices and mesh that wrote the checkpoint (several processes, an
        # FSDP mesh) need not exist here, and the optimizer state is never read.
        wanted = {key: saved[key]}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=wanted, restore_args=restore_args, partial_restore=True)))["state"]
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to read the arrays: one line, naming the step
        older = [s for s in steps if s < step]
        raise CheckpointError(f"the checkpoint at step {step} does not restore ({one_line(e)})"
                              + (f"; older usable steps: {older}" if older else "")) from None
    finally:
        manager.close()
    config = json.loads((storage.resolve(workdir) / "config.json").read_text())
    return restored[key], config, step


def _param_template(config: Mapping) -> dict:
    """The parameters' ShapeDtypeStructs of the run's network, nested as `nnx.to_pure_dict` nests them."""
    from clsp_jax.inference import abstract_params

    return abstract_params(config["model"])


def _match_keys(tree, template):
    """`tree` with the key types of `template` (a restore without target turns int keys into strings)."""
    if not isinstance(template, Mapping):
        return tree
    return {k: _match_keys(tree[k] if k in tree else tree[str(k)], v) for k, v in template.items()}
