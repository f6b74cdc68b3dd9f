"""Adjustments: one-off charges and manual credits from the optional `adjustments/` input.

One row per adjustment: `adjustment_id` (unique across the store), `customer_id`, `period`
(YYYY-MM, the invoice it goes on), optional `subscription_id` (which of the customer's invoices
of that period), `description` (printed on the invoice), `amount` (exact decimal in the
currency's major unit: positive is a charge, negative a credit), `currency`, `reason` (kept for
the books, not printed), optional `taxable` (default true: taxed like the plan's lines).

Like a usage row, a bad adjustment row is not billed and not lost: it is quarantined with a
reason code, and every row of the period is accounted for in the close's `adjustments` table
and manifest (read = billed + quarantined). A row whose period cannot be read belongs to no
period: every close quarantines and counts it.

Which invoice: the one of `subscription_id` when given (it must be the customer's and bill in
the period); otherwise the customer's subscription that bills last in the period (a plan change
mid-month: the new subscription's invoice; a plan-version split inside one subscription is one
invoice anyway). Ties go to the lowest subscription_id.

An invoice never goes below zero because of a credit: credits apply, in adjustment_id order
after the invoice's other lines, up to what the invoice holds at that point (a taxable credit up
to the lines taxed with it, an untaxed one up to the whole invoice); the part not applied is
written on the line and in the `adjustments` table (`unapplied_minor`), and stays the
customer's to be credited again on a later period (a new adjustment row).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from decimal import Decimal

import pandera.polars as pa
import polars as pl
from pandera.errors import SchemaErrors

from transforms.engine.checked_usage import ROW_AMOUNT_LIMIT_MINOR
from transforms.engine.invoices import Invoice, Line
from transforms.inputs.reference import Segment
from transforms.money import format_money, is_known_currency, minor_exponent
from transforms.pricing.base import Step

REQUIRED = ("adjustment_id", "customer_id", "period", "description", "amount", "currency", "reason")
OPTIONAL = ("subscription_id", "taxable")
KINDS = ("adjustment_charge", "adjustment_credit")

ROW_REASONS = ("missing_id", "missing_field", "bad_period", "bad_amount", "bad_currency", "bad_taxable",
               "duplicate_id", "unknown_customer")
"""Rules a row keeps on its own (and against customers), in the order a row's first failure is named."""

PERIOD_REASONS = ("billed_in_period", "no_invoice", "currency_mismatch")
"""Rules checked against the period's documents, in this order: an id already billed by another
period's documents, no invoice to put the row on, another currency than the invoice's."""

FLOAT_MARK = "float:"

TRUE, FALSE = ("true", "yes", "1"), ("false", "no", "0")

ROWS_SCHEMA = {"source_key": pl.String, "source_row": pl.Int64, **{c: pl.String for c in REQUIRED + OPTIONAL}}

TABLE_SCHEMA = {
    "adjustment_id": pl.String, "customer_id": pl.String, "subscription_id": pl.String, "period": pl.String,
    "description": pl.String, "amount": pl.String, "currency": pl.String, "reason": pl.String,
    "taxable": pl.Boolean, "status": pl.String, "quarantine_reason": pl.String, "detail": pl.String,
    "invoice_id": pl.String, "line_no": pl.Int32, "amount_minor": pl.Int64, "unapplied_minor": pl.Int64,
    "source": pl.String,
}
"""The close's adjustments table: one row per adjustment row of the period, billed or quarantined."""


@dataclass(frozen=True)
class Adjustment:
    """One checked adjustment of the period, resolved to the invoice of `subscription_id`."""

    adjustment_id: str
    customer_id: str
    subscription_id: str
    description: str
    amount: Decimal
    currency: str
    reason: str
    taxable: bool

    @property
    def kind(self) -> str:
        return "adjustment_charge" if self.amount >= 0 else "adjustment_credit"

    @property
    def line_description(self) -> str:
        # the id keeps each adjustment its own line, so a correction compares it with itself
        return f"{self.description} (ref {self.adjustment_id})"


