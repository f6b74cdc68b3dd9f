"""The wallet moving through stretches at once equals the wallet consuming every event one at a
time (issue #17).

Between breakpoints (a grant, an expiry, a top-up threshold, the grant in use running out, a
period's end, a change of plan) a wallet only draws from the grant in use, and the replay takes
such a stretch with cumulative sums and keeps its consume entries as columns. The property: on
random wallets (plan grants that roll over or lapse mid-month, purchases, auto top-ups with a
cap, blocking with grace, low-balance alerts, rates by dimension, a money wallet whose draws
divide inexactly, a plan version changing mid-month, two subscriptions sharing a wallet, two
months of events) both replays give the same ledger, entry by entry with the same decimals, the
same units left and blocked (as text: same exponents), the same alerts and grants, and the same
ledger and balances tables.
"""
from __future__ import annotations

import json
import textwrap
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal as D
from unittest.mock import patch

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from creditutil import catalog, event, plan, purchase, subscription
from transforms.credits.events import credit_events_frame
from transforms.credits.grants import history_grants
from transforms.credits.ledger import balances_table, ledger_table
from transforms.credits.model import ConsumeRun
from transforms.credits.replay import replayed_wallets
from transforms.periods import Period

SEP, OCT = Period(2026, 9), Period(2026, 10)
START = datetime(2026, 9, 1, tzinfo=timezone.utc)
HOURS = 61 * 24  # September and October

HEAD = "plan: {key}\nversion: {version}\neffective_from: {since}\ncurrency: USD\n"
PLANS = {
    # plan grants that roll over (30 at most) into the next month; auto top-ups below 5, two a month
    "s-topup": """
        fixed_fees: [{name: Seat, amount: "10.00"}]
        charges: [{meter: images, price: {model: standard, unit_price: "0.05"}}]
        credits:
          grants: [{credits: 30, every: period, expires: period_end, allocated: "3.00", rollover_max: 10}]
          consume: {images: 1}
          top_up: {credits: 25, price: "2.50", auto: true, below: 5, max_per_period: 2}
        """,
    # a free grant that lapses after 9 days, 2 credits an image, blocking with grace, low at 10
    "s-block": """
        charges: [{meter: images, price: {model: standard, unit_price: "0.05"}}]
        credits:
          grants: [{credits: 40, every: once, expires: P9D}]
          consume: {images: 2}
          when_exhausted: block
          grace: 7
          low_balance: 10
        """,
    # rates by model, a grant that never expires, 10-day top-ups below 1
    "s-dims": """
        charges: [{meter: images, price: {model: standard, unit_price: "0.01"}}]
        credits:
          grants: [{credits: 50, every: once, expires: never}]
          consume:
            images: {by: model, rates: {big: 3, tiny: "0.25"}, default: 1}
          top_up: {credits: 10, price: "1.00", auto: true, below: 1, expires: P10D}
        """,
    # a money wallet: an image draws 0.10 / 3 of a dollar a tenth (inexact division)
    "s-money": """
        fixed_fees: [{name: Platform fee, amount: "6.00"}]
        charges: [{name: Images, meter: images, price: {model: standard, unit_price: "0.10", per: 3}}]
        credits:
          unit: money
          grants: [{credits: 5, every: period, expires: period_end, allocated: "5.00"}]
          low_balance: 1
        """,
}
# s-topup's version 2 from mid-October: a higher top-up threshold, so the plan changes mid-stretch
VERSION_2 = """
        fixed_fees: [{name: Seat, amount: "10.00"}]
        charges: [{meter: images, price: {model: standard, unit_price: "0.05"}}]
        credits:
          grants: [{credits: 30, every: period, expires: period_end, allocated: "3.00", rollover_max: 10}]
          consume: {images: 1}
          top_up: {credits: 25, price: "2.50", auto: true, below: 12, max_per_period: 2}
        """
CATALOG = catalog(*[plan(HEAD.format(key=k, version=1, since="2026-01-01") + textwrap.dedent(t), f"{k}.yaml")
                    for k, t in PLANS.items()],
                  plan(HEAD.format(key="s-topup", version=2, since="2026-10-15") + textwrap.dedent(VERSION_2),
                       "s-topup-2.yaml"))

