"""The two-view model: a ground branch and an aerial branch, each backbone + aggregator.

What the two branches share is the GenGeo ablation axis:

- `share_backbone`: one backbone for both views (as Sample4Geo does) or one per view;
- `share` (aggregator): `none` (one head per view), `clusters` (one cluster-assignment
  space for both views: the aggregator's `cluster_params`, e.g. SALAD's score projection
  and dustbin or NetVLAD's assignment and centroids, are the same modules in both heads,
  while the feature projections stay per view), or `all` (one head).

GenGeo (Remote Sensing 18(8) 1116, 2026) is DINOv2 + SALAD with `share: clusters` and
the dustbin on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from gengeo_bench import registry
from gengeo_bench.errors import ConfigError, WeightsError

Share = Literal["none", "clusters", "all"]
SHARE_MODES = ("none", "clusters", "all")
VIEWS = ("ground", "aerial")


def check_share(aggregator: str, share: str, where: str = "") -> None:
    """A sharing mode that means nothing for this aggregator is a config error."""
    prefix = f"{where}: " if where else ""
    if share not in SHARE_MODES:
        raise ConfigError(f"{prefix}share = {share!r}: expected one of {list(SHARE_MODES)}.")
    if share == "clusters":
        cluster_params = getattr(registry.get("aggregator", aggregator).load(), "cluster_params", ())
        if not cluster_params:
            raise ConfigError(
                f"{prefix}share = 'clusters' means nothing for aggregator '{aggregator}': it "
                f"has no cluster-assignment space to share. Use share: none or share: all."
            )


class CrossViewModel(nn.Module):
    """Ground and aerial branches built from registry names.

    `embed(images, view)` returns L2-normalised descriptors `[B, D]`;
    `forward(ground, aerial)` returns both.
    """

    def __init__(
        self,
        backbone: str,
        aggregator: str,
        backbone_params: dict[str, Any] | None = None,
        aggregator_params: dict[str, Any] | None = None,
        share_backbone: bool = True,
        share: Share = "none",
    ):
        super().__init__()
        check_share(aggregator, share)
        backbone_params = dict(backbone_params or {})
        aggregator_params = dict(aggregator_params or {})
        self.backbone_name, self.aggregator_name = backbone, aggregator
        self.share_backbone, self.share = share_backbone, share

        self.ground_backbone = registry.build("backbone", backbone, **backbone_params)
        if share_backbone:
            self.aerial_backbone = self.ground_backbone
        else:
            self.aerial_backbone = registry.build("backbone", backbone, **backbone_params)

        in_dim = self.ground_backbone.out_dim
        self.ground_head = registry.build("aggregator", aggregator, in_dim=in_dim, **aggregator_params)
        if share == "all":
            self.aerial_head = self.ground_head
        else:
            self.aerial_head = registry.build(
                "aggregator", aggregator, in_dim=in_dim, **aggregator_params
            )
        if share == "clusters":
            # The very same modules/parameters in both heads: one assignment space.
            for name in type(self.ground_head).cluster_params:
                setattr(self.aerial_head, name, getattr(self.ground_head, name))
        self.out_dim = self.ground_head.out_dim

    def branch(self, view: str) -> tuple[nn.Module, nn.Module]:
        if view == "ground":
            return self.ground_backbone, self.ground_head
        if view == "aerial":
            return self.aerial_backbone, self.aerial_head
        raise ConfigError(f"view = {view!r}: expected 'ground' or 'aerial'.")

    def embed(self, images: torch.Tensor, view: str) -> torch.Tensor:
        """L2-normalised descriptors `[B, D]` of one view's images."""
        backbone, head = self.branch(view)
        return head(backbone(images))

    def forward(self, ground: torch.Tensor, aerial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed(ground, "ground"), self.embed(aerial, "aerial")

    @property
    def backbone_is_frozen(self) -> bool:
        """True when no backbone parameter trains (its features can then be cached)."""
        return not any(
            p.requires_grad
            for bb in {id(self.ground_backbone): self.ground_backbone,
                       id(self.aerial_backbone): self.aerial_backbone}.values()
            for p in bb.parameters()
        )

    def head_parameters(self) -> list[nn.Parameter]:
        """Trainable aggregator parameters, each once (shared ones are not repeated)."""
        return _unique([*self.ground_head.parameters(), *self.aerial_head.parameters()])

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Trainable backbone parameters, each once."""
        return _unique([*self.ground_backbone.parameters(), *self.aerial_backbone.parameters()])


def _unique(params: list[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def import_dinov2_salad(
    path: str | Path, backbone_params: dict[str, Any] | None = None, **salad_params: Any
) -> CrossViewModel:
    """A `dinov2_vitb14` + `salad` model loaded from a published DINOv2-SALAD checkpoint.

    The checkpoint (Izquierdo & Civera, CVPR 2024 release) holds torch.hub DINOv2 keys
    under `backbone.model.*` and SALAD keys under `aggregator.*`, possibly inside a
    Lightning `state_dict`. One backbone and one head serve both views, as in the
    original single-branch place-recognition model.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"DINOv2-SALAD checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    backbone_state = {k: v for k, v in state.items() if k.startswith("backbone.model.")}
    head_state = {k[len("aggregator."):]: v for k, v in state.items() if k.startswith("aggregator.")}
    if not backbone_state or not head_state:
        raise WeightsError(
            f"{path}: expected keys under 'backbone.model.' and 'aggregator.' (a DINOv2-SALAD "
            f"checkpoint); found prefixes {sorted({k.split('.')[0] for k in state})}."
        )
    params = {"num_clusters": 64, "cluster_dim": 128, "token_dim": 256, "dropout": 0.3}
    params.update(salad_params)
    model = CrossViewModel(
        "dinov2_vitb14", "salad",
        backbone_params={"pretrained": False, **(backbone_params or {})},
        aggregator_params=params,
        share_backbone=True,
        share="all",
    )
    model.ground_backbone.load_weights(backbone_state, prefix="backbone.model.")
    model.ground_head.load_state_dict(head_state)
    return model
