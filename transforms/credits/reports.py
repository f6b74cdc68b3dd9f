"""What the wallets did in a period, summed for people: per plan, credits granted, consumed and
expired with the breakage (for pricing), and per customer, each grant's movements (for the
invoice and its preview)."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from transforms.credits.ledger import in_period, moves_by_grant
from transforms.credits.model import ZERO, ConsumeRun, WalletReplay
from transforms.money import decimal_text, to_minor
from transforms.periods import Period


def credit_report(replay: WalletReplay, period: Period, plan_of_sub: dict) -> list[dict]:
    """Per plan (or `purchases`): credits granted, consumed, expired in `period`, and the cost of
    what expired (breakage at expiry), so pricing can see whether allocations fit customers' use."""
    totals: dict[str, list[Decimal]] = defaultdict(lambda: [ZERO, ZERO, ZERO, ZERO])
    for e in replay.movements:
        if isinstance(e, ConsumeRun) and not period.start_at <= e.occurred_at[0] < period.end_at:
            continue  # a run lies in one period
        if not isinstance(e, ConsumeRun) and not in_period(e, period):
            continue
        g = replay.grants[e.grant_id]
        plan = plan_of_sub.get(g.subscription_id)
        key = ("purchases" if g.kind == "purchase" or plan is None else f"{plan.plan} v{plan.version}", g.currency)
        acc = totals[key]
        if isinstance(e, ConsumeRun):
            for credits in e.credits:
                acc[1] -= credits
        elif e.kind in ("grant", "purchase", "top_up"):
            acc[0] += e.credits
        elif e.kind == "consume":
            acc[1] -= e.credits
        elif e.kind == "expire":
            acc[2] -= e.credits
            acc[3] -= e.credits * e.cost_basis
    return [{"plan": plan, "currency": currency, "granted": decimal_text(v[0]), "consumed": decimal_text(v[1]),
             "expired": decimal_text(v[2]), "breakage_minor": to_minor(v[3], currency)}
            for (plan, currency), v in sorted(totals.items())]


@dataclass(frozen=True)
class GrantMovement:
    """One grant's credits over a period, as the invoice shows them:
    opening + granted - used - expired - rolled over = closing."""

    grant_id: str
    kind: str                    # grant | purchase | top_up | rollover | opening
    subscription_id: str | None
    granted_at: datetime
    expires_at: datetime | None
    currency: str | None
    cost_basis: Decimal
    opening: Decimal
    granted: Decimal
    used: Decimal
    expired: Decimal
    rolled_over: Decimal

    @property
    def closing(self) -> Decimal:
        return self.opening + self.granted - self.used - self.expired - self.rolled_over


@dataclass(frozen=True)
class CreditSummary:
    """One customer's credit wallet over one period, grant by grant (oldest first). A wallet
    belongs to the customer, not to a subscription: purchased packs serve every subscription."""

    customer_id: str
    grants: tuple[GrantMovement, ...]

    def total(self, column: str) -> Decimal:
        """The wallet's `opening`, `granted`, `used`, `expired`, `rolled_over` or `closing`."""
        return sum((getattr(g, column) for g in self.grants), ZERO)

    def value_minor(self, column: str, currency: str, rounding: str = "half_up") -> int:
        """What the credits of `column` cost when they were bought (credits x cost basis), in
        `currency`; free credits are worth nothing. Rounded once, for display."""
        return to_minor(sum((getattr(g, column) * g.cost_basis for g in self.grants if g.currency == currency),
                            ZERO), currency, rounding)


def credit_summaries(replay: WalletReplay, period: Period) -> dict[str, CreditSummary]:
    """Per customer with credits moving or held in `period`: each grant's opening, granted, used,
    expired, rolled over and closing credits. The same movements as `balances_table`, grouped for
    the invoice; a balance brought forward (`opening` entries of a run started from a close) is
    the grant's opening, not a new grant."""
    moves = moves_by_grant(replay, period)
    by_customer: dict[str, list[GrantMovement]] = defaultdict(list)
    for grant_id, (opening, granted, used, expired, rolled) in moves.items():
        if opening == granted == used == expired == rolled == 0:
            continue
        g = replay.grants[grant_id]
        by_customer[g.customer_id].append(GrantMovement(
            grant_id, g.kind, g.subscription_id, g.granted_at, g.expires_at, g.currency, g.cost_basis,
            opening, granted, used, expired, rolled))
    return {customer: CreditSummary(customer, tuple(sorted(rows, key=lambda m: (m.granted_at, m.grant_id))))
            for customer, rows in sorted(by_customer.items())}
