"""Revenue recognition (ASC 606 / IFRS 15) and its double-entry journal.

One row per customer x stream x currency x period:
opening deferred + billed - recognized - breakage = closing deferred.

- `usage` (usage, overage, caps, commitments): billed in arrears for service already given, so
  recognized as billed.
- `fixed_fee`: billed for the period it covers and recognized over it (monthly fees: in full).
  The part of a fee allocated to bundled credits is not fixed-fee revenue: it is billed into
  the `credits` stream.
- tax is never revenue: `tax` lines are left out, and on tax-inclusive prices the tax backed
  out of them (`tax_included` lines) comes off the streams it was in, in proportion; the
  journal books tax as a liability (`tax_payable`).
- `one_off` (adjustment charges) is recognized in the period it is billed in; `goodwill_credit`
  (adjustment credits) is contra-revenue: it reduces the period's revenue, booked to its own
  account (`contra_revenue`) so the reduction stays visible. Streams appear only when billed.
- `credits`: what was paid for credits (packs, top-ups, allocated fees) is deferred; it is
  recognized at each grant's cost basis as credits are consumed, and as breakage when they
  expire unused (`at_expiry`), or, with `breakage: proportional` (ASC 606-10-55-48), breakage
  is recognized in proportion to consumption at the plan's expected rate, trued up at expiry.

Amounts are exact until the end: each stream's cumulative recognized and breakage amounts are
rounded once, and a period gets the difference of the rounded cumulatives, so no cent is ever
lost or invented between periods.
"""
from __future__ import annotations

from collections import defaultdict
from decimal import ROUND_HALF_UP, Decimal

import polars as pl

from transforms.collector import cycle_collector_paused
from transforms.credits.model import ConsumeRun, WalletReplay
from transforms.engine.invoices import INVOICE_LEVEL_KINDS, USAGE_LINE_KINDS, Invoice
from transforms.inputs.reference import subscription_plans
from transforms.money import to_minor
from transforms.periods import Period

ZERO = Decimal(0)

REVENUE_SCHEMA = {
    "customer_id": pl.String, "period": pl.String, "stream": pl.String, "currency": pl.String,
    "opening_deferred_minor": pl.Int64, "billed_minor": pl.Int64, "recognized_minor": pl.Int64,
    "breakage_minor": pl.Int64, "closing_deferred_minor": pl.Int64,
}

JOURNAL_SCHEMA = {
    "entry_id": pl.String, "period": pl.String, "customer_id": pl.String, "stream": pl.String,
    "currency": pl.String, "account": pl.String, "debit_minor": pl.Int64, "credit_minor": pl.Int64,
    "memo": pl.String,
}


USAGE_STREAM_KINDS = USAGE_LINE_KINDS + INVOICE_LEVEL_KINDS
"""The lines of the `usage` stream: usage and overage, the cap's waiver and the commitment's true-up."""

ADJUSTMENT_STREAMS = {"one_off": "adjustment_charge", "goodwill_credit": "adjustment_credit"}
"""Revenue stream -> the adjustment line kind it is billed by (transforms.inputs.adjustments)."""


class ReconciliationError(RuntimeError):
    """The revenue tables do not add up: a bug, and the close must not publish."""


def _credit_amounts(replay: WalletReplay, entries: list, proportional: dict[str, Decimal]
                    ) -> dict[tuple[str, str], list[Decimal]]:
    """Per (customer, currency): exact [billed, recognized, breakage] of credits over `entries`."""
    out: dict[tuple[str, str], list[Decimal]] = defaultdict(lambda: [ZERO, ZERO, ZERO])
    proportional_taken: dict[str, Decimal] = defaultdict(Decimal)
    consumed_value: dict[str, Decimal] = defaultdict(Decimal)
    for e in entries:
        g = replay.grants[e.grant_id]
        if g.currency is None:
            continue
        acc = out[(e.customer_id, g.currency)]
        rate = proportional.get(e.grant_id)
        if e.kind in ("grant", "purchase", "top_up"):  # a rollover moves credits already paid for
            acc[0] += g.price
        elif e.kind == "consume":
            for credits in e.credits if isinstance(e, ConsumeRun) else (e.credits,):
                value = -credits * e.cost_basis
                acc[1] += value
                consumed_value[e.grant_id] += value
                if rate is not None:
                    # proportional breakage (ASC 606-10-55-48): the expected unused share rides
                    # along with use, never more than what is still unused, so deferred stays >= 0
                    target = min(consumed_value[e.grant_id] * rate / (1 - rate), g.price - consumed_value[e.grant_id])
                    acc[2] += target - proportional_taken[e.grant_id]
                    proportional_taken[e.grant_id] = target
        elif e.kind == "expire":
            # at expiry the breakage still due: what expires, less what was taken in proportion
            left = -e.credits * e.cost_basis
            acc[2] += left - proportional_taken.pop(e.grant_id, ZERO) if rate is not None else left
    return out


def proportional_rates(replay: WalletReplay, plan_of: dict[str, object]) -> dict[str, Decimal]:
    """Grant id -> expected breakage rate, for grants whose plan says `breakage: proportional`.
    `plan_of` maps a subscription id to its plan (the credits block decides)."""
    rates = {}
    for g in replay.grants.values():
        plan = plan_of.get(g.subscription_id)
        if plan is not None and plan.credits is not None and plan.credits.breakage == "proportional":
            rates[g.grant_id] = plan.credits.expected_breakage
    return rates


def revenue_table(period: Period, invoices: list[Invoice], replay: WalletReplay, segments) -> pl.DataFrame:
    """The period's revenue table from its rated invoices and its credits, whose grants under
    `breakage: proportional` expect the rate of the plan their subscription ends the period on."""
    return revenue_rows(period, invoices, replay, proportional_rates(replay, subscription_plans(segments).plan))


@cycle_collector_paused()  # a dict per row and per customer's credits (see transforms.engine.invoices)
def revenue_rows(period: Period, invoices: list[Invoice], replay: WalletReplay,
                 proportional: dict[str, Decimal]) -> pl.DataFrame:
    """The period's revenue table. `proportional` maps grant ids under `breakage: proportional`
    to their expected breakage rate."""
    rows: dict[tuple[str, str, str], dict] = {}

    def row(customer: str, stream: str, currency: str) -> dict:
        return rows.setdefault((customer, stream, currency), {
            "customer_id": customer, "period": str(period), "stream": stream, "currency": currency,
            "opening_deferred_minor": 0, "billed_minor": 0, "recognized_minor": 0, "breakage_minor": 0})

    allocated: dict[tuple[str, str], int] = defaultdict(int)
    for g in replay.grants.values():
        if g.kind == "grant" and g.price and period.start_at <= g.granted_at < period.end_at:
            allocated[(g.subscription_id, g.currency)] += to_minor(g.price, g.currency)
    for inv in invoices:
        usage = sum(line.amount_minor for line in inv.lines if line.kind in USAGE_STREAM_KINDS)
        fixed = sum(line.amount_minor for line in inv.lines if line.kind == "fixed_fee")
        backed = sum(line.amount_minor for line in inv.lines if line.kind == "tax_included")
        if backed:
            usage, fixed = _net_of_included_tax(usage, fixed, backed)
        fixed -= allocated.pop((inv.subscription_id, inv.currency), 0)
        for stream, billed in (("usage", usage), ("fixed_fee", fixed)):
            r = row(inv.customer_id, stream, inv.currency)
            r["billed_minor"] += billed
            r["recognized_minor"] += billed
        for stream, kind in ADJUSTMENT_STREAMS.items():
            billed = sum(line.amount_minor for line in inv.lines if line.kind == kind)
            if billed:
                r = row(inv.customer_id, stream, inv.currency)
                r["billed_minor"] += billed
                r["recognized_minor"] += billed

    end_now, end_before = period.end_at, period.previous().end_at  # once, not per entry
    through = [e for e in replay.movements if in_period_or_before(e, end_now)]
    before = [e for e in through if in_period_or_before(e, end_before)]
    cum_now = _credit_amounts(replay, through, proportional)
    cum_before = _credit_amounts(replay, before, proportional)
    for key in sorted(set(cum_now) | set(cum_before)):
        customer, currency = key
        b0, r0, k0 = _rounded(cum_before.get(key), currency)
        b1, r1, k1 = _rounded(cum_now.get(key), currency)
        if (b0, r0, k0, b1, r1, k1) == (0,) * 6:
            continue
        r = row(customer, "credits", currency)
        r["opening_deferred_minor"] = b0 - r0 - k0
        r["billed_minor"] = b1 - b0
        r["recognized_minor"] = r1 - r0
        r["breakage_minor"] = k1 - k0
    for r in rows.values():
        r["closing_deferred_minor"] = (r["opening_deferred_minor"] + r["billed_minor"] - r["recognized_minor"]
                                       - r["breakage_minor"])
    table = pl.DataFrame(sorted(rows.values(), key=lambda r: (r["customer_id"], r["stream"], r["currency"])),
                         schema=REVENUE_SCHEMA)
    reconcile(table)
    return table


def _net_of_included_tax(usage: int, fixed: int, backed: int) -> tuple[int, int]:
    """Usage and fixed-fee amounts without the tax that tax-inclusive prices held (`backed`,
    negative), shared in proportion to each stream's gross; usage takes the remainder cent."""
    gross = usage + fixed
    fixed_part = int((Decimal(backed) * fixed / gross).to_integral_value(ROUND_HALF_UP)) if gross else 0
    return usage + backed - fixed_part, fixed + fixed_part


