"""Spend alerts fired from pre-summed usage, bisected where spend cannot fall, equal the plain
replay: every day with usage rated from scratch, in order, each threshold on its first day."""
from __future__ import annotations

import json
from datetime import date, datetime, timezone
from decimal import Decimal as D

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import transforms.finance.spend as spend
from test_invoices import charges, plan
from test_per_event_fees import prices as percentage_prices
from test_pricing import MONEY, PER, UNITS, unit_tiers
from transforms.engine.invoices import SegmentUsage, charge_lines
from transforms.finance.spend import spend_alerts, spend_alerts_resumed, thresholds
from transforms.inputs.plans import Catalog, parse_plan
from transforms.inputs.reference import Subscription, segments_in
from transforms.money import decimal_text, from_minor, to_minor
from transforms.periods import Period

PERIOD = Period.parse("2026-10")
ZERO = D(0)

MIX = """plan: mix
version: 1
effective_from: 2026-01-01
currency: USD
charges:
  - {name: Tokens, meter: tokens, group_by: [region],
     price: {model: graduated, tiers: [{up_to: 100, unit_price: "0.05"}, {up_to: null, unit_price: "0.02"}]}}
  - {name: Calls, meter: calls, included: 15, price: {model: package, package_size: 10, package_price: "0.50"}}
  - {name: Payments, meter: pay,
     price: {model: percentage, rate: "2", fixed_fee: "0.10", free_events: 2, min_fee: "0.15"}}
"""
VOLUME = """plan: vol
version: 1
effective_from: 2026-01-01
currency: USD
charges:
  - {name: Tokens, meter: tokens,
     price: {model: volume, tiers: [{up_to: 100, unit_price: "1.20"}, {up_to: null, unit_price: "0.10"}]}}
"""
CATALOG = Catalog.from_files([parse_plan(MIX, "mix-v1.yaml"), parse_plan(VOLUME, "vol-v1.yaml")])
KEYS = (("tokens", '{"region": "eu"}'), ("tokens", '{"region": "us"}'), ("calls", "{}"), ("pay", "{}"))
BY_DAY = {"subscription_id": pl.String, "segment_no": pl.Int32, "meter": pl.String, "dims": pl.String,
          "day": pl.Date, "units": pl.Decimal(38, 9), "events": pl.Int64}
PER_EVENT = {"subscription_id": pl.String, "segment_no": pl.Int32, "meter": pl.String, "dims": pl.String,
             "quantity": pl.Decimal(38, 9), "event_at": pl.Datetime("us", "UTC")}


def subscription(sid: str, plan: str = "mix", budget: str | None = "10.00", cap: str | None = "12.00") -> Subscription:
    return Subscription(sid, "c-" + sid, plan, None, date(2026, 1, 1), None, D(budget) if budget else None,
                        D(cap) if cap else None, 1)


def plain_replay(segments, rows, events, billable, credit_meters, final) -> list[tuple]:
    """The rule, spelled out: each day with usage, every row through that day summed again."""
    by_sub: dict[str, list] = {}
    for seg in segments:
        by_sub.setdefault(seg.subscription.subscription_id, []).append(seg)
    fired = []
    for sub in sorted(by_sub):
        segs = by_sub[sub]
        plan = segs[-1].plan.plan
        watch = sorted(((k, to_minor(a, plan.currency, plan.rounding), label) for k, a, label in thresholds(segs[-1])),
                       key=lambda w: w[1])
        if not watch or final.get(sub, 0) < watch[0][1]:
            continue
        for day in sorted({r[4] for r in rows if r[0] == sub}):
            total, used = 0, {}
            for seg in segs:
                sums: dict[tuple, list] = {}
                for s, n, meter, dims, on, units, count in rows:
                    if (s, n) == (sub, seg.segment_no) and on <= day:
                        if (s, n, meter) in credit_meters:
                            units = billable.get((s, n, meter, dims, on), ZERO)
                        acc = sums.setdefault((meter, dims), [ZERO, 0])
                        acc[0] += units
                        acc[1] += count
                usage = SegmentUsage(tuple((m, d, u, c) for (m, d), (u, c) in sorted(sums.items())),
                                     tuple((m, d, q) for s, n, m, d, q, at in events
                                           if (s, n) == (sub, seg.segment_no) and at.date() <= day
                                           and (s, n, m) not in credit_meters))
                total += sum(line.amount_minor for line in charge_lines(seg, usage, "", used)
                             if line.kind in ("usage", "overage"))
            while watch and total >= watch[0][1]:
                kind, minor, _ = watch.pop(0)
                fired.append((sub, kind, decimal_text(from_minor(minor, plan.currency)),
                              decimal_text(from_minor(total, plan.currency)), day))
            if not watch:
                break
    return fired


