"""Shared on-disk checks for the real-dataset loaders (CVUSA, CVACT, VIGOR).

Three things every loader needs, written once:

- **Missing files at load time** (`drop_missing`): a pair whose ground or aerial image
  is absent is skipped with a warning and recorded in the manifest as `skipped_missing`,
  so that one lost file (the real CVACT distribution lacks one training pair) does not
  crash an epoch. More than a handful missing means the copy is incomplete: `DataError`
  naming the root, the count, the first few paths and what to fix.
- **`check(decode=False)`** (`DiskDataset.check`): existence of every referenced file;
  image sizes against the registry's `meta.image_size` (`[height, width]` per view) for a
  small sample of files, or for every file with `decode=True`, which also fully decodes
  each image (PIL `verify()` then `load()`) to catch truncated or corrupt files.
- **Formatting** (`summary_lines`, `is_usable`, `split_verdict`): the lines and the
  verdict `benchmark data check` prints. The training split tolerates a few missing files;
  an evaluation split (every split but `train`) does not, since a missing query or
  gallery image makes its results incomparable with published numbers.

Existence is tested against one directory listing per folder (a set lookup per file),
not one `stat` per file: a 92,802-pair split checks in about a second.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from gengeo_bench.datasets.base import CheckReport, CrossViewDataset
from gengeo_bench.errors import DataError

# A split may lose at most this many files (and at most this share of its files, but
# always at least one) before loading refuses with a DataError.
MAX_MISSING = 10
MAX_MISSING_FRACTION = 0.01
# How many files per view `check()` opens for a size check when not decoding everything.
SIZE_SAMPLE = 8
# How many paths a message or summary lists before "...".
SHOW = 5

T = TypeVar("T")


class FileIndex:
    """Existence tests through one cached `os.listdir` per directory."""

    def __init__(self) -> None:
        self._listings: dict[Path, set[str]] = {}

    def listing(self, directory: Path) -> set[str]:
        directory = Path(directory)
        if directory not in self._listings:
            try:
                self._listings[directory] = set(os.listdir(directory))
            except (FileNotFoundError, NotADirectoryError):
                self._listings[directory] = set()
        return self._listings[directory]

    def exists(self, path: Path) -> bool:
        path = Path(path)
        return path.name in self.listing(path.parent)


def first_few(paths: Iterable[Any], n: int = SHOW) -> str:
    """'a, b, c (and 12 more)' for messages."""
    items = [str(p) for p in paths]
    text = ", ".join(items[:n])
    if len(items) > n:
        text += f" (and {len(items) - n} more)"
    return text


def missing_tolerated(n_missing: int, n_files: int) -> bool:
    """True when `n_missing` of `n_files` is few enough to skip those pairs and go on."""
    if n_missing == 0:
        return True
    if n_missing >= n_files:
        return False
    return n_missing <= MAX_MISSING and n_missing <= max(1, int(MAX_MISSING_FRACTION * n_files))


def drop_missing(
    records: list[T],
    files_of: Callable[[T], Iterable[Path]],
    *,
    dataset: str,
    root: Path,
    logger: logging.Logger,
    fix: str,
    index: FileIndex | None = None,
    extra_files: Iterable[Path] = (),
) -> tuple[list[T], list[Path]]:
    """Keep the records whose files all exist; return (kept, sorted missing paths).

    `extra_files` are files the split references outside the records (VIGOR's gallery
    tiles that no query uses): checked and counted too; the caller drops the missing ones.
    A few missing files: the affected records are skipped with a warning. Too many
    (see `missing_tolerated`): `DataError` naming the root, the count, the first few
    paths and `fix` (what the user should do).
    """
    index = index or FileIndex()
    kept: list[T] = []
    missing: set[Path] = set()
    referenced: set[Path] = set()
    for record in records:
        files = list(files_of(record))
        referenced.update(files)
        absent = [f for f in files if not index.exists(f)]
        if absent:
            missing.update(absent)
        else:
            kept.append(record)
    for f in extra_files:
        referenced.add(f)
        if not index.exists(f):
            missing.add(f)
    ordered = sorted(missing)
    if not missing_tolerated(len(ordered), len(referenced)):
        raise DataError(
            f"{dataset} at {root}: {len(ordered)} of {len(referenced)} image files referenced "
            f"by the split are missing (at most {MAX_MISSING} files, and at most "
            f"{MAX_MISSING_FRACTION:.0%} of them, are skipped silently), first ones: "
            f"{first_few(ordered)}. {fix}"
        )
    if ordered:
        logger.warning(
            "%s at %s: %d missing image file(s), skipping %d pair(s): %s",
            dataset,
            root,
            len(ordered),
            len(records) - len(kept),
            first_few(ordered),
        )
    return kept, ordered


def expected_sizes(dataset: str) -> dict[str, tuple[int, int]]:
    """The registry's `meta.image_size` of a dataset as {view: (height, width)}; {} if none."""
    try:
        from gengeo_bench import registry

        sizes = registry.meta("dataset", dataset).get("image_size") or {}
    except Exception:  # no registry entry (a subclass under another name): no size check
        return {}
    return {view: (int(hw[0]), int(hw[1])) for view, hw in sizes.items()}


