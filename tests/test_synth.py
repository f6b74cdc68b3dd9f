"""The sample store: deterministic, realistic, and honest about the bad rows it mixes in.

The accounting check reads every object back from its bytes and classifies each row with the
contract's rules (section 3), written out here independently of the generator, then compares
the counts with `SynthStore.expected`.
"""
from __future__ import annotations

import io
import time
from datetime import date

import polars as pl
import pytest

from transforms.demo.synth import (
    EXPECTED_KEYS,
    UNKNOWN_METER,
    SynthStore,
    random_bits,
    stream_key,
    synth_store,
    write_bytes,
)
from transforms.errors import InputError
from transforms.inputs.plans import Catalog, parse_plan
from transforms.periods import Period

API_V1 = """
plan: api
version: 1
effective_from: 2026-01-01
currency: USD
fixed_fees: [{name: Platform fee, amount: "20.00"}]
charges:
  - name: GPT-4o input tokens
    meter: input_tokens
    filter: {model: gpt-4o}
    group_by: [region]
    price: {model: standard, unit_price: "2.50", per: 1000000}
  - meter: output_tokens
    price: {model: standard, unit_price: "10.00", per: 1000000}
  - meter: api_calls
    price: {model: standard, unit_price: "0.01"}
"""
# v2 launches mid-period and adds `images`; v1 subscriptions move to it on 2026-10-20.
API_V2 = """
plan: api
version: 2
effective_from: 2026-10-12
migrate_existing_on: 2026-10-20
currency: USD
charges:
  - name: GPT-4o input tokens
    meter: input_tokens
    filter: {model: gpt-4o}
    group_by: [region]
    price: {model: standard, unit_price: "2.00", per: 1000000}
  - meter: output_tokens
    price: {model: standard, unit_price: "8.00", per: 1000000}
  - meter: images
    price: {model: standard, unit_price: "0.04"}
"""
SHOP_V1 = """
plan: shop
version: 1
effective_from: 2025-06-01
currency: EUR
charges:
  - meter: payments
    price: {model: standard, unit_price: "0.012"}
  - meter: api_calls
    price: {model: standard, unit_price: "0.002"}
"""
PERIOD = "2026-10"
THE_PERIOD = Period.parse(PERIOD)
END = date(2026, 11, 1)
QUARANTINE_KEYS = ("negative_quantity", "bad_quantity", "unknown_customer", "bad_timestamp",
                   "missing_field", "unknown_meter")


def make_catalog(*texts: str) -> Catalog:
    return Catalog.from_files([parse_plan(t, f"plan{i}.yaml") for i, t in enumerate(texts)])


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return make_catalog(API_V1, API_V2, SHOP_V1)


@pytest.fixture(scope="module")
def store(catalog) -> SynthStore:
    return synth_store(catalog, PERIOD, customers=300, seed=7)


def all_bytes(s: SynthStore) -> dict[str, bytes]:
    return {o.key: write_bytes(o) for o in s.usage_objects}


def read_back(s: SynthStore) -> tuple[pl.DataFrame, int]:
    """Every readable object parsed from its bytes, timestamps as UTC datetimes (null when
    unparseable); and how many objects could not be read at all."""
    frames, unreadable = [], 0
    for o in s.usage_objects:
        data = write_bytes(o)
        try:
            if o.fmt == "parquet":
                frame = pl.read_parquet(io.BytesIO(data))
            elif o.fmt == "csv":
                frame = pl.read_csv(io.BytesIO(data), infer_schema=False)
            else:
                frame = pl.read_ndjson(io.BytesIO(data), infer_schema_length=None)
        except Exception:
            unreadable += 1
            continue
        if frame.schema["timestamp"] == pl.Utf8:
            frame = frame.with_columns(pl.col("timestamp").str.to_datetime(
                "%Y-%m-%dT%H:%M:%S%.fZ", strict=False, time_unit="us", time_zone="UTC"))
        frames.append(frame.with_columns(pl.lit(o.key).alias("_key")))
    return pl.concat(frames, how="diagonal_relaxed"), unreadable


def active_meters(catalog: Catalog, plan: str, start_date: str, plan_version: str | None, day: date) -> set[str]:
    """The contract's binding rule: the version in force on start_date (or the pinned one), moved
    to a later version once its migrate_existing_on has come."""
    start = date.fromisoformat(start_date)
    bound = catalog.get(plan, int(plan_version)) if plan_version else catalog.in_force_on(plan, start)
    version = bound.plan.version
    for f in catalog.versions(plan):
        moved_on = f.plan.migrate_existing_on
        if f.plan.version > version and moved_on is not None and moved_on <= day:
            version = f.plan.version
    return {c.meter for c in catalog.get(plan, version).plan.charges}


