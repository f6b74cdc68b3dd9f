"""Usage checked in DuckDB on tiny normalized Parquet files: scope, reasons, duplicates, counts, sums."""
from __future__ import annotations

import itertools
import tempfile
from datetime import date
from decimal import Decimal as D
from pathlib import Path

import duckdb
import polars as pl
import pytest

from transforms.engine.checked_usage import checked_usage, usage_row_counts
from transforms.inputs.plans import Catalog, parse_plan
from transforms.inputs.reference import Subscription, segments_frame, segments_in
from transforms.inputs.usage import normalized_usage
from transforms.periods import Period

OCT = Period(2026, 10)

PLAN = """\
plan: p
version: 1
effective_from: 2026-01-01
currency: USD
charges:
  - {meter: calls, price: {model: standard, unit_price: "1.00"}}
  - {meter: tokens, filter: {model: gpt-4o}, price: {model: standard, unit_price: "2.50", per: 1000000}}
  - {meter: payments, price: {model: percentage, rate: "1.2", fixed_fee: "0.10"}}
"""
CATALOG = Catalog.from_files([parse_plan(PLAN, "plans/p-v1.yaml")])
CUSTOMERS = pl.DataFrame({"customer_id": ["c1", "c2", "c3"], "name": ["A", "B", "C"]})
SUBSCRIPTIONS = [
    Subscription("s1", "c1", "p", None, date(2026, 1, 1), None, None, None, 1),
    # c2 subscribes on Oct 10 only; c3 has no subscription at all.
    Subscription("s2", "c2", "p", None, date(2026, 10, 10), None, None, None, 2),
]
COLUMNS = ("event_id", "customer_id", "meter", "quantity", "timestamp", "model")


def ev(event_id: str, timestamp: str = "2026-10-05T12:00:00Z", quantity: str = "1", meter: str = "calls",
       customer: str = "c1", model: str | None = None) -> tuple:
    return (event_id, customer, meter, quantity, timestamp, model)


class Usage:
    """Writes usage objects the way a close does: normalized, one Parquet file per object."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __call__(self, name: str, *rows: tuple) -> Path:
        raw = pl.DataFrame(list(rows), schema={c: pl.String for c in COLUMNS}, orient="row")
        path = self.folder / f"{name}.parquet"
        normalized_usage(raw, f"usage/{name}.jsonl").write_parquet(path)
        return path


@pytest.fixture
def write(tmp_path) -> Usage:
    return Usage(tmp_path)


def settle(paths: list[Path], period: Period = OCT):
    """The check of `paths`, its tables read back from the files it wrote, and each row's outcome."""
    con = duckdb.connect()
    try:
        with tempfile.TemporaryDirectory() as tables:
            segments = segments_frame(segments_in(period, SUBSCRIPTIONS, CATALOG))
            result = checked_usage(con, paths, CUSTOMERS, SUBSCRIPTIONS, segments, CATALOG, period,
                                   Path(tables)).loaded()
        outcomes = con.sql("SELECT event_id, source_key, outcome, final_reason FROM settled ORDER BY ALL").pl()
    finally:
        con.close()
    c = result.counts
    assert c["read"] == c["billed"] + c["duplicates"] + c["quarantined"]
    return result, outcomes


def outcome_of(outcomes: pl.DataFrame) -> dict[tuple[str, str], tuple[str, str | None]]:
    return {(e, k): (o, r) for e, k, o, r in outcomes.rows()}


# Scope ----------------------------------------------------------------------------------------

def test_only_rows_of_the_period_or_without_a_time_are_counted(write):
    path = write("a",
                 ev("first-instant", "2026-10-01T00:00:00Z"),
                 ev("last-instant", "2026-10-31T23:59:59.999999Z"),
                 ev("offset-in", "2026-11-01T00:30:00+01:00"),       # = Oct 31 23:30Z
                 ev("offset-out", "2026-10-01T01:30:00+02:00"),      # = Sep 30 23:30Z
                 ev("next-period", "2026-11-01T00:00:00Z"),
                 ev("previous-period", "2026-09-30T23:59:59Z"),
                 ev("bad-in-other-period", "2026-11-03T00:00:00Z", quantity="-1"),
                 ev("no-time", ""),
                 ev("bad-time", "yesterday"))
    result, outcomes = settle([path])
    assert outcome_of(outcomes) == {
        ("first-instant", "usage/a.jsonl"): ("billed", None),
        ("last-instant", "usage/a.jsonl"): ("billed", None),
        ("offset-in", "usage/a.jsonl"): ("billed", None),
        ("no-time", "usage/a.jsonl"): ("quarantined", "missing_field"),
        ("bad-time", "usage/a.jsonl"): ("quarantined", "bad_timestamp")}
    assert result.counts == {"read": 5, "billed": 3, "duplicates": 0, "quarantined": 2}


