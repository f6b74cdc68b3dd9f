"""Lineage from invoice line to event: which line billed each usage row, or why it did not bill.

One row per usage row the close counted (the manifest's `rows.read`): a billed row with the
invoice and line that billed it (and the credit grants that paid for it, on a meter paid with
credits), a duplicate with the copy that billed in its place, a quarantined row with its reason.
Per-event work is joins and a sort in DuckDB (transforms/sql/billed_events.sql); only the
distinct (meter, dims) texts and the distinct line keys are looked at in Python, and the texts
that many events share (their shape) join the sorted rows a batch at a time, by number.

Which line bills an event is the invoice's own rule (transforms.engine.invoices.charge_lines): the
usage or overage line of the event's subscription segment whose charge has the event's meter,
whose filter the event's dims match, and whose group (the charge's group_by values) is the
event's. Plans refuse two charges that could bill one event, so an event has at most one line.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import duckdb
import polars as pl

from transforms.engine.invoices import USAGE_LINE_KINDS
from transforms.queries import statements

SQL_FILE = "billed_events.sql"

LINEAGE_COLUMNS = {
    "customer_id": pl.String, "event_at": pl.Datetime("us", "UTC"), "event_id": pl.String, "meter": pl.String,
    "dims": pl.String, "quantity": pl.Decimal(38, 9), "subscription_id": pl.String, "segment_no": pl.Int64,
    "outcome": pl.String, "source_key": pl.String, "source_row": pl.Int64,
    "duplicate_of_source_key": pl.String, "duplicate_of_source_row": pl.Int64,
}
"""The checked usage's lineage files: one row per billed or duplicate row (checked_usage.sql)."""

BILLED_EVENTS_SCHEMA = {
    "customer_id": pl.String, "event_at": pl.Datetime("us", "UTC"), "event_id": pl.String, "meter": pl.String,
    "dims": pl.String, "quantity": pl.Decimal(38, 9), "status": pl.String, "invoice_id": pl.String,
    "line_no": pl.Int32, "grant_id": pl.String, "subscription_id": pl.String, "segment_no": pl.Int32,
    "reason": pl.String, "detail": pl.String, "duplicate_of": pl.String, "source_key": pl.String,
    "source_row": pl.Int64,
}


def _line_key(meter: str, dims_json: str, filter_json: str, group_json: str) -> str | None:
    """The group text a line with this filter and group would have for an event of `dims`, or
    None when the filter leaves the event out."""
    dims = json.loads(dims_json)
    wanted = json.loads(filter_json) if filter_json else {}
    if any(dims.get(k) != v for k, v in wanted.items()):
        return None
    group_by = list(json.loads(group_json)) if group_json else []
    return json.dumps({g: dims.get(g) for g in group_by}, sort_keys=True) if group_by else ""


def line_of_dims(event_dims: pl.DataFrame, lines: pl.DataFrame) -> pl.DataFrame:
    """One row per distinct (meter, dims) of the events x distinct (filter, group keys) of that
    meter's usage lines whose filter matches: the `group` text the event falls in for that filter."""
    shapes = (lines.select("meter", pl.col("filter").fill_null(""),
                           pl.col("group").fill_null("").alias("group_shape")).unique())
    candidates = event_dims.join(shapes, on="meter", how="inner")
    keys = [_line_key(*row) for row in candidates.select("meter", "dims", "filter", "group_shape").iter_rows()]
    return (candidates.with_columns(pl.Series("group", keys, dtype=pl.String))
            .filter(pl.col("group").is_not_null()).select("meter", "dims", "filter", "group").unique())


BUCKET_FOLDER = re.compile(r"bucket-(\d{4})$")
"""The folder of a lineage file of one bucket (`write_lineage`)."""


