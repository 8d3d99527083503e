"""Export a training run's weights for inference: an Orbax `CLSP.save` folder, or the authors' PyTorch names.

    python -m clsp_jax.export --workdir RUN --out clsp_export --format orbax
    python -m clsp_jax.export --workdir RUN --out out/clsp.safetensors --format torch [--step N]
        [--average-last N] [--ema | --averaged]
    python -m clsp_jax.export --workdir RUN --out OUT --format orbax --average-between START END

- `orbax`: OUT is a folder that `CLSP.load(OUT)` reads (params/, config.json, tokenizer.json).
- `torch`: OUT is a `.safetensors` file under the icefall CLSP state-dict names and layouts (those of
  `CLSP.torch_state_dict()`), which the authors' PyTorch network loads with `load_state_dict(strict=True)`;
  `config.json` (`{"speech", "text", "joint_dim"}`, the reference fixtures' format, plus `logit_bias_init`
  for a SigLIP-trained model) and the run's `tokenizer.json` are written beside it, so `CLSP.from_torch(OUT, config, tokenizer=folder)` loads it too.

`--step` picks the checkpoint (default the latest). Which weights of it, three ways to average:
- `--average-last N`: the float32 mean of the N saved checkpoints ending at that step (of their raw weights,
  or with `--ema` of their EMAs); cheap, but only as many points as checkpoints were kept.
- `--ema`: the exponential moving average of the weights saved with each checkpoint (train with
  optim.ema_decay set): recent steps weigh most.
- icefall's model averaging (train with optim.average_period set, the authors' 200): the train step keeps the
  running mean of the weights at every period-th step since the start (`clsp_jax.averaging`), saved with
  each checkpoint. `--averaged` exports it as saved at --step; `--average-between START END` exports the
  mean of those snapshots after step START up to step END, computed in float64 from the running means saved
  at the two steps (icefall's `average_checkpoints_with_averaged_model`, how the authors evaluate and start
  each stage: START and END are saved checkpoints of the same run, and --step is not used).
Bad arguments (--ema, --average-last and the averaged weights do not combine), a work dir without
checkpoints or without the weights asked for, a missing step or an unusable OUT: a one-line error and exit
code 2. Only whole checkpoints
count (`clsp_jax.train.checkpoint.usable_steps`: a step folder without its commit marker, as of a save in
progress, is not one), and one whose arrays do not read back is named with the reason, also in one line and
exit code 2; the export never changes the run's folder.

RUN may be a `gs://` URL (read through etils.epath and Orbax); OUT is a local path (copy the export to a
bucket afterwards with `gcloud storage cp -r`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator

import jax
import numpy as np
from absl import logging as absl_logging

from clsp_jax import averaging, cli, storage
from clsp_jax.inference import CLSP
from clsp_jax.train import checkpoint

FORMATS = ("orbax", "torch")


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m clsp_jax.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True,
                   help="the training run's folder or gs:// URL (config.json, checkpoints/)")
    p.add_argument("--out", required=True, help="orbax: a local folder; torch: a local .safetensors file")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--average-last", type=int, default=1, metavar="N",
                   help="average the N saved checkpoints ending at --step (default 1: no averaging)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw ones")
    p.add_argument("--averaged", action="store_true",
                   help="export icefall's running average of the weights saved at --step (optim.average_period)")
    p.add_argument("--average-between", type=int, nargs=2, metavar=("START", "END"),
                   help="export icefall's average of the weights between two saved steps: the running average's "
                        "snapshots after START up to END (float64)")
    return p


def select_steps(saved: list[int], step: int | None, average_last: int) -> list[int]:
    """The `average_last` saved steps ending at `step` (default the latest), ascending."""
    if not saved:
        raise ValueError("no checkpoints saved yet")
    saved = sorted(saved)
    end = saved[-1] if step is None else step
    if end not in saved:
        raise ValueError(f"no checkpoint at step {end}; saved steps: {saved}")
    if average_last < 1:
        raise ValueError(f"--average-last must be >= 1, got {average_last}")
    pool = [s for s in saved if s <= end]
    if average_last > len(pool):
        raise ValueError(f"--average-last {average_last}: only {len(pool)} checkpoint(s) up to step {end} "
                         f"({pool})")
    return pool[-average_last:]


def average_params(workdir: str, steps: list[int], use_ema: bool = False):
    """-> (float32 mean of the params of `steps` as a nested dict of numpy arrays, the run's config)."""
    total, config = None, None
    for step in steps:
        params, config, _ = checkpoint.restore_params(workdir, step, use_ema=use_ema)
        params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
        total = params if total is None else jax.tree.map(np.add, total, params)
    return jax.tree.map(lambda x: x / np.float32(len(steps)), total), config


def averaged_between(workdir: str, start: int, end: int):
    """-> (float64 mean of the running average's snapshots after step `start` up to step `end`, nested as the
    params; the number of those snapshots; the run's config), from the running averages saved at both."""
    if not start < end:
        raise ValueError(f"--average-between {start} {end}: START must be before END")
    a_start, n_start, _, _ = checkpoint.restore_average(workdir, start)
    a_end, n_end, config, _ = checkpoint.restore_average(workdir, end)
    if n_end == n_start:
        period = config.get("optim", {}).get("average_period")
        raise ValueError(f"--average-between {start} {end}: no snapshot of the running average between the two "
                         f"steps (one every {period} steps)")
    return averaging.average_between((n_start, a_start), (n_end, a_end)), n_end - n_start, config


def _check_workdir(workdir: str) -> None:
    run = storage.resolve(workdir)
    if not run.is_dir():
        raise ValueError(f"--workdir {workdir} does not exist")
    config = run / "config.json"
    if not config.is_file():
        raise ValueError(f"--workdir {workdir} has no config.json (not a training run's folder)")
    if not isinstance(json.loads(config.read_text()).get("model"), dict):
        raise ValueError(f"{config} has no 'model' section")


def _check_out(out: str, fmt: str, workdir: str) -> None:
    if storage.is_remote(out):
        raise ValueError(f"--out {out}: write the export to a local path, then copy it "
                         "(gcloud storage cp -r OUT gs://...)")
    out = os.path.abspath(out)
    if storage.is_remote(workdir):  # a local OUT cannot be inside a remote run
        workdir = None
    else:
        workdir = os.path.abspath(workdir)
        inside = lambda path, folder: os.path.commonpath([path, folder]) == folder
        if inside(out, os.fspath(checkpoint.checkpoint_dir(workdir))):
            raise ValueError(f"--out {out} is inside the run's checkpoints folder")
    if fmt == "orbax":
        if out == workdir:
            raise ValueError("--out must not be the work dir itself (its config.json would be replaced)")
        if os.path.isfile(out):
            raise ValueError(f"--out {out} is a file; the orbax format writes a folder")
        if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, "config.json")):
            raise ValueError(f"--out {out} is a non-empty folder that is not a CLSP export")
    else:
        if not out.endswith(".safetensors"):
            raise ValueError(f"--out {out}: the torch format writes a .safetensors file")
        if os.path.isdir(out):
            raise ValueError(f"--out {out} is a folder; the torch format writes a .safetensors file")
        if os.path.dirname(out) == workdir:
            raise ValueError("--out must not sit in the work dir itself (config.json beside it would replace "
                             "the run's)")


