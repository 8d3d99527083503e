"""What the command-line programs (`clsp_jax.eval`, `clsp_jax.embed`, `clsp_jax.export`, `data_prep.prepare`)
share: bad arguments and bad inputs end the same way, as one line on stderr and exit code 2; checkpoints
load through `load_model` (an exported CLSP) or `load_run` (a training run's checkpoint), whose failures are
such a line too.

    def main(argv=None) -> int:
        try:
            args = cli.ArgumentParser(prog="python -m clsp_jax.x", description=...).parse_args(argv)
            ...                                   # raise ValueError for a bad input
        except ValueError as e:
            return cli.usage_error("clsp_jax.x", e)
"""

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clsp_jax.inference import CLSP

USAGE_ERROR = 2  # the exit code argparse itself uses for bad arguments


class ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise ValueError(message) instead of printing the usage and exiting, so
    the program reports them like its other input errors (`usage_error`). --help still prints and exits 0."""

    def error(self, message):
        raise ValueError(message)


def usage_error(prog: str, error: Exception) -> int:
    """Prints "<prog>: error: <error>" on stderr; returns the exit code for it (2)."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return USAGE_ERROR


def load_model(checkpoint: str) -> "CLSP":
    """A `CLSP.save` folder, or a `.safetensors` file with its config.json (+ tokenizer.json) beside it.

    Raises ValueError naming the checkpoint for anything that stops it loading."""
    # Imported here: data_prep.prepare uses this module without jax.
    from clsp_jax.inference import CLSP

    path = Path(checkpoint)
    torch = path.suffix == ".safetensors"
    if torch and not path.is_file():
        raise ValueError(f"--checkpoint {path} does not exist")
    config_path = (path.parent if torch else path) / "config.json"
    if not config_path.is_file():
        raise ValueError(f"--checkpoint {path} has no config.json beside it" if torch else
                         f"--checkpoint {path} is neither a saved CLSP folder (no config.json) nor a .safetensors file")
    try:
        if not torch:
            return CLSP.load(path)
        tokenizer = path.parent / "tokenizer.json"
        return CLSP.from_torch(str(path), json.loads(config_path.read_text()),
                               tokenizer=str(tokenizer) if tokenizer.is_file() else None)
    except Exception as e:  # noqa: BLE001 -- a torn or foreign file fails in its libraries' own ways
        raise ValueError(f"--checkpoint {path} could not be loaded: {one_line(e)}") from None


WEIGHTS = ("averaged", "raw", "ema")


def load_run(workdir: str, step: int | None = None, weights: str | None = None) -> tuple["CLSP", dict]:
    """The network of a training run's checkpoint at `step` (default the latest), with its tokenizer.json.

    weights: "averaged" (icefall's running average, `clsp_jax.averaging`), "raw" or "ema"; None takes the
    averaged weights when the checkpoint has them (the authors evaluate averaged models), else the raw ones.
    Returns (model, {"source": "workdir", "path", "step", "weights", and with None "averaged_unavailable":
    why the raw weights were taken}). Raises ValueError for anything that stops it loading."""
    from clsp_jax.inference import CLSP
    from clsp_jax.train import checkpoint

    run = Path(workdir)
    if not (run / "config.json").is_file():
        raise ValueError(f"--workdir {workdir} is not a training run's folder (no config.json)")
    block = {"source": "workdir", "path": str(run.resolve())}
    chosen = weights or "averaged"
    try:
        params, config, step_ = checkpoint.restore_params(workdir, step, use_ema=chosen == "ema",
                                                          averaged=chosen == "averaged")
    except checkpoint.CheckpointError as e:
        if weights is not None:
            raise
        block["averaged_unavailable"] = str(e)
        chosen = "raw"
        params, config, step_ = checkpoint.restore_params(workdir, step)
    tokenizer = run / "tokenizer.json"
    try:
        model = CLSP.from_params(params, config["model"], str(tokenizer) if tokenizer.is_file() else None)
    except Exception as e:  # noqa: BLE001 -- a config or tokenizer that does not fit fails in its own way
        raise ValueError(f"--workdir {workdir} could not be loaded: {one_line(e)}") from None
    return model, {**block, "step": step_, "weights": chosen}


def one_line(error: BaseException, limit: int = 800) -> str:
    """`error` as one short line: the type and first message line of its innermost cause (Orbax wraps the
    tensorstore error that names the file and byte range in a generic one, and both carry whole JSON specs
    after the first line)."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(error).__name__}: {first[:limit]}{'...' if len(first) > limit else ''}"
