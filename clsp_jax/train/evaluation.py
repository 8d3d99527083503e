"""Evaluation inside training: the named evaluators of `config.eval.evaluators`, each on its own period.

    config.eval.evaluators = {
        "dev": dict(kind="retrieval", every_steps=1000, split="dev"),
        "ravdess": dict(kind="zeroshot", every_steps=2000, manifest="ravdess_folds_cuts.jsonl.gz",
                        audio_root="/data/ravdess", tasks=("ravdess_emotion", "ravdess_gender")),
        "styles": dict(kind="similarity", every_steps=5000, ratings="ratings.csv"),
        "dev_probe": dict(kind="linear_probe", every_steps=2000, split="dev"),
    }

An evaluator runs at every multiple of its `every_steps` and at the last step (0 turns it off); its metrics
land in metrics.jsonl and TensorBoard as "<name>/<metric>", and `train.keep_best_metric` may name any of them.
Eval inputs: `split` (a prepared TFDS split of data.data_dir; labels from its tags) or `manifest` (a Lhotse
manifest, e.g. from data_prep.eval_sets; `audio_root` defaults to its folder; labels from the cuts); the
similarity kind reads a ratings CSV (clsp_jax.evals.sources). `batch_size` defaults to data.eval_batch_size.

Kinds, with their keys beyond kind / every_steps / batch_size:
- retrieval: split | manifest, audio_root. Metrics of clsp_jax.evals.RetrievalEvaluator.
- zeroshot: split | manifest, audio_root; tasks (names of clsp_jax.evals.prompts.ZERO_SHOT_TASKS; on a split,
  labels outside a task's classes count as unlabelled).
- similarity: ratings, audio_root.
- linear_probe: split | manifest, audio_root; attributes (default: every one of
  clsp_jax.evals.probe.PROBE_ATTRIBUTES the set has labels for), folds (5), l2 (1e-2), seed (0).

A kind is added here: a builder `(spec, ctx) -> evaluator with run(embed_audio_fn, embed_text_fn)`,
registered in KINDS with the keys it accepts. Every process builds the same evaluators and evaluates its
share of each set (padded so all do equal work) on the training mesh.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from pathlib import Path

import jax

from clsp_jax.data.fcaps_format import TAG_FIELDS, open_split
from clsp_jax.data.pipeline import make_eval_batches
from clsp_jax.evals import NetEmbedder, RetrievalEvaluator, SimilarityEvaluator, ZeroShotEvaluator, paper_task, sources
from clsp_jax.evals.probe import PROBE_ATTRIBUTES, LinearProbeEvaluator
from clsp_jax.evals.prompts import ZERO_SHOT_TASKS

COMMON_KEYS = ("kind", "every_steps", "batch_size")
SET_KEYS = ("split", "manifest", "audio_root")


@dataclasses.dataclass(frozen=True)
class Context:
    """What every builder may use: the resolved config, the tokenizer, this process's place."""

    config: object
    tokenizer: object
    process_index: int
    process_count: int


@dataclasses.dataclass
class EvalSet:
    """An eval set's batches and a label reader: `labels(key)` -> the label of each record index (None if absent)."""

    batches: object
    labels: Callable[[str], list[str | None]]


def split_labels(data_dir: str, split: str, name: str, keys) -> dict[str, list[str | None]]:
    """Tags `keys` (of fcaps_format.TAG_FIELDS) of every record of a prepared split ("" becomes None)."""
    labels = {key: [] for key in keys}
    for record in open_split(data_dir, split, name):
        for key in keys:
            labels[key].append(record["tags"][key].decode() or None)
    return labels


def gender_labels(data_dir: str, split: str, name: str) -> list[str | None]:
    """The gender tag of every record of the split (None where it is missing or not male/female)."""
    return [g if g in ("male", "female") else None for g in split_labels(data_dir, split, name, ["gender"])["gender"]]


def eval_set(spec, ctx: Context, kinds=()) -> EvalSet:
    """The batches of the evaluator's `split` or `manifest` (with caption `kinds` for retrieval)."""
    d = ctx.config.data
    batch_size = spec.get("batch_size") or d.eval_batch_size
    if spec.get("split"):
        batches = make_eval_batches(d, data_dir=d.data_dir, tokenizer=ctx.tokenizer, split=spec.split,
                                    process_index=ctx.process_index, process_count=ctx.process_count, name=d.name,
                                    batch_size=batch_size)
        tags = functools.cache(lambda: split_labels(d.data_dir, spec.split, d.name, TAG_FIELDS))  # one read
        return EvalSet(batches, lambda key: tags()[key] if key in TAG_FIELDS else [None] * batches.num_clips)
    manifest = Path(spec.manifest)
    read = sources.read_manifest(manifest, spec.get("audio_root") or manifest.parent, kinds)
    if not read.clips:
        raise ValueError(f"{manifest} has no usable cut")
    batches = sources.WaveformBatches(read.clips, batch_size, tokenizer=ctx.tokenizer, kinds=kinds,
                                      process_index=ctx.process_index, process_count=ctx.process_count)
    return EvalSet(batches, lambda key: [sources.cut_label(r, key) for r in read.records])


def _retrieval(spec, ctx: Context):
    kinds = tuple(ctx.config.data.eval_caption_kinds)
    return RetrievalEvaluator(eval_set(spec, ctx, kinds).batches, kinds=kinds)


