"""The cross-view model: freezing, sharing specifics, patch grids, checkpoint imports."""

from __future__ import annotations

import pytest
import torch

from gengeo_bench import registry
from gengeo_bench.errors import ConfigError
from gengeo_bench.model import CrossViewModel, import_dinov2_salad

# Every backbone x aggregator, and every sharing mode, is tested in test_plugins.py.
SALAD = {"num_clusters": 4, "cluster_dim": 8, "token_dim": 8, "dropout": 0.0}


def _inputs(backbone: str, batch: int = 2):
    meta = registry.meta("backbone", backbone)
    g = torch.randn(batch, 3, *meta["image_size"]["ground"])
    a = torch.randn(batch, 3, *meta["image_size"]["aerial"])
    return g, a


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
    model = CrossViewModel("dinov2_tiny", "salad", aggregator_params=SALAD,
                           share="clusters")
    heads = model.head_parameters()
    assert len(heads) == len({id(p) for p in heads})
    separate = CrossViewModel("dinov2_tiny", "salad", aggregator_params=SALAD)
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


# --------------------------------------------------------------------------- the aggregator contract


def _with_extra_aggregator(monkeypatch, name: str, target: str) -> None:
    """Register one more aggregator for this test only (as a plugin package would)."""
    entry = registry.Entry(name=name, kind="aggregator", target=target, meta={"paper": "test"},
                           source="test")
    table = registry.collect(extra=[entry])
    monkeypatch.setattr(registry, "_table", lambda: table)


class ScaledMean(torch.nn.Module):
    """A head that does not normalise: 5 x the mean patch feature."""

    cluster_params = ()

    def __init__(self, in_dim: int):
        super().__init__()
        self.out_dim = in_dim
        self.scale = torch.nn.Parameter(torch.tensor(5.0))

    def forward(self, features):
        return self.scale * features.patches.mean(dim=(2, 3))


class NoOutDim(ScaledMean):
    def __init__(self, in_dim: int):
        super().__init__(in_dim)
        del self.out_dim


def test_the_model_normalises_what_a_head_returns(monkeypatch):
    from gengeo_bench.features import Features

    _with_extra_aggregator(monkeypatch, "scaled", f"{__name__}:ScaledMean")
    model = CrossViewModel("resnet_tiny", "scaled").eval()
    ground, aerial = _inputs("resnet_tiny")
    with torch.no_grad():
        feats = model.ground_backbone(ground)
        raw = model.ground_head(feats)
        g = model.embed(ground, "ground")
        on_features = model.aggregate(Features(feats.patches, feats.cls), "ground")
    assert not torch.allclose(raw.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(g, torch.nn.functional.normalize(raw, dim=1))
    torch.testing.assert_close(on_features, g)  # the cached-features path too


def test_a_head_without_out_dim_is_a_config_error_naming_the_contract(monkeypatch):
    _with_extra_aggregator(monkeypatch, "broken", f"{__name__}:NoOutDim")
    with pytest.raises(ConfigError, match=r"aggregator 'broken'.*out_dim.*docs/plugins.md"):
        CrossViewModel("resnet_tiny", "broken")


def test_patch_grids_come_from_the_image_sizes_and_the_patch_size():
    mix = {"out_channels": 4, "mix_depth": 1, "out_rows": 2}
    model = CrossViewModel("dinov2_tiny", "mixvpr", aggregator_params=mix,
                           image_size={"ground": (56, 112), "aerial": (42, 42)})
    assert model.patch_grid == {"ground": (4, 8), "aerial": (3, 3)}
    assert model.ground_head.patch_grid == (4, 8) and model.aerial_head.patch_grid == (3, 3)
    # clusters: one head per view, each with its own grid
    default = CrossViewModel("resnet_tiny", "mixvpr", aggregator_params=mix)
    assert default.patch_grid == {"ground": (2, 4), "aerial": (2, 2)}  # registry sizes / 32
    # share: all with one grid for both views works
    same = CrossViewModel("resnet_tiny", "mixvpr", aggregator_params=mix, share="all",
                          image_size={"ground": (64, 64), "aerial": (64, 64)})
    assert same.ground_head is same.aerial_head and same.ground_head.patch_grid == (2, 2)


def _cell(aggregator: dict, **train) -> dict:
    return {"model": {"backbone": {"name": "resnet_tiny"}, "aggregator": aggregator},
            "train": {"dataset": "d", **train}, "evaluate": {},
            "datasets": {"d": {"name": "synthetic", "pairs": 40}}}


def test_a_fixed_grid_head_shared_by_two_grids_fails_when_the_file_is_read():
    from gengeo_bench.config import validate_cell

    with pytest.raises(ConfigError) as info:
        validate_cell(_cell({"name": "mixvpr", "share": "all"}), "cell.yaml")
    message = str(info.value)
    assert message.startswith("cell.yaml: model: aggregator 'mixvpr' is built for one patch grid")
    assert "ground 2x4, aerial 2x2" in message and "share: none" in message
    # The fix it names works: both views at one size.
    sized = _cell({"name": "mixvpr", "share": "all"},
                  image_size={"ground": [64, 64], "aerial": [64, 64]})
    assert validate_cell(sized, "cell.yaml").model.aggregator.share == "all"


def test_a_fixed_grid_head_refuses_field_of_view_protocols():
    from gengeo_bench.config import validate_cell

    data = _cell({"name": "mixvpr"})
    data["evaluate"] = {"protocols": ["none", "fov:90"]}
    with pytest.raises(ConfigError, match=r"evaluate.protocols\[1\]: aggregator 'mixvpr'.*fov90"):
        validate_cell(data, "cell.yaml")
    data["evaluate"] = {"protocols": ["fov:360", "misalign:shift=10"]}  # same grid: fine
    validate_cell(data, "cell.yaml")
    data["model"]["aggregator"] = {"name": "boq", "proj_channels": 64}  # takes any grid
    data["evaluate"] = {"protocols": ["fov:90"]}
    validate_cell(data, "cell.yaml")


def test_build_model_gives_heads_the_cells_grid():
    from gengeo_bench.builders import build_model
    from gengeo_bench.config import validate_cell

    cell = validate_cell(_cell({"name": "mixvpr", "out_channels": 4, "mix_depth": 1},
                               image_size={"ground": [64, 192], "aerial": [96, 96]}), "cell.yaml")
    model = build_model(cell)
    assert model.ground_head.patch_grid == (2, 6) and model.aerial_head.patch_grid == (3, 3)


# --------------------------------------------------------------------------- Sample4Geo

S4G_TINY = {"depths": (1, 1, 1, 1), "dims": (16, 32, 48, 64)}  # = the convnext_tiny entry


def sample4geo_checkpoint(path, module_prefix: bool = False):
    """A checkpoint in Sample4Geo's layout: its TimmModel's state dict (`model.` + a
    timm ConvNeXt created with num_classes=0, and `logit_scale`), with a tiny ConvNeXt."""
    import math

    import timm

    torch.manual_seed(11)
    network = timm.create_model("convnext_base", pretrained=False, num_classes=0, **S4G_TINY).eval()
    with torch.no_grad():  # trained-like head LayerNorm and layer scales, so loading is checked
        network.head.norm.weight.normal_()
        network.head.norm.bias.normal_()
        for name, p in network.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.5)
    lead = "module." if module_prefix else ""
    state = {f"{lead}model.{k}": v for k, v in network.state_dict().items()}
    state[f"{lead}logit_scale"] = torch.tensor(math.log(1 / 0.07))
    torch.save(state, path)
    return network


