"""The close's row-level work, in shards: normalize per batch of objects, settle per shard.

Every usage row goes to one of N shards by a hash of its customer_id, so a customer's days and
subscription segments are settled in one shard; the few event_ids with copies in two shards (under
customers of two shards) are found by one pass over the rows' 64-bit event_id hashes and their
rows gathered into one shard (`cross_shard_copies`, `gather_copies`), so all copies of an event
(in this period and in earlier ones) meet in one shard and deduplication never crosses shards.
A shard far larger than the others (a very large customer's) is then cut into parts by event_id
hash (`oversized_shards`, `split_shard`): its copies still meet in one part.
A shard is settled on its own DuckDB connection with a memory cap (it spills rather than grows),
and their results, Parquet files in the scratch area, are merged (`transforms.engine.checked_usage.merged_files`)
into exactly what one check of all rows gives: when no rows were gathered or cut apart, the
shards' units are only put in order, not added up again. N only changes memory and parallelism, never a byte of output.

Normalized shard files live in a scratch area addressed as a store: the close's local work
folder, or, when tasks run on a Dask cluster and the store is on S3, a prefix of the store under
`billing/_state/work/`, so that every worker reads what the others wrote.
"""
from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import duckdb
import polars as pl
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows.billed_index import CommittedIndex
from flows.ingest import normalized_object
from flows.retries import IO_RETRIES
from flows.settings import DEFAULT_SHARD_MEMORY, MAX_SHARDS, Settings
from flows.store import LocalStore, open_store
from transforms.engine.checked_usage import COPIES_SQL, DISJOINT, SUMMED, CheckedFiles, checked_usage, merged_files
from transforms.engine.lineage import bucket_bounds
from transforms.errors import InputError
from transforms.inputs.plans import Catalog
from transforms.inputs.reference import segments_frame
from transforms.layout import work_prefix
from transforms.periods import Period
from transforms.queries import statements

SCRATCH_PARQUET = {"compression": "lz4", "statistics": True}
"""Shard files live minutes and are read once: lz4 writes and reads them about twice as cheaply
in CPU as zstd, for 1.7x the bytes. Statistics stay: they let a check skip the files of
other months by event time."""
LOCAL_SCRATCH_PARQUET = {"compression": "uncompressed", "statistics": True}
"""Shard files in the close's local work folder cross no network: uncompressed, they cost about
a third less CPU to write than lz4 (0.34 against 0.51 CPU s per million rows) and a little less
to read, for 1.8x the bytes on the local disk (about 100 MB per million rows, for minutes)."""

SHARD_INPUT_BYTES = 24 * 1024 * 1024
"""Input bytes per shard: about a million Parquet rows, three times fewer as CSV or JSON."""
BATCH_INPUT_BYTES = 64 * 1024 * 1024
"""Input bytes per normalize task: few, coarse tasks (a task run costs 5-15 ms in Prefect)."""



def shard_count(usage_bytes: int, settings: Settings) -> int:
    """How many shards for this much input: the settings' (BILLRUN_SHARDS) if set, else one per 24 MB."""
    if settings.shards is not None:
        return settings.shards
    return max(1, min(MAX_SHARDS, math.ceil(usage_bytes / SHARD_INPUT_BYTES)))


def batches(objects: list, max_bytes: int = BATCH_INPUT_BYTES, min_batches: int = 1) -> list[list]:
    """Consecutive runs of `objects` (sorted by key) of about `max_bytes` each, and at least
    `min_batches` of them when there are enough objects (so every core has work)."""
    if not objects:
        return []
    total = sum(o.size for o in objects)
    count = max(min(len(objects), min_batches), math.ceil(total / max_bytes))
    target = total / count
    out, current, filled = [], [], 0
    for obj in objects:
        current.append(obj)
        filled += obj.size
        if filled >= target * (len(out) + 1) and len(out) < count - 1:
            out.append(current)
            current = []
    if current:
        out.append(current)
    return out


class Opaque:
    """A value handed to a task as it is: the period's reference data every shard checks against
    (100k subscriptions and their segments, the catalog, the billed-event index). Task runners
    walk their parameters looking for futures (and rebuild what they walk), and Prefect's
    `quote()` does not survive the Dask runner's walk. They do not look inside this. What the
    shard tasks take and return otherwise is small: keys of scratch files, and counts."""

    __slots__ = ("value",)

    def __init__(self, value) -> None:
        self.value = value


