"""The full CLSP network (Yang et al., 2026): SPEAR-XLarge Zipformer2 + roberta-base + 512-d heads.

724M parameters (speech tower 599M, text tower 125M). Override on the command line, e.g.
`--config.model.joint_dim=256`.
"""

import ml_collections

SPEAR_XLARGE = dict(
    feature_dim=128,
    downsampling_factor=[1, 2, 4, 8, 4, 2, 1],
    num_encoder_layers=[1, 2, 3, 4, 1, 1, 1],
    encoder_dim=[1280] * 7,
    encoder_unmasked_dim=[768] * 7,
    feedforward_dim=[3840] * 7,
    cnn_module_kernel=[31, 31, 15, 15, 15, 31, 31],
    num_heads=[8] * 7,
    query_head_dim=[32],
    value_head_dim=[12],
    pos_head_dim=[4],
    pos_dim=48,
    output_downsampling_factor=2,
    dropout=0.1,
)

# Hugging Face `roberta-base` (RobertaConfig names).
ROBERTA_BASE = dict(
    model_type="roberta",
    vocab_size=50265,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    max_position_embeddings=514,
    type_vocab_size=1,
    pad_token_id=1,
    layer_norm_eps=1e-5,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
)


def get_config():
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(
        dict(speech=SPEAR_XLARGE, text=ROBERTA_BASE, joint_dim=512, head_dropout=0.1)
    )
    return config