@pytest.mark.parametrize("module_prefix", [False, True])
def test_sample4geo_checkpoint_gives_the_reference_descriptors(tmp_path, module_prefix):
    """Harness descriptors == Sample4Geo's: F.normalize(timm_model(images)), the forward of
    its TimmModel followed by the normalisation of its evaluation."""
    import torch.nn.functional as F

    from gengeo_bench.model import import_sample4geo

    network = sample4geo_checkpoint(tmp_path / "weights_e40.pth", module_prefix)
    model = import_sample4geo(tmp_path / "weights_e40.pth", backbone="convnext_tiny").eval()
    assert model.ground_backbone is model.aerial_backbone and model.ground_head is model.aerial_head
    ground = torch.randn(3, 3, 64, 192, generator=torch.Generator().manual_seed(1))
    aerial = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for view, x in (("ground", ground), ("aerial", aerial)):
            expected = F.normalize(network(x), dim=-1)
            got = model.embed(x, view)
            assert got.shape == expected.shape == (3, 64)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_sample4geo_import_rejects_other_layouts(tmp_path):
    from gengeo_bench.errors import WeightsError
    from gengeo_bench.model import import_sample4geo

    torch.save({"backbone.model.x": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="timm ConvNeXt under 'model.'"):
        import_sample4geo(tmp_path / "other.pt", backbone="convnext_tiny")
    with pytest.raises(WeightsError, match="not found"):
        import_sample4geo(tmp_path / "nope.pt")


def test_benchmark_evaluate_format_sample4geo(tmp_path, monkeypatch, capsys):
    """The CLI path on a tiny synthetic world: `--format sample4geo` builds convnext +
    avgpool, loads the release layout, and prints the metrics table."""
    from gengeo_bench.cli import main as cli_main

    monkeypatch.setenv("GENGEO_CACHE", str(tmp_path / "cache"))
    sample4geo_checkpoint(tmp_path / "s4g.pth")
    monkeypatch.setattr("sys.argv", [
        "benchmark", "evaluate", "--checkpoint", str(tmp_path / "s4g.pth"), "--format", "sample4geo",
        "--backbone", "convnext_tiny", "--dataset", "synthetic", "--option", "pairs=24",
        "--option", "region=rural", "--image-size", "ground=64x128", "--device", "cpu",
        "--batch-size", "8"])
    cli_main()
    out = capsys.readouterr().out
    assert "test/synthetic" in out and "R1" in out
    assert list((tmp_path / "eval" / "synthetic" / "ranks").glob("*.npz"))
