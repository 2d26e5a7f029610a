"""The cross-view model over every registered combination, sharing modes, checkpoint import."""

from __future__ import annotations

import itertools

import pytest
import torch

from gengeo_bench import registry
from gengeo_bench.errors import ConfigError
from gengeo_bench.model import CrossViewModel, import_dinov2_salad

TINY = [n for n in registry.names("backbone")
        if registry.meta("backbone", n)["weights_licence"].startswith("random init")]
SMALL_HEADS = {"gem": {}, "netvlad": {"num_clusters": 4},
               "salad": {"num_clusters": 4, "cluster_dim": 8, "token_dim": 8, "dropout": 0.0}}
COMBOS = [
    (bb, agg, share, share_bb)
    for bb, agg, share, share_bb in itertools.product(
        TINY, registry.names("aggregator"), ("none", "clusters", "all"), (True, False))
    if not (agg == "gem" and share == "clusters")
]


def _inputs(backbone: str, batch: int = 2):
    meta = registry.meta("backbone", backbone)
    g = torch.randn(batch, 3, *meta["image_size"]["ground"])
    a = torch.randn(batch, 3, *meta["image_size"]["aerial"])
    return g, a


def test_tiny_variants_cover_every_family():
    assert {registry.meta("backbone", n)["family"] for n in TINY} == {"dinov2", "clip", "resnet"}


@pytest.mark.parametrize("backbone,aggregator,share,share_backbone", COMBOS)
def test_every_combination(backbone, aggregator, share, share_backbone):
    torch.manual_seed(0)
    model = CrossViewModel(backbone, aggregator, aggregator_params=SMALL_HEADS[aggregator],
                           share_backbone=share_backbone, share=share)
    ground, aerial = _inputs(backbone)

    # Determinism under a seed (before any training-mode forward moves BatchNorm stats).
    torch.manual_seed(0)
    again = CrossViewModel(backbone, aggregator, aggregator_params=SMALL_HEADS[aggregator],
                           share_backbone=share_backbone, share=share)
    model.eval(), again.eval()
    torch.testing.assert_close(model.embed(ground, "ground"), again.embed(ground, "ground"))
    model.train()

    g, a = model(ground, aerial)
    assert g.shape == a.shape == (2, model.out_dim)
    torch.testing.assert_close(g.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(a.norm(dim=1), torch.ones(2))

    # Sharing really shares modules (and nothing more).
    assert (model.ground_backbone is model.aerial_backbone) == share_backbone
    assert (model.ground_head is model.aerial_head) == (share == "all")
    if share == "clusters":
        for name in type(model.ground_head).cluster_params:
            assert getattr(model.ground_head, name) is getattr(model.aerial_head, name)

    # Gradients reach every trainable parameter used by the two views, and only those.
    model.train()
    model.zero_grad()
    g, a = model(ground, aerial)
    (g @ a.T).diagonal().sum().backward()
    nonzero = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            nonzero += int(p.grad.abs().sum() > 0)
        else:
            assert p.grad is None, name
    # Exact zeros are legitimate only where an initialisation zeroes a path (timm's
    # ResNet zero-initialises each block's last BatchNorm scale).
    assert nonzero > 0
    assert sum(p.grad.abs().sum() for p in model.backbone_parameters()) > 0
    # (Some single parameters legitimately get zero: Sinkhorn's row normalisation cancels
    # the score bias, and with as many patches as clusters the dustbin holds no mass.)
    for head in (model.ground_head, model.aerial_head):
        assert sum(p.grad.abs().sum() for p in head.parameters()) > 0


def test_frozen_blocks_get_no_gradient():
    model = CrossViewModel("dinov2_tiny", "gem", backbone_params={"trainable_blocks": 1})
    ground, aerial = _inputs("dinov2_tiny")
    g, a = model(ground, aerial)
    (g * a).sum().backward()
    trained = {n for n, p in model.ground_backbone.named_parameters() if p.grad is not None}
    assert trained and all(n.startswith(("model.blocks.1.", "model.norm.")) for n in trained)
    assert not model.backbone_is_frozen
    frozen = CrossViewModel("dinov2_tiny", "gem", backbone_params={"trainable_blocks": 0})
    assert frozen.backbone_is_frozen


def test_clusters_sharing_means_nothing_for_gem():
    with pytest.raises(ConfigError, match="share = 'clusters' means nothing for aggregator 'gem'"):
        CrossViewModel("dinov2_tiny", "gem", share="clusters")
    with pytest.raises(ConfigError, match="share = 'some'"):
        CrossViewModel("dinov2_tiny", "gem", share="some")


def test_shared_parameters_are_listed_once():
    model = CrossViewModel("dinov2_tiny", "salad", aggregator_params=SMALL_HEADS["salad"],
                           share="clusters")
    heads = model.head_parameters()
    assert len(heads) == len({id(p) for p in heads})
    separate = CrossViewModel("dinov2_tiny", "salad", aggregator_params=SMALL_HEADS["salad"])
    score = sum(p.numel() for p in model.ground_head.score.parameters()) + 1  # + dust_bin
    assert sum(p.numel() for p in separate.head_parameters()) - sum(p.numel() for p in heads) == score


def test_import_published_dinov2_salad_checkpoint(tmp_path, monkeypatch):
    """A DINOv2-SALAD checkpoint (hub DINOv2 keys under backbone.model., SALAD under
    aggregator.) imports into dinov2_vitb14 + salad. Shrunk with a tiny ViT so the test
    is fast: the key mapping is the same."""
    import timm

    from gengeo_bench.backbones import dinov2

    real_create = timm.create_model

    def tiny_create(arch, **kwargs):
        kwargs.update(embed_dim=48, depth=2, num_heads=2)
        return real_create(arch, **kwargs)

    monkeypatch.setattr(dinov2.timm, "create_model", tiny_create)
    torch.manual_seed(1)
    source = CrossViewModel("dinov2_vitb14", "salad",
                            backbone_params={"pretrained": False, "trainable_blocks": None},
                            aggregator_params={"dropout": 0.0, "num_clusters": 8,
                                               "cluster_dim": 16, "token_dim": 16}, share="all")
    state = {}
    for key, value in source.ground_backbone.model.state_dict().items():
        state[f"backbone.model.{key}"] = value  # timm keys == hub keys for the plain ViT
    state["backbone.model.mask_token"] = torch.zeros(1, 48)
    for key, value in source.ground_head.state_dict().items():
        state[f"aggregator.{key}"] = value
    path = tmp_path / "dino_salad.ckpt"
    torch.save({"state_dict": state}, path)
    model = import_dinov2_salad(path, backbone_params={"trainable_blocks": None}, num_clusters=8,
                                cluster_dim=16, token_dim=16, dropout=0.0)
    source.eval(), model.eval()
    image = torch.randn(1, 3, 56, 56)
    torch.testing.assert_close(model.embed(image, "aerial"), source.embed(image, "aerial"))
    assert model.ground_head is model.aerial_head


def test_import_rejects_a_foreign_checkpoint(tmp_path):
    from gengeo_bench.errors import WeightsError

    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match="expected keys under 'backbone.model.'"):
        import_dinov2_salad(path)
    with pytest.raises(WeightsError, match="not found"):
        import_dinov2_salad(tmp_path / "nope.pt")
