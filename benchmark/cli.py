"""The `benchmark` command line. Each subcommand's --help says what it does."""

from __future__ import annotations

import atexit
import gc
import sys

import click

from gengeo_bench import progress
from gengeo_bench.data_cli import data
from gengeo_bench.errors import BenchmarkError

console = progress.console()
err_console = progress.console(stderr=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gengeo-bench")
def cli() -> None:
    """GenGeo Bench: benchmark and ablate cross-view geo-localization models.

    Start with `benchmark list` to see the registered backbones, aggregators and
    datasets.
    """


cli.add_command(data)


def _describe_plugin(kind: str, name: str) -> tuple[str, str]:
    """(output dim at the default input, parameter count), computed on the meta device.

    A plugin that cannot be built this way (a parameter only its user can supply, say)
    gets "?" and the reason, and the rest of the listing goes on.
    """
    import torch

    from gengeo_bench import registry

    entry = registry.get(kind, name)
    if kind == "dataset":
        sizes = entry.meta.get("image_size", {})
        dims = ", ".join(f"{v} {'x'.join(map(str, s))}" for v, s in sizes.items())
        return dims or "-", "-"
    try:
        accepted = registry.parameter_names(kind, name)
        with torch.device("meta"):
            if kind == "backbone":
                # Never touch weight files or the network just to list a backbone.
                offline = {"pretrained": False} if "pretrained" in accepted else {}
                module = registry.build(kind, name, **offline)
                h, w = entry.meta.get("image_size", {}).get("aerial", (224, 224))
                p = module.patch_size
                dim = f"{module.out_dim} x {h // p}x{w // p} @ {h}x{w}"
            else:
                # DINOv2-B/14 at 322 x 322: 768 channels on a 23 x 23 grid.
                grid = {"patch_grid": (23, 23)} if "patch_grid" in accepted else {}
                module = registry.build(kind, name, in_dim=768, **grid)
                dim = f"{module.out_dim} @ in_dim 768" + (", 23x23 patches" if grid else "")
    except Exception as exc:  # one odd plugin never hides the others
        return f"? ({type(exc).__name__}: {str(exc)[:80]})", "?"
    count = sum(p.numel() for p in module.parameters())
    return dim, f"{count / 1e6:.2f}M" if count >= 1e5 else f"{count:,}"


@cli.command("list")
@click.argument("kind", required=False, type=click.Choice(["backbone", "aggregator", "dataset"]))
def list_plugins(kind: str | None) -> None:
    """List registered plugins: name, family, output dim, parameters, paper.

    KIND narrows the table to backbones, aggregators or datasets. Backbone output is
    `channels x patch grid` at the default aerial size; aggregator output is measured at
    in_dim 768 (DINOv2-B/14), on a 23x23 patch grid for heads built for one grid.
    Plugins come from registry.yaml and from installed packages that declare the
    `gengeo_bench.plugins` entry-point group.
    """
    from rich.markup import escape
    from rich.table import Table

    from gengeo_bench import registry

    for k in [kind] if kind else list(registry.KINDS):
        table = Table(title=f"{k}s", title_justify="left")
        for column in ("name", "family", "output", "params", "paper / weights"):
            table.add_column(column, overflow="fold")
        for name in registry.names(k):
            entry = registry.get(k, name)
            dim, count = _describe_plugin(k, name)
            paper = entry.meta.get("paper", "")
            licence = entry.meta.get("weights_licence")
            if licence:
                paper = f"{paper} [{licence}]"
            table.add_row(name, str(entry.meta.get("family", "")), dim, count, escape(paper))
        console.print(table)


def _metrics_table(title: str, metrics: dict[str, float]) -> None:
    """Print `test/<dataset>[/<protocol>]/<metric>` values as one row per evaluation."""
    from rich.table import Table

    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        prefix, _, name = key.rpartition("/")
        rows.setdefault(prefix, {})[name] = value
    columns = ["R1", "R5", "R10", "R1pct", "hit_rate", "chance_R1"]
    table = Table(title=title, title_justify="left")
    table.add_column("evaluation")
    for c in columns + ["R1 95% CI", "queries"]:
        table.add_column(c, justify="right")
    for prefix, values in sorted(rows.items()):
        cells = [f"{values[c]:.2f}" if c in values else "-" for c in columns]
        ci = (f"[{values['R1_ci_low']:.1f}, {values['R1_ci_high']:.1f}]"
              if "R1_ci_low" in values else "-")
        queries = (f"{int(values['queries_evaluated']):,}/{int(values['queries_total']):,}"
                   if "queries_total" in values else "-")
        table.add_row(prefix, *cells, ci, queries)
    console.print(table)


@cli.command()
@click.argument("cell_file", type=click.Path(dir_okay=False))
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Where checkpoints, ranks and metrics go (default: runs/<name>-<cell id>).")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available).")
@click.option("--no-resume", is_flag=True, help="Start over even if a checkpoint exists.")
@click.option("--no-cache", is_flag=True, help="Do not read or write descriptor/feature caches.")
def train(cell_file: str, workdir: str | None, device: str | None, no_resume: bool,
          no_cache: bool) -> None:
    """Train one Cell and evaluate it on every target.

    CELL_FILE is a YAML Cell: model (backbone, aggregator with share, share_backbone),
    train (dataset, epochs, batch_size, lr, head_lr, sampler, ...), evaluate (targets,
    protocols), datasets and seed. A killed run resumes from its last epoch when the same
    command runs again. Multi-GPU: `torchrun --nproc_per_node N -m gengeo_bench train CELL`.
    """
    from pathlib import Path

    from gengeo_bench.config import load_cell
    from gengeo_bench.engine import run_cell

    cell = load_cell(cell_file)
    out = Path(workdir) if workdir else Path("runs") / f"{cell.name}-{cell.id}"
    console.print(f"Cell [bold]{cell.name}[/bold] id {cell.id} -> {out}")
    result = run_cell(cell, out, device=device, resume=not no_resume, use_cache=not no_cache)
    if result.metrics:
        _metrics_table(f"{cell.name} ({cell.id}), best epoch {result.outcome.best_epoch}",
                       result.metrics)
        console.print(f"checkpoint: {out / 'best.pt'}   per-query ranks: {out / 'ranks'}")


