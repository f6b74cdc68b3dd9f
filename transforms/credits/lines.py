"""Invoice lines for credits bought in a period: auto top-ups on the subscription that bought
them, purchased packs on the customer's subscription active when bought."""
from __future__ import annotations

from collections import defaultdict

from transforms.credits.model import Purchase, WalletReplay
from transforms.engine.invoices import Line
from transforms.errors import InputError
from transforms.inputs.reference import Subscription
from transforms.money import to_minor
from transforms.periods import Period
from transforms.pricing.base import fmt_units


def credit_lines(period: Period, replay: WalletReplay, purchases: list[Purchase], subs: list[Subscription],
                 currency_of: dict[str, str], rounding_of: dict[str, str]) -> dict[str, list[Line]]:
    """Invoice lines for credits bought in `period`: auto top-ups on the subscription that
    bought them, and purchases on the invoice of the customer's subscription active at
    purchased_at."""
    lines: dict[str, list[Line]] = defaultdict(list)
    for g in sorted(replay.grants.values(), key=lambda g: (g.granted_at, g.grant_id)):
        if g.kind == "top_up" and period.start_at <= g.granted_at < period.end_at:
            # numbered within the period, not timed: a correction that moves a top-up in time
            # is not a different top-up
            number = sum(1 for line in lines[g.subscription_id] if line.kind == "top_up") + 1
            lines[g.subscription_id].append(Line(
                kind="top_up", description=f"Automatic credit top-up #{number}, {fmt_units(g.credits)} credits",
                quantity=g.credits, unit="credits", amount=g.price,
                amount_minor=to_minor(g.price, g.currency, rounding_of[g.subscription_id])))
    for p in sorted(purchases, key=lambda p: (p.purchased_at, p.purchase_id)):
        if not period.start_at <= p.purchased_at < period.end_at:
            continue
        sub = next((s for s in subs if s.customer_id == p.customer_id and s.active_on(p.purchased_at.date())), None)
        if sub is None:
            raise InputError(f"credit_purchases {p.purchase_id}: customer {p.customer_id!r} has no subscription "
                             f"active at {p.purchased_at:%Y-%m-%d} to bill it on")
        if currency_of.get(sub.subscription_id, p.currency) != p.currency:
            raise InputError(f"credit_purchases {p.purchase_id}: currency {p.currency} but subscription "
                             f"{sub.subscription_id} bills in {currency_of[sub.subscription_id]}")
        lines[sub.subscription_id].append(Line(
            kind="credit_purchase", description=f"Credit pack {p.purchase_id}, {fmt_units(p.credits)} credits",
            quantity=p.credits, unit="credits", amount=p.price,
            amount_minor=to_minor(p.price, p.currency, rounding_of.get(sub.subscription_id, "half_up"))))
    return lines
