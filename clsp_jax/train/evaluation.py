"""Evaluation inside training: retrieval and zero-shot gender on the dev split, every `eval.every_steps`."""

from __future__ import annotations

from collections.abc import Callable

import jax

from clsp_jax.data.fcaps_format import open_split
from clsp_jax.data.pipeline import make_eval_batches
from clsp_jax.evals import NetEmbedder, RetrievalEvaluator, ZeroShotEvaluator, paper_task


def gender_labels(data_dir: str, split: str, name: str) -> list[str | None]:
    """The gender tag of every record of the split (None where it is missing or not male/female)."""
    labels = []
    for record in open_split(data_dir, split, name):
        gender = record["tags"]["gender"].decode()
        labels.append(gender if gender in ("male", "female") else None)
    return labels


def make_evaluator(config, graphdef, rest, tokenizer, mesh=None) -> Callable | None:
    """-> `evaluate(params, step) -> {"<split>/<metric>": value}`, or None when no evaluation is asked for.

    Every process evaluates its share of the split (padded so all do equal work) on the training `mesh`."""
    e, d = config.eval, config.data
    if e.every_steps <= 0 or not (e.retrieval or e.zeroshot_gender):
        return None
    batches = make_eval_batches(d, data_dir=d.data_dir, tokenizer=tokenizer, split=e.split,
                                process_index=jax.process_index(), process_count=jax.process_count(), name=d.name)
    evaluators = {}
    if e.retrieval:
        evaluators["retrieval"] = RetrievalEvaluator(batches, kinds=tuple(d.eval_caption_kinds))
    if e.zeroshot_gender:
        labels = gender_labels(d.data_dir, e.split, d.name)
        evaluators["zeroshot"] = ZeroShotEvaluator(batches, {"gender": paper_task("ravdess_gender", labels)}, tokenizer)
    embedder = NetEmbedder(graphdef, rest, mesh)

    def evaluate(params, step: int) -> dict[str, float]:
        fns = embedder.fns(params)
        metrics = {}
        for evaluator in evaluators.values():
            metrics.update({f"{e.split}/{k}": float(v) for k, v in evaluator.run(*fns).items()})
        return metrics

    return evaluate
