"""Stage 3 of the authors' recipe: hard negatives on FCaps-PSCBase from a stage-1 model.

As stage 2 (configs/clsp_stage2.py), except the captions (a global and a fine-grained caption plus the global
one with an attribute rewritten, weight 0.2) and 750 s of audio per device instead of 800.
"""

from configs import clsp_stage1, clsp_stage2

SECONDS_PER_DEVICE = 750.0  # their --max-duration in stage 3


def get_config():
    config = clsp_stage2.get_config()
    config.data.stage = 3
    config.data.max_audio_seconds_per_batch = SECONDS_PER_DEVICE * clsp_stage1.AUTHORS_DEVICES
    return config
