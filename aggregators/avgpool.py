"""Global average pooling followed by a LayerNorm: the descriptor of Sample4Geo.

Deuser, Habel, Oswald, "Sample4Geo: Hard Negative Sampling For Cross-View
Geo-Localisation", ICCV 2023. Its model is a timm ConvNeXt (Liu et al., "A ConvNet for
the 2020s", CVPR 2022) created without classes, whose output is the ConvNeXt head minus
the classifier:

    d = LayerNorm( mean_{i} x_i )          (over the h*w patches; eps 1e-6, affine)

and its evaluation L2-normalises d (here the model does). The LayerNorm's keys are
`norm.weight` / `norm.bias` (`model.head.norm.*` in a Sample4Geo checkpoint, see
`model.import_sample4geo`). `norm: false` gives plain average pooling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import PositiveFloat, PositiveInt
from torch import nn

from gengeo_bench.features import Aggregator, Features


class AvgPool(Aggregator):
    """Mean of the patch map, then an optional LayerNorm; `out_dim` = `in_dim`."""

    cluster_params: tuple[str, ...] = ()

    def __init__(self, in_dim: PositiveInt, norm: bool = True, eps: PositiveFloat = 1e-6) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = in_dim
        self.norm = nn.LayerNorm(in_dim, eps=eps) if norm else nn.Identity()

    def forward(self, features: Features) -> torch.Tensor:
        pooled = self.norm(features.patches.mean(dim=(2, 3)))
        return F.normalize(pooled, p=2, dim=-1)