def classify(catalog: Catalog, s: SynthStore, rows: pl.DataFrame,
             period: Period = THE_PERIOD) -> pl.DataFrame:
    """Each row read, with `reason`: a quarantine reason, `other_period`, or `valid`."""
    lo, hi = period.start_at, period.end_at
    rows = rows.with_row_index("_row").with_columns(
        _qty=pl.col("quantity").cast(pl.Utf8).cast(pl.Decimal(38, 6), strict=False),
        _day=pl.col("timestamp").dt.date(),
    )
    subs = s.subscriptions.with_columns(
        _from=pl.col("start_date").str.to_date(), _to=pl.col("end_date").str.to_date())
    matched = (rows.select("_row", "customer_id", "_day")
               .join(subs, on="customer_id")
               .filter((pl.col("_from") <= pl.col("_day"))
                       & (pl.col("_to").is_null() | (pl.col("_day") < pl.col("_to")))))
    assert matched["_row"].is_unique().all(), "a customer has two subscriptions active at once"
    priced = {}
    for key in matched.select("plan", "start_date", "plan_version", "_day").unique().iter_rows():
        priced[key] = active_meters(catalog, *key)
    meters = {r: priced[(p, sd, pv, d)] for r, p, sd, pv, d in
              matched.select("_row", "plan", "start_date", "plan_version", "_day").iter_rows()}
    known = set(s.customers["customer_id"])

    def reason(row: dict) -> str:
        if row["event_id"] is None:
            return "missing_field"
        if row["timestamp"] is None:
            return "bad_timestamp"
        if not lo <= row["timestamp"] < hi:
            return "other_period"
        if row["_qty"] is None:
            return "bad_quantity"
        if row["_qty"] < 0:
            return "negative_quantity"
        if row["customer_id"] not in known:
            return "unknown_customer"
        if row["meter"] not in meters.get(row["_row"], set()):
            return "unknown_meter"
        return "valid"

    return rows.with_columns(reason=pl.Series([reason(r) for r in rows.iter_rows(named=True)], dtype=pl.Utf8))


def accounted(catalog: Catalog, s: SynthStore, period: Period = THE_PERIOD) -> dict[str, int]:
    rows, unreadable = read_back(s)
    rows = classify(catalog, s, rows, period)
    counts = dict.fromkeys(EXPECTED_KEYS, 0)
    for reason, n in rows.group_by("reason").len().iter_rows():
        counts[reason] = n
    valid = counts.pop("valid")
    unique = rows.filter(pl.col("reason") == "valid")["event_id"].n_unique()
    counts["rows_in_period_valid_unique"] = unique
    counts["duplicates"] = valid - unique
    counts["corrupt_objects"] = unreadable
    return counts


# --- determinism -----------------------------------------------------------------------------

def test_same_seed_gives_identical_bytes(catalog, store):
    again = synth_store(catalog, PERIOD, customers=300, seed=7)
    assert all_bytes(again) == all_bytes(store)
    assert again.customers.equals(store.customers)
    assert again.subscriptions.equals(store.subscriptions)
    assert again.expected == store.expected


def test_write_bytes_is_stable_across_calls(store):
    for o in store.usage_objects:
        assert write_bytes(o) == write_bytes(o), o.key


def test_different_seed_gives_different_data(catalog, store):
    other = synth_store(catalog, PERIOD, customers=300, seed=8)
    ours, theirs = all_bytes(store), all_bytes(other)
    assert any(ours.get(k) != theirs.get(k) for k in ours.keys() | theirs.keys())
    assert not other.subscriptions.equals(store.subscriptions)


def test_random_bits_are_splitmix64():
    # Pins the Polars arithmetic (wrapping UInt64) to the reference algorithm, so a change in
    # the engine cannot silently change every sample store.
    mask = (1 << 64) - 1

    def splitmix64(state: int, n: int) -> list[int]:
        out = []
        for _ in range(n):
            state = (state + 0x9E3779B97F4A7C15) & mask
            z = state
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
            out.append(z ^ (z >> 31))
        return out

    assert random_bits(42, "some.stream", 6).to_list() == splitmix64(stream_key(42, "some.stream"), 6)
    assert random_bits(42, "other", 6).to_list() != random_bits(42, "some.stream", 6).to_list()


# --- the accounting --------------------------------------------------------------------------

def test_expected_counts_match_the_rows_placed(catalog, store):
    assert set(store.expected) == set(EXPECTED_KEYS)
    assert accounted(catalog, store) == store.expected
    e = store.expected
    assert e["corrupt_objects"] == 1
    assert all(e[k] > 0 for k in QUARANTINE_KEYS + ("other_period",))
    # ~1% duplicates of the period's billable events
    assert e["duplicates"] == e["rows_in_period_valid_unique"] // 100