@dataclass(frozen=True)
class Normalized:
    paths: tuple[Path, ...]  # local files (the nightly run's); the close's shards are in scratch
    unreadable: tuple[tuple[str, str], ...]  # (key, why)
    rows: int


@dataclass(frozen=True)
class Scratch:
    """Where shard files go: a store URI and a key prefix in it."""

    uri: str
    prefix: str

    def key(self, name: str) -> str:
        return self.prefix + name


@dataclass(frozen=True)
class NormalizedBatch:
    shard_keys: dict[int, list[str]]  # shard -> scratch keys of its files
    unreadable: list[tuple[str, str]]  # (object key, why)
    rows: int
    hash_keys: list[str]  # scratch keys of the rows' (event_hash, shard) files, for `cross_shard_copies`
    shard_rows: dict[int, int] = field(default_factory=dict)  # shard -> rows written to it


def shard_name(shard: int) -> str:
    return f"normalized/shard={shard:04d}/"


HASHES = "hashes/"
"""Scratch folder of the normalized rows' event_id hashes and shards (`cross_shard_copies` reads them)."""


def customer_shard(shards: int) -> pl.Expr:
    """A row's shard: a hash of its customer_id, so that a customer's rows, days and subscription
    segments are settled in one shard and the shards' per-day units never need adding up again."""
    return (pl.col("customer_id").hash(seed=0) % shards).cast(pl.Int32)


def event_hash() -> pl.Expr:
    """A row's event_id as a 64-bit hash: what finds the event_ids with copies in two shards. A
    hash only gathers copies into one shard; they are told apart there by event_id itself."""
    return pl.col("event_id").hash(seed=0)


