"""The CLSP trainer, one linear recipe:

    config check -> mesh -> data -> model (scratch / PyTorch towers, data-initialised audio head) -> optimizer
    -> shard -> restore
    -> jitted step -> loop { step, log, eval, checkpoint } -> final checkpoint

Everything that varies lives in the config (configs/*.py). The work dir holds the resolved config,
`metrics.jsonl`, TensorBoard events and Orbax checkpoints; re-running with the same work dir resumes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from clsp_jax import convert, distributed, losses, optim, perf, sharding, storage
from clsp_jax.data.fcaps_format import load_num_samples
from clsp_jax.data.pipeline import make_train_iterator, train_captions
from clsp_jax.models.clsp import CLSPNet, model_config
from clsp_jax.models.text import TextEncoder
from clsp_jax.tokenizer import CaptionTokenizer
from clsp_jax.train import checkpoint
from clsp_jax.train import state as train_state
from clsp_jax.train.evaluation import check_evaluators, make_evaluator
from clsp_jax.train.head_init import standardize_audio_head
from clsp_jax.train.prefetch import Prefetcher
from clsp_jax.train.speech_cache import SpeechStateCache, check_cacheable as check_speech_cacheable
from clsp_jax.train.speed import StepFlops, StepProfiler, peak_flops_per_device, profile_range
from clsp_jax.train.step import make_train_step
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
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        model_config(config.model.to_dict())
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    try:
        losses.resolve_objective(config.loss.objective, d.stage)
    except ValueError as e:
        raise ConfigError(f"loss.objective: {e}") from None
    if t.compute_dtype not in DTYPES:
        raise ConfigError(f"train.compute_dtype {t.compute_dtype!r}: choose from {sorted(DTYPES)}")
    if d.duration_bins is not None and not d.duration_bins >= 1:
        raise ConfigError(f"data.duration_bins must be None or >= 1, got {d.duration_bins!r}")
    if not 0.0 <= d.min_audio_seconds < d.bucket_boundaries_s[-1]:
        raise ConfigError(f"data.min_audio_seconds must lie in [0, {d.bucket_boundaries_s[-1]}) (the last bucket "
                          f"boundary), got {d.min_audio_seconds!r}")
    if not d.data_dir or not epath.Path(d.data_dir).is_dir():
        raise ConfigError(f"data.data_dir {d.data_dir!r} is not a directory (prepare it with data_prep.prepare)")
    if not d.tokenizer or not epath.Path(d.tokenizer).is_file():
        raise ConfigError(f"data.tokenizer {d.tokenizer!r} is not a tokenizer.json file")
    for source in d.sources:
        try:  # the sidecar every prepared split has, and the first file the input pipeline reads
            load_num_samples(source.get("data_dir", d.data_dir), source["split"], source["name"])
        except ValueError as e:
            raise ConfigError(f"data.sources: no prepared {source['name']} {source['split']!r} split: {e}") from None
    data_parallel = mesh_shape[0] * mesh_shape[1]
    if d.batch_size_multiple % data_parallel:
        raise ConfigError(f"data.batch_size_multiple={d.batch_size_multiple} must be a multiple of the "
                          f"data-parallel size {data_parallel} (mesh {mesh_shape}): every batch must split evenly")
    for key in ("init_clsp", "init_speech", "init_text"):
        path = t.get(key)
        if path and not epath.Path(path).exists():
            raise ConfigError(f"train.{key}: no checkpoint at {path}")
    if t.cache_text_states:
        text = nnx.eval_shape(lambda: TextEncoder(config.model.text.to_dict(), rngs=nnx.Rngs(0)))
        paths = ["text_encoder/" + sharding.path_str(k)
                 for k, _ in jax.tree_util.tree_flatten_with_path(nnx.state(text, nnx.Param))[0]]
        try:
            check_cacheable(paths, config.optim.frozen, d.stage)
        except ValueError as e:
            raise ConfigError(f"train.cache_text_states: {e}") from None
    if t.cache_speech_states:
        net = nnx.eval_shape(lambda: new_net(config, 0))
        paths = [sharding.path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(nnx.state(net, nnx.Param))[0]]
        try:
            check_speech_cacheable(paths, config.optim.frozen)
        except ValueError as e:
            raise ConfigError(f"train.cache_speech_states: {e}") from None
    if t.num_steps <= 0:
        raise ConfigError(f"train.num_steps must be positive, got {t.num_steps}")
    try:
        check_evaluators(config)
        profile_range(t.profile_steps)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None
    try:
        optim.make_schedule(optim.resolve_config(config.optim.to_dict()))
    except ValueError as e:
        raise ConfigError(f"optim: {e}") from None
    return mesh_shape


def new_net(config, param_init_seed: int) -> CLSPNet:
    """The network of a resolved config, randomly initialised (float32 weights, the compute dtype's
    activations)."""
    return CLSPNet(config.model.to_dict(), rngs=nnx.Rngs(param_init_seed), dtype=DTYPES[config.train.compute_dtype],
                   param_dtype=jnp.float32)


def build_net(config, param_init_seed: int) -> CLSPNet:
    """`new_net`, filled from the PyTorch checkpoints the config names."""
    t = config.train
    net = new_net(config, param_init_seed)
    if t.get("init_clsp"):
        convert.load_clsp(net, t.init_clsp)
    if t.get("init_speech"):
        convert.load_speech_tower(net, t.init_speech)
    if t.get("init_text"):
        convert.load_text_tower(net, t.init_text)
    return net


def device_batch(host: Mapping[str, np.ndarray], mesh, captions: int, text_cache: TextStateCache | None = None,
                 speech_cache: SpeechStateCache | None = None) -> dict:
    """This process's host batch (captions k-major [C*B, L]) -> global arrays, clips leading: captions
    [B, C, L], or their cached text states [B, C, H] when there is a text cache; audio [B, N] and audio_lens
    [B], or the clips' cached speech states [B, C'] when there is a speech cache."""
    b = host["audio"].shape[0]
    if speech_cache is not None:
        batch = {"speech_states": speech_cache(host["audio"], host["audio_lens"])}
    else:
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


def _summary_writer(logdir: str):
    """tensorboardX's SummaryWriter for `logdir`, imported without torch: tensorboardX imports torch when it is
    installed (the parity extra) only to recognise torch tensors, which costs seconds at every start; we log
    floats."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
    else:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects without torch
        try:
            from tensorboardX import SummaryWriter
        finally:
            del sys.modules["torch"]
    return SummaryWriter(logdir)


