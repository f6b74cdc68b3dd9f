"""The post-settle tables built column by column, with the period's bounds worked out once, equal
the row-by-row rules they replace: the credit ledger, the grants' movements, the entries revenue
reads, and the charge groups shared across invoices; consume entries packed into runs (as the
wallet's stretches keep them) give what the single entries give."""
from __future__ import annotations

from collections import defaultdict
from datetime import timedelta
from decimal import Decimal as D

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from transforms.credits.ledger import LEDGER_SCHEMA, in_period, ledger_table, moves_by_grant
from transforms.credits.model import ConsumeRun, Entry, WalletReplay
from transforms.engine.invoices import groups_by_dims
from transforms.finance import revenue
from transforms.inputs.plans import parse_plan
from transforms.money import decimal_text
from transforms.periods import Period

PERIOD = Period.parse("2026-10")
ZERO = D(0)
KINDS = ("grant", "purchase", "top_up", "consume", "expire", "rollover", "opening")
# instants on and around the bounds of the period and of the one before, where the rules differ
INSTANTS = [PERIOD.previous().start_at, PERIOD.start_at, PERIOD.end_at]
INSTANTS = sorted({t + timedelta(microseconds=d) for t in INSTANTS for d in (-1, 0, 1)}
                  | {PERIOD.start_at + timedelta(days=9)})


@st.composite
def entries(draw) -> list[Entry]:
    out = []
    for i in range(draw(st.integers(0, 25))):
        kind = draw(st.sampled_from(KINDS))
        credits_ = D(draw(st.integers(-500, 500))) / D(draw(st.sampled_from([1, 4, 1000])))
        grant = f"g{draw(st.integers(1, 4))}"
        out.append(Entry(f"c{draw(st.integers(1, 2))}", grant, kind, credits_, D(draw(st.integers(-9, 999))) / 8,
                         draw(st.sampled_from(INSTANTS)), draw(st.sampled_from([None, PERIOD.end_at])),
                         draw(st.sampled_from([ZERO, D("0.01"), D("0.0125")])), draw(st.sampled_from([None, "s1"])),
                         f"e{i}" if kind == "consume" else None, "tokens" if kind == "consume" else None))
    return out


def packed(entries_: list[Entry]) -> list:
    """The entries as a replay keeps them: consecutive consume entries of one customer, grant
    and period packed into a ConsumeRun (the wallet's stretches)."""
    out: list = []
    for e in entries_:
        last = out[-1] if out else None
        if e.kind != "consume":
            out.append(e)
        elif (isinstance(last, ConsumeRun) and (last.customer_id, last.grant_id, last.expires_at, last.cost_basis,
                                                last.subscription_id) == (e.customer_id, e.grant_id, e.expires_at,
                                                                          e.cost_basis, e.subscription_id)
              and Period.containing(last.occurred_at[0].date()) == Period.containing(e.occurred_at.date())):
            last.event_ids.append(e.event_id)
            last.meters.append(e.meter)
            last.occurred_at.append(e.occurred_at)
            last.credits.append(e.credits)
            last.balance_after.append(e.balance_after)
        else:
            out.append(ConsumeRun(e.customer_id, e.grant_id, e.expires_at, e.cost_basis, e.subscription_id,
                                  [e.event_id], [e.meter], [e.occurred_at], [e.credits], [e.balance_after]))
    return out


# 100 examples a property: a ledger of up to 25 entries drawn from 7 kinds x 10 instants x 2
# customers x 4 grants puts each kind on each instant (the bounds where the rules differ) dozens of
# times per run, and each run draws new examples. 300 made these three the fast lane's slowest tests.
EXAMPLES = 100


def ledger_by_rows(replay: WalletReplay, period: Period) -> pl.DataFrame:
    """The ledger as it was built: a dict per entry of the period."""
    rows = []
    for entry in (e for e in replay.entries if in_period(e, period)):
        rows.append({"entry_id": f"L-{period}-{len(rows) + 1:08d}", "customer_id": entry.customer_id,
                     "grant_id": entry.grant_id, "kind": entry.kind, "credits": decimal_text(entry.credits),
                     "balance_after": decimal_text(entry.balance_after), "occurred_at": entry.occurred_at,
                     "expires_at": entry.expires_at, "cost_basis": decimal_text(entry.cost_basis),
                     "subscription_id": entry.subscription_id, "event_id": entry.event_id, "meter": entry.meter,
                     "period": str(period)})
    return pl.DataFrame(rows, schema=LEDGER_SCHEMA)


def before(entry: Entry, period: Period) -> bool:
    """An entry before `period` (part of a grant's opening): the mirror of in_period's rule."""
    if entry.kind == "expire" or (entry.kind == "rollover" and entry.credits < 0):
        return entry.occurred_at <= period.start_at
    return entry.occurred_at < period.start_at


