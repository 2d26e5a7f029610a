"""The plugin registry: lookup, parameter validation, duplicates, entry points."""

from __future__ import annotations

import sys
import textwrap

import pytest

from gengeo_bench import registry
from gengeo_bench.errors import ConfigError


def test_every_kind_has_the_study_families():
    assert {"dinov2_vitb14", "dinov2_vitb14_reg4", "clip_vitb16", "clip_vitl14", "resnet50",
            "resnet18", "dinov2_tiny", "clip_tiny", "resnet_tiny", "convnext_base",
            "convnext_tiny"} <= set(registry.names("backbone"))
    assert {"gem", "netvlad", "salad", "mixvpr", "boq", "avgpool"} <= set(registry.names("aggregator"))
    assert registry.names("aggregator") == sorted(registry.names("aggregator"))
    assert {"cvusa", "cvact", "vigor", "synthetic"} <= set(registry.names("dataset"))


def test_every_entry_has_paper_and_preprocessing_contract():
    for kind in registry.KINDS:
        for name in registry.names(kind):
            meta = registry.meta(kind, name)
            assert meta.get("paper"), (kind, name)
            if kind == "backbone":
                assert len(meta["mean"]) == 3 and len(meta["std"]) == 3
                assert isinstance(meta["patch_size"], int) and meta["patch_size"] > 0
                for view in ("ground", "aerial"):
                    h, w = meta["image_size"][view]
                    assert h % meta["patch_size"] == 0 and w % meta["patch_size"] == 0, name
                assert meta["weights_licence"]


def test_unknown_name_lists_known_and_closest():
    with pytest.raises(ConfigError) as info:
        registry.get("aggregator", "salat")
    message = str(info.value)
    assert "Did you mean 'salad'?" in message
    assert ", ".join(registry.names("aggregator")) in message


def test_unknown_kind():
    with pytest.raises(ConfigError, match="unknown plugin kind 'head'"):
        registry.names("head")


def test_unknown_parameter_names_plugin_and_parameter():
    with pytest.raises(ConfigError) as info:
        registry.validate_params("aggregator", "salad", {"num_cluster": 8}, where="x.yaml: model")
    message = str(info.value)
    assert message.startswith("x.yaml: model: aggregator 'salad' has no parameter 'num_cluster'")
    assert "Did you mean 'num_clusters'?" in message


def test_ill_typed_parameter_is_caught_before_construction():
    with pytest.raises(ConfigError, match=r"aggregator 'salad': parameter 'dustbin' = 'maybe'"):
        registry.validate_params("aggregator", "salad", {"dustbin": "maybe"})
    with pytest.raises(ConfigError, match=r"parameter 'num_clusters' = 'many'"):
        registry.validate_params("aggregator", "netvlad", {"num_clusters": "many"})


def test_values_are_coerced_and_defaults_merged():
    params = registry.validate_params("aggregator", "salad", {"num_clusters": "16"})
    assert params["num_clusters"] == 16
    assert params["cluster_dim"] == 128 and params["dustbin"] is True


def test_injected_in_dim_may_not_be_written_in_yaml():
    with pytest.raises(ConfigError, match="'in_dim' is set by the harness"):
        registry.validate_params("aggregator", "gem", {"in_dim": 12})
    assert registry.build("aggregator", "gem", in_dim=12).out_dim == 12


def test_injected_patch_grid_reaches_only_heads_that_declare_it():
    with pytest.raises(ConfigError, match="'patch_grid' is set by the harness"):
        registry.validate_params("aggregator", "mixvpr", {"patch_grid": [4, 4]})
    with pytest.raises(ConfigError, match=r"missing required parameter\(s\) \['patch_grid'\]"):
        registry.build("aggregator", "mixvpr", in_dim=12)
    head = registry.build("aggregator", "mixvpr", in_dim=12, patch_grid=[2, 3])
    assert head.patch_grid == (2, 3)  # coerced from the YAML-style list by the signature
    assert "patch_grid" not in registry.parameter_names("aggregator", "gem")


def test_duplicate_name_names_both_sources():
    extra = registry.Entry(name="gem", kind="aggregator", target="gengeo_bench.aggregators.gem:GeM",
                           source="my_plugins.yaml")
    with pytest.raises(ConfigError) as info:
        registry.collect(extra=[extra])
    message = str(info.value)
    assert "registry.yaml" in message and "my_plugins.yaml" in message


def test_bad_target_names_the_source():
    entry = registry.Entry(name="x", kind="aggregator", target="gengeo_bench.aggregators.nope:X",
                           source="plugins.yaml")
    with pytest.raises(ConfigError, match="plugins.yaml: aggregator 'x': target"):
        entry.load()


def test_entry_point_plugins_are_discovered(tmp_path, monkeypatch):
    """A third-party package adds an aggregator through the entry-point group."""
    (tmp_path / "my_gem_plugin.py").write_text(textwrap.dedent("""
        from gengeo_bench.aggregators.gem import GeM

        class MaxGeM(GeM):
            '''GeM with a large default p (test plugin).'''

        PLUGINS = {"aggregator": {"maxgem": {"target": "my_gem_plugin:MaxGeM",
                                             "params": {"p": 8.0},
                                             "meta": {"paper": "test"}}}}
    """))
    dist = tmp_path / "my_gem_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-gem-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[gengeo_bench.plugins]\nmine = my_gem_plugin:PLUGINS\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.reload()
    try:
        assert "maxgem" in registry.names("aggregator")
        head = registry.build("aggregator", "maxgem", in_dim=4)
        assert float(head.p) == pytest.approx(8.0)
        assert "entry point 'mine'" in registry.get("aggregator", "maxgem").source
    finally:
        sys.modules.pop("my_gem_plugin", None)
        monkeypatch.undo()
        registry.reload()
    assert "maxgem" not in registry.names("aggregator")


def test_malformed_registry_file(tmp_path, monkeypatch):
    bad = tmp_path / "registry.yaml"
    bad.write_text("aggregator:\n  gem: {target: gengeo_bench.aggregators.gem:GeM\n")
    monkeypatch.setattr(registry, "REGISTRY_FILE", bad)
    with pytest.raises(ConfigError, match="malformed YAML"):
        registry.collect()
