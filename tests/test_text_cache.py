"""The frozen-text-encoder state cache: its states at any padding, errors, the config check (the cached train
step against the token step is in test_step.py)."""

import jax.numpy as jnp
import numpy as np
import pytest

from clsp_jax.tokenizer import CaptionTokenizer
from clsp_jax.train.text_cache import TextStateCache, check_cacheable
from eval_fixtures import TOKENIZER as MINILM
from train_fixtures import minilm_vocab_net

CAPTIONS = [
    "A man speaks quickly in a low voice.",
    "A woman with a Scottish accent talks slowly, quietly and with a lively melody, then speeds up.",
    "Loud and high-pitched.",
    "A man speaks quickly in a low voice.",  # a repeat: one entry
]
FROZEN = (r"^text_encoder/(embeddings|encoder)/",)


@pytest.fixture(scope="module")
def net_and_tokenizer():
    return minilm_vocab_net(), CaptionTokenizer(MINILM, buckets=(16, 48))


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


def test_check_cacheable():
    paths = ["text_encoder/embeddings/word_embeddings/embedding", "text_encoder/encoder/layer/0/output/dense/kernel",
             "text_encoder/pooler/dense/kernel", "speech/encoder/x"]
    check_cacheable(paths, FROZEN, stage=2)
    with pytest.raises(ValueError, match="output/dense"):
        check_cacheable(paths, (r"^text_encoder/embeddings/",), stage=2)
    with pytest.raises(ValueError, match="stage 3"):
        check_cacheable(paths, FROZEN, stage=3)
