"""clsp_jax.evals.metrics on hand-worked examples: ranks with ties and several captions per clip, R@k,
mAP@10, WA/UA with imbalanced and absent classes, Pearson/Spearman/Kendall tau-b."""

import numpy as np
import pytest

from clsp_jax.evals import metrics as M


def test_perfect_and_worst_retrieval():
    perfect = M.retrieval_metrics(np.eye(4) + 0.01, np.eye(4, dtype=bool))
    assert perfect == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0, "mAP@10": 1.0, "mean_rank": 1.0, "median_rank": 1.0}
    worst = M.retrieval_metrics(-np.eye(12), np.eye(12, dtype=bool))  # the true item scores lowest
    assert worst == {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0, "mAP@10": 0.0, "mean_rank": 12.0, "median_rank": 12.0}


def test_hand_worked_ranks_and_metrics():
    sim = np.array([[0.9, 0.1, 0.5, 0.3, 0.2],     # true item 2: only 0.9 above -> rank 1
                    [0.2, 0.8, 0.7, 0.9, 0.95],    # true item 1: 0.9 and 0.95 above -> rank 2
                    [0.6, 0.1, 0.2, 0.3, 0.4]])    # true item 0 -> rank 0
    pos = np.zeros_like(sim, bool)
    pos[[0, 1, 2], [2, 1, 0]] = True
    np.testing.assert_array_equal(M.retrieval_ranks(sim, pos), [1, 2, 0])
    m = M.retrieval_metrics(sim, pos)
    assert m["R@1"] == pytest.approx(1 / 3) and m["R@5"] == 1.0
    assert m["mAP@10"] == pytest.approx((1 / 2 + 1 / 3 + 1) / 3)
    assert m["mean_rank"] == 2.0 and m["median_rank"] == 2.0


def test_map_at_10_cutoff_and_recall_boundaries():
    m = M.rank_metrics(np.array([0, 9, 10, 3]))
    # rank 9 (the 10th item) still counts 1/10; rank 10 counts 0 (the authors' rank < 10).
    assert m["mAP@10"] == pytest.approx((1 + 0.1 + 0 + 0.25) / 4)
    assert (m["R@1"], m["R@5"], m["R@10"]) == (0.25, 0.5, 0.75)
    assert m["mean_rank"] == 6.5 and m["median_rank"] == 7.0  # 1-based ranks 1, 10, 11, 4


def test_ties_put_earlier_items_first():
    sim = np.array([[0.5, 0.5, 0.5, 0.5],
                    [0.5, 0.5, 0.5, 0.5],
                    [0.7, 0.5, 0.5, 0.9],
                    [0.7, 0.5, 0.5, 0.9]])
    pos = np.zeros((4, 4), bool)
    pos[[0, 1, 2, 3], [2, 0, 2, 1]] = True
    # row 0: items 0, 1 tie ahead of item 2; row 1: item 0 is first among equals;
    # row 2: 0.9, 0.7 above and item 1 tied ahead; row 3: 0.9, 0.7 above, the tied item 2 comes after.
    np.testing.assert_array_equal(M.retrieval_ranks(sim, pos), [2, 0, 3, 2])


def test_all_equal_scores_give_chance_level():
    n = 20
    m = M.retrieval_metrics(np.zeros((n, n)), np.eye(n, dtype=bool))
    assert (m["R@1"], m["R@5"], m["R@10"]) == (1 / n, 5 / n, 10 / n)
    assert m["mean_rank"] == (n + 1) / 2


def test_several_captions_per_clip_both_directions():
    caption_clip = np.array([0, 1, 0, 1])
    sim = np.array([[0.1, 0.9, 0.8, 0.3],    # clip 0 owns captions 0, 2: best is 2 (0.8), 0.9 above -> rank 1
                    [0.6, 0.2, 0.4, 0.5]])   # clip 1 owns 1, 3: best is 3 (0.5), 0.6 above -> rank 1
    m = M.speech_text_retrieval(sim, caption_clip)
    assert (m["s2t/R@1"], m["s2t/R@5"], m["s2t/mAP@10"], m["s2t/mean_rank"]) == (0.0, 1.0, 0.5, 2.0)
    # text -> speech: captions 0, 1 rank their clip second, captions 2, 3 first.
    assert (m["t2s/R@1"], m["t2s/mAP@10"], m["t2s/mean_rank"], m["t2s/median_rank"]) == (0.5, 0.75, 1.5, 1.5)


