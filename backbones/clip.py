"""CLIP image towers (vision transformers), built with open_clip.

Paper: "Learning Transferable Visual Models From Natural Language Supervision" (Radford
et al., ICML 2021); implementation and LAION/DataComp weights: OpenCLIP ("Reproducible
scaling laws for contrastive language-image learning", Cherti et al., CVPR 2023).

`CLIPVisual(images)` returns `Features(patches [B, C, H/p, W/p], cls [B, C])`: the tokens
after `ln_post` and BEFORE the output projection `proj` (C = the tower's width: 768 for
ViT-B, 1024 for ViT-L). The forward is written here from the tower's parts (conv1,
class_embedding, positional_embedding, ln_pre, transformer, ln_post) so that any input
whose sides are multiples of the patch size works, non-square panoramas included: the
position embeddings are interpolated bicubically to the input grid (as open_clip's own
`resize_pos_embed` does); at the training size they are used as they are.

Weights: `pretrained: true` loads open_clip's `pretrained_tag` (default "openai") from the
Hugging Face cache (see `benchmark.weights`), with QuickGELU when the tag was trained with
it; `weights: PATH` loads a local open_clip / OpenAI state dict (`visual.*` keys, or the
tower's own keys). With both set, `weights` wins and nothing is downloaded. The
projection `proj` is kept but never trains (the features do not use it). Small test
variants: set width / layers / heads / patch / image.

`trainable_blocks: N` trains the last N residual attention blocks and `ln_post`; the patch
embedding, class and position embeddings, `ln_pre` and earlier blocks are frozen and run
under `torch.no_grad()`. 0 freezes everything, null trains everything.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, VisionTransformer
from pydantic import PositiveInt
from torch import nn

from gengeo_bench.errors import ConfigError, WeightsError
from gengeo_bench.features import Backbone, Features
from gengeo_bench.weights import (
    check_input_size,
    check_trainable_blocks,
    find_cached,
    hf_cache_dir,
    is_offline,
    load_into,
    missing_weights_error,
    read_state,
    strip_prefix,
    train_only,
)


def resample_position_embedding(
    pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> torch.Tensor:
    """`[1 + gh*gw, C]` class + patch position embeddings, patches resized bicubically."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    channels = pos.shape[-1]
    grid = pos[1:].reshape(1, old_grid[0], old_grid[1], channels).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], channels)
    return torch.cat([pos[:1], grid.to(pos.dtype)], dim=0)


