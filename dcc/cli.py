"""Command-line helpers for run.py."""

from __future__ import annotations

from dcc.config import quote_split_overrides  # noqa: F401 - run.py, tests and benchmarks import it from here
