"""`billrun nightly --date D`: the period to date, kept current night by night.

Each night takes in only the usage objects that are new or rewritten since the last run (by
content: ETag, else size and sha256), and only their events up to the end of D (an object that
also holds later days is taken in again by a later night). The period engine (flows/engine.py)
settles them as the close settles its period; what it bills is then ranked against everything
taken in this period by the close's rule (transforms/sql/copies.sql: the earliest copy counts,
whatever night brought it: a night that learns of an earlier copy restates the period to date),
so the night is the engine run over the period's inputs so far, resumed from the last night's
state instead of reading them all again. From the
period-to-date usage it writes what the close would bill if the period ended now, credit
balances, and the alerts that fired for the first time (an alert fires once per customer,
period, kind and threshold, however often nights are run or re-run). The close derives the same
alerts from the same events in event time.

A night costs its new data. Its state, under billing/_state/nightly/period=P/:
- objects/<key>-<night>.parquet: an object's accepted events as taken in (so that a rewritten or
  removed object takes back exactly its own contribution), ids/<key>-<night>.parquet: their
  event_ids and a 64-bit hash of each (the index tonight's events are checked against: read
  whole as hashes only, by event_id only in the objects whose hashes match);
- to_date/night=D/: the period so far as units per customer x meter x dims x UTC day, and the
  events of meters handled event by event, each a file per UTC day (by_day/day=X.parquet,
  events/day=X.parquet: a night writes the days its events move, and the commit points to the
  files of earlier nights for the others), the spend through each (subscription, day) that
  spend alerts replayed (reused while nothing on or before that day changes), and wallets.json:
  each customer's credit wallet after its last consumed event (resumed while nothing on or
  before that event's day changes);
- nights/night=D.json: the commit: which files make up the state after night D.
Store-wide, usage_index.json keeps each object's fingerprint and event-time range, so a night
leaves unread the objects that hold nothing of its period.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path

import duckdb
import polars as pl
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.billed_index import committed_index
from flows.engine import period_usage
from flows.handoff import hand_over, taken
from flows.ingest import is_adjustments_key, is_purchases_key, is_usage_key
from flows.locks import Hold, period_lock, warn
from flows.outputs import PARQUET
from flows.publish import manifest_bytes, manifest_of, output_entries, publish_outputs
from flows.retries import IO_RETRIES
from flows.secrets import keep_secrets_out_of_logs, webhook_url
from flows.settings import Settings
from flows.steps import (
    InputObject,
    Inputs,
    adjustments_billed_elsewhere,
    check_reference,
    file_sha256,
    one_input_key,
    work_dir_for,
)
from flows.store import StoreError, open_store
from transforms.credits.checkpoint import (
    checkpoint_bytes,
    checkpoint_from,
    credit_events_since,
    replayed_wallets_and_checkpoint,
    resume_days,
)
from transforms.credits.events import credit_meters
from transforms.credits.grants import history_grants
from transforms.credits.ledger import balances_table
from transforms.credits.opening import grants_from_balances, opening_grants
from transforms.documents.drafts import usage_estimates
from transforms.engine.billed_index import id_hash_macro
from transforms.engine.checked_usage import copy_order_macro, plan_meters, usage_row_counts
from transforms.engine.invoices import invoices_table, lines_table
from transforms.engine.period_to_date import (
    BY_DAY_COLUMNS,
    EVENT_COLUMNS,
    by_day_to_date,
    events_to_date,
    per_event_usage,
    usage_by_day,
    usage_by_dims,
)
from transforms.engine.rating import rated_invoices
from transforms.engine.usage_index import event_ranges, has_days_after, night_end, nothing_in
from transforms.errors import BillrunError, InputError
from transforms.finance.alerts import alerts_table, credit_alerts, price_change_notices
from transforms.finance.spend import spend_alerts_resumed, subscriptions_over_budget, usage_spend_by_subscription
from transforms.inputs.guards import night_of_closed_period
from transforms.inputs.plans import load_catalog
from transforms.inputs.reference import segments_frame
from transforms.layout import (
    ADJUSTMENTS_PREFIX,
    CUSTOMERS_KEYS,
    MANIFEST,
    NIGHTLY_STATE_FOLDERS,
    PURCHASES_PREFIX,
    RULES_KEY,
    SELLER_KEY,
    SUBSCRIPTIONS_KEYS,
    USAGE_INDEX_KEY,
    USAGE_PREFIX,
    fired_alerts_key,
    manifest_key,
    night_commit_key,
    night_commits_prefix,
    night_of_commit,
    night_prefix,
    nightly_ids_key,
    nightly_object_key,
    nightly_state_prefix,
    pending_delivery_key,
    period_prefix,
    to_date_key,
)
from transforms.periods import Period
from transforms.queries import statements

SQL_FILE = "nightly.sql"
ACCEPTED_COLUMNS = {"event_id": pl.String, "customer_id": pl.String, "meter": pl.String, "dims": pl.String,
                    "quantity": pl.Decimal(38, 9), "event_at": pl.Datetime("us", "UTC"), "source_key": pl.String,
                    "night": pl.Date}
ID_COLUMNS = {"event_id": pl.String, "source_key": pl.String, "night": pl.Date, "id_hash": pl.UInt64}
# 3: the event_id index carries id_hash (see nightly.sql); 4: the period-to-date tables are kept in time
# order (transforms/engine/period_to_date.py); 5: they are kept a file per UTC day (see the module docstring).
# A state of another format is rebuilt from its objects.
STATE_FORMAT = 5
STATE_PARQUET = {**PARQUET, "compression_level": 1}
"""State files are written every night and read back only by later nights: zstd's fastest level
(on the month's per-event table it costs about 60% of the default's CPU, for a smaller file)."""


class DeliveryFailed(BillrunError):
    """Alerts were written but could not be delivered to the webhook."""


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def _object_state_key(period: Period, key: str, night: date) -> str:
    """An object's accepted events as the night `night` took them in (named by night, so a
    night that has not committed yet never overwrites what the committed state points to)."""
    return nightly_object_key(period, f"{_key_hash(key)}-{night}")


def _ids_key(period: Period, key: str, night: date | None) -> str:
    suffix = f"-{night}" if night else ""
    return nightly_ids_key(period, f"{_key_hash(key)}{suffix}")


def base_snapshot(store, period: Period, day: date) -> dict:
    """The committed state night `day` starts from: the last night before it (a night killed
    after committing its own state but before its manifest starts again from the night before,
    so it reruns to the same result), or the latest night if a later one already ran. None at
    all is an empty period, which the night builds from scratch."""
    nights = sorted(date.fromisoformat(night_of_commit(period, o.key))
                    for o in store.list(night_commits_prefix(period)) if o.key.endswith(".json"))
    earlier = [n for n in nights if n < day]
    pick = nights[-1] if nights and nights[-1] > day else (earlier[-1] if earlier else None)
    if pick is not None:
        return json.loads(store.read_bytes(night_commit_key(period, pick)))
    return {"format": None, "night": None, "intake": {}}


def per_event_meters(catalog) -> list[str]:
    """Meters some plan prices or pays with credits event by event (see transforms.engine.checked_usage.plan_meters)."""
    frame = plan_meters(catalog).filter(pl.col("per_event"))
    return sorted(set(frame["meter"].to_list()))



@dataclass(frozen=True)
class Intake:
    inputs: Inputs                 # only the usage objects to take in tonight
    base: dict                     # the committed state tonight starts from
    kept: dict[str, dict]          # objects taken in on earlier nights and kept as they were
    removed: tuple[str, ...]       # objects gone from the store since the last night
    replaced: tuple[str, ...]      # objects taken in before and again tonight (rewritten, or more of their days)
    skipped: int                   # objects left unread: the usage index shows nothing of this period up to tonight
    kept_files: dict[str, Path]    # each kept object's event_id index (its full rows when rebuilding)
    gone: dict[str, Path]          # accepted events, as taken in, of the removed and replaced objects
    state_files: dict[str, list[Path]]  # the base's period-to-date tables (by_day, events), their days in order
    rebuild: bool                  # no usable period-to-date tables: build them from every kept object
    index: dict[str, dict]         # the store-wide usage index as read
    meters: list[str]              # meters handled event by event, as the period-to-date tables hold them
    terms: str                     # see spend_terms
    known_spend: Path | None       # spend through each (subscription, day) as the base night left it


@task(name="take-in", cache_policy=NO_CACHE, **IO_RETRIES)
def take_in(store_uri: str, period: Period, day: date, catalog, cache_dir: Path) -> Intake:
    """What arrived since the last night (new or rewritten objects, and objects that hold days
    after the night that took them in), and the state of everything taken in before."""
    store = open_store(store_uri)
    meters = per_event_meters(catalog)
    base = base_snapshot(store, period, day)
    before = base["intake"]
    index = json.loads(store.read_bytes(USAGE_INDEX_KEY)) if store.exists(USAGE_INDEX_KEY) else {}
    listed = {o.key: o for o in store.list(USAGE_PREFIX) if is_usage_key(o.key)}
    customers_key = one_input_key(store, CUSTOMERS_KEYS, "customers")
    subscriptions_key = one_input_key(store, SUBSCRIPTIONS_KEYS, "subscriptions")
    if customers_key is None or subscriptions_key is None:
        raise InputError(f"{store.uri}: customers and subscriptions are needed (see the store layout)")
    purchases = [o.key for o in store.list(PURCHASES_PREFIX) if is_purchases_key(o.key)]
    # one-off charges and credits: a draft carries the period's, as the close's invoice will
    adjustments = [o.key for o in store.list(ADJUSTMENTS_PREFIX) if is_adjustments_key(o.key)]
    sha_of: dict[str, str] = {}

    def unchanged(info, seen: dict | None) -> bool:
        if not seen:
            return False
        if info.etag and seen.get("etag"):
            return info.etag == seen["etag"]
        if info.size != seen["size"]:
            return False
        if info.key not in sha_of:
            sha_of[info.key] = store.sha256(info.key)
        return sha_of[info.key] == seen["sha256"]

    window = (period.start_at, min(period.end_at, night_end(day)))
    fresh, kept, skipped = [], {}, 0
    for k, info in sorted(listed.items()):
        seen = before.get(k)
        if unchanged(info, seen):
            if has_days_after(index.get(k), seen.get("through"), day):
                fresh.append(k)
            else:
                kept[k] = seen
        elif seen is None and unchanged(info, index.get(k)) and nothing_in(index[k], window):
            skipped += 1
        else:
            fresh.append(k)
    removed = tuple(sorted(set(before) - set(listed)))
    replaced = tuple(k for k in fresh if k in before)
    # seller.yaml and tax/rules.yaml: the drafts are taxed and dated as the close's invoices
    extras = [k for k in (SELLER_KEY, RULES_KEY) if store.exists(k)]
    local = store.fetch(fresh + [customers_key, subscriptions_key] + purchases + adjustments + extras, cache_dir)

    def obj(k: str) -> InputObject:
        path = local[k]
        info = listed.get(k)  # size and hash of the local copy: the bytes taken in
        return InputObject(k, path.stat().st_size, file_sha256(path), path, info.etag if info else None)

    rebuild = (base.get("format") != STATE_FORMAT or base.get("per_event_meters") != meters
               or any(not v.get("ids") for v in kept.values()))
    if rebuild:  # every kept object's full rows: the period is rebuilt from them
        state = store.fetch([v["state"] for v in kept.values()], cache_dir / "state")
        kept_files = {k: state[v["state"]] for k, v in kept.items()}
        tables = {}
        # the rebuild writes each kept object's index afresh, in tonight's format
        kept = {k: {**v, "ids": None} for k, v in kept.items()}
    else:
        day_keys = {name: list(base[name].values()) for name in TO_DATE_TABLES}  # committed in day order
        state = store.fetch([v["ids"] for v in kept.values()] + [k for keys in day_keys.values() for k in keys],
                            cache_dir / "state")
        kept_files = {k: state[v["ids"]] for k, v in kept.items()}
        tables = {name: [state[k] for k in keys] for name, keys in day_keys.items()}
    gone_keys = {} if rebuild else {k: before[k]["state"] for k in removed + replaced}
    gone = store.fetch(list(gone_keys.values()), cache_dir / "gone")
    inputs = Inputs(tuple(obj(k) for k in fresh), obj(customers_key), obj(subscriptions_key),
                    obj(SELLER_KEY) if SELLER_KEY in extras else None, tuple(obj(k) for k in purchases),
                    obj(RULES_KEY) if RULES_KEY in extras else None, tuple(obj(k) for k in adjustments))
    previous = period_prefix(period.previous()) + "credit_balances.parquet"
    terms = spend_terms(inputs, catalog, store.sha256(previous) if store.exists(previous) else None)
    known_spend = None
    if not rebuild and base.get("terms") == terms and base.get("spend"):
        known_spend = store.fetch([base["spend"]], cache_dir / "state")[base["spend"]]
    get_run_logger().info("take-in: %d new or rewritten objects, %d removed, %d kept from earlier nights, "
                          "%d left unread (nothing of %s up to tonight)", len(fresh), len(removed), len(kept),
                          skipped, period)
    return Intake(inputs, base, kept, removed, replaced, skipped, kept_files,
                  {k: gone[path] for k, path in gone_keys.items()}, tables, rebuild, index, meters, terms, known_spend)


def spend_terms(inputs: Inputs, catalog, previous_balances_sha: str | None) -> str:
    """A fingerprint of everything besides usage that spend so far depends on (subscriptions,
    purchases, plans, the balances the period opens with): spend a night worked out is reused
    only under the same terms."""
    terms = [STATE_FORMAT, inputs.customers.sha256, inputs.subscriptions.sha256,
             sorted(o.sha256 for o in inputs.purchases),
             sorted([f.plan.plan, f.plan.version, f.sha256] for f in catalog.files.values()), previous_balances_sha]
    return hashlib.sha256(json.dumps(terms).encode()).hexdigest()



@dataclass(frozen=True)
class NightUsage:
    counts: dict[str, int]
    accepted: dict[str, Path]          # tonight's accepted events, by object key
    ids: dict[str, Path]               # their event_ids (the index kept objects are checked against)
    rebuilt_ids: dict[str, Path]       # the index of kept objects a rebuild wrote afresh
    nights: dict[str, str | None]      # the night each kept object was taken in, when the rebuild learned it
    by_day: dict[str, Path | None]     # the period to date: customer x meter x dims x day, a file per day
    events: dict[str, Path | None]     # written tonight (None: the day emptied); see _day_files
    ranges: dict[str, dict]            # tonight's objects: event-time range, for the usage index
    not_yet: tuple[str, ...]           # objects read tonight whose every event is after the night: left for later
    changed_from: dict[str, date] | None  # per customer, the first day whose usage changed tonight (None: all)
    usage_by_dims: pl.DataFrame
    usage_by_day: pl.DataFrame
    per_event_usage: pl.DataFrame


@task(name="check-night", cache_policy=NO_CACHE)
def check_night(store_uri: str, normalized: list[Path], unreadable: list[tuple[str, str]],
                checked_counts: dict[str, int], billed: list[Path], intake: Intake, segments: pl.DataFrame,
                period: Period, day: date, work_dir: Path) -> NightUsage:
    """The period to date, moved from the last night's by tonight's checked usage. Tonight's rows
    up to the night's end were settled by the period engine as the close settles its period
    (`checked_counts`: its counts; `billed`: its lineage files); what it bills is ranked by the close's
    rule against the copies taken in before, and the period to date moves by the difference (or
    is rebuilt when there is no state to move from). `normalized`: tonight's objects as read
    (with the days after the night), for the usage index; `segments`: the reference's subscription
    segments as a table (transforms.inputs.reference.segments_frame), to rate the period on."""
    started = time.perf_counter()
    sql = statements(SQL_FILE)
    out_dir = work_dir / "night-state"
    out_dir.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(config={"temp_directory": str(work_dir / "duckdb-spill")})
    try:
        con.execute("SET TimeZone = 'UTC'").fetchall()
        id_hash_macro(con)
        copy_order_macro(con)
        _register(con, "read_tonight", normalized, {"source_key": pl.String, "event_at": pl.Datetime("us", "UTC")})
        ranges = event_ranges(con.sql(sql["event_ranges"]).fetchall())
        _register(con, "tonight_lineage", billed, BILLED_COLUMNS)
        con.execute(sql["billed_tonight"]).fetchall()
        con.register("per_event_meters", pl.DataFrame({"meter": intake.meters}, schema={"meter": pl.String}).to_arrow())
        con.execute(sql["accepted_tonight"], {"night": day}).fetchall()
        if intake.rebuild:
            con.register("kept_rows_all", _read_accepted(list(intake.kept_files.values())).to_arrow())
            con.execute(sql["rebuilt_kept_ids"]).fetchall()
        else:
            con.register("gone", _read_accepted(list(intake.gone.values())).to_arrow())
            kept_copies(con, sql, intake.kept_files)
        tonight = con.table("tonight").pl()
        [(new,)] = con.sql(sql["new_tonight"]).fetchall()
        accepted, ids = {}, {}
        by_key = tonight.partition_by("source_key", as_dict=True)
        for o in intake.inputs.usage:
            name = hashlib.sha256(o.key.encode()).hexdigest()  # by key: two keys may share bytes
            rows = by_key.get((o.key,), tonight.clear())
            accepted[o.key] = out_dir / f"{name}.parquet"
            rows.select(list(ACCEPTED_COLUMNS)).write_parquet(accepted[o.key], **STATE_PARQUET)
            ids[o.key] = out_dir / f"{name}-ids.parquet"
            rows.select(list(ID_COLUMNS)).write_parquet(ids[o.key], **STATE_PARQUET)
        rebuilt_ids, nights = {}, {}
        if intake.rebuild:
            con.execute(sql["all_accepted"]).fetchall()
            con.execute(sql["first_copies"]).fetchall()
            by_day, events = con.sql(sql["rebuilt_by_day"]).pl(), con.sql(sql["rebuilt_events"]).pl()
            changed_from = None
            kept_index = con.sql(sql["rebuilt_kept_index"]).pl()
            for (key,), rows in kept_index.partition_by("source_key", as_dict=True).items():
                rebuilt_ids[key] = out_dir / f"{hashlib.sha256(key.encode()).hexdigest()}-kept-ids.parquet"
                rows.select(list(ID_COLUMNS)).write_parquet(rebuilt_ids[key], **STATE_PARQUET)
                night = rows["night"].min()
                nights[key] = night.isoformat() if night else None
        else:
            needed = con.sql(sql["kept_rows_needed"]).pl()
            con.register("kept_rows", _kept_rows(store_uri, intake, needed, work_dir).to_arrow())
            con.execute(sql["delta"]).fetchall()
            by_day = by_day_to_date(_read_days(intake.state_files["by_day"], BY_DAY_COLUMNS),
                                    con.sql(sql["delta_by_day"]).pl())
            events = events_to_date(_read_days(intake.state_files["events"], EVENT_COLUMNS),
                                    con.sql(sql["delta_leaving_ids"]).pl(), con.sql(sql["delta_entering_events"]).pl())
            changed_from = dict(con.sql(sql["changed_from"]).fetchall())
            moved_days = {d for (d,) in con.sql(sql["delta_days"]).fetchall()}
    finally:
        con.close()
    by_day, events = by_day.cast(BY_DAY_COLUMNS), events.cast(EVENT_COLUMNS)
    written = None if intake.rebuild else moved_days
    by_day_files = _day_files(by_day, pl.col("day"), written, out_dir / "by_day")
    events_files = _day_files(events, pl.col("event_at").dt.date(), written, out_dir / "events")
    per_day = usage_by_day(by_day, segments)
    per_event = per_event_usage(events, segments)
    # billed: the events new tonight; the rest of what settled as billed came in on an earlier night
    counts = {**usage_row_counts(checked_counts, len(unreadable)), "billed": new,
              "duplicates": checked_counts["duplicates"] + checked_counts["billed"] - new}
    for key, _ in unreadable:
        ranges[key] = {"first_at": None, "last_at": None, "undated": True}
    end = night_end(day)
    not_yet = tuple(sorted(k for k, r in ranges.items()
                           if not r["undated"] and r["first_at"] and datetime.fromisoformat(r["first_at"]) >= end))
    get_run_logger().info("check-night: read %d, accepted %d, duplicates %d, quarantined %d in %.2fs",
                          counts["read"], counts["billed"], counts["duplicates"], counts["quarantined"],
                          time.perf_counter() - started)
    return NightUsage(counts, accepted, ids, rebuilt_ids, nights, by_day_files, events_files, ranges, not_yet,
                      changed_from, usage_by_dims(per_day), per_day, per_event)


BILLED_COLUMNS = {"event_id": pl.String, "customer_id": pl.String, "meter": pl.String, "dims": pl.String,
                  "quantity": pl.Decimal(38, 9), "event_at": pl.Datetime("us", "UTC"), "outcome": pl.String,
                  "source_key": pl.String, "source_row": pl.Int64}
"""The columns of the engine's lineage rows a night takes in (flows/statement.py LINEAGE_COLUMNS)."""



