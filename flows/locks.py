"""One run at a time per period, and a fence that keeps a run which lost its lock out of the period.

**Lock.** `billing/_state/locks/period=P.lock`, created with create-if-absent (S3
`If-None-Match: *`, a hard link on a folder), so two runs cannot both hold it. Its body names the
command, machine, process and start time, and carries a random token: a run releases a lock only
if it still holds its own token, so the `finally` of one run never removes another run's lock. A
run that fails releases it; a run that is killed cannot, and its lock stays until someone who
knows the run is dead says so with `billrun unlock --period P`: billrun never guesses that
another machine's run is gone. One exception, certain by construction: a lock whose run's commit
point (its manifest) exists is stale, and the next run removes it.

**Claim and fence.** A lock alone cannot stop a run that was paused (a suspended VM), unlocked
by an operator and resumed: it no longer holds the lock but does not know it. So before its first
write into a period's outputs (`billing/period=P/`, a correction folder, a night's folder), a run
claims the period in `billing/_state/claims/period=P.json` (its run id, token, commit key and
private folders), and every write is preceded by a check no older than `FENCE_SECONDS`: the lock
still holds our token, the claim is still ours, and the commit point does not exist. A run that
takes over another run's claim waits `TAKEOVER_GRACE_SECONDS` (unless that run's process is known
dead) before its own first write, so a check the other run made before the takeover has expired
by then. What remains is a write already on its way when the pause began (README, "Fencing").
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterator

from flows.store import Store, StoreError
from flows.testing_seam import pause_point
from transforms.errors import BillrunError
from transforms.layout import (
    claim_key,
    close_runs_prefix,
    lock_key,
    manifest_key,
    period_of_lock,
    period_prefix,
    run_folder_of,
)
from transforms.periods import Period

FENCE_SECONDS = 2.0
"""How long a fence check is trusted: no write is started later than this after the last check
(a check is three small reads; a long publish makes one every two seconds)."""
TAKEOVER_GRACE_SECONDS = 2 * FENCE_SECONDS + 2.0
"""How long a run that takes over a live run's claim waits before its first write: the other
run's last check has expired, with room for a write it started just before that."""


class PeriodLocked(BillrunError):
    """Another run holds the period."""


class Fenced(BillrunError):
    """This run lost its lock or its claim: it must not write into the period."""


def _read_json(store: Store, key: str) -> dict | None:
    """The JSON object at `key`; None if absent; {} if unreadable (a torn or foreign body)."""
    try:
        body = store.read_bytes(key)
    except StoreError:
        if not store.exists(key):
            return None
        raise
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _process_gone(holder: dict) -> bool:
    """True only when `holder` ran on this machine and its process no longer exists."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _holder_text(holder: dict | None) -> str:
    if not holder:  # unreadable or already gone: still a lock, say what we can
        return "an unknown run"
    where = f"{holder.get('command', 'a run')} on {holder.get('host', '?')} (pid {holder.get('pid', '?')}) " \
            f"since {holder.get('started_at', '?')}"
    if _process_gone(holder):
        where += ", a process that no longer exists on this machine"
    return where


@dataclass(frozen=True)
class Hold:
    """What a run holds: its token and the locks taken with it (sorted by period)."""

    token: str
    periods: tuple[str, ...]
    command: str
    host: str
    pid: int


def _stale(store: Store, key: str, holder: dict | None) -> bool:
    """A lock is stale when the run that holds it passed its commit point: its claim (same token)
    names a commit key that exists. Nothing else makes billrun call a lock stale."""
    if not holder or not holder.get("token"):
        return False
    claim = _read_json(store, claim_key(period_of_lock(key)))
    return bool(claim and claim.get("token") == holder["token"] and claim.get("commit")
                and store.exists(claim["commit"]))


def _release(store: Store, key: str, token: str) -> None:
    """Delete the lock at `key` if it still carries `token`; another run's lock is left alone."""
    holder = _read_json(store, key)
    if holder is not None and holder.get("token") == token:
        store.delete(key)


def warn(message: str) -> None:
    """A warning on the run's log (and the console): something to tidy, not a failure."""
    try:
        from prefect import get_run_logger

        get_run_logger().warning(message)
    except Exception:  # outside a flow run
        logging.getLogger("prefect.billrun").warning(message)