@cli.command()
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False, exists=True),
              help="A best.pt or checkpoint.pt written by `benchmark train` or a matrix run "
                   "(or, with --format sample4geo, a released Sample4Geo checkpoint).")
@click.option("--format", "fmt", type=click.Choice(["gengeo", "sample4geo"]), default="gengeo",
              show_default=True,
              help="gengeo: a checkpoint of this harness (it records its Cell). sample4geo: "
                   "Sample4Geo's release (a timm ConvNeXt under 'model.'), evaluated as "
                   "convnext + avgpool, one network for both views.")
@click.option("--backbone", default="convnext_base", show_default=True,
              help="With --format sample4geo: the registered ConvNeXt entry the checkpoint fits.")
@click.option("--image-size", "image_sizes", multiple=True, metavar="VIEW=HxW",
              help="With --format sample4geo: a view's input size, e.g. --image-size ground=384x768 "
                   "(VIGOR); default: the backbone's registry sizes.")
@click.option("--dataset", required=True, help="Registered dataset name (see `benchmark list dataset`).")
@click.option("--root", default=None, help="Dataset root folder (not needed for synthetic).")
@click.option("--split", default="test", show_default=True, help="Which split to evaluate.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Loader option, e.g. --option protocol=within_5m or --option region=suburb.")
@click.option("--protocol", "protocols", multiple=True, default=["none"], show_default=True,
              help="Robustness protocol(s): none, fov:90, fov:90:known, misalign:shift=20,rot=10.")
