"""Draft invoices: an open period's invoices as they stand on a day, shown before the close.

A draft is what the close would issue if the period ended on that day, rated by the close's own
steps (or read from the nightly run that did so). It is never a document: it carries no invoice
number (`DRAFT-<customer>-<period>`, never `INV-...`, which only the close hands out, gap-free),
it is dated the day it shows, and its due date counts the customer's payment terms from that day,
as the final invoice's counts them from its issue date.
"""
from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from dataclasses import replace
from datetime import date
from decimal import Decimal

import polars as pl

from transforms.credits.reports import CreditSummary, GrantMovement
from transforms.documents.terms import due_on
from transforms.engine.invoices import USAGE_LINE_KINDS, Invoice

FILE_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""A customer id that may name a file as it is; any other is named by its hash."""


USAGE_ESTIMATES_SCHEMA = {"customer_id": pl.String, "meter": pl.String, "currency": pl.String,
                          "estimated_minor": pl.Int64}


def usage_estimates(drafts: list[Invoice]) -> pl.DataFrame:
    """One row per customer x meter x currency, in that order: what the drafts' usage and
    overage lines bill so far (a night's `usage.parquet`)."""
    estimated: dict[tuple[str, str, str], int] = defaultdict(int)
    for inv in drafts:
        for line in inv.lines:
            if line.kind in USAGE_LINE_KINDS and line.meter:
                estimated[(inv.customer_id, line.meter, inv.currency)] += line.amount_minor
    return pl.DataFrame([(*key, minor) for key, minor in sorted(estimated.items())], schema=USAGE_ESTIMATES_SCHEMA,
                        orient="row")


def draft_id(customer_id: str, period: str, number: int, count: int) -> str:
    """`DRAFT-<customer>-<period>`, with `-<n>` when the customer has several invoices in the
    period (one per subscription, in subscription_id order)."""
    return f"DRAFT-{customer_id}-{period}" + (f"-{number}" if count > 1 else "")


def draft_file_stem(customer_id: str, period: str, number: int, count: int) -> str:
    """The file name (without suffix) of a draft: its id when the customer id is safe in a file
    name, else the id with the customer id's hash in its place (ids never become paths unchecked)."""
    shown = customer_id if FILE_SAFE_ID.match(customer_id) and ".." not in customer_id else \
        "customer-" + hashlib.sha256(customer_id.encode()).hexdigest()[:12]
    return draft_id(shown, period, number, count)


def customer_drafts(invoices: list[Invoice], customer_id: str, day: date, seller: dict,
                    customer: dict | None) -> list[Invoice]:
    """The customer's invoices of the period made drafts as of `day`: numbered as drafts, dated
    `day`, due on `day` + the payment terms (none without terms), recorded by no run."""
    mine = sorted((inv for inv in invoices if inv.customer_id == customer_id), key=lambda inv: inv.subscription_id)
    return [replace(inv, invoice_id=draft_id(customer_id, inv.period, n, len(mine)), issued_on=day,
                    due_on=due_on(day, seller, customer), run_id=None)
            for n, inv in enumerate(mine, start=1)]


def wallet_from_balances(balances: pl.DataFrame, customer_id: str) -> CreditSummary | None:
    """The customer's credit wallet over the period as a night's `credit_balances` table holds
    it (one row per grant), for the draft's credits section: the same movements the close's
    `credit_summaries` gives, read back. None when the customer has no credits."""
    rows = balances.filter(pl.col("customer_id") == customer_id)
    if rows.is_empty():
        return None
    grants = [GrantMovement(r["grant_id"], r["kind"], r["subscription_id"], r["granted_at"], r["expires_at"],
                            r["currency"], Decimal(r["cost_basis"]), Decimal(r["opening"]), Decimal(r["granted"]),
                            Decimal(r["consumed"]), Decimal(r["expired"]), Decimal(r["rolled_over"]))
              for r in rows.iter_rows(named=True)]
    return CreditSummary(customer_id, tuple(sorted(grants, key=lambda g: (g.granted_at, g.grant_id))))
