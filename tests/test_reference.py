"""Customers and subscriptions: refused with one line naming file, row and field; then cut into
the period's segments (grandfathering, pinned versions, migrations, partial periods)."""
from __future__ import annotations

from datetime import date, datetime, timezone
from decimal import Decimal as D

import polars as pl
import pytest

from transforms.errors import InputError
from transforms.inputs.plans import Catalog, parse_plan
from transforms.inputs.reference import (
    Subscription,
    bound_versions,
    checked_customers,
    checked_subscriptions,
    segments_frame,
    segments_in,
)
from transforms.periods import Period

CUSTOMERS_CSV = "customers/customers.csv"
SUBS_CSV = "subscriptions/subscriptions.csv"
OCT, NOV, DEC = Period(2026, 10), Period(2026, 11), Period(2026, 12)


def plan_file(version: int, effective_from: str, migrate_existing_on: str | None = None, plan: str = "api"):
    text = (f"plan: {plan}\nversion: {version}\neffective_from: {effective_from}\n"
            + (f"migrate_existing_on: {migrate_existing_on}\n" if migrate_existing_on else "")
            + 'currency: USD\nfixed_fees:\n  - {name: Platform fee, amount: "20.00"}\n')
    return parse_plan(text, f"plans/{plan}-v{version}.yaml")


def catalog(*files) -> Catalog:
    return Catalog.from_files(list(files))


# api v1 from Jan 1; v2 binds new subscriptions from Oct 15 and never moves existing ones.
GRANDFATHERED = catalog(plan_file(1, "2026-01-01"), plan_file(2, "2026-10-15"), plan_file(1, "2026-01-01", plan="pro"))
# api v2 moves existing v1 subscriptions on Nov 20.
MIGRATING = catalog(plan_file(1, "2026-01-01"), plan_file(2, "2026-10-15", "2026-11-20"))
# api v2 moves existing subscriptions on Dec 1, the first day of a period.
MIGRATING_ON_PERIOD_START = catalog(plan_file(1, "2026-01-01"), plan_file(2, "2026-10-15", "2026-12-01"))

CUSTOMERS = pl.DataFrame({"customer_id": ["c1", "c2"], "name": ["Acme", "Globex"], "email": ["a@acme.test", None]})


def customers() -> pl.DataFrame:
    return checked_customers(CUSTOMERS, CUSTOMERS_CSV)


def sub_row(**fields) -> dict:
    row = {"subscription_id": "s1", "customer_id": "c1", "plan": "api", "plan_version": "",
           "start_date": "2026-10-01", "end_date": "", "budget": "", "hard_cap": ""}
    return {**row, **fields}


def subs_frame(*rows: dict) -> pl.DataFrame:
    return pl.DataFrame(list(rows), schema={k: pl.String for k in rows[0]})


def check(*rows: dict, cat: Catalog = GRANDFATHERED) -> list[Subscription]:
    return checked_subscriptions(subs_frame(*rows), SUBS_CSV, customers(), cat)


def refused(*rows: dict, cat: Catalog = GRANDFATHERED) -> str:
    with pytest.raises(InputError) as exc:
        check(*rows, cat=cat)
    message = str(exc.value)
    assert "\n" not in message
    return message


def sub(start: str, end: str | None = None, version: int | None = None, sid: str = "s1",
        customer: str = "c1", plan: str = "api") -> Subscription:
    return Subscription(sid, customer, plan, version, date.fromisoformat(start),
                        date.fromisoformat(end) if end else None, None, None, 1)


def at(day: str) -> datetime:
    return datetime.fromisoformat(day).replace(tzinfo=timezone.utc)


def shape(segments) -> list[tuple]:
    """(subscription, segment_no, version, first instant, end instant, days) per segment."""
    return [(s.subscription.subscription_id, s.segment_no, s.plan.plan.version, s.start_at, s.end_at, s.days)
            for s in segments]


# Customers -------------------------------------------------------------------------------------

def test_customers_pass_with_optional_columns_filled_in():
    out = customers()
    assert out.columns == ["customer_id", "name", "email", "address", "tax_id", "country", "region", "tax_exempt",
                           "payment_terms_days"]
    assert out.row(1, named=True) == {"customer_id": "c2", "name": "Globex", "email": None, "address": None,
                                      "tax_id": None, "country": None, "region": None, "tax_exempt": None,
                                      "payment_terms_days": None}


def test_customers_missing_column_is_named():
    with pytest.raises(InputError) as exc:
        checked_customers(CUSTOMERS.drop("name"), CUSTOMERS_CSV)
    assert str(exc.value).startswith(f"{CUSTOMERS_CSV}: missing column(s) name")


def test_customers_duplicate_id_is_named():
    dup = pl.DataFrame({"customer_id": ["c1", "c2", "c1"], "name": ["A", "B", "C"]})
    with pytest.raises(InputError) as exc:
        checked_customers(dup, CUSTOMERS_CSV)
    message = str(exc.value)
    assert message.startswith(f"{CUSTOMERS_CSV} row ")
    assert "customer_id: 'c1' appears more than once" in message


def test_customers_blank_name_is_required():
    with pytest.raises(InputError) as exc:
        checked_customers(pl.DataFrame({"customer_id": ["c1", "c2"], "name": ["A", "  "]}), CUSTOMERS_CSV)
    assert str(exc.value) == f"{CUSTOMERS_CSV} row 2, name: is required"


# Subscriptions: refused rows -------------------------------------------------------------------

def test_subscriptions_missing_column_is_named():
    with pytest.raises(InputError) as exc:
        checked_subscriptions(subs_frame(sub_row()).drop("start_date"), SUBS_CSV, customers(), GRANDFATHERED)
    assert str(exc.value).startswith(f"{SUBS_CSV}: missing column(s) start_date")


REFUSED = [
    pytest.param([sub_row(), sub_row(customer_id="c2")], "row 1, subscription_id: 's1' appears more than once",
                 id="duplicate subscription_id"),
    pytest.param([sub_row(start_date="01/10/2026")], "row 1, start_date: '01/10/2026' is not in the expected format",
                 id="start_date not ISO"),
    pytest.param([sub_row(), sub_row(subscription_id="s2", customer_id="c2", end_date="2026-10")],
                 "row 2, end_date: '2026-10' is not in the expected format", id="end_date not a day, row 2"),
    pytest.param([sub_row(start_date="")], "row 1, start_date: is required", id="start_date blank"),
    pytest.param([sub_row(end_date="2026-09-01")],
                 "row 1, end_date: 2026-09-01 is not after start_date 2026-10-01 (end_date is exclusive)",
                 id="end before start"),
    pytest.param([sub_row(end_date="2026-10-01")],
                 "row 1, end_date: 2026-10-01 is not after start_date 2026-10-01", id="end == start: empty"),
    pytest.param([sub_row(customer_id="c9")], "row 1, customer_id: 'c9' is not in customers", id="unknown customer"),
    pytest.param([sub_row(plan="enterprise")], "row 1, plan: no plan file defines plan 'enterprise'",
                 id="unknown plan"),
    pytest.param([sub_row(plan_version="3")], "row 1, plan_version: plan 'api' has no version 3",
                 id="unknown pinned version"),
    pytest.param([sub_row(plan_version="v1")], "row 1, plan_version: 'v1' is not in the expected format",
                 id="pinned version not a number"),
    pytest.param([sub_row(start_date="2025-12-31")],
                 "row 1, start_date: plan 'api' has no version in force on 2025-12-31 (its first starts 2026-01-01)",
                 id="no version in force on start_date"),
    pytest.param([sub_row(hard_cap="1,000.00")], "row 1, hard_cap: '1,000.00' is not in the expected format",
                 id="hard_cap with a thousands comma"),
    pytest.param([sub_row(budget="ten")], "row 1, budget: 'ten' is not in the expected format", id="budget not money"),
]


