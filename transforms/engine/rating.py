"""The period engine's rating: one function turns a period's settled usage and its replayed
wallets into the invoices a close issues. The close rates its period with it, and nightly rates
the period so far with it (a draft is what the close would issue if the period ended tonight),
backfill and simulate through the close's steps; none keeps rating of its own.

Pure: no IO, no clock. `reference` is the period's checked reference data (`flows.steps.CheckedReference`:
customers, subscriptions, segments, purchases, adjustments, seller block, tax rules).
"""
from __future__ import annotations

from dataclasses import replace

import polars as pl

from transforms.collector import cycle_collector_paused
from transforms.credits.events import credit_meters, per_event_charged
from transforms.credits.lines import credit_lines
from transforms.credits.model import WalletReplay
from transforms.documents.terms import due_on
from transforms.engine.invoices import Invoice, apply_credits, period_invoices, usage_by_segment
from transforms.inputs.adjustments import with_adjustments
from transforms.inputs.reference import subscription_plans
from transforms.periods import Period
from transforms.tax import Party, customer_parties, taxed_invoices


def rated_invoices(period: Period, usage_by_dims: pl.DataFrame, per_event_usage: pl.DataFrame, replay: WalletReplay,
                   reference) -> list[Invoice]:
    """The period's invoices, ready to send: usage by segment x meter x dimensions
    (`usage_by_dims`) and the per-event rows (`per_event_usage`; rows of meters a segment pays
    with credits are left to the wallet, whose `replay` says what credits did not cover), the
    plans' fixed fees, caps and true-ups, credit purchase lines, the period's adjustments, then
    tax and due dates."""
    segments = list(reference.segments)
    with cycle_collector_paused():  # 100k invoices of lines, none of them a cycle
        usage = apply_credits(usage_by_segment(usage_by_dims, per_event_charged(per_event_usage, segments)),
                              replay.billable_units, credit_meters(segments))
        plans = subscription_plans(segments)
        extra = credit_lines(period, replay, list(reference.purchases), list(reference.subscriptions),
                             plans.currency, plans.rounding)
        return invoices_to_send(with_adjustments(period_invoices(period, segments, usage, extra),
                                                 list(reference.adjustments)), reference)


def invoices_to_send(invoices: list[Invoice], reference) -> list[Invoice]:
    """Rated invoices made ready to send: tax lines from the store's tax rules (none without
    them), then each document's due date from the payment terms."""
    segments = list(reference.segments)
    if reference.tax is not None:
        plans = subscription_plans(segments)
        inclusive = frozenset((s.plan.plan.plan, s.plan.plan.version) for s in segments if s.plan.plan.tax_inclusive)
        invoices = taxed_invoices(invoices, reference.tax, Party(reference.tax.country, None,
                                                                 reference.seller.get("tax_id")),
                                  customer_parties(reference.customers), inclusive, plans.plan_version, plans.rounding)
    if reference.seller.get("payment_terms_days") is None and reference.customers["payment_terms_days"].null_count() \
            == reference.customers.height:
        return invoices  # no terms anywhere: no due dates (and no copy of 100k invoices)
    customers = {row["customer_id"]: row for row in reference.customers.iter_rows(named=True)}
    return [replace(inv, due_on=due_on(inv.issued_on, reference.seller, customers.get(inv.customer_id)))
            for inv in invoices]