def _read_accepted(paths: list[Path], event_ids: list[str] | None = None) -> pl.DataFrame:
    """Accepted events of objects as their state files hold them. With `event_ids`,
    only those events' rows: the event_id column is read first, and the other columns only for
    the rows it matches (a night needs a few thousand rows of objects that hold 300,000)."""
    frames = []
    for path in paths:
        if event_ids is None:
            scan = pl.scan_parquet(path)
        else:
            scan = pl.scan_parquet(path, parallel="prefiltered").filter(pl.col("event_id").is_in(event_ids))
        frames.append(scan.select(list(ACCEPTED_COLUMNS)).cast(ACCEPTED_COLUMNS).collect())
    return pl.concat(frames) if frames else pl.DataFrame(schema=ACCEPTED_COLUMNS)


TO_DATE_TABLES = ("by_day", "events")
"""The period-to-date tables a night commits a file per UTC day of (the commit's `by_day` and
`events`: day -> key, in day order)."""


def _read_days(paths: list[Path], schema: dict) -> pl.DataFrame:
    """A period-to-date table from its files per day, in day order (so in the table's order)."""
    if not paths:
        return pl.DataFrame(schema=schema)
    return pl.read_parquet(paths, columns=list(schema))


def _day_files(table: pl.DataFrame, day_of: pl.Expr, days: set[date] | None, folder: Path) -> dict[str, Path | None]:
    """The rows of `table` (a period-to-date table, day first in its order) of each of `days`
    (None: of every day it holds) written to a file per UTC day, by the day's ISO date; None
    for a day it no longer holds. A night writes only the days tonight's events moved: the
    others are the files an earlier night wrote (their rows are the same, in the same order),
    so the month's rewrite (0.35 CPU s at night 28 for both tables) does not grow with it."""
    folder.mkdir(parents=True, exist_ok=True)
    frame = table.with_columns(day_of.alias("_utc_day"))
    if days is not None:
        frame = frame.filter(pl.col("_utc_day").is_in(list(days)))
    files: dict[str, Path | None] = {d.isoformat(): None for d in days or ()}
    for (day,), rows in frame.partition_by("_utc_day", as_dict=True, maintain_order=True).items():
        files[day.isoformat()] = folder / f"day={day.isoformat()}.parquet"
        rows.drop("_utc_day").write_parquet(files[day.isoformat()], **STATE_PARQUET)
    return files


