"""The contracts between the harness, backbones and aggregators.

Backbone
--------
A backbone turns images `[B, 3, H, W]` into `Features`: the patch map `[B, C, h, w]`
(prefix and register tokens removed) and the class token `[B, C]` (`None` for CNNs).
Every backbone module also declares:

- `out_dim`: C, the channel count of `patches` (and of `cls`);
- `patch_size`: input sides must be multiples of it (ViT patch, CNN total stride), and
  the patch grid of an `H x W` input is `(H // patch_size, W // patch_size)`;
- `mean`, `std`: the per-channel normalisation its weights expect;
- `trainable_blocks`: how many of its last `blocks` train (the rest run under no_grad).

Aggregator
----------
An aggregator (a "head") turns `Features` into one descriptor per image: `forward(features)
-> [B, out_dim]`. `Aggregator` below spells out both sides of that contract; subclassing
it is a convenience, the harness checks the attributes (`check_aggregator`), not the class.
See docs/plugins.md for a worked example.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from gengeo_bench.errors import ConfigError


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
    list their blocks in order in `blocks` (what `trainable_blocks` counts), and list in
    `_frozen_parts()` the modules before the first trainable block.
    """

    trainable_blocks: int | None = None
    num_blocks: int = 0

    @property
    def blocks(self) -> list[torch.nn.Module]:
        """The blocks `trainable_blocks` counts, first to last."""
        return []

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


class Aggregator(nn.Module):
    """What an aggregator receives, what it declares, and what the model does with it.

    Receives (keyword arguments of the constructor, supplied by the harness; a YAML file
    may not set them, see `registry.INJECTED`):

    - `in_dim`: the backbone's `out_dim`, the channel count of `features.patches`;
    - `patch_grid`: `(h, w)`, the patch grid of the view(s) this head serves, from the
      preprocessed image size of each view and the backbone's `patch_size`. Only heads
      whose signature has a `patch_grid` parameter receive it, and declaring it means
      "built for this grid only" (MixVPR's token-mixing MLPs are sized `h * w`): such a
      head cannot serve two views of different grids (`share: all`) nor the narrower
      panoramas of a limited field-of-view protocol, and the harness says so when the
      config is read. Heads that take any grid leave it out of their signature.

    Every other constructor parameter is the plugin's own, with its default and value
    range in the signature (`PositiveInt`, `Annotated[float, Field(ge=0, lt=1)]`,
    `Literal[...]`): the registry checks config values against them.

    Declares:

    - `out_dim`: the descriptor length, set in `__init__`;
    - `min_patches` (optional, default 1): the fewest patches per image it works on
      (SALAD with a dustbin: its cluster count); checked against each view's patch grid
      when the config is read;
    - `cluster_params`: names of the attributes (modules or parameters) that make up
      its cluster-assignment space; `share: clusters` makes the aerial head's attributes
      the ground head's objects. `()` (the default) means no such space, and
      `share: clusters` is a config error for it. An instance may narrow the tuple
      (SALAD without a dustbin has no `dust_bin` to tie).

    Optional methods (see `Initialisable` and `HasAssignments` below):

    - `initialise(local)`: data-dependent initialisation from local features `[N, in_dim]`
      of training images (NetVLAD's k-means), called once before training starts;
    - `assignments(features)`: `[B, n_patches, num_clusters]` (one more column for a
      dustbin, last): how each patch's unit mass is spread over the clusters, so every
      row sums to 1. For inspection tools (assignment maps, dustbin measurements).

    Guaranteed by the model: `CrossViewModel` L2-normalises every descriptor a head
    returns (`embed`, `aggregate`), so a head need not; it may normalise itself too, when
    its reference definition does (SALAD, NetVLAD, MixVPR, BoQ).
    """

    in_dim: int
    out_dim: int
    min_patches: int = 1
    cluster_params: tuple[str, ...] = ()


@runtime_checkable
class Initialisable(Protocol):
    """A head with a data-dependent initialisation (NetVLAD's k-means)."""

    def initialise(self, local: torch.Tensor) -> None:
        """Initialise from local features `[N, in_dim]` of training images."""


@runtime_checkable
class HasAssignments(Protocol):
    """A head that can say how it assigns patches to its clusters."""

    def assignments(self, features: Features) -> torch.Tensor:
        """`[B, h*w, num_clusters (+1 dustbin, last)]`, each row summing to 1."""


def check_aggregator(head: nn.Module, name: str) -> None:
    """A `ConfigError` when a built head does not declare what the harness relies on."""
    where = f"aggregator '{name}' ({type(head).__module__}.{type(head).__qualname__})"
    out_dim = getattr(head, "out_dim", None)
    if isinstance(out_dim, bool) or not isinstance(out_dim, int) or out_dim < 1:
        raise ConfigError(
            f"{where}: out_dim = {out_dim!r}; a head must set `self.out_dim` (a positive int, "
            f"the descriptor length) in __init__. See docs/plugins.md."
        )
    names = getattr(head, "cluster_params", ())
    if not isinstance(names, tuple) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{where}: cluster_params = {names!r}; expected a tuple of attribute names.")
    for attr in names:
        if not isinstance(getattr(head, attr, None), (nn.Module, nn.Parameter)):
            raise ConfigError(
                f"{where}: cluster_params names '{attr}', which is not a module or parameter "
                f"of the head; list only what `share: clusters` should tie."
            )