class MetricsLog:
    """metrics.jsonl + TensorBoard, written by process 0 only; truncated on resume to the restored step.

    A remote work dir (gs://...) has no appends: the files are written in a local staging folder and
    uploaded whole by `sync()` (at most once a minute from `write`, and at every checkpoint and at the end),
    so the remote copy is always at least as far as the newest checkpoint, which is all a resume keeps."""

    SYNC_EVERY_S = 60.0

    def __init__(self, workdir: str, resume_step: int):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        self.remote = epath.Path(workdir)
        self.local = epath.Path(tempfile.mkdtemp(prefix="clsp_metrics_")) if storage.is_remote(workdir) else self.remote
        self.path = self.local / "metrics.jsonl"
        if self.remote != self.local and (self.remote / "metrics.jsonl").exists():
            self.path.write_text((self.remote / "metrics.jsonl").read_text())
        if self.path.exists():  # drop lines logged after the checkpoint we resume from
            lines = self.path.read_text().splitlines(keepends=True)
            self.path.write_text("".join(line for line in lines
                                         if line.strip() and json.loads(line)["step"] <= resume_step))
        self.tb = _summary_writer(str(self.local / "tensorboard"))
        self.file = self.path.open("a")
        self.synced = time.monotonic()

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for k, v in row.items():
            if k != "step" and math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        if time.monotonic() - self.synced > self.SYNC_EVERY_S:
            self.sync()

    def sync(self) -> None:
        """Uploads the staged files to a remote work dir (nothing to do for a local one)."""
        if not self.enabled or self.remote == self.local:
            return
        self.tb.flush()
        storage.upload_tree(self.local, self.remote)
        self.synced = time.monotonic()

    def close(self):
        if self.enabled:
            self.file.close()
            self.tb.close()
            self.sync()
            if self.remote != self.local:
                shutil.rmtree(self.local, ignore_errors=True)


def _text_cache(config, text_graphdef, text_params, tokenizer: CaptionTokenizer) -> TextStateCache:
    """The frozen text encoder's [CLS] states of every training caption (`train.cache_text_states`), computed
    on the host CPU of every process from the (sharded) text-encoder parameters of the train state."""
    texts = train_captions(config.data, data_dir=config.data.data_dir)
    host = multihost_utils.process_allgather(text_params, tiled=True)  # every process: the whole frozen encoder
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        encoder = nnx.merge(text_graphdef, host)
        return TextStateCache.build(encoder, tokenizer, texts, length=config.data.text_fixed_length or None)


