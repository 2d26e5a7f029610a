"""SALAD: Sinkhorn Algorithm for Locally Aggregated Descriptors.

Izquierdo, Civera, "Optimal Transport Aggregation for Visual Place Recognition",
CVPR 2024.

Patch features f (`cluster_features`, l channels) are assigned to m clusters by an
optimal-transport plan P computed with a few log-domain Sinkhorn iterations on the score
map S (`score`). With the dustbin an extra row (a learned constant score, `dust_bin`)
absorbs the mass of uninformative patches. The descriptor is

    [ L2(token_features(global token)) , flatten_{l-major}( L2_over_l( f @ P^T ) ) ]

L2-normalised: out_dim = m * l + token_dim (8448 at the defaults). With `dustbin=True`,
the module's state dict has the reference module's keys (`token_features.0/2`,
`cluster_features.0/3`, `score.0/3`, `dust_bin`) and reproduces its descriptor.
Without the dustbin, every patch's unit mass is spread over the m clusters, each
receiving n/m.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import nn

from gengeo_bench.features import Aggregator, Features


def log_sinkhorn(
    scores: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, iters: int
) -> torch.Tensor:
    """Log-domain Sinkhorn (entropic regularisation 1): log P for `scores` `[B, R, N]`.

    `log_a` `[R]` and `log_b` `[N]` are the log row and column marginals. Each iteration
    fits the rows (u) then the columns (v), from u = v = 0, so after any number of
    iterations the columns match `log_b` exactly and the rows approximately.
    """
    u = scores.new_zeros(scores.shape[0], scores.shape[1])
    v = scores.new_zeros(scores.shape[0], scores.shape[2])
    for _ in range(iters):
        u = log_a - torch.logsumexp(scores + v.unsqueeze(1), dim=2)
        v = log_b - torch.logsumexp(scores + u.unsqueeze(2), dim=1)
    return scores + u.unsqueeze(2) + v.unsqueeze(1)


class SALAD(Aggregator):
    """SALAD aggregation of a patch map and a global token."""

    # The cluster-assignment space, tied between the views under `share: clusters`;
    # narrowed to ("score",) per instance when there is no dustbin.
    cluster_params: tuple[str, ...] = ("score", "dust_bin")

    def __init__(
        self,
        in_dim: PositiveInt,
        num_clusters: PositiveInt = 64,
        cluster_dim: PositiveInt = 128,
        token_dim: PositiveInt = 256,
        dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.3,
        sinkhorn_iters: PositiveInt = 3,
        dustbin: bool = True,
    ) -> None:
        # Value ranges live in the signature: the registry checks them when a config is read.
        super().__init__()
        self.in_dim = in_dim
        self.num_clusters = num_clusters
        self.cluster_dim = cluster_dim
        self.token_dim = token_dim
        self.sinkhorn_iters = sinkhorn_iters
        self.dustbin = dustbin
        self.out_dim = num_clusters * cluster_dim + token_dim
        self.min_patches = num_clusters if dustbin else 1  # the dustbin takes n - m of n patches

        # One dropout module in both branches, as in the reference (it has no state);
        # the Sequential indices give the reference keys (.0 and .2 / .3).
        drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.token_features = nn.Sequential(
            nn.Linear(in_dim, 512), nn.ReLU(), nn.Linear(512, token_dim)
        )
        self.cluster_features = nn.Sequential(
            nn.Conv2d(in_dim, 512, 1), drop, nn.ReLU(), nn.Conv2d(512, cluster_dim, 1)
        )
        self.score = nn.Sequential(
            nn.Conv2d(in_dim, 512, 1), drop, nn.ReLU(), nn.Conv2d(512, num_clusters, 1)
        )
        if dustbin:
            self.dust_bin = nn.Parameter(torch.tensor(1.0))
        else:
            # Narrowed per instance; the slot stays (as None, absent from the state dict)
            # for callers that tie the names of the class attribute.
            self.register_parameter("dust_bin", None)
            self.cluster_params = ("score",)

    def _plan(self, scores: torch.Tensor) -> torch.Tensor:
        """Transport plan `[B, m(+1), n]` from cluster scores `[B, m, n]`; columns sum to 1."""
        batch, m, n = scores.shape
        if not self.dustbin:
            # Each patch carries mass 1, each cluster receives n/m.
            log_a = scores.new_full((m,), math.log(n / m))
            log_b = scores.new_zeros(n)
            return log_sinkhorn(scores, log_a, log_b, self.sinkhorn_iters).exp()
        if n < m:
            raise ValueError(
                f"SALAD with a dustbin needs at least as many patches as clusters "
                f"(got {n} patches for {m} clusters): use a larger input or fewer clusters"
            )
        # Total mass 1: 1/(n+m) per cluster and per patch, the remaining (n-m)/(n+m) to
        # the dustbin row, whose score is the learned constant `dust_bin`.
        scores = torch.cat([scores, self.dust_bin.expand(batch, 1, n).to(scores)], dim=1)
        log_norm = -math.log(n + m)
        log_a = scores.new_full((m + 1,), log_norm)
        log_a[-1] = log_norm + math.log(n - m) if n > m else -math.inf
        log_b = scores.new_full((n,), log_norm)
        log_p = log_sinkhorn(scores, log_a, log_b, self.sinkhorn_iters)
        # Rescale so each patch's column sums to 1 (the reference's `log_P - norm`).
        return (log_p - log_norm).exp()

    @staticmethod
    def _tokens(patches: torch.Tensor) -> torch.Tensor:
        """`[B, C, h, w]` -> token-major `[B, h*w, C]` (row-major patches): a view when the
        map is channels-last in memory (ViT tokens, channels-last CNNs), else one copy."""
        b, c, h, w = patches.shape
        return patches.permute(0, 2, 3, 1).reshape(b, h * w, c)

    @staticmethod
    def _mlp(mlp: nn.Sequential, tokens: torch.Tensor) -> torch.Tensor:
        """A (1x1 conv, dropout, ReLU, 1x1 conv) branch applied to tokens `[B, n, C]`.

        The same arithmetic as the convolutions (their weights `[out, in, 1, 1]` viewed as
        `[out, in]`), as two matrix products over all B * n tokens at once: CPU GEMMs run
        near their peak on this shape, 1x1 convolutions do not. In training, dropout draws
        its mask over the token-major layout: the reference's distribution, other bits.
        """
        first, drop, _, last = mlp
        hidden = drop(F.linear(tokens, first.weight.flatten(1), first.bias))
        return F.linear(F.relu(hidden, inplace=True), last.weight.flatten(1), last.bias)

    def transport_plan(self, features: Features) -> torch.Tensor:
        """The plan `[B, m+1, n]` (dustbin row last) or `[B, m, n]` without a dustbin."""
        scores = self._mlp(self.score, self._tokens(features.patches))  # [B, n, m]
        return self._plan(scores.transpose(1, 2))

    def assignments(self, features: Features) -> torch.Tensor:
        """Each patch's mass per cluster, `[B, h*w, m(+1)]` (dustbin last): the plan's columns.

        In the definition's units: every patch carries mass 1 (rows sum to 1), every
        cluster receives 1 in total, and the dustbin the other n - m of the n patches'
        mass, whatever its learned score (Sinkhorn's row scaling cancels a constant row).
        """
        return self.transport_plan(features).transpose(1, 2)

    def forward(self, features: Features) -> torch.Tensor:
        tokens = self._tokens(features.patches)
        f = self._mlp(self.cluster_features, tokens)  # [B, n, l]
        scores = self._mlp(self.score, tokens).transpose(1, 2)  # [B, m, n]
        plan = self._plan(scores)[:, : self.num_clusters]  # [B, m, n]
        t = self.token_features(features.global_token)  # [B, g]
        # V[b, l, k] = sum_n f[b, n, l] P[b, k, n]: one batched matmul (of transposed views)
        # instead of the reference's two repeated [B, l, m, n] tensors.
        v = torch.bmm(f.transpose(1, 2), plan.transpose(1, 2))
        v = F.normalize(v, p=2, dim=1).flatten(1)  # l-major: entry l*m + k
        out = torch.cat([F.normalize(t, p=2, dim=-1), v], dim=-1)
        return F.normalize(out, p=2, dim=-1)

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, num_clusters={self.num_clusters}, "
            f"cluster_dim={self.cluster_dim}, token_dim={self.token_dim}, "
            f"sinkhorn_iters={self.sinkhorn_iters}, dustbin={self.dustbin}"
        )
