"""Night by night: each customer's wallet resumes from where the previous night left it.

A customer's replay is a function of its grants and its events in (event_at, event_id) order,
so the state after its last consumed event (a checkpoint) plus the events after it gives what
a replay from the start gives. The checkpoint is taken before the wallet is advanced to the
period's end: expiries and grants between the last event and the next one are applied when the
next one arrives, exactly as in one replay. It also carries what the replay produced so far,
with the consumption entries summed per grant: the nightly outputs (balances, credit lines,
alerts, units left for the charges) read only those sums, never the per-event ledger.
"""
from __future__ import annotations

import json
from dataclasses import replace
from datetime import date, datetime, timezone
from decimal import Decimal

import polars as pl

from transforms.credits.events import period_credit_rows
from transforms.credits.ledger import in_period
from transforms.credits.model import ConsumeRun, CreditEvent, Entry, Grant, Movement, WalletReplay
from transforms.credits.replay import by_customer, customers_with_events
from transforms.credits.wallet import Wallet
from transforms.inputs.plans import Catalog
from transforms.inputs.reference import Subscription
from transforms.periods import Period, utc_midnight

CHECKPOINT_FORMAT = 1


def resume_days(checkpoint: dict | None, changed_from: dict[str, date] | None) -> dict[str, date | None]:
    """Per customer whose checkpointed wallet tonight's changes leave intact: the first day whose
    credit events it still has to consume (None: none, its usage did not change). A customer is
    left out, and replayed from the start, when its usage changed on or before the day of its
    last consumed event (a late event), or when there is no checkpoint or `changed_from` is None
    (anything may have changed)."""
    if checkpoint is None or changed_from is None:
        return {}
    out: dict[str, date | None] = {}
    for customer, state in checkpoint["customers"].items():
        day = changed_from.get(customer)
        last = state["last"]
        if day is None or last is None or day > datetime.fromisoformat(last[0]).date():
            out[customer] = day
    return out


def credit_events_since(per_event_usage: pl.DataFrame, segments: list,
                        since: dict[str, date | None]) -> pl.DataFrame:
    """The period's credit events still to replay (events.CREDIT_EVENT_SCHEMA): a resumed
    customer's (in `since`) from its day on (none when its day is None), every other customer's
    all of them."""
    frame = period_credit_rows(per_event_usage, segments)
    if since:
        never = datetime.max.replace(tzinfo=timezone.utc)
        starts = pl.DataFrame({"customer_id": list(since),
                               "since_at": [utc_midnight(d) if d is not None else never for d in since.values()]},
                              schema={"customer_id": pl.String, "since_at": pl.Datetime("us", "UTC")})
        frame = (frame.join(starts, on="customer_id", how="left", maintain_order="left")
                 .filter(pl.col("since_at").is_null() | (pl.col("event_at") >= pl.col("since_at")))
                 .drop("since_at"))
    return frame


def replayed_wallets_and_checkpoint(grants: list[Grant], subs: list[Subscription], catalog: Catalog,
                                    events: pl.DataFrame | list[CreditEvent], period: Period, checkpoint: dict | None,
                                    since: dict[str, date | None]) -> tuple[WalletReplay, dict]:
    """Every customer's wallet through `period`, as `replay.replayed_wallets` gives it (with
    consumption entries summed per grant), and tonight's checkpoint. Customers in `since` continue from
    `checkpoint` with `events` (only their events after it); the others replay `grants` and
    `events` from the start."""
    grants_of = by_customer(grants)
    replay = WalletReplay()
    states = {}
    for customer, columns, lo, hi in customers_with_events(set(grants_of) | set(since), events, subs, catalog):
        part = WalletReplay()
        if customer in since:
            wallet, last = _wallet_restored(customer, checkpoint["customers"][customer], part)
        else:
            wallet, last = Wallet(customer, grants_of.get(customer, []), part), None
        if columns is not None:
            last = wallet.consume_events(columns, lo, hi) or last
        part.movements = _consumption_summed(part.movements, period)
        states[customer] = _wallet_saved(wallet, last)
        wallet.advance(period.end_at)  # on the wallet as tonight leaves it, after the checkpoint
        replay.movements.extend(part.movements)
        replay.billable_units.update(part.billable_units)  # keyed by subscription: one customer's
        replay.billable_by_day.update(part.billable_by_day)
        replay.blocked_units.update(part.blocked_units)
        replay.grants.update(part.grants)
        replay.alerts.extend(part.alerts)
    return replay, {"format": CHECKPOINT_FORMAT, "period": str(period), "customers": states}


def checkpoint_bytes(checkpoint: dict) -> bytes:
    """The checkpoint as stored: JSON, decimals as exact strings, same inputs same bytes."""
    return (json.dumps(checkpoint, separators=(",", ":")) + "\n").encode()


def checkpoint_from(data: bytes, period: Period) -> dict | None:
    """A stored checkpoint, or None when it is of another format or period."""
    checkpoint = json.loads(data)
    if checkpoint.get("format") != CHECKPOINT_FORMAT or checkpoint.get("period") != str(period):
        return None
    return checkpoint


