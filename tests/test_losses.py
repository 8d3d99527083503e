"""Dense contrastive losses against NumPy transcriptions of their formulas and hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clsp_jax import losses

SCALE = 14.0

# Jitted once per shape: far quicker on CPU than op-by-op dispatch.
infonce_loss = jax.jit(losses.infonce_loss)
multi_positive_loss = jax.jit(losses.multi_positive_loss)
hard_negative_loss = jax.jit(losses.hard_negative_loss, static_argnames=("local_weight", "local_positives"))
sigmoid_loss = jax.jit(losses.sigmoid_loss)


def unit(rng, *shape):
    x = rng.normal(size=shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


def np_infonce(a, t, s):
    logits = s * a.astype(np.float64) @ t.T
    s2t = -np.mean(np.diag(log_softmax(logits)))
    t2s = -np.mean(np.diag(log_softmax(logits.T)))
    return 0.5 * (s2t + t2s)


def np_authors_multi_positive(a, t, s):
    """The authors' single-device ClipLoss(multi_positive=True), K=2: captions stacked [first; second]."""
    b = a.shape[0]
    flat = np.concatenate([t[:, 0], t[:, 1]]).astype(np.float64)
    per_audio = s * a @ flat.T
    labels_audio = np.zeros((b, 2 * b))
    labels_audio[np.arange(b), np.arange(b)] = 0.5
    labels_audio[np.arange(b), np.arange(b) + b] = 0.5
    ce_audio = np.mean(-np.sum(labels_audio * log_softmax(per_audio), axis=1))
    per_text = s * flat @ a.T
    labels_text = np.arange(2 * b) % b
    ce_text = np.mean(-log_softmax(per_text)[np.arange(2 * b), labels_text])
    return (ce_audio + ce_text) / 2


def np_multi_positive(a, t, s, mask=None, weights=None):
    """docs/design.md §2 row by row: S = [B, K*B], caption k of clip i at column k*B+i."""
    b, k, _ = t.shape
    mask = np.ones((b, k), bool) if mask is None else mask
    weights = np.ones((b, k)) if weights is None else weights
    flat = np.swapaxes(t, 0, 1).reshape(k * b, -1).astype(np.float64)
    col_ok = np.swapaxes(mask, 0, 1).reshape(-1)
    sim = s * a.astype(np.float64) @ flat.T
    s2t = []
    for i in range(b):
        target = np.zeros(k * b)
        for kk in range(k):
            if mask[i, kk]:
                target[kk * b + i] = weights[i, kk]
        if target.sum() == 0:
            continue
        target /= target.sum()
        logp = log_softmax(sim[i, col_ok])
        s2t.append(-np.sum(target[col_ok] * logp))
    t2s = []
    for col in range(k * b):
        if col_ok[col]:
            t2s.append(-log_softmax(sim[:, col])[col % b])
    return 0.5 * (np.mean(s2t) + np.mean(t2s))


def np_sigmoid(a, t, s, bias):
    z = s * a.astype(np.float64) @ t.T + bias
    labels = 2 * np.eye(a.shape[0]) - 1
    return np.sum(np.logaddexp(0, -labels * z)) / a.shape[0]


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_infonce_loss_matches_numpy(rng):
    a, t = unit(rng, 7, 16), unit(rng, 7, 16)
    loss, _ = infonce_loss(a, t, SCALE)
    np.testing.assert_allclose(loss, np_infonce(a, t, SCALE), rtol=1e-6)


def test_multi_positive_two_clips_by_hand():
    # Clip 0 and both its captions on e1, clip 1 and its captions on e2: each speech->text row has logits
    # [s, 0, s, 0] (two positives), each caption's text->speech row [s, 0].
    s = 3.0
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    a = np.array([e1, e2], np.float32)
    t = np.array([[e1, e1], [e2, e2]], np.float32)
    s2t = math.log(2 * math.exp(s) + 2) - s
    t2s = math.log(1 + math.exp(-s))
    loss, m = multi_positive_loss(a, t, s)
    np.testing.assert_allclose(loss, 0.5 * (s2t + t2s), rtol=1e-6)
    np.testing.assert_allclose(loss, 0.5 * math.log(2) + math.log(1 + math.exp(-s)), rtol=1e-6)
    assert float(m["acc_s2t"]) == 1.0 and float(m["acc_t2s"]) == 1.0
    np.testing.assert_allclose([m["pos_logit"], m["neg_logit"]], [s, 0.0], atol=1e-6)

    # Drop clip 1's second caption: clip 0's row keeps [s, 0, s] (two positives), clip 1's row [0, s, 0]
    # (one positive); three caption rows remain, each [s, 0].
    mask = np.array([[True, True], [True, False]])
    s2t = 0.5 * ((math.log(2 * math.exp(s) + 1) - s) + (math.log(math.exp(s) + 2) - s))
    loss, _ = multi_positive_loss(a, t, s, text_mask=mask)
    np.testing.assert_allclose(loss, 0.5 * (s2t + t2s), rtol=1e-6)