def _register(con: duckdb.DuckDBPyConnection, name: str, paths: list[Path], schema: dict) -> None:
    """A view of Parquet state files with the given columns (an empty table when there are none)."""
    if paths:
        con.read_parquet([str(p) for p in paths], union_by_name=True).select(*schema).create_view(name)
    else:
        con.register(name, pl.DataFrame(schema=schema).to_arrow())


def kept_copies(con: duckdb.DuckDBPyConnection, sql: dict[str, str], kept_files: dict[str, Path]) -> None:
    """`kept_ids`: every copy, among the objects kept from earlier nights, of an event_id that
    tonight's rows or the gone objects hold. The whole index is read as hashes only; event_ids
    are compared in the objects whose hashes match."""
    con.execute(sql["probe_ids"]).fetchall()
    _register(con, "kept_hashes", list(kept_files.values()), {"id_hash": pl.UInt64, "source_key": pl.String})
    holding = [key for (key,) in con.sql(sql["objects_to_check"]).fetchall()]
    _register(con, "kept_candidates", [kept_files[k] for k in holding], ID_COLUMNS)
    con.execute(sql["kept_copies"]).fetchall()


def _kept_rows(store_uri: str, intake: Intake, needed: pl.DataFrame, work_dir: Path) -> pl.DataFrame:
    """Full rows of the kept copies tonight's ranking needs, read only from the objects that hold
    them."""
    if needed.is_empty():
        return pl.DataFrame(schema=ACCEPTED_COLUMNS)
    wanted = {key: set(rows["event_id"].to_list())
              for (key,), rows in needed.partition_by("source_key", as_dict=True).items()}
    store = open_store(store_uri)
    files = store.fetch([intake.kept[k]["state"] for k in sorted(wanted)], work_dir / "kept-state")
    frames = [_read_accepted([files[intake.kept[k]["state"]]], sorted(ids)) for k, ids in sorted(wanted.items())]
    return pl.concat(frames)


