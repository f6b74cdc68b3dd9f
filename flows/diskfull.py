"""A full disk is the operator's to fix, not a bug: it gets one line, never a traceback.

The error comes in several shapes: an OSError with errno ENOSPC (or EDQUOT, a quota), DuckDB's
IOException quoting "No space left on device", and Polars, whose Parquet writer reports a full
disk only as "Invalid thrift: transport error". So an unexpected failure is also checked
against the places billrun writes to (the folder store, the work folder, Prefect's home): when
one of them has (almost) no space left, that is what the line says.
"""
from __future__ import annotations

import errno
import shutil
import tempfile
from pathlib import Path

_FULL = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = ("no space left on device", "disk quota exceeded")
NEARLY_FULL_BYTES = 1 << 20  # below this, no Parquet file or lock can be written with confidence


_watched: dict[str, Path | None] = {"store": None, "prefect_home": None}


def watch_store(store: str | None, prefect_home: Path | None) -> None:
    """The store the command works on and Prefect's folder (PREFECT_HOME, from the command's
    settings): their disks are checked too when something fails."""
    _watched["store"] = Path(store) if store and "://" not in store else None
    _watched["prefect_home"] = prefect_home


def full_disk_message(exc: BaseException) -> str | None:
    """One line saying which disk is full, when `exc` (or an error it came from) is a full disk;
    None otherwise."""
    for current in _chain(exc):
        if isinstance(current, OSError) and current.errno in _FULL:
            where = f" writing {current.filename}" if current.filename else ""
            return f"no space left on the device{where}; free some space and run the command again"
        if any(text in str(current).lower() for text in _FULL_TEXT):
            return f"no space left on the device ({_first_line(current)}); free some space and run the command again"
    for place in _places():
        free = _free_bytes(place)
        if free is not None and free < NEARLY_FULL_BYTES:
            return (f"no space left on the device holding {place} ({free} bytes free; the command failed with "
                    f"{type(exc).__name__}); free some space and run the command again")
    return None


def _chain(exc: BaseException):
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _places() -> list[Path]:
    """The folder store, the work folders' folder and Prefect's home."""
    found = [_watched["store"], Path(tempfile.gettempdir()), _watched["prefect_home"]]
    return [place for place in found if place is not None]


def _free_bytes(place: Path) -> int | None:
    for candidate in (place, *place.parents):  # the store may not exist yet: ask its nearest folder
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