REF = re.compile(r" \(ref (.+)\)$")
"""The adjustment id at the end of an adjustment line's description (Adjustment.line_description)."""


def adjustment_rows(objects: list[tuple[str, pl.DataFrame]]) -> pl.DataFrame:
    """Every row of every adjustments object, as trimmed text (blank is null), in key and row
    order, with its `source_key` and `source_row`. A missing column reads as empty, so its rows
    are quarantined (`missing_field`), never dropped. A floating-point column (Parquet) cannot
    carry an exact amount: its values are marked `float:`, so its rows are `bad_amount`."""
    frames = []
    for key, frame in sorted(objects, key=lambda o: o[0]):
        cols = []
        for column in REQUIRED + OPTIONAL:
            if column not in frame.columns:
                cols.append(pl.lit(None, dtype=pl.String).alias(column))
            elif frame.schema[column].is_float():  # kept visible, and never a plain decimal
                cols.append((FLOAT_MARK + pl.col(column).cast(pl.String)).alias(column))
            else:
                cols.append(pl.col(column).cast(pl.String).str.strip_chars().replace("", None).alias(column))
        frames.append(frame.select(pl.lit(key).alias("source_key"),
                                   pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias("source_row"), *cols))
    return pl.concat(frames) if frames else pl.DataFrame(schema=ROWS_SCHEMA)


class RowRules(pa.DataFrameModel):
    """The rules one adjustment row keeps on its own; each check is named by its reason code."""

    source_key: str
    source_row: int
    adjustment_id: str = pa.Field(nullable=True)
    customer_id: str = pa.Field(nullable=True)
    period: str = pa.Field(nullable=True)
    description: str = pa.Field(nullable=True)
    amount: str = pa.Field(nullable=True)
    currency: str = pa.Field(nullable=True)
    reason: str = pa.Field(nullable=True)
    subscription_id: str = pa.Field(nullable=True)
    taxable: str = pa.Field(nullable=True)
    first_of_id: bool
    known_customer: bool
    exact_amount: bool

    @pa.dataframe_check(name="missing_id")
    def _id_present(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("adjustment_id").is_not_null())

    @pa.dataframe_check(name="missing_field")
    def _fields_present(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.all_horizontal([pl.col(c).is_not_null() for c in REQUIRED]))

    @pa.dataframe_check(name="bad_period")
    def _period_reads(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("period").is_null()
                                     | pl.col("period").str.contains(r"^\d{4}-(0[1-9]|1[0-2])$"))

    @pa.dataframe_check(name="bad_amount")
    def _amount_reads(cls, data: pa.PolarsData) -> pl.LazyFrame:
        # what is written is what is billed, never rounded (see _amount_problem)
        return data.lazyframe.select(pl.col("exact_amount"))

    @pa.dataframe_check(name="bad_currency")
    def _currency_known(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("currency").is_null() | pl.col("currency").map_elements(
            is_known_currency, return_dtype=pl.Boolean))

    @pa.dataframe_check(name="bad_taxable")
    def _taxable_reads(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("taxable").is_null()
                                     | pl.col("taxable").str.to_lowercase().is_in(TRUE + FALSE))

    @pa.dataframe_check(name="duplicate_id")
    def _id_unique(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("first_of_id"))

    @pa.dataframe_check(name="unknown_customer")
    def _customer_known(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("known_customer"))

    class Config:
        strict = "filter"


