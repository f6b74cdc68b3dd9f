"""One run at a time per period, and the test hook that kills a run where it stands.

A lock is an object created with create-if-absent (S3 `If-None-Match: *`, a hard link on a
folder), so two runs cannot both hold it. A run that fails releases it; a run that is killed
cannot, and its lock stays until someone who knows the run is dead says so with
`billrun unlock --period P`: billrun never guesses that another machine's run is gone.
"""
from __future__ import annotations

import json
import os
import signal
import socket
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Iterator

from flows.store import Store
from transforms.errors import BillrunError
from transforms.periods import Period

FAULT_ENV = "BILLRUN_FAULT_AT"


class PeriodLocked(BillrunError):
    """Another run holds the period."""


def lock_key(period: Period | str) -> str:
    return f"billing/_state/locks/period={period}.lock"


def _holder_text(store: Store, key: str) -> str:
    try:
        holder = json.loads(store.read_bytes(key))
    except Exception:  # unreadable or already gone: still a lock, say what we can
        return "an unknown run"
    where = f"{holder.get('command', 'a run')} on {holder.get('host', '?')} (pid {holder.get('pid', '?')}) " \
            f"since {holder.get('started_at', '?')}"
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            where += ", a process that no longer exists on this machine"
        except PermissionError:
            pass
    return where


@contextmanager
def period_lock(store: Store, periods: list[Period], command: str, started_at: datetime) -> Iterator[None]:
    """Hold the locks of `periods` (in order) for the body; release them however it ends,
    short of the process being killed."""
    held: list[str] = []
    body = json.dumps({"command": command, "host": socket.gethostname(), "pid": os.getpid(),
                       "started_at": started_at.astimezone(timezone.utc).isoformat(timespec="seconds")}).encode()
    try:
        for period in sorted(periods):
            key = lock_key(period)
            if not store.put_if_absent(key, body):
                raise PeriodLocked(f"{period} is locked by {_holder_text(store, key)}; if that run is dead, "
                                   f"run `billrun unlock --period {period} --store {store.uri}` and try again")
            held.append(key)
        yield
    finally:
        for key in reversed(held):
            store.delete(key)


def unlock(store: Store, period: Period) -> str | None:
    """Remove a period's lock; returns who held it (None if nobody did)."""
    key = lock_key(period)
    if not store.exists(key):
        return None
    holder = _holder_text(store, key)
    store.delete(key)
    return holder


def fault_point(name: str) -> None:
    """Tests set BILLRUN_FAULT_AT=<name> to kill the run right here, as SIGKILL or a power cut
    would: no cleanup, no finally. Nothing else reads this variable."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