@click.option("--device", default=None, help="cpu, cuda or cuda:N.")
@click.option("--batch-size", default=64, show_default=True)
def evaluate(checkpoint: str, fmt: str, backbone: str, image_sizes: tuple[str, ...], dataset: str,
             root: str | None, split: str, options: tuple[str, ...], protocols: tuple[str, ...],
             device: str | None, batch_size: int) -> None:
    """Evaluate a trained checkpoint on a dataset split and print R@1/5/10/1%.

    Metrics are defined in docs/metrics.md: ranks count gallery items scoring strictly
    higher than the ground truth; R@K comes with a 95% bootstrap interval; per-query
    ranks are written next to the checkpoint under eval/. With --format sample4geo a
    published Sample4Geo model is measured under this harness's protocols.
    """
    from pathlib import Path

    import torch

    from gengeo_bench.builders import (
        EVAL_KEY,
        checkpoint_model,
        default_device,
        preprocessing,
        retarget_cell,
    )
    from gengeo_bench.engine import evaluate_targets
    from gengeo_bench.model import import_sample4geo

    if fmt == "sample4geo":
        cell = retarget_cell(_sample4geo_cell(Path(checkpoint).stem, backbone, image_sizes),
                             dataset, root, split, options, protocols, batch_size)
        ground, aerial = preprocessing(cell)
        model = import_sample4geo(checkpoint, backbone,
                                  image_size={"ground": ground.size, "aerial": aerial.size})
    else:
        cell, model = checkpoint_model(checkpoint, dataset, root, split, options, protocols,
                                       batch_size)
    dev = torch.device(device) if device else default_device()
    model.to(dev)
    out = Path(checkpoint).parent / "eval" / dataset
    metrics, _, _, coverage = evaluate_targets(cell, model, dev, out, feature_bank=None)
    metrics = {k.replace(f"test/{EVAL_KEY}", f"test/{dataset}"): v for k, v in metrics.items()}
    _metrics_table(f"{checkpoint} on {dataset} ({split})", metrics)
    for prefix, text in coverage.items():
        console.print(f"{prefix.replace(EVAL_KEY, dataset)}: {text}")


def _sample4geo_cell(name: str, backbone: str, image_sizes: tuple[str, ...]) -> dict:
    """The Cell a Sample4Geo model is evaluated as: `backbone` + avgpool, one for both views."""
    from gengeo_bench import registry
    from gengeo_bench.errors import ConfigError

    sizes = {view: list(hw) for view, hw in registry.meta("backbone", backbone)["image_size"].items()}
    for text in image_sizes:
        view, _, hw = text.partition("=")
        h, _, w = hw.partition("x")
        if view not in ("ground", "aerial") or not (h.isdigit() and w.isdigit()):
            raise ConfigError(f"--image-size {text!r}: expected ground=HxW or aerial=HxW, "
                              f"e.g. ground=384x768.")
        sizes[view] = [int(h), int(w)]
    return {
        "name": f"sample4geo-{name}",
        "model": {"backbone": {"name": backbone, "pretrained": False},
                  "aggregator": {"name": "avgpool", "share": "all"}, "share_backbone": True},
        "train": {"dataset": "_eval", "epochs": 0, "image_size": sizes},
        "evaluate": {},
        "datasets": {},
    }


@cli.command()
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False, exists=True),
              help="A best.pt or checkpoint.pt written by `benchmark train` or a matrix run.")
@click.option("--dataset", required=True, help="Registered dataset name (see `benchmark list dataset`).")
@click.option("--root", default=None, help="Dataset root folder (not needed for synthetic).")
@click.option("--split", default="test", show_default=True, help="Which split to look at.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Loader option, e.g. --option region=suburb.")
@click.option("--protocol", default="none", show_default=True,
              help="One robustness protocol: none, fov:90, misalign:shift=20,rot=10.")
@click.option("--pairs", default=4, show_default=True, type=click.IntRange(min=1),
              help="Pairs drawn in the assignment maps (the numbers use at least 32).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for the figures and explain.json.")
