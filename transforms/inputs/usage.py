"""Usage events at the boundary: one raw object in, one normalized frame out.

One row per input row, in input order, whatever the object's format: the core fields as text,
the parsed `quantity` (DECIMAL(38,9)) and `event_at` (UTC instant), every other column folded into
`dims` (canonical JSON, keys sorted, nulls left out), and `reason`, the quarantine code of a row
that breaks a rule of its own (missing_field, bad_timestamp, bad_quantity, negative_quantity,
amount_out_of_range), with `detail` where more is useful. A line of the object that does not
parse at all is a row of its own with reason `malformed_line` (`malformed_usage`).
Rules that need other tables (unknown_customer, unknown_meter, ...) are settled later, in SQL.
"""
from __future__ import annotations

import functools
import json

import duckdb
import pandera.polars as pa
import polars as pl
from pandera.errors import SchemaErrors

CORE_FIELDS = ("event_id", "customer_id", "meter", "quantity", "timestamp")

QUANTITY = pl.Decimal(38, 9)
"""Quantities keep 9 decimal places; a row that needs more is refused, never silently rounded."""

MAX_QUANTITY = 10 ** 18
"""Quantities stay below 10^18 units, so a sum of up to 10^11 of them (100 billion events of one
subscription, meter and dimensions in a shard) fits DECIMAL(38, 9), the type DuckDB sums them in.
A larger quantity is `amount_out_of_range`: it could not be added up, let alone billed. The
amount a quantity bills at its plan's prices is bounded when usage is checked (`transforms.engine.checked_usage`)."""

# Reason codes of the row-level rules, most telling first: a row is quarantined with the first.
ROW_REASONS = ("missing_field", "bad_timestamp", "bad_quantity", "negative_quantity", "amount_out_of_range")

MALFORMED_LINE = "malformed_line"
"""The reason of a CSV or JSON line that does not parse (a row with no fields to check)."""

UNSUPPORTED_LEAVES = (pl.Duration, pl.Object)
"""Column types a dimension cannot be written from as text: the object is set aside whole."""

NORMALIZED_COLUMNS = {
    "source_key": pl.String,
    "source_row": pl.Int64,
    "event_id": pl.String,
    "customer_id": pl.String,
    "meter": pl.String,
    "quantity_raw": pl.String,
    "timestamp_raw": pl.String,
    "dims": pl.String,
    "quantity": QUANTITY,
    "event_at": pl.Datetime("us", "UTC"),
    "reason": pl.String,
    "detail": pl.String,
}


class UnreadableUsage(ValueError):
    """A usage object whose columns billrun cannot read as usage (the whole object is set aside)."""

_PARSE_SQL = r"""
-- One row per input row: parse quantity and timestamp exactly, never guessing.
SELECT *,
       TRY_CAST(quantity_raw AS DECIMAL(38, 9)) AS quantity,
       -- Exactness is judged on the text, before any cast can round: a plain decimal number
       -- (optionally with an exponent) whose significant fraction needs at most 9 places.
       NOT coalesce(
           regexp_full_match(quantity_raw, '[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d{1,4})?')
           AND length(rtrim(regexp_extract(quantity_raw, '\.(\d*)', 1), '0'))
               - coalesce(TRY_CAST(regexp_extract(quantity_raw, '[eE]([+-]?\d+)', 1) AS INTEGER), 0) <= 9,
           FALSE) AS quantity_inexact,
       CASE WHEN timestamp_typed IS NOT NULL THEN timestamp_typed
            -- ISO 8601 (RFC 3339 section 5.6) allows a lower-case t separator and z for UTC
            ELSE TRY_CAST(regexp_replace(regexp_replace(timestamp_raw, '^(\d{4}-\d{2}-\d{2})t', '\1T'),
                                         'z$', 'Z') AS TIMESTAMPTZ) END AS event_at
FROM raw
"""

_TEXT_FIELDS = ("event_id", "customer_id", "meter", "quantity_raw", "timestamp_raw")

ROW_RULES = {
    # normalized_usage strips the text fields as it reads them: a field of blanks is empty here
    "missing_field": pl.all_horizontal([pl.col(c).is_not_null() & (pl.col(c) != "") for c in _TEXT_FIELDS]),
    "bad_timestamp": pl.col("timestamp_raw").is_null() | pl.col("event_at").is_not_null(),
    "bad_quantity": pl.col("quantity_raw").is_null()
                    | (pl.col("quantity").is_not_null() & ~pl.col("quantity_inexact").fill_null(True)),
    "negative_quantity": pl.col("quantity").is_null() | (pl.col("quantity") >= 0),
    "amount_out_of_range": pl.col("quantity").is_null() | (pl.col("quantity") < MAX_QUANTITY),
}
"""Each row-level rule as a Polars expression over the parsed rows, true where a row keeps it,
keyed by its reason code: the checks of `RowRules`."""


