"""A small CLSP overfits one fixed batch with every objective: the loss above its floor falls by >= 90%.

`train_fixtures.small_model_config(dropout=False)` (regularisation off, as an overfitting check wants; the
Zipformer's built-in positional dropout and feature masks stay on), AdamW at 3e-3 for towers and heads alike,
10 warmup steps then cosine; 8 distinct tones of 0.5 s, random captions of 12 tokens (no shared <s>, see
`tone_batch`). The multi-positive term cannot go below ln(2)/2: speech->text puts 1/2 on each of a clip's two
captions, so its cross-entropy is at least that target's entropy ln 2, averaged with a text->speech term
that can reach 0. Stage 3 adds 0.2 x a hard-negative term that can reach 0. SigLIP (stage-1 data, its
logit bias starting at -10) can reach 0.

Run as a script it prints each objective's whole curve.
"""

import math

import jax
import pytest
from flax import nnx
from train_fixtures import small_model_config, tone_batch

from clsp_jax import losses, optim
from clsp_jax.models.clsp import CLSPNet
from clsp_jax.train import state as train_state, step

MAX_STEPS = 200
FLOOR = {"infonce": 0.0, "siglip": 0.0, "multi_positive": math.log(2) / 2, "hard_negative": math.log(2) / 2}


def overfit_curve(objective: str, max_steps: int = MAX_STEPS, target: float = 0.1) -> list[float]:
    """Losses of steps 0.. on one fixed batch, stopping once (loss - floor) <= target * (loss_0 - floor)."""
    bias = -10.0 if losses.OBJECTIVES[objective].logit_bias else None  # SigLIP's initial logit bias
    net = CLSPNet({**small_model_config(dropout=False), "logit_bias_init": bias}, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(net, nnx.Param, ...)
    tx, schedule = optim.make_optimizer(
        dict(base_lr=3e-3, warmup_steps=10, total_steps=max_steps, param_groups=[]), params)
    state = train_state.init_state(net, tx)
    train_step = jax.jit(step.make_train_step(graphdef, rest, tx, schedule, objective=objective, loss_cfg={}),
                         donate_argnums=0)
    batch = tone_batch(8, losses.OBJECTIVES[objective].captions, bos=False, padded=False)
    floor, curve = FLOOR[objective], []
    for _ in range(max_steps):
        state, metrics = train_step(state, batch)
        curve.append(float(metrics["loss"]))
        if curve[-1] - floor <= target * (curve[0] - floor):
            break
    return curve


@pytest.mark.slow
@pytest.mark.parametrize("objective", list(FLOOR))
def test_small_model_overfits_one_batch(objective):
    curve = overfit_curve(objective)
    floor = FLOOR[objective]
    assert curve[0] > floor + 2.0  # starts far from the floor (~ln 8 + a margin at a random init)
    assert min(curve) >= floor - 1e-4  # the floor is a real lower bound
    assert curve[-1] - floor <= 0.1 * (curve[0] - floor), curve[::10]


if __name__ == "__main__":  # prints the curves: python tests/test_overfit.py [objective ...]
    import json
    import sys
    import time

    for objective in sys.argv[1:] or list(FLOOR):
        start = time.time()
        curve = overfit_curve(objective, target=0.0)  # all MAX_STEPS steps
        print(json.dumps({"objective": objective, "seconds": round(time.time() - start, 1),
                          "curve": [round(x, 4) for x in curve]}), flush=True)