def test_multi_positive_matches_authors_formula(rng):
    a, t = unit(rng, 9, 16), unit(rng, 9, 2, 16)
    loss, _ = multi_positive_loss(a, t, SCALE)
    np.testing.assert_allclose(loss, np_authors_multi_positive(a, t, SCALE), rtol=1e-6)
    np.testing.assert_allclose(loss, np_multi_positive(a, t, SCALE), rtol=1e-6)


@pytest.mark.parametrize("k", [1, 3])
def test_multi_positive_design_formula_with_mask_and_weights(rng, k):
    b = 8
    a, t = unit(rng, b, 16), unit(rng, b, k, 16)
    mask = rng.random((b, k)) > 0.3
    mask[0] = False  # a clip with no caption left drops out of speech->text
    weights = rng.random((b, k)) + 0.1
    loss, _ = multi_positive_loss(a, t, SCALE, text_mask=mask, weights=weights)
    np.testing.assert_allclose(loss, np_multi_positive(a, t, SCALE, mask, weights), rtol=1e-6)
    if k == 1:
        want = np_infonce(a, t[:, 0], SCALE)
        np.testing.assert_allclose(infonce_loss(a, t[:, 0], SCALE)[0], want, rtol=1e-6)


def test_masked_captions_get_no_gradient(rng):
    a, t = unit(rng, 6, 8), unit(rng, 6, 2, 8)
    mask = np.ones((6, 2), bool)
    mask[2] = False
    mask[4, 1] = False
    grad_t = jax.grad(lambda t: multi_positive_loss(a, t, SCALE, text_mask=mask)[0])(t)
    assert np.all(np.isfinite(grad_t))
    assert np.all(grad_t[~mask] == 0) and np.all(np.abs(grad_t[mask]).sum(-1) > 0)


