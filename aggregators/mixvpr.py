"""MixVPR: feature mixing over the whole patch grid.

Ali-bey, Chaib-draa, Giguère, "MixVPR: Feature Mixing for Visual Place Recognition",
WACV 2023. (CV-Cities, Huang et al., IEEE JSTARS 2024, uses it on DINOv2 for cross-view
geo-localization.)

The patch map is read as C rows of n = h*w values, one row per channel. A stack of
`mix_depth` feature-mixer layers, each a residual MLP over the n values of a row,

    X <- X + W2 relu(W1 LayerNorm_n(X) + b1) + b2          (W1: n -> n*mlp_ratio, W2 back)

gives every output a view of the whole grid. Two projections then shrink the channels
(`channel_proj`, C -> out_channels) and the n positions (`row_proj`, n -> out_rows):

    Z = row_proj( channel_proj(X^T)^T )                    [out_channels, out_rows]
    d = L2( flatten(Z) )                                   out_channels-major

so out_dim = out_channels * out_rows (4096 at the paper's 1024 x 4). The mixers act on
the n = h*w positions, so the head is built for one patch grid: it declares the injected
`patch_grid` and refuses any other (see `features.Aggregator`). The state dict has the
release's keys (`mix.<i>.mix.0/1/3`, `channel_proj`, `row_proj`), and the Linear layers
start as the release initialises them (truncated normal, std 0.02, zero bias).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import NonNegativeInt, PositiveFloat, PositiveInt
from torch import nn

from gengeo_bench.errors import ConfigError
from gengeo_bench.features import Aggregator, Features


class FeatureMixer(nn.Module):
    """One residual MLP over the n positions of every channel row: `[B, C, n] -> [B, C, n]`."""

    def __init__(self, n: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = max(1, int(n * mlp_ratio))
        # Indices 0, 1, 3 are the release's keys (2 is the ReLU).
        self.mix = nn.Sequential(nn.LayerNorm(n), nn.Linear(n, hidden), nn.ReLU(), nn.Linear(hidden, n))
        for layer in (self.mix[1], self.mix[3]):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mix(x)


class MixVPR(Aggregator):
    """MixVPR over a fixed patch grid; `out_dim` = `out_channels * out_rows`."""

    # No cluster-assignment space: `share: clusters` has nothing to tie.
    cluster_params: tuple[str, ...] = ()

    def __init__(
        self,
        in_dim: PositiveInt,
        patch_grid: tuple[PositiveInt, PositiveInt],
        out_channels: PositiveInt = 1024,
        mix_depth: NonNegativeInt = 4,
        mlp_ratio: PositiveFloat = 1.0,
        out_rows: PositiveInt = 4,
    ) -> None:
        # Defaults: the paper's 4096-d configuration (1024 channels x 4 rows, 4 mixers).
        super().__init__()
        self.in_dim = in_dim
        self.patch_grid = (int(patch_grid[0]), int(patch_grid[1]))
        n = self.patch_grid[0] * self.patch_grid[1]
        self.out_dim = out_channels * out_rows
        self.mix = nn.Sequential(*[FeatureMixer(n, mlp_ratio) for _ in range(mix_depth)])
        self.channel_proj = nn.Linear(in_dim, out_channels)
        self.row_proj = nn.Linear(n, out_rows)

    def forward(self, features: Features) -> torch.Tensor:
        x = features.patches
        if tuple(x.shape[2:]) != self.patch_grid:
            h, w = self.patch_grid
            raise ConfigError(
                f"MixVPR was built for a {h}x{w} patch grid and got {x.shape[2]}x{x.shape[3]}: "
                f"its mixers are sized for {h * w} positions. Feed images of the size it was "
                f"built for (the Cell's image size)."
            )
        x = self.mix(x.flatten(2))  # [B, C, n]
        x = self.channel_proj(x.transpose(1, 2))  # [B, n, out_channels]
        x = self.row_proj(x.transpose(1, 2))  # [B, out_channels, out_rows]
        return F.normalize(x.flatten(1), p=2, dim=-1)

    def extra_repr(self) -> str:
        h, w = self.patch_grid
        return f"in_dim={self.in_dim}, patch_grid={h}x{w}, out_dim={self.out_dim}"
