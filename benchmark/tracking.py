"""MLflow tracking: where runs go and how they are tagged, named and found again.

The default store is MLflow's SQLite backend in the working directory
(`sqlite:///mlflow.db`, artifacts in `mlartifacts/` beside it); `MLFLOW_TRACKING_URI` or
`--tracking-uri` points elsewhere (another database, an MLflow server).

Conventions every command shares (runner, tuner, report):

- one experiment per matrix or study name;
- a parent run per invocation (tag `gengeo.role` = `matrix` or `study`), one child run
  per Cell (`cell`) or trial (`trial`) with `mlflow.parentRunId` set explicitly;
- tags `gengeo.matrix` / `gengeo.study`, `gengeo.cell_id`, `gengeo.seed`, `gengeo.trial`;
- params: the flattened resolved Cell (`backbone.name`, `aggregator.share`,
  `train.lr`, `datasets.cvusa.name`, `seed`, ...), so the UI can search
  `params.aggregator.share = 'clusters'`;
- metrics: `train/loss` per step, `val/<dataset>/R1` per epoch,
  `test/<dataset>[/<protocol>]/{R1,R5,R10,R1pct,hit_rate}` and their `_ci_low/_ci_high`;
- artifacts: `cell.yaml`, `manifests.json`, `environment.json`, `ranks/*.npz`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from gengeo_bench.errors import ConfigError

ROLE, MATRIX, STUDY, CELL_ID, SEED, TRIAL = (
    "gengeo.role", "gengeo.matrix", "gengeo.study", "gengeo.cell_id", "gengeo.seed", "gengeo.trial")
PARENT = "mlflow.parentRunId"
ERROR = "gengeo.error"


def tracking_uri(cli_value: str | None = None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db."""
    if cli_value:
        return cli_value
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def client(uri: str):
    """An MlflowClient on `uri` (SQLite stores are created and migrated on first use)."""
    import logging

    import mlflow
    from mlflow.tracking import MlflowClient

    # Alembic prints a page of migration lines when a new SQLite store is created.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(uri)
    try:
        return MlflowClient(tracking_uri=uri)
    except Exception as exc:  # a malformed URI or an unreachable server
        raise ConfigError(f"tracking URI {uri!r} cannot be used: {exc}") from exc


def experiment_id(mlclient, name: str, uri: str) -> str:
    """The experiment called `name`, created (artifacts beside a SQLite store) if needed."""
    found = mlclient.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            mlclient.restore_experiment(found.experiment_id)
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / name).as_uri()
    return mlclient.create_experiment(name, artifact_location=location)


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested dict -> {"a.b.c": "value"} (MLflow params are strings, max 6,000 chars)."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    else:
        text = json.dumps(data) if isinstance(data, (list, tuple)) else str(data)
        out[prefix] = text[:6000]
    return out


def cell_params(cell) -> dict[str, str]:
    """The Cell's resolved config as flat params; model fields are lifted to the top level."""
    data = cell.model_dump(mode="json")
    model = data.pop("model")
    data.pop("name", None)
    return flatten({**model, **data})


def environment() -> dict[str, Any]:
    """Package versions, Python, platform and git commit: logged with every run."""
    packages = {}
    for name in ("gengeo-bench", "torch", "torchvision", "timm", "open_clip_torch", "faiss-cpu",
                 "mlflow", "optuna", "numpy", "pandas", "pydantic"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    import torch

    return {
        "packages": packages,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }


def log_metrics(mlclient, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
    for start in range(0, len(batch), 500):  # MLflow's log_batch limit is 1,000 metrics
        mlclient.log_batch(run_id, metrics=batch[start:start + 500])


def log_params(mlclient, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    existing = mlclient.get_run(run_id).data.params
    fresh = [Param(k, v) for k, v in params.items() if k not in existing]
    for start in range(0, len(fresh), 90):  # log_batch takes at most 100 params
        mlclient.log_batch(run_id, params=fresh[start:start + 90])


def find_runs(mlclient, exp_id: str, role: str, extra_filter: str = "") -> list:
    """All runs of one role in an experiment (any status), newest first."""
    query = f"tags.`{ROLE}` = '{role}'" + (f" and {extra_filter}" if extra_filter else "")
    runs, token = [], None
    while True:
        page = mlclient.search_runs([exp_id], filter_string=query, max_results=1000,
                                    order_by=["attributes.start_time DESC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs
