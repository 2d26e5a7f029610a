"""DINOv2 vision transformers, built with timm.

Papers: "DINOv2: Learning Robust Visual Features without Supervision" (Oquab et al.,
TMLR 2024); the `_reg4` variants: "Vision Transformers Need Registers" (Darcet et al.,
ICLR 2024).

`DINOv2(images)` returns `Features(patches [B, C, H/14, W/14], cls [B, C])`: the tokens
after the final norm, with the class and register tokens removed from the patch map. Any
input whose sides are multiples of 14 works, panoramas included: timm's
`dynamic_img_size` interpolates the position embeddings to the input grid.

Weights: `pretrained: true` loads timm's copy of the release from the Hugging Face cache
(see `benchmark.weights`); `weights: PATH` loads a local file in timm format or in the
original DINOv2 / torch.hub format (`mask_token`, `register_tokens`, `blocks.N...`), which
`import_hub_state_dict` converts. The same function imports the backbone of published
DINOv2-SALAD checkpoints (`import_hub_state_dict(ckpt, prefix="backbone.model.")`, or
`DINOv2.load_weights(ckpt, prefix="backbone.model.")`, which also resamples the position
embeddings to the model's grid). With both set, `weights` wins and nothing is downloaded.

Note: timm resamples position embeddings with antialiased bicubic interpolation to the
exact grid; the torch.hub release uses bicubic without antialiasing and a 0.1 scale offset,
so at sizes other than 518 the features differ slightly from torch.hub's.

`trainable_blocks: N` trains the last N transformer blocks and the final norm; the patch
embedding, position embedding, class/register tokens and earlier blocks are frozen and run
under `torch.no_grad()`. 0 freezes everything, null trains everything.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from pydantic import NonNegativeInt, PositiveInt
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
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


def import_hub_state_dict(
    state_dict: Mapping[str, torch.Tensor], prefix: str = ""
) -> dict[str, torch.Tensor]:
    """DINOv2 weights in torch.hub / original-release keys -> timm `VisionTransformer` keys.

    Keeps the entries under `prefix` (e.g. "backbone.model." for DINOv2-SALAD checkpoints)
    and removes it; drops `mask_token`; un-nests chunked blocks (`blocks.0.5.` ->
    `blocks.5.`); renames the SwiGLU MLP of ViT-g (`w12`/`w3` -> `fc1`/`fc2`); moves
    `register_tokens` to `reg_token` and folds the class token's position embedding into
    `cls_token` (timm's register models give position embeddings to patches only).
    Keys already in timm format pass through unchanged.
    """
    state = strip_prefix(state_dict, prefix)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)
        key = re.sub(r"^(blocks\.\d+\.mlp\.)w12\.", r"\1fc1.", key)
        key = re.sub(r"^(blocks\.\d+\.mlp\.)w3\.", r"\1fc2.", key)
        out[key] = value
    out.pop("mask_token", None)
    if "register_tokens" in out:
        pos = out["pos_embed"]
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out


class DINOv2(Backbone):
    """A DINOv2 ViT (timm) returning the patch map and the class token."""

    def __init__(
        self,
        arch: str = "vit_base_patch14_dinov2",
        pretrained: bool = False,
        weights: str | None = None,
        trainable_blocks: int | None = None,
        embed_dim: PositiveInt | None = None,
        depth: PositiveInt | None = None,
        num_heads: PositiveInt | None = None,
        num_reg_tokens: NonNegativeInt | None = None,
    ) -> None:
        super().__init__()
        self.arch = arch
        what = f"DINOv2 '{arch}'"
        overrides: dict[str, object] = {
            k: v
            for k, v in {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads}.items()
            if v is not None
        }
        if num_reg_tokens is not None:
            overrides["reg_tokens"] = num_reg_tokens
            if num_reg_tokens > 0:  # DINOv2-reg layout: registers get no position embedding
                overrides["no_embed_class"] = True
        if pretrained and overrides and weights is None:
            raise ConfigError(
                f"{what}: pretrained: true cannot be combined with size overrides "
                f"{sorted(overrides)}; the released weights only fit the default size."
            )
        if not timm.is_model(arch):
            known = ", ".join(timm.list_models("*dinov2*"))
            raise ConfigError(f"{what}: unknown timm model. DINOv2 models in timm: {known}.")
        kwargs = {"dynamic_img_size": True, "num_classes": 0, **overrides}
        model = create_timm_model(arch, pretrained, weights, VisionTransformer, what, **kwargs)
        self.model = model
        if weights is not None:
            self.load_weights(weights)

        self.out_dim: int = model.embed_dim
        self.patch_size: int = model.patch_embed.patch_size[0]
        self.num_blocks: int = len(model.blocks)
        self.num_prefix_tokens: int = model.num_prefix_tokens
        self.mean: tuple[float, ...] = tuple(model.pretrained_cfg["mean"])
        self.std: tuple[float, ...] = tuple(model.pretrained_cfg["std"])
        self.trainable_blocks = check_trainable_blocks(trainable_blocks, self.num_blocks, what)
        if self.trainable_blocks is not None:
            n = self.trainable_blocks
            train_only(model, [*model.blocks[self.num_blocks - n :], model.norm] if n else [])
        self._what = what

    @property
    def blocks(self) -> list[nn.Module]:
        """The transformer blocks."""
        return list(self.model.blocks)

    def _frozen_parts(self) -> list[nn.Module]:
        if self.trainable_blocks is None:
            return []
        vit = self.model
        parts = [vit.patch_embed, vit.pos_drop, vit.patch_drop, vit.norm_pre]
        parts += list(vit.blocks[: self.first_trainable_block])
        return parts + ([vit.norm] if self.trainable_blocks == 0 else [])


    def forward(self, images: torch.Tensor) -> Features:
        batch, _, height, width = images.shape
        check_input_size(height, width, self.patch_size, self._what)
        vit = self.model
        grad = torch.is_grad_enabled()
        with torch.set_grad_enabled(grad and self.trainable_blocks is None):
            x = vit.patch_embed(images)  # [B, h, w, C] (dynamic_img_size: NHWC)
            h, w = x.shape[1], x.shape[2]
            x = vit._pos_embed(x)  # prefix tokens + position embeddings resampled to h x w
            x = vit.patch_drop(x)
            x = vit.norm_pre(x)
        first = self.first_trainable_block
        for index, block in enumerate(vit.blocks):
            with torch.set_grad_enabled(grad and index >= first):
                x = block(x)
        with torch.set_grad_enabled(grad and self.trainable_blocks != 0):
            x = vit.norm(x)
        patches = x[:, self.num_prefix_tokens :].reshape(batch, h, w, -1)
        return Features(patches.permute(0, 3, 1, 2).contiguous(), x[:, 0])

    def load_weights(
        self, source: str | Path | Mapping[str, torch.Tensor], prefix: str = ""
    ) -> None:
        """Load a file or state dict: timm keys, this module's keys (`model.`), or hub keys.

        `prefix` selects a sub-dict first (e.g. "backbone.model." for DINOv2-SALAD).
        Position embeddings of another grid size are resampled to this model's.
        """
        name, state = read_state(source, prefix)
        if not state:
            raise WeightsError(f"{name}: no weights under the key prefix '{prefix}'.")
        if all(k.startswith("model.") for k in state):
            state = strip_prefix(state, "model.")
        state = checkpoint_filter_fn(import_hub_state_dict(state), self.model)
        load_into(self.model, state, name, ignore_prefixes=("head.", "fc_norm."))