def inspect_image(path: Path, decode: bool) -> tuple[tuple[int, int] | None, str | None]:
    """((height, width), None) for a readable image, (None, reason) otherwise.

    With `decode`, the file is verified (PIL `verify()`: structure and checksums) and then
    fully decoded (`load()`): a truncated JPEG fails here, not at training time.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
            if decode:
                image.verify()
        if decode:
            with Image.open(path) as image:
                image.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ...
        return None, f"{type(exc).__name__}: {exc}"
    return (height, width), None


def _workers() -> int:
    return max(1, min(8, (os.cpu_count() or 1) * 2))


class DiskDataset(CrossViewDataset):
    """A `CrossViewDataset` read from a real distribution on disk.

    Subclasses fill `pairs`, `skipped_missing` (absolute paths of files skipped at load
    time) and implement `files_by_view()` (every image file the split references, per
    view: `ground`, `aerial`) and `options()` (the constructor options for the manifest).
    """

    def __init__(self, root: str | Path, split: str = "train"):
        super().__init__(root, split)
        self.skipped_missing: list[Path] = []

    # ---- what subclasses may refine -------------------------------------------------------
    def files_by_view(self) -> dict[str, list[Path]]:
        """Every image file the split references, per view (default: the evaluation's)."""
        ev = self.evaluation()
        return {"ground": list(dict.fromkeys(ev.queries)), "aerial": list(dict.fromkeys(ev.gallery))}

    def options(self) -> dict[str, Any]:
        return {}

    # ---- manifest and repr --------------------------------------------------------------
    def _rel(self, path: Path) -> str:
        try:
            return str(Path(path).relative_to(self.root))
        except ValueError:
            return str(path)

    def manifest(self) -> dict:
        out = super().manifest()
        out["options"] = self.options()
        out["skipped_missing"] = [self._rel(p) for p in self.skipped_missing]
        return out

    # ---- check --------------------------------------------------------------------------
    def check(
        self,
        decode: bool = False,
        sizes: dict[str, tuple[int, int]] | None = None,
        size_check: bool = True,
        progress: Callable[[int], None] | None = None,
    ) -> CheckReport:
        """Missing files, and (sampled, or all with `decode`) unreadable or wrongly sized ones.

        `sizes` overrides the registry's `meta.image_size` ({view: (height, width)});
        `size_check=False` skips the size comparison. Without `decode`, only the first
        `SIZE_SAMPLE` files of each view are opened (header only) for the size check;
        with `decode`, every file is fully decoded. `progress(n)` is called as files
        are processed (for a progress bar).
        """
        return check_dataset(self, decode, sizes, size_check, progress)

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.options().items())
        skipped = f", skipped_missing={len(self.skipped_missing)}" if self.skipped_missing else ""
        return (
            f"{type(self).__name__}(split={self.split!r}, pairs={len(self.pairs)}{skipped}"
            f"{extra}, root='{self.root}')"
        )