def checked_rows(rows: pl.DataFrame, customers: set[str]) -> pl.DataFrame:
    """`rows` (adjustment_rows) with `quarantine_reason`: the first rule of ROW_REASONS the row
    breaks, null for a row that keeps them all. Of rows sharing an id, the first (by key and row)
    is the adjustment; the later ones are `duplicate_id`, whatever their period."""
    frame = rows.with_columns(
        (pl.col("adjustment_id").is_null() | pl.col("adjustment_id").is_first_distinct()).alias("first_of_id"),
        (pl.col("customer_id").is_null() | pl.col("customer_id").is_in(sorted(customers))).alias("known_customer"),
        pl.Series("exact_amount", [_amount_problem(a, c) is None for a, c in rows.select("amount", "currency").rows()],
                  dtype=pl.Boolean))
    try:
        RowRules.validate(frame, lazy=True)
        reason = pl.lit(None, dtype=pl.String)
    except SchemaErrors as exc:
        failures = exc.failure_cases
        unexpected = failures.filter(~pl.col("check").is_in(ROW_REASONS))
        if unexpected.height:  # a dtype or a column: a bug here, not a bad row
            raise RuntimeError(f"adjustment checks broke their own schema: {unexpected.row(0, named=True)}") from exc
        rank = {r: i for i, r in enumerate(ROW_REASONS)}
        first = (failures.select(pl.col("index").cast(pl.UInt32),
                                 pl.col("check").replace_strict(rank, return_dtype=pl.Int32).alias("rank"))
                 .group_by("index").agg(pl.col("rank").min()))
        index = pl.DataFrame({"index": pl.int_range(frame.height, dtype=pl.UInt32, eager=True)})
        reason = (index.join(first, on="index", how="left", maintain_order="left")["rank"]
                  .replace_strict(dict(enumerate(ROW_REASONS)), default=None, return_dtype=pl.String))
    return frame.drop("first_of_id", "known_customer", "exact_amount").with_columns(
        pl.Series("quarantine_reason", reason, dtype=pl.String) if isinstance(reason, pl.Series)
        else reason.alias("quarantine_reason"))


PLAIN_DECIMAL = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")


def _amount_problem(amount: str | None, currency: str | None) -> str | None:
    """What keeps `amount` from being billed exactly as written, in `currency` when that is a
    known one; None when nothing does (or when it is missing: that is `missing_field`). A plain
    decimal only: no exponent, no NaN, no float, and no more decimal places than the currency's
    minor unit, because an adjustment is never rounded."""
    if amount is None:
        return None
    if amount.startswith(FLOAT_MARK):
        return "a floating-point column cannot hold an exact amount; send text or a decimal column"
    if not PLAIN_DECIMAL.match(amount):
        return f"{amount!r} is not a plain decimal number"
    if currency is None or not is_known_currency(currency):
        return None
    exponent = minor_exponent(currency)
    value = Decimal(amount)
    if value.normalize().as_tuple().exponent < -exponent:
        return f"{amount} has more decimal places than {currency} has ({exponent})"
    if abs(value.scaleb(exponent)) > ROW_AMOUNT_LIMIT_MINOR:
        return f"{amount} is beyond the {ROW_AMOUNT_LIMIT_MINOR} minor units one line may bill"
    return None


DETAILS = {
    "missing_id": "adjustment_id is empty",
    "bad_period": "period is not YYYY-MM",
    "bad_taxable": "taxable is not true or false",
    "duplicate_id": "this adjustment_id appears earlier in the adjustments input",
    "unknown_customer": "customer_id is not in customers",
    "bad_currency": "currency is not an ISO 4217 code",
}