@dataclass(frozen=True)
class NightResult:
    """What the estimate leaves for publish-night: files of the work folder and a few values, so
    nothing large crosses the steps (the 2,000 draft invoices of the bench's month cost Prefect's
    walk of a task's arguments 2.4 CPU s)."""
    outputs: tuple[str, ...]       # the draft, line, balance and usage tables, written into the night's out folder
    alerts: Path                   # every alert of the period so far (publish-night keeps those not fired before)
    over_budget: list[dict]        # subscriptions past 80% of their budget, for the manifest
    balances_from: str
    spend: Path                    # spend through each (subscription, day) replayed tonight, for the next night
    wallets: Path                  # each customer's wallet after its last event, for the next night to resume


SPEND_COLUMNS = {"subscription_id": pl.String, "day": pl.Date, "spend_minor": pl.Int64}


@task(name="estimate", cache_policy=NO_CACHE)
def estimate(store_uri: str, usage: NightUsage, reference_file: Path, catalog, period: Period,
             known_spend: Path | None, known_wallets: str | None, out_dir: Path, work_dir: Path) -> NightResult:
    """Credits, the draft invoices and every alert of the period so far. Spend alerts resume
    from the spend the last night worked out (`known_spend`, None when its terms changed);
    wallets from the last night's checkpoint (`known_wallets`, a store key, used under the same
    terms) for the customers whose usage changed only after their last event. The checked
    reference is read from `reference_file` (`flows.handoff.hand_over`: as an argument, Prefect's
    walk of it costs 0.2 CPU s at 2,000 customers; the file 17 ms to write and read). The night's tables are
    written into `out_dir`, the alerts and the state for the next night into
    `work_dir`. Not retried: the estimate is pure work, and its one read (the checkpoint) has the
    store's own retries."""
    store = open_store(store_uri)
    reference = taken(reference_file)
    segments = list(reference.segments)
    subs, purchases = list(reference.subscriptions), list(reference.purchases)
    checkpoint = (checkpoint_from(store.read_bytes(known_wallets), period)
                  if known_wallets and known_spend is not None and store.exists(known_wallets) else None)
    since = resume_days(checkpoint, usage.changed_from)
    events = credit_events_since(usage.per_event_usage, segments, since)
    previous = period_prefix(period.previous()) + "credit_balances.parquet"
    if store.exists(previous):
        opening = grants_from_balances(pl.read_parquet(io.BytesIO(store.read_bytes(previous))))
        grants = opening_grants(opening, subs, catalog, purchases, period)
        balances_from = f"the {period.previous()} close"
    else:
        grants = history_grants(subs, catalog, purchases, period)
        balances_from = f"grants only ({period.previous()} is not closed: earlier consumption is not known)"
    replay, wallets = replayed_wallets_and_checkpoint(grants, subs, catalog, events, period, checkpoint, since)
    # rated as the close rates its period: the draft is the invoice the close would issue now
    invoices = rated_invoices(period, usage.usage_by_dims, usage.per_event_usage, replay, reference)
    spend = usage_spend_by_subscription(invoices)
    known = {} if known_spend is None else {(s, d): v for s, d, v in pl.read_parquet(known_spend).iter_rows()}
    spent, spend_through = spend_alerts_resumed(period, segments, usage.usage_by_day, usage.per_event_usage,
                                                replay.billable_by_day, credit_meters(segments), spend, known,
                                                usage.changed_from if known_spend is not None else None)
    alerts = (price_change_notices(period, list(reference.subscriptions), catalog) + credit_alerts(replay, period)
              + spent)
    spend_frame = pl.DataFrame([(s, d, v) for (s, d), v in sorted(spend_through.items())], schema=SPEND_COLUMNS,
                               orient="row")
    tables = {"draft_invoices.parquet": invoices_table(invoices), "draft_invoice_lines.parquet": lines_table(invoices),
              "credit_balances.parquet": balances_table(replay, period), "usage.parquet": usage_estimates(invoices)}
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        frame.write_parquet(out_dir / name, **PARQUET)
    result = NightResult(tuple(tables), work_dir / "alerts.parquet", subscriptions_over_budget(invoices, segments),
                         balances_from, work_dir / "spend.parquet", work_dir / "wallets.json")
    alerts_table(alerts).write_parquet(result.alerts, **PARQUET)
    spend_frame.write_parquet(result.spend, **PARQUET)
    result.wallets.write_bytes(checkpoint_bytes(wallets))
    return result


