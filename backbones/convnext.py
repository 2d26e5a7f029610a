"""ConvNeXt backbones, built with timm.

Paper: "A ConvNet for the 2020s" (Liu et al., CVPR 2022). ConvNeXt-B with the
ImageNet-22k -> 1k weights at 384 px (`convnext_base.fb_in22k_ft_in1k_384`) is the
backbone of Sample4Geo (Deuser, Habel, Oswald, "Sample4Geo: Hard Negative Sampling For
Cross-View Geo-Localisation", ICCV 2023), one network shared by both views.

`ConvNeXt(images)` returns `Features(patches [B, C, H/32, W/32], cls=None)`: timm's
`forward_features` (stem, four stages), no pooling. Input sides must be multiples of 32
(the total stride) so that the map covers the image exactly. The classifier head
(global pooling, LayerNorm, classifier) is not part of the backbone: Sample4Geo's
pooling and LayerNorm are the `avgpool` aggregator, and `model.import_sample4geo` puts a
released checkpoint's head LayerNorm there; a weight file's `head.*` keys are ignored
here.

Weights: `pretrained: true` loads timm's weights for `arch` (a tag such as
`convnext_base.fb_in22k_ft_in1k_384` selects a release) from the Hugging Face cache
(see `benchmark.weights`); `weights: PATH` loads a local file with timm keys (or this
module's, `model.`). Small test variants: set `depths` (blocks per stage) and `dims`
(width per stage).

`trainable_blocks: N` trains the last N of the 4 stages; the stem and earlier stages are
frozen and run under `torch.no_grad()`. 0 freezes everything, null trains everything.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from pydantic import PositiveInt
from timm.models.convnext import ConvNeXt as TimmConvNeXt
from torch import nn

from gengeo_bench.errors import ConfigError, WeightsError
from gengeo_bench.features import Backbone, Features
from gengeo_bench.weights import (
    check_input_size,
    check_trainable_blocks,
    create_timm_model,
    load_into,
    read_state,
    strip_prefix,
    train_only,
)

NUM_STAGES = 4


class ConvNeXt(Backbone):
    """A timm ConvNeXt returning its last feature map (no class token)."""

    def __init__(
        self,
        arch: str = "convnext_base",
        pretrained: bool = False,
        weights: str | None = None,
        trainable_blocks: int | None = None,
        depths: list[PositiveInt] | None = None,
        dims: list[PositiveInt] | None = None,
    ) -> None:
        super().__init__()
        self.arch = arch
        what = f"ConvNeXt '{arch}'"
        overrides: dict[str, object] = {}
        for key, value in (("depths", depths), ("dims", dims)):
            if value is None:
                continue
            if len(value) != NUM_STAGES:
                raise ConfigError(
                    f"{what}: {key} = {value}: expected {NUM_STAGES} positive integers "
                    f"(one per stage)."
                )
            overrides[key] = tuple(int(v) for v in value)
        if pretrained and overrides and weights is None:
            raise ConfigError(
                f"{what}: pretrained: true cannot be combined with depths / dims; "
                f"the released weights only fit the default size."
            )
        if not timm.is_model(arch):
            known = ", ".join(timm.list_models("convnext*"))
            raise ConfigError(f"{what}: unknown timm model. ConvNeXts in timm: {known}.")
        model = create_timm_model(arch, pretrained, weights, TimmConvNeXt, what,
                                  num_classes=0, **overrides)
        # The head's pooling and LayerNorm live in the aggregator (see the module docstring);
        # dropping them here keeps every backbone parameter on the features' path.
        model.head = nn.Identity()
        self.model = model
        if weights is not None:
            self.load_weights(weights)

        self.out_dim: int = model.num_features
        self.patch_size: int = 32
        self.num_blocks: int = NUM_STAGES
        self.mean: tuple[float, ...] = tuple(model.pretrained_cfg["mean"])
        self.std: tuple[float, ...] = tuple(model.pretrained_cfg["std"])
        self.trainable_blocks = check_trainable_blocks(trainable_blocks, NUM_STAGES, what)
        if self.trainable_blocks is not None:
            n = self.trainable_blocks
            train_only(model, self.blocks[NUM_STAGES - n :])
        self._what = what

    @property
    def blocks(self) -> list[nn.Module]:
        """The four stages (each starts with its downsampling, except the first)."""
        return list(self.model.stages)

    def _frozen_parts(self) -> list[nn.Module]:
        if self.trainable_blocks is None:
            return []
        return [self.model.stem, *self.blocks[: self.first_trainable_block]]

    def forward(self, images: torch.Tensor) -> Features:
        check_input_size(images.shape[2], images.shape[3], self.patch_size, self._what)
        grad = torch.is_grad_enabled()
        with torch.set_grad_enabled(grad and self.trainable_blocks is None):
            x = self.model.stem(images)
        first = self.first_trainable_block
        for index, stage in enumerate(self.blocks):
            with torch.set_grad_enabled(grad and index >= first):
                x = stage(x)
        # timm's norm_pre (Identity unless head_norm_first) closes forward_features.
        with torch.set_grad_enabled(grad and self.trainable_blocks != 0):
            x = self.model.norm_pre(x)
        return Features(x, None)

    def load_weights(
        self, source: str | Path | Mapping[str, torch.Tensor], prefix: str = ""
    ) -> None:
        """Load a file or state dict with timm keys or this module's keys (`model.`)."""
        name, state = read_state(source, prefix)
        if not state:
            raise WeightsError(f"{name}: no weights under the key prefix '{prefix}'.")
        if all(k.startswith("model.") for k in state):
            state = strip_prefix(state, "model.")
        load_into(self.model, state, name, ignore_prefixes=("head.",))