def period_adjustments(checked: pl.DataFrame, period: str, segments: list[Segment],
                       billed_elsewhere: dict[str, str] | None = None) -> tuple[list[Adjustment], pl.DataFrame]:
    """The period's adjustments: those to bill, each resolved to an invoice, and the period's
    adjustments table before billing (status `billed` or `quarantined`; the invoice columns are
    filled by `billed_table`). Rows of the period, and rows whose period cannot be read.
    `billed_elsewhere`: adjustment id -> the period whose documents already bill it."""
    billed_elsewhere = billed_elsewhere or {}
    mine = checked.filter((pl.col("period") == period)
                          | (pl.col("quarantine_reason") == "bad_period") | pl.col("period").is_null())
    last_of: dict[str, Segment] = {}  # customer -> the segment that ends last (ties: lowest subscription_id)
    sub_info: dict[str, tuple[str, str]] = {}  # subscription -> (customer, currency)
    for seg in sorted(segments, key=lambda s: s.subscription.subscription_id):
        sub = seg.subscription
        sub_info[sub.subscription_id] = (sub.customer_id, seg.plan.plan.currency)
        if sub.customer_id not in last_of or seg.end_at > last_of[sub.customer_id].end_at:
            last_of[sub.customer_id] = seg
    billable, rows = [], []
    for row in mine.iter_rows(named=True):
        reason, detail, sub_id = row["quarantine_reason"], None, row["subscription_id"]
        amount = None
        if reason is None:
            last = last_of.get(row["customer_id"])
            sub_id = sub_id or (last.subscription.subscription_id if last else None)
            amount = Decimal(row["amount"])
            if row["adjustment_id"] in billed_elsewhere:
                reason = "billed_in_period"
                detail = f"already billed by the documents of {billed_elsewhere[row['adjustment_id']]}"
            elif sub_id is None or sub_info.get(sub_id, (None,))[0] != row["customer_id"]:
                reason = "no_invoice"
                detail = (f"subscription {sub_id} of customer {row['customer_id']} has no invoice in {period}"
                          if row["subscription_id"] else f"customer {row['customer_id']} has no invoice in {period}")
            elif sub_info[sub_id][1] != row["currency"]:
                reason = "currency_mismatch"
                detail = f"the invoice of {sub_id} for {period} is in {sub_info[sub_id][1]}, not {row['currency']}"
        elif reason == "missing_field":
            missing = [c for c in REQUIRED if row[c] is None]
            detail = f"{', '.join(missing)} empty"
        elif reason == "bad_amount":
            detail = _amount_problem(row["amount"], row["currency"])
        else:
            detail = DETAILS.get(reason)
        taxable = (row["taxable"] or "true").lower() not in FALSE
        if reason is None:
            billable.append(Adjustment(row["adjustment_id"], row["customer_id"], sub_id, row["description"],
                                       amount, row["currency"], row["reason"], taxable))
        rows.append({"adjustment_id": row["adjustment_id"], "customer_id": row["customer_id"],
                     "subscription_id": sub_id if reason is None else row["subscription_id"],
                     "period": row["period"], "description": row["description"], "amount": row["amount"],
                     "currency": row["currency"], "reason": row["reason"],
                     "taxable": taxable if row["quarantine_reason"] != "bad_taxable" else None,
                     "status": "billed" if reason is None else "quarantined", "quarantine_reason": reason,
                     "detail": detail, "source": f"{row['source_key']}#row={row['source_row']}"})
    return billable, pl.DataFrame(rows, schema={k: v for k, v in TABLE_SCHEMA.items()
                                                if k not in ("invoice_id", "line_no", "amount_minor",
                                                             "unapplied_minor")})


def adjustment_line(adj: Adjustment, amount_minor: int, unapplied_minor: int) -> Line:
    """The invoice line of one adjustment: `amount_minor` is what it bills, `unapplied_minor` the
    part of a credit that did not fit on the invoice (0 otherwise), said on the line."""
    steps = ()
    if unapplied_minor:
        steps = (Step(f"Credit of {format_money(-(amount_minor - unapplied_minor), adj.currency)}: "
                      f"{format_money(-amount_minor, adj.currency)} applied, "
                      f"{format_money(unapplied_minor, adj.currency)} not applied, as an invoice never goes "
                      f"below zero", Decimal(1), None, Decimal(amount_minor).scaleb(-minor_exponent(adj.currency))),)
    return Line(kind=adj.kind, description=adj.line_description, quantity=Decimal(1), amount_minor=amount_minor,
                amount=adj.amount, steps=steps, adjustment_id=adj.adjustment_id, taxable=adj.taxable)