def write_torch(model: CLSP, out: str) -> None:
    """`out` (.safetensors, icefall names) + config.json and tokenizer.json (if any) beside it."""
    from safetensors.numpy import save_file

    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    # "format": "pt" is the metadata Hugging Face writes for PyTorch weights.
    save_file(model.torch_state_dict(), out, metadata={"format": "pt"})
    config = {k: model.config[k] for k in ("speech", "text", "joint_dim", "logit_bias_init")
              if model.config.get(k) is not None}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if model.tokenizer is not None:
        shutil.copyfile(model.tokenizer.path, os.path.join(folder, "tokenizer.json"))


@contextlib.contextmanager
def _local_tokenizer(workdir: str) -> Iterator[str | None]:
    """The run's tokenizer.json as a local path (None if the run has none), for the duration of the export.

    The export copies the file beside the weights; a remote run's is first downloaded to a temporary folder
    (removed after), so the copy is a local one."""
    remote = storage.resolve(workdir) / "tokenizer.json"
    if not remote.is_file():
        yield None
    elif not storage.is_remote(workdir):
        yield os.fspath(remote)
    else:
        with tempfile.TemporaryDirectory(prefix="clsp_export_") as tmp:
            local = os.path.join(tmp, "tokenizer.json")
            with open(local, "wb") as f:
                f.write(remote.read_bytes())
            yield local


