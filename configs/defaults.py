"""The sections every training config has; `configs/*.py` start from `base_config()` and change a few keys.

Sections: model (the network), data (clsp_jax.data.config keys + data_dir, tokenizer), optim
(clsp_jax.optim_config keys), loss (the objective and its weights), train (the loop: mesh, steps, logging,
checkpoints, init), eval (the named evaluators run during training).

Loading a config imports no jax, grain or TFDS (tests/test_layers.py checks it).
"""

import ml_collections
from ml_collections import config_dict

from clsp_jax.data.config import default_config as default_data_config
from clsp_jax.optim_config import default_optim_config


def base_config(model: dict) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # remat: "none" | "layer" | "layer_save_dots" (per-layer rematerialisation, clsp_jax.models.remat)
    # head_init: "torch" (PyTorch nn.Linear's, as the authors' heads start) | "lecun" (clsp_jax.models.clsp)
    # logit_bias_init None: the network has no logit_bias; the trainer sets it (from loss.logit_bias_init) for
    # objectives that need one.
    config.model = ml_collections.ConfigDict(
        {"remat": "none", "head_init": "torch", "logit_bias_init": config_dict.placeholder(float), **model}
    )

    config.data = default_data_config()
    config.data.data_dir = config_dict.placeholder(str)  # prepared TFDS dir (python -m data_prep.prepare)
    config.data.name = "fcaps"
    config.data.tokenizer = config_dict.placeholder(str)  # tokenizer.json of the text tower

    optim = default_optim_config()
    # Tuples, so they can be overridden from the command line (ml_collections cannot parse lists).
    optim.update(frozen=tuple(optim["frozen"]), no_decay=tuple(optim["no_decay"]))
    config.optim = ml_collections.ConfigDict(optim)
    config.optim.total_steps = config_dict.placeholder(int)
    config.optim.steps_per_epoch = config_dict.placeholder(int)
    config.optim.ema_decay = config_dict.placeholder(float)
    config.optim.average_period = config_dict.placeholder(int)  # icefall's running average; None/0 = off

    config.loss = ml_collections.ConfigDict(
        dict(
            # None: follows data.stage (1 infonce, 2 multi_positive, 3 hard_negative); or "siglip" (stage-1 data)
            objective=config_dict.placeholder(str),
            hard_negative_weight=0.2,
            hard_negative_positives=(0,),  # the authors' 2-way local term; (0, 1) for 3-way
            logit_bias_init=-10.0,  # siglip's learnable logit bias at init (SigLIP's value)
        )
    )

    config.train = ml_collections.ConfigDict(
        dict(
            num_steps=10000,
            seed=0,
            mesh=(-1, 1, 1),  # (data, fsdp, tensor); -1 = the remaining devices
            compute_dtype="bfloat16",  # activations; master weights stay float32
            log_every_steps=50,
            checkpoint_every_steps=1000,
            checkpoint_every_minutes=30.0,
            keep_checkpoints=3,
            # "<evaluator>/<metric>" (e.g. "dev/global/s2t/R@1"): also keep the best checkpoint by it (a checkpoint is
            # saved at each of that evaluator's evaluations)
            keep_best_metric=config_dict.placeholder(str),
            # Train from step 0 in a work dir whose checkpoints were all set aside as unusable (otherwise the
            # run stops rather than start over beside them; clsp_jax.train.checkpoint).
            start_fresh=False,
            max_nonfinite_streak=20,  # consecutive skipped (non-finite) updates before the run stops
            compilation_cache_dir="~/.cache/clsp_jax/xla",  # persistent XLA cache ("" = off)
            # Run a text encoder frozen below its pooler once per training caption, not every step
            # (clsp_jax.train.text_cache; stages 1-2).
            cache_text_states=False,
            # Run a frozen speech tower (in eval mode) once per training clip, not every epoch
            # (clsp_jax.train.speech_cache).
            cache_speech_states=False,
            # Batches whose pooled speech features standardise the audio head's input at step 0 (0 = off;
            # for a speech tower trained from scratch: clsp_jax.train.head_init).
            audio_head_init_batches=0,
            prefetch_batches=2,  # batches loaded and put on the devices ahead of the step, in a thread
            # The peak FLOP/s of one device in TFLOP/s, for the MFU in metrics.jsonl and the progress line
            # (None: measured once at the start, a large matmul in the compute dtype; seconds on a CPU).
            peak_tflops_per_device=config_dict.placeholder(float),
            # (first, last): a jax.profiler trace of these steps (numbered as in metrics.jsonl) into
            # <workdir>/profile, for TensorBoard's profile tab; () = none.
            profile_steps=(),
            # With several processes, how often they agree on stopping after a SIGTERM to any of them
            # (clsp_jax.distributed.Preemption).
            preemption_check_every_steps=10,
            init_clsp=config_dict.placeholder(str),  # authors' CLSP checkpoint (.safetensors / .pt)
            init_speech=config_dict.placeholder(str),  # SPEAR checkpoint for the speech tower
            init_text=config_dict.placeholder(str),  # Hugging Face RoBERTa/BERT checkpoint for the text tower
        )
    )

    # Named evaluators, each on its own period (every_steps; 0 = off) and at the last step; metrics land as
    # "<name>/<metric>". Kinds and their keys: clsp_jax.train.evaluation (retrieval, zeroshot, similarity,
    # linear_probe), on a prepared split of data.data_dir or a manifest.
    config.eval = ml_collections.ConfigDict(
        dict(
            evaluators=dict(
                dev=dict(kind="retrieval", every_steps=1000, split="dev"),
                # the paper's gender prompts on the dev split's gender tags
                dev_zeroshot=dict(kind="zeroshot", every_steps=1000, split="dev", tasks=("gender",)),
                # linear probes of every tag the dev split has (off: --config.eval.evaluators.dev_probe.every_steps=N)
                dev_probe=dict(kind="linear_probe", every_steps=0, split="dev", folds=5, l2=1e-2),
            ),
        )
    )
    return config