def moves_by_rows(replay: WalletReplay, period: Period) -> dict:
    """moves_by_grant as it was: in_period and before per entry."""
    moves: dict = defaultdict(lambda: [ZERO, ZERO, ZERO, ZERO, ZERO])
    for e in replay.entries:
        if in_period(e, period):
            acc = moves[e.grant_id]
            if e.kind == "opening":
                acc[0] += e.credits
            elif e.kind in ("grant", "purchase", "top_up") or (e.kind == "rollover" and e.credits > 0):
                acc[1] += e.credits
            elif e.kind == "consume":
                acc[2] -= e.credits
            elif e.kind == "expire":
                acc[3] -= e.credits
            else:
                acc[4] -= e.credits
        elif before(e, period):
            moves[e.grant_id][0] += e.credits
    return moves


@settings(max_examples=EXAMPLES, deadline=None)
@given(entries())
def test_ledger_table_equals_rows(entries_):
    replay = WalletReplay(movements=packed(entries_))
    assert replay.entries == entries_
    fast, slow = ledger_table(replay, PERIOD), ledger_by_rows(replay, PERIOD)
    assert fast.schema == slow.schema
    assert fast.equals(slow, null_equal=True)


@settings(max_examples=EXAMPLES, deadline=None)
@given(entries())
def test_grant_moves_equal_rows(entries_):
    replay = WalletReplay(movements=packed(entries_))
    assert dict(moves_by_grant(replay, PERIOD)) == dict(moves_by_rows(replay, PERIOD))


@settings(max_examples=EXAMPLES, deadline=None)
@given(entries())
def test_in_period_or_before_equals_the_rule(entries_):
    for period in (PERIOD, PERIOD.previous()):
        for e in entries_:
            by_rule = e.occurred_at < period.end_at or in_period(e, period)  # in the period or before
            assert revenue.in_period_or_before(e, period.end_at) == by_rule
        for run in packed(entries_):
            if isinstance(run, ConsumeRun):
                whole = revenue.in_period_or_before(run, period.end_at)
                assert all(revenue.in_period_or_before(e, period.end_at) == whole for e in run.entries())


def test_ledger_table_empty():
    assert ledger_table(WalletReplay(), PERIOD).equals(ledger_by_rows(WalletReplay(), PERIOD))


PLAN = """plan: grouped
version: {version}
effective_from: 2026-01-01
currency: USD
charges:
  - {{name: EU tokens, meter: tokens, group_by: [model], filter: {{region: eu}},
     price: {{model: standard, unit_price: "0.01"}}}}
  - {{name: US tokens, meter: tokens, filter: {{region: us}}, price: {{model: standard, unit_price: "0.02"}}}}
  - {{name: Calls by region, meter: calls, group_by: [region], price: {{model: standard, unit_price: "0.03"}}}}
"""


@settings(deadline=None)  # what it checks is not timing: a loaded machine must not fail it
@given(st.lists(st.fixed_dictionaries({}, optional={"region": st.sampled_from(["eu", "us"]),
                                                    "model": st.sampled_from(["a", "b"])}), max_size=12))
def test_group_of_shared_across_charges_equals_prices(dims_list):
    """A group worked out for one charge is the group for every charge with its meter, filter and
    group_by (the cache is shared across invoices), and it is what `prices` says."""
    import json
    charges = [c for version in (1, 2) for c in parse_plan(PLAN.format(version=version), "grouped.yaml").plan.charges]
    for charge in charges:
        group_of = groups_by_dims(charge)
        for dims in dims_list:
            text = json.dumps(dims, sort_keys=True)
            want = tuple(dims.get(g) for g in charge.group_by) if charge.prices(charge.meter, dims) else None
            assert group_of(text) == want


def test_watched_thresholds_shared_by_plan_and_overrides():
    """Thresholds cached per plan and overrides are those worked out for each subscription, a
    budget of 10 and one of 10.0 apart (their labels differ), and a caller may pop its copy."""
    from datetime import date

    from transforms.finance import spend
    from transforms.inputs.plans import Catalog
    from transforms.inputs.reference import Subscription, segments_in

    plan_file = parse_plan(PLAN.format(version=1), "grouped.yaml")
    catalog = Catalog({plan_file.key: plan_file})
    subs = [Subscription(f"s{i}", f"c{i}", "grouped", None, date(2026, 1, 1), None, budget, cap, i)
            for i, (budget, cap) in enumerate([(None, None), (D("10"), None), (D("10.0"), None), (D("10"), D("5")),
                                               (None, None), (D("10"), None)])]
    for seg in segments_in(PERIOD, subs, catalog) * 2:
        want = sorted(((kind, spend.to_minor(amount, "USD", "half_up"), label)
                       for kind, amount, label in spend.thresholds(seg)), key=lambda w: w[1])
        got = spend.watched_thresholds([seg])
        assert got == want
        got.pop(0)
    labels = {seg.subscription.subscription_id: spend.watched_thresholds([seg])[0][2]
              for seg in segments_in(PERIOD, subs, catalog)}
    assert labels["s1"] != labels["s2"]


def test_cycle_collector_state_restored():
    import gc

    from transforms.collector import cycle_collector_paused
    assert gc.isenabled()
    with cycle_collector_paused():
        assert not gc.isenabled()
        with cycle_collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
