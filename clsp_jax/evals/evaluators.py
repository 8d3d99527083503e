"""Evaluators (big_vision style): embed an eval set with the given functions, return a flat metric dict.

    evaluator = RetrievalEvaluator(make_eval_batches(cfg, ..., split="dev", ...))
    metrics = evaluator.run(*NetEmbedder(graphdef, rest).fns(state["params"]))    # inside training
    metrics = evaluator.run(*model_embed_fns(CLSP.load(path)))                     # from a checkpoint

Embedding functions (return unit-norm float32 embeddings):

    embed_audio_fn(batch) -> [b, D]    batch["audio"] float32 [b, N] 16 kHz, batch["audio_lens"] int32 [b]
    embed_text_fn(tokens) -> [n, D]    tokens["input_ids"], tokens["attention_mask"] int32 [n, L]

They get this host's rows and return those rows' embeddings, as numpy or a fully addressable jax.Array,
or as a global jax.Array whose rows are the hosts' rows in process order (what
`jax.make_array_from_process_local_data` builds along a batch-sharded axis). Evaluators gather rows
from all hosts with `process_allgather(tiled=True)`, drop padded rows by `valid` and order clips by
record index, so every host returns the same metrics whatever the number of hosts.

Batches: `clsp_jax.data.pipeline.EvalBatches` (prepared TFDS splits) or `clsp_jax.evals.sources.WaveformBatches`
(manifests, audio files): audio [b, N], audio_lens [b], index [b] (record index, -1 for padding),
valid [b]; retrieval also needs input_ids / attention_mask [K*b, L] with caption kind k of clip i at
row k*b + i and caption_valid [K*b]. Every host yields the same number of batches of the same b.
Clips whose record index is missing from the gathered rows (failed audio) are simply absent.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from clsp_jax import sharding
from clsp_jax.evals import metrics as M
from clsp_jax.evals.prompts import ZERO_SHOT_TASKS
from clsp_jax.evals.sources import RatedPair
from clsp_jax.features import fbank
from clsp_jax.tokenizer import CaptionTokenizer

EmbedFn = Callable[[Mapping[str, Any]], Any]
Gather = Callable[[Any], np.ndarray]
ENSEMBLES = ("max", "mean")

log = logging.getLogger(__name__)


def gather_rows(x) -> np.ndarray:
    """Rows of every host, concatenated in process order (a global jax.Array: its full value)."""
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclasses.dataclass
class Embedded:
    """Embeddings of the valid clips of an eval set, ordered by record index.

    index int [N]; audio float32 [N, D]; text float32 [K, N, D] and caption_valid bool [K, N] (K caption
    kinds, 0 when only audio was embedded).
    """

    index: np.ndarray
    audio: np.ndarray
    text: np.ndarray
    caption_valid: np.ndarray


def embed_clips(batches: Iterable[Mapping[str, np.ndarray]], embed_audio_fn: EmbedFn,
                embed_text_fn: EmbedFn | None = None, num_kinds: int = 0, *, gather: Gather = gather_rows,
                name: str = "eval") -> Embedded:
    """Embeds every batch (audio, and `num_kinds` caption kinds), gathers hosts, drops padding."""
    index, audio = [], []
    text, caption_valid = [[] for _ in range(num_kinds)], [[] for _ in range(num_kinds)]
    total = len(batches) if hasattr(batches, "__len__") else None
    every = max(1, (total or 100) // 10)
    for step, batch in enumerate(batches, 1):
        b = len(batch["audio"])
        valid = gather(np.asarray(batch["valid"], bool))
        emb = gather(embed_audio_fn(batch))
        if len(emb) != len(valid):
            raise ValueError(f"embed_audio_fn gave {len(emb)} rows for {len(valid)} gathered clips")
        index.append(gather(np.asarray(batch["index"], np.int32))[valid])
        audio.append(_unit(emb[valid]))
        if num_kinds and batch["input_ids"].shape[0] != num_kinds * b:
            raise ValueError(f"batch has {batch['input_ids'].shape[0]} caption rows, expected {num_kinds} x {b}")
        for k in range(num_kinds):
            rows = slice(k * b, (k + 1) * b)
            tokens = {"input_ids": batch["input_ids"][rows], "attention_mask": batch["attention_mask"][rows]}
            text[k].append(_unit(gather(embed_text_fn(tokens))[valid]))
            caption_valid[k].append(gather(np.asarray(batch["caption_valid"][rows], bool))[valid])
        if step % every == 0 or step == total:
            log.info("%s: embedded batch %d/%s", name, step, total or "?")
    if not index:
        raise ValueError(f"{name}: the eval set yielded no batches")
    index = np.concatenate(index)
    order = np.argsort(index, kind="stable")
    index = index[order]
    if np.any(index[1:] == index[:-1]):
        raise ValueError(f"{name}: record indices repeat across valid rows; batches must hold each clip once")
    audio = np.concatenate(audio)[order]

    def by_kind(parts: list[list[np.ndarray]], empty_shape: tuple) -> np.ndarray:
        return np.stack([np.concatenate(p)[order] for p in parts]) if parts else np.zeros(empty_shape, audio.dtype)

    return Embedded(index=index, audio=audio, text=by_kind(text, (0, *audio.shape)),
                    caption_valid=by_kind(caption_valid, (0, len(index))).astype(bool))


def embed_texts(texts: Sequence[str], tokenizer: CaptionTokenizer, embed_text_fn: EmbedFn, *,
                batch_size: int = 16, gather: Gather = gather_rows) -> np.ndarray:
    """Unit embeddings [len(texts), D] of texts every host holds alike (prompts, rated captions).

    Chunks are padded to `batch_size` rows (one compiled shape); after gathering, the first host's copy
    of each chunk is kept.
    """
    if not texts:
        raise ValueError("embed_texts needs at least one text")
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start:start + batch_size])
        n = len(chunk)
        out.append(gather(embed_text_fn(tokenizer(chunk + [chunk[-1]] * (batch_size - n))))[:n])
    return _unit(np.concatenate(out))


class RetrievalEvaluator:
    """Speech<->text retrieval per caption kind (the paper: first global, last fine-grained caption).

    For each kind, the clips with a caption of that kind form an N x N retrieval problem.
    Metrics: "<kind>/s2t/R@1", ".../R@5", ".../R@10", ".../mAP@10", ".../mean_rank", ".../median_rank",
    the same for "t2s", and "<kind>/num_clips" (see clsp_jax.evals.metrics for the definitions).
    """

    def __init__(self, batches, kinds: Sequence[str] = ("global", "finegrained"), *, gather: Gather = gather_rows):
        self.batches, self.kinds, self.gather = batches, tuple(kinds), gather

    def run(self, embed_audio_fn: EmbedFn, embed_text_fn: EmbedFn) -> dict[str, float]:
        emb = embed_clips(self.batches, embed_audio_fn, embed_text_fn, len(self.kinds), gather=self.gather,
                          name="retrieval")
        metrics = {}
        for k, kind in enumerate(self.kinds):
            keep = emb.caption_valid[k]
            metrics[f"{kind}/num_clips"] = int(keep.sum())
            if keep.any():
                sim = emb.audio[keep] @ emb.text[k][keep].T
                for name, value in M.speech_text_retrieval(sim, np.arange(int(keep.sum()))).items():
                    metrics[f"{kind}/{name}"] = value
        return metrics


@dataclasses.dataclass(frozen=True)
class ZeroShotTask:
    """Prompts and labels of one zero-shot task.

    Attributes:
      prompts: (prompt, class) pairs; a class may have several prompts.
      labels: class of each record index of the eval set (None: unlabelled, left out and counted).
    """

    prompts: tuple[tuple[str, str], ...]
    labels: Sequence[str | None]

    @property
    def classes(self) -> tuple[str, ...]:
        """Classes in the order of their first prompt."""
        return tuple(dict.fromkeys(c for _, c in self.prompts))


def paper_task(name: str, labels: Sequence[str | None]) -> ZeroShotTask:
    """The paper's prompts for task `name` (a key of clsp_jax.evals.prompts.ZERO_SHOT_TASKS)."""
    if name not in ZERO_SHOT_TASKS:
        raise ValueError(f"unknown zero-shot task {name!r}; choose from {sorted(ZERO_SHOT_TASKS)}")
    return ZeroShotTask(tuple(ZERO_SHOT_TASKS[name][1]), labels)