TAX_SCHEMA = {"customer_id": pl.String, "period": pl.String, "currency": pl.String, "tax_minor": pl.Int64}


def tax_rows(invoices: list[Invoice], period: str) -> pl.DataFrame:
    """One row per customer x currency: the tax its documents carry, booked in `period`."""
    totals: dict[tuple[str, str], int] = defaultdict(int)
    for inv in invoices:
        tax = inv.tax_minor
        if tax:
            totals[(inv.customer_id, inv.currency)] += tax
    return pl.DataFrame([{"customer_id": c, "period": period, "currency": cur, "tax_minor": t}
                         for (c, cur), t in sorted(totals.items()) if t], schema=TAX_SCHEMA)


def _rounded(amounts: list[Decimal] | None, currency: str) -> tuple[int, int, int]:
    """Cumulative billed, recognized and breakage in minor units. Recognized and breakage are
    rounded together and breakage takes the remainder, so once everything paid for is used or
    expired they add up to exactly what was billed."""
    billed, recognized, breakage = amounts or (ZERO, ZERO, ZERO)
    both = to_minor(recognized + breakage, currency)
    recognized_minor = to_minor(recognized, currency)
    return to_minor(billed, currency), recognized_minor, both - recognized_minor


def in_period_or_before(entry, end_at) -> bool:
    """Whether a ledger entry falls in the period ending at `end_at` or before it: before its
    end, or an expiry (or rollover out) at its end instant, which in_period gives to the period
    it ends."""
    if isinstance(entry, ConsumeRun):
        return entry.occurred_at[0] < end_at  # a run of consume entries lies in one period
    at = entry.occurred_at
    return at < end_at or (at == end_at and (entry.kind == "expire"
                                             or (entry.kind == "rollover" and entry.credits < 0)))


def reconcile(revenue: pl.DataFrame) -> None:
    """Every row rolls forward and deferred revenue is never negative; otherwise refuse."""
    bad = revenue.filter(
        (pl.col("opening_deferred_minor") + pl.col("billed_minor") - pl.col("recognized_minor")
         - pl.col("breakage_minor") != pl.col("closing_deferred_minor"))
        | (pl.col("closing_deferred_minor") < 0) | (pl.col("opening_deferred_minor") < 0))
    if bad.height:
        raise ReconciliationError(f"revenue does not reconcile: {bad.row(0, named=True)}")


def journal(revenue: pl.DataFrame, tax: pl.DataFrame | None = None) -> pl.DataFrame:
    """Double entry for the period's revenue rows and the tax billed (`tax_rows`): tax is owed
    to the tax authority, a liability (`tax_payable`), never revenue. Debits equal credits per
    period and currency."""
    rows = []

    def post(r: dict, account: str, debit: int, credit: int, memo: str) -> None:
        if debit or credit:
            rows.append({"entry_id": f"J-{r['period']}-{len(rows) + 1:08d}", "period": r["period"],
                         "customer_id": r["customer_id"], "stream": r["stream"], "currency": r["currency"],
                         "account": account, "debit_minor": debit, "credit_minor": credit, "memo": memo})

    for r in revenue.iter_rows(named=True):
        billed = r["billed_minor"]
        if r["stream"] == "credits":
            post(r, "accounts_receivable", max(billed, 0), max(-billed, 0), "credits billed")
            post(r, "deferred_revenue", max(-billed, 0), max(billed, 0), "credits billed (deferred)")
            post(r, "deferred_revenue", r["recognized_minor"], 0, "credits consumed")
            post(r, "revenue", 0, r["recognized_minor"], "credits consumed")
            post(r, "deferred_revenue", r["breakage_minor"], 0, "credits expired")
            post(r, "breakage_revenue", 0, r["breakage_minor"], "credits expired")
        else:
            account = "contra_revenue" if r["stream"] == "goodwill_credit" else "revenue"
            post(r, "accounts_receivable", max(billed, 0), max(-billed, 0), f"{r['stream']} billed")
            post(r, account, max(-billed, 0), max(billed, 0), f"{r['stream']} billed")
    for t in (tax.iter_rows(named=True) if tax is not None else ()):
        r = {**t, "stream": "tax"}
        post(r, "accounts_receivable", max(t["tax_minor"], 0), max(-t["tax_minor"], 0), "tax billed")
        post(r, "tax_payable", max(-t["tax_minor"], 0), max(t["tax_minor"], 0), "tax billed")
    table = pl.DataFrame(rows, schema=JOURNAL_SCHEMA)
    for (period, currency), group in table.group_by(["period", "currency"]):
        if group["debit_minor"].sum() != group["credit_minor"].sum():
            raise ReconciliationError(f"journal of {period} does not balance in {currency}")
    return table