def test_a_row_without_a_time_is_counted_by_every_close(write):
    path = write("a", ev("no-time", "not a time"))
    for period in (Period(2026, 9), OCT, Period(2026, 11)):
        assert settle([path], period)[0].counts == {"read": 1, "billed": 0, "duplicates": 0, "quarantined": 1}


def test_no_files_settle_to_nothing():
    result, _ = settle([])
    assert result.counts == {"read": 0, "billed": 0, "duplicates": 0, "quarantined": 0}
    assert result.quarantine.height == result.usage_by_dims.height == result.per_event_usage.height == 0


# Reasons --------------------------------------------------------------------------------------

REASONS = [
    pytest.param(ev("e", customer="c9"), "unknown_customer", id="customer not in customers"),
    pytest.param(ev("e", customer="c3"), "no_subscription", id="customer without any subscription"),
    pytest.param(ev("e", "2026-10-09T23:59:59Z", customer="c2"), "no_subscription",
                 id="customer before its subscription starts (Oct 10)"),
    pytest.param(ev("e", meter="images"), "unknown_meter", id="meter the plan does not price"),
    pytest.param(ev("e", meter="tokens", model="claude"), "no_matching_charge",
                 id="meter priced, but dims match no filter"),
    pytest.param(ev("e", meter="tokens"), "no_matching_charge", id="meter priced, filter dimension missing"),
    pytest.param(ev("e", quantity="-2"), "negative_quantity", id="row's own rule comes first"),
    pytest.param(ev("e", quantity="-2", customer="c9"), "negative_quantity",
                 id="row's own rule beats unknown_customer"),
    pytest.param(ev("e", customer="c3", meter="images"), "no_subscription",
                 id="no_subscription beats unknown_meter"),
]


# Amounts that cannot be represented -------------------------------------------------------------
# calls cost $1.00 each: ROW_AMOUNT_LIMIT_MINOR (10^13 cents) is 10^11 calls in one event.

AMOUNTS = [
    pytest.param("100000000000", "billed", None, id="10^11 calls x $1.00 = $10^11 = the limit -> billed"),
    pytest.param("100000000001", "quarantined", "amount_out_of_range", id="10^11 + 1 calls -> amount_out_of_range"),
    pytest.param("100000000000000000000", "quarantined", "amount_out_of_range",
                 id="10^20 calls (10^22 cents, beyond int64) -> amount_out_of_range"),
    pytest.param("99999999999999999999999999999", "quarantined", "amount_out_of_range",
                 id="29 digits (sums overflow DECIMAL(38,9)) -> amount_out_of_range"),
]


@pytest.mark.parametrize("quantity, outcome, reason", AMOUNTS)
def test_a_row_whose_amount_cannot_be_represented_is_quarantined_alone(write, quantity, outcome, reason):
    result, outcomes = settle([write("a", ev("big", quantity=quantity), ev("small", quantity="2"))])
    assert outcome_of(outcomes) == {("big", "usage/a.jsonl"): (outcome, reason),
                                    ("small", "usage/a.jsonl"): ("billed", None)}


def test_two_29_digit_quantities_do_not_overflow_the_sum_the_rest_bills(write):
    huge = "9" * 29
    result, outcomes = settle([write("a", ev("h1", quantity=huge), ev("h2", quantity=huge), ev("ok", quantity="3"))])
    assert result.counts == {"read": 3, "billed": 1, "duplicates": 0, "quarantined": 2}
    assert set(result.quarantine["reason"]) == {"amount_out_of_range"}
    assert result.usage_by_dims["units"].to_list() == [D("3")]


def test_many_rows_at_the_largest_legal_quantity_sum_exactly(write):
    """A sum of legal rows stays representable: 2,000 events of 10^11 calls add up exactly."""
    rows = [ev(f"e{i}", quantity="100000000000") for i in range(2000)]
    result, _ = settle([write("a", *rows)])
    assert result.usage_by_dims["units"].to_list() == [D("200000000000000")]