def test_clean_store_has_no_bad_rows(catalog):
    clean = synth_store(catalog, PERIOD, customers=40, seed=3, dirty=False)
    counts = accounted(catalog, clean)
    assert counts == clean.expected
    assert counts["rows_in_period_valid_unique"] > 0
    assert all(v == 0 for k, v in counts.items() if k != "rows_in_period_valid_unique")
    assert all(o.raw is None for o in clean.usage_objects)


def test_duplicates_are_exact_copies(catalog, store):
    rows, _ = read_back(store)
    dup_ids = rows.filter(pl.col("event_id").is_not_null() & pl.col("event_id").is_duplicated())
    assert dup_ids.height > 0
    content = dup_ids.drop("_key").with_columns(pl.col("timestamp").cast(pl.Int64))
    per_id = content.group_by("event_id").agg(pl.struct(pl.exclude("event_id")).n_unique().alias("versions"))
    assert per_id["versions"].max() == 1


def test_corrupt_object_is_raw_and_unreadable(store):
    corrupt = [o for o in store.usage_objects if o.raw is not None]
    assert len(corrupt) == 1 and corrupt[0].frame is None and corrupt[0].key.endswith(".parquet")
    # any read failure will do (hence the broad Exception): the test is about the store, not the reader
    with pytest.raises(Exception):  # noqa: B017
        pl.read_parquet(io.BytesIO(corrupt[0].raw))


# --- realism ---------------------------------------------------------------------------------

def test_every_clean_event_is_priced_by_the_plan_active_at_its_time(catalog, store):
    rows, _ = read_back(store)
    rows = classify(catalog, store, rows.filter(pl.col("meter") != UNKNOWN_METER))
    wrong = rows.filter(pl.col("reason") == "unknown_meter")
    assert wrong.height == 0, wrong.head()
    # the mid-period version is really used: images only exist on api v2 (bound or migrated)
    images = rows.filter(pl.col("meter") == "images")
    assert images.height > 0
    assert (images["timestamp"].dt.date() >= date(2026, 10, 12)).all()