class ZeroShotEvaluator:
    """Zero-shot classification by cosine between clip and prompt embeddings.

    ensemble="max" (the authors' protocol, default): the class of the best-scoring prompt wins (the
    earliest prompt among equal scores), so IEMOCAP's "happy" and "excited" prompts both predict happy.
    ensemble="mean": each class's prompt embeddings are averaged and renormalised first (CLIP-style
    template ensembles).
    Metrics per task: "<task>/WA", "<task>/UA", "<task>/recall/<class>", "<task>/num_clips" (labelled
    clips scored) and "<task>/num_unlabelled".
    """

    def __init__(self, batches, tasks: Mapping[str, ZeroShotTask], tokenizer: CaptionTokenizer, *,
                 ensemble: str = "max", gather: Gather = gather_rows):
        if ensemble not in ENSEMBLES:
            raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {ensemble!r}")
        self.batches, self.tasks, self.tokenizer = batches, dict(tasks), tokenizer
        self.ensemble, self.gather = ensemble, gather

    def _predict(self, audio: np.ndarray, task: ZeroShotTask, embed_text_fn: EmbedFn) -> np.ndarray:
        """Class index [N] of each clip. argmax takes the first maximum, as torch.argmax does."""
        classes = task.classes
        prompt_class = np.array([classes.index(c) for _, c in task.prompts])
        prompts = embed_texts([p for p, _ in task.prompts], self.tokenizer, embed_text_fn, gather=self.gather)
        if self.ensemble == "mean":
            means = np.stack([prompts[prompt_class == c].mean(axis=0) for c in range(len(classes))])
            return np.argmax(audio @ _unit(means).T, axis=1)
        return prompt_class[np.argmax(audio @ prompts.T, axis=1)]

    def run(self, embed_audio_fn: EmbedFn, embed_text_fn: EmbedFn) -> dict[str, float]:
        emb = embed_clips(self.batches, embed_audio_fn, gather=self.gather, name="zero-shot")
        metrics = {}
        for name, task in self.tasks.items():
            classes = task.classes
            labels = [task.labels[i] for i in emb.index]
            unknown = sorted({lab for lab in labels if lab is not None and lab not in classes})
            if unknown:
                raise ValueError(f"{name}: labels {unknown} have no prompt (classes {list(classes)})")
            labelled = np.array([lab is not None for lab in labels], bool)
            metrics[f"{name}/num_clips"] = int(labelled.sum())
            metrics[f"{name}/num_unlabelled"] = int((~labelled).sum())
            if not labelled.any():
                continue
            pred = self._predict(emb.audio[labelled], task, embed_text_fn)
            target = np.array([classes.index(lab) for lab in labels if lab is not None])
            for key, value in M.zero_shot_metrics(pred, target, classes).items():
                metrics[f"{name}/{key}"] = value
        return metrics


