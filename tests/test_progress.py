"""Progress without a terminal: plain lines (Cell, epoch, step / total, loss, steps/s, ETA), wide tables."""

from __future__ import annotations

from rich.table import Table

from gengeo_bench import progress


def test_plain_lines_at_most_every_n_seconds_and_one_at_the_end(monkeypatch, capsys):
    monkeypatch.setenv("GENGEO_PROGRESS", "0")
    monkeypatch.setenv("GENGEO_LOG_EVERY", "10")
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    with progress.progress_bar("cell-a epoch 2/12", total=6) as advance:
        for step in range(6):
            now[0] += 4.0  # a step takes 4 s
            advance(loss=1.0 / (step + 1))
    lines = capsys.readouterr().err.strip().splitlines()
    # steps end at 4, 8, 12 s (a line: 12 s since the start), 16, 20 (8 s since the last
    # line: none), 24 (the last step: the closing line instead)
    assert lines == ["cell-a epoch 2/12: step 3/6, loss=0.3333, 0.25 steps/s, ETA 12s",
                     "cell-a epoch 2/12: step 6/6, loss=0.1667, 0.25 steps/s, took 24s"]


def test_short_work_stays_out_of_the_log_when_asked(monkeypatch, capsys):
    monkeypatch.setenv("GENGEO_PROGRESS", "0")
    with progress.progress_bar("ground descriptors", total=2, final_line=False) as advance:
        advance()
        advance()
    assert capsys.readouterr().err == ""


def test_tables_in_a_log_are_not_wrapped_at_80_columns(capsys):
    table = Table()
    for i in range(6):
        table.add_column(f"column number {i}")
    table.add_row(*[f"value of cell {i} in the row" for i in range(6)])
    progress.console().print(table)  # stdout is captured: not a terminal
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and max(map(len, lines)) > 80  # one line per row, borders included
