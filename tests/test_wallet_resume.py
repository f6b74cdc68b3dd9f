"""Wallets resumed night by night equal one replay of the month.

A nightly run keeps each customer's wallet as it stood after its last consumed event (the
checkpoint) and the next night continues from it with only the new events; a customer with a
late event (on or before the day of its last consumed one) is replayed from the start. The
property: whatever the nights and however late events arrive, every night's balances, credit
lines, alerts and units left for the charges are those of a replay of everything taken in so
far, and the last checkpoint has the same bytes as one taken after a single replay of the month.
"""
from __future__ import annotations

import textwrap
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal as D

import polars as pl
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from creditutil import catalog, event, plan, purchase, subscription
from transforms.credits.checkpoint import (
    checkpoint_bytes,
    checkpoint_from,
    credit_events_since,
    replayed_wallets_and_checkpoint,
    resume_days,
)
from transforms.credits.grants import history_grants
from transforms.credits.ledger import balances_table
from transforms.credits.lines import credit_lines
from transforms.credits.replay import replayed_wallets
from transforms.finance.alerts import credit_alerts
from transforms.inputs.reference import segments_in
from transforms.periods import Period

OCT = Period(2026, 10)

PLANS = {
    # plan grants, auto top-ups bought when the balance runs low (at most two a month)
    "r-topup": """
        fixed_fees: [{name: Seat, amount: "10.00"}]
        charges: [{meter: images, price: {model: standard, unit_price: "0.05"}}]
        credits:
          grants: [{credits: 30, every: period, expires: period_end, allocated: "3.00"}]
          consume: {images: 1}
          top_up: {credits: 25, price: "2.50", auto: true, below: 5, max_per_period: 2}
        """,
    # a free grant that lapses mid-month (after 9 days), 2 credits an image, blocking with grace
    "r-block": """
        charges: [{meter: images, price: {model: standard, unit_price: "0.05"}}]
        credits:
          grants: [{credits: 40, every: once, expires: P9D}]
          consume: {images: 2}
          when_exhausted: block
          grace: 7
          low_balance: 10
        """,
    # purchases and 10-day top-ups only
    "r-packs": """
        charges: [{meter: images, price: {model: standard, unit_price: "0.05"}}]
        credits:
          consume: {images: 1}
          top_up: {credits: 10, price: "1.00", auto: true, below: 1, expires: P10D}
        """,
    # a money wallet: each image draws its rated amount (0.04) from a 5.00 balance
    "r-money": """
        fixed_fees: [{name: Platform fee, amount: "6.00"}]
        charges: [{name: Images, meter: images, price: {model: standard, unit_price: "0.04"}}]
        credits:
          unit: money
          grants: [{credits: 5, every: once, expires: never, allocated: "5.00"}]
        """,
}
CATALOG = catalog(*(plan(f"plan: {key}\nversion: 1\neffective_from: 2026-01-01\ncurrency: USD\n"
                         + textwrap.dedent(text), f"{key}.yaml") for key, text in PLANS.items()))
START = datetime(2026, 10, 1, tzinfo=timezone.utc)

# One customer: (plan, start day, purchases as (hour of the month, credits, price in cents),
# events as (hour of the month, tenths of an image, nights late)). An event arrives on the night
# of its day plus its lateness: a late event lands before the checkpoint of the night it arrives.
customer_st = st.tuples(
    st.sampled_from(sorted(PLANS)), st.integers(1, 20),
    st.lists(st.tuples(st.integers(0, 31 * 24 - 1), st.integers(1, 60), st.integers(0, 900)), max_size=2),
    st.lists(st.tuples(st.integers(0, 31 * 24 - 1), st.integers(0, 400), st.sampled_from([0, 0, 0, 1, 3])),
             max_size=10))
nights_st = st.lists(st.integers(1, 31), min_size=1, max_size=8).map(lambda n: sorted(set(n) | {31}))


def world(customers):
    subs, purchases, events, arrives = [], [], [], {}
    for n, (plan_key, day, packs, uses) in enumerate(customers):
        customer, sub_id = f"c{n}", f"s{n}"
        start = date(2026, 10, day)
        subs.append(subscription(sub_id, customer, plan_key, start=start))
        for k, (hours, credits, cents) in enumerate(packs):
            bought = max(START + timedelta(hours=hours), datetime.combine(start, datetime.min.time(), timezone.utc))
            purchases.append(purchase(f"p{n}-{k}", customer, credits, str(D(cents) / 100), bought))
        for k, (hours, tenths, late) in enumerate(uses):
            when = START + timedelta(hours=hours)
            if when.date() >= start:
                events.append(event(customer, sub_id, f"e{n}-{k:02d}", when, D(tenths) / 10))
                arrives[f"e{n}-{k:02d}"] = min(when.day + late, 31)
    return subs, purchases, events, arrives


def per_event_usage(events) -> pl.DataFrame:
    """The events as check-night gives them (one segment per subscription here)."""
    return pl.DataFrame([(e.subscription_id, 1, e.meter, e.dims, e.quantity, e.customer_id, e.event_id, e.event_at)
                         for e in events],
                        schema={"subscription_id": pl.String, "segment_no": pl.Int64, "meter": pl.String,
                                "dims": pl.String, "quantity": pl.Decimal(38, 9), "customer_id": pl.String,
                                "event_id": pl.String, "event_at": pl.Datetime("us", "UTC")}, orient="row")


