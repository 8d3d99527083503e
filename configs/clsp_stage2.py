"""Stage 2 of the authors' recipe: multi-positive training on FCaps-PSCBase from a stage-1 model.

As stage 1 (configs/clsp_stage1.py), except: base LR 0.001 for every parameter (towers at 1x), clips of
2-30 s, a random caption per step as the stage-2 tasks draw them (Task 2 from p 0.05 to 0.5 over 10k steps).

Required on the command line: --config.data.data_dir, --config.data.tokenizer, --config.train.init_clsp (the
stage-1 model; the authors start from the average of epochs 18-45 of stage 1), --config.optim.steps_per_epoch
and --config.train.num_steps.
"""

from clsp_jax.optim_config import TOWERS_PATTERN
from configs import clsp_stage1


def get_config():
    config = clsp_stage1.get_config()
    config.optim.base_lr = 0.001
    config.optim.param_groups = [{"name": "towers", "pattern": TOWERS_PATTERN, "lr_scale": 1.0}]
    config.data.stage = 2
    config.data.min_audio_seconds = 2.0
    return config