WEBHOOK_RETRIES = {"retries": 2, "retry_delay_seconds": [1, 2]}
"""A refused or unreachable webhook is tried three times in all, 1 s then 2 s apart; the POST is
the task's only work, so every failure is IO that may pass."""


class WebhookRefused(BillrunError):
    """One POST of the alerts failed (an HTTP error status or no connection)."""


@task(name="deliver-alerts", cache_policy=NO_CACHE, **WEBHOOK_RETRIES)
def post_alerts(webhook: str, body: bytes) -> None:
    """POST the alerts as JSON once; Prefect retries the task (WEBHOOK_RETRIES)."""
    try:
        request = urllib.request.Request(webhook, data=body, headers={"Content-Type": "application/json"},
                                         method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - the operator's URL
            if 200 <= response.status < 300:
                return
            raise WebhookRefused(f"HTTP {response.status}")
    except urllib.error.HTTPError as exc:
        raise WebhookRefused(f"HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise WebhookRefused(str(getattr(exc, "reason", exc))) from None


def deliver(webhook: str, payload: dict) -> None:
    """POST the alerts as JSON (retried, see WEBHOOK_RETRIES); raises DeliveryFailed at the end."""
    body = json.dumps(payload, sort_keys=True).encode()
    try:
        post_alerts(webhook, body)
    except WebhookRefused as exc:
        tries = 1 + WEBHOOK_RETRIES["retries"]
        raise DeliveryFailed(f"alerts written, but the webhook did not take them after {tries} tries ({exc}); "
                             f"they stay pending and the next nightly run delivers them") from None


@flow(name="nightly", log_prints=False)
def nightly(store: str, plans: str, day: str, webhook_env: str | None = None,
            webhook_secret: str | None = None, settings: Settings | None = None) -> dict:
    """Take in the day's usage and bring the period to date: estimates, balances, alerts.

    The webhook that new alerts are POSTed to is given by reference, never as a value (a flow
    run's parameters are stored in Prefect): `webhook_env` names an environment variable holding
    its URL, `webhook_secret` a Prefect Secret block."""
    settings = settings or Settings.from_environ()
    keep_secrets_out_of_logs()
    webhook = webhook_url(webhook_env, webhook_secret)
    try:
        the_day = date.fromisoformat(day)
    except ValueError:
        raise InputError(f"--date {day!r} is not a date (YYYY-MM-DD)") from None
    period = Period.containing(the_day)
    catalog = load_catalog(plans)
    the_store = open_store(store)
    out_prefix = night_prefix(the_day)
    pending_key = pending_delivery_key(period)
    if the_store.exists(out_prefix + MANIFEST):
        manifest = json.loads(the_store.read_bytes(out_prefix + MANIFEST))
        _deliver_pending(the_store, pending_key, webhook)
        return {**manifest, "status": "already_ran"}
    if the_store.exists(manifest_key(period)):
        raise InputError(night_of_closed_period(the_day))
    warnings: list[str] = []
    with period_lock(the_store, [period], f"nightly {the_day}", datetime.now(timezone.utc), warnings) as hold:
        work_dir = work_dir_for(store, f"nightly-{the_day}")
        try:
            # the catalog, the inputs, the intake and the night's usage go to their tasks as they are:
            # Prefect's walk of a task's arguments passes them in milliseconds (the catalog's, the
            # largest, 6 ms); the reference crosses to the estimate as a file (0.2 s of walk each
            # time, 17 ms pickled and read back at 2,000 customers), check-night takes its segments
            # as a table, and the estimate hands publish-night files
            intake = take_in(store, period, the_day, catalog, work_dir / "inputs")
            # as the close: an adjustment that another closed period's documents bill is not billed here
            billed_elsewhere = adjustments_billed_elsewhere(store, intake.inputs, [period])
            reference = check_reference(intake.inputs, catalog, period, billed_elsewhere)
            # an event the documents of another closed period bill is not taken in (billed-event index)
            index = committed_index(store, leave_out=[str(period)])
            with period_usage(store, intake.inputs, work_dir, f"nightly-{the_day}", settings) as shards:
                # tonight's objects settled by the engine as the close settles its period, through
                # the night's end; then ranked against earlier nights' copies by the close's rule
                tonight = shards.through(the_day).checked(reference, catalog, period, index)
                usage = check_night(store, shards.files(work_dir / "normalized"), list(shards.normalized.unreadable),
                                    tonight.counts, shards.lineage_files(tonight, work_dir / "lineage"),
                                    intake, segments_frame(list(reference.segments)), period, the_day, work_dir)
            result = estimate(store, usage, hand_over(reference, work_dir / "reference.pickle"), catalog, period,
                              intake.known_spend, intake.base.get("wallets"), work_dir / "out", work_dir / "estimate")
            manifest = publish_night(store, period, the_day, intake, usage, result, work_dir / "out", hold)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
    _report(manifest, the_store.uri)
    _deliver_pending(the_store, pending_key, webhook)
    return {**manifest, "status": "ran", "warnings": manifest.get("warnings", []) + warnings}


def _deliver_pending(store, key: str, webhook: str | None) -> None:
    if not webhook or not store.exists(key):
        return
    payload = json.loads(store.read_bytes(key))
    deliver(webhook, payload)
    store.delete(key)


@task(name="publish-night", cache_policy=NO_CACHE, **IO_RETRIES)
def publish_night(store_uri: str, period: Period, day: date, intake: Intake, usage: NightUsage,
                  result: NightResult, out_dir: Path, hold: Hold) -> dict:
    """The night's outputs into `billing/nightly/date=D/`, the manifest last (flows.publish's
    publish_outputs, fenced as every publish): written straight into the folder, unstaged, for a
    night's folder without its manifest is a draft that the rerun replaces. Just before the
    manifest, the night's state: tonight's objects and the period to date (all named by night,
    so nothing the committed state points to is overwritten), the usage index, the commit
    (`nights/night=D.json`) and the fired alerts. After it, what no state points to any more is
    cleared away. A night killed anywhere reruns from the night before to the same result."""
    store = open_store(store_uri)
    fired_key = fired_alerts_key(period)
    fired = pl.read_parquet(io.BytesIO(store.read_bytes(fired_key))) if store.exists(fired_key) else None
    if fired is not None:  # a retry of this task must find tonight's alerts new again
        fired = fired.filter(pl.col("night").is_null() | (pl.col("night") != day))
    every = pl.read_parquet(result.alerts)
    identity = ["customer_id", "period", "kind", "threshold"]
    new = every if fired is None else every.join(fired.select(identity), on=identity, how="anti")
    new.write_parquet(out_dir / "alerts.parquet", **PARQUET)
    tables = ("alerts.parquet", *result.outputs)  # the others written by the estimate
    taken = [o for o in intake.inputs.usage if o.key not in usage.not_yet]
    snapshot, state_files = _night_snapshot(period, day, intake, usage, taken, result.spend)
    fields = {
        "date": day.isoformat(), "period": str(period),
        "intake": {"objects": len(taken), "removed": list(intake.removed), **usage.counts},
        "alerts_fired": new.height, "over_80_percent_of_budget": result.over_budget,
        "credit_balances_from": result.balances_from,
        "outputs": output_entries(night_prefix(day), out_dir, tables, sizes=False),
    }
    body = manifest_bytes(fields)

    def night_state(fenced) -> None:
        for key, path in state_files:
            fenced.put_file(key, path)
        fenced.put_file(snapshot["wallets"], result.wallets)
        index = json.loads(fenced.read_bytes(USAGE_INDEX_KEY)) if fenced.exists(USAGE_INDEX_KEY) else {}
        for o in intake.inputs.usage:  # read again just now: nights of other periods write it too
            index[o.key] = {"size": o.size, "sha256": o.sha256, "etag": o.etag, **usage.ranges.get(
                o.key, {"first_at": None, "last_at": None, "undated": False})}
        fenced.put_bytes(USAGE_INDEX_KEY, (json.dumps(dict(sorted(index.items())), indent=1) + "\n").encode())
        fenced.put_bytes(night_commit_key(period, day), (json.dumps(snapshot, indent=1) + "\n").encode())
        tonight = new.with_columns(pl.lit(day).alias("night"))
        merged = tonight if fired is None else pl.concat([fired, tonight])
        buffer = io.BytesIO()
        merged.write_parquet(buffer, **PARQUET)
        fenced.put_bytes(fired_key, buffer.getvalue())
        if new.height:
            pending = pending_delivery_key(period)
            earlier = json.loads(fenced.read_bytes(pending))["alerts"] if fenced.exists(pending) else []
            ours = new.with_columns(pl.col("occurred_on").cast(pl.String)).to_dicts()
            earlier = [a for a in earlier if a not in ours]  # a retry does not queue them twice
            fenced.put_bytes(pending, json.dumps({"alerts": earlier + ours}, sort_keys=True).encode())

    warnings = publish_outputs(store, hold, f"nightly {day}", night_prefix(day), out_dir, sorted(tables), body,
                               scratch=[], private=None, staged=False, before_manifest=night_state)
    try:
        _clear_superseded(store, period, [intake.base, snapshot])
    except StoreError as exc:  # the night is committed; the next night clears what is left
        line = f"night written, but could not clear superseded state ({exc}); the next night clears it"
        warn(line)
        warnings.append(line)
    manifest = manifest_of(fields)
    return {**manifest, "warnings": warnings} if warnings else manifest


def _night_snapshot(period: Period, day: date, intake: Intake, usage: NightUsage, taken: list[InputObject],
                    spend: Path) -> tuple[dict, list[tuple[str, Path]]]:
    """The commit of night `day` (`nights/night=D.json`: which files make up the state after it),
    and the local files to write under the keys it names (all but the wallets)."""
    intake_now = {k: dict(v) for k, v in intake.kept.items()}
    files = []
    for key, path in usage.rebuilt_ids.items():
        if not intake_now[key].get("ids"):  # a rebuild gives the kept objects their event_id index afresh
            intake_now[key]["ids"] = _ids_key(period, key, None)
            intake_now[key]["night"] = usage.nights.get(key)
            files.append((intake_now[key]["ids"], path))
    for o in taken:
        entry = {"size": o.size, "sha256": o.sha256, "etag": o.etag, "night": day.isoformat(),
                 "through": day.isoformat(), "state": _object_state_key(period, o.key, day),
                 "ids": _ids_key(period, o.key, day)}
        files += [(entry["state"], usage.accepted[o.key]), (entry["ids"], usage.ids[o.key])]
        intake_now[o.key] = entry
    snapshot = {"format": STATE_FORMAT, "night": day.isoformat(), "intake": dict(sorted(intake_now.items())),
                "per_event_meters": intake.meters, "terms": intake.terms}
    for name, written in (("by_day", usage.by_day), ("events", usage.events)):
        days = {} if intake.rebuild else dict(intake.base[name])
        for d, path in written.items():
            days.pop(d, None)
            if path is not None:
                days[d] = to_date_key(period, day, f"{name}/day={d}.parquet")
                files.append((days[d], path))
        snapshot[name] = dict(sorted(days.items()))
    snapshot["spend"] = to_date_key(period, day, "spend.parquet")
    files.append((snapshot["spend"], spend))
    snapshot["wallets"] = to_date_key(period, day, "wallets.json")
    return snapshot, files


def _clear_superseded(store, period: Period, snapshots: list[dict]) -> None:
    """Delete the state files neither tonight's state nor the one it started from points to
    (the latter stays, so that a night re-run from it still finds everything)."""
    prefix = nightly_state_prefix(period)
    keep = {night_commit_key(period, date.fromisoformat(s["night"])) for s in snapshots if s.get("night")}
    for s in snapshots:
        keep |= {s[name] for name in ("spend", "wallets") if s.get(name)}
        for name in TO_DATE_TABLES:  # a file per day; one file in states before format 5
            tables = s.get(name) or {}
            keep |= set(tables.values()) if isinstance(tables, dict) else {tables}
        keep |= {v[name] for v in s["intake"].values() for name in ("state", "ids") if v.get(name)}
    for folder in NIGHTLY_STATE_FOLDERS:
        for info in store.list(prefix + folder):
            if info.key not in keep:
                store.delete(info.key)


def _report(manifest: dict, store_uri: str) -> None:
    intake = manifest["intake"]
    root = store_uri.rstrip("/")
    create_markdown_artifact(
        key=f"nightly-{manifest['date']}-report",
        markdown="\n".join(
            [f"# Nightly run of {manifest['date']}", "", f"Period {manifest['period']} to date.", "",
             f"Intake: {intake}", "", f"Alerts fired: {manifest['alerts_fired']}", "", "Outputs:", ""]
            + [f"- `{root}/{o['key']}`" for o in manifest["outputs"]]),
        description=f"Nightly run of {manifest['date']}")
    create_table_artifact(
        key=f"nightly-{manifest['date']}",
        table=[{"measure": k, "value": str(v)} for k, v in intake.items() if k != "removed"]
        + [{"measure": "alerts fired", "value": str(manifest["alerts_fired"])}]
        + [{"measure": f"over 80% of budget: {o['customer_id']}", "value": f"{o['spend_minor']}/{o['budget_minor']}"}
           for o in manifest["over_80_percent_of_budget"]],
        description=f"Nightly run of {manifest['date']} ({manifest['period']} to date)")