@contextmanager
def period_lock(store: Store, periods: list[Period], command: str, started_at: datetime,
                warnings: list[str] | None = None) -> Iterator[Hold]:
    """Hold the locks of `periods` (in order) for the body; release our own however it ends,
    short of the process being killed. A failure to release never hides the body's error: it
    becomes a line in `warnings` (and the log), the lock stays for `billrun unlock`."""
    hold = Hold(uuid.uuid4().hex, tuple(str(p) for p in sorted(periods)), command, socket.gethostname(), os.getpid())
    body = json.dumps({"command": command, "host": hold.host, "pid": hold.pid, "token": hold.token,
                       "started_at": started_at.astimezone(timezone.utc).isoformat(timespec="seconds")}).encode()
    held: list[str] = []
    try:
        for period in hold.periods:
            key = lock_key(period)
            if not store.put_if_absent(key, body):
                holder = _read_json(store, key)
                if _stale(store, key, holder):
                    _release(store, key, holder["token"])
                    line = (f"{period}: removed the lock of {_holder_text(holder)}, whose run had already "
                            f"published (it ended after its manifest without releasing it)")
                    warn(line)
                    if warnings is not None:
                        warnings.append(line)
                if not store.put_if_absent(key, body):
                    raise PeriodLocked(f"{period} is locked by {_holder_text(_read_json(store, key))}; if that run "
                                       f"is dead, run `billrun unlock --period {period} --store {store.uri}` "
                                       f"and try again")
            held.append(key)
        yield hold
    finally:
        for key in reversed(held):
            try:
                _release(store, key, hold.token)
                _drop_committed_claim(store, period_of_lock(key), hold.token)
            except StoreError as exc:
                line = (f"could not release the lock of {period_of_lock(key)} ({exc}); once this run has ended, "
                        f"run `billrun unlock --period {period_of_lock(key)} --store {store.uri}`")
                warn(line)
                if warnings is not None:
                    warnings.append(line)


def _drop_committed_claim(store: Store, period: str, token: str) -> None:
    """Our claim goes once its commit point exists; an uncommitted claim stays, naming the
    folders of ours the next run must clear."""
    claim = _read_json(store, claim_key(period))
    if claim and claim.get("token") == token and claim.get("commit") and store.exists(claim["commit"]):
        store.delete(claim_key(period))


def unlock(store: Store, period: Period) -> str | None:
    """Remove a period's lock; returns who held it (None if nobody did)."""
    key = lock_key(period)
    if not store.exists(key):
        return None
    holder = _holder_text(_read_json(store, key))
    store.delete(key)
    return holder


def drop_stale(store: Store, period: Period | str) -> None:
    """Remove what a run killed after its commit point left: its lock and its claim."""
    key = lock_key(period)
    holder = _read_json(store, key)
    if _stale(store, key, holder):
        _release(store, key, holder["token"])
    claim = _read_json(store, claim_key(period))
    if claim is not None and claim.get("commit") and store.exists(claim["commit"]) and not claim.get("debris"):
        held = _read_json(store, key)
        if not held or held.get("token") != claim.get("token"):
            store.delete(claim_key(period))


def after_commit(store, prefix: str, listed: set[str], private: str | None) -> list[str]:
    """After the commit point: sweep what the manifest does not list out of the published folder,
    and every run's private files under `private` (this run's and any attempt's of the same
    job, killed or fenced out; None: the run kept none). The result stands whatever happens
    here, so a failure is a warning (running the command again finishes the tidying), never an
    error."""
    try:
        for stray in [o.key for o in store.list(prefix) if o.key not in listed]:
            store.delete(stray)
        runs = {run_folder_of(o.key) for o in store.list(private)} if private else set()
        for folder in sorted(runs):
            store.delete_prefix(folder)
    except StoreError as exc:
        line = f"published, but could not tidy up afterwards ({exc}); run the command again to finish"
        warn(line)
        return [line]
    return []


def tidy_closed(store: Store, period: Period | str, manifest: dict) -> list[str]:
    """A closed period's leftovers of a run that ended after its manifest without tidying up:
    files the manifest does not list, private folders of the period's closes, its lock and
    claim. Never a file the manifest lists."""
    prefix = period_prefix(period)
    listed = {o["key"] for o in manifest["outputs"]} | {manifest_key(period)}
    warnings = after_commit(store, prefix, listed, close_runs_prefix(period))
    try:
        drop_stale(store, period)
    except StoreError as exc:
        warnings.append(f"could not remove the stale lock of {period}: {exc}")
    return warnings


def lock_state(store: Store, period: str) -> str | None:
    """'held' or 'stale' (its run passed its commit point) for a locked period, else None."""
    key = lock_key(period)
    holder = _read_json(store, key)
    if holder is None:
        return None
    return "stale" if _stale(store, key, holder) else "held"


def _elapsed_clock() -> float:
    # The boot-time clock keeps counting while the machine sleeps (a suspended VM), where the
    # monotonic clock stops; the wall clock is taken as well, so that a jump forward counts too.
    return time.clock_gettime(time.CLOCK_BOOTTIME) if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic()