def test_tied_positives_use_the_earliest_and_count_earlier_tied_negatives():
    sim = np.array([[0.5, 0.5, 0.5, 0.1]])
    pos = np.array([[False, True, True, False]])
    assert M.retrieval_ranks(sim, pos).tolist() == [1]


def test_ranks_match_a_stable_sort_on_a_large_tied_matrix():
    """Independent check (full stable argsort) on more rows than one block, with many ties."""
    rng = np.random.default_rng(0)
    sim = rng.integers(0, 5, (1500, 300)).astype(np.float32)
    pos = rng.random((1500, 300)) < 0.01
    pos[np.arange(1500), rng.integers(0, 300, 1500)] = True
    order = np.argsort(-sim, axis=1, kind="stable")
    expected = np.argmax(np.take_along_axis(pos, order, axis=1), axis=1)
    np.testing.assert_array_equal(M.retrieval_ranks(sim, pos), expected)


def test_retrieval_rejects_bad_input():
    with pytest.raises(ValueError, match=r"queries \[1\] have no correct item"):
        M.retrieval_ranks(np.zeros((2, 2)), np.array([[True, False], [False, False]]))
    with pytest.raises(ValueError, match="NaN"):
        M.retrieval_ranks(np.array([[np.nan]]), np.array([[True]]))
    with pytest.raises(ValueError, match="same shape"):
        M.retrieval_ranks(np.zeros((2, 3)), np.ones((3, 2), bool))
    with pytest.raises(ValueError, match="caption_clip"):
        M.speech_text_retrieval(np.zeros((2, 3)), np.array([0, 1]))
    with pytest.raises(ValueError, match="index the 2 clips"):
        M.speech_text_retrieval(np.zeros((2, 2)), np.array([0, 2]))


def test_zero_shot_ua_with_imbalanced_and_absent_classes():
    classes = ["angry", "happy", "sad", "calm"]
    labels = np.array([0] * 6 + [1, 1] + [2, 2])            # calm never occurs
    pred = np.array([0] * 6 + [1, 0] + [3, 3])               # sad clips predicted as calm
    m = M.zero_shot_metrics(pred, labels, classes)
    assert m["WA"] == pytest.approx(0.7)                     # 7 of 10
    assert m["UA"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)   # calm is left out of the mean
    assert m == {"WA": m["WA"], "UA": m["UA"], "recall/angry": 1.0, "recall/happy": 0.5, "recall/sad": 0.0}
    perfect = M.zero_shot_metrics(labels, labels, classes)
    assert perfect["WA"] == perfect["UA"] == 1.0


def test_zero_shot_rejects_bad_input():
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 2\)"):
        M.zero_shot_metrics(np.array([0, 1]), np.array([0, 2]), ["a", "b"])
    with pytest.raises(ValueError, match="equal-length"):
        M.zero_shot_metrics(np.array([0]), np.array([0, 1]), ["a", "b"])


def test_correlations_hand_worked():
    m = M.similarity_correlations(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 4.0]))
    # 5 concordant and 1 discordant pair: tau = 4/6; squared rank differences 0,1,1,0: rho = 1 - 6*2/(4*15).
    assert m["kendall"] == pytest.approx(4 / 6)
    assert m["spearman"] == pytest.approx(0.8)
    assert m["pearson"] == pytest.approx(0.8)


def test_correlations_with_ties_use_tau_b_and_average_ranks():
    m = M.similarity_correlations(np.array([1.0, 2.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 3.0]))
    # 4 concordant, 0 discordant, one tie in each variable: tau_b = 4 / sqrt((6-1)(6-1)) = 0.8.
    assert m["kendall"] == pytest.approx(0.8)
    # average ranks (1, 2.5, 2.5, 4) and (1, 2, 3.5, 3.5): covariance 3.75, variances 4.5 and 4.5.
    assert m["spearman"] == pytest.approx(3.75 / 4.5)
    # Pearson on the raw values: deviations (-1, 0, 0, 1) and (-1.25, -0.25, 0.75, 0.75).
    assert m["pearson"] == pytest.approx(2.0 / np.sqrt(2.0 * 2.75))


def test_correlations_of_reversed_and_constant_scores():
    x = np.array([0.1, 0.4, 0.3, 0.9])
    assert M.similarity_correlations(x, -x) == pytest.approx({"pearson": -1.0, "spearman": -1.0, "kendall": -1.0})
    assert all(np.isnan(v) for v in M.similarity_correlations(np.ones(4), x).values())
    with pytest.raises(ValueError, match=">= 2 scores"):
        M.similarity_correlations(np.ones(1), np.ones(1))
