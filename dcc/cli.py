"""Command-line helpers for run.py."""

from __future__ import annotations

import re

# Hydra's override grammar reads 1_8 as the integer 18 (Python-style digit separators), and a config
# group option must be a string; quote split names so that ``split=1_8`` and ``split=1_8,1_4`` work.
_SPLIT = re.compile(r"^(?P<key>[+~]{0,2}split)=(?P<value>.*)$")
_BARE = re.compile(r"(?<![\w'\".])(\d+_\d+)(?![\w'\".])")


def quote_split_overrides(argv: list[str]) -> list[str]:
    out = []
    for arg in argv:
        m = _SPLIT.match(arg)
        out.append(m["key"] + "=" + _BARE.sub(r"'\1'", m["value"]) if m else arg)
    return out
