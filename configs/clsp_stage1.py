"""Stage 1 of the authors' recipe: the full CLSP on FCaps-Emilia with InfoNCE, trained as their icefall run is.

Every value below is theirs (the table in README.md names where each is set): ScaledAdam with the Eden
schedule, base LR 0.045 for the heads (the temperature, a scalar, at 0.1x that), the towers at 0.02222x;
one fixed caption per clip; clips of 4-30 s in about 30 duration bins estimated from the data, 800 s of
audio per device on 8 devices; the running weight average updated every 200 steps.

Required on the command line: --config.data.data_dir, --config.data.tokenizer (roberta-base tokenizer.json),
--config.train.init_speech / init_text (SPEAR-XLarge, roberta-base), --config.optim.steps_per_epoch (Eden's
epoch term: the batches per epoch, which the run logs at start) and --config.train.num_steps
(their 100 epochs = 100 x steps_per_epoch). On another device count, scale
data.max_audio_seconds_per_batch (800 s x devices) and set data.batch_size_multiple to the device count.
"""

from configs import clsp_base
from clsp_jax.optim_config import default_optim_config, faithful_optim_config

AUTHORS_DEVICES = 8  # their --world-size
SECONDS_PER_DEVICE = 800.0  # their --max-duration: seconds of audio per device and batch


def get_config():
    config = clsp_base.get_config()
    defaults = default_optim_config()
    config.optim.update({k: v for k, v in faithful_optim_config().items() if v != defaults[k]})
    config.optim.average_period = 200

    config.data.stage = 1
    config.data.stage1_caption_pool = "fixed"
    config.data.min_audio_seconds = 4.0
    config.data.bucket_boundaries_s = (30.0,)  # the longest clip kept; the boundaries below it are estimated
    config.data.duration_bins = 30
    config.data.max_audio_seconds_per_batch = SECONDS_PER_DEVICE * AUTHORS_DEVICES
    config.data.batch_size_multiple = AUTHORS_DEVICES
    return config