def as_fired(alerts) -> list[tuple]:
    return [(a.subscription_id, a.kind, a.threshold, a.value, a.occurred_on) for a in alerts]


@st.composite
def months(draw):
    """Usage of a few subscriptions over a few days: by-day rows, and the events of `pay`."""
    subs = [subscription(f"s{i}", budget=draw(st.sampled_from(["2.00", "10.00", None])),
                         cap=draw(st.sampled_from(["12.00", None])))
            for i in range(draw(st.integers(1, 3)))]
    rows, events, billable, credit = [], [], {}, set()
    for sub in subs:
        sid = sub.subscription_id
        if draw(st.booleans()):
            credit.add((sid, 1, "calls"))
        for day in sorted(draw(st.sets(st.integers(1, 12), min_size=1, max_size=8))):
            on = date(2026, 10, day)
            for meter, dims in draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=4, unique=True)):
                if meter == "pay":
                    amounts = draw(st.lists(st.integers(1, 400), min_size=1, max_size=3))
                    events += [(sid, 1, meter, dims, D(a), datetime(2026, 10, day, i, tzinfo=timezone.utc))
                               for i, a in enumerate(amounts)]
                    rows.append((sid, 1, meter, dims, on, D(sum(amounts)), len(amounts)))
                else:
                    units = draw(st.integers(0, 300))
                    rows.append((sid, 1, meter, dims, on, D(units), draw(st.integers(1, 3))))
                    if meter == "calls":
                        billable[(sid, 1, meter, dims, on)] = D(draw(st.integers(0, units))) / 4
    final = {s.subscription_id: draw(st.sampled_from([0, 10**9])) for s in subs}
    return subs, rows, sorted(events, key=lambda e: (e[0], e[1], e[2], e[5])), billable, credit, final


def frames(rows, events):
    return (pl.DataFrame(sorted(rows), schema=BY_DAY, orient="row"),
            pl.DataFrame(events, schema=PER_EVENT, orient="row"))


@settings(max_examples=60, deadline=None)
@given(month=months())
def test_fast_alerts_equal_the_plain_replay(month):
    subs, rows, events, billable, credit, final = month
    segments = segments_in(PERIOD, subs, CATALOG)
    by_day, per_event = frames(rows, events)
    expected = plain_replay(segments, rows, events, billable, credit, final)
    assert as_fired(spend_alerts(PERIOD, segments, by_day, per_event, billable, credit, final)) == expected
    resumed, _ = spend_alerts_resumed(PERIOD, segments, by_day, per_event, billable, credit, final, {}, None)
    assert as_fired(resumed) == expected


@settings(max_examples=30, deadline=None)
@given(month=months(), changed_day=st.integers(1, 13))
def test_a_resumed_night_fires_the_full_replays_alerts_and_hands_on_the_same_days(month, changed_day):
    subs, rows, events, billable, credit, final = month
    segments = segments_in(PERIOD, subs, CATALOG)
    by_day, per_event = frames(rows, events)
    full, full_spend = spend_alerts_resumed(PERIOD, segments, by_day, per_event, billable, credit, final, {}, None)
    changed = date(2026, 10, changed_day)
    known = {k: v for k, v in full_spend.items() if k[1] < changed}
    resumed, resumed_spend = spend_alerts_resumed(PERIOD, segments, by_day, per_event, billable, credit, final,
                                                  known, {s.customer_id: changed for s in subs})
    assert resumed == full
    assert resumed_spend == full_spend


def test_volume_pricing_is_walked_day_by_day_not_bisected():
    """Volume at 1.20 up to 100, then 0.10 for every unit: 100 units cost 120.00 (Oct 1), 300
    cost 30.00 (Oct 2), 301 cost 30.10 (Oct 3), 2,301 cost 230.10 (Oct 4). The 100 USD alert
    fires on Oct 1; a bisection would look at Oct 2 and 3, see 30, and answer Oct 4."""
    segments = segments_in(PERIOD, [subscription("v", plan="vol", budget=None, cap=None)], CATALOG)
    rows = [("v", 1, "tokens", "{}", date(2026, 10, d), D(u), 1) for d, u in ((1, 100), (2, 200), (3, 1), (4, 2000))]
    by_day, per_event = frames(rows, [])
    alerts = spend_alerts(PERIOD, segments, by_day, per_event, {}, set(), {"v": 23010})
    assert [(a.threshold, a.value, a.occurred_on) for a in alerts] == [("100", "120", date(2026, 10, 1))]


