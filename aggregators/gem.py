"""GeM: generalised-mean pooling of the patch map.

Radenović, Tolias, Chum, "Fine-tuning CNN Image Retrieval with No Human Annotation",
IEEE TPAMI, 2018.

    d_c = ( mean_{i} clamp(x_{c,i}, eps)^p )^(1/p)

p = 1 is average pooling, p -> inf tends to max pooling; p is learned (initialised at 3).
`whiten: D` adds the paper's learned whitening, a linear map (with bias) of the pooled
vector to D dimensions before the final L2 normalisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import PositiveFloat, PositiveInt
from torch import nn

from gengeo_bench.features import Aggregator, Features


class GeM(Aggregator):
    """Generalised-mean pooling over the patch map; `out_dim` = `in_dim` (or `whiten`)."""

    # No cluster-assignment space: `share: clusters` has nothing to tie.
    cluster_params: tuple[str, ...] = ()

    # `in_dim` comes from the backbone (the harness passes it). Value ranges live in the
    # signature: the registry checks them when a config is read.
    def __init__(self, in_dim: PositiveInt, p: PositiveFloat = 3.0, eps: PositiveFloat = 1e-6,
                 whiten: PositiveInt | None = None) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = whiten or in_dim
        self.eps = eps
        self.p = nn.Parameter(torch.tensor([float(p)]))
        self.whiten = nn.Linear(in_dim, whiten) if whiten else None

    def forward(self, features: Features) -> torch.Tensor:
        x = features.patches
        # The clamp keeps x^p real and differentiable in p (log x is needed for dp).
        pooled = x.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)
        if self.whiten is not None:
            pooled = self.whiten(F.normalize(pooled, p=2, dim=1))
        # The model L2-normalises every head's output; the paper's descriptor is unit-norm
        # too, so the module used on its own gives the same vector.
        return F.normalize(pooled, p=2, dim=1)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, p={self.p.item():.4f}, eps={self.eps}"
