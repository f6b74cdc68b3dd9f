"""Fixed documents for the rendering tests: one month of a customer on a plan with every kind of
invoice line (a fee, tokens by model, graduated tiers, an allowance, credits with an automatic
top-up, a hard cap) rated by the real transforms, a correction note of it, and its credit wallet.
Everything is built from literals, so the same code gives the same bytes (and pixels)."""
from __future__ import annotations

import json
import textwrap
from dataclasses import replace
from datetime import date, datetime, timezone
from decimal import Decimal

from transforms.credits.events import credit_meters
from transforms.credits.grants import history_grants
from transforms.credits.lines import credit_lines
from transforms.credits.model import CreditEvent, WalletReplay
from transforms.credits.replay import replayed_wallets
from transforms.credits.reports import CreditSummary, credit_summaries
from transforms.engine.invoices import Invoice, SegmentUsage, apply_credits, period_invoices
from transforms.finance.corrections import Issued, correction_documents
from transforms.inputs.plans import Catalog, parse_plan
from transforms.inputs.reference import Segment, Subscription
from transforms.periods import Period

OCT = Period(2026, 10)
RUN_ID = "close-2026-10-0123456789ab"
SELLER = {"name": "Lumen AI, Inc.", "address": "500 Howard Street, San Francisco, CA 94105, US",
          "email": "billing@lumen-ai.example", "tax_id": "US 98-7654321"}
CUSTOMER = {"customer_id": "c1", "name": "Acme Analytics Inc.", "email": "ap@acme.example",
            "address": "1 Market St, San Francisco, CA 94105", "tax_id": "US 12-3456789"}

PLAN = parse_plan(textwrap.dedent("""\
    plan: pro
    version: 2
    effective_from: 2026-01-01
    currency: USD
    fixed_fees:
      - {name: Pro plan, amount: "49.00"}
    charges:
      - name: Input tokens
        meter: input_tokens
        group_by: [model]
        price: {model: standard, unit_price: "2.50", per: 1000000}
      - name: Output tokens
        meter: output_tokens
        price:
          model: graduated
          per: 1000000
          tiers:
            - {up_to: 10000000, unit_price: "10.00"}
            - {up_to: null, unit_price: "8.00"}
      - name: API calls
        meter: api_calls
        included: 10000
        price: {model: package, package_size: 1000, package_price: "0.50"}
      - name: Images beyond credits
        meter: images
        price: {model: standard, unit_price: "0.04"}
    credits:
      grants:
        - {credits: 500, every: period, expires: period_end}
      consume: {images: 1}
      top_up: {credits: 250, price: "8.00", auto: true, below: 20, max_per_period: 1}
      when_exhausted: overage
    spend_controls:
      hard_cap: "300.00"
    """), "plans/pro-v2.yaml")
SUB = Subscription("sub_1", "c1", "pro", None, date(2026, 1, 1), None, None, None, 1)
SEGMENT = Segment(SUB, 1, PLAN, OCT.start_at, OCT.end_at, OCT)


def _at(day: int, hour: int = 12) -> datetime:
    return datetime(2026, 10, day, hour, tzinfo=timezone.utc)


# 900 images in three batches: 500 from the monthly grant, 250 from one automatic top-up, and
# the last 150 (less the 20-credit buffer kept) billed as overage.
IMAGES = [("img-1", _at(3), Decimal(400)), ("img-2", _at(12), Decimal(300)), ("img-3", _at(27), Decimal(200))]


def _usage(mini_tokens: int) -> dict[tuple[str, int], SegmentUsage]:
    rows = (("input_tokens", json.dumps({"model": "gpt-4o"}), Decimal(18_400_000), 420),
            ("input_tokens", json.dumps({"model": "gpt-4o-mini"}), Decimal(mini_tokens), 1310),
            ("output_tokens", json.dumps({"model": "gpt-4o"}), Decimal(14_250_000), 420),
            ("api_calls", "{}", Decimal(12_345), 12_345),
            ("images", "{}", sum(q for _, _, q in IMAGES), len(IMAGES)))
    return {("sub_1", 1): SegmentUsage(rows)}


def wallet() -> WalletReplay:
    events = [CreditEvent("c1", "sub_1", 1, event_id, at, "images", "{}", quantity)
              for event_id, at, quantity in IMAGES]
    plans = Catalog.from_files([PLAN])
    return replayed_wallets(history_grants([SUB], plans, [], OCT), [SUB], plans, events, OCT)


def sample_invoice(mini_tokens: int = 52_000_000) -> Invoice:
    """INV-2026-10-000001, rated as the close rates it."""
    replay = wallet()
    usage = apply_credits(_usage(mini_tokens), replay.billable_units, credit_meters([SEGMENT]))
    extra = credit_lines(OCT, replay, [], [SUB], {"sub_1": "USD"}, {"sub_1": "half_up"})
    [invoice] = period_invoices(OCT, [SEGMENT], usage, extra)
    return replace(invoice, run_id=RUN_ID)


def sample_credits() -> CreditSummary:
    return credit_summaries(wallet(), OCT)["c1"]


def sample_credit_note() -> Invoice:
    """CN-2026-10-000001: gpt-4o-mini tokens had been counted twice. Without them usage falls
    under the hard cap, so the note credits the tokens and takes back the cap's waiver."""
    invoice = sample_invoice()
    issued = {"sub_1": {(line.kind, line.description): Issued(line.quantity, line.amount_minor, line.meter, line.unit)
                        for line in invoice.lines}}
    [note] = correction_documents("2026-10", [sample_invoice(mini_tokens=26_000_000)], issued,
                                  {"sub_1": {"invoice_id": invoice.invoice_id}}, {"credit_note": 1, "debit_note": 1},
                                  date(2026, 12, 5))
    return replace(note, run_id="backfill-20261205-0123456789ab",
                   reason="gpt-4o-mini input tokens of Oct 14-15 were counted twice")
