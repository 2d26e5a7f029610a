"""The contract between backbones and aggregators.

A backbone turns images `[B, 3, H, W]` into `Features`: the patch map `[B, C, h, w]`
(prefix and register tokens removed) and the class token `[B, C]` (`None` for CNNs).
Every backbone module also declares:

- `out_dim`: C, the channel count of `patches` (and of `cls`);
- `patch_size`: input sides must be multiples of it (ViT patch, CNN total stride);
- `mean`, `std`: the per-channel normalisation its weights expect;
- `trainable_blocks`: how many of its last blocks train (the rest run under no_grad).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Features:
    """Backbone output: `patches` `[B, C, h, w]` and `cls` `[B, C]` or `None`."""

    patches: torch.Tensor
    cls: torch.Tensor | None = None

    @property
    def global_token(self) -> torch.Tensor:
        """The class token, or the mean of the patch map for backbones without one."""
        if self.cls is not None:
            return self.cls
        return self.patches.mean(dim=(2, 3))

    def to(self, *args, **kwargs) -> Features:
        cls = None if self.cls is None else self.cls.to(*args, **kwargs)
        return Features(self.patches.to(*args, **kwargs), cls)


class Backbone(torch.nn.Module):
    """Behaviour every backbone family shares around `trainable_blocks`.

    Subclasses set `trainable_blocks` (None = all train, 0 = frozen) and `num_blocks`,
    and list in `_frozen_parts()` the modules before the first trainable block.
    """

    trainable_blocks: int | None = None
    num_blocks: int = 0

    @property
    def is_frozen(self) -> bool:
        """True when nothing trains (the engine may cache this backbone's features)."""
        return self.trainable_blocks == 0

    @property
    def first_trainable_block(self) -> int:
        """Index of the first block that trains (`num_blocks` when frozen)."""
        if self.trainable_blocks is None:
            return 0
        return self.num_blocks - self.trainable_blocks

    def _frozen_parts(self) -> list[torch.nn.Module]:
        return []

    def train(self, mode: bool = True) -> Backbone:
        """Frozen parts stay in eval mode (no dropout, no BatchNorm statistics) while training."""
        super().train(mode)
        if mode:
            for part in self._frozen_parts():
                part.eval()
        return self
