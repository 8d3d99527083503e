"""python -m clsp_jax.train --config configs/tiny.py --workdir DIR [--config.key=value ...]"""

import logging
import os
import sys
import traceback

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "a configs/*.py file exposing get_config()", lock_config=True)
flags.DEFINE_string("workdir", None, "run directory: config, metrics, checkpoints; an existing one resumes")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-save chatter
    from clsp_jax.train.checkpoint import CheckpointError
    from clsp_jax.train.trainer import ConfigError, train

    config = flags.FLAGS.config
    try:
        train(config, flags.FLAGS.workdir)
    except ConfigError as e:
        _exit(2, f"config error: {e}")
    except CheckpointError as e:  # no checkpoint of the work dir restores: stop before training over them
        _exit(2, f"checkpoint error: {e}")
    except SystemExit as e:  # the trainer's own one-line stops (e.g. too many non-finite losses)
        if e.code not in (None, 0):
            _exit(1, str(e.code))
        raise
    except BaseException:
        _exit(1, traceback.format_exc())


def _exit(code: int, message: str) -> None:
    """Prints `message` and exits with `code`. With several processes the exit is immediate (os._exit): a
    normal exit would wait at jax.distributed's shutdown barrier for peers that may be stuck in a collective
    with this process, and the peers then fail fast as their collective loses this process."""
    print(message, file=sys.stderr, flush=True)
    import jax

    if jax.process_count() > 1:
        sys.stdout.flush()
        try:  # processes failing together (a config error) leave together, so none is cut off mid-message
            from clsp_jax.distributed import leave_together

            leave_together()
        finally:
            os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    app.run(main)
