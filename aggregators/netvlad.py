"""NetVLAD: a differentiable VLAD layer with soft assignment to learned centroids.

Arandjelović, Gronat, Torii, Pajdla, Sivic, "NetVLAD: CNN architecture for weakly
supervised place recognition", CVPR 2016.

For local descriptors x_i (optionally projected, then L2-normalised) and K centroids c_k:

    a_k(x_i) = softmax_k(w_k . x_i)                    (bias-free 1x1 conv, the "assign")
    V[k]     = sum_i a_k(x_i) (x_i - c_k)
    out      = L2( flatten( L2_per_cluster(V) ) )      (intra-normalisation, then global)

`initialise` sets c_k by k-means (faiss) and w_k = alpha * c_k / |c_k|, with alpha chosen
as in the authors' code release: -log(0.01) / mean(best - second-best centroid dot product).
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import PositiveFloat, PositiveInt
from torch import nn

from gengeo_bench.features import Aggregator, Features


class NetVLAD(Aggregator):
    """NetVLAD pooling of the patch map; `out_dim` = num_clusters * (proj_dim or in_dim)."""

    # The cluster-assignment space, tied between the views under `share: clusters`.
    cluster_params: tuple[str, ...] = ("assign", "centroids")

    def __init__(
        self,
        in_dim: PositiveInt,
        num_clusters: PositiveInt = 64,
        alpha: PositiveFloat = 100.0,
        normalize_input: bool = True,
        proj_dim: PositiveInt | None = None,
    ) -> None:
        # Value ranges live in the signature: the registry checks them when a config is read.
        super().__init__()
        self.in_dim = in_dim
        self.num_clusters = num_clusters
        self.alpha = float(alpha)
        self.normalize_input = normalize_input
        self.dim = proj_dim or in_dim
        self.out_dim = num_clusters * self.dim
        # Per-view dimensionality reduction; outside cluster_params so each view keeps its own.
        self.proj = (
            nn.Conv2d(in_dim, proj_dim, kernel_size=1, bias=False) if proj_dim else nn.Identity()
        )
        self.assign = nn.Conv2d(self.dim, num_clusters, kernel_size=1, bias=False)
        self.centroids = nn.Parameter(torch.rand(num_clusters, self.dim))
        # Until initialise() runs, assignment follows the (random) centroids as it will after.
        self._set_assign_from_centroids()

    @torch.no_grad()
    def _set_assign_from_centroids(self) -> None:
        weight = self.alpha * F.normalize(self.centroids, p=2, dim=1)
        self.assign.weight.copy_(weight[:, :, None, None])

    def _local(self, patches: torch.Tensor) -> torch.Tensor:
        """The local descriptors as the VLAD core sees them: `[B, D, h, w]`."""
        x = self.proj(patches)
        if self.normalize_input:
            x = F.normalize(x, p=2, dim=1)
        return x

    def assignments(self, features: Features) -> torch.Tensor:
        """The soft assignment `[B, h*w, K]` of each patch to the clusters (rows sum to 1)."""
        x = self._local(features.patches)
        return self.assign(x).flatten(2).softmax(dim=1).transpose(1, 2)

    def forward(self, features: Features) -> torch.Tensor:
        x = self._local(features.patches)
        soft_assign = self.assign(x).flatten(2).softmax(dim=1)  # [B, K, N]
        x = x.flatten(2)  # [B, D, N]
        # sum_i a_k(x_i) (x_i - c_k) = sum_i a_k(x_i) x_i - (sum_i a_k(x_i)) c_k, without
        # materialising the [B, K, D, N] residual tensor.
        vlad = torch.einsum("bkn,bdn->bkd", soft_assign, x)
        vlad = vlad - soft_assign.sum(dim=2).unsqueeze(2) * self.centroids.unsqueeze(0)
        vlad = F.normalize(vlad, p=2, dim=2)  # intra-normalisation
        return F.normalize(vlad.flatten(1), p=2, dim=1)

    @torch.no_grad()
    def initialise(
        self, features: Features | torch.Tensor, niter: int = 100, seed: int = 0
    ) -> None:
        """Set centroids by k-means on local descriptors and the assignment to match.

        `features` is a `Features` batch or an `[N, in_dim]` tensor of local descriptors
        in the backbone's space; either way they go through the projection and input
        normalisation exactly as in `forward`, so the centroids live where the residuals
        are taken.
        """
        if isinstance(features, Features):
            local = self._local(features.patches).flatten(2).transpose(1, 2)
            local = local.reshape(-1, self.dim)
        else:
            if features.ndim != 2 or features.shape[1] != self.in_dim:
                raise ValueError(
                    f"NetVLAD.initialise: expected Features or an [N, {self.in_dim}] tensor, "
                    f"got shape {tuple(features.shape)}"
                )
            local = self._local(features[:, :, None, None].to(self.centroids)).flatten(1)
        if local.shape[0] < self.num_clusters:
            raise ValueError(
                f"NetVLAD.initialise: {local.shape[0]} local descriptors for "
                f"{self.num_clusters} clusters; pass at least as many descriptors as clusters"
            )
        data = np.ascontiguousarray(local.detach().cpu().numpy(), dtype=np.float32)
        kmeans = faiss.Kmeans(self.dim, self.num_clusters, niter=niter, seed=seed, verbose=False)
        kmeans.train(data)
        centroids = torch.from_numpy(kmeans.centroids.copy())
        if self.num_clusters > 1:
            # Softmax sharpness: make the best cluster ~100x (-log 0.01) more likely than
            # the runner-up on average over the training descriptors.
            dots = torch.from_numpy(data) @ F.normalize(centroids, p=2, dim=1).T
            top2 = dots.topk(2, dim=1).values
            gap = (top2[:, 0] - top2[:, 1]).mean().item()
            if gap > 0:
                self.alpha = -math.log(0.01) / gap
        self.centroids.copy_(centroids.to(self.centroids))
        self._set_assign_from_centroids()

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, num_clusters={self.num_clusters}, dim={self.dim}, "
            f"alpha={self.alpha:.3g}, normalize_input={self.normalize_input}"
        )
