"""Nightly bills and alerts what the close does, when a later night learns of an earlier copy.

The reproduction of issue 17: `usage/a.csv` holds e1, 1,000,000 gpt-4o input tokens on
2026-10-05 (plan api v1 at $2.50 per million, budget $5.00: alerts at $2.50, $4.00, $5.00);
night 10-05 takes it in. Then `usage/b.csv` brings the same e1 with 3,000,000 tokens on
2026-10-04. The close bills the earliest copy (3,000,000 tokens, $7.50; every alert on 10-04):
the last night's draft must bill the same, and the nights together must have sent the alerts
the close finds (the $2.50 alert, sent on night 10-05, is not sent again). A one-off charge of
the month (adjustments/) is on the draft as on the close's invoice.
"""
from __future__ import annotations

import io
from datetime import date
from decimal import Decimal

import polars as pl
import pytest
from typer.testing import CliRunner

from closeutil import PLANS
from flows.cli import app
from flows.store import open_store

pytestmark = pytest.mark.slow

runner = CliRunner()
HEADER = "event_id,customer_id,meter,quantity,timestamp,model\n"


def billrun(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def parquet(store: str, key: str) -> pl.DataFrame:
    return pl.read_parquet(io.BytesIO(open_store(store).read_bytes(key)))


def alerts(frame: pl.DataFrame) -> list[tuple[str, Decimal, date]]:
    return sorted((k, Decimal(t), d) for k, t, d in frame.select("kind", "threshold", "occurred_on").iter_rows())


@pytest.fixture(scope="module")
def ran(prefect_server, tmp_path_factory) -> str:
    store = str(tmp_path_factory.mktemp("agree") / "store")
    s = open_store(store, create=True)
    s.put_bytes("customers/customers.csv", b"customer_id,name,email\nc1,Customer One,billing@c1.example\n")
    s.put_bytes("subscriptions/subscriptions.csv",
                b"subscription_id,customer_id,plan,plan_version,start_date,end_date,budget,hard_cap\n"
                b"sub-c1,c1,api,1,2026-09-01,,5.00,\n")
    s.put_bytes("usage/a.csv", (HEADER + "e1,c1,input_tokens,1000000,2026-10-05T10:00:00Z,gpt-4o\n").encode())
    s.put_bytes("adjustments/adjustments.csv",
                b"adjustment_id,customer_id,subscription_id,period,description,amount,currency,reason,taxable\n"
                b"adj-1,c1,,2026-10,Onboarding workshop,250.00,USD,order form 17,\n")
    for day, extra in (("2026-10-05", None), ("2026-10-31", "usage/b.csv")):
        if extra:
            s.put_bytes(extra, (HEADER + "e1,c1,input_tokens,3000000,2026-10-04T10:00:00Z,gpt-4o\n").encode())
        result = billrun("nightly", "--date", day, "--store", store, "--plans", PLANS)
        assert result.exit_code == 0, result.output
    result = billrun("close", "--period", "2026-10", "--store", store, "--plans", PLANS, "--json")
    assert result.exit_code == 0, result.output
    return store


def test_the_last_night_drafts_what_the_close_bills(ran):
    columns = ["customer_id", "line_no", "kind", "meter", "quantity", "amount_minor"]
    close = parquet(ran, "billing/period=2026-10/invoice_lines.parquet").select(columns).sort(columns)
    draft = parquet(ran, "billing/nightly/date=2026-10-31/draft_invoice_lines.parquet").select(columns).sort(columns)
    billed = close.filter(pl.col("amount_minor") != 0).sort("kind")
    assert billed.select("kind", "quantity", "amount_minor").rows() == [("adjustment_charge", "1", 25000),
                                                                      ("usage", "3000000", 750)]
    assert draft.equals(close)


def test_the_nights_send_the_alerts_the_close_finds_once_each(ran):
    close = alerts(parquet(ran, "billing/period=2026-10/alerts.parquet"))
    assert close == [("spend_threshold", Decimal(t), date(2026, 10, 4)) for t in ("2.50", "4.00", "5.00")]
    first = alerts(parquet(ran, "billing/nightly/date=2026-10-05/alerts.parquet"))
    last = alerts(parquet(ran, "billing/nightly/date=2026-10-31/alerts.parquet"))
    assert first == [("spend_threshold", Decimal("2.50"), date(2026, 10, 5))]  # what night 10-05 knew
    assert last == close[1:]  # the ones not sent yet, dated as the close dates them


def test_a_night_split_into_shards_drafts_what_one_shard_drafts(prefect_server, tmp_path, monkeypatch):
    """Nightly normalizes as the close does, an object's rows spread over shards by event_id: an
    object that also holds the next day's events is cut at the night's end in every shard."""
    rows = "".join(f"e{i},c1,input_tokens,{100000 * (i + 1)},2026-10-0{5 + i % 2}T10:00:00Z,gpt-4o\n"
                   for i in range(12))
    drafts = {}
    for shards in ("1", "3"):
        store = str(tmp_path / f"shards-{shards}")
        s = open_store(store, create=True)
        s.put_bytes("customers/customers.csv", b"customer_id,name,email\nc1,Customer One,billing@c1.example\n")
        s.put_bytes("subscriptions/subscriptions.csv",
                    b"subscription_id,customer_id,plan,plan_version,start_date,end_date,budget,hard_cap\n"
                    b"sub-c1,c1,api,1,2026-09-01,,5.00,\n")
        s.put_bytes("usage/a.csv", (HEADER + rows).encode())
        monkeypatch.setenv("BILLRUN_SHARDS", shards)
        result = billrun("nightly", "--date", "2026-10-05", "--store", store, "--plans", PLANS)
        assert result.exit_code == 0, result.output
        drafts[shards] = {name: s.read_bytes(f"billing/nightly/date=2026-10-05/{name}")
                          for name in ("draft_invoice_lines.parquet", "usage.parquet", "alerts.parquet")}
    lines = pl.read_parquet(io.BytesIO(drafts["1"]["draft_invoice_lines.parquet"]))
    # the six events of 10-05 (e0, e2, ... e10): 100,000 x (1 + 3 + ... + 11) = 3,600,000 tokens
    assert lines.filter(pl.col("amount_minor") != 0).select("quantity", "amount_minor").rows() == [("3600000", 900)]
    assert drafts["3"] == drafts["1"]