@pytest.mark.parametrize("rows, message", REFUSED)
def test_a_bad_subscription_row_is_refused_naming_file_row_and_field(rows, message):
    assert refused(*rows).startswith(f"{SUBS_CSV} {message}")


@pytest.mark.parametrize("field, value", [("start_date", "2026-13-01"), ("end_date", "2026-02-30")],
                         ids=["start_date month 13", "end_date Feb 30"])
def test_a_calendar_invalid_date_names_its_field(field, value):
    message = refused(sub_row(**{field: value}))
    assert message.startswith(f"{SUBS_CSV} row 1, {field}: '{value}' is not a date")


@pytest.mark.parametrize("field", ["hard_cap", "budget"])
def test_a_negative_money_override_is_refused(field):
    assert refused(sub_row(**{field: "-10.00"})).startswith(f"{SUBS_CSV} row 1, {field}: ")


OVERLAPS = [
    pytest.param([sub_row(), sub_row(subscription_id="s2", start_date="2026-11-01")], "row 2", "'s2'", "'s1' (row 1)",
                 id="open-ended s1 then s2"),
    pytest.param([sub_row(end_date="2026-11-02"), sub_row(subscription_id="s2", start_date="2026-11-01")],
                 "row 2", "'s2'", "'s1' (row 1)", id="s1 ends a day after s2 starts"),
    pytest.param([sub_row(subscription_id="s2", start_date="2026-11-01"),
                  sub_row(subscription_id="s1", start_date="2026-10-01", end_date="2026-12-01")],
                 "row 1", "'s2'", "'s1' (row 2)", id="rows out of date order"),
    pytest.param([sub_row(subscription_id="a", end_date="2026-12-01"),
                  sub_row(subscription_id="b", start_date="2026-11-01", end_date="2026-11-15")],
                 "row 2", "'b'", "'a' (row 1)", id="one inside the other"),
]


@pytest.mark.parametrize("rows, where, newer, older", OVERLAPS)
def test_overlapping_subscriptions_of_one_customer_are_refused(rows, where, newer, older):
    message = refused(*rows)
    assert message.startswith(f"{SUBS_CSV} {where}: subscription {newer} starts ")
    assert f"while {older} of the same customer is still active" in message


def test_a_plan_change_ending_where_the_next_starts_is_fine():
    subs = check(sub_row(end_date="2026-11-01"),
                 sub_row(subscription_id="s2", plan="pro", start_date="2026-11-01"),
                 sub_row(subscription_id="s3", customer_id="c2", start_date="2026-10-01"))
    assert [(s.subscription_id, s.plan, s.start_date, s.end_date, s.row) for s in subs] == [
        ("s1", "api", date(2026, 10, 1), date(2026, 11, 1), 1),
        ("s2", "pro", date(2026, 11, 1), None, 2),
        ("s3", "api", date(2026, 10, 1), None, 3)]


def test_subscription_fields_are_parsed_exactly():
    [s] = check(sub_row(plan_version=" 2 ", budget="200.00", hard_cap="0.10", start_date="2026-11-01"))
    assert (s.plan_version, s.budget, s.hard_cap) == (2, D("200.00"), D("0.10"))
    [s] = check(sub_row())
    assert (s.plan_version, s.budget, s.hard_cap, s.end_date) == (None, None, None, None)


# Bound versions -------------------------------------------------------------------------------

def test_blank_version_binds_to_the_version_in_force_on_start_date():
    v1, v2 = GRANDFATHERED.get("api", 1), GRANDFATHERED.get("api", 2)
    assert bound_versions(sub("2026-10-14"), GRANDFATHERED) == [(date(2026, 10, 14), v1)]
    assert bound_versions(sub("2026-10-15"), GRANDFATHERED) == [(date(2026, 10, 15), v2)]
    assert bound_versions(sub("2027-03-01"), GRANDFATHERED) == [(date(2027, 3, 1), v2)]


