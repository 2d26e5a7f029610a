"""Progress for long work: rich bars on a terminal, plain log lines everywhere else.

`with progress_bar("cell-a epoch 1/12", total=n) as advance: advance(loss=0.3)`.

- On a terminal (stderr is a TTY) a bar shows steps/s, the fields (e.g. the loss) and the
  ETA, and disappears when done.
- Without one (Ray tasks, SLURM, nohup, CI, pipes) a bar would print nothing for the
  whole length of a Cell, so plain lines go to stderr instead: one at most every
  `GENGEO_LOG_EVERY` seconds (default 30) while the work runs and one when it ends, e.g.
  `cell-a epoch 3/12: step 40/47, loss=2.31, 1.85 steps/s, ETA 4s`.

`GENGEO_PROGRESS=1` forces bars, `0` forces plain lines. `console()` gives the rich
console every command prints its tables with: without a terminal it is wide enough that
tables are not wrapped at 80 columns into unreadable logs.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
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

LOG_WIDTH = 200  # columns of tables printed into logs


def is_terminal() -> bool:
    """Whether progress draws bars (a terminal, or GENGEO_PROGRESS=1) or prints lines."""
    forced = os.environ.get("GENGEO_PROGRESS")
    if forced is not None:
        return forced not in ("0", "false", "")
    return sys.stderr.isatty()


def console(stderr: bool = False) -> Console:
    """A rich console: the terminal's width on a terminal, LOG_WIDTH columns in a log."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else LOG_WIDTH
    return Console(stderr=stderr, width=width, highlight=False)


def log_every() -> float:
    try:
        return max(0.0, float(os.environ.get("GENGEO_LOG_EVERY", "30")))
    except ValueError:
        return 30.0


def log_line(text: str) -> None:
    """One plain progress line on stderr (flushed: logs are read while work runs)."""
    print(text, file=sys.stderr, flush=True)


def _fields(fields: dict[str, object]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, final_line: bool = True
                 ) -> Iterator[Callable[..., None]]:
    """Yield `advance(steps=1, **fields)`; fields (e.g. loss=0.31) show beside the bar or line.

    `final_line=False`: without a terminal, print the closing line only when the work was
    long enough to print progress lines (short steps, such as embedding a few images,
    stay out of the log).
    """
    if not is_terminal():
        with _plain_lines(description, total, final_line) as advance:
            yield advance
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
        console=Console(stderr=True),
        transient=True,
    )
    with progress:
        task = progress.add_task(description, total=total, rate="", info="")

        def advance(steps: int = 1, **fields: float) -> None:
            speed = progress.tasks[0].speed
            progress.update(task, advance=steps, rate=f"{speed:.2f} it/s" if speed else "",
                            info=_fields(fields))

        yield advance


@contextlib.contextmanager
def _plain_lines(description: str, total: int | None, final_line: bool) -> Iterator[Callable[..., None]]:
    start = last = time.monotonic()
    done = printed = 0
    latest: dict[str, object] = {}
    every = log_every()

    def line(final: bool) -> str:
        elapsed = time.monotonic() - start
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"step {done}/{total}" if total else f"step {done}"]
        if latest:
            parts.append(_fields(latest))
        parts.append(f"{rate:.2f} steps/s")
        if final:
            parts.append(f"took {_duration(elapsed)}")
        elif total and rate > 0:
            parts.append(f"ETA {_duration((total - done) / rate)}")
        return f"{description}: {', '.join(parts)}"

    def advance(steps: int = 1, **fields: float) -> None:
        nonlocal done, last, printed
        done += steps
        latest.update(fields)
        now = time.monotonic()
        if every and now - last >= every and (not total or done < total):
            last, printed = now, printed + 1
            log_line(line(final=False))

    yield advance
    if final_line or printed:
        log_line(line(final=True))