# One customer: its subscriptions' plans (one or two sharing the wallet), purchases as (hour,
# credits, cents, days to expiry or 0 for never), events as (hour, subscription, tenths, model).
customer_st = st.tuples(
    st.lists(st.sampled_from(sorted(PLANS)), min_size=1, max_size=2),
    st.lists(st.tuples(st.integers(0, HOURS - 1), st.integers(1, 60), st.integers(0, 900), st.integers(0, 20)),
             max_size=2),
    st.lists(st.tuples(st.integers(0, HOURS - 1), st.integers(0, 1), st.integers(0, 120),
                       st.sampled_from(["big", "tiny", "other"])), max_size=80))


def world(customers):
    subs, purchases, events = [], [], []
    for n, (plans, packs, uses) in enumerate(customers):
        customer = f"c{n}"
        ids = [f"s{n}-{i}" for i in range(len(plans))]
        subs += [subscription(sub_id, customer, key, start=date(2026, 9, 1)) for sub_id, key in zip(ids, plans,
                                                                                                     strict=True)]
        for k, (hours, credits, cents, days) in enumerate(packs):
            bought = START + timedelta(hours=hours)
            purchases.append(purchase(f"p{n}-{k}", customer, credits, str(D(cents) / 100), bought,
                                      bought + timedelta(days=days) if days else None))
        for k, (hours, which, tenths, model) in enumerate(uses):
            events.append(event(customer, ids[which % len(ids)], f"e{n}-{k:02d}", START + timedelta(hours=hours),
                                D(tenths) / 10, dims={"model": model}))
    return subs, purchases, events


def exactly(replay) -> dict:
    """Everything a replay gives back, decimals as text (so 1.0 != 1.00)."""
    def text(mapping):
        return {k: str(v) for k, v in mapping.items()}
    return {
        "entries": [tuple(str(v) if isinstance(v, D) else v for v in vars_of(e)) for e in replay.entries],
        "billable": text(replay.billable_units), "billable_by_day": text(replay.billable_by_day),
        "blocked": text(replay.blocked_units), "alerts": replay.alerts,
        "grants": {gid: json.dumps([str(v) for v in vars(g).values()]) for gid, g in replay.grants.items()},
    }


def vars_of(entry) -> tuple:
    return tuple(getattr(entry, f) for f in entry.__slots__)


SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.lists(customer_st, min_size=1, max_size=3))
# a long run of small draws from one grant, crossing the top-up threshold and October's new version
@example([(["s-topup"], [], [(24 * 30 + h, 0, 7, "big") for h in range(0, 600, 9)])])
# two subscriptions on one wallet, a money plan and a block plan taking turns
@example([(["s-money", "s-block"], [(5, 40, 400, 3)], [(h, h % 2, 10 + h % 50, "tiny") for h in range(0, 1400, 23)])])
def test_stretches_equal_one_event_at_a_time(customers):
    subs, purchases, events = world(customers)
    for period, as_frame in ((SEP, False), (OCT, False), (OCT, True)):
        seen = [e for e in events if e.event_at < period.end_at]
        if as_frame:  # as the close feeds them: a frame, read a batch of customers at a time
            seen = credit_events_frame(seen)
        # each replay its own grants: a replay runs its grants down
        with patch("transforms.credits.replay.BATCH_EVENTS", 30):
            fast = replayed_wallets(history_grants(subs, CATALOG, purchases, period), subs, CATALOG, seen, period)
        slow = replayed_wallets(history_grants(subs, CATALOG, purchases, period), subs, CATALOG, seen, period,
                                stretches=False)
        assert not any(isinstance(m, ConsumeRun) for m in slow.movements)
        assert exactly(fast) == exactly(slow)
        assert ledger_table(fast, period).equals(ledger_table(slow, period), null_equal=True)
        assert balances_table(fast, period).equals(balances_table(slow, period), null_equal=True)


def test_a_long_stretch_is_one_run_of_consume_entries():
    subs, purchases, events = world([(["s-topup"], [], [(24 * 2 + h, 0, 5, "big") for h in range(40)])])
    replay = replayed_wallets(history_grants(subs, CATALOG, purchases, SEP), subs, CATALOG, events, SEP)
    runs = [m for m in replay.movements if isinstance(m, ConsumeRun)]
    # 30 credits, half a credit an image: 40 images draw 20, one stretch from the September grant
    assert [(r.grant_id, len(r), str(r.balance_after[-1])) for r in runs] == [("s0-0/2026-09/g1", 40, "10.0")]