@pytest.mark.parametrize("row, reason", REASONS)
def test_quarantine_reason(write, row, reason):
    result, _ = settle([write("a", row)])
    assert result.counts == {"read": 1, "billed": 0, "duplicates": 0, "quarantined": 1}
    [q] = result.quarantine.rows(named=True)
    assert (q["reason"], q["source_key"], q["source_row"], q["event_id"]) == (reason, "usage/a.jsonl", 1, "e")
    assert q["quantity"] == row[3] and q["timestamp"] == row[4]


def test_clean_rows_of_each_kind_bill(write):
    result, _ = settle([write("a", ev("e1"), ev("e2", meter="tokens", model="gpt-4o", quantity="1500"),
                              ev("e3", "2026-10-10T00:00:00Z", customer="c2"))])
    assert result.counts == {"read": 3, "billed": 3, "duplicates": 0, "quarantined": 0}
    assert result.quarantine.height == 0


def test_quarantine_is_ordered_by_source(write):
    b = write("b", ev("b1", customer="c9"), ev("b2", quantity="x"))
    a = write("a", ev("a1", meter="images"), ev("a2", customer="c3"))
    result, _ = settle([b, a])
    assert result.quarantine.select("source_key", "source_row", "reason").rows() == [
        ("usage/a.jsonl", 1, "unknown_meter"), ("usage/a.jsonl", 2, "no_subscription"),
        ("usage/b.jsonl", 1, "unknown_customer"), ("usage/b.jsonl", 2, "bad_quantity")]


# Duplicates -----------------------------------------------------------------------------------

def test_same_event_in_two_files_bills_once(write):
    a = write("a", ev("e1", quantity="3"), ev("e2"))
    b = write("b", ev("e1", quantity="3"))
    result, outcomes = settle([a, b])
    assert result.counts == {"read": 3, "billed": 2, "duplicates": 1, "quarantined": 0}
    assert outcome_of(outcomes)[("e1", "usage/a.jsonl")] == ("billed", None)
    assert outcome_of(outcomes)[("e1", "usage/b.jsonl")] == ("duplicate", None)
    assert result.usage_by_dims.select("meter", "units", "events").rows() == [("calls", D("4"), 2)]


def test_same_event_twice_in_one_file_bills_once(write):
    result, outcomes = settle([write("a", ev("e1"), ev("e1"))])
    assert result.counts == {"read": 2, "billed": 1, "duplicates": 1, "quarantined": 0}


def test_the_billed_copy_does_not_depend_on_the_order_of_files(write):
    # Three copies of e1: the earliest in event time bills, whatever order the files come in;
    # two copies of e2 identical in content: the tie is broken by source, never by listing order.
    files = [write("a", ev("e1", "2026-10-07T00:00:00Z", quantity="7"), ev("e2", quantity="2")),
             write("b", ev("e1", "2026-10-05T00:00:00Z", quantity="5"), ev("e2", quantity="2")),
             write("c", ev("e1", "2026-10-06T00:00:00Z", quantity="6"), ev("e3"))]
    seen = set()
    for order in itertools.permutations(files):
        result, outcomes = settle(list(order))
        billed = outcomes.filter(pl.col("outcome") == "billed").select("event_id", "source_key").rows()
        seen.add((tuple(billed), tuple(result.usage_by_dims.rows()),
                  tuple(sorted(result.counts.items()))))
    assert len(seen) == 1
    [(billed, by_dims, counts)] = seen
    assert billed == (("e1", "usage/b.jsonl"), ("e2", "usage/a.jsonl"), ("e3", "usage/c.jsonl"))
    assert by_dims == (("s1", 1, "calls", "{}", D("8"), 3),)  # 5 + 2 + 1
    assert dict(counts) == {"read": 6, "billed": 3, "duplicates": 3, "quarantined": 0}


def test_a_quarantined_copy_does_not_hide_a_clean_one(write):
    result, outcomes = settle([write("a", ev("e1", quantity="-1")), write("b", ev("e1", quantity="1"))])
    assert outcome_of(outcomes) == {("e1", "usage/a.jsonl"): ("quarantined", "negative_quantity"),
                                    ("e1", "usage/b.jsonl"): ("billed", None)}