def test_metrics_match_numpy(rng):
    b, k = 10, 2
    a, t = unit(rng, b, 16), unit(rng, b, k, 16)
    t[3, 1] = a[3]  # make a few argmaxes right
    t[5, 0] = a[5]
    _, m = multi_positive_loss(a, t, SCALE)
    flat = np.swapaxes(t, 0, 1).reshape(k * b, -1)
    sim = SCALE * a @ flat.T
    own = (np.arange(k * b) % b)[None] == np.arange(b)[:, None]
    np.testing.assert_allclose(m["acc_s2t"], np.mean(np.argmax(sim, 1) % b == np.arange(b)), rtol=1e-6)
    np.testing.assert_allclose(m["acc_t2s"], np.mean(np.argmax(sim, 0) == np.arange(k * b) % b), rtol=1e-6)
    np.testing.assert_allclose(m["pos_logit"], sim[own].mean(), rtol=1e-5)
    np.testing.assert_allclose(m["neg_logit"], sim[~own].mean(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m["logit_scale"], SCALE)
    assert 0 < float(m["acc_s2t"]) < 1


@pytest.mark.parametrize("positives", [(0,), (0, 1)])
def test_hard_negative_loss_matches_numpy(rng, positives):
    b = 8
    a, t, neg = unit(rng, b, 16), unit(rng, b, 2, 16), unit(rng, b, 16)
    loss, m = hard_negative_loss(a, t, neg, SCALE, local_weight=0.2, local_positives=positives)
    pos = SCALE * np.einsum("nd,npd->np", a, t[:, list(positives)]).astype(np.float64)
    n = SCALE * np.einsum("nd,nd->n", a, neg).astype(np.float64)
    lse_pos = np.logaddexp.reduce(pos, axis=1)
    local = np.mean(np.logaddexp(lse_pos, n) - lse_pos)
    np.testing.assert_allclose(m["local_loss"], local, rtol=1e-6)
    np.testing.assert_allclose(loss, np_multi_positive(a, t, SCALE) + 0.2 * local, rtol=1e-6)
    np.testing.assert_allclose(m["acc_hard_neg"], np.mean(pos.max(1) > n))


def test_sigmoid_loss_matches_numpy(rng):
    b = 9
    a, t = unit(rng, b, 16), unit(rng, b, 16)
    loss, m = sigmoid_loss(a, t, 10.0, -3.0)
    np.testing.assert_allclose(loss, np_sigmoid(a, t, 10.0, -3.0), rtol=1e-6)
    z = 10.0 * a @ t.T - 3.0
    np.testing.assert_allclose(m["pos_logit"], np.diag(z).mean(), rtol=1e-5)
    np.testing.assert_allclose(m["neg_logit"], z[~np.eye(b, dtype=bool)].mean(), rtol=1e-5)
    np.testing.assert_allclose(m["acc_s2t"], np.mean(z.argmax(1) == np.arange(b)))
    np.testing.assert_allclose(m["acc_t2s"], np.mean(z.argmax(0) == np.arange(b)))


def test_bf16_embeddings_give_float32_logits(rng):
    a, t = unit(rng, 6, 32), unit(rng, 6, 32)
    a16, t16 = jnp.asarray(a, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
    loss, m = infonce_loss(a16, t16, SCALE)
    assert loss.dtype == jnp.float32 and m["pos_logit"].dtype == jnp.float32
    want = np_infonce(np.asarray(a16, np.float32), np.asarray(t16, np.float32), SCALE)
    np.testing.assert_allclose(loss, want, rtol=1e-6)


def test_bad_shapes_raise(rng):
    a, t = unit(rng, 4, 8), unit(rng, 4, 2, 8)
    with pytest.raises(ValueError, match=r"text_emb must be \[B, K, D\]"):
        multi_positive_loss(a, t[:, 0], SCALE)
    with pytest.raises(ValueError, match="neg_emb must be"):
        hard_negative_loss(a, t, a[:3], SCALE)
    with pytest.raises(ValueError, match="with audio_emb's B and D"):
        infonce_loss(a, t[:3, 0], SCALE)
    with pytest.raises(ValueError, match="text_mask"):
        multi_positive_loss(a, t, SCALE, text_mask=np.ones((2, 4), bool))
    with pytest.raises(ValueError, match="weights"):
        multi_positive_loss(a, t, SCALE, weights=np.ones((4, 3)))
    with pytest.raises(ValueError, match="out of range"):
        hard_negative_loss(a, t, a, SCALE, local_positives=(2,))


# ---------------------------------------------------------------------------------------------------------
# The registry of objectives.


@pytest.mark.parametrize("stage,name", [(1, "infonce"), (2, "multi_positive"), (3, "hard_negative")])
def test_every_stage_resolves_to_its_default(stage, name):
    assert losses.resolve_objective(None, stage) == name
    assert losses.resolve_objective(name, stage) == name
    assert losses.OBJECTIVES[name].captions == stage


def test_siglip_is_a_stage_1_objective_with_a_logit_bias():
    assert losses.resolve_objective("siglip", 1) == "siglip"
    assert losses.OBJECTIVES["siglip"].logit_bias
    assert not any(o.logit_bias for name, o in losses.OBJECTIVES.items() if name != "siglip")


@pytest.mark.parametrize("name,stage,message", [
    ("clip", 1, "unknown objective 'clip'; choose from ['hard_negative', 'infonce', 'multi_positive', 'siglip']"),
    ("siglip", 2, "objective 'siglip' trains on data.stage=1 (1 caption(s) per clip), got data.stage=2"),
    ("multi_positive", 3, "objective 'multi_positive' trains on data.stage=2"),
    (None, 4, "data.stage 4: choose from [1, 2, 3]"),
])
def test_unknown_objectives_and_stage_mismatches_raise(name, stage, message):
    with pytest.raises(ValueError) as err:
        losses.resolve_objective(name, stage)
    assert message in str(err.value)


def test_each_objective_calls_its_loss(rng):
    """The registry's adapters take the step's [B, C, D] captions and hand each loss its slice and config."""
    b = 6
    a, t, extras = unit(rng, b, 16), unit(rng, b, 3, 16), {"negative_valid": np.arange(b) % 4 > 0}
    cfg = {"hard_negative_weight": 0.5, "hard_negative_positives": (0, 1)}
    call = lambda name, text, bias=None: losses.OBJECTIVES[name].loss(a, text, SCALE, bias, extras, cfg, None)[0]
    np.testing.assert_allclose(call("infonce", t[:, :1]), infonce_loss(a, t[:, 0], SCALE)[0], rtol=1e-6)
    np.testing.assert_allclose(call("multi_positive", t[:, :2]), multi_positive_loss(a, t[:, :2], SCALE)[0],
                               rtol=1e-6)
    want = hard_negative_loss(a, t[:, :2], t[:, 2], SCALE, 0.5, (0, 1), extras["negative_valid"])[0]
    np.testing.assert_allclose(call("hard_negative", t), want, rtol=1e-6)
    np.testing.assert_allclose(call("siglip", t[:, :1], -3.0), np_sigmoid(a, t[:, 0], SCALE, -3.0), rtol=1e-6)
    with pytest.raises(ValueError, match="siglip objective needs a network with a logit_bias"):
        call("siglip", t[:, :1])
