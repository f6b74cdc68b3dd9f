"""The wallet's published tables: the credit ledger (one row per movement in a period) and the
credit balances (one row per grant alive in a period), and the rule that places an entry in a
period: entries belong to the period that contains them, an expiry (or a rollover out) at a
period's end instant to the period whose credits it ends.
"""
from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from decimal import Decimal

import polars as pl

from transforms.collector import cycle_collector_paused
from transforms.credits.model import ZERO, ConsumeRun, Entry, WalletReplay
from transforms.money import decimal_text
from transforms.periods import Period


def in_period(entry: Entry, period: Period) -> bool:
    """Entries belong to the period that contains them; an expiry at a period's end instant
    belongs to the period whose credits it ends."""
    return _within(entry, period.start_at, period.end_at)


def _within(entry: Entry, start_at: datetime, end_at: datetime) -> bool:
    """`in_period` with the period's bounds worked out once, for loops over every entry."""
    if entry.kind == "expire" or (entry.kind == "rollover" and entry.credits < 0):
        return start_at < entry.occurred_at <= end_at
    return start_at <= entry.occurred_at < end_at


LEDGER_SCHEMA = {
    "entry_id": pl.String, "customer_id": pl.String, "grant_id": pl.String, "kind": pl.String,
    "credits": pl.String, "balance_after": pl.String, "occurred_at": pl.Datetime("us", "UTC"),
    "expires_at": pl.Datetime("us", "UTC"), "cost_basis": pl.String, "subscription_id": pl.String,
    "event_id": pl.String, "meter": pl.String, "period": pl.String,
}


@cycle_collector_paused()  # see transforms.collector
def ledger_table(replay: WalletReplay, period: Period) -> pl.DataFrame:
    """One row per wallet movement in `period`, in replay order (customer, then time), numbered
    L-2026-10-00000001...

    Built column by column (no dict per entry; a 50M-event close has millions of entries): a run
    of consume entries extends the columns with its own, the numbers and the period in Polars,
    and each distinct cost basis formatted once."""
    start_at, end_at = period.start_at, period.end_at
    bases: dict[Decimal, str] = {}

    def basis_text(value: Decimal) -> str:
        text = bases.get(value)
        if text is None:
            text = bases[value] = decimal_text(value)
        return text

    columns: dict[str, list] = {c: [] for c in ("customer_id", "grant_id", "kind", "credits", "balance_after",
                                                "occurred_at", "expires_at", "cost_basis", "subscription_id",
                                                "event_id", "meter")}
    (customer_id, grant_id, kind, credits, balance_after, occurred_at, expires_at, cost_basis, subscription_id,
     event_id, meter) = columns.values()
    for m in replay.movements:
        if isinstance(m, ConsumeRun):
            if not start_at <= m.occurred_at[0] < end_at:  # a run lies in one period
                continue
            n = len(m.credits)
            customer_id.extend([m.customer_id] * n)
            grant_id.extend([m.grant_id] * n)
            kind.extend(["consume"] * n)
            credits.extend(map(decimal_text, m.credits))
            balance_after.extend(map(decimal_text, m.balance_after))
            occurred_at.extend(m.occurred_at)
            expires_at.extend([m.expires_at] * n)
            cost_basis.extend([basis_text(m.cost_basis)] * n)
            subscription_id.extend([m.subscription_id] * n)
            event_id.extend(m.event_ids)
            meter.extend(m.meters)
        elif _within(m, start_at, end_at):
            customer_id.append(m.customer_id)
            grant_id.append(m.grant_id)
            kind.append(m.kind)
            credits.append(decimal_text(m.credits))
            balance_after.append(decimal_text(m.balance_after))
            occurred_at.append(m.occurred_at)
            expires_at.append(m.expires_at)
            cost_basis.append(basis_text(m.cost_basis))
            subscription_id.append(m.subscription_id)
            event_id.append(m.event_id)
            meter.append(m.meter)
    schema = {c: t for c, t in LEDGER_SCHEMA.items() if c in columns}
    return pl.DataFrame(columns, schema=schema).select(
        pl.format(f"L-{period}-{{}}", (pl.int_range(1, pl.len() + 1)).cast(pl.String).str.zfill(8))
        .alias("entry_id"), *columns, pl.lit(str(period), dtype=pl.String).alias("period"))


