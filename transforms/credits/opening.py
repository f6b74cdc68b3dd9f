"""Opening balances: a period's wallets started from the previous close's credit_balances
instead of a replay of every earlier period. The closing balances of one period are the opening
of the next, so both starts give the same wallets."""
from __future__ import annotations

from decimal import Decimal

import polars as pl

from transforms.credits.grants import plan_grants, purchase_grants
from transforms.credits.model import ZERO, Grant, Purchase
from transforms.inputs.plans import Catalog
from transforms.inputs.reference import Subscription
from transforms.periods import Period


def grants_from_balances(balances: pl.DataFrame) -> list[Grant]:
    """Grants still holding credits at the end of a closed period (its credit_balances), ready to
    open the next period's wallets."""
    out = []
    for row in balances.iter_rows(named=True):
        closing = Decimal(row["closing"])
        if closing > 0:
            g = Grant(row["grant_id"], row["customer_id"], row["subscription_id"], row["kind"], row["granted_at"],
                      row["expires_at"], Decimal(row["credits"]), Decimal(row["price"]), row["currency"])
            out.append(g)
            g.opening = closing  # type: ignore[attr-defined]
    return out


def opening_grants(opening: list[Grant], subs: list[Subscription], catalog: Catalog, purchases: list[Purchase],
                   period: Period) -> list[Grant]:
    """What wallets of `period` start from instead of a replay of all history: the previous
    close's closing grants (`opening`), entering at the period start with their remaining credits
    as grants of kind `opening` (a balance brought forward, never billed again), then the
    period's plan grants and purchases."""
    fresh = [g for g in plan_grants(subs, catalog, period) + purchase_grants(purchases)
             if period.start_at <= g.granted_at < period.end_at]
    carried = [Grant(g.grant_id, g.customer_id, g.subscription_id, "opening", period.start_at, g.expires_at,
                     g.opening, g.price * g.opening / g.credits if g.price else ZERO, g.currency)
               for g in opening]
    return carried + fresh