@click.option("--device", default=None, help="cpu, cuda or cuda:N.")
@click.option("--batch-size", default=64, show_default=True)
def explain(checkpoint: str, dataset: str, root: str | None, split: str, options: tuple[str, ...],
            protocol: str, pairs: int, out: str, device: str | None, batch_size: int) -> None:
    """Look inside a model: assignment maps, the dustbin measured, retrieval galleries.

    For aggregators with clusters (SALAD, NetVLAD): per pair, the panorama and its aerial
    tile with each patch in its cluster's colour (one palette for both views) and the
    dustbin's share per patch; how often each view uses each cluster; with one-view masks
    (masks/ beside the images) the dustbin's mass on one-view content against its share of
    the image; with CVUSA's annotations, the dustbin's mass per class. For every
    aggregator: queries with their top-5 tiles, successes and failures. Writes PNGs and
    explain.json (see benchmark/explain.py) into OUT.
    """
    from pathlib import Path

    from gengeo_bench.explain import explain as run_explain

    summary = run_explain(checkpoint, dataset, Path(out), root=root, split=split, options=options,
                          protocol=protocol, pairs=pairs, device=device, batch_size=batch_size)
    console.print(f"{summary['method']} on {dataset} ({split}, {summary['protocol']}): "
                  f"R@1 {summary['retrieval']['R1']:.2f}", markup=False, highlight=False)
    numbers = summary.get("assignments")
    if numbers is None:
        console.print(summary["note"], markup=False, highlight=False)
    elif numbers.get("dustbin"):
        dustbin = numbers["dustbin"]
        line = f"dustbin: {dustbin['mean_share']['both']:.1f}% of the mass"
        both = (dustbin.get("unmatched") or {}).get("both")
        if both:
            line += (f"; {both['dustbin_on_unmatched']:.1f}% of it on one-view patches, which are "
                     f"{both['unmatched_base_rate']:.1f}% of the patches")
        console.print(line, markup=False, highlight=False)
    for name in [*summary["figures"].values(), "explain.json"]:
        console.print(f"  {Path(out) / name}", markup=False, highlight=False)


EXECUTOR_HELP = ("local: this process runs the Cells (several processes may share a matrix); "
                 "ray: one Ray task per Cell.")
RAY_ADDRESS_HELP = ("With --executor ray: 'auto' or HOST:PORT joins a running cluster "
                    "(`ray start --head`); default: a local Ray instance for this command.")


@cli.command()
@click.option("--matrix", "matrix_file", required=True, type=click.Path(dir_okay=False),
              help="Matrix YAML (e.g. studies/quickstart.yaml), or the name of a shipped study.")
@click.option("--tracking-uri", default=None,
              help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here); "
                   "http://HOST:5000 for an MLflow server shared by many machines.")
@click.option("--reports-dir", default="reports", show_default=True, help="Where reports go.")
@click.option("--runs-dir", default="runs", show_default=True,
              help="Checkpoints, per-query ranks and claims, one folder per Cell id. Workers on "
                   "several machines need it on shared storage.")
@click.option("--dry-run", is_flag=True, help="List the Cells and what is done or running; run nothing.")
@click.option("--keep-going", is_flag=True,
              help="A failing Cell does not stop this worker (under Ray the others always go on).")
@click.option("--dev", is_flag=True,
              help="Smoke mode: 1 epoch of 2 steps per Cell, into a separate '<name>-dev' experiment.")
@click.option("--only", default=None, metavar="PATTERN",
              help="Run only Cells whose label (glob, e.g. '*salad*') or id prefix matches.")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available).")
