"""Progress bars for long work (rich): steps/s, ETA and live fields such as the loss.

`with progress_bar("train epoch 1", total=n) as advance: advance(loss=0.3)`. Bars draw on
stderr when it is a terminal and stay silent otherwise (CI logs, tests, pipes), so logs
hold the summary lines only. `GENGEO_PROGRESS=1` forces them on, `0` off.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_console = Console(stderr=True)


def enabled() -> bool:
    forced = os.environ.get("GENGEO_PROGRESS")
    if forced is not None:
        return forced not in ("0", "false", "")
    return sys.stderr.isatty()


@contextlib.contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Callable[..., None]]:
    """Yield `advance(steps=1, **fields)`; fields (e.g. loss=0.31) show beside the bar."""
    if not enabled():
        yield lambda steps=1, **fields: None
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=_console,
        transient=True,
    )
    with progress:
        task = progress.add_task(description, total=total, rate="", info="")

        def advance(steps: int = 1, **fields: float) -> None:
            speed = progress.tasks[0].speed
            info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in fields.items())
            progress.update(task, advance=steps, rate=f"{speed:.2f} it/s" if speed else "",
                            info=info)

        yield advance
