"""Tests generated from the registry: every backbone and every aggregator, whatever they are.

Each entry is built through its real constructor at the small size its registry entry
names in `meta.test_params` (pretrained weights switched off), so the full-size entries
are exercised on the same code path as the tiny ones. Nothing here names a plugin: a new
one (a file and a registry.yaml entry, or an entry point) gets these tests by existing,
and tests/test_plugin_extension.py checks exactly that. Family- and paper-specific values
are checked in test_backbones.py and test_aggregators.py.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch

from gengeo_bench import registry
from gengeo_bench.errors import ConfigError
from gengeo_bench.features import Features, HasAssignments, Initialisable, check_aggregator
from gengeo_bench.model import SHARE_MODES, CrossViewModel

BACKBONES = registry.names("backbone")
AGGREGATORS = registry.names("aggregator")
# Patch grids of the test inputs: small, and different for the two views (as in real use).
GRID = {"ground": (3, 6), "aerial": (3, 3)}
IN_DIM = 16  # channels of the synthetic features the aggregator tests feed
# The backbone the sharing tests put under every aggregator: tiny, with a class token.
SHARING_BACKBONE = "dinov2_tiny"


def backbone_params(name: str, **extra) -> dict:
    """The entry's test configuration: `meta.test_params`, pretrained off, then `extra`."""
    params = dict(registry.meta("backbone", name).get("test_params") or {})
    accepted = registry.parameter_names("backbone", name)
    params.update({k: v for k, v in (("pretrained", False), ("weights", None)) if k in accepted})
    params.update(extra)
    return params


def aggregator_params(name: str) -> dict:
    return dict(registry.meta("aggregator", name).get("test_params") or {})


def declares_grid(name: str) -> bool:
    return "patch_grid" in registry.parameter_names("aggregator", name)


def build_backbone(name: str, seed: int = 0, **extra):
    torch.manual_seed(seed)
    return registry.build("backbone", name, **backbone_params(name, **extra))


@cache
def patch_size(name: str) -> int:
    with torch.device("meta"):
        return int(build_backbone(name).patch_size)


def image_size(backbone: str, grids: dict | None = None) -> dict[str, tuple[int, int]]:
    p = patch_size(backbone)
    return {view: (h * p, w * p) for view, (h, w) in (grids or GRID).items()}


