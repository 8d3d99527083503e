"""python -m clsp_jax.train --config configs/tiny.py --workdir DIR [--config.key=value ...]"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "a configs/*.py file exposing get_config()", lock_config=True)
flags.DEFINE_string("workdir", None, "run directory: config, metrics, checkpoints; an existing one resumes")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-save chatter
    from clsp_jax.train.trainer import ConfigError, train

    config = flags.FLAGS.config
    try:
        train(config, flags.FLAGS.workdir)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
