"""`python -m gengeo_bench ...` is the `benchmark` command (torchrun uses this form)."""

from gengeo_bench.cli import main

main()
