"""The CLSP trainer, one linear recipe:

    config check -> mesh -> data -> model (scratch / PyTorch towers, data-initialised audio head) -> optimizer
    -> shard -> restore
    -> jitted step -> loop { step, log, eval, checkpoint } -> final checkpoint

Everything that varies lives in the config (configs/*.py). The work dir holds the resolved config,
`metrics.jsonl`, TensorBoard events and Orbax checkpoints; re-running with the same work dir resumes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from clsp_jax import optim, sharding, weights
from clsp_jax.data.pipeline import make_train_iterator, train_captions
from clsp_jax.models.clsp import CLSPNet
from clsp_jax.models.text import TextEncoder
from clsp_jax.tokenizer import CaptionTokenizer
from clsp_jax.train import checkpoint
from clsp_jax.train.evaluation import make_evaluator
from clsp_jax.train.head_init import standardize_audio_head
from clsp_jax.train.prefetch import Prefetcher
from clsp_jax.train.step import captions_per_clip, init_state, make_train_step
from clsp_jax.train.text_cache import TextStateCache, cached_text_states, check_cacheable

log = logging.getLogger("clsp_jax.train")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ConfigError(ValueError):
    """A config that cannot run; raised before anything compiles."""


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
    """Validates what can be checked without data or compilation; returns the mesh shape."""
    t, d = config.train, config.data
    try:
        mesh_shape = sharding.parse_mesh_shape(t.mesh, num_devices)
        captions_per_clip(t.objective)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if t.compute_dtype not in DTYPES:
        raise ConfigError(f"train.compute_dtype {t.compute_dtype!r}: choose from {sorted(DTYPES)}")
    if captions_per_clip(t.objective) != d.stage:
        raise ConfigError(f"train.objective {t.objective!r} needs data.stage={captions_per_clip(t.objective)}, "
                          f"got {d.stage}")
    if not d.data_dir or not os.path.isdir(d.data_dir):
        raise ConfigError(f"data.data_dir {d.data_dir!r} is not a directory (prepare it with data_prep.prepare)")
    if not d.tokenizer or not os.path.isfile(d.tokenizer):
        raise ConfigError(f"data.tokenizer {d.tokenizer!r} is not a tokenizer.json file")
    data_parallel = mesh_shape[0] * mesh_shape[1]
    if d.batch_size_multiple % data_parallel:
        raise ConfigError(f"data.batch_size_multiple={d.batch_size_multiple} must be a multiple of the "
                          f"data-parallel size {data_parallel} (mesh {mesh_shape}): every batch must split evenly")
    for key in ("init_clsp", "init_speech", "init_text"):
        path = t.get(key)
        if path and not os.path.exists(path):
            raise ConfigError(f"train.{key}: no checkpoint at {path}")
    if t.cache_text_states:
        text = nnx.eval_shape(lambda: TextEncoder(config.model.text.to_dict(), rngs=nnx.Rngs(0)))
        paths = ["text_encoder/" + optim.param_path(k)
                 for k, _ in jax.tree_util.tree_flatten_with_path(nnx.state(text, nnx.Param))[0]]
        try:
            check_cacheable(paths, config.optim.frozen, d.stage)
        except ValueError as e:
            raise ConfigError(f"train.cache_text_states: {e}") from None
    if t.num_steps <= 0:
        raise ConfigError(f"train.num_steps must be positive, got {t.num_steps}")
    try:
        optim.make_schedule(optim.resolve_config(config.optim.to_dict()))
    except ValueError as e:
        raise ConfigError(f"optim: {e}") from None
    return mesh_shape


def build_net(config, param_init_seed: int) -> CLSPNet:
    """The network, randomly initialised or filled from the PyTorch checkpoints the config names."""
    t = config.train
    make = lambda: CLSPNet(config.model.to_dict(), rngs=nnx.Rngs(param_init_seed),
                           dtype=DTYPES[t.compute_dtype], param_dtype=jnp.float32)
    net = make()
    if t.get("init_clsp"):
        weights.load_clsp(net, t.init_clsp)
    if t.get("init_speech"):
        weights.load_speech_tower(net, t.init_speech)
    if t.get("init_text"):
        weights.load_text_tower(net, t.init_text)
    return net


def _state_shardings(state, mesh):
    shardings = sharding.param_shardings(state, mesh)
    return jax.tree.map(lambda x, s: s if getattr(x, "ndim", 0) else NamedSharding(mesh, P()), state, shardings)


def _device_batch(host: Mapping[str, np.ndarray], mesh, captions: int, text_cache: TextStateCache | None) -> dict:
    """Host batch (captions k-major [C*B, L]) -> global arrays, clips leading: captions [B, C, L], or their
    cached text states [B, C, H] when there is a cache."""
    b = host["audio"].shape[0]
    batch = {"audio": host["audio"], "audio_lens": host["audio_lens"]}
    if text_cache is not None:
        batch["text_states"] = cached_text_states(host, text_cache, captions)
    else:
        for key in ("input_ids", "attention_mask"):
            x = host[key][: captions * b]
            batch[key] = np.ascontiguousarray(x.reshape(captions, b, -1).transpose(1, 0, 2))
    if "negative_valid" in host:
        batch["negative_valid"] = host["negative_valid"]
    return sharding.global_batch(batch, mesh)


class MetricsLog:
    """metrics.jsonl + TensorBoard, written by process 0 only; truncated on resume to the restored step."""

    def __init__(self, workdir: str, resume_step: int):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        if not self.enabled:
            return
        if os.path.exists(self.path):  # drop lines logged after the checkpoint we resume from
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(kept)
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self.file = open(self.path, "a")

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for k, v in row.items():
            if k != "step" and math.isfinite(v):
                self.tb.add_scalar(k, v, step)

    def close(self):
        if self.enabled:
            self.file.close()
            self.tb.close()


class Preemption:
    """Turns SIGTERM into a flag the loop checks, so the run saves a checkpoint and exits 0."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        log.warning("SIGTERM: saving a checkpoint and exiting")
        self.requested = True

    def close(self):
        signal.signal(signal.SIGTERM, self._previous)