def test_objects_one_per_day_mostly_parquet(store):
    keys = [o.key for o in store.usage_objects]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    fmts = [o.fmt for o in store.usage_objects]
    assert fmts.count("csv") >= 1 and fmts.count("jsonl") >= 1
    assert fmts.count("parquet") > len(fmts) // 2
    days = {k.split("/")[1] for k in keys}
    assert len(days) == 31
    for o in store.usage_objects:
        assert o.key.startswith("usage/date=2026-") and o.key.endswith(f".{o.fmt}")
        if o.frame is None:
            continue
        assert o.frame.columns[:5] == ["event_id", "customer_id", "meter", "quantity", "timestamp"]
        assert o.frame.schema["quantity"] == pl.Utf8
        assert not any(dtype.is_float() for dtype in o.frame.schema.values())
        if o.fmt == "parquet":
            assert o.frame.schema["timestamp"] == pl.Datetime("us", "UTC")
        else:
            stamps = o.frame["timestamp"]
            assert (stamps.str.contains(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$") | (stamps == "not-a-time")).all()


def test_magnitudes_are_realistic(catalog, store):
    rows, _ = read_back(store)
    rows = classify(catalog, store, rows).filter(pl.col("reason") == "valid")
    tokens = rows.filter(pl.col("meter").str.contains("token"))["quantity"].cast(pl.Int64)
    assert 1000 <= tokens.min() and tokens.max() <= 300_000 and tokens.max() >= 100_000
    counts = rows.filter(pl.col("meter").is_in(["api_calls", "images"]))["quantity"].cast(pl.Int64)
    assert counts.min() >= 1 and counts.max() <= 5
    payments = rows.filter(pl.col("meter") == "payments")["quantity"]
    assert payments.len() > 0 and payments.str.contains(r"^\d+\.\d{2}$").all()


def test_filters_match_often_and_groups_take_a_few_values(catalog, store):
    rows, _ = read_back(store)
    rows = classify(catalog, store, rows).filter(pl.col("reason") == "valid")
    inputs = rows.filter(pl.col("meter") == "input_tokens")
    share = inputs.filter(pl.col("model") == "gpt-4o").height / inputs.height
    assert share > 0.7
    assert 2 <= inputs["region"].drop_nulls().n_unique() <= 5
    # a dimension no charge of the meter uses is left out of its events
    assert rows.filter(pl.col("meter") == "payments")["model"].null_count() == \
        rows.filter(pl.col("meter") == "payments").height


def test_activity_is_skewed(catalog, store):
    rows, _ = read_back(store)
    rows = classify(catalog, store, rows).filter(pl.col("reason") == "valid")
    per_customer = rows.group_by("customer_id").len()["len"]
    assert 30 <= rows.height / store.customers.height <= 80
    assert per_customer.max() > 5 * per_customer.median()


# --- customers and subscriptions -------------------------------------------------------------

def test_customers(store):
    c = store.customers
    assert c.columns == ["customer_id", "name", "email", "address", "tax_id", "country", "region"]
    assert c.height == 300 and c["customer_id"].is_unique().all()
    assert c["customer_id"].str.contains(r"^cus_\d{6}$").all()
    names = set(c["name"])
    assert "O'Brien & Sons <Ltd>" in names and "Zürich Labs AG" in names
    # the names that need quoting survive a CSV round trip
    assert pl.read_csv(io.BytesIO(c.write_csv().encode()), infer_schema=False).equals(c)


def test_subscriptions_bind_a_version_in_force(catalog, store):
    s = store.subscriptions
    assert s.columns == ["subscription_id", "customer_id", "plan", "plan_version", "start_date",
                         "end_date", "budget", "hard_cap"]
    assert all(dtype == pl.Utf8 for dtype in s.schema.values())
    assert s["subscription_id"].is_unique().all()
    assert set(s["plan"]) == {"api", "shop"}
    assert set(s["customer_id"]) == set(store.customers["customer_id"])
    assert s["plan_version"].null_count() > s.height * 0.8
    for row in s.iter_rows(named=True):
        start = date.fromisoformat(row["start_date"])
        in_force = catalog.in_force_on(row["plan"], start)
        assert in_force is not None, row
        assert row["plan_version"] in (None, str(in_force.plan.version)), row
        assert start < END, row
        if row["end_date"] is not None:
            assert date.fromisoformat(row["end_date"]) > start, row
        for money in (row["budget"], row["hard_cap"]):
            assert money is None or money.replace(".", "", 1).isdigit(), row
    assert (s["start_date"] > "2026-10-01").any(), "some start mid-period"
    assert ((s["end_date"] > "2026-10-01") & (s["end_date"] < "2026-11-01")).any(), "some end mid-period"
    assert s["end_date"].null_count() > s.height // 2
    assert s["budget"].drop_nulls().len() > 0


def test_plan_changes_are_contiguous(store):
    s = store.subscriptions.sort("customer_id", "start_date")
    changes = 0
    for (customer,), rows in s.group_by("customer_id", maintain_order=True):
        if rows.height == 1:
            continue
        assert rows.height == 2, customer
        old, new = rows.row(0, named=True), rows.row(1, named=True)
        assert old["end_date"] == new["start_date"], (old, new)
        assert old["plan"] != new["plan"] and old["subscription_id"] != new["subscription_id"]
        assert "2026-10-01" < new["start_date"] < "2026-11-01"
        changes += 1
    assert changes >= 1


def test_plans_not_yet_launched_get_no_customers():
    future = SHOP_V1.replace("plan: shop", "plan: future").replace("2025-06-01", "2027-01-01")
    late = SHOP_V1.replace("plan: shop", "plan: late").replace("2025-06-01", "2026-10-15")
    seats = "plan: seats\nversion: 1\neffective_from: 2026-01-01\ncurrency: JPY\n" \
            "fixed_fees: [{name: Seat, amount: '3000'}]\n"
    catalog = make_catalog(API_V1, future, late, seats)
    s = synth_store(catalog, PERIOD, customers=30, seed=1)
    assert set(s.subscriptions["plan"]) == {"api", "late", "seats"}
    # a plan without charges has customers but no usage (unless they moved to another plan)
    only_seats = s.subscriptions.group_by("customer_id").agg((pl.col("plan") == "seats").all().alias("only"))
    seat_customers = set(only_seats.filter("only")["customer_id"])
    rows, _ = read_back(s)
    assert seat_customers and not seat_customers & set(rows["customer_id"])
    assert (s.subscriptions.filter(pl.col("plan") == "late")["start_date"] >= "2026-10-15").all()
    assert accounted(catalog, s) == s.expected


def test_december_rolls_into_january_and_bad_periods_fail(catalog):
    s = synth_store(catalog, "2026-12", customers=20, seed=5)
    assert accounted(catalog, s, Period.parse("2026-12")) == s.expected
    days = {o.key.split("/")[1] for o in s.usage_objects}
    assert min(days) == "date=2026-12-01" and max(days) == "date=2026-12-31"
    with pytest.raises(InputError):
        synth_store(catalog, "2026-13", customers=5, seed=1)


# --- scale -----------------------------------------------------------------------------------

def test_two_hundred_thousand_events(catalog):
    started = time.perf_counter()
    s = synth_store(catalog, PERIOD, customers=4000, seed=11)
    rows = sum(o.frame.height for o in s.usage_objects if o.frame is not None)
    elapsed = time.perf_counter() - started
    assert rows > 150_000
    print(f"{rows} usage rows in {elapsed:.2f}s")