def test_grandfathered_subscription_keeps_its_version_in_every_later_period():
    s = sub("2026-10-01")
    for period in (OCT, NOV, Period(2027, 6)):
        assert [seg.plan.plan.version for seg in segments_in(period, [s], GRANDFATHERED)] == [1]


def test_pinned_version_never_migrates():
    pinned = sub("2026-11-01", version=1)  # starts after v2 binds new subscriptions, pins v1 anyway
    assert bound_versions(pinned, MIGRATING) == [(date(2026, 11, 1), MIGRATING.get("api", 1))]
    assert shape(segments_in(NOV, [pinned], MIGRATING)) == [("s1", 1, 1, at("2026-11-01"), at("2026-12-01"), 30)]
    assert shape(segments_in(DEC, [pinned], MIGRATING)) == [("s1", 1, 1, at("2026-12-01"), at("2027-01-01"), 31)]


def test_pinned_newer_version_is_kept_too():
    assert [seg.plan.plan.version for seg in segments_in(OCT, [sub("2026-10-01", version=2)], GRANDFATHERED)] == [2]


def test_migrate_existing_on_moves_older_subscriptions_on_that_day():
    s = sub("2026-10-01")
    assert bound_versions(s, MIGRATING) == [(date(2026, 10, 1), MIGRATING.get("api", 1)),
                                            (date(2026, 11, 20), MIGRATING.get("api", 2))]


def test_migration_mid_period_splits_it_in_two_segments():
    # Nov: v1 on [Nov 1, Nov 20) = 19 days, v2 on [Nov 20, Dec 1) = 11 days; 19 + 11 = 30.
    assert shape(segments_in(NOV, [sub("2026-10-01")], MIGRATING)) == [
        ("s1", 1, 1, at("2026-11-01"), at("2026-11-20"), 19),
        ("s1", 2, 2, at("2026-11-20"), at("2026-12-01"), 11)]


def test_before_and_after_the_migration_one_segment():
    s = sub("2026-10-01")
    assert shape(segments_in(OCT, [s], MIGRATING)) == [("s1", 1, 1, at("2026-10-01"), at("2026-11-01"), 31)]
    assert shape(segments_in(DEC, [s], MIGRATING)) == [("s1", 1, 2, at("2026-12-01"), at("2027-01-01"), 31)]


def test_migration_on_the_first_day_of_a_period_is_one_whole_segment():
    s = sub("2026-10-01")
    assert shape(segments_in(NOV, [s], MIGRATING_ON_PERIOD_START)) == [
        ("s1", 1, 1, at("2026-11-01"), at("2026-12-01"), 30)]
    assert shape(segments_in(DEC, [s], MIGRATING_ON_PERIOD_START)) == [
        ("s1", 1, 2, at("2026-12-01"), at("2027-01-01"), 31)]


def test_subscription_started_after_the_migration_starts_on_the_new_version():
    assert bound_versions(sub("2026-10-20"), MIGRATING) == [(date(2026, 10, 20), MIGRATING.get("api", 2))]
    assert bound_versions(sub("2026-12-05"), MIGRATING) == [(date(2026, 12, 5), MIGRATING.get("api", 2))]


def test_chain_of_migrations_in_one_period_gives_three_segments():
    cat = catalog(plan_file(1, "2026-01-01"), plan_file(2, "2026-10-15", "2026-11-10"),
                  plan_file(3, "2026-10-20", "2026-11-20"))
    # Nov: v1 9 days + v2 10 days + v3 11 days = 30
    assert shape(segments_in(NOV, [sub("2026-10-01")], cat)) == [
        ("s1", 1, 1, at("2026-11-01"), at("2026-11-10"), 9),
        ("s1", 2, 2, at("2026-11-10"), at("2026-11-20"), 10),
        ("s1", 3, 3, at("2026-11-20"), at("2026-12-01"), 11)]


# Partial periods ------------------------------------------------------------------------------

