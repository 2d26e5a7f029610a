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
    np.testing.assert_array_equal(out["ranks"], ranks)
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
    monkeypatch.setattr(metrics, "SCORE_BUDGET", 64 * 500 * 4)  # 64 queries per chunk
    out = metrics.retrieval_metrics(query, gallery, gt, return_ranks=True)
    k_pct = metrics.k_for_one_percent(500)
    assert k_pct == 5
    np.testing.assert_array_equal(out["ranks"], ranks)
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


def test_ranks_are_exact_however_large():
    rng = np.random.default_rng(3)
    gallery = _normalise(rng.standard_normal((300, 8)))
    query = -gallery[:20]  # the ground truth is the worst item: all 299 others outrank it
    out = metrics.query_ranks(query, gallery, np.arange(20))
    assert (out["ranks"] == 299).all()


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


def _sparse_half_problem(rng, n_query, n_gallery, dim=16, nonzero=4):
    """Rows with `nonzero` entries of +-0.5: unit norm, dot products multiples of 1/4, exact in float32."""
    def rows(n):
        out = np.zeros((n, dim), dtype=np.float32)
        for row in out:
            row[rng.choice(dim, nonzero, replace=False)] = rng.choice([-0.5, 0.5], nonzero)
        return out

    return rows(n_query), rows(n_gallery), rng.integers(0, n_gallery, n_query)


def _direct_hit_rate_hits(query, gallery, gt, semi):
    """The definition, in float64: nothing but the positive and its semi-positives scores higher."""
    sims = query.astype(np.float64) @ gallery.astype(np.float64).T
    above = sims > sims[np.arange(len(gt)), gt][:, None]
    above[np.arange(len(gt))[:, None], semi] = False
    return ~above.any(axis=1)


def test_sparse_exact_problem_ranks_and_hit_rate_match_the_definition():
    rng = np.random.default_rng(5)
    query, gallery, gt = _sparse_half_problem(rng, 300, 400)
    semi = rng.integers(0, 400, (300, 3))
    sims = query.astype(np.float64) @ gallery.astype(np.float64).T
    ranks = (sims > sims[np.arange(300), gt][:, None]).sum(axis=1)
    assert ranks.max() > 50  # most ranks lie far beyond k_max = 10
    out = metrics.retrieval_metrics(query, gallery, gt, semi_positives=semi, return_ranks=True)
    hits = _direct_hit_rate_hits(query, gallery, gt, semi)
    np.testing.assert_array_equal(out["semi_hit"], hits)
    assert out["hit_rate"] == pytest.approx(100 * hits.mean())
    assert out["R1"] == pytest.approx(100 * np.mean(ranks == 0))
    np.testing.assert_array_equal(out["ranks"], ranks)


def _duplicated_gallery(rng, n_codes, copies, dim):
    """`n_codes` random unit vectors, each repeated `copies` times, in shuffled order."""
    codes = _normalise(rng.standard_normal((n_codes, dim)))
    code_of = rng.permutation(np.repeat(np.arange(n_codes), copies))
    return codes, code_of, codes[code_of]


def test_exact_duplicates_tied_beyond_k_max():
    # 200 queries x 60 gallery items, 4 codes of 15 copies each: the positive is tied
    # with 14 exact duplicates, more than the 10 a top-k_max list holds.
    rng = np.random.default_rng(6)
    codes, code_of, gallery = _duplicated_gallery(rng, 4, 15, 32)
    gt = rng.integers(0, 60, 200)
    query = _normalise(codes[code_of[gt]] + 0.8 * rng.standard_normal((200, 32)))
    semi = rng.integers(0, 60, (200, 3))
    # Reference from the distinct codes in float64 (their scores are far apart): an item
    # outranks the positive iff its code scores higher than the positive's code.
    code_sims = query.astype(np.float64) @ codes.astype(np.float64).T
    item_sims = code_sims[:, code_of]
    pos = item_sims[np.arange(200), gt]
    ranks = (item_sims > pos[:, None]).sum(axis=1)
    above = item_sims > pos[:, None]
    above[np.arange(200)[:, None], semi] = False
    hits = ~above.any(axis=1)
    out = metrics.retrieval_metrics(query, gallery, gt, semi_positives=semi, return_ranks=True)
    assert out["hit_rate"] == pytest.approx(100 * hits.mean())
    assert out["R1"] == pytest.approx(100 * np.mean(ranks == 0))
    np.testing.assert_array_equal(out["ranks"], ranks)


def test_queries_equal_to_their_ground_truth_with_many_duplicates():
    # Every query is its positive's own descriptor, and each gallery descriptor appears
    # 40 times, more than k_max = 20 (1% of 2,000): nothing can score strictly higher,
    # so every rank is 0 and every query a hit.
    rng = np.random.default_rng(7)
    _, _, gallery = _duplicated_gallery(rng, 50, 40, 64)
    gt = rng.permutation(2000)[:500]
    semi = rng.integers(0, 2000, (500, 3))
    out = metrics.retrieval_metrics(gallery[gt], gallery, gt, semi_positives=semi,
                                    return_ranks=True)
    assert (out["ranks"] == 0).all()
    assert out["R1"] == 100.0 and out["hit_rate"] == 100.0


def test_r1_hit_implies_hit_rate_hit():
    rng = np.random.default_rng(8)
    for trial in range(5):
        query, gallery, gt = _sparse_half_problem(rng, 200, 60, dim=8, nonzero=4)
        semi = rng.integers(0, 60, (200, 3))
        out = metrics.retrieval_metrics(query, gallery, gt, semi_positives=semi,
                                        return_ranks=True)
        r1_hits = out["ranks"] == 0
        assert r1_hits.any()
        assert out["semi_hit"][r1_hits].all(), f"trial {trial}"
        assert out["hit_rate"] >= out["R1"]
