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

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from gengeo_bench import registry
from gengeo_bench.errors import ConfigError, WeightsError
from gengeo_bench.features import Features, check_aggregator

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
    `forward(ground, aerial)` returns both. The model normalises whatever a head returns
    (see `features.Aggregator`), so every path (images, cached features) gives unit
    vectors.

    `image_size` is the `(height, width)` of each view's preprocessed input (default: the
    backbone's registry `image_size`). With the backbone's `patch_size` it gives each
    view's patch grid, which heads that declare `patch_grid` receive.
    """

    def __init__(
        self,
        backbone: str,
        aggregator: str,
        backbone_params: dict[str, Any] | None = None,
        aggregator_params: dict[str, Any] | None = None,
        share_backbone: bool = True,
        share: Share = "none",
        image_size: Mapping[str, Sequence[int]] | None = None,
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

        if image_size is None:
            image_size = registry.meta("backbone", backbone).get("image_size") or {}
        patch = int(self.ground_backbone.patch_size)
        self.patch_grid: dict[str, tuple[int, int]] = {
            view: (int(image_size[view][0]) // patch, int(image_size[view][1]) // patch)
            for view in VIEWS if view in image_size
        }

        in_dim = self.ground_backbone.out_dim
        self.ground_head = self._build_head(in_dim, ("ground",) if share != "all" else VIEWS,
                                            aggregator_params)
        if share == "all":
            self.aerial_head = self.ground_head
        else:
            self.aerial_head = self._build_head(in_dim, ("aerial",), aggregator_params)
        if share == "clusters":
            # The very same modules/parameters in both heads: one assignment space.
            for name in self.ground_head.cluster_params:
                setattr(self.aerial_head, name, getattr(self.ground_head, name))
        self.out_dim = self.ground_head.out_dim

    def _build_head(self, in_dim: int, views: tuple[str, ...], params: dict[str, Any]) -> nn.Module:
        """One head serving `views`; the patch grid goes only to heads that declare it."""
        name = self.aggregator_name
        injected: dict[str, Any] = {"in_dim": in_dim}
        if "patch_grid" in registry.parameter_names("aggregator", name):
            missing = [v for v in views if v not in self.patch_grid]
            if missing:
                raise ConfigError(
                    f"aggregator '{name}' needs the patch grid of the {' and '.join(missing)} "
                    f"view, but backbone '{self.backbone_name}' declares no image_size for it: "
                    f"set train.image_size."
                )
            grids = {self.patch_grid[v] for v in views}
            if len(grids) > 1:
                shown = ", ".join(f"{v} {self.patch_grid[v][0]}x{self.patch_grid[v][1]}" for v in views)
                raise ConfigError(
                    f"aggregator '{name}' is built for one patch grid (it declares patch_grid), "
                    f"but with share: all one head serves both views, whose grids differ "
                    f"({shown} patches). Use share: none (one head per view), or give both "
                    f"views the same image size (train.image_size)."
                )
            injected["patch_grid"] = grids.pop()
        head = registry.build("aggregator", name, **injected, **params)
        check_aggregator(head, name)
        need = int(getattr(head, "min_patches", 1))
        for view in views:
            h, w = self.patch_grid.get(view, (need, 1))
            if h * w < need:
                raise ConfigError(
                    f"aggregator '{name}' needs at least {need} patches per image, but the {view} "
                    f"view gives {h}x{w} = {h * w} (image size {h * self.ground_backbone.patch_size}x"
                    f"{w * self.ground_backbone.patch_size}, patch {self.ground_backbone.patch_size}): "
                    f"use a larger train.image_size or a head that needs fewer (e.g. fewer clusters)."
                )
        return head

    def branch(self, view: str) -> tuple[nn.Module, nn.Module]:
        if view == "ground":
            return self.ground_backbone, self.ground_head
        if view == "aerial":
            return self.aerial_backbone, self.aerial_head
        raise ConfigError(f"view = {view!r}: expected 'ground' or 'aerial'.")

    def aggregate(self, features: Features, view: str) -> torch.Tensor:
        """L2-normalised descriptors `[B, D]` of one view's backbone features."""
        _, head = self.branch(view)
        return F.normalize(head(features), p=2, dim=-1)

    def embed(self, images: torch.Tensor, view: str) -> torch.Tensor:
        """L2-normalised descriptors `[B, D]` of one view's images."""
        backbone, _ = self.branch(view)
        return self.aggregate(backbone(images), view)

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


def import_sample4geo(
    path: str | Path,
    backbone: str = "convnext_base",
    backbone_params: dict[str, Any] | None = None,
    image_size: Mapping[str, Sequence[int]] | None = None,
) -> CrossViewModel:
    """A `convnext_base` + `avgpool` model loaded from a released Sample4Geo checkpoint.

    Sample4Geo (Deuser, Habel, Oswald, ICCV 2023) trains one timm network for both views,
    saved as `model.*` (timm ConvNeXt keys) beside the loss's `logit_scale`. The network
    is created with `num_classes=0`, so its output is the ConvNeXt's head without a
    classifier: global average pooling, then the head's LayerNorm; its evaluation
    L2-normalises that. Here the ConvNeXt is `backbone` (one for both views), and the
    `avgpool` aggregator holds the head's LayerNorm (`model.head.norm.*`), one head for
    both views; the model's normalisation is Sample4Geo's. `logit_scale` is not needed
    for retrieval and is left out. A `module.` prefix (a checkpoint saved from
    `DataParallel`) is removed. `backbone` may name a smaller ConvNeXt entry for tests.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Sample4Geo checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    network = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    head_state = {"norm." + k[len("head.norm."):]: v for k, v in network.items()
                  if k.startswith("head.norm.")}
    if not network or not head_state:
        raise WeightsError(
            f"{path}: expected a timm ConvNeXt under 'model.' with its head's LayerNorm "
            f"('model.head.norm.weight'), as Sample4Geo saves it; found prefixes "
            f"{sorted({k.split('.')[0] for k in state})}."
        )
    model = CrossViewModel(
        backbone, "avgpool",
        backbone_params={"pretrained": False, **(backbone_params or {})},
        share_backbone=True, share="all", image_size=image_size,
    )
    model.ground_backbone.load_weights({k: v for k, v in network.items() if not k.startswith("head.")})
    model.ground_head.load_state_dict(head_state)
    return model
