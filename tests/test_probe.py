"""Linear probe (clsp_jax.evals.probe): hand-checkable cases on constructed embeddings, the evaluator on
eval batches with padding, and the synthetic corpus's tags."""

from __future__ import annotations

import numpy as np
import pytest

from clsp_jax.evals import probe as P


def test_folds_are_stratified_and_balanced():
    y = np.array([0] * 7 + [1] * 5 + [2] * 2)
    fold = P.stratified_folds(y, 3, seed=0)
    assert sorted(np.bincount(fold).tolist()) == [4, 5, 5]
    for c, n in ((0, 7), (1, 5)):  # every fold holds a class with >= 3 members
        assert set(fold[y == c]) == {0, 1, 2} and len(fold[y == c]) == n
    assert len(set(fold[y == 2])) == 2  # a class of 2 lands in two different folds
    np.testing.assert_array_equal(fold, P.stratified_folds(y, 3, seed=0))


def test_separable_embeddings_are_classified_perfectly():
    """Three classes on three axes plus small noise: every held-out clip is right."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 10)
    x = np.eye(8)[y] + 0.05 * rng.normal(size=(30, 8))
    m = P.probe_metrics(x, [("a", "b", "c")[i] for i in y], folds=5)
    assert m["accuracy"] == 1.0 and m["UA"] == 1.0
    assert m["num_clips"] == 30 and m["num_classes"] == 3 and m["recall/b"] == 1.0


def test_uninformative_embeddings_predict_the_training_majority():
    """Every clip has the same embedding: the fitted model is its bias, the training folds' class prior, so
    each held-out clip gets the majority class. 6 "a" and 4 "b" over 2 stratified folds: each training half
    holds 3 a and 2 b, so everything is predicted "a": accuracy 6/10, UA (1 + 0) / 2."""
    x = np.ones((10, 4))
    m = P.probe_metrics(x, ["a"] * 6 + ["b"] * 4, folds=2)
    assert m["accuracy"] == pytest.approx(0.6) and m["UA"] == pytest.approx(0.5)
    assert m["recall/a"] == 1.0 and m["recall/b"] == 0.0


def test_one_feature_with_overlap_hand_worked():
    """1-D points: a at 0, 1, 2, 3 and b at 2.5, 4, 5, 6; leave-one-out (8 folds). Held out, each point is
    classified by the boundary the other seven give (near the middle of the overlap, between 2.5 and 3), so
    a@3 and b@2.5 are the only errors: accuracy 6/8, both recalls 3/4."""
    x = np.array([0, 1, 2, 3, 2.5, 4, 5, 6], float)[:, None]
    m = P.probe_metrics(x, ["a"] * 4 + ["b"] * 4, folds=8, l2=1e-4)
    assert m["accuracy"] == pytest.approx(0.75) and m["recall/a"] == pytest.approx(0.75)


def test_unlabelled_rare_and_single_class_are_counted():
    x = np.array([0, 1, 2, 3, 4, 20, 21, 22, 23, 10, 10, 10], float)[:, None]
    m = P.probe_metrics(x, ["a"] * 5 + ["b"] * 4 + [None, "", "c"], folds=3)
    assert (m["num_clips"], m["num_unlabelled"], m["num_rare"], m["num_classes"]) == (9, 2, 1, 2)
    assert m["accuracy"] == 1.0  # a at 0-4, b at 20-23
    only = P.probe_metrics(x[:5], ["a"] * 5)
    assert only == {"num_unlabelled": 0, "num_rare": 0, "num_clips": 5, "num_classes": 1}


def test_evaluator_drops_padding_and_reports_each_attribute():
    """Eval batches of 4 with padded rows (index -1): the probe sees the 10 clips once each, in index order."""
    n = 10
    gender = ["male" if i % 2 else "female" for i in range(n)]
    vectors = {i: np.array([1.0 if i % 2 else -1.0, 0.1 * i, 1.0]) for i in range(n)}
    batches = []
    for start in range(0, 12, 4):
        index = np.array([i if i < n else -1 for i in range(start, start + 4)], np.int32)
        batches.append({"audio": np.zeros((4, 8), np.float32), "index": index, "valid": index >= 0})
    embed = lambda batch: np.stack([vectors.get(int(i), np.zeros(3)) for i in batch["index"]])
    metrics = P.LinearProbeEvaluator(batches, {"gender": gender, "accent": [None] * n}, folds=5,
                                     gather=np.asarray).run(embed)
    assert metrics["gender/accuracy"] == 1.0 and metrics["gender/num_clips"] == n
    assert metrics["accent/num_unlabelled"] == n and "accent/accuracy" not in metrics
    with pytest.raises(ValueError, match="folds >= 2"):
        P.LinearProbeEvaluator(batches, {}, folds=1)


def test_synthetic_corpus_tags():
    """The synthetic corpus's manifest records (planned, not rendered): embeddings that carry gender (one
    noisy coordinate) and nothing of the accent. The probe separates gender and stays near chance (1/8) on
    accent, and reports every tag the records carry."""
    from clsp_jax.evals.sources import cut_label
    from data_prep import synth_corpus

    plans = synth_corpus.plan_corpus(240, seed=3)
    records = [synth_corpus.cut_record(p, 16000, [(0, 8000)] * len(p.utterances)) for p in plans]
    labels = {a: [cut_label(r, a) for r in records] for a in P.PROBE_ATTRIBUTES}
    present = [a for a, values in labels.items() if any(values)]
    assert present == ["gender", "accent", "pitch", "speaking_rate"]
    rng = np.random.default_rng(0)
    sign = np.array([1.0 if g == "male" else -1.0 for g in labels["gender"]])
    x = np.concatenate([sign[:, None] + 0.3 * rng.normal(size=(len(sign), 1)), rng.normal(size=(len(sign), 7))], 1)
    metrics = {}
    for a in present:
        metrics.update({f"{a}/{k}": v for k, v in P.probe_metrics(x, labels[a]).items()})
    assert metrics["gender/accuracy"] >= 0.95 and metrics["gender/num_clips"] == 240
    assert metrics["accent/num_classes"] == 8 and metrics["accent/accuracy"] < 0.3
    assert metrics["pitch/num_unlabelled"] > 0  # whispered and changing clips have no single pitch
