"""Retrieval metrics against a direct computation, ties, R1pct, VIGOR, CIs, McNemar."""

from __future__ import annotations

import numpy as np
import pytest

from gengeo_bench import metrics


def _direct_ranks(query, gallery, gt):
    sims = query @ gallery.T
    return (sims > sims[np.arange(len(gt)), gt][:, None]).sum(axis=1)


def _normalise(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _tied_problem(rng, n_query=60, n_gallery=40):
    """Vectors with entries in {0, +-0.5} on 4 dims: norm 1, every dot product exact, many ties."""
    signs = rng.choice([-0.5, 0.5], size=(n_gallery, 4)).astype(np.float32)
    gallery = signs
    query = rng.choice([-0.5, 0.5], size=(n_query, 4)).astype(np.float32)
    gt = rng.integers(0, n_gallery, n_query)
    return query, gallery, gt


def test_matches_direct_computation_with_ties():
    rng = np.random.default_rng(0)
    query, gallery, gt = _tied_problem(rng)
    ranks = _direct_ranks(query, gallery, gt)
    assert len(np.unique(gallery, axis=0)) < len(gallery)  # the problem really has ties
    out = metrics.retrieval_metrics(query, gallery, gt, return_ranks=True)
    np.testing.assert_array_equal(out["ranks"], np.minimum(ranks, 10))
    for k in (1, 5, 10):
        assert out[f"R{k}"] == pytest.approx(100 * np.mean(ranks < k))
    # gallery of 40 < 100: R1pct uses K = max(1, floor(0.4)) = 1
    assert out["R1pct"] == pytest.approx(out["R1"])


def test_ties_count_in_the_querys_favour():
    gallery = np.eye(3, dtype=np.float32)
    gallery = np.vstack([gallery, gallery[0]])  # item 3 duplicates item 0
    query = gallery[[0]]
    out = metrics.retrieval_metrics(query, gallery, np.array([3]), ks=(1,), return_ranks=True)
    assert out["ranks"][0] == 0 and out["R1"] == 100.0


def test_random_float_problem_and_chunking(monkeypatch):
    rng = np.random.default_rng(1)
    gallery = _normalise(rng.standard_normal((500, 16)))
    query = _normalise(gallery[:300] + 0.4 * rng.standard_normal((300, 16)))
    gt = np.arange(300)
    ranks = _direct_ranks(query, gallery, gt)
    monkeypatch.setattr(metrics, "RESULT_BUDGET", 64 * 10 * 12)  # 64 queries per FAISS call
    out = metrics.retrieval_metrics(query, gallery, gt, return_ranks=True)
    k_pct = metrics.k_for_one_percent(500)
    assert k_pct == 5
    np.testing.assert_array_equal(out["ranks"], np.minimum(ranks, 10))
    assert out["R1pct"] == pytest.approx(100 * np.mean(ranks < 5))
    assert 0 < out["R1"] < out["R5"] <= out["R10"] < 100


def test_one_percent_k():
    assert metrics.k_for_one_percent(8884) == 88
    assert metrics.k_for_one_percent(92802) == 928
    assert metrics.k_for_one_percent(50) == 1


def test_vigor_hit_rate_with_semi_positives():
    rng = np.random.default_rng(2)
    gallery = _normalise(rng.standard_normal((80, 8)))
    query = _normalise(gallery[:50] + 0.9 * rng.standard_normal((50, 8)))
    gt = np.arange(50)
    semi = np.stack([(gt + d) % 80 for d in (50, 60, 70)], axis=1)
    out = metrics.retrieval_metrics(query, gallery, gt, semi_positives=semi)
    sims = query @ gallery.T
    pos = sims[np.arange(50), gt]
    above = sims > pos[:, None]
    above[np.arange(50)[:, None], semi] = False
    expected = 100 * np.mean(~above.any(axis=1))
    assert out["hit_rate"] == pytest.approx(expected)
    assert out["hit_rate"] >= out["R1"]


def test_hit_rate_counts_semi_positives_as_harmless():
    gallery = np.eye(4, dtype=np.float32)
    query = _normalise(np.array([[0.2, 1.0, 0.0, 0.0]], dtype=np.float32))  # item 1 wins
    semi = np.array([[1, 2, 3]])
    out = metrics.retrieval_metrics(query, gallery, np.array([0]), ks=(1,), semi_positives=semi)
    assert out["R1"] == 0.0 and out["hit_rate"] == 100.0
    out = metrics.retrieval_metrics(query, gallery, np.array([0]), ks=(1,),
                                    semi_positives=np.array([[2, 3, 3]]))
    assert out["hit_rate"] == 0.0


def test_extra_positives_within_distance():
    gallery = np.eye(4, dtype=np.float32)
    query = gallery[[1]]
    plain = metrics.retrieval_metrics(query, gallery, np.array([0]), ks=(1,))
    near = metrics.retrieval_metrics(query, gallery, np.array([0]), ks=(1,),
                                     extra_positives=[np.array([1])])
    assert plain["R1"] == 0.0 and near["R1"] == 100.0


def test_ranks_beyond_k_max_are_lower_bounds():
    rng = np.random.default_rng(3)
    gallery = _normalise(rng.standard_normal((300, 8)))
    query = -gallery[:20]  # the ground truth is the worst item
    out = metrics.query_ranks(query, gallery, np.arange(20), k_max=10)
    assert (out["ranks"] == 10).all()


def test_bootstrap_interval_covers_the_mean_and_shrinks():
    rng = np.random.default_rng(4)
    hits = rng.random(400) < 0.3
    lo, hi = metrics.bootstrap_ci(hits)
    assert lo < 100 * hits.mean() < hi
    # Binomial standard error: the 95% interval is about +-1.96 sqrt(p(1-p)/n).
    half = 1.96 * np.sqrt(hits.mean() * (1 - hits.mean()) / 400) * 100
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)
    lo2, hi2 = metrics.bootstrap_ci(np.tile(hits, 16))
    assert hi2 - lo2 < (hi - lo) / 3


def test_mcnemar_exact():
    a = np.array([1] * 10 + [0] * 0 + [1] * 5, bool)
    b = np.array([0] * 10 + [1] * 0 + [1] * 5, bool)
    out = metrics.mcnemar(a, b)
    assert out["only_a"] == 10 and out["only_b"] == 0
    assert out["p_value"] == pytest.approx(2 * 0.5 ** 10)
    assert metrics.mcnemar(a, a)["p_value"] == 1.0