class SimilarityEvaluator:
    """Style similarity scoring: correlation of model cosines with human ratings of pairs.

    A pair is (clip, caption) -> cos(speech, text) or (clip, clip) -> cos(speech, speech); pair indices
    refer to the eval set's record indices (`sources.read_ratings` builds both). Pairs whose audio failed
    are left out and counted. Metrics: "<group>/pearson", "<group>/spearman", "<group>/kendall" (tau-b),
    "<group>/num_pairs" for group "all" and each non-empty subset, and "num_pairs_skipped".
    """

    def __init__(self, batches, pairs: Sequence[RatedPair], tokenizer: CaptionTokenizer | None = None, *,
                 gather: Gather = gather_rows):
        if tokenizer is None and any(p.caption is not None for p in pairs):
            raise ValueError("pairs with captions need a tokenizer")
        self.batches, self.pairs, self.tokenizer, self.gather = batches, list(pairs), tokenizer, gather

    def run(self, embed_audio_fn: EmbedFn, embed_text_fn: EmbedFn | None = None) -> dict[str, float]:
        emb = embed_clips(self.batches, embed_audio_fn, gather=self.gather, name="similarity")
        row = {int(i): r for r, i in enumerate(emb.index)}
        pairs = [p for p in self.pairs if p.audio in row and (p.other_audio is None or p.other_audio in row)]
        captions = sorted({p.caption for p in pairs if p.caption is not None})
        text = dict(zip(captions, embed_texts(captions, self.tokenizer, embed_text_fn, gather=self.gather))) \
            if captions else {}
        model = np.array([emb.audio[row[p.audio]] @ (text[p.caption] if p.caption is not None
                                                      else emb.audio[row[p.other_audio]]) for p in pairs])
        human = np.array([p.score for p in pairs])
        subsets = np.array([p.subset for p in pairs])
        metrics = {"num_pairs_skipped": len(self.pairs) - len(pairs)}
        for group in ["all", *sorted(set(subsets.tolist()) - {""})]:
            keep = np.ones(len(pairs), bool) if group == "all" else subsets == group
            metrics[f"{group}/num_pairs"] = int(keep.sum())
            if keep.sum() >= 2:
                for key, value in M.similarity_correlations(model[keep], human[keep]).items():
                    metrics[f"{group}/{key}"] = value
        return metrics


