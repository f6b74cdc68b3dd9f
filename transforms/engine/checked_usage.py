"""A period's usage checked in DuckDB: scoped to the period, checked, deduplicated, aggregated.

The heavy, row-level work happens here, in SQL over local Parquet (DuckDB spills what does not
fit in memory); what comes out is small: counts, the quarantined rows, and the billed units per
subscription segment x meter x dimensions.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from decimal import Decimal
from operator import attrgetter
from pathlib import Path

import duckdb
import polars as pl

from transforms.credits.model import CreditEvent
from transforms.engine.billed_index import NO_INDEX, BilledIndex, id_hash_macro, look_up_billed
from transforms.engine.lineage import write_lineage
from transforms.inputs.plans import Catalog
from transforms.inputs.reference import Subscription, plan_on
from transforms.inputs.usage import MAX_QUANTITY, NORMALIZED_COLUMNS
from transforms.money import minor_exponent
from transforms.periods import Period
from transforms.pricing import Usage, rate
from transforms.queries import statements

_PARAM = re.compile(r"\$(\w+)")

SQL_FILE = "checked_usage.sql"
COPIES_SQL = "copies.sql"


def copy_order_macro(con: duckdb.DuckDBPyConnection) -> None:
    """`copy_order(...)`: which copy of an event_id counts (copies.sql), for every check,
    the close's and each night's, to rank copies by."""
    con.execute(statements(COPIES_SQL)["copy_order_macro"]).fetchall()


@dataclass(frozen=True)
class CheckedUsage:
    """A period's (or a shard's) usage, checked, deduplicated and aggregated: the row counts, the
    rows set aside, the billed units by dims and by day, the per-event rows, the credit history."""

    counts: dict[str, int]
    quarantine: pl.DataFrame
    usage_by_dims: pl.DataFrame
    usage_by_day: pl.DataFrame
    per_event_usage: pl.DataFrame
    credit_history: list[CreditEvent]
    lineage: tuple[str, ...] = ()  # Parquet files of the billed and duplicate rows (see `lineage` in the SQL)
    conflicts: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=CONFLICT_SCHEMA))
    billed_ids: tuple[Path, ...] = ()  # Parquet files of the billed events (event_id, id_hash), when asked for
    lineage_bounds: tuple[str, ...] = ()  # the customer ranges of the lineage files (transforms.engine.lineage)


CONFLICT_SCHEMA = {
    "source_key": pl.String, "source_row": pl.Int64, "event_id": pl.String, "customer_id": pl.String,
    "meter": pl.String, "dims": pl.String, "quantity": pl.Decimal(38, 9), "event_at": pl.Datetime("us", "UTC"),
    "differs_in": pl.String, "kept_source_key": pl.String, "kept_source_row": pl.Int64, "kept_outcome": pl.String,
    "kept_customer_id": pl.String, "kept_meter": pl.String, "kept_dims": pl.String,
    "kept_quantity": pl.Decimal(38, 9), "kept_event_at": pl.Datetime("us", "UTC"),
}
"""One row per duplicate copy whose content differs from the copy that counts (checked_usage.sql)."""


QUARANTINE_SCHEMA = {
    "source_key": pl.String, "source_row": pl.Int64, "event_id": pl.String, "customer_id": pl.String,
    "meter": pl.String, "quantity": pl.String, "timestamp": pl.String, "dims": pl.String,
    "reason": pl.String, "detail": pl.String, "source": pl.String,
}
"""The quarantine table: one row per usage row set aside, and per object that could not be read."""


def quarantine_table(quarantine: pl.DataFrame, unreadable) -> pl.DataFrame:
    """One row per quarantined row (a checked usage's `quarantine`), plus one per object that could
    not be read (`unreadable`: (key, why); its source_row empty), in source order."""
    whole = pl.DataFrame([{"source_key": key, "source_row": None, "reason": "unreadable_object", "detail": why}
                          for key, why in unreadable],
                         schema={"source_key": pl.String, "source_row": pl.Int64, "reason": pl.String,
                                 "detail": pl.String})
    table = pl.concat([quarantine, whole], how="diagonal_relaxed").with_columns(
        pl.when(pl.col("source_row").is_null()).then(pl.col("source_key"))
        .otherwise(pl.format("{}#row={}", pl.col("source_key"), pl.col("source_row"))).alias("source"))
    return table.select([pl.col(c).cast(t) for c, t in QUARANTINE_SCHEMA.items()]).sort(
        "source_key", "source_row", nulls_last=False)


def quarantined_by_reason(quarantine: pl.DataFrame) -> dict[str, int]:
    """Rows of a quarantine table per reason code, in code order (the manifest's account)."""
    return dict(sorted(quarantine.group_by("reason").len().iter_rows()))


def usage_row_counts(counts: dict[str, int], unreadable: int) -> dict[str, int]:
    """The account of a run's usage rows: read = billed + duplicates + quarantined. `counts` is a
    checked usage's; an object that could not be read (`unreadable` of them) counts as one row read
    and quarantined, since its rows cannot be told apart."""
    return {"read": counts["read"] + unreadable, "billed": counts["billed"], "duplicates": counts["duplicates"],
            "quarantined": counts["quarantined"] + unreadable}


ROW_AMOUNT_LIMIT_MINOR = 10 ** 13
"""The most one usage event may bill, in minor units (100 billion dollars, 10 trillion yen). An
invoice line is an int64 of minor units (at most about 9.2 x 10^18): it takes more than 900,000
events at this limit, for one subscription, meter and line in one period, to overflow it. A row
whose amount at its plan's price would exceed the limit is `amount_out_of_range`."""


_LARGEST: dict[tuple[str, str], Decimal] = {}  # every shard settles with the same catalog: bound each price once


def largest_quantity(price, currency: str) -> Decimal:
    """The largest quantity (a whole number of units, below MAX_QUANTITY) one event may have for
    its amount at `price` to stay within ROW_AMOUNT_LIMIT_MINOR. Found by halving with the charge
    model's own rating, so every model (tiers, packages, percentages and their fees) bounds itself."""
    key = (price.model_dump_json(), currency)
    if key not in _LARGEST:
        _LARGEST[key] = _largest_quantity(price, currency)
    return _LARGEST[key]


def _largest_quantity(price, currency: str) -> Decimal:
    limit = Decimal(ROW_AMOUNT_LIMIT_MINOR).scaleb(-minor_exponent(currency))

    free = [Decimal(0)] * getattr(price, "free_events", 0)  # the event probed is one that pays

    def fits(units: int) -> bool:
        quantity = Decimal(units)
        return rate(price, Usage(quantity, len(free) + 1, (*free, quantity))).amount <= limit

    low, high = 0, MAX_QUANTITY  # fits(low); a quantity of MAX_QUANTITY is refused anyway
    if fits(high - 1):
        return Decimal(high - 1)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return Decimal(low)


def plan_meters(catalog: Catalog) -> pl.DataFrame:
    """One row per plan version x meter it prices or pays with credits, flagged when it must be
    handled event by event (per-event fees, credit draws), with the largest quantity one event
    may have for every charge of the meter to bill it within ROW_AMOUNT_LIMIT_MINOR (null: only
    the quantity's own bound, for a meter no charge prices)."""
    rows, largest = {}, {}
    for f in catalog.files.values():
        for charge in f.plan.charges:
            key = (f.plan.plan, f.plan.version, charge.meter)
            rows[key] = rows.get(key, False) or charge.price.model in PER_EVENT_MODELS or f.plan.consumes(charge.meter)
            bound = largest_quantity(charge.price, f.plan.currency)
            largest[key] = min(largest.get(key, bound), bound)
        for meter in (f.plan.credits.consume if f.plan.credits else ()):
            rows[(f.plan.plan, f.plan.version, meter)] = True  # credits are drawn event by event
    keys = sorted(rows)
    return pl.DataFrame({"plan": [k[0] for k in keys], "plan_version": [k[1] for k in keys],
                         "meter": [k[2] for k in keys], "per_event": [rows[k] for k in keys],
                         "max_quantity": [largest.get(k) for k in keys]},
                        schema={"plan": pl.String, "plan_version": pl.Int32, "meter": pl.String,
                                "per_event": pl.Boolean, "max_quantity": pl.Decimal(38, 9)})


PER_EVENT_MODELS = frozenset({"percentage"})
"""Models whose price depends on each event (per-event fees, free first events), not on a sum."""


def priced_dims(combos: pl.DataFrame, catalog: Catalog) -> pl.DataFrame:
    """The rows of `combos` (plan, plan_version, meter, dims) that a charge of the plan version
    prices: same meter, and every key of the charge's filter has its value in the dimensions."""
    keep = []
    for plan, version, meter, dims_json in combos.iter_rows():
        dims = json.loads(dims_json)
        charges = catalog.get(plan, version).plan.charges
        plan_file = catalog.get(plan, version).plan
        keep.append(any(c.prices(meter, dims) for c in charges) or
                    (plan_file.credits is not None and plan_file.credits.unit == "credits" and plan_file.consumes(meter)
                     and _has_rate(plan_file.credits.consume[meter], dims)))
    return combos.filter(pl.Series(keep, dtype=pl.Boolean))


def _has_rate(rate, dims: dict) -> bool:
    """A per-dimension credit rate must know the event's value (or have a default)."""
    return not hasattr(rate, "rates") or rate.default is not None or dims.get(rate.by) in rate.rates


def credit_history(con: duckdb.DuckDBPyConnection, subscriptions: list[Subscription], catalog: Catalog,
                   period: Period) -> list[CreditEvent]:
    """Billed events of earlier periods that drew credits, for replaying wallets from the start:
    per event_id the earliest copy that a subscription's plan at that time pays with credits."""
    meters = sorted({m for f in catalog.files.values() if f.plan.credits
                     for m in ([c.meter for c in f.plan.charges] if f.plan.credits.unit == "money"
                               else f.plan.credits.consume)})
    if not meters:
        return []
    rows = con.sql(statements(SQL_FILE)["credit_history"],
                   params={"period_start": period.start_at, "meters": meters}).fetchall()
    if not rows:  # most checks: no earlier copy (indexing 100k subscriptions per shard is not free)
        return []
    by_customer: dict[str, list[Subscription]] = {}
    for sub in subscriptions:
        by_customer.setdefault(sub.customer_id, []).append(sub)
    out, seen = [], set()
    for event_id, customer_id, meter, dims, quantity, event_at in rows:
        if event_id in seen:
            continue
        day = event_at.date()
        sub = next((s for s in by_customer.get(customer_id, ()) if s.active_on(day)), None)
        if sub is None:
            continue
        plan = plan_on(sub, catalog, day).plan
        if not plan.consumes(meter) or not (plan.credits.unit == "money" or
                                            _has_rate(plan.credits.consume[meter], json.loads(dims))):
            continue
        if plan.credits.unit == "money" and not any(c.prices(meter, json.loads(dims)) for c in plan.charges):
            continue
        seen.add(event_id)
        out.append(CreditEvent(customer_id, sub.subscription_id, None, event_id, event_at, meter, dims, quantity))
    return out


def _bound(sql: str, params: dict) -> dict:
    """The parameters one statement names (DuckDB refuses any it does not)."""
    return {name: params[name] for name in _PARAM.findall(sql)}


def _run(con: duckdb.DuckDBPyConnection, sql: str, params: dict) -> list[tuple]:
    """Execute one statement with the parameters it names, and finish its result."""
    return con.execute(sql, _bound(sql, params)).fetchall()


def billed_elsewhere(copies: pl.DataFrame, subscriptions: list[Subscription], catalog: Catalog) -> set[str]:
    """The event_ids among `copies` (event_id, customer_id, meter, dims, event_at) of which some
    copy billed where it stands: its customer had a subscription then, on a plan version with a
    charge for its meter and dimensions."""
    by_customer: dict[str, list[Subscription]] = {}
    for sub in subscriptions:
        by_customer.setdefault(sub.customer_id, []).append(sub)
    billed = set()
    for event_id, customer_id, meter, dims_json, event_at in copies.iter_rows():
        if event_id in billed:
            continue
        plan = next((plan_on(sub, catalog, event_at.date()) for sub in by_customer.get(customer_id, ())
                     if sub.active_on(event_at.date())), None)
        if plan is not None and any(c.prices(meter, json.loads(dims_json)) for c in plan.plan.charges):
            billed.add(event_id)
    return billed


LINEAGE_COMPRESSION = "snappy"
"""The lineage files live minutes and are read once (the billed_events output): snappy writes a
shard's 1.25M rows in about two thirds of zstd's CPU (1.07 against 1.63 s), for 1.8x the bytes
(about 44 against 25 bytes a row); lz4 costs more CPU than snappy here for about the same bytes."""


CHECKED_TABLES = ("quarantine", "usage_by_dims", "usage_by_day", "per_event_usage", "conflicts", "credit_history")
"""The tables of a checked usage, each a Parquet file of CheckedFiles (merged_usage.sql merges each)."""

CREDIT_HISTORY_SCHEMA = {
    "customer_id": pl.String, "subscription_id": pl.String, "segment_no": pl.Int64, "event_id": pl.String,
    "event_at": pl.Datetime("us", "UTC"), "meter": pl.String, "dims": pl.String, "quantity": pl.Decimal(38, 9),
}
"""The credit history as a table: one row per CreditEvent, its fields in order."""


def credit_history_frame(events: list[CreditEvent]) -> pl.DataFrame:
    """The credit history as a table (CREDIT_HISTORY_SCHEMA), in its order."""
    fields = attrgetter(*CREDIT_HISTORY_SCHEMA)
    return pl.DataFrame([fields(e) for e in events], schema=CREDIT_HISTORY_SCHEMA, orient="row")


def checked_tables(checked: CheckedUsage) -> dict[str, pl.DataFrame]:
    """A checked usage's tables by name (CHECKED_TABLES), the credit history as a frame."""
    history = credit_history_frame(checked.credit_history)
    return {"quarantine": checked.quarantine, "usage_by_dims": checked.usage_by_dims,
            "usage_by_day": checked.usage_by_day, "per_event_usage": checked.per_event_usage,
            "conflicts": checked.conflicts, "credit_history": history}


@dataclass(frozen=True)
class CheckedFiles:
    """A checked usage whose tables are Parquet files (`tables`: name -> path, CHECKED_TABLES):
    what a task hands over is this handle, and each table is read where a step needs it, so
    no process holds the period's per-day units between the steps that read them. Its
    attributes read as CheckedUsage's (each access reads the file again: keep what you need)."""

    counts: dict[str, int]
    tables: dict[str, str]
    lineage: tuple[str, ...] = ()
    billed_ids: tuple = ()
    lineage_bounds: tuple[str, ...] = ()

    def scan(self, name: str) -> pl.LazyFrame:
        return pl.scan_parquet(self.tables[name])

    def _read(self, name: str) -> pl.DataFrame:
        return pl.read_parquet(self.tables[name])

    @property
    def quarantine(self) -> pl.DataFrame:
        return self._read("quarantine")

    @property
    def usage_by_dims(self) -> pl.DataFrame:
        return self._read("usage_by_dims")

    @property
    def usage_by_day(self) -> pl.DataFrame:
        return self._read("usage_by_day")

    @property
    def per_event_usage(self) -> pl.DataFrame:
        return self._read("per_event_usage")

    @property
    def conflicts(self) -> pl.DataFrame:
        return self._read("conflicts").cast(CONFLICT_SCHEMA)

    @property
    def credit_history(self) -> list[CreditEvent]:
        return [CreditEvent(*row) for row in self._read("credit_history").cast(CREDIT_HISTORY_SCHEMA).iter_rows()]

    def loaded(self) -> CheckedUsage:
        """The same checked usage in memory (for a result kept after its files are gone)."""
        return CheckedUsage(self.counts, self.quarantine, self.usage_by_dims, self.usage_by_day, self.per_event_usage,
                            self.credit_history, self.lineage, self.conflicts, self.billed_ids,
                            self.lineage_bounds)


MERGED_SQL = "merged_usage.sql"

SUMMED = "summed"
"""A part of the usage whose subscriptions other parts may have too: the merge re-adds the parts'
per-day units and sums the per-dims units from them, so the part writes its per-day units
unsorted and no per-dims units (work the merge would only redo)."""
DISJOINT = "disjoint"
"""A part of the usage whose subscriptions no other part has (a shard of customers): the merge
only puts the parts' units in order, so the part writes its per-day units unsorted and its
per-dims units."""


def merged_files(con: duckdb.DuckDBPyConnection, parts: list[CheckedFiles], folder: Path,
                 disjoint: bool = False) -> CheckedFiles:
    """One checked usage from those of disjoint shards of the usage (merged_usage.sql), each table
    read from the shards' files and written to `folder` by DuckDB: within `con`'s memory limit,
    it spills rather than grows. The parts are SUMMED ones, or, when `disjoint`, DISJOINT ones,
    whose units are concatenated in order rather than added up. The result is the same, byte for
    byte, whatever the number of shards and however they split the rows; one part (checked
    whole) is returned as it is."""
    if len(parts) == 1:
        return parts[0]
    sql = statements(MERGED_SQL)
    con.execute("SET TimeZone = 'UTC'")
    folder.mkdir(parents=True, exist_ok=True)
    tables = {}
    for name in CHECKED_TABLES:
        if name == "usage_by_dims" and not disjoint:
            continue  # summed from the merged usage_by_day below
        files = [p.tables[name] for p in parts]
        positional = name == "credit_history"  # copies of an event_id keep their shard's order
        con.read_parquet(files, filename=positional, file_row_number=positional).create_view(f"{name}_parts")
        tables[name] = str(folder / f"{name}.parquet")
        query = sql[f"{name}_disjoint" if disjoint and name in ("usage_by_day", "usage_by_dims") else name]
        con.sql(query).write_parquet(tables[name], compression="lz4")
    if not disjoint:
        con.read_parquet(tables["usage_by_day"]).create_view("usage_by_day_merged")
        tables["usage_by_dims"] = str(folder / "usage_by_dims.parquet")
        con.sql(sql["usage_by_dims"]).write_parquet(tables["usage_by_dims"], compression="lz4")
    return CheckedFiles(counts={k: sum(p.counts[k] for p in parts) for k in parts[0].counts}, tables=tables,
                        lineage=tuple(f for p in parts for f in p.lineage),
                        billed_ids=tuple(path for p in parts for path in p.billed_ids),
                        lineage_bounds=parts[0].lineage_bounds)


def checked_usage(con: duckdb.DuckDBPyConnection, normalized: list[Path], customers: pl.DataFrame,
                  subscriptions: list[Subscription], segments: pl.DataFrame, catalog: Catalog,
                  period: Period, tables_to: Path, index: BilledIndex = NO_INDEX, billed_out: Path | None = None,
                  lineage_to: Path | None = None, part: str | None = None,
                  lineage_bounds: tuple[str, ...] = ()) -> CheckedFiles:
    """Settle the rows of `normalized` (Parquet files of `transforms.inputs.usage.NORMALIZED_COLUMNS`).

    `segments`: the period's subscription segments as a table (`segments_frame`), made once
    for every shard of a close rather than once per shard (100k segments: 0.3 CPU s each time).
    The checked usage's tables (CHECKED_TABLES) are written by DuckDB into the folder `tables_to`,
    a Parquet file each: the per-day units and per-event rows never become frames here.
    `index`: the billed-event index of the decided periods: an event their documents bill is not
    billed here (its copy is quarantined as `billed_in_period`). `billed_out`: where to write the
    billed events (event_id, id_hash), this check's part of the period's index. With
    `lineage_to`, also write there the billed and duplicate rows, one row each (the lineage of the
    billed_events output), straight from DuckDB: never a frame in memory; with `lineage_bounds`,
    `lineage_to` is a folder, and the rows of each range of customers that the bounds begin are a
    file of their own in it (transforms.engine.lineage.write_lineage). `part`: these rows are
    one part of the usage, whose tables `merged_files` merges with the other parts' (SUMMED or
    DISJOINT: which tables the part writes, and in what order)."""
    sql = statements(SQL_FILE)
    con.execute("SET TimeZone = 'UTC'")
    id_hash_macro(con)
    copy_order_macro(con)
    if normalized:
        con.read_parquet([str(p) for p in normalized]).create_view("events")
    else:
        con.register("events", pl.DataFrame(schema=NORMALIZED_COLUMNS).to_arrow())
    con.register("customers", customers.select("customer_id").to_arrow())
    con.register("segments", segments.with_row_index("segment_key").to_arrow())
    con.register("plan_meters", plan_meters(catalog).to_arrow())
    params = {"period": str(period), "period_start": period.start_at, "period_end": period.end_at,
              "first_day": period.start, "decided": list(index.periods)}
    _run(con, sql["candidates"], params)
    combos = con.sql(sql["dims_to_price"], params=_bound(sql["dims_to_price"], params)).pl()
    con.register("price_combos", combos.to_arrow())
    con.register("priced_dims", priced_dims(combos, catalog).to_arrow())
    _run(con, sql["combinations"], params)
    _run(con, sql["segment_names"], params)
    if index:
        _run(con, sql["probed"], params)
    look_up_billed(con, index)
    billed_before: set[str] = set()
    if _run(con, sql["any_earlier"], params)[0][0]:  # most closes read no earlier rows at all
        earlier = con.sql(sql["earlier_copies"], params=_bound(sql["earlier_copies"], params)).pl()
        billed_before = billed_elsewhere(earlier, subscriptions, catalog)
    con.register("billed_before", pl.DataFrame({"event_id": sorted(billed_before)},
                                               schema={"event_id": pl.String}).to_arrow())
    _run(con, sql["settled"], params)
    _run(con, sql["later_copies"], params)
    _run(con, sql["later_copies_settled"], params)
    counts = dict(zip(("read", "billed", "duplicates", "quarantined"),
                      (int(v) for v in _run(con, sql["counts"], params)[0]), strict=True))
    _run(con, sql["by_day"], params)
    _run(con, sql["dims_units"], params)
    lineage: tuple[str, ...] = ()
    if lineage_to is not None:
        lineage = write_lineage(con, con.sql(sql["lineage"]), lineage_to, lineage_bounds, LINEAGE_COMPRESSION)
    if billed_out is not None:
        billed_out.parent.mkdir(parents=True, exist_ok=True)
        con.sql(sql["billed_ids"]).write_parquet(str(billed_out), compression="lz4")
    tables_to.mkdir(parents=True, exist_ok=True)
    tables = {name: str(tables_to / f"{name}.parquet") for name in CHECKED_TABLES}
    if part == SUMMED:
        del tables["usage_by_dims"]
    for name in ("quarantine", "usage_by_dims", "usage_by_day", "per_event_usage", "conflicts"):
        if name in tables:  # a part's aggregates and per-event rows unsorted: the merge orders them
            query = sql[f"{name}_part" if part and f"{name}_part" in sql else name]
            con.sql(query, params=_bound(query, params)).write_parquet(tables[name], compression="lz4")
    credit_history_frame(credit_history(con, subscriptions, catalog, period)).write_parquet(
        tables["credit_history"], compression="lz4")
    return CheckedFiles(counts, tables, billed_ids=(billed_out,) if billed_out is not None else (),
                        lineage=lineage, lineage_bounds=lineage_bounds if lineage_to is not None else ())