def rated_days(monkeypatch) -> list[date]:
    days: list[date] = []
    real = spend.spend_to_date_minor

    def counting(segments, usage, through):
        days.append(through)
        return real(segments, usage, through)
    monkeypatch.setattr(spend, "spend_to_date_minor", counting)
    return days


def test_a_subscription_below_its_lowest_threshold_is_not_replayed(monkeypatch):
    days = rated_days(monkeypatch)
    segments = segments_in(PERIOD, [subscription("s")], CATALOG)
    rows = [("s", 1, "tokens", '{"region": "eu"}', date(2026, 10, d), D(1000), 1) for d in range(1, 31)]
    by_day, per_event = frames(rows, [])
    assert spend_alerts(PERIOD, segments, by_day, per_event, {}, set(), {"s": 499}) == []  # lowest: 5.00
    assert days == []


def test_a_month_is_priced_in_columns_not_day_by_day(monkeypatch):
    """30 days of 100 eu tokens: 100 x 0.05 = 5.00 on Oct 1, then 2.00 a day (0.02 past the first
    100): 7, 9, 11, 13. Thresholds 5.00, 8.00, 10.00 and the 12.00 cap cross on Oct 1, 3, 4 and 5,
    and no day is rated one subscription at a time."""
    days = rated_days(monkeypatch)
    segments = segments_in(PERIOD, [subscription("s")], CATALOG)
    rows = [("s", 1, "tokens", '{"region": "eu"}', date(2026, 10, d), D(100), 1) for d in range(1, 31)]
    by_day, per_event = frames(rows, [])
    alerts = spend_alerts(PERIOD, segments, by_day, per_event, {}, set(), {"s": 10**6})
    assert [(a.threshold, a.value, a.occurred_on.day) for a in alerts] == [
        ("5", "5", 1), ("8", "9", 3), ("10", "11", 4), ("12", "13", 5)]
    assert days == []


def test_a_monotone_month_paid_partly_with_credits_is_bisected(monkeypatch):
    """The month above, with the subscription's calls paid with credits (none used): its units are
    the wallet's Decimals, so it is rated day by day; the search rates the month's last day, then
    galloping from Oct 1: Oct 2, 4, 3, 5."""
    days = rated_days(monkeypatch)
    segments = segments_in(PERIOD, [subscription("s")], CATALOG)
    rows = [("s", 1, "tokens", '{"region": "eu"}', date(2026, 10, d), D(100), 1) for d in range(1, 31)]
    by_day, per_event = frames(rows, [])
    alerts = spend_alerts(PERIOD, segments, by_day, per_event, {}, {("s", 1, "calls")}, {"s": 10**6})
    assert [(a.threshold, a.value, a.occurred_on.day) for a in alerts] == [
        ("5", "5", 1), ("8", "9", 3), ("10", "11", 4), ("12", "13", 5)]
    assert sorted(days) == [date(2026, 10, d) for d in (1, 2, 3, 4, 5, 30)]  # each once, not all 30


def test_a_resumed_night_rates_only_the_days_that_changed(monkeypatch):
    segments = segments_in(PERIOD, [subscription("s", budget="1000.00", cap=None)], CATALOG)
    rows = [("s", 1, "tokens", '{"region": "eu"}', date(2026, 10, d), D(100), 1) for d in range(1, 29)]
    by_day, per_event = frames(rows, [])
    final = {"s": 10**6}
    credit = {("s", 1, "calls")}  # rated day by day (see above), so the spend known is reused
    _, known = spend_alerts_resumed(PERIOD, segments, by_day, per_event, {}, credit, final, {}, None)
    days = rated_days(monkeypatch)
    _, again = spend_alerts_resumed(PERIOD, segments, by_day, per_event, {}, credit, final, known,
                                    {"c-s": date(2026, 10, 28)})
    assert days == [date(2026, 10, 28)] and again == known


def _quoted(value):
    """Prices as a plan file quotes them; unit counts stay numbers."""
    return str(value) if isinstance(value, D) else value


HALVES = MONEY | st.sampled_from([D("0.005"), D("0.0025"), D("0.5")])
"""Prices that land whole units on half a cent (or half a yen), where the rounding rules part."""

WHOLE_UNITS = UNITS | st.integers(0, 1000).map(D)