class Fence:
    """The writes of one run into the outputs of the periods it holds, kept to the time the run
    provably owns them. `claim` before the first write; `ensure()` before each write (cheap while
    the last check is fresh). Thread-safe: parallel uploads share one fence."""

    def __init__(self, store: Store, hold: Hold, run_id: str, commit: str, scratch: list[str]) -> None:
        self.store, self.hold, self.run_id, self.commit, self.scratch = store, hold, run_id, commit, list(scratch)
        self._checked: tuple[float, float] | None = None
        self._mutex = threading.Lock()

    def _body(self, debris: list[str], released: bool = False) -> bytes:
        return json.dumps({"run_id": self.run_id, "token": self.hold.token, "command": self.hold.command,
                           "host": self.hold.host, "pid": self.hold.pid, "commit": self.commit,
                           "scratch": self.scratch, "debris": sorted(set(debris)), "released": released},
                          indent=1).encode()

    def claim(self) -> list[str]:
        """Claim every held period for this run; returns the folders earlier attempts left (see
        `clear`). Taking over the claim of a run that may still be alive waits until any check
        that run made has expired."""
        self._check_locks_and_commit()
        debris: list[str] = []
        wait = False
        for period in self.hold.periods:
            key = claim_key(period)
            other = _read_json(self.store, key)
            if other is not None and other.get("token") == self.hold.token:
                debris += other.get("debris", [])
                if other.get("released"):  # a retry of ours after a failure: writing again
                    self.store.put_bytes(key, self._body(other.get("debris", [])))
                continue
            if other is None and self.store.put_if_absent(key, self._body([])):
                continue
            other = _read_json(self.store, key) or {}
            committed = bool(other.get("commit")) and self.store.exists(other["commit"])
            inherited = list(other.get("debris", [])) + [
                s for s in other.get("scratch", []) if not (committed and other["commit"].startswith(s))]
            debris += inherited
            self.store.put_bytes(key, self._body(inherited))
            wait = wait or not (committed or other.get("released") or _process_gone(other))
        if wait:  # that run may be paused between a check and a write: let its check expire first
            time.sleep(TAKEOVER_GRACE_SECONDS)
        self.ensure(force=True)
        return sorted({d for d in debris if d not in self.scratch})

    def clear(self, debris: list[str]) -> None:
        """Delete the folders earlier attempts left (fenced), then forget them in the claims."""
        if not debris:
            return
        for prefix in debris:
            self.ensure()
            self.store.delete_prefix(prefix)
        for period in self.hold.periods:
            self.ensure()
            self.store.put_bytes(claim_key(period), self._body([]))

    def _check_locks_and_commit(self) -> None:
        if self.store.exists(self.commit):
            raise Fenced(f"{self.commit} was written by another run while this run ({self.run_id}) was paused; "
                         f"it writes nothing more")
        for period in self.hold.periods:
            lock = _read_json(self.store, lock_key(period))
            if not lock or lock.get("token") != self.hold.token:
                now = f"now held by {lock.get('command', 'another run')}" if lock else "now held by nobody"
                raise Fenced(f"{period}: this run ({self.run_id}) lost its lock while it was paused (removed with "
                             f"`billrun unlock`, {now}); it writes nothing more")

    def ensure(self, force: bool = False) -> None:
        """Raises Fenced unless a check no older than FENCE_SECONDS found the locks and claims
        ours and the commit point absent; checks again when the last one is older."""
        with self._mutex:
            now = (_elapsed_clock(), time.time())
            if not force and self._checked and all(0 <= n - c < FENCE_SECONDS
                                                   for n, c in zip(now, self._checked, strict=True)):
                return
            self._checked = None
            self._check_locks_and_commit()
            for period in self.hold.periods:
                claim = _read_json(self.store, claim_key(period))
                if not claim or claim.get("token") != self.hold.token:
                    who = (claim or {}).get("run_id", "another run")
                    raise Fenced(f"{period} was taken over by {who} while this run ({self.run_id}) was paused; "
                                 f"it writes nothing more")
            self._checked = now  # trusted from before the reads: the conservative start
        pause_point("fence-checked")

    def guard(self, store: Store) -> Store:
        """`store` with every write preceded by `ensure()`: for a step that writes a few files."""
        return _Guarded(store, self)

    def release(self) -> None:
        """After a failure: our claims say this run writes no more, so the next run takes them
        over at once (and clears our private folders; a retry of ours still finds them). A run
        that was taken over deletes its own private folders (named by its token, so nobody
        else's): it may have staged files after the run that took over cleared them."""
        ours = False
        for period in self.hold.periods:
            claim = _read_json(self.store, claim_key(period))
            if claim and claim.get("token") == self.hold.token:
                ours = True
                self.store.put_bytes(claim_key(period), self._body(claim.get("debris", []), released=True))
        if not ours:
            for prefix in self.scratch:
                if self.hold.token in prefix:
                    self.store.delete_prefix(prefix)


class _Guarded:
    """A store whose writes each wait for a fresh fence check (see Fence.guard); reads pass."""

    _WRITES = frozenset({"put_bytes", "put_file", "put_files", "put_if_absent", "copy", "copy_many",
                         "move_prefix", "delete", "delete_prefix", "local_folder"})

    def __init__(self, store: Store, fence: Fence) -> None:
        self._store, self._fence = store, fence

    def __getattr__(self, name: str):
        attribute = getattr(self._store, name)
        if name not in self._WRITES:
            return attribute

        def fenced(*args, **kwargs):
            self._fence.ensure()
            return attribute(*args, **kwargs)
        return fenced