def bucket_bounds(customer_ids: pl.Series, buckets: int) -> tuple[str, ...]:
    """Where `buckets` ranges of customer_id begin, the first excepted (it begins below every id):
    each range holds about as many of `customer_ids` (the accounts) as the others. Empty for one."""
    ids = customer_ids.drop_nulls().unique().sort()
    if buckets <= 1 or ids.len() < 2:
        return ()
    starts = sorted({ids.len() * k // buckets for k in range(1, buckets)} - {0})
    return tuple(ids.gather(starts))


def customer_bucket(bounds: tuple[str, ...]) -> pl.Expr:
    """A row's bucket: the range of customer_id that its customer falls in (`bounds` are where
    ranges 1, 2, ... begin, compared byte by byte, as DuckDB sorts text); a row without a
    customer is in the last, as it sorts last."""
    if not bounds:
        return pl.lit(0, dtype=pl.Int32)
    return (pl.when(pl.col("customer_id").is_null()).then(pl.lit(len(bounds), dtype=pl.UInt32))
            .otherwise(pl.lit(pl.Series(bounds, dtype=pl.String)).search_sorted(pl.col("customer_id"), side="right"))
            .cast(pl.Int32))


def write_lineage(con: duckdb.DuckDBPyConnection, rows: duckdb.DuckDBPyRelation, to: Path,
                  bounds: tuple[str, ...], compression: str) -> tuple[str, ...]:
    """The lineage rows on `con` (checked_usage.sql `lineage`) written by DuckDB: to the file `to`,
    or, with `bounds`, into the folder `to`, a file for each range of customers (bucket) that has
    rows, in a folder `bucket-NNNN` of its own (what the folder held is gone: the lineage of an
    earlier check of the same rows). Returns the files' paths, in bucket order."""
    if not bounds:
        rows.write_parquet(str(to), compression=compression)
        return (str(to),)
    shutil.rmtree(to, ignore_errors=True)
    to.mkdir(parents=True)
    rows.create_view("lineage_rows")
    customers = con.sql(statements(SQL_FILE)["lineage_customers"]).pl()
    con.register("lineage_buckets", customers.with_columns(customer_bucket(bounds).alias("bucket")).to_arrow())
    written = to / "partitioned"
    con.sql(statements(SQL_FILE)["bucketed_lineage"]).write_parquet(
        str(written), partition_by=["bucket"], compression=compression)
    out = []
    for folder in sorted(written.iterdir(), key=lambda f: int(f.name.removeprefix("bucket="))):
        bucket = to / f"bucket-{int(folder.name.removeprefix('bucket=')):04d}"
        bucket.mkdir()
        for file in sorted(folder.iterdir()):
            out.append(str(file.rename(bucket / file.name)))
    for folder in written.iterdir():
        folder.rmdir()
    written.rmdir()
    return tuple(out)


def lineage_buckets(files: list[str]) -> dict[int, list[str]]:
    """The lineage files by bucket, in bucket order: a file in a folder `bucket-NNNN` is of that
    bucket; the files of a check that did not split them (no bounds) are all of bucket 0."""
    out: dict[int, list[str]] = {}
    for file in files:
        found = BUCKET_FOLDER.search(Path(file).parent.name)
        out.setdefault(int(found.group(1)) if found else 0, []).append(file)
    return dict(sorted(out.items()))


def prepare_buckets(con: duckdb.DuckDBPyConnection, buckets: dict[int, list[str]], lines: pl.DataFrame,
                    quarantine: pl.DataFrame, ledger: pl.DataFrame, bounds: tuple[str, ...]) -> list[int]:
    """Ready `con` to make billed_events a bucket at a time (`bucket_rows`, `bucket_shapes`,
    `source_keys`): the row shapes of every bucket, numbered within it, with their invoice lines;
    the customers of each bucket and the source objects, numbered in their ids' order; the credit
    grants of each event and the quarantined rows, each in its customer's bucket. Returns the
    buckets that have rows, in order.

    `buckets`: the checked usage's Parquet files of billed and duplicate rows (checked_usage.sql,
    `lineage`) by bucket (`lineage_buckets`); `lines`: the invoice_lines table; `quarantine`: the
    quarantine table; `ledger`: the credit ledger (its `consume` entries name the event each
    credit draw paid for); `bounds`: the ranges of customer_id the buckets are (`bucket_bounds`)."""
    sql = statements(SQL_FILE)
    con.execute("SET TimeZone = 'UTC'")
    usage_lines = (lineage_lines(lines)
                   .select("invoice_id", pl.col("line_no").cast(pl.Int32), "subscription_id",
                           pl.col("segment_no").cast(pl.Int32), "meter",
                           pl.col("filter").fill_null(""), pl.col("group").fill_null("")))
    con.execute(sql["row_shapes"])
    con.execute(sql["source_keys"])
    for bucket, files in buckets.items():
        _lineage_part(con, files)
        con.execute(sql["bucket_shapes"], {"bucket": bucket})
        con.execute(sql["bucket_sources"])
    set_aside = set_aside_rows(quarantine).with_columns(customer_bucket(bounds).alias("bucket"),
                                                        pl.int_range(pl.len(), dtype=pl.Int64).alias("row_no"))
    con.register("set_aside_rows", set_aside.to_arrow())
    con.execute(sql["customers"])
    con.execute(sql["sources"])
    event_dims = con.sql(sql["billed_dims"]).pl()
    con.register("keyed", line_of_dims(event_dims, usage_lines).to_arrow())
    con.register("usage_lines", usage_lines.to_arrow())
    con.execute(sql["shapes"])
    shapes = dict(con.execute(sql["shape_counts"]).fetchall())
    grants = (credit_draws(ledger).with_columns(customer_bucket(bounds).alias("bucket"))
              .group_by("event_id").agg(pl.col("bucket").first(), pl.col("grant_id").unique().sort().str.join(",")))
    con.register("grant_rows", grants.select("bucket", pl.col("event_id").cast(pl.String),
                                             pl.col("grant_id").cast(pl.String)).to_arrow())
    con.execute(sql["grants"])
    own_shape = (pl.int_range(pl.len(), dtype=pl.Int32).over("bucket")
                 + pl.col("bucket").replace_strict(shapes, default=0, return_dtype=pl.Int32))
    con.register("set_aside_shapes", set_aside.select("row_no", own_shape.alias("shape")).to_arrow())
    con.execute(sql["set_aside"])
    return sorted(set(buckets) | set(set_aside["bucket"].unique().to_list()))


def _lineage_part(con: duckdb.DuckDBPyConnection, files: list[str]) -> None:
    if files:
        con.read_parquet(list(files)).create_view("lineage_part")
    else:
        con.register("lineage_part", pl.DataFrame(schema=LINEAGE_COLUMNS).to_arrow())


def bucket_rows(con: duckdb.DuckDBPyConnection, bucket: int,
                files: list[str]) -> tuple[duckdb.DuckDBPyRelation, int]:
    """One bucket's rows of billed_events, sorted by customer, event time, event_id and source: a
    relation on `con` (transforms/sql/billed_events.sql, `prepare_buckets` first) of each row's
    own columns and the numbers of its customer, shape and source object (`bucket_shapes` and
    `source_keys` have the rest: they sort as the texts do), run by its reader, so the
    bucket's events are joined and sorted by DuckDB under the connection's memory cap; and how
    many lineage rows the bucket has (from the files' metadata). `files`: its lineage files."""
    sql = statements(SQL_FILE)
    _lineage_part(con, files)
    [(count,)] = con.execute(sql["bucket_size"]).fetchall()
    return con.sql(sql["billed_events"], params={"bucket": bucket}), count


def bucket_shapes(con: duckdb.DuckDBPyConnection, bucket: int) -> pl.DataFrame:
    """One row per shape number of a bucket's `bucket_rows`, in number order: its lineage rows'
    shapes, then each of its quarantined rows' own."""
    shapes = con.sql(statements(SQL_FILE)["shape_columns"], params={"bucket": bucket}).pl()
    return shapes.cast({c: BILLED_EVENTS_SCHEMA[c] for c in shapes.columns})


def source_keys(con: duckdb.DuckDBPyConnection) -> pl.DataFrame:
    """One row per source object number of `bucket_rows`, in number order: its source_key."""
    return con.sql(statements(SQL_FILE)["source_columns"]).pl().cast({"source_key": pl.String})


def events_of(rows: pl.DataFrame, shapes: pl.DataFrame, sources: pl.DataFrame) -> pl.DataFrame:
    """billed_events' rows, in its columns, of a batch of `bucket_rows`' sorted rows: each row's
    own columns with those of its shape and of its source object (looked up by number in
    `bucket_shapes` and `source_keys`)."""
    return (pl.concat([rows, shapes.select(pl.all().gather(rows["shape"])),
                       sources.select(pl.all().gather(rows["source_no"]))], how="horizontal")
            .select([pl.col(c).cast(t) for c, t in BILLED_EVENTS_SCHEMA.items()]))


def lineage_lines(lines: pl.DataFrame) -> pl.DataFrame:
    """The lines of an invoice_lines table that bill events: its usage and overage lines (all
    that `billed_events` reads of the table)."""
    return lines.filter(pl.col("kind").is_in(USAGE_LINE_KINDS))


def credit_draws(ledger: pl.DataFrame) -> pl.DataFrame:
    """The credit ledger's entries that paid for one event: its `consume` entries with an
    event_id (all that `billed_events` reads of the ledger)."""
    return ledger.filter((pl.col("kind") == "consume") & pl.col("event_id").is_not_null())


def set_aside_rows(quarantine: pl.DataFrame) -> pl.DataFrame:
    """One row per quarantined row, in billed_events' columns: its event time and quantity as
    far as they parse, the reason and detail it was set aside for."""
    rows = quarantine.select(
        "customer_id",
        pl.col("timestamp").str.to_datetime(time_zone="UTC", strict=False).alias("event_at"),
        "event_id", "meter", "dims", pl.col("quantity").cast(pl.Decimal(38, 9), strict=False),
        pl.lit("quarantined").alias("status"), "reason", "detail", "source_key", "source_row")
    return rows.with_columns([pl.lit(None, dtype=t).alias(c) for c, t in BILLED_EVENTS_SCHEMA.items()
                              if c not in rows.columns]).select(
        [pl.col(c).cast(t) for c, t in BILLED_EVENTS_SCHEMA.items()])


STATEMENT_COLUMNS = ("row", "line_no", "kind", "description", "meter", "event_id", "event_at", "dims", "quantity",
                     "grant_id", "event_units", "included_units", "credited_units", "billed_quantity",
                     "amount_minor", "currency")


def decimal_text(expr: pl.Expr) -> pl.Expr:
    """An exact decimal as plain text without trailing zeros: 12.500000000 -> 12.5, 3.000 -> 3."""
    return expr.cast(pl.String).str.replace(r"\.?0+$", "").str.replace(r"^$", "0")


def statement_rows(events: pl.DataFrame, lines: pl.DataFrame) -> pl.DataFrame:
    """One invoice's usage statement: per line in order, the events it billed (one row each, in
    event-time order), then the line's total row; then one invoice total row.

    A line's total row reproduces the invoice: `event_units` (the sum of its events' quantities)
    less `credited_units` (what credit grants paid for, on a meter paid with credits) is the
    line's total_units; less `included_units` (the plan's allowance used) it is the billed
    quantity, which the line's price rated into `amount_minor`. Lines without events (fees, tax,
    waivers) show their quantity and amount only. `events`: the invoice's billed_events rows."""
    currency = lines["currency"][0] if lines.height else None
    units = pl.Decimal(38, 9)
    event_rows = events.select(
        pl.lit("event").alias("row"), pl.col("line_no").cast(pl.Int32), "meter", "event_id",
        pl.col("event_at").dt.strftime("%Y-%m-%dT%H:%M:%S%.fZ").alias("event_at"), "dims",
        decimal_text(pl.col("quantity")).alias("quantity"), "grant_id")
    sums = events.group_by("line_no").agg(pl.col("quantity").sum().alias("event_units"))
    metered = pl.col("kind").is_in(USAGE_LINE_KINDS)
    totals = (lines.select(pl.col("line_no").cast(pl.Int32), "kind", "description", "meter", "quantity",
                           "total_units", "included_units", "amount_minor")
              .join(sums.with_columns(pl.col("line_no").cast(pl.Int32)), on="line_no", how="left")
              .with_columns(pl.when(metered).then(pl.col("event_units").fill_null(0).cast(units)).alias("event_units"))
              .select(pl.lit("line_total").alias("row"), "line_no", "kind", "description", "meter",
                      decimal_text(pl.col("event_units")).alias("event_units"),
                      pl.when(metered).then(pl.col("included_units").fill_null("0")).alias("included_units"),
                      pl.when(metered).then(decimal_text(pl.col("event_units")
                                                         - pl.col("total_units").cast(units))).alias("credited_units"),
                      pl.col("quantity").alias("billed_quantity"), "amount_minor"))
    invoice_total = pl.DataFrame({"row": ["invoice_total"], "amount_minor": [int(lines["amount_minor"].sum())]})
    return (pl.concat([event_rows.with_columns(pl.lit(0).alias("_order")),
                       totals.with_columns(pl.lit(1).alias("_order")),
                       invoice_total.with_columns(pl.lit(2).alias("_order"))], how="diagonal_relaxed")
            .sort(pl.col("line_no").is_null(), "line_no", "_order", "event_at", "event_id",
                  nulls_last=True)
            .with_columns(pl.lit(currency, dtype=pl.String).alias("currency"))
            .select(STATEMENT_COLUMNS))