def _zeroshot(spec, ctx: Context):
    unknown = sorted(set(spec.tasks) - set(ZERO_SHOT_TASKS))
    if unknown:
        raise ValueError(f"tasks {unknown} are not zero-shot tasks; choose from {sorted(ZERO_SHOT_TASKS)}")
    found = eval_set(spec, ctx)
    tasks = {}
    for name in spec.tasks:
        labels = found.labels(ZERO_SHOT_TASKS[name][0])
        if spec.get("split"):  # tags hold more values than a task's classes (e.g. gender "other")
            classes = {c for _, c in ZERO_SHOT_TASKS[name][1]}
            labels = [lab if lab in classes else None for lab in labels]
        tasks[name] = paper_task(name, labels)
    return ZeroShotEvaluator(found.batches, tasks, ctx.tokenizer)


def _similarity(spec, ctx: Context):
    clips, pairs = sources.read_ratings(spec.ratings, spec.get("audio_root"))
    batches = sources.WaveformBatches(clips, spec.get("batch_size") or ctx.config.data.eval_batch_size,
                                      process_index=ctx.process_index, process_count=ctx.process_count)
    return SimilarityEvaluator(batches, pairs, ctx.tokenizer)


def _linear_probe(spec, ctx: Context):
    unknown = sorted(set(spec.get("attributes") or ()) - set(PROBE_ATTRIBUTES))
    if unknown:
        raise ValueError(f"attributes {unknown} unknown; choose from {list(PROBE_ATTRIBUTES)}")
    found = eval_set(spec, ctx)
    labels = {a: found.labels(a) for a in (spec.get("attributes") or PROBE_ATTRIBUTES)}
    if not spec.get("attributes"):
        labels = {a: values for a, values in labels.items() if any(values)}
    return LinearProbeEvaluator(found.batches, labels, folds=spec.get("folds", 5), l2=spec.get("l2", 1e-2),
                                seed=spec.get("seed", 0))


@dataclasses.dataclass(frozen=True)
class Kind:
    build: Callable  # (spec, ctx) -> evaluator
    keys: tuple[str, ...]  # accepted beyond COMMON_KEYS
    required: tuple[str, ...] = ()
    needs_set: bool = True  # exactly one of split / manifest


KINDS = {
    "retrieval": Kind(_retrieval, SET_KEYS),
    "zeroshot": Kind(_zeroshot, (*SET_KEYS, "tasks"), required=("tasks",)),
    "similarity": Kind(_similarity, ("ratings", "audio_root"), required=("ratings",), needs_set=False),
    "linear_probe": Kind(_linear_probe, (*SET_KEYS, "attributes", "folds", "l2", "seed")),
}


def check_evaluators(config) -> None:
    """Raises ValueError naming the first evaluator spec that cannot run (before anything compiles), or a
    `train.keep_best_metric` that no enabled evaluator can report."""
    specs = config.eval.evaluators
    for name, spec in specs.items():
        where = f"eval.evaluators.{name}"
        kind = KINDS.get(spec.get("kind"))
        if kind is None:
            raise ValueError(f"{where}.kind {spec.get('kind')!r}: choose from {sorted(KINDS)}")
        extra = sorted(set(spec.keys()) - set(COMMON_KEYS) - set(kind.keys))
        if extra:
            raise ValueError(f"{where}: {spec.kind} takes no {extra}; its keys: {sorted({*COMMON_KEYS, *kind.keys})}")
        if not isinstance(spec.get("every_steps"), int) or spec.every_steps < 0:
            raise ValueError(f"{where}.every_steps must be an integer >= 0 (0 = off), got {spec.get('every_steps')!r}")
        missing = [k for k in kind.required if not spec.get(k)]
        if kind.needs_set and bool(spec.get("split")) == bool(spec.get("manifest")):
            missing.append("split or manifest (one of them)")
        if missing:
            raise ValueError(f"{where}: {spec.kind} needs {', '.join(missing)}")
        for key in ("manifest", "ratings"):
            if spec.get(key) and not Path(spec[key]).is_file():
                raise ValueError(f"{where}.{key}: {spec[key]} is not a file")
    best = config.train.get("keep_best_metric")
    enabled = [n for n, s in specs.items() if s.every_steps > 0]
    if best and best.split("/")[0] not in enabled:
        raise ValueError(f"train.keep_best_metric {best!r} must be '<evaluator>/<metric>' of an enabled evaluator "
                         f"({', '.join(enabled) or 'none is enabled'})")


class Evaluation:
    """The enabled evaluators of a config: `due(step, final)` says whether any runs at `step`;
    `evaluate(params, step, final)` runs those that do -> {"<name>/<metric>": value}."""

    def __init__(self, evaluators: Mapping[str, tuple[int, object]], embedder: NetEmbedder):
        self.evaluators, self.embedder = dict(evaluators), embedder

    def _running(self, step: int, final: bool) -> list[str]:
        return [name for name, (every, _) in self.evaluators.items() if final or step % every == 0]

    def due(self, step: int, final: bool) -> bool:
        return bool(self._running(step, final))

    def __call__(self, params, step: int, final: bool = False) -> dict[str, float]:
        fns = self.embedder.fns(params)
        metrics = {}
        for name in self._running(step, final):
            metrics.update({f"{name}/{k}": float(v) for k, v in self.evaluators[name][1].run(*fns).items()})
        return metrics


def make_evaluator(config, graphdef, rest, tokenizer, mesh=None) -> Evaluation | None:
    """The config's enabled evaluators (None when there are none), embedding on the training `mesh`."""
    ctx = Context(config, tokenizer, jax.process_index(), jax.process_count())
    evaluators = {}
    for name, spec in config.eval.evaluators.items():
        if spec.every_steps > 0:
            try:
                evaluators[name] = (spec.every_steps, KINDS[spec.kind].build(spec, ctx))
            except ValueError as e:
                raise ValueError(f"eval.evaluators.{name}: {e}") from None
    return Evaluation(evaluators, NetEmbedder(graphdef, rest, mesh)) if evaluators else None
