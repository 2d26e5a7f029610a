"""ResNet backbones, built with timm.

Paper: "Deep Residual Learning for Image Recognition" (He et al., CVPR 2016); the timm
ImageNet weights: "ResNet strikes back: An improved training procedure in timm"
(Wightman et al., NeurIPS 2021 workshop).

`ResNet(images)` returns `Features(patches [B, C, H/32, W/32], cls=None)`: the map of the
last stage (timm's `forward_features`: stem, layer1..layer4, no pooling). Input sides must
be multiples of 32 (the total stride) so that the map covers the image exactly. Weights,
inputs and the map are channels-last in memory (a layout, not a shape).

Weights: `pretrained: true` loads timm's default weights for `arch` from the Hugging Face
cache (see `benchmark.weights`); `weights: PATH` loads a local timm / torchvision-layout
state dict (the classifier `fc.*` is ignored). With both set, `weights` wins and nothing
is downloaded. Small test variants: set `layers` (blocks per stage) and `channels` (width
per stage); the stem stays timm's 64-wide 7x7 convolution. `zero_init_last` is timm's
initialisation of each block's last BatchNorm scale to zero (the block starts as the
identity): it helps deep ImageNet training, but in a random-initialised network with one
block per stage it leaves the 3x3 convolutions without gradient at first, and such a
network learns several times slower; the small registry variants turn it off.

`trainable_blocks: N` trains the last N of the 4 stages; the stem and earlier stages are
frozen, run under `torch.no_grad()` and keep their BatchNorm statistics (eval mode) while
training. 0 freezes everything, null trains everything.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import timm
import torch
from pydantic import PositiveInt
from timm.models.resnet import ResNet as TimmResNet
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


class ResNet(Backbone):
    """A timm ResNet returning its last feature map (no class token)."""

    def __init__(
        self,
        arch: str = "resnet50",
        pretrained: bool = False,
        weights: str | None = None,
        trainable_blocks: int | None = None,
        layers: list[PositiveInt] | None = None,
        channels: list[PositiveInt] | None = None,
        output_stride: Literal[8, 16, 32] = 32,
        zero_init_last: bool = True,
    ) -> None:
        super().__init__()
        self.arch = arch
        what = f"ResNet '{arch}'"
        overrides: dict[str, object] = {}
        for key, value in (("layers", layers), ("channels", channels)):
            if value is None:
                continue
            if len(value) != NUM_STAGES or min(value) < 1:
                raise ConfigError(
                    f"{what}: {key} = {value}: expected {NUM_STAGES} positive integers "
                    f"(one per stage)."
                )
            overrides[key] = tuple(int(v) for v in value)
        if pretrained and overrides and weights is None:
            raise ConfigError(
                f"{what}: pretrained: true cannot be combined with layers / channels; "
                f"the released weights only fit the default size."
            )
        if not timm.is_model(arch):
            known = ", ".join(timm.list_models("resnet*"))
            raise ConfigError(f"{what}: unknown timm model. ResNets in timm: {known}.")
        if output_stride not in (8, 16, 32):
            raise ConfigError(f"{what}: output_stride = {output_stride}: expected 8, 16 or 32.")
        # A smaller output stride dilates the last stages instead of striding them: a finer
        # patch map (more local features for the aggregators) from the same weights.
        kwargs = {"num_classes": 0, "output_stride": output_stride, "zero_init_last": zero_init_last,
                  **overrides}
        model = create_timm_model(arch, pretrained, weights, TimmResNet, what, **kwargs)
        self.model = model
        if weights is not None:
            self.load_weights(weights)
        # Channels-last (NHWC) weights and inputs: faster convolutions and pooling on CPU
        # and GPU alike (perf/bench_resnet_step.py), and a patch map whose token-major view
        # is free for the aggregators that work on tokens (SALAD).
        model.to(memory_format=torch.channels_last)

        self.out_dim: int = model.num_features
        self.patch_size: int = output_stride
        self.num_blocks: int = NUM_STAGES
        self.mean: tuple[float, ...] = tuple(model.pretrained_cfg["mean"])
        self.std: tuple[float, ...] = tuple(model.pretrained_cfg["std"])
        self.trainable_blocks = check_trainable_blocks(trainable_blocks, NUM_STAGES, what)
        if self.trainable_blocks is not None:
            n = self.trainable_blocks
            train_only(model, self.stages[NUM_STAGES - n :])
        self._what = what

    @property
    def stages(self) -> list[nn.Module]:
        """layer1 .. layer4."""
        return [self.model.layer1, self.model.layer2, self.model.layer3, self.model.layer4]

    @property
    def stem(self) -> list[nn.Module]:
        """The modules before layer1."""
        return [self.model.conv1, self.model.bn1, self.model.act1, self.model.maxpool]

    @property
    def blocks(self) -> list[nn.Module]:
        """The four stages (what `trainable_blocks` counts)."""
        return self.stages

    def _frozen_parts(self) -> list[nn.Module]:
        if self.trainable_blocks is None:
            return []
        return self.stem + self.stages[: self.first_trainable_block]

    def forward(self, images: torch.Tensor) -> Features:
        check_input_size(images.shape[2], images.shape[3], self.patch_size, self._what)
        grad = torch.is_grad_enabled()
        x = images.contiguous(memory_format=torch.channels_last)
        with torch.set_grad_enabled(grad and self.trainable_blocks is None):
            for part in self.stem:
                x = part(x)
        first = self.first_trainable_block
        for index, stage in enumerate(self.stages):
            with torch.set_grad_enabled(grad and index >= first):
                x = stage(x)
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
        load_into(self.model, state, name, ignore_prefixes=("fc.",))
