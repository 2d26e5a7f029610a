"""A Cell is its resolved values, and every check runs before any work.

A Cell stores each plugin's parameters with the defaults filled in (signature, then the
registry.yaml entry, then the file), so its id, its MLflow params and its `cell.yaml` see
every value that shapes a run. Value ranges declared in plugin signatures, and the checks
the constructors make, stop `benchmark run --dry-run` with exit status 2 before a store
or a dataset is created.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from gengeo_bench import registry, tracking
from gengeo_bench.cli import main as cli_main
from gengeo_bench.config import load_cell, validate_cell
from gengeo_bench.errors import ConfigError
from gengeo_bench.matrix import load_matrix

REPO = Path(__file__).resolve().parents[1]


def cell_dict(aggregator: dict, backbone: dict | None = None) -> dict:
    return {
        "name": "c",
        "model": {"backbone": backbone or {"name": "resnet_tiny"}, "aggregator": aggregator},
        "train": {"dataset": "city", "epochs": 1},
        "datasets": {"city": {"name": "synthetic", "region": "grid_city", "pairs": 40}},
    }


def matrix_file(tmp_path: Path, aggregators: list, **extra) -> Path:
    data = {
        "name": "m",
        "defaults": {"train": {"dataset": "city", "epochs": 1}},
        "datasets": {"city": {"name": "synthetic", "region": "grid_city", "pairs": 40}},
        "axes": {"backbone": ["resnet_tiny"], "aggregator": aggregators},
        **extra,
    }
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_default_spelled_out_is_the_same_cell():
    implicit = validate_cell(cell_dict({"name": "salad", "num_clusters": 4}), "a.yaml")
    explicit = validate_cell(cell_dict({"name": "salad", "num_clusters": 4, "dropout": 0.3}), "b.yaml")
    assert implicit.id == explicit.id
    other = validate_cell(cell_dict({"name": "salad", "num_clusters": 4, "dropout": 0.2}), "c.yaml")
    assert other.id != implicit.id


def test_the_cell_holds_every_resolved_value():
    cell = validate_cell(cell_dict({"name": "salad", "num_clusters": 4}), "a.yaml")
    params = cell.model.aggregator.params
    # The signature's defaults, with the file's value on top.
    assert params == {"num_clusters": 4, "cluster_dim": 128, "token_dim": 256, "dropout": 0.3,
                      "sinkhorn_iters": 3, "dustbin": True}
    # The registry entry's values for a variant (resnet_tiny's size), the signature's rest.
    backbone = cell.model.backbone.params
    assert backbone["channels"] == [8, 16, 32, 48] and backbone["output_stride"] == 32
    assert cell.datasets["city"].params["layout"] == "cvusa"  # a loader default
    flat = tracking.cell_params(cell)
    assert flat["aggregator.dropout"] == "0.3" and flat["backbone.output_stride"] == "32"
    assert "dropout: 0.3" in cell.to_yaml()


def test_resolving_twice_changes_nothing(tmp_path):
    cell = validate_cell(cell_dict({"name": "netvlad", "num_clusters": 4}), "a.yaml")
    path = tmp_path / "cell.yaml"
    path.write_text(cell.to_yaml())
    again = load_cell(path)
    assert again.id == cell.id and again.model_dump() == cell.model_dump()


def test_changing_a_registry_default_changes_the_id(tmp_path, monkeypatch):
    before = validate_cell(cell_dict({"name": "gem"}), "a.yaml")
    text = (REPO / "registry.yaml").read_text()
    edited = text.replace("channels: [8, 16, 32, 48]", "channels: [8, 16, 32, 64]")
    assert edited != text
    changed = tmp_path / "registry.yaml"
    changed.write_text(edited)
    monkeypatch.setattr(registry, "REGISTRY_FILE", changed)
    registry.reload()
    try:
        after = validate_cell(cell_dict({"name": "gem"}), "a.yaml")
    finally:
        monkeypatch.undo()
        registry.reload()
    assert after.model.backbone.params["channels"] == [8, 16, 32, 64]
    assert after.id != before.id


def test_axis_values_that_resolve_to_one_cell_are_an_error(tmp_path):
    path = matrix_file(tmp_path, [{"name": "salad", "num_clusters": 4},
                                  {"name": "salad", "num_clusters": 4, "dropout": 0.3}])
    with pytest.raises(ConfigError, match=r"m.yaml: .*salad.*and.*salad\[.*dropout=0.3\].* resolve "
                                          r"to the same Cell"):
        load_matrix(path)


@pytest.mark.parametrize("value,expected", [
    ({"name": "salad", "dropout": 1.5},
     r"axes.aggregator\[0\]: aggregator 'salad': parameter 'dropout' = 1.5: Input should be less "
     r"than 1"),
    ({"name": "netvlad", "num_clusters": -3},
     r"axes.aggregator\[0\]: aggregator 'netvlad': parameter 'num_clusters' = -3: Input should be "
     r"greater than 0"),
    ({"name": "gem", "p": 0},
     r"axes.aggregator\[0\]: aggregator 'gem': parameter 'p' = 0: Input should be greater than 0"),
])
def test_bad_values_stop_a_dry_run_before_anything_is_created(tmp_path, monkeypatch, capsys,
                                                              value, expected):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GENGEO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = matrix_file(tmp_path, [value])
    for extra in ([], ["--dry-run"]):
        monkeypatch.setattr(sys, "argv", ["benchmark", "run", "--matrix", str(path), *extra])
        with pytest.raises(SystemExit) as info:
            cli_main()
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "m.yaml" in err and "Traceback" not in err
        assert __import__("re").search(expected, " ".join(err.split())), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.yaml"]  # no store, no cache, no runs


def test_a_check_that_needs_the_architecture_runs_before_work(tmp_path):
    # resnet_tiny has 4 stages: 9 trainable blocks is only known to be wrong once built.
    path = matrix_file(tmp_path, ["gem"])
    data = yaml.safe_load(path.read_text())
    data["axes"]["backbone"] = [{"name": "resnet_tiny", "trainable_blocks": 9}]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"m.yaml: cell .*: model: .*trainable_blocks = 9"):
        load_matrix(path)


def test_a_salad_with_more_clusters_than_patches_stops_before_work(tmp_path):
    # resnet_tiny at ground 64x128 / aerial 64x64 (patch 32): 2x4 and 2x2 patches
    path = matrix_file(tmp_path, [{"name": "salad", "num_clusters": 6, "cluster_dim": 8, "token_dim": 8}])
    with pytest.raises(ConfigError, match=r"m.yaml: cell .*: model: aggregator 'salad' needs at least "
                                          r"6 patches per image, but the aerial view gives 2x2 = 4"):
        load_matrix(path)
    no_dustbin = {"name": "salad", "num_clusters": 6, "cluster_dim": 8, "token_dim": 8, "dustbin": False}
    assert load_matrix(matrix_file(tmp_path, [no_dustbin])).cells  # without a dustbin any grid works


def test_a_field_of_view_that_leaves_too_few_patches_stops_before_work(tmp_path):
    # resnet_small: ground 32x128 at patch 16 = 2x8 patches; fov:90 keeps 32 columns = 2x2
    salad = {"name": "salad", "num_clusters": 8, "cluster_dim": 8, "token_dim": 8}
    path = matrix_file(tmp_path, [salad], protocols=["none", "fov:180", "fov:90"])
    data = yaml.safe_load(path.read_text())
    data["axes"]["backbone"] = ["resnet_small"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"m.yaml: cell .*: evaluate.protocols\[2\] \(fov90, panorama "
                                          r"32x32\): aggregator 'salad' needs at least 8 patches"):
        load_matrix(path)
    data["protocols"] = ["none", "fov:180"]  # 2x4 = 8 patches: enough
    path.write_text(yaml.safe_dump(data))
    assert load_matrix(path).cells


@pytest.mark.parametrize("section,value,expected", [
    ("train", {"epochs": -1}, r"train.epochs: Input should be greater than or equal to 0"),
    ("train", {"batch_size": 1}, r"train.batch_size: Input should be greater than or equal to 2"),
    ("train", {"lr": 0}, r"train.lr: Input should be greater than 0"),
    ("evaluate", {"batch_size": 0}, r"evaluate.batch_size: Input should be greater than or equal"),
])
def test_recipe_ranges(section, value, expected):
    data = cell_dict({"name": "gem"})
    data.setdefault(section, {}).update(value)
    with pytest.raises(ConfigError, match=r"x.yaml: " + expected):
        validate_cell(data, "x.yaml")


def test_dataset_options_are_checked_too():
    data = cell_dict({"name": "gem"})
    data["datasets"]["city"]["pairs"] = 1
    with pytest.raises(ConfigError, match=r"datasets.city: dataset 'synthetic': parameter 'pairs' = 1"):
        validate_cell(data, "x.yaml")
    data["datasets"]["city"].update(pairs=40, layout="sideways")
    with pytest.raises(ConfigError, match=r"parameter 'layout' = 'sideways'.*'cvusa' or 'vigor'"):
        validate_cell(data, "x.yaml")


def test_option_strings_split_on_commas_for_list_and_tuple_parameters():
    from gengeo_bench.config import parse_options

    parsed = parse_options(["pano_size=64,256", "pairs=30", "region=suburb"], "dataset", "synthetic")
    assert parsed == {"pano_size": ["64", "256"], "pairs": 30, "region": "suburb"}
    assert parse_options(["pano_size=[64, 256]"], "dataset", "synthetic") == {"pano_size": [64, 256]}
    checked = registry.validate_params("dataset", "synthetic", parsed)
    assert checked["pano_size"] == (64, 256)
    assert parse_options(["cities=Chicago,Seattle"], "dataset", "vigor")["cities"] == ["Chicago", "Seattle"]