@click.option("--no-report", is_flag=True, help="Skip the report at the end.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help=EXECUTOR_HELP)
@click.option("--ray-address", default=None, metavar="ADDRESS", help=RAY_ADDRESS_HELP)
@click.option("--gpus-per-cell", type=click.FloatRange(min=0), default=None,
              help="With --executor ray: GPUs per Cell task (default: the matrix's resources, else 0).")
@click.option("--cpus-per-cell", type=click.FloatRange(min=0, min_open=True), default=None,
              help="With --executor ray: CPUs per Cell task (default: the matrix's resources, else 1).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Local executor: this many worker processes here sharing the Cells (the CPU "
                   "threads split between them); e.g. 2 on a 2-core machine runs two small Cells "
                   "side by side. Never two on one Cell.")
@click.option("--join-run", "join_parent", default=None, hidden=True,
              help="Internal: a worker started by --workers, under this parent run.")
@click.option("--no-wait", is_flag=True,
              help="Local executor: leave when only Cells other workers hold are left, instead of "
                   "waiting to take over those whose worker dies.")
def run(matrix_file: str, tracking_uri: str | None, reports_dir: str, runs_dir: str, dry_run: bool,
        keep_going: bool, dev: bool, only: str | None, device: str | None, no_report: bool,
        executor: str, ray_address: str | None, gpus_per_cell: float | None,
        cpus_per_cell: float | None, workers: int, join_parent: str | None, no_wait: bool) -> None:
    """Run every Cell of a matrix file, tracked in MLflow, then write the report.

    Each Cell trains once and is evaluated on every target and protocol. Running the
    same command again skips finished Cells and resumes interrupted ones from their last
    epoch. Results: the MLflow store (`benchmark ui`), reports/<name>/ (tables, figures).

    Scale out: start one such command per GPU (on one machine, or on many sharing the
    tracking server and the runs folder); each claims a Cell before it starts, so none runs
    twice, and a Cell whose worker died is taken over. Or let Ray place the Cells:
    `--executor ray --ray-address auto --gpus-per-cell 1`.

    \b
    Examples:
      benchmark run --matrix studies/quickstart.yaml
      benchmark run --matrix quickstart --workers 2       # two workers on a 2-core CPU
      benchmark run --matrix studies/ablation.yaml --dry-run
      CUDA_VISIBLE_DEVICES=0 benchmark run --matrix studies/ablation.yaml &
      CUDA_VISIBLE_DEVICES=1 benchmark run --matrix studies/ablation.yaml &
      benchmark run --matrix studies/ablation.yaml --executor ray --ray-address auto \\
          --gpus-per-cell 1 --tracking-uri http://head:5000
    """
    import sys

    from gengeo_bench.runner import run_matrix

    if dev:
        matrix_file = _dev_matrix(matrix_file)
    outcomes = run_matrix(matrix_file, tracking_uri, reports_dir, runs_dir, dry_run, keep_going,
                          only, device, report=not no_report, executor=executor, wait=not no_wait,
                          ray_address=ray_address, gpus_per_cell=gpus_per_cell,
                          cpus_per_cell=cpus_per_cell, workers=workers, join_parent=join_parent)
    if any(o.status == "failed" for o in outcomes):
        sys.exit(1)


def _dev_matrix(matrix_file: str) -> str:
    """A copy of the matrix with tiny training budgets, under the name '<name>-dev'."""
    import tempfile

    from gengeo_bench.config import read_yaml, study_file

    data = read_yaml(study_file(matrix_file))
    if isinstance(data, dict):
        data["name"] = f"{data.get('name', 'matrix')}-dev"
        train = data.setdefault("defaults", {}).setdefault("train", {})
        train.update(epochs=1, steps_per_epoch=2)
    import yaml

    handle = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False, prefix="dev-")
    handle.write(yaml.safe_dump(data, sort_keys=False))
    handle.close()
    return handle.name


@cli.command()
@click.option("--matrix", "matrix_file", default=None, type=click.Path(dir_okay=False),
              help="Report the experiment named in this matrix file (and its baseline); a "
                   "shipped study's name (quickstart) works from any folder.")
@click.option("--experiment", default=None, help="Or: the MLflow experiment name.")
@click.option("--reports-dir", default="reports", show_default=True)
@click.option("--tracking-uri", default=None, help="MLflow store (default as for `run`).")
def report(matrix_file: str | None, experiment: str | None, reports_dir: str,
           tracking_uri: str | None) -> None:
    """Write report tables (Markdown, CSV, LaTeX) and figures for a matrix's runs.

    Reads the finished runs back from MLflow: the transfer table (train x test dataset),
    the sharing x dustbin ablation, backbone x aggregator, robustness (protocol x method),
    deltas against the baseline with McNemar p-values, heatmaps, R@K and training curves.
    """
    from gengeo_bench.errors import ConfigError
    from gengeo_bench.report import report_command_impl

    if not matrix_file and not experiment:
        raise ConfigError("benchmark report: give --matrix FILE or --experiment NAME.")
    folder = report_command_impl(matrix_file, experiment, reports_dir, tracking_uri)
    console.print(f"report: {folder / 'index.md'}")