class NetEmbedder:
    """Jitted embedding functions of a CLSPNet over given params, for evaluating inside training.

        embedder = NetEmbedder(graphdef, rest, mesh)  # from nnx.split(net, nnx.Param, ...), built once
        metrics = evaluator.run(*embedder.fns(state["params"]))

    Deterministic (eval-mode) forward; inputs are this host's rows. Without a mesh the outputs are host-local;
    with the training mesh the host rows become global arrays split over its batch axes (params may be
    sharded over several processes), so every process embeds its own rows and `gather_rows` returns all
    processes' rows in process order.
    """

    def __init__(self, graphdef, rest, mesh=None):
        def audio(params, waves, lens):
            feats, feat_lens = fbank(waves, lens)
            return nnx.merge(graphdef, params, rest).embed_features(feats, feat_lens)

        def text(params, ids, mask):
            return nnx.merge(graphdef, params, rest).embed_tokens(ids, mask)

        self._audio, self._text, self._mesh = jax.jit(audio), jax.jit(text), mesh

    def _rows(self, **arrays):
        return arrays if self._mesh is None else sharding.global_batch(arrays, self._mesh)

    def fns(self, params) -> tuple[EmbedFn, EmbedFn]:
        def audio(batch):
            x = self._rows(audio=batch["audio"], audio_lens=batch["audio_lens"])
            return self._audio(params, x["audio"], x["audio_lens"])

        def text(tokens):
            x = self._rows(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            return self._text(params, x["input_ids"], x["attention_mask"])

        return audio, text


def model_embed_fns(model) -> tuple[EmbedFn, EmbedFn]:
    """Embedding functions of a `clsp_jax.CLSP` (e.g. `CLSP.load(path)`)."""
    return (lambda batch: model.embed_audio(batch["audio"], batch["audio_lens"]),
            lambda tokens: np.asarray(model.embed_tokens(tokens["input_ids"], tokens["attention_mask"])))
