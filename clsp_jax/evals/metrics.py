"""Evaluation metrics of the paper (pure numpy): retrieval ranks, zero-shot WA/UA, correlations.

Conventions, following the authors' evaluation code (icefall spear_roberta ``compute_metrics``):

- **Rank** of a query is the 0-based position of its best-ranked correct item when the items are sorted
  by descending similarity. Ties are broken by item index (the earlier item ranks first), i.e. the order
  of a *stable* descending sort. The authors call ``torch.argsort(descending=True)`` (unstable), whose
  order among equal scores is implementation-defined (index order for rows of <= 16 items on CPU,
  arbitrary beyond); index order is the deterministic rule that matches it wherever it is defined, and it
  neither rewards nor punishes a collapsed model (all-equal scores give R@k = k/N, chance level).
- **R@k** = mean(rank < k). **mAP@10** = mean(1 / (rank + 1) if rank < 10 else 0), the authors'
  definition (with one correct item per query, as in the paper, this is the reciprocal rank cut at 10).
- **mean_rank / median_rank** are reported 1-based (rank + 1), as retrieval papers print them.
- R@k and mAP@10 are fractions in [0, 1]; the paper prints them as percentages.
- **WA** = accuracy; **UA** = mean per-class recall over the classes that occur in the labels (a class
  no clip has is left out, as the authors do).
- **Correlations**: Pearson r, Spearman rho (average ranks for ties), Kendall tau-b.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RECALL_AT = (1, 5, 10)
MAP_CUTOFF = 10
# Query rows ranked per block: bounds the [rows, items] temporaries for large dev sets.
_ROW_BLOCK = 1024


def retrieval_ranks(sim: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """0-based rank of each query's best-ranked correct item (ties: earlier item first).

    Args:
      sim: [Nq, Ni] similarities of each query to each item.
      positives: [Nq, Ni] bool, True where the item is a correct answer to the query; every query needs
        at least one.
    Returns:
      int64 [Nq].
    """
    sim, positives = np.asarray(sim), np.asarray(positives, bool)
    if sim.ndim != 2 or positives.shape != sim.shape:
        raise ValueError(f"sim must be [Nq, Ni] and positives the same shape, got {sim.shape} and {positives.shape}")
    if not np.all(np.isfinite(sim)):
        raise ValueError("sim contains NaN or inf")
    no_positive = np.flatnonzero(~positives.any(axis=1))
    if no_positive.size:
        raise ValueError(f"queries {no_positive[:10].tolist()} have no correct item")
    ranks = np.empty(len(sim), np.int64)
    items = np.arange(sim.shape[1])
    for start in range(0, len(sim), _ROW_BLOCK):
        s, p = sim[start:start + _ROW_BLOCK], positives[start:start + _ROW_BLOCK]
        # The best-ranked correct item is the highest-scoring one, the earliest among equals
        # (argmax returns the first maximum).
        best = np.argmax(np.where(p, s, -np.inf), axis=1)
        best_score = s[np.arange(len(s)), best][:, None]
        ahead = (s > best_score) | ((s == best_score) & (items < best[:, None]))
        ranks[start:start + _ROW_BLOCK] = ahead.sum(axis=1)
    return ranks


def rank_metrics(ranks: np.ndarray) -> dict[str, float]:
    """0-based ranks [Nq] -> {"R@1", "R@5", "R@10", "mAP@10", "mean_rank", "median_rank"} (ranks 1-based)."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 1 or ranks.size == 0:
        raise ValueError(f"ranks must be a non-empty 1-D array, got shape {ranks.shape}")
    metrics = {f"R@{k}": float(np.mean(ranks < k)) for k in RECALL_AT}
    metrics[f"mAP@{MAP_CUTOFF}"] = float(np.mean(np.where(ranks < MAP_CUTOFF, 1.0 / (ranks + 1.0), 0.0)))
    metrics["mean_rank"] = float(np.mean(ranks + 1))
    metrics["median_rank"] = float(np.median(ranks + 1))
    return metrics


