"""The frozen-text-encoder state cache: its states, the cached train step against the token step, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from clsp_jax.models.clsp import CLSPNet
from clsp_jax.tokenizer import CaptionTokenizer
from clsp_jax.train.step import init_state, make_train_step
from clsp_jax.train.text_cache import TextStateCache, cached_text_states, check_cacheable
from eval_fixtures import TOKENIZER as MINILM
from train_fixtures import small_model_config, tone_batch

CAPTIONS = [
    "A man speaks quickly in a low voice.",
    "A woman with a Scottish accent talks slowly, quietly and with a lively melody, then speeds up.",
    "Loud and high-pitched.",
    "A man speaks quickly in a low voice.",  # a repeat: one entry
]
FROZEN = (r"^text_encoder/(embeddings|encoder)/",)


@pytest.fixture(scope="module")
def net_and_tokenizer():
    cfg = small_model_config(dropout=False)
    cfg["text"].update(vocab_size=30522, pad_token_id=0, model_type="bert", max_position_embeddings=128)
    return CLSPNet(cfg, rngs=nnx.Rngs(0)), CaptionTokenizer(MINILM, buckets=(16, 48))


def test_cached_states_equal_the_encoder_at_any_padding(net_and_tokenizer):
    net, tok = net_and_tokenizer
    cache = TextStateCache.build(net.text_encoder, tok, CAPTIONS, length=48, batch_size=2, lengths=(16, 32))
    assert len(cache) == 3
    for length in (48, 64):  # padded as the pipeline pads, and longer
        tokens = tok(CAPTIONS, length=length)
        states = cache.lookup(tokens["input_ids"], tokens["attention_mask"])
        direct = net.text_encoder.hidden_states(jnp.asarray(tokens["input_ids"]),
                                                jnp.asarray(tokens["attention_mask"]))[:, 0]
        np.testing.assert_allclose(states, np.asarray(direct), atol=2e-5, rtol=2e-5)
    embedded = net.embed_cls_states(jnp.asarray(states))
    reference = net.embed_tokens(jnp.asarray(tokens["input_ids"]), jnp.asarray(tokens["attention_mask"]))
    np.testing.assert_allclose(np.asarray(embedded), np.asarray(reference), atol=2e-5)


def test_a_caption_missing_from_the_cache_is_a_clear_error(net_and_tokenizer):
    net, tok = net_and_tokenizer
    cache = TextStateCache.build(net.text_encoder, tok, CAPTIONS[:1], length=48)
    tokens = tok(["Something never seen."], length=48)
    with pytest.raises(KeyError, match="not in the text-state cache"):
        cache.lookup(tokens["input_ids"], tokens["attention_mask"])


def test_the_cached_step_equals_the_token_step(net_and_tokenizer):
    """Stage 2 with the text encoder frozen and dropout off: same loss, same updated parameters."""
    net, tok = net_and_tokenizer
    batch = tone_batch(3, 2)
    texts = [CAPTIONS[(k + i) % 3] for k in range(2) for i in range(3)]  # k-major rows, as the pipeline emits
    tokens = tok(texts, length=16)
    host = {"audio": batch["audio"], **tokens}
    cache = TextStateCache.build(net.text_encoder, tok, CAPTIONS, length=16)
    graphdef, params, rest = nnx.split(net, nnx.Param, ...)
    tx = optax.adam(1e-3)
    cfg = dict(objective="multi_positive", frozen=list(FROZEN))
    step = jax.jit(make_train_step(graphdef, rest, tx, lambda s: 1e-3, cfg))
    tokens_kb = {k: tokens[k].reshape(2, 3, -1).transpose(1, 0, 2) for k in ("input_ids", "attention_mask")}
    common = {"audio": batch["audio"], "audio_lens": batch["audio_lens"]}
    s1, m1 = step(init_state(net, tx), {**common, **tokens_kb})
    s2, m2 = step(init_state(net, tx), {**common, "text_states": cached_text_states(host, cache, 2)})
    assert np.isfinite(float(m1["loss"]))
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]), rtol=1e-4)
    changed = 0
    for a, b, before in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"]), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)
        changed += not np.array_equal(np.asarray(a), np.asarray(before))
    assert changed > 10  # the step trained something


def test_check_cacheable():
    paths = ["text_encoder/embeddings/word_embeddings/embedding", "text_encoder/encoder/layer/0/output/dense/kernel",
             "text_encoder/pooler/dense/kernel", "speech/encoder/x"]
    check_cacheable(paths, FROZEN, stage=2)
    with pytest.raises(ValueError, match="output/dense"):
        check_cacheable(paths, (r"^text_encoder/embeddings/",), stage=2)
    with pytest.raises(ValueError, match="stage 3"):
        check_cacheable(paths, FROZEN, stage=3)
