"""The stage configs reproduce the authors' recipes (configs/clsp_stage{1,2,3}.py; the table in README.md).

Pure config tests: the optimizer state is built abstractly (no parameter memory). The stage configs train the
network of configs/clsp_base.py, which test_clsp.py builds abstractly."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from clsp_jax import optim, sharding
from configs import clsp_base, clsp_stage1, clsp_stage2, clsp_stage3

STAGES = {1: clsp_stage1, 2: clsp_stage2, 3: clsp_stage3}

# Stage-independent recipe values: (config key, value).
COMMON = {
    "optim.optimizer": "scaled_adam",
    "optim.clipping_scale": 2.0,
    "optim.b1": 0.9,
    "optim.b2": 0.98,
    "optim.eps": 1e-8,
    "optim.scalar_lr_scale": 0.1,
    "optim.param_min_rms": 1e-5,
    "optim.param_max_rms": 3.0,
    "optim.scalar_max": 10.0,
    "optim.size_update_period": 4,
    "optim.clipping_update_period": 100,
    "optim.weight_decay": 0.0,
    "optim.clip_norm": None,
    "optim.schedule": "eden",
    "optim.eden_lr_batches": 100000.0,
    "optim.eden_lr_epochs": 100.0,
    "optim.warmup_steps": 500,
    "optim.warmup_start": 0.5,
    "optim.average_period": 200,
    "optim.frozen": (),
    "data.duration_bins": 30,
    "data.bucket_boundaries_s": (30.0,),
    "data.batch_size_multiple": 8,
    "data.task2_prob_start": 0.05,
    "data.task2_prob_end": 0.5,
    "data.task2_ramp_steps": 10000,
    "data.accent_intra_group_prob": 0.2,
    "loss.hard_negative_weight": 0.2,
    "loss.objective": None,
    "train.compute_dtype": "bfloat16",
    "model.speech.regularisers": True,
}
PER_STAGE = {
    1: {"optim.base_lr": 0.045, "towers": 0.02222, "data.stage": 1, "data.stage1_caption_pool": "fixed",
        "data.min_audio_seconds": 4.0, "data.max_audio_seconds_per_batch": 800.0 * 8},
    2: {"optim.base_lr": 0.001, "towers": 1.0, "data.stage": 2, "data.min_audio_seconds": 2.0,
        "data.max_audio_seconds_per_batch": 800.0 * 8},
    3: {"optim.base_lr": 0.001, "towers": 1.0, "data.stage": 3, "data.min_audio_seconds": 2.0,
        "data.max_audio_seconds_per_batch": 750.0 * 8},
}


def _get(config, key):
    value = config
    for part in key.split("."):
        value = value[part]
    return tuple(value) if isinstance(value, (list, tuple)) else value


# Parameter paths of the network's groups (shapes of the full network): the towers' (icefall's
# encoder_embed, encoder, text_encoder), the heads' and the temperature.
PARAMS = {
    "speech": {"encoder_embed": {"conv": {"0": {"kernel": (3, 3, 1, 8)}}},
               "encoder": {"encoders": {"0": {"layers": {"0": {"bypass_scale": (1280,)}}}}}},
    "text_encoder": {"encoder": {"layer": {"0": {"output": {"dense": {"kernel": (3072, 768), "bias": (768,)}}}}}},
    "audio_projection": {"0": {"kernel": (1280, 512), "bias": (512,)}},
    "text_transform": {"sequential": {"3": {"kernel": (512, 512)}}},
    "logit_scale": (),
}
TOWER_PREFIXES = ("speech/", "text_encoder/")


def test_stage_configs_train_the_base_network():
    base = clsp_base.get_config().model.to_dict()
    assert all(m.get_config().model.to_dict() == base for m in STAGES.values())


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_config_pins_the_authors_recipe(stage):
    config = STAGES[stage].get_config()
    expected = {**COMMON, **{k: v for k, v in PER_STAGE[stage].items() if k != "towers"}}
    got = {key: _get(config, key) for key in expected}
    assert got == expected

    # Eden, epoch 0: the first update at base_lr x (0.5 + 0.5/500) (icefall counts batches from 1), the
    # 500th at base_lr x the batch decay; every parameter outside the towers at base_lr, the towers at their
    # scale of it.
    cfg = config.optim.to_dict()
    cfg["steps_per_epoch"] = 1000
    base = PER_STAGE[stage]["optim.base_lr"]
    np.testing.assert_allclose(optim.learning_rates(cfg, 0)["lr"], base * 0.501, rtol=1e-6)
    np.testing.assert_allclose(optim.learning_rates(cfg, 499)["lr"], base * (1 + 0.005**2) ** -0.25, rtol=1e-6)
    params = jax.tree.map(lambda shape: jax.ShapeDtypeStruct(shape, np.float32), PARAMS,
                          is_leaf=lambda x: isinstance(x, tuple))
    towers = PER_STAGE[stage]["towers"]
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = sharding.path_str(path)
        assert optim.lr_scale_for(cfg, path) == (towers if path.startswith(TOWER_PREFIXES) else 1.0), path

    # The optimizer builds and its state is abstract: one ScaledAdam per distinct LR, as the authors'
    # parameter groups; the temperature (0-d) at 0.1x its group's LR is ScaledAdam's scalar rule.
    tx, _ = optim.make_optimizer(cfg, params)
    state = jax.eval_shape(tx.init, params)
    assert len(optim.clip_factors(state)) == (2 if towers != 1.0 else 1)


@pytest.mark.parametrize("key, value, message", [
    ("duration_bins", 0, "data.duration_bins must be None or >= 1"),
    ("min_audio_seconds", 30.0, "data.min_audio_seconds must lie in [0, 30.0)"),
    ("min_audio_seconds", 4.0, "data.data_dir"),  # valid: the check goes on to the (unset) data dir
])
def test_bad_batching_keys_are_refused_in_one_line(key, value, message):
    from clsp_jax.train.trainer import ConfigError, check_config

    config = clsp_stage1.get_config()
    config.data[key] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_config(config, num_devices=8)


def test_demo_speech_tower_variant_trains_the_zipformer_with_scaled_adam():
    """`python -m clsp_jax.demo --train-speech-tower`: tiny's frozen tower trains, under ScaledAdam (one group:
    tiny's towers are at LR scale 1), and only the text encoder below its pooler stays frozen."""
    from clsp_jax import demo

    config = demo.demo_config("unused", demo.SPEECH_TOWER_TRAINS)
    assert (config.optim.optimizer, config.train.cache_speech_states) == ("scaled_adam", False)
    params = jax.tree.map(lambda shape: jax.ShapeDtypeStruct(shape, np.float32), PARAMS,
                          is_leaf=lambda x: isinstance(x, tuple))
    paths = [sharding.path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    trained = optim.training_paths(paths, config.optim.frozen)
    assert sorted(set(paths) - set(trained)) == ["text_encoder/encoder/layer/0/output/dense/bias",
                                                 "text_encoder/encoder/layer/0/output/dense/kernel"]
    assert any(p.startswith("speech/encoder/") for p in trained)
    tx, _ = optim.make_optimizer(config.optim.to_dict(), params)
    assert len(optim.clip_factors(jax.eval_shape(tx.init, params))) == 1
