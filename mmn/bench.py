"""``mmn bench``: the command.  What it measures, and how, is the benchmark
suite, :mod:`benchmarks.suite` (also ``python -m benchmarks.suite``)."""

from __future__ import annotations

from benchmarks.suite import add_arguments, run_command

__all__ = ["add_arguments", "run_command"]
