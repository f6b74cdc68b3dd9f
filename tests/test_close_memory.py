"""The close's large-volume shapes give the results of the simple ones (issue #7).

- The wallet replay fed the per-event frame as columns a batch of customers at a time, moving
  through stretches at once (as the close runs it), equals the replay of every credit event one
  at a time: same ledger, same billable units, same alerts.
- The checked usage read back from its files (as the close's steps get it) is the checked usage.
"""
from __future__ import annotations

import random
from datetime import date, timedelta
from decimal import Decimal as D
from pathlib import Path

import polars as pl

from creditutil import at, event, purchase, subscription
from flows.steps import credit_events
from transforms.credits.events import credit_events_frame, credit_meters, period_credit_rows
from transforms.credits.grants import history_grants
from transforms.credits.replay import replayed_wallets
from transforms.engine.checked_usage import CheckedFiles, CheckedUsage, checked_tables
from transforms.inputs.plans import load_catalog
from transforms.inputs.reference import segments_in
from transforms.periods import Period

PLANS = Path(__file__).resolve().parent.parent / "plans"
OCT = Period(2026, 10)
PER_EVENT_SCHEMA = {"subscription_id": pl.String, "segment_no": pl.Int32, "meter": pl.String, "dims": pl.String,
                    "quantity": pl.Decimal(38, 9), "customer_id": pl.String, "event_id": pl.String,
                    "event_at": pl.Datetime("us", "UTC")}


def world(seed: int, customers: int = 40):
    """Subscriptions on the repository's plans (credits with top-ups, percentage fees, tokens),
    started on different days and listed out of order, with credit purchases, events of
    September (history) and October, of credit and other meters."""
    rng = random.Random(seed)
    subs, purchases, history, period_rows = [], [], [], []
    for n in rng.sample(range(customers), customers):
        customer = f"cus_{n:03d}"
        plan_id = rng.choice(["images", "images", "payments", "api"])
        start = date(2026, rng.choice([8, 9, 10]), rng.randint(1, 28))
        sub_id = f"sub_{n:03d}"
        subs.append(subscription(sub_id, customer, plan_id, start=start))
        if rng.random() < 0.3:
            purchases.append(purchase(f"p{n}", customer, rng.randint(5, 80), "3.00", at(rng.choice([9, 10]), 5)))
        meters = {"images": ["images", "upscales"], "payments": ["payments"], "api": ["api_calls"]}[plan_id]
        for k in range(rng.randint(0, 60)):
            when = at(10, rng.randint(1, 31), rng.randint(0, 23), rng.randint(0, 59))
            if rng.random() < 0.25:
                when -= timedelta(days=31)
            if when.date() < start:
                continue
            meter = rng.choice(meters)
            quantity = D(rng.randint(1, 400)) if meter != "images" else D(rng.randint(1, 30))
            ev = event(customer, sub_id, f"evt_{n:03d}_{k:03d}", when, quantity, meter=meter)
            if when < OCT.start_at:  # the credit history holds only events that drew credits
                if plan_id == "images":
                    history.append(ev)
            else:
                period_rows.append(ev)
    return subs, purchases, sorted(history, key=lambda e: e.event_id), period_rows


def per_event_frame(events) -> pl.DataFrame:
    """The checked usage's per_event_usage of `events`, in its order (segment, meter, time)."""
    rows = [(e.subscription_id, e.segment_no, e.meter, e.dims, e.quantity, e.customer_id, e.event_id, e.event_at)
            for e in events]
    frame = pl.DataFrame(rows, schema=PER_EVENT_SCHEMA, orient="row")
    return frame.sort("subscription_id", "segment_no", "meter", "event_at", "event_id")


def test_wallets_fed_as_columns_in_batches_equal_the_replay_of_every_event_one_at_a_time(monkeypatch):
    catalog = load_catalog(str(PLANS))
    monkeypatch.setattr("transforms.credits.replay.BATCH_EVENTS", 7)  # many batches, customers never split
    for seed in range(5):
        subs, purchases, history, period_rows = world(seed)
        segments = segments_in(OCT, subs, catalog)
        frame = per_event_frame(period_rows)
        credit = credit_meters(segments)
        listed = history + [e for e in period_rows if (e.subscription_id, e.segment_no, e.meter) in credit]
        expected = replayed_wallets(history_grants(subs, catalog, purchases, OCT), subs, catalog, listed, OCT,
                                    stretches=False)
        replay = replayed_wallets(history_grants(subs, catalog, purchases, OCT), subs, catalog,
                                  pl.concat([credit_events_frame(history), period_credit_rows(frame, segments)]), OCT)
        assert replay.entries == expected.entries
        assert replay.entries, "the scenario replays some wallet"
        assert dict(replay.billable_units) == dict(expected.billable_units)
        assert dict(replay.billable_by_day) == dict(expected.billable_by_day)
        assert dict(replay.blocked_units) == dict(expected.blocked_units)
        assert replay.alerts == expected.alerts
        assert replay.grants == expected.grants


def test_the_checked_usage_read_back_from_its_files_is_the_checked_usage(tmp_path):
    # The close's steps get the checked usage as files (a task hands over paths): each table,
    # the credit history's events too, reads back as the check made it.
    subs, _, history, period_rows = world(1)
    frame = per_event_frame(period_rows)
    by_day = pl.DataFrame({"subscription_id": ["sub_001"], "day": [date(2026, 10, 3)],
                           "units": pl.Series([D("1.5")], dtype=pl.Decimal(38, 9))})
    quarantine = pl.DataFrame({"source_key": ["usage/a.csv"], "source_row": [3], "reason": ["unknown_meter"]})
    checked = CheckedUsage({"read": 1}, quarantine, by_day.drop("day"), by_day, frame, history)
    tables = {}
    for name, table in checked_tables(checked).items():
        tables[name] = str(tmp_path / f"{name}.parquet")
        table.write_parquet(tables[name])
    files = CheckedFiles(checked.counts, tables)
    assert files.per_event_usage.equals(frame) and files.usage_by_day.equals(by_day)
    assert files.quarantine.equals(quarantine) and files.usage_by_dims.equals(by_day.drop("day"))
    assert files.credit_history == history and history, "the scenario has a credit history"
    assert files.loaded().credit_history == history and files.conflicts.height == 0
    # the replay's events, read from the files (only the credit rows) as from the checked usage
    segments = segments_in(OCT, subs, load_catalog(str(PLANS)))
    assert credit_events(files, segments).equals(credit_events(checked, segments))
    assert credit_events(files, segments).height > len(history)