def _speech_cache(speech_graphdef, speech_params) -> SpeechStateCache:
    """An empty cache of the frozen speech tower's frame averages (`train.cache_speech_states`), over a copy of
    the tower's (sharded) parameters of the train state on this process's first local device."""
    host = multihost_utils.process_allgather(speech_params, tiled=True)  # every process: the whole frozen tower
    return SpeechStateCache(nnx.merge(speech_graphdef, jax.device_put(host, jax.local_devices()[0])))


# Keys a resumed run must share with the run that wrote the checkpoint: the network and objective, and what
# decides which clips each step sees (sources, stage, buckets, batch layout, seeds). Others (steps, logging,
# evaluation, the learning-rate schedule, the data dir's location) may change on resume.
FIXED_ON_RESUME = ("model.", "loss.", "data.sources", "data.stage", "data.seed", "data.sample_rate",
                   "data.bucket_boundaries_s", "data.duration_bins", "data.min_audio_seconds",
                   "data.max_audio_seconds_per_batch", "data.batch_size_multiple",
                   "data.stage1_caption_pool", "data.text_fixed_length", "data.text_length_buckets", "train.seed",
                   # On or off changes the train state's tree (no checkpoint would restore), and a new period
                   # would mix snapshot spacings in one running mean.
                   "optim.average_period")


def check_resume_config(config, workdir: str) -> None:
    """Compares `config` with the config.json a previous run left in `workdir` (if any): raises ConfigError
    naming every key of FIXED_ON_RESUME that differs, with both values; logs the other changed keys. A key
    that only one side has (added to or removed from the code since the run started) is logged, not refused:
    the saved run could not have set it, and a new key's default is meant to keep what the code did before."""
    saved_path = epath.Path(workdir) / "config.json"
    if not saved_path.exists() or not (epath.Path(workdir) / "checkpoints").exists():
        return
    changed = distributed.config_differences(distributed.flatten_config(json.loads(saved_path.read_text())),
                                             distributed.flatten_config(json.loads(json.dumps(config.to_dict(),
                                                                                              default=list))))
    fixed = [(k, a, b) for k, a, b in changed if k.startswith(FIXED_ON_RESUME) and "<unset>" not in (a, b)]
    if fixed:
        raise ConfigError(f"{workdir} holds a run with another config; these cannot change on resume: "
                          + "; ".join(f"{k} was {a}, now {b}" for k, a, b in fixed) + " (use a new work dir)")
    if changed:
        log.info("config changed on resume: %s", "; ".join(f"{k}: {a} -> {b}" for k, a, b in changed))