BALANCES_SCHEMA = {
    "customer_id": pl.String, "grant_id": pl.String, "kind": pl.String, "subscription_id": pl.String,
    "granted_at": pl.Datetime("us", "UTC"), "expires_at": pl.Datetime("us", "UTC"), "credits": pl.String,
    "price": pl.String, "currency": pl.String, "cost_basis": pl.String, "opening": pl.String,
    "granted": pl.String, "consumed": pl.String, "expired": pl.String, "rolled_over": pl.String,
    "closing": pl.String, "period": pl.String,
}


def moves_by_grant(replay: WalletReplay, period: Period) -> dict[str, list[Decimal]]:
    """Per grant: [opening, granted, used, expired, rolled over] credits in `period`. A balance
    brought forward (`opening` entries of a run started from a close) is the grant's opening."""
    moves: dict[str, list[Decimal]] = defaultdict(lambda: [ZERO, ZERO, ZERO, ZERO, ZERO])
    start_at, end_at = period.start_at, period.end_at  # once, not per entry
    for e in replay.movements:
        if isinstance(e, ConsumeRun):  # in one period: in this one, before it or after it
            if e.occurred_at[0] < end_at:
                acc = moves[e.grant_id]
                if start_at <= e.occurred_at[0]:
                    for credits in e.credits:
                        acc[2] -= credits
                else:
                    for credits in e.credits:
                        acc[0] += credits
            continue
        kind, at = e.kind, e.occurred_at
        ends = kind == "expire" or (kind == "rollover" and e.credits < 0)  # see in_period
        if start_at < at <= end_at if ends else start_at <= at < end_at:
            acc = moves[e.grant_id]
            if kind == "consume":
                acc[2] -= e.credits
            elif kind == "opening":
                acc[0] += e.credits
            elif kind in ("grant", "purchase", "top_up") or (kind == "rollover" and e.credits > 0):
                acc[1] += e.credits
            elif kind == "expire":
                acc[3] -= e.credits
            else:
                acc[4] -= e.credits
        elif at <= start_at if ends else at < start_at:  # before the period: part of its opening
            moves[e.grant_id][0] += e.credits
    return moves


@cycle_collector_paused()  # see transforms.collector
def balances_table(replay: WalletReplay, period: Period) -> pl.DataFrame:
    """One row per grant alive at some point in `period`: opening + granted - consumed - expired
    - rolled over = closing. The closing balances of one period are the opening of the next."""
    moves = moves_by_grant(replay, period)
    rows = []
    for grant_id in sorted(moves):
        opening, granted, consumed, expired, rolled = moves[grant_id]
        closing = opening + granted - consumed - expired - rolled
        if opening == granted == consumed == expired == rolled == closing == 0:
            continue
        g = replay.grants[grant_id]
        rows.append({"customer_id": g.customer_id, "grant_id": grant_id, "kind": g.kind,
                     "subscription_id": g.subscription_id, "granted_at": g.granted_at, "expires_at": g.expires_at,
                     "credits": decimal_text(g.credits), "price": decimal_text(g.price), "currency": g.currency,
                     "cost_basis": decimal_text(g.cost_basis), "opening": decimal_text(opening),
                     "granted": decimal_text(granted), "consumed": decimal_text(consumed),
                     "expired": decimal_text(expired), "rolled_over": decimal_text(rolled),
                     "closing": decimal_text(closing), "period": str(period)})
    return pl.DataFrame(rows, schema=BALANCES_SCHEMA)
