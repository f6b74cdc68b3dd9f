"""The period engine's row-level steps as every flow runs them: usage normalized into shards
once, then settled per period by shard (flows/shards.py, transforms/engine/checked_usage.py), then rated
(transforms/engine/rating.py). The close settles its period through these, and so do backfill,
simulate, impact and preview, so a period is settled one way whichever command asks; nightly settles each night's
objects through them too, and ranks what they bill against earlier nights' copies by the same
rule (transforms/sql/copies.sql).

`period_usage` normalizes a store's usage objects once (a backfill then settles several periods
from the same shard files) and drops the shard files when the block ends.
"""
from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import date, timedelta
from pathlib import Path
from typing import Iterator

import polars as pl

from flows.billed_index import CommittedIndex
from flows.settings import Settings
from flows.shards import (
    SCRATCH_PARQUET,
    Normalized,
    Scratch,
    checked_in_shards,
    drop_scratch,
    local_files,
    normalize_shards,
    scratch_for,
    shard_runner,
)
from flows.store import open_store
from transforms.engine.checked_usage import CheckedFiles
from transforms.inputs.plans import Catalog
from transforms.periods import Period, utc_midnight


@dataclass(frozen=True)
class PeriodUsage:
    """A store's usage objects, normalized into shards, ready to settle any period."""

    runner: object
    scratch: Scratch
    normalized: Normalized                # rows read and objects set aside (paths: none, see `files`)
    shard_keys: dict[int, list[str]]      # shard -> scratch keys of its files
    settings: Settings
    work_dir: Path                        # the run's local work folder: each check's tables go in it
    disjoint: bool = False                # no customer's rows in two shards (flows.shards.normalize_shards)

    def checked(self, reference, catalog: Catalog, period: Period, index: CommittedIndex) -> CheckedFiles:
        """The period settled as the close settles it: each shard on its own, merged. Events
        the counted periods of `index` bill are not billed; the checked usage's `billed_ids` are
        scratch keys (`billed_files` brings them here). Its tables are files in a folder of the
        work folder of their own (no later check writes there), there until the work folder goes."""
        folder = self.work_dir / "checked"
        folder.mkdir(parents=True, exist_ok=True)
        return checked_in_shards(self.runner, self.scratch, self.shard_keys, reference, catalog, period, index,
                                 self.settings, Path(tempfile.mkdtemp(prefix="check-", dir=folder)), self.disjoint)

    def billed_files(self, checked: CheckedFiles, cache_dir: Path) -> list[Path]:
        """The checked usage's billed event_ids as local files (read them before the next period
        is settled: each check writes its shards' files under the same keys)."""
        return self._local(sorted(checked.billed_ids), cache_dir)

    def lineage_files(self, checked: CheckedFiles, cache_dir: Path) -> list[Path]:
        """The checked usage's billed and duplicate rows (checked_usage.sql `lineage`) as local files
        (read them before the next period is settled, as `billed_files`)."""
        return self._local(sorted(checked.lineage), cache_dir)

    def files(self, cache_dir: Path) -> list[Path]:
        """Every normalized shard file, on this machine."""
        return self._local(sorted(k for keys in self.shard_keys.values() for k in keys), cache_dir)

    def through(self, day: date) -> PeriodUsage:
        """The same usage without the rows dated after `day` (as a night of that day takes them
        in; rows without an event time stay: every run that reads them quarantines them)."""
        end = utc_midnight(day + timedelta(days=1))
        store = open_store(self.scratch.uri)
        cut: dict[int, list[str]] = {}
        with tempfile.TemporaryDirectory(prefix="billrun-through-") as tmp:
            for shard, keys in self.shard_keys.items():
                for key, path in zip(keys, self._local(keys, Path(tmp) / "in"), strict=True):
                    frame = pl.read_parquet(path)
                    last = frame["event_at"].max() if frame.height else None
                    if last is not None and last >= end:
                        key = f"through={day}/{key}"
                        local = Path(tmp) / "part.parquet"
                        frame.filter(pl.col("event_at").is_null() | (pl.col("event_at") < end)).write_parquet(
                            local, **SCRATCH_PARQUET)
                        store.put_file(self.scratch.key(key), local)
                    cut.setdefault(shard, []).append(key)
        return replace(self, shard_keys=cut)

    def _local(self, keys: list[str], cache_dir: Path) -> list[Path]:
        return local_files(self.scratch, keys, cache_dir)


@contextmanager
def period_usage(store_uri: str, inputs, work_dir: Path, label: str, settings: Settings,
                 dask_address: str | None = None) -> Iterator[PeriodUsage]:
    """Normalize `inputs.usage` into shards, on this machine's workers (shard files in the work
    folder) or on the Dask cluster at `dask_address` (in a scratch prefix of an S3 store, which
    every worker reads). The runner stays open until the block ends, and the shard files too."""
    with shard_runner(dask_address, settings) as runner:
        scratch = scratch_for(store_uri, work_dir, label, distributed=dask_address is not None)
        try:
            normalized, shard_keys, disjoint = normalize_shards(runner, store_uri, inputs, scratch, settings, work_dir)
            yield PeriodUsage(runner, scratch, normalized, shard_keys, settings, work_dir, disjoint)
        finally:
            drop_scratch(scratch)