def images(size: tuple[int, int], batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def build_head(name: str, grid: tuple[int, int] = GRID["ground"], seed: int = 0, **extra):
    torch.manual_seed(seed)
    injected = {"in_dim": IN_DIM, **({"patch_grid": grid} if declares_grid(name) else {})}
    return registry.build("aggregator", name, **injected, **aggregator_params(name), **extra)


def features(grid: tuple[int, int] = GRID["ground"], cls: bool = True, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    patches = torch.randn(batch, IN_DIM, *grid, generator=g)
    return Features(patches, torch.randn(batch, IN_DIM, generator=g) if cls else None)


def build_model(backbone: str, aggregator: str, seed: int = 0, grids: dict | None = None,
                **kwargs) -> CrossViewModel:
    torch.manual_seed(seed)
    return CrossViewModel(backbone, aggregator, backbone_params=backbone_params(backbone),
                          aggregator_params=aggregator_params(aggregator),
                          image_size=image_size(backbone, grids), **kwargs)


def model_inputs(backbone: str, grids: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    size = image_size(backbone, grids)
    return images(size["ground"], seed=1), images(size["aerial"], seed=2)


# ================================================================== backbones


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_entry_as_registered_matches_its_preprocessing_contract(name):
    """The entry itself (full size, on the meta device): what its meta record promises."""
    info = registry.meta("backbone", name)
    accepted = registry.parameter_names("backbone", name)
    offline = {k: v for k, v in (("pretrained", False), ("weights", None)) if k in accepted}
    with torch.device("meta"):
        model = registry.build("backbone", name, **offline)
    assert info.get("paper") and info.get("weights_licence") and info.get("family")
    assert isinstance(model.out_dim, int) and model.out_dim > 0
    assert model.patch_size == info["patch_size"]
    assert model.mean == pytest.approx(tuple(info["mean"]))
    assert model.std == pytest.approx(tuple(info["std"]))
    for view in ("ground", "aerial"):
        h, w = info["image_size"][view]
        assert h % model.patch_size == 0 and w % model.patch_size == 0, view
    assert len(model.blocks) == model.num_blocks
    assert model.trainable_blocks == registry.get("backbone", name).params.get("trainable_blocks")


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("view", ["ground", "aerial"])
def test_backbone_output_shapes(name, view):
    model = build_backbone(name).eval()
    with torch.no_grad():
        out = model(images(image_size(name)[view]))
    h, w = GRID[view]
    assert out.patches.shape == (2, model.out_dim, h, w)
    assert torch.isfinite(out.patches).all()
    assert out.cls is None or out.cls.shape == (2, model.out_dim)


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_deterministic_under_a_seed(name):
    x = images(image_size(name)["aerial"])
    with torch.no_grad():
        a, b, c = (build_backbone(name, seed=s).eval()(x).patches for s in (0, 0, 1))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def trainable_settings(name: str) -> list:
    """None (all), 0 (frozen), 1, and the value the entry is tested with, each once
    (["as-registered"] for a backbone without the parameter)."""
    if "trainable_blocks" not in registry.parameter_names("backbone", name):
        return ["as-registered"]
    registered = backbone_params(name).get("trainable_blocks",
                                           registry.get("backbone", name).params.get("trainable_blocks"))
    return list(dict.fromkeys([None, 0, 1, registered]))


@pytest.mark.parametrize("name,trainable_blocks",
                         [(n, t) for n in BACKBONES for t in trainable_settings(n)])
def test_backbone_gradients_only_where_trainable(name, trainable_blocks):
    extra = {} if trainable_blocks == "as-registered" else {"trainable_blocks": trainable_blocks}
    model = build_backbone(name, **extra).train()
    first = model.first_trainable_block
    for index, block in enumerate(model.blocks):
        wants = index >= first
        assert all(p.requires_grad == wants for p in block.parameters()), index
    tracked: list[bool] = []
    hooks = [b.register_forward_hook(lambda m, i, o: tracked.append(o.requires_grad))
             for b in model.blocks]
    out = model(images(image_size(name)["aerial"]))
    for hook in hooks:
        hook.remove()
    # Frozen blocks run without autograd: they keep no activations for backward.
    assert tracked[:first] == [False] * first
    assert all(tracked[first:])
    if model.is_frozen:
        assert not any(p.requires_grad for p in model.parameters())
        assert not out.patches.requires_grad
        return
    loss = out.patches.square().mean() + (0 if out.cls is None else out.cls.square().mean())
    loss.backward()
    for pname, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, pname
    assert any(p.grad.abs().sum() > 0 for p in model.parameters() if p.grad is not None)


# ================================================================== aggregators


@pytest.mark.parametrize("name", AGGREGATORS)
def test_aggregator_declares_the_contract(name):
    head = build_head(name)
    check_aggregator(head, name)  # out_dim a positive int, cluster_params real attributes
    assert registry.meta("aggregator", name).get("paper")
    assert isinstance(type(head).cluster_params, tuple)
    assert set(head.cluster_params) <= set(type(head).cluster_params)


@pytest.mark.parametrize("name", AGGREGATORS)
@pytest.mark.parametrize("cls", [True, False], ids=["cls", "no-cls"])
def test_aggregator_output_shape(name, cls):
    head = build_head(name).eval()
    with torch.no_grad():
        out = head(features(cls=cls))
    assert out.shape == (2, head.out_dim)
    assert torch.isfinite(out).all() and (out.norm(dim=1) > 0).all()


@pytest.mark.parametrize("name", AGGREGATORS)
def test_aggregator_deterministic_under_a_seed(name):
    outs = []
    for _ in range(2):
        head = build_head(name, seed=7).train()
        torch.manual_seed(3)  # dropout masks follow the seed too
        outs.append(head(features()))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@pytest.mark.parametrize("name", AGGREGATORS)
def test_aggregator_gradients_reach_every_parameter_and_the_input(name):
    head = build_head(name).train()
    feats = features()
    feats.patches.requires_grad_(True)
    out = head(feats)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    for pname, p in head.named_parameters():
        assert p.grad is not None, pname
    assert feats.patches.grad.abs().sum() > 0
    if list(head.parameters()):
        assert sum(p.grad.abs().sum() for p in head.parameters()) > 0


@pytest.mark.parametrize("name", AGGREGATORS)
def test_injected_parameters_cannot_be_written_in_a_config(name):
    with pytest.raises(ConfigError, match="'in_dim' is set by the harness"):
        registry.validate_params("aggregator", name, {"in_dim": 8})
    if declares_grid(name):
        with pytest.raises(ConfigError, match="'patch_grid' is set by the harness"):
            registry.validate_params("aggregator", name, {"patch_grid": [2, 2]})


WITH_ASSIGNMENTS = [n for n in AGGREGATORS
                    if callable(getattr(registry.get("aggregator", n).load(), "assignments", None))]
WITH_INITIALISE = [n for n in AGGREGATORS
                   if callable(getattr(registry.get("aggregator", n).load(), "initialise", None))]


@pytest.mark.parametrize("name", WITH_ASSIGNMENTS)
def test_assignments_spread_each_patch_over_the_clusters(name):
    head = build_head(name).eval()
    assert isinstance(head, HasAssignments)
    with torch.no_grad():
        a = head.assignments(features())
    n = GRID["ground"][0] * GRID["ground"][1]
    assert a.shape[:2] == (2, n) and a.shape[2] >= 1
    assert (a >= 0).all()
    torch.testing.assert_close(a.sum(dim=2), torch.ones(2, n))


@pytest.mark.parametrize("name", WITH_INITIALISE)
def test_initialise_from_local_features(name):
    head = build_head(name).eval()
    assert isinstance(head, Initialisable)
    with torch.no_grad():
        before = head(features())
    local = torch.randn(200, IN_DIM, generator=torch.Generator().manual_seed(4))
    head.initialise(local)
    with torch.no_grad():
        after = head(features())
    assert after.shape == before.shape and torch.isfinite(after).all()
    assert not torch.allclose(after, before)


# ================================================================== the two-view model


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_model_descriptors(backbone, aggregator):
    """Every backbone x aggregator: shapes, unit norm, determinism, gradients where trainable."""
    ground, aerial = model_inputs(backbone)
    model = build_model(backbone, aggregator).eval()
    again = build_model(backbone, aggregator).eval()
    with torch.no_grad():
        g, a = model(ground, aerial)
        torch.testing.assert_close(again.embed(ground, "ground"), g, rtol=0, atol=0)
    assert g.shape == a.shape == (2, model.out_dim)
    torch.testing.assert_close(g.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(a.norm(dim=1), torch.ones(2))

    model.train()
    g, a = model(ground, aerial)
    (g @ a.T).diagonal().sum().backward()
    for pname, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, pname
    if model.backbone_parameters():
        assert sum(p.grad.abs().sum() for p in model.backbone_parameters()) > 0
    if model.head_parameters():
        assert sum(p.grad.abs().sum() for p in model.head_parameters()) > 0


def share_cases() -> list:
    return [(agg, share, sb) for agg in AGGREGATORS for share in SHARE_MODES for sb in (True, False)]


@pytest.mark.parametrize("aggregator,share,share_backbone", share_cases())
def test_sharing_modes_share_exactly_what_they_say(aggregator, share, share_backbone):
    head_class = registry.get("aggregator", aggregator).load()
    kwargs = {"share": share, "share_backbone": share_backbone}
    if share == "clusters" and not head_class.cluster_params:
        with pytest.raises(ConfigError, match="means nothing"):
            build_model(SHARING_BACKBONE, aggregator, **kwargs)
        return
    grids = None
    if share == "all" and declares_grid(aggregator):
        with pytest.raises(ConfigError, match="share: all.*share: none"):
            build_model(SHARING_BACKBONE, aggregator, **kwargs)
        grids = {"ground": GRID["aerial"], "aerial": GRID["aerial"]}  # one grid: it works
    model = build_model(SHARING_BACKBONE, aggregator, grids=grids, **kwargs)

    def ids(module):
        return {id(p) for p in module.parameters()}

    assert (model.ground_backbone is model.aerial_backbone) == share_backbone
    if not share_backbone:
        assert not ids(model.ground_backbone) & ids(model.aerial_backbone)
    assert (model.ground_head is model.aerial_head) == (share == "all")
    shared = ids(model.ground_head) & ids(model.aerial_head)
    if share == "none":
        assert not shared
    if share == "clusters":
        tied = set()
        for attr in model.ground_head.cluster_params:
            obj = getattr(model.ground_head, attr)
            assert getattr(model.aerial_head, attr) is obj
            tied |= {id(obj)} if isinstance(obj, torch.nn.Parameter) else ids(obj)
        assert shared == tied and tied
    heads = model.head_parameters()
    assert len(heads) == len({id(p) for p in heads})
    ground, aerial = model_inputs(SHARING_BACKBONE, grids)
    with torch.no_grad():
        g, a = model.eval()(ground, aerial)
    torch.testing.assert_close(g.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(a.norm(dim=1), torch.ones(2))


@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_a_cell_with_each_aggregator_validates(aggregator):
    """Config time: the resolved Cell builds on the meta device (grids from the image sizes)."""
    from gengeo_bench.config import validate_cell

    data = {
        "model": {"backbone": {"name": SHARING_BACKBONE}, "aggregator": {"name": aggregator}},
        # large enough for every default (SALAD's 64 clusters need 64 patches per view)
        "train": {"dataset": "d", "image_size": {"ground": [448, 896], "aerial": [448, 448]}},
        "datasets": {"d": {"name": "synthetic", "pairs": 40}},
    }
    cell = validate_cell(data, "cell.yaml")
    defaults = registry.validate_params("aggregator", aggregator, {})
    assert cell.model.aggregator.params == defaults


@pytest.mark.parametrize("kind,name", [("backbone", n) for n in BACKBONES]
                         + [("aggregator", n) for n in AGGREGATORS])
def test_benchmark_list_describes_every_plugin(kind, name):
    from gengeo_bench.cli import _describe_plugin

    dim, count = _describe_plugin(kind, name)
    assert not dim.startswith("?"), dim
    assert count != "?"