def test_a_copy_no_charge_prices_does_not_hide_a_later_clean_one(write):
    # The earlier copy is clean until pricing finds no charge for its dimensions: the later copy,
    # the only clean one left, bills; its quarantined twin keeps its fields as read.
    result, outcomes = settle([write("a", ev("e1", "2026-10-05T00:00:00Z", "1.50", "tokens", model="gpt-3")),
                               write("b", ev("e1", "2026-10-06T00:00:00Z", "2", "tokens", model="gpt-4o"))])
    assert outcome_of(outcomes) == {("e1", "usage/a.jsonl"): ("quarantined", "no_matching_charge"),
                                    ("e1", "usage/b.jsonl"): ("billed", None)}
    assert result.quarantine.select("source_key", "quantity", "timestamp").rows() == [
        ("usage/a.jsonl", "1.50", "2026-10-05T00:00:00Z")]


def test_event_valid_in_an_earlier_period_is_a_duplicate_in_this_one(write):
    late = write("late", ev("e1", "2026-10-02T00:00:00Z"))
    early = write("early", ev("e1", "2026-09-30T23:00:00Z"))
    result, outcomes = settle([late, early])
    assert outcome_of(outcomes) == {("e1", "usage/late.jsonl"): ("duplicate", None)}
    assert result.counts == {"read": 1, "billed": 0, "duplicates": 1, "quarantined": 0}
    # ... and the September close bills the early copy.
    sept, sept_outcomes = settle([late, early], Period(2026, 9))
    assert outcome_of(sept_outcomes) == {("e1", "usage/early.jsonl"): ("billed", None)}


def test_event_broken_in_an_earlier_period_does_not_make_this_one_a_duplicate(write):
    early = write("early", ev("e1", "2026-09-30T23:00:00Z", quantity="-1"))
    late = write("late", ev("e1", "2026-10-02T00:00:00Z"))
    assert outcome_of(settle([early, late])[1]) == {("e1", "usage/late.jsonl"): ("billed", None)}


def test_event_valid_in_a_later_period_bills_here(write):
    result, outcomes = settle([write("a", ev("e1", "2026-10-31T00:00:00Z"), ev("e1", "2026-11-02T00:00:00Z"))])
    assert outcome_of(outcomes) == {("e1", "usage/a.jsonl"): ("billed", None)}


def test_an_earlier_copy_that_could_not_bill_does_not_make_this_one_a_duplicate(write):
    # c2 subscribes on Oct 10: the Sep 5 copy is no_subscription in the September close.
    early = write("early", ev("e1", "2026-09-05T00:00:00Z", customer="c2"))
    late = write("late", ev("e1", "2026-10-15T00:00:00Z", customer="c2"))
    _, sept = settle([early, late], Period(2026, 9))
    assert outcome_of(sept) == {("e1", "usage/early.jsonl"): ("quarantined", "no_subscription")}
    assert outcome_of(settle([early, late])[1]) == {("e1", "usage/late.jsonl"): ("billed", None)}


# Sums -----------------------------------------------------------------------------------------

def test_usage_by_dims_sums_are_exact_decimals(write):
    rows = [ev(f"t{i}", meter="tokens", model="gpt-4o", quantity="0.1") for i in range(10)]
    rows += [ev("c1", quantity="0.000000001"), ev("c2", quantity="12345678901.123456789"),
             ev("c3", "2026-10-11T00:00:00Z", quantity="0.2", customer="c2")]
    result, _ = settle([write("a", *rows)])
    assert result.usage_by_dims.rows() == [
        ("s1", 1, "calls", "{}", D("12345678901.123456790"), 2),          # 0.000000001 + 12345678901.123456789
        ("s1", 1, "tokens", '{"model":"gpt-4o"}', D("1.0"), 10),           # 10 x 0.1 = 1.0, not 0.9999999999999999
        ("s2", 1, "calls", "{}", D("0.2"), 1)]
    assert isinstance(result.usage_by_dims.schema["units"], pl.Decimal)
    assert not any(dtype in (pl.Float32, pl.Float64) for dtype in result.usage_by_dims.schema.values())