def export(workdir: str, out: str, fmt: str, step: int | None = None, average_last: int = 1,
           use_ema: bool = False, averaged: bool = False, average_between: tuple[int, int] | None = None) -> str:
    """Writes the export (see the module doc); returns which weights it holds, in words."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: choose from {FORMATS}")
    _check_weights(step, average_last, use_ema, averaged, average_between)
    _check_workdir(workdir)
    if fmt == "orbax" and not (storage.resolve(workdir) / "tokenizer.json").is_file():
        raise ValueError(f"--workdir {workdir} has no tokenizer.json (the orbax export carries it)")
    _check_out(out, fmt, workdir)
    saved, skipped = checkpoint.usable_steps(workdir)
    for s in [step] if average_between is None else average_between:
        if s is not None and s in skipped:
            raise ValueError(f"the checkpoint at step {s} is {skipped[s]}; usable steps: {saved or 'none'}")
    if not saved:
        raise ValueError(f"--workdir {workdir} has no checkpoints under {checkpoint.checkpoint_dir(workdir)}"
                         + "".join(f" (step {s} is {why})" for s, why in skipped.items()))
    if average_between is not None:
        start, end = average_between
        for s in average_between:
            select_steps(saved, s, 1)  # a saved step, or the error naming the saved ones
        params, count, config = averaged_between(workdir, start, end)
        params = jax.tree.map(lambda x: x.astype(np.float32), params)
        which = f"the average between steps {start} and {end} ({count} snapshots of the running average)"
    elif averaged:
        (end,) = select_steps(saved, step, 1)
        params, config, _ = checkpoint.restore_params(workdir, end, averaged=True)
        which = f"step {end} (averaged weights: the running average)"
    else:
        steps = select_steps(saved, step, average_last)
        params, config = average_params(workdir, steps, use_ema)
        which = f"step {steps[0]}" if len(steps) == 1 else f"the average of steps {', '.join(map(str, steps))}"
        which += f" ({'EMA weights' if use_ema else 'weights'})"
    with _local_tokenizer(workdir) as tokenizer:
        model = CLSP.from_params(params, config["model"], tokenizer)
        if fmt == "orbax":
            model.save(out)
        else:
            write_torch(model, out)
    return which


def _check_weights(step, average_last: int, use_ema: bool, averaged: bool, average_between) -> None:
    """The weight options combine as the module doc says, or ValueError."""
    if averaged and average_between is not None:
        raise ValueError("--averaged and --average-between exclude each other (--averaged exports the running "
                         "average at --step)")
    if averaged or average_between is not None:
        flag = "--averaged" if averaged else "--average-between"
        if use_ema:
            raise ValueError(f"--ema and {flag} exclude each other (the EMA and icefall's average are two "
                             "different averages)")
        if average_last != 1:
            raise ValueError(f"--average-last and {flag} exclude each other (--average-between averages "
                             "between two saved steps)")
    if average_between is not None and step is not None:
        raise ValueError("--average-between START END names its own steps; drop --step")


def main(argv: list[str] | None = None) -> int:
    """The CLI (see the module doc); returns the exit code."""
    checkpoint.quiet_reported_errors()  # a checkpoint that does not read back is reported in one line below
    try:
        args = _parser().parse_args(argv)
        which = export(args.workdir, args.out, args.format, args.step, args.average_last, args.ema, args.averaged,
                       args.average_between)
    except (ValueError, OSError) as e:
        return cli.usage_error("clsp_jax.export", e)
    print(f"exported {which} of {storage.resolve(args.workdir)} to {os.path.abspath(args.out)} ({args.format})")
    return 0


if __name__ == "__main__":
    # Orbax's notes on read-only managers and on reading shardings from file say nothing to the user here.
    absl_logging.set_verbosity(absl_logging.ERROR)
    warnings.filterwarnings("ignore", message="Sharding info not provided")
    sys.exit(main())