def check_dataset(
    ds: CrossViewDataset,
    decode: bool = False,
    sizes: dict[str, tuple[int, int]] | None = None,
    size_check: bool = True,
    progress: Callable[[int], None] | None = None,
) -> CheckReport:
    """`DiskDataset.check` for any `CrossViewDataset` (files from `files_by_view()` when
    the dataset has it, else the unique query and gallery images of `evaluation()`)."""
    ev = ds.evaluation()
    if hasattr(ds, "files_by_view"):
        views = ds.files_by_view()
    else:
        views = {
            "ground": list(dict.fromkeys(ev.queries)),
            "aerial": list(dict.fromkeys(ev.gallery)),
        }
    skipped = list(getattr(ds, "skipped_missing", []))
    expected = (sizes if sizes is not None else expected_sizes(ds.name)) if size_check else {}
    report = CheckReport(dataset=ds.name, root=ds.root, split=ds.split)
    report.counts = {"pairs": len(ds.pairs), "queries": len(ev.queries), "gallery": len(ev.gallery)}
    for view, files in views.items():
        report.counts[f"{view} files"] = len(files)
    report.counts["skipped_missing"] = len(skipped)

    index = FileIndex()
    missing = set(skipped)
    to_open: list[tuple[str, Path]] = []
    for view, files in views.items():
        present = []
        for f in files:
            if index.exists(f):
                present.append(f)
            else:
                missing.add(f)
        chosen = present if decode else present[:SIZE_SAMPLE]
        to_open.extend((view, f) for f in chosen)
    report.missing = sorted(missing)

    def work(item: tuple[str, Path]) -> tuple[str, Path, tuple[int, int] | None, str | None]:
        view, path = item
        size, error = inspect_image(path, decode)
        return view, path, size, error

    done = 0
    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        for view, path, size, error in pool.map(work, to_open):
            if error is not None:
                report.unreadable.append((path, error))
            elif view in expected and size != expected[view]:
                report.wrong_size.append((path, expected[view], size))
            done += 1
            if progress is not None:
                progress(done)
    report.counts["decoded" if decode else "opened"] = len(to_open)
    return report


def is_usable(report: CheckReport, skipped: Iterable[Path] = ()) -> bool:
    """Usable = nothing unreadable, wrongly sized or wrong in the layout, and every
    missing file already skipped (tolerated) when the split was loaded."""
    if report.unreadable or report.wrong_size or report.problems:
        return False
    return set(report.missing) <= set(skipped)


def is_evaluation_split(split: str) -> bool:
    """Every split but `train` serves for evaluation (CVACT val and test, the test splits)."""
    return split != "train"


def split_verdict(
    report: CheckReport, skipped: Iterable[Path] = (), allow_missing_eval: bool = False
) -> tuple[bool, list[str]]:
    """(usable, findings) of one split: `is_usable` and `summary_lines`, and in an
    evaluation split any missing file, even one tolerated at load time, makes the split
    unusable unless `allow_missing_eval`; the findings then say why."""
    skipped = list(skipped)
    usable = is_usable(report, skipped)
    lines = summary_lines(report, skipped)
    if not report.missing:
        return usable, lines
    if not is_evaluation_split(report.split):
        if usable:  # then the only finding is the tolerated, skipped files: a warning
            lines = [f"warning: {line}" for line in lines]
        return usable, lines
    why = (f"Split {report.split} serves for evaluation: with a missing query or gallery "
           f"image its results are not comparable with published numbers")
    if allow_missing_eval:
        lines.append(f"warning: {why} (accepted by --allow-missing-eval).")
        return usable, lines
    lines.append(f"{why}; restore the file(s), or pass --allow-missing-eval to accept that.")
    return False, lines


def summary_lines(report: CheckReport, skipped: Iterable[Path] = ()) -> list[str]:
    """Human-readable findings, each with what to do about it."""
    skipped = set(skipped)
    lines = []
    rel = _relative_to(report.root)
    tolerated = [p for p in report.missing if p in skipped]
    untolerated = [p for p in report.missing if p not in skipped]
    if tolerated:
        lines.append(
            f"{len(tolerated)} missing file(s), their pairs skipped (recorded in the manifest "
            f"as skipped_missing): {first_few(rel(p) for p in tolerated)}."
        )
    if untolerated:
        lines.append(
            f"{len(untolerated)} missing file(s): {first_few(rel(p) for p in untolerated)}. "
            f"Restore them from the dataset archive, or point --root at a complete copy."
        )
    if report.unreadable:
        lines.append(
            f"{len(report.unreadable)} unreadable or truncated image(s): "
            f"{first_few(f'{rel(p)} ({why})' for p, why in report.unreadable)}. Re-extract "
            f"or re-download these files (an interrupted copy or extraction truncates them)."
        )
    if report.wrong_size:
        shown = first_few(
            f"{rel(p)} is {got[0]}x{got[1]}, expected {exp[0]}x{exp[1]}"
            for p, exp, got in report.wrong_size
        )
        lines.append(
            f"{len(report.wrong_size)} image(s) of the wrong size (height x width): {shown}. "
            f"Use the original images as distributed, or pass --no-size-check if they were "
            f"resized on purpose (the preprocessing resizes to the backbone's input anyway)."
        )
    lines.extend(report.problems)
    return lines


def _relative_to(root: Path) -> Callable[[Path], str]:
    def rel(path: Path) -> str:
        try:
            return str(Path(path).relative_to(root))
        except ValueError:
            return str(path)

    return rel