PARTIAL = [
    pytest.param(sub("2026-10-17"), [("s1", 1, 2, at("2026-10-17"), at("2026-11-01"), 15)],
                 id="starts Oct 17 (binds v2): [Oct 17, Nov 1) = 15 of 31 days"),
    pytest.param(sub("2026-10-12"), [("s1", 1, 1, at("2026-10-12"), at("2026-11-01"), 20)],
                 id="starts Oct 12 (binds v1): [Oct 12, Nov 1) = 20 of 31 days"),
    pytest.param(sub("2026-09-01", "2026-10-20"), [("s1", 1, 1, at("2026-10-01"), at("2026-10-20"), 19)],
                 id="ends Oct 20 (exclusive): [Oct 1, Oct 20) = 19 days"),
    pytest.param(sub("2026-10-05", "2026-10-06"), [("s1", 1, 1, at("2026-10-05"), at("2026-10-06"), 1)],
                 id="one day: [Oct 5, Oct 6) = 1 day"),
    pytest.param(sub("2026-09-15", "2026-11-01"), [("s1", 1, 1, at("2026-10-01"), at("2026-11-01"), 31)],
                 id="ends Nov 1 (exclusive): the whole of Oct = 31 days"),
    pytest.param(sub("2026-10-01", "2026-10-02"), [("s1", 1, 1, at("2026-10-01"), at("2026-10-02"), 1)],
                 id="first day only: 1 day"),
]


@pytest.mark.parametrize("subscription, expected", PARTIAL)
def test_partial_periods(subscription, expected):
    assert shape(segments_in(OCT, [subscription], GRANDFATHERED)) == expected


def test_is_full_period():
    [whole] = segments_in(OCT, [sub("2026-01-01")], GRANDFATHERED)
    [part] = segments_in(OCT, [sub("2026-10-02")], GRANDFATHERED)
    assert (whole.is_full_period, part.is_full_period) == (True, False)


@pytest.mark.parametrize("subscription", [
    pytest.param(sub("2026-09-01", "2026-10-01"), id="ended Oct 1 (exclusive): nothing in Oct"),
    pytest.param(sub("2026-08-01", "2026-09-15"), id="ended in Sep"),
    pytest.param(sub("2026-11-01"), id="starts Nov 1"),
    pytest.param(sub("2027-01-01"), id="starts next year"),
])
def test_subscriptions_outside_the_period_are_skipped(subscription):
    assert segments_in(OCT, [subscription], GRANDFATHERED) == []


@pytest.mark.parametrize("cat, end", [
    pytest.param(MIGRATING_ON_PERIOD_START, "2026-11-15", id="ends Nov 15, migration Dec 1: [Nov 1, Nov 15) = 14"),
    pytest.param(MIGRATING, "2026-11-15", id="ends Nov 15, migration Nov 20: [Nov 1, Nov 15) = 14"),
])
def test_end_date_before_a_pending_migration_still_ends_the_segment(cat, end):
    assert shape(segments_in(NOV, [sub("2026-10-01", end)], cat)) == [
        ("s1", 1, 1, at("2026-11-01"), at("2026-11-15"), 14)]


def test_segments_are_ordered_by_subscription_then_start():
    subs = [sub("2026-10-01", sid="s3", customer="c2"), sub("2026-10-01", sid="s1"),
            sub("2026-11-25", sid="s2", customer="c3")]
    assert [(s.subscription.subscription_id, s.segment_no) for s in segments_in(NOV, subs, MIGRATING)] == [
        ("s1", 1), ("s1", 2), ("s2", 1), ("s3", 1), ("s3", 2)]


def test_segments_frame_has_one_row_per_segment():
    frame = segments_frame(segments_in(NOV, [sub("2026-10-01")], MIGRATING))
    assert frame.rows() == [("s1", 1, "c1", "api", 1, at("2026-11-01"), at("2026-11-20")),
                            ("s1", 2, "c1", "api", 2, at("2026-11-20"), at("2026-12-01"))]
    assert frame.schema["start_at"] == pl.Datetime("us", "UTC")