@cli.command()
@click.option("--tracking-uri", default=None, help="MLflow store (default as for `run`).")
@click.option("--port", default=5000, show_default=True)
def ui(tracking_uri: str | None, port: int) -> None:
    """Start the MLflow UI on 127.0.0.1 for the current store.

    Compare Cells in the UI's compare view; search runs with e.g.
    `params.aggregator.share = 'clusters' and params.backbone.name = 'dinov2_tiny'`.
    """
    import os
    import subprocess
    import sys
    from pathlib import Path

    from gengeo_bench.tracking import tracking_uri as resolve

    uri = resolve(tracking_uri)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
               "--host", "127.0.0.1", "--port", str(port)]
    if uri.startswith("sqlite:///"):
        artifacts = Path(uri[len("sqlite:///"):]).parent / "mlartifacts"
        command += ["--default-artifact-root", artifacts.as_uri()]
    console.print(f"MLflow UI on http://127.0.0.1:{port} for {uri} (Ctrl-C stops it)")
    sys.exit(subprocess.call(command, env=os.environ.copy()))


@cli.command()
@click.option("--study", "study_file", required=True, type=click.Path(dir_okay=False),
              help="A study file (studies/*_hpo.yaml): base Cell, search space, objective, budget.")
@click.option("--n-trials", type=click.IntRange(min=0), default=None,
              help="Run this many more trials here (default: until the study holds its n_trials).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Start no new trial after this many seconds (default: the file's timeout).")
@click.option("--storage", default=None,
              help="Optuna storage: sqlite:///optuna.db (default), journal:FILE, postgresql://...")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///mlflow.db).")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available).")
@click.option("--report", is_flag=True, help="Write reports/<study>/: best trial, trial table, figures.")
@click.option("--export-best", type=click.Path(dir_okay=False), default=None,
              help="Write the best trial's Cell to this YAML file (for `benchmark train`).")
@click.option("--runs-dir", default="runs", show_default=True,
              help="Trial work folders (runs/<study>/trial-<n>); shared storage for many machines.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this process is one worker; ray: --workers Optuna workers as Ray tasks.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --executor ray: how many Optuna workers share the study.")
@click.option("--ray-address", default=None, metavar="ADDRESS", help=RAY_ADDRESS_HELP)
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="With --executor ray: GPUs per worker task.")
@click.option("--cpus-per-worker", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True, help="With --executor ray: CPUs per worker task.")
def tune(study_file: str, n_trials: int | None, timeout: float | None, storage: str | None,
         tracking_uri: str | None, device: str | None, report: bool, export_best: str | None,
         runs_dir: str, executor: str, workers: int, ray_address: str | None,
         gpus_per_worker: float, cpus_per_worker: float) -> None:
    """Search hyperparameters of a Cell with Optuna; each trial is a Cell, trained and tracked.

    Every trial trains in runs/<study>/trial-<n> and is an MLflow child run under one
    parent run per invocation. Running the command again resumes the study. Several
    processes (on one machine, or on many with a PostgreSQL --storage) share one study:
    each runs trials until the study holds its budget. `--n-trials 0 --report` only
    writes the report. `--executor ray --workers N` runs N such workers as Ray tasks
    (`--n-trials` then counts per worker).
    """
    from gengeo_bench import tune as tuning

    outcome = tuning.tune(study_file, n_trials=n_trials, timeout=timeout, storage=storage,
                          tracking_uri=tracking_uri, device=device, report=report, export=export_best,
                          executor=executor, workers=workers, ray_address=ray_address,
                          gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
                          runs_dir=runs_dir)
    for line in outcome.lines():
        console.print(line, highlight=False)


def main() -> None:
    """Console-script entry point: user-facing errors print one paragraph, no traceback."""
    # The interpreter's last garbage collection walks torch's, MLflow's and Ray's object
    # graphs for about 2 s before the process ends: at exit (after the other exit handlers,
    # registered later), the objects are frozen and left to the OS. A process that calls
    # main() and goes on (a test) keeps collecting until it ends.
    atexit.register(gc.freeze)
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        err_console.print("[red]aborted[/red]")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except BenchmarkError as exc:
        from rich.markup import escape

        err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
