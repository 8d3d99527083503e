"""Linear probe: how much of an attribute a frozen embedding carries, by cross-validated logistic regression.

    evaluator = LinearProbeEvaluator(batches, {"gender": labels, "accent": labels}, folds=5)
    metrics = evaluator.run(embed_audio_fn)

Per attribute, the labelled clips are split into `folds` stratified folds; a multinomial logistic regression
(L2-regularised, on embeddings standardised with the training folds' mean and standard deviation) is fitted
on all folds but one and predicts the held-out one. The pooled held-out predictions give "<attr>/accuracy",
"<attr>/UA" (mean per-class recall over the classes present) and "<attr>/recall/<class>", as the zero-shot
metrics define them, plus "<attr>/num_clips", "<attr>/num_classes" and "<attr>/num_unlabelled". A class with
fewer than 2 clips cannot be both trained on and tested: its clips are left out and counted in
"<attr>/num_rare"; an attribute with fewer than 2 classes left reports only its counts.

Labels that are None or "" are unlabelled (the synthetic corpus leaves a tag that changes within a clip empty).
Everything runs in float64 numpy on the host, after the embeddings are gathered, so every host returns the
same metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import scipy.optimize

from clsp_jax.evals import metrics as M
from clsp_jax.evals.evaluators import EmbedFn, Gather, embed_clips, gather_rows

# Attributes a probe looks for, in report order, under the label names the eval-set builders and the
# prepared splits' tags use.
PROBE_ATTRIBUTES = ("gender", "age_bin", "emotion", "accent", "pitch", "speaking_rate")


def fit_logistic(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression: argmin_W,b mean_i CE(softmax(x_i W + b), y_i) + l2/2 |W|^2 (L-BFGS).

    Args:
      x: float64 [n, d] features; y: int [n] classes in [0, num_classes); l2 >= 0 (the bias is not penalised).
    Returns:
      (W [d, C], b [C]).
    """
    n, d = x.shape
    onehot = np.eye(num_classes)[y]

    def loss_and_grad(theta):
        w, b = theta[: d * num_classes].reshape(d, num_classes), theta[d * num_classes:]
        logits = x @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        loss = -np.sum(onehot * logp) / n + 0.5 * l2 * np.sum(w * w)
        residual = (np.exp(logp) - onehot) / n  # d loss / d logits
        return loss, np.concatenate([(x.T @ residual + l2 * w).ravel(), residual.sum(axis=0)])

    theta = np.zeros(d * num_classes + num_classes)
    theta = scipy.optimize.minimize(loss_and_grad, theta, jac=True, method="L-BFGS-B",
                                    options={"maxiter": 500}).x
    return theta[: d * num_classes].reshape(d, num_classes), theta[d * num_classes:]


def stratified_folds(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold int [n] of each example: each class shuffled (seeded), then dealt round-robin, continuing where
    the previous class stopped so that fold sizes differ by at most one."""
    fold = np.empty(len(y), np.int64)
    rng, offset = np.random.default_rng(seed), 0
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        fold[members] = (offset + np.arange(len(members))) % folds
        offset += len(members)
    return fold


def cross_validated_predictions(x: np.ndarray, y: np.ndarray, num_classes: int, *, folds: int = 5,
                                l2: float = 1e-2, seed: int = 0) -> np.ndarray:
    """Held-out class predictions int [n] of `fit_logistic` over `stratified_folds` (at most n folds).

    x: [n, d] embeddings; standardised per fold with the training part's statistics (a constant feature
    becomes 0)."""
    x = np.asarray(x, np.float64)
    fold = stratified_folds(y, min(folds, len(y)), seed)
    pred = np.empty(len(y), np.int64)
    for f in np.unique(fold):
        train, test = fold != f, fold == f
        mean, std = x[train].mean(axis=0), x[train].std(axis=0)
        scale = np.where(std > 1e-12, std, 1.0)
        w, b = fit_logistic((x[train] - mean) / scale, y[train], num_classes, l2)
        pred[test] = np.argmax(((x[test] - mean) / scale) @ w + b, axis=1)
    return pred


def probe_metrics(x: np.ndarray, labels: Sequence[str | None], *, folds: int = 5, l2: float = 1e-2,
                  seed: int = 0) -> dict[str, float]:
    """The metrics of one attribute (see the module doc, without the "<attr>/" prefix).

    x: [n, d] embeddings; labels: [n] class names (None or "" = unlabelled)."""
    labelled = np.array([lab not in (None, "") for lab in labels], bool)
    names = np.array([str(lab) if keep else "" for lab, keep in zip(labels, labelled)], object)
    classes, counts = np.unique(names[labelled], return_counts=True)
    common = set(classes[counts >= 2].tolist())
    keep = labelled & np.array([n in common for n in names], bool)
    metrics = {"num_unlabelled": int((~labelled).sum()), "num_rare": int((labelled & ~keep).sum()),
               "num_clips": int(keep.sum()), "num_classes": len(common)}
    if len(common) < 2:
        return metrics
    classes = sorted(common)
    y = np.array([classes.index(n) for n in names[keep]])
    pred = cross_validated_predictions(np.asarray(x)[keep], y, len(classes), folds=folds, l2=l2, seed=seed)
    scores = M.zero_shot_metrics(pred, y, classes)
    metrics["accuracy"] = scores.pop("WA")
    return {**metrics, **scores}


class LinearProbeEvaluator:
    """Cross-validated linear probes of frozen audio embeddings, one per attribute (see the module doc).

    Args:
      batches: eval batches (the layout of clsp_jax.evals.evaluators), audio only.
      labels: attribute -> the class name of each record index of the eval set (None or "": unlabelled).
      folds, l2, seed: the cross-validation folds, the L2 weight on standardised features, the fold seed.
    """

    def __init__(self, batches, labels: Mapping[str, Sequence[str | None]], *, folds: int = 5, l2: float = 1e-2,
                 seed: int = 0, gather: Gather = gather_rows):
        if folds < 2:
            raise ValueError(f"a linear probe needs folds >= 2, got {folds}")
        if l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {l2}")
        self.batches, self.labels, self.gather = batches, dict(labels), gather
        self.folds, self.l2, self.seed = folds, l2, seed

    def run(self, embed_audio_fn: EmbedFn, embed_text_fn: EmbedFn | None = None) -> dict[str, float]:
        emb = embed_clips(self.batches, embed_audio_fn, gather=self.gather, name="linear probe")
        metrics = {}
        for attribute, labels in self.labels.items():
            found = probe_metrics(emb.audio, [labels[i] for i in emb.index], folds=self.folds, l2=self.l2,
                                  seed=self.seed)
            metrics.update({f"{attribute}/{k}": v for k, v in found.items()})
        return metrics