@st.composite
def charge_blocks(draw, meter: str, models: tuple[str, ...]) -> dict:
    """One charge of `meter` under one of `models`, priced and bounded as the pricing properties
    draw them."""
    model = draw(st.sampled_from(models))
    block: dict = {"name": meter, "meter": meter}
    if model == "standard":
        block["price"] = {"model": model, "unit_price": str(draw(HALVES)), "per": draw(PER)}
    elif model == "package":
        block["price"] = {"model": model, "package_size": draw(st.integers(1, 500)), "package_price": str(draw(HALVES))}
    elif model in ("graduated", "volume"):
        block["price"] = {"model": model, "per": draw(PER),
                          "tiers": [{k: _quoted(v) for k, v in t.items()} for t in draw(unit_tiers())]}
    elif model == "graduated_percentage":
        block["price"] = {"model": model, "tiers": [
            {"up_to": t["up_to"], "rate": str(draw(st.sampled_from(["0", "1.4", "2.9", "0.125"]))),
             "flat_fee": str(t["flat_fee"])} for t in draw(unit_tiers())]}
    else:
        price = draw(percentage_prices())
        block["price"] = {k: _quoted(v) for k, v in price.model_dump().items() if v is not None}
    if model != "percentage" and draw(st.booleans()):
        block["included"] = draw(st.sampled_from([1, 50, 1000, 100000]))
    elif draw(st.booleans()):
        block["group_by"] = ["region"]
    return block


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), currency=st.sampled_from(["USD", "JPY", "KWD"]),
       rounding=st.sampled_from(["half_up", "half_even"]))
def test_spend_in_columns_equals_each_day_rated_by_the_models(data, currency, rounding):
    """The column path's spend through each day with usage, against the charge models' own `rate`
    on the usage so far (the invoice's charge_lines, as the day-by-day replay calls them)."""
    units_models = ("standard", "package", "graduated", "volume", "graduated_percentage")
    blocks = [data.draw(charge_blocks("tokens", units_models)),  # `pay` has its events: any model
              data.draw(charge_blocks("pay", (*units_models, "percentage")))]
    plan_file = plan(charges(*(json.dumps(b) for b in blocks)), currency, rounding)
    segments = segments_in(PERIOD, [Subscription("s", "c-s", "p", None, date(2026, 1, 1), None, None, None, 1)],
                           Catalog.from_files([plan_file]))
    rows, events = [], []
    for day in sorted(data.draw(st.sets(st.integers(1, 31), min_size=1, max_size=6))):
        on = date(2026, 10, day)
        for region in data.draw(st.sets(st.sampled_from(["eu", "us"]), min_size=1)):
            dims = json.dumps({"region": region})
            rows.append(("s", 1, "tokens", dims, on, data.draw(WHOLE_UNITS), data.draw(st.integers(1, 3))))
            amounts = data.draw(st.lists(st.decimals(min_value=0, max_value=1000, places=2), min_size=1, max_size=4))
            events += [("s", 1, "pay", dims, a, datetime(2026, 10, day, i, tzinfo=timezone.utc))
                       for i, a in enumerate(amounts)]
            rows.append(("s", 1, "pay", dims, on, sum(amounts, ZERO), len(amounts)))
    events.sort(key=lambda e: (e[0], e[1], e[2], e[5]))
    by_day, per_event = frames(rows, events)
    got, priced = spend.spend_by_day({"s": segments}, ["s"], by_day, per_event, set())
    assert priced == ["s"]
    usage = spend.usage_from(by_day, per_event, {"s": date(2026, 10, 1)}, {}, set())["s"]
    days = sorted({r[4] for r in rows})
    assert got.rows() == [("s", day, spend.spend_to_date_minor(segments, usage, day)) for day in days]


THIRDS = """plan: thirds
version: 1
effective_from: 2026-01-01
currency: USD
charges:
  - {name: Tokens, meter: tokens, price: {model: standard, unit_price: "1.00", per: 3}}
"""


@pytest.mark.parametrize("plan_text, units", [
    (THIRDS, D(1000)),  # 1,000 x 1.00 / 3: Python's decimal rounds at 28 digits, the integers would not
    (VOLUME, D(10) ** 19),  # 10^28 billionths: past what the integers hold exactly
], ids=["per-3", "10^19-units"])
def test_what_the_integers_cannot_hold_is_rated_day_by_day(plan_text, units):
    catalog = Catalog.from_files([parse_plan(plan_text, "p-v1.yaml")])
    plan_name = plan_text.split("\n")[0].removeprefix("plan: ")
    segments = segments_in(PERIOD, [subscription("s", plan=plan_name, budget=None, cap=None)], catalog)
    rows = [("s", 1, "tokens", "{}", date(2026, 10, d), units, 1) for d in (1, 2, 3)]
    by_day, per_event = frames(rows, [])
    final = {"s": 10**30}
    _, priced = spend.spend_by_day({"s": segments}, ["s"], by_day, per_event, set())
    assert priced == []
    alerts = spend_alerts(PERIOD, segments, by_day, per_event, {}, set(), final)
    assert as_fired(alerts) == plain_replay(segments, rows, [], {}, set(), final) != []
