"""Exact retrieval metrics with bounded memory, confidence intervals and paired tests.

Definitions (docs/metrics.md): similarity is the inner product of L2-normalised
descriptors; a query's rank is the number of gallery items scoring *strictly* higher
than its ground truth (ties count in the query's favour); `R{K}` = 100 x mean(rank < K);
`R1pct` uses K = max(1, floor(0.01 x gallery size)); VIGOR's `hit_rate` = 100 x share of
queries where nothing but the positive and its semi-positives outranks the positive.

How it stays exact in bounded memory: queries are scored in chunks, a chunk's full
rows of similarities at a time (`SCORE_BUDGET` bytes on CPU, `QUERY_CHUNK` rows on GPU),
so no query x gallery matrix ever exists. A query's positive score is read from its own
row of that product, so it is the very number its competitors are compared with: exact
duplicates of the positive tie with it (they do not outrank it), whatever the precision
of the descriptors. Ranks are full counts of the row's strictly higher entries, exact
however large, and VIGOR's hit test subtracts from that count the semi-positives above
the positive.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

QUERY_CHUNK = 4096  # GPU: a chunk's similarity block is QUERY_CHUNK x gallery floats
SCORE_BUDGET = 128 * 2**20  # CPU: bytes of one chunk's similarity rows in query_ranks
RESULT_BUDGET = 64 * 2**20  # CPU: bytes of top-k results per FAISS call (scores + ids)


def k_for_one_percent(gallery_size: int) -> int:
    """The K of R@1%: max(1, floor(0.01 x gallery size)) (8,884 -> 88; 92,802 -> 928)."""
    return max(1, int(gallery_size * 0.01))


def topk_search(
    query: np.ndarray, gallery: np.ndarray, k: int, device: str = "cpu", chunk: int | None = None
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (start, scores [c, k], indices [c, k]) per query chunk, best first.

    CPU: an exact FAISS inner-product index. CUDA: chunked matrix products + topk.
    """
    k = min(k, len(gallery))
    if device.startswith("cuda"):
        chunk = chunk or QUERY_CHUNK
        gallery_t = torch.as_tensor(gallery, device=device)
        for start in range(0, len(query), chunk):
            q = torch.as_tensor(query[start:start + chunk], device=device)
            scores, indices = (q @ gallery_t.T).topk(k, dim=1)
            yield start, scores.cpu().numpy(), indices.cpu().numpy()
        return
    import faiss

    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery, dtype=np.float32))
    # As many queries per call as the result budget allows: FAISS blocks the products
    # itself, and fewer, larger calls keep its threads busy (20k x 200 fits in one).
    chunk = chunk or max(1, RESULT_BUDGET // (k * 12))
    for start in range(0, len(query), chunk):
        scores, indices = index.search(np.ascontiguousarray(query[start:start + chunk]), k)
        yield start, scores, indices


def _pad(rows: Sequence[np.ndarray], fill: int = -1) -> np.ndarray:
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), max(width, 1)), fill, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def query_ranks(
    query: np.ndarray,
    gallery: np.ndarray,
    gt: np.ndarray,
    semi_positives: np.ndarray | None = None,
    extra_positives: Sequence[np.ndarray] | None = None,
    device: str = "cpu",
) -> dict[str, np.ndarray]:
    """Exact per-query ranks: how many gallery items score strictly above the ground truth.

    `extra_positives[q]`: further gallery indices that also count as correct for query q
    (CVACT's within-5-m protocol); the rank is then that of the best-scoring positive.
    `semi_positives` `[Q, S]` (negative entries ignored): with it, `semi_hit[q]` says
    whether nothing but semi-positives scores above the positive.
    """
    query = np.ascontiguousarray(query, dtype=np.float32)
    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    gt = np.asarray(gt, dtype=np.int64)
    n = len(query)
    positives = gt[:, None]
    if extra_positives is not None:
        positives = _pad([np.concatenate([[g], np.asarray(e, np.int64)])
                          for g, e in zip(gt, extra_positives, strict=True)])
    semis = None
    if semi_positives is not None:
        semis = np.sort(np.asarray(semi_positives, dtype=np.int64).reshape(n, -1), axis=1)
        # A semi-positive listed twice must be subtracted once: keep its first copy.
        semis[:, 1:][semis[:, 1:] == semis[:, :-1]] = -1
    cuda = device.startswith("cuda")
    chunk = QUERY_CHUNK if cuda else max(1, SCORE_BUDGET // (4 * max(len(gallery), 1)))
    chunk = min(chunk, max(n, 1))
    # CPU: numpy's OpenBLAS sgemm into one reused buffer (faster than torch's MKL on AMD
    # CPUs, and memory stays at one chunk); torch then counts with all its threads.
    buffer = None if cuda else np.empty((chunk, len(gallery)), dtype=np.float32)
    gallery_t = torch.as_tensor(gallery, device=device) if cuda else None
    # Counts are sums of 0/1 floats: every partial sum is an integer <= the gallery size,
    # exact in float32 up to 2**24 (float64 beyond, ten times slower on CPU).
    count_dtype = torch.float32 if len(gallery) <= 2**24 else torch.float64
    ranks = np.empty(n, dtype=np.int64)
    semi_hit = np.empty(n, dtype=bool) if semis is not None else None
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        if cuda:
            scores = torch.as_tensor(query[start:stop], device=device) @ gallery_t.T
        else:
            scores = torch.from_numpy(
                np.matmul(query[start:stop], gallery.T, out=buffer[: stop - start]))
        # Positive and semi-positive scores come out of `scores` itself, before it is
        # overwritten: the same arithmetic as every competitor's score.
        pos = torch.as_tensor(positives[start:stop], device=device)
        best = scores.gather(1, pos.clamp(min=0)).masked_fill(pos < 0, -torch.inf).amax(1)
        semi_above = None
        if semis is not None:
            sem = torch.as_tensor(semis[start:stop], device=device)
            semi_scores = scores.gather(1, sem.clamp(min=0))
            semi_above = ((semi_scores > best[:, None]) & (sem >= 0)).sum(1)
        # In place: no second chunk-sized buffer, and ten times faster on CPU than a
        # boolean mask and an integer sum.
        above = scores.gt_(best[:, None]).sum(1, dtype=count_dtype).long()
        ranks[start:stop] = above.cpu().numpy()
        if semi_above is not None:
            semi_hit[start:stop] = (above == semi_above).cpu().numpy()
    out = {"ranks": ranks}
    if semi_hit is not None:
        out["semi_hit"] = semi_hit
    return out


def recall_at(ranks: np.ndarray, k: int) -> float:
    """100 x share of queries with rank < k."""
    return float(100.0 * np.mean(ranks < k)) if len(ranks) else float("nan")


def retrieval_metrics(
    query: np.ndarray,
    gallery: np.ndarray,
    gt: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    semi_positives: np.ndarray | None = None,
    extra_positives: Sequence[np.ndarray] | None = None,
    device: str = "cpu",
    return_ranks: bool = False,
) -> dict:
    """`R{K}` for K in `ks`, `R1pct`, and with `semi_positives` VIGOR's `hit_rate` (percent).

    `query` `[Q, D]` and `gallery` `[G, D]` are float32, L2-normalised; `gt` `[Q]` gives
    each query's gallery index; `semi_positives` `[Q, 3]` int. With `return_ranks` the
    dict also holds `ranks` (and `semi_hit`), the per-query arrays the confidence
    intervals and paired tests use.
    """
    if len(query) != len(gt):
        raise ValueError(f"{len(query)} queries but {len(gt)} ground-truth indices")
    k_pct = k_for_one_percent(len(gallery))
    result = query_ranks(query, gallery, gt, semi_positives, extra_positives, device)
    metrics: dict = {f"R{k}": recall_at(result["ranks"], k) for k in ks}
    metrics["R1pct"] = recall_at(result["ranks"], k_pct)
    if semi_positives is not None:
        metrics["hit_rate"] = float(100.0 * result["semi_hit"].mean())
    if return_ranks:
        metrics.update(result)
    return metrics


def bootstrap_ci(
    hits: np.ndarray, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval (percent) of the mean of per-query 0/1 hits."""
    hits = np.asarray(hits, dtype=np.float64)
    if len(hits) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    # Resampling n 0/1 hits with replacement draws Binomial(n, mean) ones: sampling that
    # directly is the same bootstrap distribution at no memory cost.
    means = rng.binomial(len(hits), hits.mean(), size=n_boot) / len(hits)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(100.0 * lo), float(100.0 * hi)


def mcnemar(hits_a: np.ndarray, hits_b: np.ndarray) -> dict[str, float]:
    """Exact McNemar test on paired per-query hits of two evaluations of the same queries.

    b = queries only A gets right, c = only B; p = two-sided binomial test of b vs c.
    """
    from scipy.stats import binomtest

    hits_a, hits_b = np.asarray(hits_a, bool), np.asarray(hits_b, bool)
    if hits_a.shape != hits_b.shape:
        raise ValueError(f"paired test needs the same queries: {hits_a.shape} vs {hits_b.shape}")
    b = int(np.sum(hits_a & ~hits_b))
    c = int(np.sum(~hits_a & hits_b))
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)
    return {"only_a": b, "only_b": c, "p_value": p}