def _text_cache(config, net: CLSPNet, tokenizer: CaptionTokenizer) -> TextStateCache:
    """The frozen text encoder's [CLS] states of every training caption (`train.cache_text_states`)."""
    texts = train_captions(config.data, data_dir=config.data.data_dir)
    return TextStateCache.build(net.text_encoder, tokenizer, texts, length=config.data.text_fixed_length or None)


def _write_run_files(config, workdir: str) -> None:
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=2, default=list)
    shutil.copyfile(config.data.tokenizer, os.path.join(workdir, "tokenizer.json"))


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) training; returns the last logged metrics (train and final eval).

    Args:
      config: a resolved config (configs/*.py get_config(), with overrides).
      workdir: where config, metrics and checkpoints live; an existing one is resumed.
    """
    sharding.maybe_initialize_distributed()
    mesh_shape = check_config(config, jax.device_count())
    workdir = os.path.abspath(workdir)
    t = config.train
    if t.get("compilation_cache_dir"):  # restarts (resume, the demo) skip recompiling the step
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(t.compilation_cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
    _write_run_files(config, workdir)

    mesh = sharding.make_mesh(mesh_shape)
    tokenizer = CaptionTokenizer(config.data.tokenizer, buckets=config.data.text_length_buckets)
    data = make_train_iterator(config.data, data_dir=config.data.data_dir, tokenizer=tokenizer,
                               process_index=jax.process_index(), process_count=jax.process_count())

    manager = checkpoint.make_manager(workdir, every_steps=t.checkpoint_every_steps,
                                      every_minutes=t.checkpoint_every_minutes, keep=t.keep_checkpoints,
                                      best_metric=t.get("keep_best_metric"))
    resuming = manager.latest_step() is not None
    clock = time.time()
    net = build_net(config, t.seed)
    log.info("built the network in %.1f s", time.time() - clock)
    captions = captions_per_clip(t.objective)
    if t.audio_head_init_batches and not resuming:  # a resumed run restores the trained head instead
        first = make_train_iterator(config.data, data_dir=config.data.data_dir, tokenizer=tokenizer,
                                    process_index=jax.process_index(), process_count=jax.process_count())
        standardize_audio_head(net, (_device_batch(host, mesh, captions, None) for host in first),
                               t.audio_head_init_batches)
    graphdef, params, rest = nnx.split(net, nnx.Param, ...)
    tx, schedule = optim.make_optimizer(config.optim.to_dict(), params)
    text_cache = _text_cache(config, net, tokenizer) if t.cache_text_states else None
    state = init_state(net, tx, ema=config.optim.get("ema_decay") is not None)
    shardings = _state_shardings(state, mesh)
    sharding.check_no_large_replicated(state["params"], shardings["params"], mesh)
    state = jax.device_put(state, shardings)
    del net, params

    start = 0
    if resuming:
        state, data_state = checkpoint.restore(manager, checkpoint.abstract_like(state, shardings))
        data.set_state(data_state)
        start = int(state["step"])
        log.info("resumed from %s at step %d", checkpoint.checkpoint_dir(workdir), start)

    evaluate = make_evaluator(config, graphdef, rest, tokenizer)
    step_cfg = dict(t.to_dict(), ema_decay=config.optim.get("ema_decay"), frozen=list(config.optim.frozen))
    step_fn = jax.jit(make_train_step(graphdef, rest, tx, schedule, step_cfg, mesh),
                      in_shardings=(shardings, None), out_shardings=(shardings, None), donate_argnums=0)
    metrics_log = MetricsLog(workdir, start)
    preemption = Preemption()
    progress = _Progress(start, t.num_steps)
    pending, last, nonfinite_total, streak = None, {}, 0, 0

    def flush(pending):
        """Fetches a dispatched step's metrics (one step late, so the host never waits on the device).

        Returns the number of consecutive non-finite (skipped) updates so far."""
        nonlocal last, nonfinite_total, streak
        step, metrics, clips, audio_s, waited = pending
        metrics = jax.device_get(metrics)
        nonfinite_total += int(metrics["nonfinite"])
        streak = streak + 1 if metrics["nonfinite"] else 0
        progress.update(step, clips, audio_s, waited)
        if (step + 1) % t.log_every_steps == 0 or step + 1 == t.num_steps:
            last = {**{k: float(v) for k, v in metrics.items()}, "nonfinite_total": nonfinite_total,
                    **progress.rates()}
            metrics_log.write(step + 1, last)
            progress.print(step + 1, last)
        return streak

    def check_streak(streak: int) -> None:
        if streak > t.max_nonfinite_streak:
            raise FloatingPointError(f"{streak} consecutive non-finite losses "
                                     f"(more than train.max_nonfinite_streak={t.max_nonfinite_streak})")

    def eval_and_save(step: int, final: bool) -> None:
        """Periodic (or final) evaluation, then a checkpoint when the policy (or `final`) asks for one."""
        eval_metrics = None
        due = step % config.eval.every_steps == 0 or final
        if evaluate is not None and due and not preemption.requested:
            eval_metrics = evaluate(state["params"], step)
            metrics_log.write(step, eval_metrics)
            last.update(eval_metrics)
            progress.print_eval(step, eval_metrics)
            progress.restart_window()  # the rates measure training steps, not the evaluation
        if manager.latest_step() != step:
            checkpoint.save(manager, step, state, batches.state, metrics=eval_metrics, force=final)

    step = start
    # Batches are loaded and put on the devices in a thread while the step runs (clsp_jax.train.prefetch).
    batches = Prefetcher(data, lambda host: _device_batch(host, mesh, captions, text_cache), t.prefetch_batches)
    try:
        while step < t.num_steps:
            waited = time.perf_counter()
            host, batch = next(batches)
            waited = time.perf_counter() - waited  # > 0 only when the input pipeline is behind the step
            state, metrics = step_fn(state, batch)
            done, pending = pending, (step, metrics, len(host["audio_lens"]) * jax.process_count(),
                                      float(np.sum(host["audio_lens"])) / config.data.sample_rate
                                      * jax.process_count(), waited)
            step += 1  # = state["step"], so a checkpoint saved from here on is labelled with its own step
            if done is not None:
                check_streak(flush(done))
            if preemption.requested:
                break
            if step < t.num_steps:
                eval_and_save(step, final=False)
        if pending is not None:
            check_streak(flush(pending))
        eval_and_save(step, final=True)
    except FloatingPointError as e:
        if manager.latest_step() != step:
            checkpoint.save(manager, step, state, batches.state, force=True)
        manager.wait_until_finished()
        raise SystemExit(f"stopping at step {step}: {e} (updates were skipped; checkpoint saved). "
                         "Lower the learning rate or check the data.") from None
    finally:
        batches.close()
        manager.wait_until_finished()
        preemption.close()
        metrics_log.close()
    return last


class _Progress:
    """steps/s, clips/s, audio-hours/s, the share of time spent waiting for data, and ETA, over a sliding
    window of steps."""

    def __init__(self, start: int, total: int):
        self.total, self.window = total, []
        self.t0 = time.time()

    def update(self, step, clips, audio_s, waited):
        self.window = (self.window + [(time.time(), clips, audio_s, waited)])[-20:]

    def restart_window(self):
        self.window = []

    def rates(self) -> dict:
        if len(self.window) < 2:
            return {"steps_per_second": 0.0, "samples_per_second": 0.0, "audio_hours_per_second": 0.0,
                    "data_wait_fraction": 0.0}
        dt = self.window[-1][0] - self.window[0][0]
        n = len(self.window) - 1
        clips, audio, waited = (sum(row[i] for row in self.window[1:]) for i in (1, 2, 3))
        return {"steps_per_second": n / dt, "samples_per_second": clips / dt, "audio_hours_per_second": audio / dt / 3600,
                "data_wait_fraction": waited / dt}

    def print(self, step, metrics):
        if jax.process_index() != 0:
            return
        sps = metrics.get("steps_per_second", 0.0)
        eta = (self.total - step) / sps if sps > 0 else float("nan")
        print(f"step {step}/{self.total} loss {metrics['loss']:.4f} lr {metrics['learning_rate']:.2e} "
              f"scale {metrics['logit_scale']:.2f} | {sps:.2f} steps/s {metrics['samples_per_second']:.1f} clips/s "
              f"{metrics['audio_hours_per_second'] * 3600:.0f} audio-s/s "
              f"data wait {100 * metrics['data_wait_fraction']:.0f}% | ETA {_hms(eta)}", flush=True)


    def print_eval(self, step, metrics):
        if jax.process_index() == 0:
            shown = {k: v for k, v in metrics.items() if k.endswith(("R@1", "mAP@10", "WA"))}
            print(f"eval at step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(shown.items())), flush=True)


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
