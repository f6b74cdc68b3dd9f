"""The named SQL statements of `transforms/sql/*.sql`.

A file holds statements headed by `-- name: NAME`; values always travel as bound parameters,
never as SQL text.
"""
from __future__ import annotations

import re
from functools import lru_cache
from importlib.resources import files

_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


@lru_cache(maxsize=None)
def statements(filename: str) -> dict[str, str]:
    text = files("transforms").joinpath("sql", filename).read_text(encoding="utf-8")
    parts = _HEADER.split(text)
    return {name: body.strip().rstrip(";") for name, body in zip(parts[1::2], parts[2::2], strict=True)}

