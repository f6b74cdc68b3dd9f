"""Price-change notices: fired notice_days before a migration, once, in the period of that day."""
from __future__ import annotations

from datetime import date
from decimal import Decimal as D

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transforms.engine.invoices import SegmentUsage, lines_table, period_invoices
from transforms.finance.alerts import alerts_table, price_change_notices
from transforms.inputs.plans import Catalog, parse_plan
from transforms.inputs.reference import Subscription, segments_in
from transforms.periods import Period


def catalog(migrate_on: str = "2026-12-01", notice: str = "notice_days: 30\n", v2_from: str = "2026-10-15",
            v1_price: str = "2.50", v2_price: str = "2.00") -> Catalog:
    def version(n, start, price, extra=""):
        return parse_plan(f"plan: api\nversion: {n}\neffective_from: {start}\ncurrency: USD\n{extra}"
                          f'fixed_fees: [{{name: Fee, amount: "20.00"}}]\n'
                          f'charges: [{{meter: tokens, '
                          f'price: {{model: standard, unit_price: "{price}", per: 1000}}}}]\n',
                          f"api-v{n}.yaml")
    return Catalog.from_files([version(1, "2026-01-01", v1_price),
                               version(2, v2_from, v2_price, f"migrate_existing_on: {migrate_on}\n{notice}")])


def sub(sid="s1", start=date(2026, 3, 1), end=None, version=None) -> Subscription:
    return Subscription(sid, "c-" + sid, "api", version, start, end, None, None, 1)


@pytest.mark.parametrize("period, subs, expected", [
    pytest.param("2026-11", [sub()], [("s1", date(2026, 11, 1))], id="move Dec 1 - 30 days = notice Nov 1"),
    pytest.param("2026-10", [sub()], [], id="nothing in October: the notice day is in November"),
    pytest.param("2026-11", [sub(version=1)], [], id="a pinned version never moves, so no notice"),
    pytest.param("2026-11", [sub(end=date(2026, 11, 20))], [], id="ends before the move: no notice"),
    pytest.param("2026-11", [sub(start=date(2026, 10, 10))], [("s1", date(2026, 11, 1))],
                 id="bound to v1 on Oct 10 (v2 from Oct 15): notice Nov 1"),
])
def test_price_change_notice(period, subs, expected):
    alerts = price_change_notices(Period.parse(period), subs, catalog())
    assert [(a.subscription_id, a.occurred_on) for a in alerts] == expected
    for a in alerts:
        assert (a.kind, a.threshold, a.value, a.period) == ("price_change_notice", "api v2", "2026-12-01", period)


def test_a_subscription_starting_inside_the_notice_window_is_told_on_its_first_day():
    cat = catalog(v2_from="2026-12-01")  # v1 binds until Dec 1, then everyone moves
    [alert] = price_change_notices(Period.parse("2026-11"), [sub(start=date(2026, 11, 10))], cat)
    assert alert.occurred_on == date(2026, 11, 10)


def test_no_notice_days_means_no_notice():
    assert price_change_notices(Period.parse("2026-11"), [sub()], catalog(notice="")) == []


def test_alerts_table_has_one_row_per_customer_kind_threshold():
    alerts = price_change_notices(Period.parse("2026-11"), [sub()], catalog())
    assert alerts_table(alerts + alerts).height == 1


@settings(max_examples=40, deadline=None)
@given(units=st.integers(min_value=0, max_value=10**9), v1=st.integers(1, 999), v2=st.integers(1, 999))
def test_a_migration_on_the_period_start_equals_the_new_version_alone(units, v1, v2):
    """migrate_existing_on = Oct 1: October bills exactly as a subscription pinned to v2."""
    cat = catalog(migrate_on="2026-10-01", v2_from="2026-09-01", v1_price=f"{v1}.00", v2_price=f"{v2}.00")
    oct_ = Period.parse("2026-10")
    usage = {("s1", 1): SegmentUsage((("tokens", "{}", D(units), 1),))}
    migrated = period_invoices(oct_, segments_in(oct_, [sub()], cat), usage)
    pinned = period_invoices(oct_, segments_in(oct_, [sub(version=2)], cat), usage)
    assert lines_table(migrated).equals(lines_table(pinned))
