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
