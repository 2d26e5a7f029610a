"""The `benchmark` command line. Each subcommand's --help says what it does."""

from __future__ import annotations

import sys

import click
from rich.console import Console

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
