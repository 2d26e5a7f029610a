"""A plugin added as one file + one entry is tested without editing a test.

A throw-away package in a temporary folder declares two aggregators through the
`gengeo_bench.plugins` entry-point group, the way a third-party package would: `maxpool`
keeps the contract, `liar` declares an `out_dim` its forward does not return. The
generated tests of tests/test_plugins.py, run in a subprocess that sees the package,
pick both up by themselves: every `maxpool` test passes and `liar` fails the checks it
breaks. Nothing in the test suite names either plugin.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PLUGIN = '''
"""Global max pooling (test plugin): Tolias, Sicre, Jégou, "Particular object retrieval
with integral max-pooling of CNN activations", ICLR 2016 (MAC)."""

import torch
from pydantic import PositiveFloat, PositiveInt

from gengeo_bench.features import Aggregator, Features


class MaxPool(Aggregator):
    cluster_params = ()

    def __init__(self, in_dim: PositiveInt, scale: PositiveFloat = 1.0) -> None:
        super().__init__()
        self.in_dim = self.out_dim = in_dim
        self.scale = torch.nn.Parameter(torch.tensor(float(scale)))

    def forward(self, features: Features) -> torch.Tensor:
        return self.scale * features.patches.amax(dim=(2, 3))


class Liar(MaxPool):
    def __init__(self, in_dim: PositiveInt) -> None:
        super().__init__(in_dim)
        self.out_dim = in_dim + 1  # not what forward returns


PLUGINS = {"aggregator": {
    "maxpool": {"target": "gg_test_plugins:MaxPool",
                "meta": {"family": "pool", "paper": "MAC (ICLR 2016)"}},
    "liar": {"target": "gg_test_plugins:Liar", "meta": {"family": "pool", "paper": "none"}},
}}
'''


def write_plugin_package(folder: Path) -> None:
    """One module and the metadata `pip install` would write for it."""
    (folder / "gg_test_plugins.py").write_text(textwrap.dedent(PLUGIN))
    dist = folder / "gg_test_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: gg-test-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[gengeo_bench.plugins]\nmine = gg_test_plugins:PLUGINS\n")


@pytest.mark.slow
def test_generated_tests_pick_up_a_new_plugin(tmp_path):
    write_plugin_package(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    listing = subprocess.run([sys.executable, "-m", "gengeo_bench", "list", "aggregator"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert listing.returncode == 0, listing.stderr
    assert "maxpool" in listing.stdout and "liar" in listing.stdout

    report = tmp_path / "report.xml"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(REPO / "tests" / "test_plugins.py"), "-k", "maxpool or liar", f"--junitxml={report}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        failed = case.find("failure") is not None or case.find("error") is not None
        skipped = case.find("skipped") is not None
        outcomes[case.get("name")] = "failed" if failed else "skipped" if skipped else "passed"
    mine = {k: v for k, v in outcomes.items() if "maxpool" in k}
    liar = {k: v for k, v in outcomes.items() if "liar" in k}
    # Contract, shapes, seeds, gradients, config, listing, sharing, and every backbone under it.
    assert len(mine) >= 20, run.stdout[-2000:]
    assert set(mine.values()) == {"passed"}, {k: v for k, v in mine.items() if v != "passed"}
    assert any(k.startswith("test_model_descriptors[maxpool-") for k in mine)
    assert any(k.startswith("test_sharing_modes_share_exactly_what_they_say[maxpool-") for k in mine)
    assert liar["test_aggregator_output_shape[cls-liar]"] == "failed"
    assert all(v == "failed" for k, v in liar.items() if k.startswith("test_model_descriptors["))
    assert run.returncode == 1  # the liar's failures, and nothing else
    assert not [k for k, v in outcomes.items() if v == "failed" and "liar" not in k]
