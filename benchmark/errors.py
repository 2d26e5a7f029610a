"""Error types the CLI turns into one-paragraph messages and exit codes.

`ConfigError` is a usage or configuration mistake: caught before work starts, printed
without a traceback, exit status 2. `DataError` is a dataset that is missing or broken
on disk (also exit 2: the user has to fix a path or a file). `WeightsError` is a
pretrained weight file that cannot be found offline.
"""

from __future__ import annotations


class BenchmarkError(Exception):
    """Base class: an error whose message is meant for the user, not a traceback."""

    exit_code = 1


class ConfigError(BenchmarkError, ValueError):
    """A YAML file, CLI option or plugin parameter is wrong. Exit status 2."""

    exit_code = 2


class DataError(BenchmarkError):
    """A dataset file is missing, unreadable or in the wrong format. Exit status 2."""

    exit_code = 2


class WeightsError(BenchmarkError):
    """Pretrained weights were asked for but cannot be loaded (offline, missing file)."""

    exit_code = 2


class TrainingError(BenchmarkError):
    """A run stopped for a reason the user should read (NaN loss, diverged)."""

    exit_code = 1