def test_per_event_usage_lists_percentage_events_in_event_time_order(write):
    result, _ = settle([write("a", ev("p2", "2026-10-06T00:00:00Z", quantity="20", meter="payments"),
                              ev("p1", "2026-10-05T00:00:00Z", quantity="50", meter="payments"),
                              ev("c1"))])
    assert result.per_event_usage.select("meter", "quantity").rows() == [("payments", D("50")), ("payments", D("20"))]


def test_shards_merged_from_their_files_come_out_in_text_order_with_their_units_re_added(tmp_path):
    # The merge reads the shards' tables from their Parquet files (DuckDB, within a memory cap):
    # the aggregates re-add across shards, sorted by their texts, typed as one check types them.
    from transforms.engine.checked_usage import CheckedFiles, CheckedUsage, checked_tables, merged_files

    def part(subs: list[str], day: int, name: str) -> CheckedFiles:
        n = len(subs)
        by_day = pl.DataFrame({"subscription_id": subs, "segment_no": [0] * n, "meter": ["m-b", "m-a"] * (n // 2),
                               "dims": ['{"r":"z"}', "{}"] * (n // 2), "day": [date(2026, 10, day)] * n,
                               "units": pl.Series([D(i) for i in range(1, n + 1)], dtype=pl.Decimal(38, 9)),
                               "events": list(range(1, n + 1))})
        by_dims = by_day.drop("day")
        quarantine = pl.DataFrame(schema={"source_key": pl.String, "source_row": pl.Int64})
        checked = CheckedUsage({"read": n, "billed": n, "duplicates": 0, "quarantined": 0}, quarantine, by_dims,
                               by_day, pl.DataFrame(schema={"subscription_id": pl.String, "segment_no": pl.Int64,
                                                            "meter": pl.String, "event_at": pl.Datetime("us", "UTC"),
                                                            "event_id": pl.String}), [])
        (tmp_path / name).mkdir()
        tables = {}
        for table, frame in checked_tables(checked).items():
            tables[table] = str(tmp_path / name / f"{table}.parquet")
            frame.write_parquet(tables[table])
        return CheckedFiles(checked.counts, tables)

    names = [f"merge-order-sub-{i:02d}" for i in range(20)][::-1]  # met in reverse order
    parts = [part(names, 2, "a"), part(names[::2] + names[1::2], 1, "b"), part(names[:10], 3, "c")]
    merged = merged_files(duckdb.connect(), parts, tmp_path / "merged")
    keys = ["subscription_id", "segment_no", "meter", "dims", "day"]
    by_day, by_dims = merged.usage_by_day, merged.usage_by_dims
    assert by_day.schema == parts[0].usage_by_day.schema and by_dims.schema == parts[0].usage_by_dims.schema
    assert by_day.equals(by_day.sort(keys))
    assert by_dims.equals(by_dims.sort(keys[:4]))
    assert by_day.height == 20 * 2 + 10
    assert by_dims["units"].sum() == sum(range(1, 21)) * 2 + sum(range(1, 11))
    assert merged.counts == {"read": 50, "billed": 50, "duplicates": 0, "quarantined": 0}


@pytest.mark.parametrize("free_events", [0, 3], ids=["every event pays", "3 free events: the probe is one that pays"])
def test_the_largest_quantity_of_a_percentage_event_is_where_its_fee_reaches_the_limit(free_events):
    """1.2% + $0.10 per payment: (10^11 dollars - 0.10) / 0.012 = 8,333,333,333,325 dollars at most."""
    from transforms.engine.checked_usage import largest_quantity

    plan = parse_plan(PLAN.replace('fixed_fee: "0.10"}', f'fixed_fee: "0.10", free_events: {free_events}}}'),
                      "plans/p-v1.yaml")
    [charge] = [c for c in plan.plan.charges if c.meter == "payments"]
    assert largest_quantity(charge.price, "USD") == D("8333333333325")


def test_an_unreadable_object_counts_as_one_row_read_and_quarantined():
    """Settled: 10 read = 6 billed + 1 duplicate + 3 quarantined; 2 objects unreadable: 12 read =
    6 + 1 + 5, the account still adds up."""
    counts = usage_row_counts({"read": 10, "billed": 6, "duplicates": 1, "quarantined": 3}, 2)
    assert counts == {"read": 12, "billed": 6, "duplicates": 1, "quarantined": 5}
    assert counts["read"] == counts["billed"] + counts["duplicates"] + counts["quarantined"]