def _write_run_files(config, workdir: str) -> None:
    if jax.process_index() != 0:
        return
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=list))
    (workdir / "tokenizer.json").write_text(epath.Path(config.data.tokenizer).read_text())


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with what follows from other keys filled in: the objective (from data.stage unless
    loss.objective names one) and, for objectives with a learnable logit bias, the network's
    model.logit_bias_init. The work dir's config.json is this resolved config."""
    config = config.copy_and_resolve_references()
    config.loss.objective = losses.resolve_objective(config.loss.objective, config.data.stage)
    if losses.OBJECTIVES[config.loss.objective].logit_bias and config.model.get("logit_bias_init") is None:
        config.model.logit_bias_init = config.loss.logit_bias_init
    return config


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) training; returns the last logged metrics (train and final eval).

    Args:
      config: a config (configs/*.py get_config(), with overrides); resolved here (`resolve_config`).
      workdir: where config, metrics and checkpoints live; an existing one is resumed.
    """
    try:
        distributed.initialize()
        distributed.check_launch(jax.devices()[0].platform, jax.local_device_count())
        mesh_shape = check_config(config, jax.device_count())
        config = resolve_config(config)
        distributed.check_same_config(config.to_dict())
        workdir = os.fspath(storage.resolve(workdir))
        distributed.check_shared_workdir(workdir)
        check_resume_config(config, workdir)
    except ValueError as e:  # ConfigError included: one line, before anything compiles or is written
        raise ConfigError(str(e)) from None
    distributed.barrier("clsp_config_checked")  # every process has read the old config.json before it changes
    t = config.train
    # Restarts (resume, the demo) skip recompiling the step. Not with several CPU processes: only process 0
    # writes the cache and the others' cache keys differ, so after a restart process 0 would load the step at
    # once while the others recompile, and gloo gives up on a collective whose peers are 30 s apart.
    if t.get("compilation_cache_dir") and (jax.process_count() == 1 or jax.devices()[0].platform != "cpu"):
        perf.use_compilation_cache(t.compilation_cache_dir)
    mesh = sharding.make_mesh(mesh_shape)
    tokenizer = CaptionTokenizer(config.data.tokenizer, buckets=config.data.text_length_buckets)
    data = make_train_iterator(config.data, data_dir=config.data.data_dir, tokenizer=tokenizer,
                               process_index=jax.process_index(), process_count=jax.process_count())
    # Step folders that are not whole checkpoints are set aside before the manager lists them, so that
    # neither the resume nor the retention of the last `keep` ever counts them.
    checkpoint.quiet_reported_errors()
    checkpoint.set_aside_incomplete(workdir)
    manager = checkpoint.make_manager(workdir, every_steps=t.checkpoint_every_steps,
                                      every_minutes=t.checkpoint_every_minutes, keep=t.keep_checkpoints,
                                      best_metric=t.get("keep_best_metric"))
    captions = losses.OBJECTIVES[config.loss.objective].captions
    ema = config.optim.get("ema_decay") is not None
    average = bool(config.optim.get("average_period"))
    make_net = lambda: new_net(config, t.seed)
    abstract_net = nnx.eval_shape(make_net)
    graphdef, abstract_params, rest = nnx.split(abstract_net, nnx.Param, ...)
    tx, schedule = optim.make_optimizer(config.optim.to_dict(), abstract_params)

    restored = None
    if manager.all_steps():  # straight into the shardings: no initial state is built
        target = train_state.abstract_state(nnx.to_pure_dict(abstract_params), tx, mesh, ema, average)
        restored = checkpoint.restore_newest(manager, target, workdir)
    set_aside = checkpoint.set_aside_folders(workdir)
    if restored is None and set_aside and not t.start_fresh:
        manager.close()
        raise checkpoint.CheckpointError(
            f"no checkpoint in {checkpoint.checkpoint_dir(workdir)} restores (set aside: {', '.join(set_aside)}); "
            "not training from step 0 over them: use a new work dir, or pass --config.train.start_fresh=True")
    if restored is not None:
        state, data_state, resumed_step = restored
        if resumed_step >= t.num_steps:
            manager.close()
            if resumed_step > t.num_steps:
                raise ConfigError(f"train.num_steps={t.num_steps} is below the step of the checkpoint in {workdir} "
                                  f"({resumed_step}): nothing to train (export an earlier step with --step, or "
                                  "raise train.num_steps to train on)")
            log.info("the checkpoint in %s is at step %d = train.num_steps: nothing to train", workdir, resumed_step)
            return {}
        shardings = jax.tree.map(lambda x: x.sharding, target)
        data.set_state(data_state)
        log.info("resumed from %s at step %d", checkpoint.checkpoint_dir(workdir), resumed_step)
    else:
        # Built (filled from checkpoints, its audio head initialised) on the host CPU; each process then copies
        # its own devices' shards into the sharded state.
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            clock = time.time()
            net = build_net(config, t.seed)
            log.info("built the network in %.1f s", time.time() - clock)
            if t.audio_head_init_batches:
                first = make_train_iterator(config.data, data_dir=config.data.data_dir, tokenizer=tokenizer,
                                            process_index=jax.process_index(), process_count=jax.process_count())
                standardize_audio_head(net, first, t.audio_head_init_batches)
        state, shardings = train_state.init_sharded_state(make_net, tx, mesh, ema, params=train_state.params_of(net),
                                                          average=average)
        del net
    # Only now (the run will train): an unchanged config.json until a resumed run has restored.
    _write_run_files(config, workdir)
    text_cache = None
    if t.cache_text_states:
        text_cache = _text_cache(config, nnx.graphdef(abstract_net.text_encoder), state["params"]["text_encoder"],
                                 tokenizer)
    speech_cache = None
    if t.cache_speech_states:
        speech_cache = _speech_cache(nnx.graphdef(abstract_net.speech), state["params"]["speech"])
    sharding.check_no_large_replicated(state["params"], shardings["params"], mesh)
    start = int(state["step"])

    evaluate = make_evaluator(config, graphdef, rest, tokenizer, mesh)
    step_fn = sharding.JittedTrainStep(
        make_train_step(graphdef, rest, tx, schedule, objective=config.loss.objective, loss_cfg=config.loss.to_dict(),
                        seed=t.seed, ema_decay=config.optim.get("ema_decay"), frozen=list(config.optim.frozen),
                        mesh=mesh, average_period=config.optim.get("average_period")),
        shardings, mesh)
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    distributed.log_preflight(mesh, workdir, f"{config.data.max_audio_seconds_per_batch / data_parallel:g} s of "
                              f"padded audio per device and step")
    peak_flops = peak_flops_per_device(t, DTYPES[t.compute_dtype])
    perf.release_compiled_programs()  # start-up's programs, before the step's compilation: the run's peak memory
    report = _Reporter(MetricsLog(workdir, start), _Progress(t.num_steps, peak_flops), t)
    step_flops, profiler = StepFlops(step_fn), StepProfiler(t.profile_steps, workdir)
    preemption = distributed.Preemption(t.preemption_check_every_steps)
    saver = checkpoint.Saver(manager, workdir)
    # Batches are loaded and put on the devices in a thread while the step runs (clsp_jax.train.prefetch).
    batches = Prefetcher(data, lambda host: device_batch(host, mesh, captions, text_cache, speech_cache),
                         t.prefetch_batches)

    def evaluate_and_save(step: int, final: bool) -> None:
        """The evaluators due at `step` (all when `final`), then a checkpoint when the policy, `final` or an
        evaluation of train.keep_best_metric asks for one."""
        eval_metrics = None
        if evaluate is not None and evaluate.due(step, final) and not preemption.stopping:
            # The step in flight finishes first: its cross-process collectives and the evaluation's must not
            # interleave differently on different processes.
            jax.block_until_ready(state)
            eval_metrics = evaluate(state["params"], step, final)
            report.evaluation(step, eval_metrics)
        # Every evaluation of the best-checkpoint metric is saved with it, so the best evaluated state is kept;
        # other checkpoints carry no metrics (evaluators on other periods do not report that metric).
        ranked = eval_metrics if eval_metrics and t.get("keep_best_metric") in eval_metrics else None
        if manager.latest_step() != step and saver.save(step, state, batches.state, metrics=ranked,
                                                        force=final or ranked is not None):
            report.metrics_log.sync()

    step, in_flight = start, None
    try:
        while step < t.num_steps:
            waited = time.perf_counter()
            host, batch = next(batches)
            waited = time.perf_counter() - waited  # > 0 only when the input pipeline is behind the step
            flops = step_flops(state, batch)
            profiler.before(step + 1)
            state, metrics = step_fn(state, batch)
            profiler.after(step + 1, metrics)
            done, in_flight = in_flight, _InFlight(step, metrics, len(host["audio_lens"]) * jax.process_count(),
                                                   float(np.sum(host["audio_lens"])) / config.data.sample_rate
                                                   * jax.process_count(), waited,
                                                   host["audio"].size / config.data.sample_rate * jax.process_count(),
                                                   flops)
            step += 1  # = state["step"], so a checkpoint saved from here on is labelled with its own step
            if done is not None:
                report.train_step(done)
            if preemption.agreed(step):
                break
            if step < t.num_steps:
                evaluate_and_save(step, final=False)
            saver.poll()
        if in_flight is not None:
            report.train_step(in_flight)
        evaluate_and_save(step, final=True)
    except FloatingPointError as e:
        if manager.latest_step() != step:
            saver.save(step, state, batches.state, force=True)
        saved = saver.wait()
        raise SystemExit(f"stopping at step {step}: {e} (updates were skipped; "
                         f"{'checkpoint saved' if saved else 'the checkpoint failed, see above'}). "
                         "Lower the learning rate or check the data.") from None
    finally:
        profiler.close()
        batches.close()
        final_saved = saver.wait()
        manager.close()
        preemption.close()
        report.close()
    if not final_saved:
        raise SystemExit(f"the checkpoint at step {step} could not be saved (see above); the newest checkpoint "
                         f"is at step {manager.latest_step() or 'none'}: free space (or fix permissions) in "
                         f"{workdir} and rerun to resume from it")
    return report.last


@dataclasses.dataclass
class _InFlight:
    """A dispatched step whose metrics are still on the device. They are read one step late, while the
    next step runs, so the host never waits on the device."""

    step: int  # 0-based index of the step; the state after it is at step + 1
    metrics: dict  # device scalars
    clips: int  # clips in the global batch
    audio_seconds: float  # real (unpadded) audio in the global batch
    data_wait: float  # seconds the loop waited for this batch
    padded_audio_seconds: float  # the global batch's audio array, padding included
    flops: float  # per device, XLA's count for the compiled step


class _Reporter:
    """Turns finished steps and evaluations into metrics.jsonl rows, TensorBoard scalars and progress lines,
    and stops the run (FloatingPointError) when the state's streak of skipped non-finite updates exceeds
    train.max_nonfinite_streak."""

    def __init__(self, metrics_log: MetricsLog, progress: "_Progress", train_config):
        self.metrics_log, self.progress, self.t = metrics_log, progress, train_config
        self.last: dict = {}

    def train_step(self, done: _InFlight) -> None:
        metrics = jax.device_get(done.metrics)
        self.progress.update(done.clips, done.audio_seconds, done.data_wait, done.padded_audio_seconds, done.flops)
        step = done.step + 1
        if step % self.t.log_every_steps == 0 or step == self.t.num_steps or metrics["nonfinite_streak"]:
            self.last = {**{k: float(v) for k, v in metrics.items()}, **self.progress.rates()}
            self.metrics_log.write(step, self.last)
            self.progress.print(step, self.last)
        if metrics["nonfinite_streak"] > self.t.max_nonfinite_streak:
            raise FloatingPointError(f"{int(metrics['nonfinite_streak'])} consecutive non-finite losses "
                                     f"(more than train.max_nonfinite_streak={self.t.max_nonfinite_streak})")

    def evaluation(self, step: int, metrics: Mapping[str, float]) -> None:
        self.metrics_log.write(step, metrics)
        self.last.update(metrics)
        self.progress.print_eval(step, metrics)
        self.progress.restart_window()  # the rates measure training steps, not the evaluation

    def close(self) -> None:
        self.metrics_log.close()


class _Progress:
    """steps/s, clips/s, audio-hours/s, the share of time spent waiting for data, model TFLOP/s per device and
    MFU (against `peak_flops` per device), the padding share of the audio, and ETA, over a sliding window of
    steps."""

    def __init__(self, total: int, peak_flops: float):
        self.total, self.peak_flops, self.window = total, peak_flops, []

    def update(self, clips, audio_s, waited, padded_audio_s, flops):
        self.window = (self.window + [(time.time(), clips, audio_s, waited, padded_audio_s, flops)])[-20:]

    def restart_window(self):
        self.window = []

    def rates(self) -> dict:
        if len(self.window) < 2:
            return {"steps_per_second": 0.0, "samples_per_second": 0.0, "audio_hours_per_second": 0.0,
                    "data_wait_fraction": 0.0, "model_tflops_per_device": 0.0, "mfu": 0.0, "padding_fraction": 0.0}
        dt = self.window[-1][0] - self.window[0][0]
        n = len(self.window) - 1
        clips, audio, waited, padded, flops = (sum(row[i] for row in self.window[1:]) for i in (1, 2, 3, 4, 5))
        return {"steps_per_second": n / dt, "samples_per_second": clips / dt, "audio_hours_per_second": audio / dt / 3600,
                "data_wait_fraction": waited / dt, "model_tflops_per_device": flops / dt / 1e12,
                "mfu": flops / dt / self.peak_flops, "padding_fraction": 1.0 - audio / padded}

    def print(self, step, metrics):
        if jax.process_index() != 0:
            return
        sps = metrics.get("steps_per_second", 0.0)
        eta = (self.total - step) / sps if sps > 0 else float("nan")
        print(f"step {step}/{self.total} loss {metrics['loss']:.4f} lr {metrics['learning_rate']:.2e} "
              f"scale {metrics['logit_scale']:.2f} | {sps:.2f} steps/s {metrics['samples_per_second']:.1f} clips/s "
              f"{metrics['audio_hours_per_second'] * 3600:.0f} audio-s/s "
              f"data wait {100 * metrics['data_wait_fraction']:.0f}% padding {100 * metrics['padding_fraction']:.0f}% "
              f"| {metrics['model_tflops_per_device']:.3g} TFLOP/s/device MFU {100 * metrics['mfu']:.1f}% "
              f"| ETA {_hms(eta)}", flush=True)


    def print_eval(self, step, metrics):
        if jax.process_index() == 0:
            shown = {k: v for k, v in metrics.items()
                     if k.endswith(("R@1", "mAP@10", "WA", "accuracy"))}
            print(f"eval at step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(shown.items())), flush=True)


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