class RowRules(pa.DataFrameModel):
    """The rules one usage row must keep on its own. Each check is named by its reason code,
    so pandera's collected failure cases (lazy validation: all of them, not the first) map
    straight to quarantine reasons."""

    source_key: str
    source_row: int
    event_id: str = pa.Field(nullable=True)
    customer_id: str = pa.Field(nullable=True)
    meter: str = pa.Field(nullable=True)
    quantity_raw: str = pa.Field(nullable=True)
    timestamp_raw: str = pa.Field(nullable=True)
    dims: str
    quantity: QUANTITY = pa.Field(nullable=True)
    quantity_inexact: bool = pa.Field(nullable=True)
    event_at: pl.Datetime("us", "UTC") = pa.Field(nullable=True)

    @pa.dataframe_check(name="missing_field")
    def _fields_present(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(ROW_RULES["missing_field"])

    @pa.dataframe_check(name="bad_timestamp")
    def _timestamp_parses(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(ROW_RULES["bad_timestamp"])

    @pa.dataframe_check(name="bad_quantity")
    def _quantity_parses(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(ROW_RULES["bad_quantity"])

    @pa.dataframe_check(name="negative_quantity")
    def _quantity_not_negative(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(ROW_RULES["negative_quantity"])

    @pa.dataframe_check(name="amount_out_of_range")
    def _quantity_can_be_summed(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(ROW_RULES["amount_out_of_range"])

    class Config:
        strict = "filter"


def _as_text(frame: pl.DataFrame, column: str) -> pl.Expr:
    if column not in frame.columns:
        return pl.lit(None, dtype=pl.String).alias(column)
    dtype = frame.schema[column]
    if dtype == pl.String:
        return pl.col(column)
    if isinstance(dtype, pl.Datetime):
        return _utc_text(frame, column).alias(column)
    if dtype.is_nested():
        # A nested JSON value as a dimension is kept as its JSON text: {"c": [1, 2]} -> [1, 2]
        wrapped = pl.struct(pl.col(column)).struct.json_encode()
        prefix = len(json.dumps(column, ensure_ascii=False)) + 2
        return wrapped.str.slice(prefix, wrapped.str.len_chars() - prefix - 1).alias(column)
    return pl.col(column).cast(pl.String, strict=False).alias(column)


UTC_TEXT = "%Y-%m-%dT%H:%M:%S%.fZ"
"""How a datetime column is written as text: in UTC, the fraction of a second in 0, 3, 6 or 9
digits (as few as show it exactly), e.g. 2026-10-05T12:00:00.250Z."""

_YEAR_10000 = 253_402_300_800
"""Seconds from 1970 to the year 10000: the instants whose year is written in four digits."""


def _utc_text(frame: pl.DataFrame, column: str) -> pl.Expr:
    """A datetime column as UTC text (`UTC_TEXT`); billrun reads a naive datetime as UTC: say so in
    the text, and show an aware one in UTC. For instants from 1970 to 9999 spanning no more days
    than the frame has rows, the text is put together from lookups: a day's date, a second's clock
    time and the fraction's digits three at a time (about half the CPU of strftime); other columns
    are written by strftime."""
    dtype = frame.schema[column]
    instants = frame.get_column(column).to_physical()  # since 1970 in UTC (naive: read as UTC)
    per_second = {"ms": 10**3, "us": 10**6, "ns": 10**9}[dtype.time_unit]
    per_day = 86_400 * per_second
    first, last = instants.min(), instants.max()
    if first is None or first < 0 or last >= _YEAR_10000 * per_second or (last - first) // per_day > frame.height:
        utc = (pl.col(column).dt.replace_time_zone("UTC") if dtype.time_zone is None
               else pl.col(column).dt.convert_time_zone("UTC"))
        return utc.dt.to_string(UTC_TEXT)
    first_day = first // per_day
    dates = pl.select((pl.int_range(first_day, last // per_day + 1, dtype=pl.Int32).cast(pl.Date).cast(pl.String)
                       + "T")).to_series()
    instant = pl.col(column).to_physical()
    text = pl.lit(dates).gather(instant // per_day - first_day) + pl.lit(_clock_times()).gather(
        instant % per_day // per_second)
    # The fraction in groups of three digits, the last written group followed by Z: a group is
    # left out (the table's last, empty entry) when it and the groups after it are all zeros.
    fraction = instant % per_second
    groups = [fraction // 10**k % 1000 for k in range({"ms": 0, "us": 3, "ns": 6}[dtype.time_unit], -1, -3)]
    for i, group in enumerate(groups):
        rest = fraction % (10 ** (3 * (len(groups) - i)))  # this group and the ones after it
        table = _digit_groups("." if i == 0 else "", "Z" if i == len(groups) - 1 else "")
        text = text + pl.lit(table).gather(group + (rest == 0).cast(pl.Int64) * 1000)
    return text


@functools.cache
def _clock_times() -> pl.Series:
    """HH:MM:SS of each second of a day."""
    second = pl.int_range(86_400)
    two = [(part + 100).cast(pl.String).str.slice(1) for part in (second // 3600, second // 60 % 60, second % 60)]
    return pl.select(pl.concat_str(two, separator=":")).to_series()


@functools.cache
def _digit_groups(before: str, after: str) -> pl.Series:
    """000 to 999 between `before` and `after`, then `after` alone (index 1000)."""
    digits = (pl.int_range(1000) + 1000).cast(pl.String).str.slice(1)
    return pl.select(pl.concat([before + digits + after, pl.lit(after)])).to_series()


def _typed_timestamp(frame: pl.DataFrame) -> pl.Expr:
    """A timestamp column that is already a datetime needs no parsing: naive means UTC."""
    dtype = frame.schema.get("timestamp")
    if isinstance(dtype, pl.Datetime):
        col = pl.col("timestamp").cast(pl.Datetime("us", dtype.time_zone))
        col = col.dt.replace_time_zone("UTC") if dtype.time_zone is None else col.dt.convert_time_zone("UTC")
        return col.alias("timestamp_typed")
    if isinstance(dtype, pl.Date):
        return pl.col("timestamp").cast(pl.Datetime("us")).dt.replace_time_zone("UTC").alias("timestamp_typed")
    return pl.lit(None, dtype=pl.Datetime("us", "UTC")).alias("timestamp_typed")


def _dims_json(frame: pl.DataFrame) -> pl.Expr:
    """Every non-core column as canonical JSON: keys sorted, null values left out, so the same
    dimensions written by files with other column orders or missing columns group together."""
    names = sorted(c for c in frame.columns if c not in CORE_FIELDS)
    if not names:
        return pl.lit("{}").alias("dims")
    by_combination = _dims_by_combination(frame, names)
    if by_combination is not None:
        return by_combination
    return _dims_per_row(frame, names)


def _dims_per_row(frame: pl.DataFrame, names: list[str]) -> pl.Expr:
    """Each row's dims put together from its own pairs (`_dim_pair`)."""
    pairs = [pl.when(pl.col(name).is_not_null()).then(_dim_pair(frame, name)) for name in names]
    return pl.format("{{{}}}", pl.concat_str(pairs, separator=",", ignore_nulls=True)).alias("dims")


FEW_CODES = 16
"""Distinct values a dimension column may have for its rows to be coded by comparing with each."""


def _dims_by_combination(frame: pl.DataFrame, names: list[str]) -> pl.Expr | None:
    """The dims of each row looked up in a table of every combination of the dimensions' values,
    encoded once each (`_dims_per_row` on the table), when every dimension has at most FEW_CODES
    distinct values and the combinations are few against the rows; else None. A row's place in
    the table is worked out from its values by comparisons: no string is built or looked up per row."""
    if frame.height < 10_000 or any(frame.schema[name] not in _FEW_VALUES for name in names):
        return None
    codes, columns, size = [], {}, 1
    for name in names:
        values = frame.get_column(name).drop_nulls().unique()
        size *= values.len() + 1
        if values.len() > FEW_CODES or size * 8 > frame.height:
            return None
        # code 0: null; code i: the i-th value
        code = pl.sum_horizontal([pl.col(name).eq_missing(pl.lit(value, dtype=values.dtype)).cast(pl.UInt32)
                                  * (i + 1) for i, value in enumerate(values)])
        codes.append((code, values.len() + 1))
        columns[name] = pl.concat([pl.Series(name, [None], dtype=values.dtype), values])
    index, stride, table_codes = pl.lit(0, dtype=pl.UInt32), 1, {}
    for (code, radix), name in zip(codes, names, strict=True):
        index = index + code * stride
        table_codes[name] = (pl.int_range(size, dtype=pl.UInt32) // stride) % radix
        stride *= radix
    table = pl.select(**{name: pl.lit(columns[name]).gather(table_codes[name]) for name in names})
    encoded = table.select(_dims_per_row(table, names)).to_series()
    return pl.lit(encoded).gather(index).alias("dims")


_FEW_VALUES = (pl.String, pl.Boolean, pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32,
               pl.UInt64)
"""Types whose distinct values can stand for their rows (equal values, equal text; no NaN)."""


def _dim_pair(frame: pl.DataFrame, name: str) -> pl.Expr:
    """`"name":value` as JSON for each row of a dimension column. A dimension usually has few
    values (a model, a region): each distinct value is encoded once and looked up per row."""
    def pair(source: pl.DataFrame) -> pl.Expr:
        single = pl.struct(_as_text(source, name)).struct.json_encode()  # {"model":"gpt-4o"}
        return single.str.slice(1, single.str.len_chars() - 2)

    if frame.schema[name] in _FEW_VALUES and frame.height >= 10_000:
        values = frame.get_column(name).drop_nulls().unique()
        if values.len() * 8 <= frame.height:
            encoded = values.to_frame().select(pair(values.to_frame())).to_series()
            return pl.col(name).replace_strict(values, encoded, default=None, return_dtype=pl.String)
    return pair(frame)


def _supported(dtype: pl.DataType, top: bool = True) -> bool:
    """Whether a column of `dtype` can be read as usage text: binary only at the top (as UTF-8
    text; Polars cannot write binary nested in a list or struct as JSON), no durations."""
    if isinstance(dtype, (pl.List, pl.Array)):
        return _supported(dtype.inner, top=False)
    if isinstance(dtype, pl.Struct):
        return all(_supported(f.dtype, top=False) for f in dtype.fields)
    if isinstance(dtype, pl.Binary):
        return top
    return not isinstance(dtype, UNSUPPORTED_LEAVES)


def readable_columns(raw: pl.DataFrame) -> pl.DataFrame:
    """`raw` with binary columns as text; raises UnreadableUsage naming a column of a type
    billrun does not read (a duration, binary inside a list or struct, binary that is not UTF-8)."""
    for name, dtype in raw.schema.items():
        if not _supported(dtype):
            raise UnreadableUsage(f"column {name!r}: type {dtype} is not supported in usage "
                                  f"(send text, numbers, booleans, dates or timestamps)")
    binary = [n for n, t in raw.schema.items() if isinstance(t, pl.Binary)]
    if not binary:
        return raw
    for name in binary:
        try:
            raw = raw.with_columns(pl.col(name).cast(pl.String))
        except pl.exceptions.ComputeError:
            raise UnreadableUsage(f"column {name!r}: binary values that are not UTF-8 text") from None
    return raw


def normalized_usage(raw: pl.DataFrame, source_key: str, source_rows: pl.Series | None = None) -> pl.DataFrame:
    """One row per row of `raw` (one usage object), in order, with `reason` set on the rows
    that break a row-level rule. See the module docstring for the columns. `source_rows`: the
    rows' numbers in the object when some of its lines were set aside (default 1..n).
    Raises UnreadableUsage for columns billrun cannot read."""
    raw = readable_columns(raw)
    rows = (pl.int_range(pl.len(), dtype=pl.Int64) + 1 if source_rows is None
            else pl.lit(source_rows.cast(pl.Int64)))
    text = raw.select(
        pl.lit(source_key).alias("source_key"),
        rows.alias("source_row"),
        *[_as_text(raw, c).str.strip_chars() for c in ("event_id", "customer_id", "meter")],
        _as_text(raw, "quantity").str.strip_chars().alias("quantity_raw"),
        _as_text(raw, "timestamp").str.strip_chars().alias("timestamp_raw"),
        _typed_timestamp(raw),
        _dims_json(raw),
    )
    parsed = parsed_values(text)
    return parsed.with_columns(_reasons(parsed), pl.lit(None, dtype=pl.String).alias("detail")).select(
        [pl.col(c).cast(t) for c, t in NORMALIZED_COLUMNS.items()])


def malformed_usage(malformed: pl.DataFrame, source_key: str) -> pl.DataFrame:
    """One normalized row per line of an object that does not parse (`malformed`: source_row,
    line, detail): no fields, reason `malformed_line`, `detail` naming the line and what is wrong
    where. Without an event time it belongs to no period, so every close that reads it counts it."""
    return malformed.select(
        pl.lit(source_key).alias("source_key"),
        pl.col("source_row").cast(pl.Int64),
        pl.lit(MALFORMED_LINE).alias("reason"),
        pl.format("line {}: {}", pl.col("line"), pl.col("detail")).alias("detail"),
    ).select([(pl.col(c) if c in ("source_key", "source_row", "reason", "detail") else pl.lit(None)).cast(t).alias(c)
              for c, t in NORMALIZED_COLUMNS.items()])


PLAIN_QUANTITY = r"^[0-9]{1,18}(\.[0-9]{1,9})?$"
"""A quantity whose text is exact as it stands: digits, and at most 9 decimal places."""


def parsed_values(text: pl.DataFrame) -> pl.DataFrame:
    """`_PARSE_SQL` over `text`. Most rows need no parser: a plain quantity ("3393", "0.25")
    casts exactly in Polars, and a timestamp read as a datetime is already one. Only the other
    rows (CSV timestamps, exponents, signs, junk) go through DuckDB, and the two parts are put
    back in input order; what DuckDB would give the plain rows is exactly what they get here."""
    plain = (pl.col("quantity_raw").str.contains(PLAIN_QUANTITY).fill_null(False)
             & pl.col("timestamp_typed").is_not_null())
    text = text.with_columns(plain.alias("_plain"))
    easy = text.filter("_plain").drop("_plain")
    hard = text.filter(~pl.col("_plain")).drop("_plain")
    parts = []
    if easy.height:
        parts.append(easy.with_columns(pl.col("quantity_raw").cast(QUANTITY).alias("quantity"),
                                       pl.lit(False).alias("quantity_inexact"),
                                       pl.col("timestamp_typed").alias("event_at")).drop("timestamp_typed"))
    if hard.height or not parts:
        parts.append(parsed_in_duckdb(hard))
    return parts[0] if len(parts) == 1 else pl.concat(parts).sort("source_row")


def parsed_in_duckdb(text: pl.DataFrame) -> pl.DataFrame:
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")  # a timestamp without an offset is UTC
        con.register("raw", text.to_arrow())
        parsed = con.sql(_PARSE_SQL).pl()
    finally:
        con.close()
    return parsed.drop("timestamp_typed").with_columns(pl.col("quantity").cast(QUANTITY),
                                                       pl.col("event_at").cast(pl.Datetime("us", "UTC")))


def _reasons(parsed: pl.DataFrame) -> pl.Expr:
    """The first failed rule of each row (in ROW_REASONS order), as pandera's validation against
    `RowRules` finds it. Pandera checks the schema (columns and types: a LazyFrame is validated
    for its schema only), and the rules are evaluated in one pass of Polars over the rows, a null
    result passing as in pandera's checks. Only a frame that breaks the schema, or has a null where
    `RowRules` allows none, goes through pandera's full validation, which evaluates each check in
    passes of its own (about 5x the CPU) and says what broke."""
    try:
        RowRules.validate(parsed.lazy(), lazy=True)
    except SchemaErrors:
        return _reasons_from_pandera(parsed)
    not_nullable = [name for name, column in RowRules.to_schema().columns.items() if not column.nullable]
    if any(parsed.select(pl.col(not_nullable).has_nulls()).row(0)):
        return _reasons_from_pandera(parsed)
    first = pl.lit(None, dtype=pl.String)
    for reason in reversed(ROW_REASONS):
        first = pl.when(~ROW_RULES[reason].fill_null(True)).then(pl.lit(reason)).otherwise(first)
    return parsed.select(first.alias("reason")).to_series()


def _reasons_from_pandera(parsed: pl.DataFrame) -> pl.Expr:
    """The first failed rule of each row, from pandera's collected failure cases."""
    try:
        RowRules.validate(parsed, lazy=True)
        return pl.lit(None, dtype=pl.String).alias("reason")
    except SchemaErrors as exc:
        failures = exc.failure_cases
    unexpected = failures.filter(~pl.col("check").is_in(ROW_REASONS))
    if unexpected.height:
        # A schema failure (a dtype, a column) is a bug in normalization, not a bad row.
        raise RuntimeError(f"usage normalization broke its own schema: {unexpected.row(0, named=True)}")
    rank = {reason: i for i, reason in enumerate(ROW_REASONS)}
    first = (failures.select(pl.col("index").cast(pl.UInt32),
                             pl.col("check").replace_strict(rank, return_dtype=pl.Int32).alias("rank"))
             .group_by("index").agg(pl.col("rank").min()))
    rows = pl.DataFrame({"index": pl.int_range(parsed.height, dtype=pl.UInt32, eager=True)})
    return (rows.join(first, on="index", how="left", maintain_order="left")
            .select(pl.col("rank").replace_strict(dict(enumerate(ROW_REASONS)), default=None,
                                                  return_dtype=pl.String).alias("reason"))
            .to_series())