def with_adjustments(invoices: list[Invoice], adjustments: list[Adjustment]) -> list[Invoice]:
    """Each invoice with its adjustments appended as lines (before tax): charges first, then
    credits, each in adjustment_id order; a credit applies up to what the invoice holds (see the
    module's docstring), so no invoice goes below zero because of one."""
    if not adjustments:
        return invoices
    by_sub: dict[str, list[Adjustment]] = {}
    for adj in sorted(adjustments, key=lambda a: (a.amount < 0, a.adjustment_id)):
        by_sub.setdefault(adj.subscription_id, []).append(adj)
    out = []
    for inv in invoices:
        mine = by_sub.get(inv.subscription_id)
        if not mine:
            out.append(inv)
            continue
        lines = list(inv.lines)
        for adj in mine:
            amount_minor = int(adj.amount.scaleb(minor_exponent(adj.currency)))
            unapplied = 0
            if amount_minor < 0:
                whole = sum(line.amount_minor for line in lines)
                shared = sum(line.amount_minor for line in lines if line.taxable is not False)
                room = max(0, min(whole, shared) if adj.taxable else whole)
                if -amount_minor > room:
                    amount_minor, unapplied = -room, -amount_minor - room
            lines.append(adjustment_line(adj, amount_minor, unapplied))
        out.append(replace(inv, lines=tuple(lines)))
    return out


def billed_table(pending: pl.DataFrame, invoices: list[Invoice]) -> pl.DataFrame:
    """The period's adjustments table: `pending` (period_adjustments) with, for each billed row,
    the invoice and line that bill it, the amount billed and the part of a credit not applied."""
    found = {}
    for inv in invoices:
        for no, line in enumerate(inv.lines, start=1):
            if line.adjustment_id is not None:
                requested = int(Decimal(line.amount).scaleb(minor_exponent(inv.currency)))
                found[line.adjustment_id] = (inv.invoice_id, no, line.amount_minor, line.amount_minor - requested)
    ids = pending["adjustment_id"].to_list()
    billed = [found.get(i) if s == "billed" else None for i, s in zip(ids, pending["status"].to_list(), strict=True)]
    return pending.with_columns(
        pl.Series("invoice_id", [b and b[0] for b in billed], dtype=pl.String),
        pl.Series("line_no", [b and b[1] for b in billed], dtype=pl.Int32),
        pl.Series("amount_minor", [b and b[2] for b in billed], dtype=pl.Int64),
        pl.Series("unapplied_minor", [b and b[3] for b in billed], dtype=pl.Int64),
    ).select(list(TABLE_SCHEMA)).sort("source")


def adjustment_counts(table: pl.DataFrame) -> dict:
    """The manifest's account of the period's adjustment rows: read = billed + quarantined."""
    return {"read": table.height, "billed": table.filter(pl.col("status") == "billed").height,
            "quarantined": table.filter(pl.col("status") == "quarantined").height,
            "quarantined_by_reason": dict(sorted(table.filter(pl.col("status") == "quarantined")
                                                 .group_by("quarantine_reason").len().iter_rows()))}



def billed_by_periods(closes: dict[str, pl.DataFrame], correction_lines: pl.DataFrame) -> dict[str, str]:
    """Adjustment id -> the period whose documents bill it, from each closed period's adjustments
    table (`closes`, by period) and the lines of every committed correction. An adjustment is
    billed by a period while its close billed it and no correction took it back to zero, or a
    correction billed it there (a late adjustment) and none took it back since."""
    net: dict[tuple[str, str], int] = {}
    corrected: set[tuple[str, str]] = set()
    for period, table in sorted(closes.items()):
        for row in table.filter(pl.col("status") == "billed").iter_rows(named=True):
            net[(period, row["adjustment_id"])] = row["amount_minor"]
    if correction_lines.height and "adjusts_kind" in correction_lines.columns:
        lines = correction_lines.filter(pl.col("adjusts_kind").is_in(KINDS))
        for row in lines.iter_rows(named=True):
            match = REF.search(row["adjusts_description"] or "")
            if match:
                key = (row["period"], match.group(1))
                net[key] = net.get(key, 0) + row["amount_minor"]
                corrected.add(key)
    return {adjustment_id: period for (period, adjustment_id), amount in sorted(net.items())
            if amount != 0 or (period, adjustment_id) not in corrected}
