"""The wheel works on its own: built, installed into a folder, run from another folder.

`pip wheel` builds from a copy of the working tree (tracked and untracked, not ignored
files: what `pip wheel .` would see, without writing build/ into the checkout);
`pip install --no-deps --target DIR` installs it; commands then run with
`PYTHONPATH=DIR`, which comes before this checkout's editable install on the import
path, from a folder that holds nothing of the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 900):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_wheel_installs_lists_and_trains_from_another_folder(tmp_path):
    source = tmp_path / "source"
    files = run(["git", "ls-files", "-co", "--exclude-standard"], REPO).stdout.split("\n")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    dist, target, elsewhere = tmp_path / "dist", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(source)], tmp_path)
    wheel = next(dist.glob("gengeo_bench-*.whl"))
    run(pip + ["install", "--no-deps", "--target", str(target), str(wheel)], tmp_path)

    # One import name: nothing of the repository's top-level folders lands in site-packages.
    installed = {p.name for p in target.iterdir()}
    assert "gengeo_bench" in installed
    assert not installed & {"benchmark", "backbones", "aggregators", "registry.yaml", "studies"}
    assert (target / "gengeo_bench" / "registry.yaml").is_file()
    assert (target / "gengeo_bench" / "studies" / "quickstart.yaml").is_file()

    env = {**os.environ, "PYTHONPATH": str(target), "GENGEO_CACHE": str(tmp_path / "cache")}
    where = run([sys.executable, "-c", "import gengeo_bench; print(gengeo_bench.__file__)"],
                elsewhere, env).stdout
    assert Path(where.strip()).is_relative_to(target)
    listing = run([sys.executable, "-m", "gengeo_bench", "list"], elsewhere, env).stdout
    for name in ("mixvpr", "boq", "convnext_base", "convnext_tiny", "avgpool"):
        assert name in listing, name
    assert "?" not in listing.split("aggregators")[1]  # every aggregator described

    (elsewhere / "cell.yaml").write_text(textwrap.dedent("""\
        name: wheel-mixvpr
        model:
          backbone: {name: resnet_tiny}
          aggregator: {name: mixvpr, out_channels: 16, mix_depth: 1, out_rows: 2}
          share_backbone: false
        train: {dataset: world, epochs: 1, batch_size: 8, lr: 1.0e-3, val_fraction: 0.25}
        datasets:
          world: {name: synthetic, region: grid_city, pairs: 40, aerial_size: 64, pano_size: [32, 128]}
        """))
    trained = run([sys.executable, "-m", "gengeo_bench", "train", "cell.yaml", "--workdir", "out",
                   "--device", "cpu"], elsewhere, env)
    assert "R1" in trained.stdout
    assert (elsewhere / "out" / "best.pt").is_file()
    assert (elsewhere / "out" / "metrics.json").is_file()