def _write(scratch_store, key: str, frame: pl.DataFrame) -> None:
    if isinstance(scratch_store, LocalStore):  # scratch needs no fsync: a killed close starts over
        path = scratch_store.root.joinpath(*key.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.write_parquet(path, **LOCAL_SCRATCH_PARQUET)
        return
    with tempfile.TemporaryDirectory(prefix="billrun-shard-") as tmp:
        local = Path(tmp) / "part.parquet"
        frame.write_parquet(local, **SCRATCH_PARQUET)
        scratch_store.put_file(key, local)


def _in_place(scratch_store, key: str) -> Path | None:
    """The file a scratch key is in when the scratch area is the local work folder (written there
    straight away, not copied in after), else None."""
    folder, name = key.rsplit("/", 1)
    in_place = scratch_store.local_folder(folder + "/")
    return in_place / name if in_place else None


def _local_copy(store_uri: str, obj, cache_dir: Path) -> Path:
    """The object's bytes on this machine: the file fetch-inputs made if this is its machine,
    else fetched again and checked against the hash the close recorded."""
    if obj.path.is_file():
        return obj.path
    path = open_store(store_uri).fetch([obj.key], cache_dir)[obj.key]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != obj.sha256:
        raise InputError(f"{obj.key}: changed while the close was running (sha256 {digest[:12]}, "
                         f"was {obj.sha256[:12]}); run the close again")
    return path


@task(name="normalize-usage", cache_policy=NO_CACHE, **IO_RETRIES)
def normalize_batch(store_uri: str, objects: list, scratch: Scratch, shards: int) -> NormalizedBatch:
    """Each object of the batch (a few input objects: keys, hashes, paths) read, validated and
    normalized (transforms.inputs.usage), its rows split into shards by a hash of customer_id, with
    a file of their event_id hashes and shards (`HASHES`); an object that cannot be read is set
    aside whole."""
    started = time.perf_counter()
    scratch_store = open_store(scratch.uri, create=True)
    shard_keys: dict[int, list[str]] = {}
    shard_rows: dict[int, int] = {}
    unreadable, rows, hash_keys = [], 0, []
    with tempfile.TemporaryDirectory(prefix="billrun-fetch-") as tmp:
        for obj in objects:
            path = _local_copy(store_uri, obj, Path(tmp))
            frame, why = normalized_object(path, obj.key)
            if frame is None:  # a corrupt object is data, not a crash: quarantine it whole
                unreadable.append((obj.key, why))
                continue
            rows += frame.height
            name = f"{obj.sha256}-{hashlib.sha256(obj.key.encode()).hexdigest()[:16]}.parquet"
            keyed = frame.with_columns(customer_shard(shards).alias("_shard"))
            for (shard,), part in keyed.partition_by("_shard", as_dict=True, maintain_order=True).items():
                key = scratch.key(shard_name(int(shard)) + name)
                _write(scratch_store, key, part.drop("_shard"))
                shard_keys.setdefault(int(shard), []).append(key)
                shard_rows[int(shard)] = shard_rows.get(int(shard), 0) + part.height
            if shards > 1:  # one shard holds every copy: nothing to find
                key = scratch.key(HASHES + name)
                _write(scratch_store, key, keyed.filter(pl.col("event_id").is_not_null()).select(
                    event_hash().alias("event_hash"), pl.col("_shard").alias("shard")))
                hash_keys.append(key)
    get_run_logger().info("normalize-usage: %d objects, %d rows, %d unreadable in %.2fs", len(objects), rows,
                          len(unreadable), time.perf_counter() - started)
    return NormalizedBatch(shard_keys, unreadable, rows, hash_keys, shard_rows)


@task(name="check-usage", cache_policy=NO_CACHE)
def check_shard(scratch: Scratch, shard: int, keys: list[str], context: Opaque, period: Period,
                memory_limit: str, check: str, part: str | None = None) -> CheckedFiles:
    """One shard scoped, checked, deduplicated and aggregated in DuckDB, spilling past `memory_limit`
    (the close's BILLRUN_DUCKDB_MEMORY, also on a Dask worker).
    Events the billed-event index shows billed in another closed period are not billed; the
    shard's billed event_ids go to the scratch area (`billed/`), for the period's index.
    The checked usage's tables go to the scratch area too (`checked/<check>/shard=N/`), and what
    comes back is their keys and the counts: Prefect keeps every task run's result until the
    flow ends, and the shards' tables together are as large as the merged checked usage.
    `part`: how other shards are merged with this one (`checked_usage`), None when it is alone.
    Not retried: the check is pure work that fails the same way twice, and its reads and
    writes of the scratch store carry the store's own retries (botocore's, on S3)."""
    started = time.perf_counter()
    reference, catalog, index, segments, bounds = context.value
    scratch_store = open_store(scratch.uri, create=True)
    prefix = scratch.key(f"checked/{check}/shard={shard:04d}/")
    # the lineage rows: one file, or, split by ranges of customers (`bounds`), a folder of files
    lineage_key = scratch.key(f"lineage/shard={shard:04d}" + ("/" if bounds else ".parquet"))
    billed_key = scratch.key(f"billed/shard={shard:04d}.parquet")
    with tempfile.TemporaryDirectory(prefix=f"billrun-shard{shard:04d}-") as tmp:
        local = dict(zip(sorted(keys), local_files(scratch, sorted(keys), Path(tmp) / "in"), strict=True))
        lineage_to = (_in_place(scratch_store, lineage_key.rstrip("/"))
                      or Path(tmp) / ("lineage" if bounds else "lineage.parquet"))
        billed_out = _in_place(scratch_store, billed_key) or Path(tmp) / "billed.parquet"
        spill = Path(tmp) / "spill"
        spill.mkdir()
        in_place = scratch_store.local_folder(prefix)  # the work folder: the tables are written where they stay
        tables_to = in_place or Path(tmp) / "checked"
        con = duckdb.connect(config={"temp_directory": str(spill),
                                     "memory_limit": memory_limit,
                                     "preserve_insertion_order": False})
        try:
            checked = checked_usage(con, [local[k] for k in sorted(keys)], reference.customers,
                                    list(reference.subscriptions), segments, catalog, period,
                                    tables_to, index.local(Path(tmp) / "index"), billed_out,
                                    lineage_to=lineage_to, part=part, lineage_bounds=bounds)
        finally:
            con.close()
        # each lineage file's key: the file's path under `lineage_to`, under the lineage key
        lineage_keys = [lineage_key if not bounds else
                        lineage_key + Path(path).relative_to(lineage_to).as_posix() for path in checked.lineage]
        if lineage_to.is_relative_to(Path(tmp)):
            scratch_store.put_files(list(zip(lineage_keys, map(Path, checked.lineage), strict=True)))
        if billed_out.parent == Path(tmp):
            scratch_store.put_file(billed_key, billed_out)
        tables = {name: prefix + Path(path).name for name, path in checked.tables.items()}
        if in_place is None:
            scratch_store.put_files([(tables[name], Path(path)) for name, path in checked.tables.items()])
    c = checked.counts
    get_run_logger().info("check-usage: shard %d: read %d, billed %d, duplicates %d, quarantined %d in %.2fs",
                          shard, c["read"], c["billed"], c["duplicates"], c["quarantined"],
                          time.perf_counter() - started)
    return CheckedFiles(dict(c), tables, lineage=tuple(lineage_keys), billed_ids=(billed_key,), lineage_bounds=bounds)


def local_workers(settings: Settings) -> int:
    """Threads for the shard tasks on this machine: the settings' (BILLRUN_WORKERS), else one per core."""
    return settings.workers or os.cpu_count() or 1


@contextmanager
def shard_runner(dask_address: str | None, settings: Settings) -> Iterator:
    """The task runner of the shard steps: a Dask cluster's, or a small thread pool."""
    if dask_address:
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:  # pragma: no cover - a dependency of billrun
            raise InputError("--dask needs the prefect-dask package; install billrun with its dependencies") from None
        runner = DaskTaskRunner(address=dask_address)
    else:
        runner = ThreadPoolTaskRunner(max_workers=local_workers(settings))
    try:
        runner.__enter__()
    except OSError as exc:  # only connecting is the scheduler's fault; errors of the work are not
        raise InputError(f"Dask scheduler {dask_address}: cannot connect ({exc})") from None
    try:
        yield runner
    finally:
        runner.__exit__(None, None, None)


def scratch_for(store_uri: str, work_dir: Path, label: str, distributed: bool) -> Scratch:
    """The close's work folder, or, on a cluster with an S3 store, a prefix of the store that
    every worker can reach (a local store is shared only by workers on this machine)."""
    if distributed and store_uri.startswith("s3://"):
        return Scratch(store_uri, work_prefix(label))
    folder = work_dir / "scratch"
    folder.mkdir(parents=True, exist_ok=True)
    return Scratch(str(folder), "")


def drop_scratch(scratch: Scratch) -> None:
    """Shard files are not needed once settled (a rerun normalizes again)."""
    if scratch.prefix:
        open_store(scratch.uri).delete_prefix(scratch.prefix)


def _all(runner, task_, calls: list[dict]) -> list:
    futures = [runner.submit(task_, params) for params in calls]
    return [future.result() for future in futures]


def normalize_shards(runner, store_uri: str, inputs, scratch: Scratch, settings: Settings,
                     work_dir: Path) -> tuple[Normalized, dict[int, list[str]], bool]:
    """Every usage object normalized into shards, in batches spread over the runner's workers;
    then the copies of an event_id that are in two shards gathered into one (`cross_shard_copies`).
    Then the shards far above the mean are cut into parts (`oversized_shards`). Also returns
    whether the shards are disjoint by customer (no rows were gathered or cut apart), so that their
    per-day units need no adding up when they are merged."""
    shards = shard_count(sum(o.size for o in inputs.usage), settings)
    work = batches(sorted(inputs.usage, key=lambda o: o.key), min_batches=2 * local_workers(settings))
    done = _all(runner, normalize_batch, [{"store_uri": store_uri, "objects": b, "scratch": scratch,
                                           "shards": shards} for b in work])
    by_shard: dict[int, list[str]] = {}
    for batch in done:
        for shard, keys in batch.shard_keys.items():
            by_shard.setdefault(shard, []).extend(keys)
    normalized = Normalized((), tuple(u for b in done for u in b.unreadable), sum(b.rows for b in done))
    shard_keys = {k: sorted(v) for k, v in sorted(by_shard.items())}
    hash_keys = sorted(k for b in done for k in b.hash_keys)
    cross, moving = cross_shard_copies(scratch, hash_keys, work_dir / "hashes", settings)
    if cross.height:
        gathered = _all(runner, gather_copies, [{"scratch": scratch, "shard": shard, "keys": shard_keys[shard],
                                                 "cross": Opaque(cross)} for shard in moving])
        for shard, moved in zip(moving, gathered, strict=True):
            shard_keys[shard] = []
            for target, key in moved.items():
                shard_keys.setdefault(target, []).append(key)
        shard_keys = {k: sorted(v) for k, v in sorted(shard_keys.items())}
    rows: dict[int, int] = {}
    for batch in done:
        for shard, count in batch.shard_rows.items():
            rows[shard] = rows.get(shard, 0) + count
    split = oversized_shards(rows, shards)
    if split:
        first_new = shards
        calls = []
        for shard, parts in split.items():
            calls.append({"scratch": scratch, "shard": shard, "keys": shard_keys[shard],
                          "targets": [shard, *range(first_new, first_new + parts - 1)]})
            first_new += parts - 1
        for call, moved in zip(calls, _all(runner, split_shard, calls), strict=True):
            shard_keys[call["shard"]] = []
            for target, key in moved.items():
                shard_keys.setdefault(target, []).append(key)
        shard_keys = {k: sorted(v) for k, v in sorted(shard_keys.items())}
    return normalized, shard_keys, cross.height == 0 and not split


LARGE_SHARD = 2.0
"""A shard with more than this many times the mean rows of a shard is split (`oversized_shards`)."""


def oversized_shards(rows: dict[int, int], shards: int) -> dict[int, int]:
    """The shards to split, and into how many parts each: those holding more than LARGE_SHARD
    times a shard's mean share of the rows. Shards follow customers, and a customer with a large
    share of a month's events (the top customer of a Zipf month holds 8% of them) makes its shard
    that large: checked on one connection, it keeps one core busy long after the others are done.
    Its parts are cut by event_id hash, so every copy of an event stays in one; the customer's
    units are then added up across shards by the merge."""
    if shards <= 1 or not rows:
        return {}
    mean = sum(rows.values()) / shards
    return {shard: math.ceil(count / mean) for shard, count in sorted(rows.items()) if count > LARGE_SHARD * mean}


def cross_shard_copies(scratch: Scratch, hash_keys: list[str], folder: Path,
                       settings: Settings) -> tuple[pl.DataFrame, list[int]]:
    """The event_id hashes whose rows are in more than one shard, with the shard that gathers them
    (copies.sql `cross_shard`: event_hash, target), and the shards that hold rows to move. One
    pass over the rows' 64-bit hashes (8 bytes and a shard number a row), by DuckDB within the
    shards' memory cap."""
    empty = pl.DataFrame(schema={"event_hash": pl.UInt64, "target": pl.Int32})
    if not hash_keys:
        return empty, []
    sql = statements(COPIES_SQL)
    folder.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(config={"temp_directory": str(folder / "spill"),
                                 "memory_limit": settings.duckdb_memory or DEFAULT_SHARD_MEMORY})
    try:
        con.read_parquet([str(p) for p in local_files(scratch, hash_keys, folder)]).create_view("hashes")
        cross = con.sql(sql["cross_shard"]).pl()
        if not cross.height:
            return empty, []
        con.register("cross_shard", cross.to_arrow())
        moving = [shard for (shard,) in con.execute(sql["moving_shards"]).fetchall()]
    finally:
        con.close()
    return cross.cast(empty.schema), moving


@task(name="gather-copies", cache_policy=NO_CACHE, **IO_RETRIES)
def gather_copies(scratch: Scratch, shard: int, keys: list[str], cross: Opaque) -> dict[int, str]:
    """One shard's rows split by where they are settled: the rows whose event_id hash another
    shard gathers (`cross`: event_hash, target) go to that shard, the others stay. Returns, per
    shard, the scratch key of the file of this shard's rows it settles."""
    scratch_store = open_store(scratch.uri, create=True)
    with tempfile.TemporaryDirectory(prefix=f"billrun-gather{shard:04d}-") as tmp:
        frame = pl.concat([pl.read_parquet(p) for p in local_files(scratch, keys, Path(tmp))])
        routed = (frame.with_columns(event_hash().alias("_hash"))
                  .join(cross.value, left_on="_hash", right_on="event_hash", how="left", maintain_order="left")
                  .with_columns(pl.col("target").fill_null(shard)).drop("_hash"))
        out = {}
        for (target,), part in routed.partition_by("target", as_dict=True, maintain_order=True).items():
            out[int(target)] = scratch.key(shard_name(int(target)) + f"gathered-from-{shard:04d}.parquet")
            _write(scratch_store, out[int(target)], part.drop("target"))
    return out


@task(name="split-shard", cache_policy=NO_CACHE, **IO_RETRIES)
def split_shard(scratch: Scratch, shard: int, keys: list[str], targets: list[int]) -> dict[int, str]:
    """One shard's rows cut into len(`targets`) parts by their event_id's hash (`oversized_shards`),
    part i going to shard targets[i]. Returns, per shard, the scratch key of its file."""
    scratch_store = open_store(scratch.uri, create=True)
    with tempfile.TemporaryDirectory(prefix=f"billrun-split{shard:04d}-") as tmp:
        frame = pl.concat([pl.read_parquet(p) for p in local_files(scratch, keys, Path(tmp))])
        routed = frame.with_columns(pl.lit(pl.Series(targets, dtype=pl.Int32))
                                    .gather((event_hash() % len(targets)).fill_null(0)).alias("target"))
        out = {}
        for (target,), part in routed.partition_by("target", as_dict=True, maintain_order=True).items():
            out[int(target)] = scratch.key(shard_name(int(target)) + f"split-from-{shard:04d}.parquet")
            _write(scratch_store, out[int(target)], part.drop("target"))
    return out


def local_files(scratch: Scratch, keys: list[str], cache_dir: Path) -> list[Path]:
    """Scratch files on this machine: read in place from the work folder, else fetched."""
    store = open_store(scratch.uri)
    if isinstance(store, LocalStore):
        return [store.root.joinpath(*key.split("/")) for key in keys]
    local = store.fetch(keys, cache_dir)
    return [local[k] for k in keys]


def checked_in_shards(runner, scratch: Scratch, shard_keys: dict[int, list[str]], reference, catalog: Catalog,
                      period: Period, index: CommittedIndex, settings: Settings, folder: Path,
                      disjoint: bool = False) -> CheckedFiles:
    """Each shard checked on its own, then merged (from the shards' files, by DuckDB within the
    shards' memory cap) into the checked usage of all rows, its tables written in `folder` (a
    local folder of its own per check). `disjoint`: no two shards hold rows of one customer
    (`normalize_shards`), so the merge orders the shards' units without adding them up. The
    merged checked usage's `billed_ids` and `lineage` are the shards' scratch keys of their
    billed event_ids and lineage rows."""
    todo = shard_keys or {0: []}  # no usage at all still settles (to an empty result)
    # the lineage rows of the shards split by ranges of customers, as many as there are shards: the
    # billed_events output is then sorted a range at a time (flows.statement.billed_events_table)
    bounds = bucket_bounds(reference.customers["customer_id"], len(todo))
    # the segments' table made once
    context = Opaque((reference, catalog, index, segments_frame(reference.segments), bounds))
    memory_limit = settings.duckdb_memory or DEFAULT_SHARD_MEMORY
    merge = DISJOINT if disjoint else SUMMED
    futures = [runner.submit(check_shard, {"scratch": scratch, "shard": shard, "keys": keys, "context": context,
                                           "period": period, "memory_limit": memory_limit, "check": folder.name,
                                           "part": merge if len(todo) > 1 else None})
               for shard, keys in todo.items()]
    parts = []
    for future in futures:
        part = future.result()
        names = sorted(part.tables)
        paths = local_files(scratch, [part.tables[n] for n in names], folder / "shards")
        parts.append(replace(part, tables={n: str(p) for n, p in zip(names, paths, strict=True)}))
    con = duckdb.connect(config={"temp_directory": str(folder / "spill"), "memory_limit": memory_limit})
    try:
        return merged_files(con, parts, folder, disjoint)
    finally:
        con.close()
