"""Where the billed-event index lives in the store, and which of its files count.

One Parquet file per document run and period (transforms/engine/billed_index.py has the columns):

    billing/_state/billed_events/period=P/<run_id>.parquet

A close writes `period=P/<close run>.parquet` (every event_id it billed, +1) before its
manifest, and the manifest names it (`billed_events`: key, size, sha256, events); a backfill
writes `period=P/<backfill run>.parquet` for each period it corrects (the events its documents
start, +1, or stop, -1, billing) before its own manifest, which names them. A file counts only
once its run has committed: a close's when the period's manifest names that run, a backfill's
when its corrections manifest exists. A killed run's file is never read, and its rerun (same run
id, same inputs) writes the same bytes again. The files sit under `_state/` rather than in the
period's folder so that finding them lists a few keys, not every invoice of every period.

A period closed by a billrun without the index has no file: it is not decided, and copies of its
events in the usage objects are still weighed as before (an earlier valid copy makes a later one
a duplicate).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.retries import IO_RETRIES
from flows.store import open_store
from transforms.engine.billed_index import BilledIndex, write_period_changes, write_period_index
from transforms.layout import (
    BILLED_INDEX_PREFIX,
    MANIFEST,
    billed_index_file,
    billed_index_key,
    correction_prefix,
    manifest_key,
)


@dataclass(frozen=True)
class IndexFile:
    key: str
    period: str
    run_id: str


@dataclass(frozen=True)
class CommittedIndex:
    """The committed index files of the store's closed periods, and which periods count.

    `decided`: closed periods with an index; `counted`: those whose billing a usage check must
    respect (all decided periods but the ones a backfill re-rates itself)."""

    uri: str
    files: tuple[IndexFile, ...] = ()
    decided: tuple[str, ...] = ()
    counted: tuple[str, ...] = ()

    def of(self, periods) -> list[IndexFile]:
        wanted = set(periods)
        return [f for f in self.files if f.period in wanted]

    def local(self, cache_dir: Path) -> BilledIndex:
        """The counted periods' files on this machine (a folder store's in place)."""
        files = self.of(self.counted)
        if not files:
            return BilledIndex((), self.counted)
        paths = open_store(self.uri).fetch([f.key for f in files], cache_dir)
        return BilledIndex(tuple((paths[f.key], f.run_id) for f in files), self.counted)


def committed_index(store_uri: str, leave_out=()) -> CommittedIndex:
    """Read the store's index: its files under billing/_state/billed_events/, each kept only if
    its run committed. Reads one manifest per closed period and one existence check per backfill
    file."""
    store = open_store(store_uri)
    by_period: dict[str, list[str]] = {}
    for info in store.list(BILLED_INDEX_PREFIX):
        if found := billed_index_file(info.key):
            by_period.setdefault(found[0], []).append(found[1])
    files, decided = [], []
    for period, runs in sorted(by_period.items()):
        if not store.exists(manifest_key(period)):
            continue
        closed_by = json.loads(store.read_bytes(manifest_key(period))).get("run_id")
        if closed_by not in runs:
            continue  # closed by a billrun without the index: not decided
        decided.append(period)
        files.append(IndexFile(billed_index_key(period, closed_by), period, closed_by))
        for run in sorted(r for r in runs if r.startswith("backfill-")):
            if store.exists(correction_prefix(run) + MANIFEST):
                files.append(IndexFile(billed_index_key(period, run), period, run))
    left_out = {str(p) for p in leave_out}
    return CommittedIndex(store_uri, tuple(files), tuple(decided), tuple(p for p in decided if p not in left_out))


def _entry(key: str, path: Path, events: int) -> dict:
    return {"key": key, "size": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "events": events}


@task(name="index-billed", cache_policy=NO_CACHE, **IO_RETRIES)
def index_billed(scratch_uri: str, billed_keys: list[str], period: str, work_dir: Path) -> tuple[Path, int]:
    """The period's index file from the billed ids its shards wrote, in the local work folder."""
    started = time.perf_counter()
    local = open_store(scratch_uri).fetch(sorted(billed_keys), work_dir / "billed-ids")
    out = work_dir / "billed_events.parquet"
    events = write_period_index([local[k] for k in sorted(billed_keys)], period, out)
    get_run_logger().info("index-billed: %d billed events indexed in %.2fs", events, time.perf_counter() - started)
    return out, events


@task(name="record-billed", cache_policy=NO_CACHE, **IO_RETRIES)
def record_billed(store_uri: str, files: list[tuple[str, Path, int]]) -> list[dict]:
    """Put index files (key, local file, events) into the store, before the manifest that makes
    them count; returns their manifest entries."""
    store = open_store(store_uri)
    entries = []
    for key, path, events in files:
        store.put_file(key, path)
        entries.append(_entry(key, path, events))
    return entries


def correction_index(index: CommittedIndex, period: str, rerated: list[Path], cache_dir: Path, out: Path) -> int:
    """A backfill's index file for one period it corrects: the changes from what the period's
    documents bill now (its committed files) to what the re-rating bills."""
    files = index.of([period])
    paths = open_store(index.uri).fetch([f.key for f in files], cache_dir) if files else {}
    return write_period_changes([paths[f.key] for f in files], rerated, period, out)