def retrieval_metrics(sim: np.ndarray, positives: np.ndarray) -> dict[str, float]:
    """R@1/5/10, mAP@10, mean and median rank of one retrieval direction (see `retrieval_ranks`)."""
    return rank_metrics(retrieval_ranks(sim, positives))


def speech_text_retrieval(sim: np.ndarray, caption_clip: np.ndarray) -> dict[str, float]:
    """Both directions of speech-text retrieval; a clip may have several captions.

    Args:
      sim: [num_clips, num_captions] similarity of each clip to each caption.
      caption_clip: int [num_captions], the clip each caption describes.
    Returns:
      {"s2t/<metric>", "t2s/<metric>"}: speech->text (each clip's best-ranked own caption among all
      captions) and text->speech (each caption's clip among all clips).
    """
    sim, caption_clip = np.asarray(sim), np.asarray(caption_clip)
    if sim.ndim != 2 or caption_clip.shape != (sim.shape[1],):
        raise ValueError(f"caption_clip must be [num_captions] for sim {sim.shape}, got {caption_clip.shape}")
    if caption_clip.size and (caption_clip.min() < 0 or caption_clip.max() >= sim.shape[0]):
        raise ValueError(f"caption_clip values must index the {sim.shape[0]} clips")
    owns = caption_clip[None, :] == np.arange(sim.shape[0])[:, None]  # [clips, captions]
    s2t = retrieval_metrics(sim, owns)
    t2s = retrieval_metrics(sim.T, owns.T)
    return {**{f"s2t/{k}": v for k, v in s2t.items()}, **{f"t2s/{k}": v for k, v in t2s.items()}}


def zero_shot_metrics(pred: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """WA, UA and per-class recall of zero-shot predictions.

    Args:
      pred, labels: int [N] class indices into `classes`.
      classes: class names (for the "recall/<name>" keys).
    Returns:
      {"WA", "UA", "recall/<class>"} with recall only for the classes present in `labels`.
    """
    pred, labels = np.asarray(pred), np.asarray(labels)
    if pred.shape != labels.shape or pred.ndim != 1 or pred.size == 0:
        raise ValueError(f"pred and labels must be equal-length non-empty 1-D arrays, got {pred.shape}, {labels.shape}")
    for name, x in (("pred", pred), ("labels", labels)):
        if x.min() < 0 or x.max() >= len(classes):
            raise ValueError(f"{name} must be class indices in [0, {len(classes)}), got {x.min()}..{x.max()}")
    recalls = {classes[c]: float(np.mean(pred[labels == c] == c)) for c in np.unique(labels)}
    return {"WA": float(np.mean(pred == labels)), "UA": float(np.mean(list(recalls.values()))),
            **{f"recall/{name}": r for name, r in recalls.items()}}


def similarity_correlations(pred: np.ndarray, human: np.ndarray) -> dict[str, float]:
    """{"pearson", "spearman", "kendall"} (tau-b) between model scores and human ratings, both [N].

    A constant input has no defined correlation: the values are NaN then.
    """
    pred, human = np.asarray(pred, np.float64), np.asarray(human, np.float64)
    if pred.shape != human.shape or pred.ndim != 1 or pred.size < 2:
        raise ValueError(f"pred and human must be equal-length 1-D arrays of >= 2 scores, got {pred.shape}, {human.shape}")
    if not (np.all(np.isfinite(pred)) and np.all(np.isfinite(human))):
        raise ValueError("scores contain NaN or inf")
    if np.ptp(pred) == 0 or np.ptp(human) == 0:
        return {"pearson": float("nan"), "spearman": float("nan"), "kendall": float("nan")}
    import scipy.stats  # here, not at the top: slow to import, and only this metric needs it

    return {
        "pearson": float(scipy.stats.pearsonr(pred, human).statistic),
        "spearman": float(scipy.stats.spearmanr(pred, human).statistic),
        "kendall": float(scipy.stats.kendalltau(pred, human, variant="b").statistic),
    }
