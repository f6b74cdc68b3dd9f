"""Margins: what a customer's bill earned against what serving its usage cost.

Revenue is billed revenue, read from invoice lines; cost of goods is the period's billed usage
units times the unit cost of the store's optional cost file, `costs/costs.csv`:

    meter,filter,unit_cost,per,currency,effective_from
    input_tokens,"{""model"": ""gpt-4o""}",1.25,1000000,USD,2026-01-01
    images,,0.004,,USD,2026-01-01

`filter` is a JSON object of dimensions (blank: every event of the meter), `unit_cost` a decimal
string per `per` units (blank `per`: 1), `effective_from` the first day a cost applies; a later
row for the same meter, filter and currency replaces it from its own day. Like plan charges, two
rows whose filters could both cost one event are refused, and so is a row written twice.

Grain of `margins_table`: one row per customer x period x plan x plan version x meter x
currency. Usage lines bring revenue to their meter; lines that belong to no meter (fixed fees,
credit packs and top-ups, cap waivers, commitment true-ups) are one row with an empty meter,
which costs nothing, so a customer's revenue rows add up to exactly what its invoices bill. For
a plan sold on credits that row carries most of the revenue: credits are bought, not metered.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

import polars as pl

from transforms.errors import InputError
from transforms.inputs.plans import IDENTIFIER
from transforms.layout import COSTS_KEY
from transforms.money import is_known_currency, to_minor
from transforms.periods import Period

ZERO = Decimal(0)
COST_COLUMNS = ("meter", "filter", "unit_cost", "per", "currency", "effective_from")

MARGINS_SCHEMA = {
    "customer_id": pl.String, "period": pl.String, "plan": pl.String, "plan_version": pl.Int32,
    "meter": pl.String, "currency": pl.String, "units": pl.String, "revenue_minor": pl.Int64,
    "cost_minor": pl.Int64, "margin_minor": pl.Int64, "margin_pct": pl.String,
}

SEGMENT_PLANS_SCHEMA = {
    "subscription_id": pl.String, "segment_no": pl.Int32, "customer_id": pl.String, "plan": pl.String,
    "plan_version": pl.Int32, "currency": pl.String, "start_on": pl.Date,
}


class CostsError(InputError):
    """A cost file that billrun refuses: the message names the file, the row and the field."""


@dataclass(frozen=True)
class Cost:
    """One row of the cost file: what `per` units of a meter cost, from a day on."""

    meter: str
    filter: tuple[tuple[str, str], ...]
    unit_cost: Decimal
    per: Decimal
    currency: str
    effective_from: date
    row: int

    def applies(self, meter: str, dims: dict[str, str]) -> bool:
        return meter == self.meter and all(dims.get(k) == v for k, v in self.filter)

    def overlaps(self, other: "Cost") -> bool:
        """Whether one event could be costed by both rows (the rule of plan charges)."""
        mine, theirs = dict(self.filter), dict(other.filter)
        return (self.meter == other.meter and self.currency == other.currency
                and all(mine[k] == theirs[k] for k in set(mine) & set(theirs)))

    def cost_of(self, units: Decimal) -> Decimal:
        """Exact, unrounded: rounding happens once per margins row."""
        return units * self.unit_cost / self.per


@dataclass(frozen=True)
class Costs:
    """The checked cost file (empty when the store has none)."""

    rows: tuple[Cost, ...] = ()

    def in_force(self, meter: str, dims: dict[str, str], currency: str, day: date) -> Cost | None:
        """The cost of an event of `meter` with `dims`, billed in `currency`, on `day`: among the
        rows whose filter fits (at most one filter fits, by construction), the latest that has
        started. None when the file does not cost it."""
        started = [c for c in self.rows
                   if c.currency == currency and c.effective_from <= day and c.applies(meter, dims)]
        return max(started, key=lambda c: c.effective_from, default=None)


NO_COSTS = Costs()


def costs_from(frame: pl.DataFrame, source: str = COSTS_KEY) -> Costs:
    """Checked cost rows from the cost file's text columns; a bad row fails with one line."""
    missing = [c for c in ("meter", "unit_cost", "currency", "effective_from") if c not in frame.columns]
    if missing:
        raise CostsError(f"{source}: missing column(s) {', '.join(missing)} (expected {', '.join(COST_COLUMNS)})")
    unknown = [c for c in frame.columns if c not in COST_COLUMNS]
    if unknown:
        raise CostsError(f"{source}: unknown column(s) {', '.join(unknown)} (expected {', '.join(COST_COLUMNS)})")
    rows: list[Cost] = []
    text = frame.cast({c: pl.String for c in frame.columns})
    for i, row in enumerate(text.iter_rows(named=True), start=1):
        where = f"{source} row {i}"

        def field(name: str, row=row) -> str:
            return (row.get(name) or "").strip()

        meter = field("meter")
        if not IDENTIFIER.match(meter):
            raise CostsError(f"{where}, meter: {meter!r} is not a meter name")
        cost = Cost(meter=meter, filter=_filter(field("filter"), where),
                    unit_cost=_decimal(field("unit_cost"), f"{where}, unit_cost", allow_zero=True),
                    per=_decimal(field("per") or "1", f"{where}, per", allow_zero=False),
                    currency=_currency(field("currency"), where),
                    effective_from=_day(field("effective_from"), where), row=i)
        for other in rows:
            if other.overlaps(cost) and other.filter != cost.filter:
                raise CostsError(f"{where}, filter: {_filter_text(cost)} and row {other.row}'s {_filter_text(other)} "
                                 f"could both cost one {meter} event; give them a common dimension with "
                                 f"different values")
            if (other.meter, other.filter, other.currency, other.effective_from) == (
                    cost.meter, cost.filter, cost.currency, cost.effective_from):
                raise CostsError(f"{where}: same meter, filter, currency and effective_from as row {other.row}")
        rows.append(cost)
    return Costs(tuple(rows))


