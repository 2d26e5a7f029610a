"""BoQ: Bag-of-Queries, learned global queries that read the patches by cross-attention.

Ali-bey, Chaib-draa, Giguère, "BoQ: A Place is Worth a Bag of Learnable Queries",
CVPR 2024.

The patch map is projected to D = `proj_channels` by a 3x3 convolution, read as h*w
tokens and layer-normalised. Each of `num_layers` blocks then

1. encodes the tokens with one transformer encoder layer (post-norm, ReLU MLP of width
   4D, no dropout); the encoded tokens go on to the next block;
2. refines its `num_queries` learned queries by self-attention, `q <- LN(q + SA(q))`
   (input-independent: at inference it could be computed once);
3. lets the queries read the encoded tokens, `o = LN(CrossAttention(q, tokens))`.

The L * Q outputs of all blocks are stacked, `[L*Q, D]`, and a linear map over the query
axis (`fc`, L*Q -> `row_dim`) gives `[D, row_dim]`, flattened D-major and L2-normalised:
out_dim = D * row_dim (16384 for the paper's ResNet-50 setting: 512 x 32). The queries
attend over any number of tokens, so any patch grid works. The state dict has the
release's keys (`proj_c`, `norm_input`, `boqs.<i>.{encoder, queries, self_attn, norm_q,
cross_attn, norm_out}`, `fc`); heads default to D / 64 as in the release.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import PositiveInt
from torch import nn

from gengeo_bench.errors import ConfigError
from gengeo_bench.features import Aggregator, Features


class BoQBlock(nn.Module):
    """One encoder layer for the tokens and one bag of queries that reads them."""

    def __init__(self, dim: int, num_queries: int, num_heads: int) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(
            d_model=dim, nhead=num_heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True
        )
        self.queries = nn.Parameter(torch.randn(1, num_queries, dim))
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_q = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(encoded tokens [B, n, D], query outputs [B, Q, D])`."""
        tokens = self.encoder(tokens)
        q = self.queries.expand(tokens.shape[0], -1, -1)
        q = self.norm_q(q + self.self_attn(q, q, q, need_weights=False)[0])
        out = self.cross_attn(q, tokens, tokens, need_weights=False)[0]
        return tokens, self.norm_out(out)


class BoQ(Aggregator):
    """Bag-of-Queries aggregation; `out_dim` = `proj_channels * row_dim`."""

    # No cluster-assignment space to tie between the views.
    cluster_params: tuple[str, ...] = ()

    def __init__(
        self,
        in_dim: PositiveInt,
        proj_channels: PositiveInt = 512,
        num_queries: PositiveInt = 64,
        num_layers: PositiveInt = 2,
        row_dim: PositiveInt = 32,
        num_heads: PositiveInt | None = None,
    ) -> None:
        super().__init__()
        heads = num_heads or proj_channels // 64
        if heads < 1 or proj_channels % heads:
            raise ConfigError(
                f"BoQ: proj_channels = {proj_channels} must be divisible by num_heads = "
                f"{num_heads if num_heads else heads} (default proj_channels / 64); set num_heads."
            )
        self.in_dim = in_dim
        self.out_dim = proj_channels * row_dim
        self.proj_c = nn.Conv2d(in_dim, proj_channels, kernel_size=3, padding=1)
        self.norm_input = nn.LayerNorm(proj_channels)
        self.boqs = nn.ModuleList(
            [BoQBlock(proj_channels, num_queries, heads) for _ in range(num_layers)]
        )
        self.fc = nn.Linear(num_layers * num_queries, row_dim)

    def forward(self, features: Features) -> torch.Tensor:
        tokens = self.norm_input(self.proj_c(features.patches).flatten(2).transpose(1, 2))
        outs = []
        for block in self.boqs:
            tokens, out = block(tokens)
            outs.append(out)
        stacked = torch.cat(outs, dim=1)  # [B, L*Q, D]
        rows = self.fc(stacked.transpose(1, 2))  # [B, D, row_dim]
        return F.normalize(rows.flatten(1), p=2, dim=-1)