class CLIPVisual(Backbone):
    """The image tower of an open_clip ViT, returning pre-projection tokens."""

    def __init__(
        self,
        arch: str = "ViT-B-16",
        pretrained: bool = False,
        pretrained_tag: str = "openai",
        weights: str | None = None,
        trainable_blocks: int | None = None,
        width: PositiveInt | None = None,
        layers: PositiveInt | None = None,
        heads: PositiveInt | None = None,
        patch: PositiveInt | None = None,
        image: PositiveInt | None = None,
    ) -> None:
        super().__init__()
        self.arch = arch
        what = f"CLIP visual '{arch}'"
        model_cfg = open_clip.get_model_config(arch)
        if model_cfg is None:
            known = ", ".join(m for m in open_clip.list_models() if m.startswith("ViT"))
            raise ConfigError(f"{what}: unknown open_clip model. ViT models: {known}.")
        tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained_tag) if pretrained_tag else {}
        if pretrained and weights is None and not tag_cfg:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
            raise ConfigError(
                f"{what}: pretrained_tag '{pretrained_tag}' is not an open_clip tag of this "
                f"model. Known tags: {tags}."
            )
        quick_gelu = bool(tag_cfg.get("quick_gelu", False) or model_cfg.get("quick_gelu", False))
        overrides = {
            k: v
            for k, v in {
                "width": width,
                "layers": layers,
                "heads": heads,
                "patch_size": patch,
                "image_size": image,
            }.items()
            if v is not None
        }
        if pretrained and overrides and weights is None:
            raise ConfigError(
                f"{what}: pretrained: true cannot be combined with size overrides "
                f"{sorted(overrides)}; the released weights only fit the default size."
            )
        if pretrained and weights is None:
            visual = _pretrained_visual(arch, pretrained_tag, tag_cfg, quick_gelu, what)
        elif overrides:
            visual = _small_visual(model_cfg, overrides, quick_gelu)
        else:
            visual = open_clip.create_model(
                arch,
                pretrained=None,
                force_quick_gelu=quick_gelu,
                device=torch.get_default_device(),
            ).visual
        if not isinstance(visual, VisionTransformer):
            raise ConfigError(f"{what}: only open_clip ViT towers are supported ({type(visual)}).")
        if visual.attn_pool is not None or visual.final_ln_after_pool or visual.pool_type != "tok":
            raise ConfigError(
                f"{what}: towers with attention or average pooling are not supported."
            )
        self.visual = visual
        if weights is not None:
            self.load_weights(weights)

        self.out_dim: int = visual.conv1.out_channels
        self.patch_size: int = int(visual.patch_size[0])
        self.num_blocks: int = len(visual.transformer.resblocks)
        self.mean: tuple[float, ...] = tuple(tag_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std: tuple[float, ...] = tuple(tag_cfg.get("std", open_clip.OPENAI_DATASET_STD))
        self.trainable_blocks = check_trainable_blocks(trainable_blocks, self.num_blocks, what)
        n = self.trainable_blocks
        if n is None:
            visual.requires_grad_(True)
        else:
            blocks = visual.transformer.resblocks
            train_only(visual, [*blocks[self.num_blocks - n :], visual.ln_post] if n else [])
        visual.proj.requires_grad_(False)  # unused by the features
        self._what = what

    @property
    def blocks(self) -> list[nn.Module]:
        """The transformer's residual blocks."""
        return list(self.visual.transformer.resblocks)

    def _frozen_parts(self) -> list[nn.Module]:
        if self.trainable_blocks is None:
            return []
        visual = self.visual
        parts = [visual.conv1, visual.patch_dropout, visual.ln_pre]
        parts += list(visual.transformer.resblocks[: self.first_trainable_block])
        return parts + ([visual.ln_post] if self.trainable_blocks == 0 else [])


    def forward(self, images: torch.Tensor) -> Features:
        batch, _, height, width = images.shape
        check_input_size(height, width, self.patch_size, self._what)
        visual = self.visual
        grad = torch.is_grad_enabled()
        with torch.set_grad_enabled(grad and self.trainable_blocks is None):
            x = visual.conv1(images)  # [B, C, h, w]
            h, w = x.shape[2], x.shape[3]
            x = x.flatten(2).transpose(1, 2)  # [B, h*w, C]
            cls = visual.class_embedding.to(x.dtype).expand(batch, 1, -1)
            x = torch.cat([cls, x], dim=1)
            pos = resample_position_embedding(visual.positional_embedding, visual.grid_size, (h, w))
            x = visual.ln_pre(x + pos.to(x.dtype))
        batch_first = getattr(visual.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        first = self.first_trainable_block
        for index, block in enumerate(visual.transformer.resblocks):
            with torch.set_grad_enabled(grad and index >= first):
                x = block(x)
        if not batch_first:
            x = x.transpose(0, 1)
        with torch.set_grad_enabled(grad and self.trainable_blocks != 0):
            x = visual.ln_post(x)
        patches = x[:, 1:].reshape(batch, h, w, -1).permute(0, 3, 1, 2).contiguous()
        return Features(patches, x[:, 0])

    def load_weights(
        self, source: str | Path | Mapping[str, torch.Tensor], prefix: str = ""
    ) -> None:
        """Load a file or state dict with open_clip keys (`visual.*`) or the tower's own keys.

        Position embeddings of another grid size are resampled to this tower's grid.
        """
        name, state = read_state(source, prefix)
        if any(k.startswith("visual.") for k in state):
            state = strip_prefix(state, "visual.")
        if not state:
            raise WeightsError(f"{name}: no CLIP image-tower weights (keys 'visual.*') found.")
        pos = state.get("positional_embedding")
        own = self.visual.positional_embedding
        if pos is not None and pos.shape != own.shape and pos.shape[-1] == own.shape[-1]:
            side = int(round((pos.shape[0] - 1) ** 0.5))
            if side * side == pos.shape[0] - 1:
                state["positional_embedding"] = resample_position_embedding(
                    pos, (side, side), tuple(self.visual.grid_size)
                )
        load_into(self.visual, state, name)


def _small_visual(
    model_cfg: dict, overrides: dict[str, int], quick_gelu: bool
) -> VisionTransformer:
    """A randomly initialised tower of the arch's config with the given sizes changed."""
    cfg = {**model_cfg["vision_cfg"], **overrides}
    width = int(cfg["width"])
    heads = int(cfg.get("heads") or width // int(cfg.get("head_width", 64)))
    return VisionTransformer(
        image_size=cfg["image_size"],
        patch_size=cfg["patch_size"],
        width=width,
        layers=int(cfg["layers"]),
        heads=heads,
        mlp_ratio=float(cfg.get("mlp_ratio", 4.0)),
        ls_init_value=cfg.get("ls_init_value"),
        output_dim=int(model_cfg["embed_dim"]),
        act_layer=QuickGELU if quick_gelu else nn.GELU,
    )


def _pretrained_visual(
    arch: str, tag: str, tag_cfg: dict, quick_gelu: bool, what: str
) -> nn.Module:
    """open_clip's pretrained tower: the cached file, else open_clip's download."""
    # open_clip's 'hf_hub' is 'org/repo/' (default file names) or 'org/repo/file.ext'
    repo_id, filename = os.path.split(tag_cfg.get("hf_hub", ""))
    filenames = (
        [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    )
    url = tag_cfg.get("url") or None
    if url and "openaipublic" in url:  # a TorchScript archive: not loadable with weights_only
        url = None
    what = f"{what} (open_clip tag '{tag}')"
    kwargs = {"force_quick_gelu": quick_gelu, "device": torch.get_default_device()}
    cached = find_cached(repo_id or None, filenames)
    if cached is not None:
        return open_clip.create_model(arch, pretrained=str(cached), **kwargs).visual
    if is_offline():
        raise missing_weights_error(what, repo_id or None, filenames, url)
    try:
        model = open_clip.create_model(
            arch, pretrained=tag, cache_dir=str(hf_cache_dir()), **kwargs
        )
    except Exception as exc:  # hub errors, connection errors, truncated downloads
        raise missing_weights_error(what, repo_id or None, filenames, url, cause=exc) from exc
    return model.visual
