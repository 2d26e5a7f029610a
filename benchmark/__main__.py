"""`python -m benchmark ...` is the `benchmark` command (torchrun uses this form)."""

from benchmark.cli import main

main()
