"""`benchmark data ...`: check a dataset on disk, look at a few pairs, make a synthetic one.

Registered on the main group in `benchmark/cli.py`. Errors are `DataError` /
`ConfigError`: the `benchmark` entry point prints them as one paragraph and exits 2.
Heavy imports (the loaders, PIL, matplotlib) happen inside the commands, so that
`benchmark --help` stays fast.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import click

from gengeo_bench import progress
from gengeo_bench.errors import ConfigError, DataError

console = progress.console()
err_console = progress.console(stderr=True)

DATASET_HELP = "Registered dataset name (see `benchmark list dataset`): cvusa, cvact, vigor, ..."
ROOT_HELP = "Folder that holds the dataset as distributed (see the loader's docstring)."
SPLIT_HELP = (
    "Split to read: cvusa train|test, cvact train|val|test, vigor train|test. "
    "Default: the registry's default (train)."
)
CHECK_SPLIT_HELP = (
    "Split to check: cvusa train|test, cvact train|val|test, vigor train|test (of the "
    "chosen mode), synthetic train|test. Default: every split the dataset has."
)
OPTION_HELP = (
    "Extra loader option as key=value, repeatable; values are read as YAML "
    "(cvact: middle_crop=true, protocol=within_5m; vigor: mode=cross_area, corrected=true, "
    "cities=[Chicago,Seattle]; cvusa: splits=my-split.csv, a split file under splits/)."
)


@click.group("data")
def data() -> None:
    """Inspect datasets on disk: check them, look at pairs, generate a synthetic one.

    \b
    Typical first steps with a real dataset:
      benchmark data check --dataset cvusa --root /data/CVUSA --split test
      benchmark data check --dataset cvact --root /data/CVACT --split val --decode
      benchmark data show  --dataset vigor --root /data/VIGOR --split test --out pairs.png
    and without any download:
      benchmark data synth --out data/synth --region <name> --pairs 200 --seed 0
    """


def load_dataset(dataset: str, root: str, split: str | None, options: tuple[str, ...]) -> Any:
    """Build a registered dataset; unknown names and bad options are ConfigErrors."""
    from gengeo_bench import registry
    from gengeo_bench.config import parse_options

    params: dict[str, Any] = {"root": str(root), **parse_options(options, "dataset", dataset)}
    if split is not None:
        params["split"] = split
    return registry.build("dataset", dataset, **params)


@data.command("check")
@click.option("--dataset", "-d", required=True, help=DATASET_HELP)
@click.option("--root", "-r", required=True, type=click.Path(file_okay=False), help=ROOT_HELP)
@click.option("--split", "-s", default=None, help=CHECK_SPLIT_HELP)
@click.option(
    "--decode",
    is_flag=True,
    help="Fully decode every image (PIL verify + load) to catch truncated or corrupt files, "
    "and check every image's size. Slow on a full dataset (minutes); without it, files are "
    "only tested for existence and the first few per view are size-checked.",
)
@click.option(
    "--no-size-check",
    is_flag=True,
    help="Do not compare image sizes with the registry's meta.image_size (for copies resized on purpose).",
)
@click.option(
    "--allow-missing-eval",
    is_flag=True,
    help="Accept a few missing files in an evaluation split (val, test), as many as the "
    "training split tolerates: they are still listed, and the exit status is 0, but results "
    "on that split are not comparable with published numbers. Without it they exit 2.",
)
@click.option("--option", "-o", "options", multiple=True, metavar="KEY=VALUE", help=OPTION_HELP)
def check_command(
    dataset: str,
    root: str,
    split: str | None,
    decode: bool,
    no_size_check: bool,
    allow_missing_eval: bool,
    options: tuple[str, ...],
) -> None:
    """Check that a dataset on disk is complete and readable, every split or one.

    Loads each split the way training and evaluation will (split files parsed, every
    referenced image tested for existence), then prints per split the counts, the content
    hash recorded in run manifests, and what is missing, unreadable or of the wrong size.
    Without --split every split the dataset has is checked (cvusa: train, test; cvact:
    train, val, test; vigor: train, test of the chosen mode).

    The training split tolerates a few missing files (at most 10, and at most 1% of the
    split): their pairs are skipped and recorded in the manifest as `skipped_missing`,
    with a warning. An evaluation split (val, test) does not: a missing query or gallery
    image makes its results incomparable with published numbers, so the check fails
    unless --allow-missing-eval accepts it.

    Exit status 0 when every checked split is usable as it is, 2 otherwise, with what to fix.

    \b
    Examples:
      benchmark data check -d cvusa -r /data/CVUSA
      benchmark data check -d cvact -r /data/CVACT --split test -o protocol=within_5m
      benchmark data check -d vigor -r /data/VIGOR -s test -o mode=cross_area --decode
    """
    from rich.table import Table

    from gengeo_bench import registry
    from gengeo_bench.datasets.checks import split_verdict

    if split is not None:
        splits = [split]
    else:
        splits = list(getattr(registry.get("dataset", dataset).load(), "split_names", ["train"]))
    usable_pairs: list[str] = []
    unusable: list[str] = []
    load_errors: dict[str, list[str]] = {}  # message -> the splits that raised it
    for name in splits:
        try:
            ds = load_dataset(dataset, root, name, options)
        except DataError as exc:
            if split is not None:
                raise  # one split asked for: the loader's message as it is
            load_errors.setdefault(str(exc), []).append(name)
            continue
        report = check_split(ds, decode, no_size_check)
        skipped = list(getattr(ds, "skipped_missing", []))
        console.print(f"[bold]{dataset}[/bold] split {report.split} at {report.root}", highlight=False)
        table = Table()
        table.add_column("what")
        table.add_column("count", justify="right")
        for key, value in report.counts.items():
            table.add_row(key, str(value))
        table.add_row("missing", str(len(report.missing)))
        table.add_row("unreadable", str(len(report.unreadable)))
        table.add_row("wrong size", str(len(report.wrong_size)))
        console.print(table)
        ds_options = getattr(ds, "options", None)
        options_used = ds_options() if callable(ds_options) else {}
        if options_used:
            console.print("options: " + ", ".join(f"{k}={v}" for k, v in options_used.items()))
        console.print(f"content hash: {ds.manifest()['content_hash']}", highlight=False)
        usable, lines = split_verdict(report, skipped, allow_missing_eval)
        for line in lines:
            console.print(f"- {line}", highlight=False, soft_wrap=True)
        if usable:
            usable_pairs.append(f"{name} {len(ds.pairs)} pairs")
        else:
            unusable.append(f"split {name} is not usable as it is: {' '.join(lines)}")
    # One paragraph; a load error shared by several splits (no such root) is said once.
    for message, names in load_errors.items():
        unusable.append(f"split{'s' if len(names) > 1 else ''} {', '.join(names)}: {message}")
    if unusable:
        raise DataError(f"{dataset} at {root}: " + " ".join(unusable))
    if split is not None:
        console.print(f"[green]usable[/green]: {len(ds.pairs)} pairs.")
    else:
        console.print(f"[green]usable[/green]: {', '.join(usable_pairs)}.")


def check_split(ds: Any, decode: bool, no_size_check: bool) -> Any:
    """The CheckReport of one loaded split: its own `check()`, else the generic one."""
    from gengeo_bench.datasets.checks import check_dataset

    if callable(getattr(ds, "check", None)):
        check = ds.check
    else:  # a dataset without its own check(): the generic one over its images

        def check(**kw: Any) -> Any:
            return check_dataset(ds, **kw)

    params = inspect.signature(check).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())

    def run(**wanted: Any) -> Any:  # pass only the options this check() accepts
        return check(**{k: v for k, v in wanted.items() if takes_any or k in params})

    if not decode:
        return run(decode=False, size_check=not no_size_check)
    from rich.progress import Progress

    views = ds.files_by_view() if hasattr(ds, "files_by_view") else {}
    total = sum(len(files) for files in views.values()) or None
    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task(f"decoding {ds.split} images", total=total)
        return run(
            decode=True,
            size_check=not no_size_check,
            progress=lambda n: bar.update(task, completed=n),
        )


@data.command("show")
@click.option("--dataset", "-d", required=True, help=DATASET_HELP)
@click.option("--root", "-r", required=True, type=click.Path(file_okay=False), help=ROOT_HELP)
@click.option("--split", "-s", default=None, help=SPLIT_HELP)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
@click.option(
    "--n",
    "n",
    default=4,
    show_default=True,
    type=click.IntRange(1, 16),
    help="How many pairs (evenly spaced over the split).",
)
@click.option("--option", "-o", "options", multiple=True, metavar="KEY=VALUE", help=OPTION_HELP)
def show_command(
    dataset: str, root: str, split: str | None, out: str, n: int, options: tuple[str, ...]
) -> None:
    """Draw a few pairs, ground image above its aerial tile, titled with their ids.

    A quick look that the pairing is right: the panorama's scene should match the tile
    below it. For VIGOR, a red cross marks where the panorama was taken inside the tile
    (the label's pixel offset). Pairs are evenly spaced over the split.

    \b
    Example:
      benchmark data show -d cvusa -r /data/CVUSA --split test --out cvusa.png --n 6
    """
    path = draw_pairs(load_dataset(dataset, root, split, options), Path(out), n)
    console.print(f"wrote {path}", highlight=False)


def draw_pairs(ds: Any, out: Path, n: int = 4, thumb: int = 640) -> Path:
    """Save a 2 x n grid (ground above aerial) of `n` evenly spaced pairs of `ds`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    if not ds.pairs:
        raise DataError(f"{ds!r} has no pairs to show.")
    n = min(n, len(ds.pairs))
    picks = sorted(set(np.linspace(0, len(ds.pairs) - 1, n).round().astype(int).tolist()))

    def load(path: Path) -> tuple[np.ndarray, float]:
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                scale = min(1.0, thumb / max(image.size))
                size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
                return np.asarray(image.resize(size)), scale
        except Exception as exc:
            raise DataError(
                f"{path}: cannot be read as an image ({type(exc).__name__}: {exc}); run "
                f"`benchmark data check --decode` to list every unreadable file."
            ) from exc

    fig, axes = plt.subplots(
        2,
        len(picks),
        figsize=(4 * len(picks), 5.5),
        squeeze=False,
        gridspec_kw={"height_ratios": [1, 2]},
    )
    for col, i in enumerate(picks):
        pair = ds.pairs[i]
        ground, _ = load(pair.ground)
        aerial, scale = load(pair.aerial)
        axes[0, col].imshow(ground)
        axes[0, col].set_title(f"{pair.id}", fontsize=9)
        axes[1, col].imshow(aerial)
        axes[1, col].set_title(f"aerial: {Path(pair.aerial).stem[:40]}", fontsize=8)
        if pair.offset is not None:  # pixel offset in the tile as distributed
            row, c = pair.offset
            k = aerial.shape[1] / getattr(ds, "tile_size", aerial.shape[1] / scale)
            axes[1, col].plot([c * k], [row * k], "r+", markersize=14, mew=2)
            axes[1, col].set_xlim(-0.5, aerial.shape[1] - 0.5)
            axes[1, col].set_ylim(aerial.shape[0] - 0.5, -0.5)
        for ax in axes[:, col]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{type(ds).__name__} {ds.split}: {len(picks)} of {len(ds.pairs)} pairs")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


@data.command("synth")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder to write the synthetic dataset into (created).",
)
@click.option(
    "--region",
    required=True,
    help="Name of the synthetic region (its terrain, vegetation and building style); "
    "train on one region and test on another for a domain-shift study.",
)
@click.option(
    "--pairs",
    default=200,
    show_default=True,
    type=click.IntRange(1),
    help="Number of ground/aerial pairs to render.",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=int,
    help="Random seed: the same seed gives the same world, byte for byte.",
)
@click.option(
    "--layout",
    default="cvusa",
    show_default=True,
    type=click.Choice(["cvusa", "vigor"]),
    help="On-disk layout to write: cvusa (splits/*.csv, bingmap/, streetview/) or "
    "vigor (<City>/panorama, <City>/satellite, splits/ with offsets).",
)
def synth_command(out: str, region: str, pairs: int, seed: int, layout: str) -> None:
    """Generate a procedural synthetic cross-view world, in a real dataset's layout.

    Needs no download: every command of the harness works on it. The files are written
    in the CVUSA or VIGOR layout, so the real loaders read them and `benchmark data check`
    checks them like any real dataset.

    \b
    Example:
      benchmark data synth --out data/synth-a --region <name> --pairs 200 --seed 0
      benchmark data check -d cvusa -r data/synth-a --split test
    """
    try:
        from gengeo_bench.datasets.synthetic import generate
    except ImportError as exc:
        raise ConfigError(
            f"the synthetic world generator (benchmark.datasets.synthetic.generate) is not "
            f"available in this installation ({exc}); reinstall gengeo-bench."
        ) from exc
    path = generate(Path(out), region=region, pairs=pairs, seed=seed, layout=layout)
    console.print(f"wrote {pairs} {layout}-layout pairs of region {region!r} to {path}", highlight=False)
