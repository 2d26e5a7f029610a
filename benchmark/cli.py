"""The `benchmark` command line. Each subcommand's --help says what it does."""

from __future__ import annotations

import sys

import click
from rich.console import Console

from benchmark.data_cli import data
from benchmark.errors import BenchmarkError

console = Console()
err_console = Console(stderr=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gengeo-bench")
def cli() -> None:
    """GenGeo Bench: benchmark and ablate cross-view geo-localization models.

    Start with `benchmark list` to see the registered backbones, aggregators and
    datasets.
    """


cli.add_command(data)


def _describe_plugin(kind: str, name: str) -> tuple[str, str]:
    """(output dim at the default input, parameter count), computed on the meta device."""
    import torch

    from benchmark import registry

    entry = registry.get(kind, name)
    if kind == "dataset":
        sizes = entry.meta.get("image_size", {})
        dims = ", ".join(f"{v} {'x'.join(map(str, s))}" for v, s in sizes.items())
        return dims or "-", "-"
    with torch.device("meta"):
        if kind == "backbone":
            module = registry.build(kind, name, pretrained=False)
            h, w = entry.meta.get("image_size", {}).get("aerial", (224, 224))
            p = module.patch_size
            dim = f"{module.out_dim} x {h // p}x{w // p} @ {h}x{w}"
        else:
            module = registry.build(kind, name, in_dim=768)
            dim = f"{module.out_dim} @ in_dim 768"
    count = sum(p.numel() for p in module.parameters())
    return dim, f"{count / 1e6:.2f}M" if count >= 1e5 else f"{count:,}"


@cli.command("list")
@click.argument("kind", required=False, type=click.Choice(["backbone", "aggregator", "dataset"]))
def list_plugins(kind: str | None) -> None:
    """List registered plugins: name, family, output dim, parameters, paper.

    KIND narrows the table to backbones, aggregators or datasets. Backbone output is
    `channels x patch grid` at the default aerial size; aggregator output is measured at
    in_dim 768 (DINOv2-B/14). Plugins come from registry.yaml and from installed packages
    that declare the `gengeo_bench.plugins` entry-point group.
    """
    from rich.table import Table

    from benchmark import registry

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
            table.add_row(name, str(entry.meta.get("family", "")), dim, count, paper)
        console.print(table)


def _metrics_table(title: str, metrics: dict[str, float]) -> None:
    """Print `test/<dataset>[/<protocol>]/<metric>` values as one row per evaluation."""
    from rich.table import Table

    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        prefix, _, name = key.rpartition("/")
        rows.setdefault(prefix, {})[name] = value
    columns = ["R1", "R5", "R10", "R1pct", "hit_rate"]
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
    train (dataset, epochs, batch_size, lr, head_lr, sampler, ...), evaluate (on,
    protocols), datasets and seed. A killed run resumes from its last epoch when the same
    command runs again. Multi-GPU: `torchrun --nproc_per_node N -m benchmark train CELL`.
    """
    from pathlib import Path

    from benchmark.config import load_cell
    from benchmark.engine import run_cell

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
              help="A best.pt or checkpoint.pt written by `benchmark train` or a matrix run.")
@click.option("--dataset", required=True, help="Registered dataset name (see `benchmark list dataset`).")
@click.option("--root", default=None, help="Dataset root folder (not needed for synthetic).")
@click.option("--split", default="test", show_default=True, help="Which split to evaluate.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Loader option, e.g. --option protocol=within_5m or --option region=suburb.")
@click.option("--protocol", "protocols", multiple=True, default=["none"], show_default=True,
              help="Robustness protocol(s): none, fov:90, fov:90:known, misalign:shift=20,rot=10.")
@click.option("--device", default=None, help="cpu, cuda or cuda:N.")
@click.option("--batch-size", default=64, show_default=True)
def evaluate(checkpoint: str, dataset: str, root: str | None, split: str, options: tuple[str, ...],
             protocols: tuple[str, ...], device: str | None, batch_size: int) -> None:
    """Evaluate a trained checkpoint on a dataset split and print R@1/5/10/1%.

    Metrics follow FORMATS.md: ranks count gallery items scoring strictly higher than the
    ground truth; R@K comes with a 95% bootstrap interval; per-query ranks are written
    next to the checkpoint under eval/.
    """
    from pathlib import Path

    import torch
    import yaml

    from benchmark.config import DatasetRef, validate_cell
    from benchmark.engine import evaluate_targets
    from benchmark.errors import ConfigError
    from benchmark.train import build_model, default_device

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if "cell_yaml" not in state:
        raise ConfigError(f"{checkpoint}: not a GenGeo Bench checkpoint (no cell_yaml record).")
    data = yaml.safe_load(state["cell_yaml"])
    params = {}
    for text in options:
        key, sep, value = text.partition("=")
        if not sep:
            raise ConfigError(f"--option {text!r}: expected KEY=VALUE.")
        params[key] = yaml.safe_load(value)
    data["datasets"]["_eval"] = DatasetRef(name=dataset, root=root, test_split=split,
                                           train_split=split, **params).model_dump()
    data["evaluate"]["on"] = ["_eval"]
    data["evaluate"]["protocols"] = list(protocols)
    data["evaluate"]["batch_size"] = batch_size
    cell = validate_cell(data, "--dataset/--option/--protocol")
    model = build_model(cell)
    model.load_state_dict(state["model"])
    dev = torch.device(device) if device else default_device()
    model.to(dev)
    out = Path(checkpoint).parent / "eval" / dataset
    metrics, _, _, coverage = evaluate_targets(cell, model, dev, out, feature_bank=None)
    metrics = {k.replace("test/_eval", f"test/{dataset}"): v for k, v in metrics.items()}
    _metrics_table(f"{checkpoint} on {dataset} ({split})", metrics)
    for prefix, text in coverage.items():
        console.print(f"{prefix.replace('_eval', dataset)}: {text}")


def main() -> None:
    """Console-script entry point: user-facing errors print one paragraph, no traceback."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        err_console.print("[red]aborted[/red]")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except BenchmarkError as exc:
        err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
