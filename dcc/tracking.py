"""Compatibility: dcc/data/digits_pretrain.py still imports ``_file_lock`` from here. The tracking module is
:mod:`dcc.engine.tracking`, its public lock :func:`dcc.engine.tracking.file_lock`; once that import reads
``from dcc.engine.tracking import file_lock``, delete this file."""

from dcc.engine.tracking import file_lock as _file_lock  # noqa: F401
