"""Packaging glue that pyproject.toml cannot express: the repository keeps `registry.yaml`
and `studies/` at its top level (the design fixes that layout), and a wheel must carry
them inside the `gengeo_bench` package, where `gengeo_bench.registry` and the CLI look
for them when the package is not an editable checkout.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildWithRegistry(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable checkout reads them where they are
        package = Path(self.build_lib) / "gengeo_bench"
        shutil.copy2(HERE / "registry.yaml", package / "registry.yaml")
        (package / "studies").mkdir(exist_ok=True)
        for study in sorted((HERE / "studies").glob("*.yaml")):
            shutil.copy2(study, package / "studies" / study.name)


setup(cmdclass={"build_py": BuildWithRegistry})