def outputs(replay, subs, purchases) -> dict:
    """What a night publishes from the wallets, exactly (decimals as text, so 1.0 != 1.00)."""
    return {
        "balances": balances_table(replay, OCT).to_dicts(),
        "lines": {s: [(line.kind, line.description, str(line.amount), line.amount_minor) for line in lines]
                  for s, lines in credit_lines(OCT, replay, purchases, subs, {s.subscription_id: "USD" for s in subs},
                                               {s.subscription_id: "half_up" for s in subs}).items()},
        "alerts": credit_alerts(replay, OCT),
        "billable": {k: str(v) for k, v in replay.billable_units.items()},
        "billable_by_day": {k: str(v) for k, v in replay.billable_by_day.items()},
        "blocked": {k: str(v) for k, v in replay.blocked_units.items()},
    }


def one_go(subs, purchases, events):
    return replayed_wallets_and_checkpoint(history_grants(subs, CATALOG, purchases, OCT), subs, CATALOG, events, OCT,
                                           None, {})


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.lists(customer_st, min_size=1, max_size=3), nights_st)
# top-ups on r-topup: 30 granted, 27.5 used leaves 2.5 < 5 (buys #1), then a late event on day 2
@example([("r-topup", 1, [], [(5, 275, 0), (30, 10, 0), (40, 50, 3)])], [1, 2, 3, 31])
# r-block: the grant lapses on the 10th; events after it are blocked beyond 7 credits of grace
@example([("r-block", 1, [], [(24, 150, 0), (10 * 24, 30, 0), (11 * 24, 80, 0)])], [2, 11, 12, 31])
# the money wallet: 5.00 covers 125 images, the rest bills; one event arrives a night late
@example([("r-money", 1, [], [(1, 1000, 0), (30, 300, 1), (50, 10, 0)])], [1, 2, 3, 31])
def test_wallets_resumed_night_by_night_equal_one_replay(customers, nights):
    subs, purchases, events, arrives = world(customers)
    segments = segments_in(OCT, subs, CATALOG)
    grants_of = lambda: history_grants(subs, CATALOG, purchases, OCT)  # noqa: E731 (fresh grants each night)
    checkpoint, previous = None, 0
    for night in nights:
        so_far = [e for e in events if arrives[e.event_id] <= night]
        arrived = [e for e in so_far if arrives[e.event_id] > previous]
        changed_from: dict[str, date] = {}
        for e in arrived:
            changed_from[e.customer_id] = min(changed_from.get(e.customer_id, e.event_at.date()), e.event_at.date())
        since = resume_days(checkpoint, changed_from)
        tonight = credit_events_since(per_event_usage(so_far), segments, since)
        replay, saved = replayed_wallets_and_checkpoint(grants_of(), subs, CATALOG, tonight, OCT, checkpoint, since)
        every = credit_events_since(per_event_usage(so_far), segments, {})  # quantities as settled: 9 decimals
        full, full_saved = one_go(subs, purchases, every)
        assert outputs(replay, subs, purchases) == outputs(full, subs, purchases)
        assert checkpoint_bytes(saved) == checkpoint_bytes(full_saved)
        # the close's replay (the whole ledger) gives the same balances and alerts
        close = replayed_wallets(history_grants(subs, CATALOG, purchases, OCT), subs, CATALOG, every, OCT)
        assert outputs(replay, subs, purchases) == outputs(close, subs, purchases)
        checkpoint, previous = checkpoint_from(checkpoint_bytes(saved), OCT), night


def test_a_late_event_before_the_checkpoint_replays_its_customer_from_the_start():
    checkpoint = {"customers": {"a": {"last": ["2026-10-05T10:00:00+00:00", "e1"]},
                                "b": {"last": ["2026-10-05T10:00:00+00:00", "e2"]},
                                "c": {"last": None}, "d": {"last": ["2026-10-05T10:00:00+00:00", "e3"]}}}
    since = resume_days(checkpoint, {"a": date(2026, 10, 6), "b": date(2026, 10, 5), "c": date(2026, 10, 2)})
    # a: new events after its last day; b: an event on its last day (maybe before it): replayed;
    # c: nothing consumed yet; d: unchanged, nothing to consume
    assert since == {"a": date(2026, 10, 6), "c": date(2026, 10, 2), "d": None}
    assert resume_days(checkpoint, None) == {} and resume_days(None, {}) == {}


def test_credit_events_since_takes_a_resumed_customers_rows_from_its_day_and_everyone_elses_all():
    subs = [subscription("s0", "c0", "r-topup"), subscription("s1", "c1", "r-topup"),
            subscription("s2", "c2", "r-topup")]
    at = lambda d, h: datetime(2026, 10, d, h, tzinfo=timezone.utc)  # noqa: E731
    events = [event("c0", "s0", "a1", at(3, 1), 1), event("c0", "s0", "a2", at(4, 1), 1),
              event("c1", "s1", "b1", at(3, 1), 1), event("c2", "s2", "c1", at(4, 1), 1)]
    picked = credit_events_since(per_event_usage(events), segments_in(OCT, subs, CATALOG),
                                 {"c0": date(2026, 10, 4), "c2": None})
    assert picked["event_id"].to_list() == ["a2", "b1"]