def _consumption_summed(movements: list[Movement], period: Period) -> list[Entry]:
    """The entries with each grant's consumption in `period` summed into one entry, at the place
    of its first. Sums are taken in replay order, so the per-grant totals are the ones the single
    entries give (negation is exact). Applied again to its own output plus later entries, it
    gives what it gives on all of them at once."""
    out: list[Entry] = []
    at: dict[str, int] = {}
    for m in movements:
        for e in m.entries() if isinstance(m, ConsumeRun) else (m,):
            if e.kind != "consume" or not in_period(e, period):
                out.append(e)
            elif e.grant_id not in at:
                at[e.grant_id] = len(out)
                out.append(replace(e, event_id=None, meter=None))
            else:
                first = out[at[e.grant_id]]
                out[at[e.grant_id]] = replace(first, credits=first.credits + e.credits, balance_after=e.balance_after)
    return out


def _grant_saved(g: Grant) -> list:
    return [g.grant_id, g.customer_id, g.subscription_id, g.kind, _at_text(g.granted_at), _at_text(g.expires_at),
            str(g.credits), str(g.price), g.currency, str(g.remaining), str(g.rollover_max)]


def _grant_restored(row: list) -> Grant:
    gid, customer, sub, kind, granted_at, expires_at, credits, price, currency, remaining, rollover_max = row
    return Grant(gid, customer, sub, kind, _at(granted_at), _at(expires_at), Decimal(credits), Decimal(price),
                 currency, Decimal(remaining), Decimal(rollover_max))


def _wallet_saved(w: Wallet, last: tuple[datetime, str] | None) -> dict:
    out = w.out
    return {
        "last": None if last is None else [_at_text(last[0]), last[1]],
        "balance": str(w.balance),
        "grants": [_grant_saved(g) for g in out.grants.values()],
        "active": [g.grant_id for g in w.active],
        "pending": [_grant_saved(g) for g in w.pending],
        "top_ups": [[str(p), n] for p, n in w.top_ups.items()],
        "low_fired": sorted(str(p) for p in w.low_fired),
        "exhausted_fired": sorted(str(p) for p in w.exhausted_fired),
        "limit_fired": sorted(str(p) for p in w.limit_fired),
        "grace_used": [[sub, str(p), str(v)] for (sub, p), v in w.grace_used.items()],
        "entries": [[e.customer_id, e.grant_id, e.kind, str(e.credits), str(e.balance_after), _at_text(e.occurred_at),
                     _at_text(e.expires_at), str(e.cost_basis), e.subscription_id, e.event_id, e.meter]
                    for e in out.movements],
        "billable_units": [[*k, str(v)] for k, v in out.billable_units.items()],
        "billable_by_day": [[*k[:4], k[4].isoformat(), str(v)] for k, v in out.billable_by_day.items()],
        "blocked_units": [[*k, str(v)] for k, v in out.blocked_units.items()],
        "alerts": [[*a[:5], _at_text(a[5])] for a in out.alerts],
    }


def _wallet_restored(customer_id: str, state: dict, out: WalletReplay) -> tuple[Wallet, tuple[datetime, str] | None]:
    w = Wallet(customer_id, [], out)
    for row in state["grants"]:
        g = _grant_restored(row)
        out.grants[g.grant_id] = g
    w.active = [out.grants[gid] for gid in state["active"]]
    w.pending = [_grant_restored(row) for row in state["pending"]]
    w.balance = Decimal(state["balance"])
    for p, n in state["top_ups"]:
        w.top_ups[Period.parse(p)] = n
    w.low_fired = {Period.parse(p) for p in state["low_fired"]}
    w.exhausted_fired = {Period.parse(p) for p in state["exhausted_fired"]}
    w.limit_fired = {Period.parse(p) for p in state.get("limit_fired", ())}  # absent in older checkpoints
    for sub, p, v in state["grace_used"]:
        w.grace_used[(sub, Period.parse(p))] = Decimal(v)
    out.movements = [Entry(c, gid, kind, Decimal(credits), Decimal(after), _at(at), _at(expires), Decimal(basis), sub,
                         event_id, meter)
                   for c, gid, kind, credits, after, at, expires, basis, sub, event_id, meter in state["entries"]]
    for *k, v in state["billable_units"]:
        out.billable_units[tuple(k)] = Decimal(v)
    for sub, seg, meter, dims, day, v in state["billable_by_day"]:
        out.billable_by_day[(sub, seg, meter, dims, date.fromisoformat(day))] = Decimal(v)
    for *k, v in state["blocked_units"]:
        out.blocked_units[tuple(k)] = Decimal(v)
    out.alerts = [(*a[:5], _at(a[5])) for a in state["alerts"]]
    last = state["last"]
    return w, None if last is None else (_at(last[0]), last[1])


def _at_text(at: datetime | None) -> str | None:
    return None if at is None else at.astimezone(timezone.utc).isoformat()


def _at(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)