def _filter(text: str, where: str) -> tuple[tuple[str, str], ...]:
    if not text:
        return ()
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict) or not all(isinstance(k, str) and IDENTIFIER.match(k) and isinstance(v, str)
                                              for k, v in value.items()):
        raise CostsError(f'{where}, filter: {text!r} is not a JSON object of dimensions, e.g. {{"model": "gpt-4o"}}')
    return tuple(sorted(value.items()))


def _filter_text(cost: Cost) -> str:
    return json.dumps(dict(cost.filter), sort_keys=True) if cost.filter else "(no filter)"


def _decimal(text: str, where: str, allow_zero: bool) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        value = None
    if value is None or not value.is_finite() or value < 0 or (value == 0 and not allow_zero):
        need = "of 0 or more" if allow_zero else "above 0"
        raise CostsError(f"{where}: {text!r} is not a decimal {need} (write it like 0.0025)")
    return value


def _currency(text: str, where: str) -> str:
    if not is_known_currency(text):
        raise CostsError(f"{where}, currency: {text!r} is not an ISO 4217 currency code")
    return text


def _day(text: str, where: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise CostsError(f"{where}, effective_from: {text!r} is not a date (YYYY-MM-DD)") from None


def segment_plans(segments) -> pl.DataFrame:
    """One row per subscription segment (`transforms.inputs.reference.Segment`): its customer, plan
    version, currency and first day."""
    return pl.DataFrame([{"subscription_id": s.subscription.subscription_id, "segment_no": s.segment_no,
                          "customer_id": s.subscription.customer_id, "plan": s.plan.plan.plan,
                          "plan_version": s.plan.plan.version, "currency": s.plan.plan.currency,
                          "start_on": s.start_at.date()}
                         for s in segments], schema=SEGMENT_PLANS_SCHEMA)


def segment_plans_from_lines(lines: pl.DataFrame) -> pl.DataFrame:
    """The same table recovered from a closed period's invoice lines (fixed fee and usage lines
    carry their segment's plan version; the first day is not kept there and stays empty)."""
    return (lines.filter(pl.col("segment_no").is_not_null() & pl.col("plan").is_not_null())
            .select(*[c for c in SEGMENT_PLANS_SCHEMA if c != "start_on"], pl.lit(None).alias("start_on"))
            .unique().sort("subscription_id", "segment_no").cast(SEGMENT_PLANS_SCHEMA))


def margins_table(lines: pl.DataFrame, usage: pl.DataFrame, segments: pl.DataFrame, costs: Costs,
                  period: Period) -> pl.DataFrame:
    """One row per customer x period x plan x plan_version x meter x currency: billed revenue,
    cost of goods and the margin between them.

    `lines` is an invoice_lines table and `segments` a `segment_plans` table. `usage` is the
    billed units per subscription segment x meter x dimensions, either by UTC day (the close's
    `usage_by_day`: each day's units are costed at the cost in force that day) or for the whole
    period (`usage_summary.parquet`, which has no `day`: every unit is then costed at the cost in
    force on the first day of the period, so a cost that starts mid-period counts from the next).

    The cost of a row is rounded once, from the exact sum of units x unit cost over its usage.
    `cost_minor` (and so the margin) is empty where the cost file prices only part of the row's
    usage or none of it: an unknown cost is not a zero cost. `margin_pct` is the margin as a
    percent of revenue, one decimal, empty without revenue.

    Revenue and units are summed in Polars; Python only looks up the cost in force once per
    distinct meter x dims x currency x day, and multiplies once per row and cost.
    """
    segs = segments.select(pl.col("subscription_id").cast(pl.String), pl.col("segment_no").cast(pl.Int64),
                           pl.col("customer_id").cast(pl.String), pl.col("plan").cast(pl.String),
                           pl.col("plan_version").cast(pl.Int64), pl.col("currency").cast(pl.String))
    revenue = _revenue(lines, segs)
    billed = _billed_units(usage, segs, costs, period)
    rows = (revenue.join(billed, on=MARGIN_KEY, how="full", coalesce=True, nulls_equal=True)
            .with_columns(pl.col("revenue_minor").fill_null(0))
            .with_columns(pl.when(pl.col("meter").is_null()).then(pl.lit(None, dtype=pl.String))
                          .otherwise(units_text(pl.col("units"))).fill_null(pl.when(pl.col("meter").is_not_null())
                                                                               .then(pl.lit("0"))).alias("units"),
                          pl.when(pl.col("meter").is_null() | pl.col("priced").is_null())
                          .then(pl.lit(0, dtype=pl.Int64))
                          .otherwise(pl.col("cost_minor")).alias("cost_minor")))
    rows = (rows.with_columns((pl.col("revenue_minor") - pl.col("cost_minor")).alias("margin_minor"))
            .with_columns(margin_pct_in_integers(pl.col("margin_minor"), pl.col("revenue_minor")).alias("margin_pct"),
                          pl.lit(str(period)).alias("period"))
            .sort(pl.col("customer_id"), pl.col("plan").fill_null(""), pl.col("plan_version").fill_null(0),
                  pl.col("meter").fill_null(""), pl.col("currency")))
    return rows.select([pl.col(c).cast(t) for c, t in MARGINS_SCHEMA.items()])


MARGIN_KEY = ["customer_id", "plan", "plan_version", "meter", "currency"]


def _revenue(lines: pl.DataFrame, segs: pl.DataFrame) -> pl.DataFrame:
    """Billed revenue per margins row. A line carries its plan version; one that does not (a
    top-up, a cap waiver) takes its segment's, else the subscription's last segment's. Tax is
    not revenue: `tax` lines are left out (a `tax_included` line, the tax inside tax-inclusive
    prices, stays in, taking it back out of the plan's row)."""
    if "kind" in lines.columns:
        lines = lines.filter(pl.col("kind") != "tax")
    last = (segs.sort("segment_no").group_by("subscription_id").agg(pl.all().last())
            .select("subscription_id", pl.col("plan").alias("_last_plan"),
                    pl.col("plan_version").alias("_last_version")))
    exact = segs.select("subscription_id", "segment_no", pl.lit(True).alias("_exact"),
                        pl.col("plan").alias("_seg_plan"), pl.col("plan_version").alias("_seg_version"))
    frame = lines.select(pl.col("customer_id").cast(pl.String), pl.col("subscription_id").cast(pl.String),
                         pl.col("segment_no").cast(pl.Int64), pl.col("plan").cast(pl.String),
                         pl.col("plan_version").cast(pl.Int64), pl.col("meter").cast(pl.String),
                         pl.col("currency").cast(pl.String), pl.col("amount_minor").cast(pl.Int64))
    own = pl.col("plan").is_not_null()
    return (frame.join(exact, on=["subscription_id", "segment_no"], how="left")
            .join(last, on="subscription_id", how="left")
            .with_columns(
                pl.when(own).then(pl.col("plan")).when(pl.col("_exact")).then(pl.col("_seg_plan"))
                .otherwise(pl.col("_last_plan")).alias("plan"),
                pl.when(own).then(pl.col("plan_version")).when(pl.col("_exact")).then(pl.col("_seg_version"))
                .otherwise(pl.col("_last_version")).alias("plan_version"))
            .group_by(MARGIN_KEY).agg(pl.col("amount_minor").sum().alias("revenue_minor")))


def _billed_units(usage: pl.DataFrame, segs: pl.DataFrame, costs: Costs, period: Period) -> pl.DataFrame:
    """Units and cost per margins row of the usage billed to a known segment (no segment, no
    invoice: nothing was billed for it). `priced` marks the rows with usage; `cost_minor` is
    empty where some of their usage has no cost in force.

    The usage (a row per segment x meter x dims x day) is only streamed through: it is summed
    per segment, meter and cost row before any text of the margins key is attached."""
    day = pl.col("day") if "day" in usage.columns else pl.lit(period.start, dtype=pl.Date).alias("day")
    numbered = segs.with_row_index("_segment")
    used = (usage.lazy().select(pl.col("subscription_id").cast(pl.String), pl.col("segment_no").cast(pl.Int64),
                                pl.col("meter").cast(pl.String), pl.col("dims").cast(pl.String), "units", day)
            .join(numbered.lazy().select("subscription_id", "segment_no", "_segment", "currency"),
                  on=["subscription_id", "segment_no"], how="inner")
            .drop("subscription_id", "segment_no"))
    lookups = used.select("meter", "dims", "currency", "day").unique().collect(engine="streaming")
    found = []
    for meter, dims, currency, on in lookups.iter_rows():  # usage repeats few (meter, dims, day) values
        cost = costs.in_force(meter, json.loads(dims), currency, on)
        found.append(None if cost is None else costs.rows.index(cost))
    lookups = lookups.with_columns(pl.Series("cost_row", found, dtype=pl.Int64))
    by_segment = (used.join(lookups.lazy(), on=["meter", "dims", "currency", "day"], how="left", nulls_equal=True)
                  .group_by("_segment", "meter", "cost_row").agg(pl.col("units").sum())
                  .collect(engine="streaming"))
    per_row = (by_segment.join(numbered, on="_segment")
               .group_by(*MARGIN_KEY, "cost_row").agg(pl.col("units").sum())
               .group_by(MARGIN_KEY).agg(pl.col("cost_row"), pl.col("units")))
    cost_minor: list[int | None] = [None] * per_row.height  # unknown where some usage has no cost
    complete = pl.col("cost_row").list.drop_nulls().list.len() == pl.col("cost_row").list.len()
    for row, currency, rows_of_cost, units in (per_row.with_row_index("_row").filter(complete)
                                               .select("_row", "currency", "cost_row", "units").iter_rows()):
        exact = sum((costs.rows[r].cost_of(u) for r, u in zip(rows_of_cost, units, strict=True)), ZERO)
        cost_minor[row] = to_minor(exact, currency)
    return per_row.select(*MARGIN_KEY, pl.col("units").list.sum().alias("units"),
                          pl.Series("cost_minor", cost_minor, dtype=pl.Int64), pl.lit(True).alias("priced"))


def units_text(units: pl.Expr) -> pl.Expr:
    """`decimal_text` of a Decimal column: plain digits, no trailing zeros (100, 0.5, 0)."""
    text = units.cast(pl.String)
    trimmed = pl.when(text.str.contains(".", literal=True)).then(
        text.str.strip_chars_end("0").str.strip_chars_end(".")).otherwise(text)
    return pl.when(trimmed == "-0").then(pl.lit("0")).otherwise(trimmed)


def margin_pct_in_integers(margin: pl.Expr, revenue: pl.Expr) -> pl.Expr:
    """`margin_pct` in integers: tenths of a percent = margin x 1000 / revenue, rounded half up
    (away from zero), as `decimal_text_fixed` rounds."""
    size, over = margin.abs() * 2000 + revenue.abs(), revenue.abs() * 2
    tenths = size // over
    negative = ((margin < 0) != (revenue < 0)) & (tenths > 0)
    text = (pl.when(negative).then(pl.lit("-")).otherwise(pl.lit(""))
            + (tenths // 10).cast(pl.String) + pl.lit(".") + (tenths % 10).cast(pl.String))
    return pl.when(margin.is_null() | (revenue == 0)).then(pl.lit(None, dtype=pl.String)).otherwise(text)


def margin_pct(margin_minor: int | None, revenue_minor: int) -> str | None:
    """Margin as a percent of revenue, one decimal: 600 of 1000 -> "60.0"."""
    if margin_minor is None or revenue_minor == 0:
        return None
    return decimal_text_fixed(Decimal(margin_minor) * 100 / Decimal(revenue_minor))


def decimal_text_fixed(value: Decimal) -> str:
    """A percentage with exactly one decimal, half up: 33.333 -> "33.3", -0.04 -> "0.0"."""
    text = format(value.quantize(Decimal("0.1"), rounding=ROUND_HALF_UP), "f")
    return "0.0" if text == "-0.0" else text
