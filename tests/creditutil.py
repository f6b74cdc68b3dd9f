"""Helpers for the credit wallet tests: plans from YAML text, subscriptions, events and purchases
built by hand, the ledger read back as (kind, credits, balance_after) tuples, and a store for the
real closes. Exact decimals throughout; no floats."""
from __future__ import annotations

import csv
import io
import json
import textwrap
from collections import defaultdict
from datetime import date, datetime, timezone
from decimal import Decimal
from pathlib import Path

from flows.store import open_store
from transforms.credits.model import CreditEvent, Entry, Purchase, WalletReplay
from transforms.inputs.plans import Catalog, PlanFile, parse_plan
from transforms.inputs.reference import Subscription

YEAR = 2026


def at(month: int, day: int, hour: int = 12, minute: int = 0, second: int = 0) -> datetime:
    """A UTC instant in 2026."""
    return datetime(YEAR, month, day, hour, minute, second, tzinfo=timezone.utc)


def iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def plan(text: str, name: str = "plan.yaml") -> PlanFile:
    """A checked plan file from (indented) YAML text."""
    return parse_plan(textwrap.dedent(text), name)


def catalog(*plans: PlanFile) -> Catalog:
    return Catalog.from_files(list(plans))


def subscription(subscription_id: str, customer_id: str, plan_id: str, start: date = date(YEAR, 10, 1),
                 end: date | None = None) -> Subscription:
    return Subscription(subscription_id, customer_id, plan_id, None, start, end, None, None, 1)


def event(customer_id: str, subscription_id: str, event_id: str, when: datetime, quantity: str | int | Decimal,
          meter: str = "images", dims: dict[str, str] | None = None) -> CreditEvent:
    return CreditEvent(customer_id, subscription_id, 1, event_id, when, meter,
                       json.dumps(dims or {}, sort_keys=True), Decimal(quantity))


def purchase(purchase_id: str, customer_id: str, credits: str | int, price: str, purchased_at: datetime,
             expires_at: datetime | None = None, currency: str = "USD") -> Purchase:
    return Purchase(purchase_id, customer_id, Decimal(credits), Decimal(price), currency, purchased_at, expires_at)


def moves(entries: list[Entry], customer_id: str | None = None) -> list[tuple[str, str, str, str]]:
    """(grant_id, kind, credits, balance_after) per ledger entry, decimals normalized to text."""
    return [(e.grant_id, e.kind, _text(e.credits), _text(e.balance_after))
            for e in entries if customer_id is None or e.customer_id == customer_id]


def _text(value: Decimal) -> str:
    text = format(value.normalize(), "f")
    return "0" if text == "-0" else text


def drawn_by_event(replay: WalletReplay) -> dict[str, Decimal]:
    """Credits drawn per event_id (positive)."""
    out: dict[str, Decimal] = defaultdict(Decimal)
    for e in replay.entries:
        if e.kind == "consume":
            out[e.event_id] -= e.credits
    return dict(out)


def csv_bytes(header: list[str], rows: list[list[str]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()


def write_store(root: Path, plans: dict[str, str], customers: list[str],
                subscriptions: list[tuple[str, str, str, str, str]],
                usage: dict[str, list[tuple[str, str, str, str, str]]],
                purchases: list[tuple[str, str, str, str, str, str, str]]) -> tuple[str, str]:
    """Plan files and a local store; returns (store uri, plans dir).

    subscriptions: (subscription_id, customer_id, plan, start_date, end_date);
    usage: object name -> (event_id, customer_id, meter, quantity, timestamp);
    purchases: the credit_purchases columns, in order."""
    plans_dir = root / "plans"
    plans_dir.mkdir()
    for name, text in plans.items():
        (plans_dir / f"{name}.yaml").write_text(textwrap.dedent(text), encoding="utf-8")
    store_uri = str(root / "store")
    store = open_store(store_uri, create=True)
    store.put_bytes("customers/customers.csv", csv_bytes(
        ["customer_id", "name", "email"], [[c, f"Customer {c}", f"billing@{c}.example"] for c in customers]))
    store.put_bytes("subscriptions/subscriptions.csv", csv_bytes(
        ["subscription_id", "customer_id", "plan", "plan_version", "start_date", "end_date", "budget", "hard_cap"],
        [[s, c, p, "", start, end, "", ""] for s, c, p, start, end in subscriptions]))
    for name, rows in usage.items():
        store.put_bytes(f"usage/{name}.csv", csv_bytes(
            ["event_id", "customer_id", "meter", "quantity", "timestamp"], [list(r) for r in rows]))
    store.put_bytes("credit_purchases/purchases.csv", csv_bytes(
        ["purchase_id", "customer_id", "credits", "price", "currency", "purchased_at", "expires_at"],
        [list(r) for r in purchases]))
    return store_uri, str(plans_dir)
