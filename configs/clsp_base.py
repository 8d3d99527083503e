"""The full CLSP network (Yang et al., 2026): SPEAR-XLarge Zipformer2 + roberta-base + 512-d heads.

724M parameters (speech tower 598M with its head, text tower 125M). Override on the command line, e.g.
`--config.train.num_steps=20000`.
"""

from configs.defaults import base_config

SPEAR_XLARGE = dict(
    feature_dim=128,
    downsampling_factor=(1, 2, 4, 8, 4, 2, 1),
    num_encoder_layers=(1, 2, 3, 4, 1, 1, 1),
    encoder_dim=(1280,) * 7,
    encoder_unmasked_dim=(768,) * 7,
    feedforward_dim=(3840,) * 7,
    cnn_module_kernel=(31, 31, 15, 15, 15, 31, 31),
    num_heads=(8,) * 7,
    query_head_dim=(32,),
    value_head_dim=(12,),
    pos_head_dim=(4,),
    pos_dim=48,
    output_downsampling_factor=2,
    dropout=0.1,
    subsampling_channels=(8, 32, 128),  # Conv2dSubsampling's conv widths (icefall's defaults)
    # icefall's training regularisers (layer skipping, Balancer, Whiten, ...: clsp_jax.models.zipformer);
    # the eval forward is the same either way.
    regularisers=True,
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
    """Stage 1 on FCaps (InfoNCE, the objective data.stage 1 selects), the authors' recipe where it maps onto
    AdamW.

    Pass --config.data.data_dir, --config.data.tokenizer (roberta-base tokenizer.json) and
    --config.train.init_speech / init_text (SPEAR, roberta-base) for a real run.
    """
    config = base_config(dict(speech=SPEAR_XLARGE, text=ROBERTA_BASE, joint_dim=512, head_dropout=0.1))
    config.data.stage = 1
    config.data.max_audio_seconds_per_batch = 6400.0  # 800 s per GPU x 8 GPUs
    config.data.bucket_boundaries_s = (6.0, 8.0, 10.0, 12.0, 15.0, 20.0, 25.0, 30.0)
    config.optim.total_steps = config.train.get_ref("num_steps")  # follows --config.train.num_steps
    return config
