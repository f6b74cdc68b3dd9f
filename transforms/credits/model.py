"""The credit wallet's data: what goes in (purchases, credit events, grants) and what a replay
gives back (`WalletReplay`: its ledger movements and what billing, revenue and alerts read).

A grant is usable on [granted_at, expires_at); every movement is a ledger entry with the
customer's total balance after it, and credits are conserved: granted = consumed + expired +
balance.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

ZERO = Decimal(0)


@dataclass(frozen=True)
class Purchase:
    """A credit pack bought outside the plan (credit_purchases input)."""

    purchase_id: str
    customer_id: str
    credits: Decimal
    price: Decimal
    currency: str
    purchased_at: datetime
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class CreditEvent:
    """A billed usage event of a meter its plan pays with credits."""

    customer_id: str
    subscription_id: str
    segment_no: int | None  # None for events of earlier periods (only their effect on balances matters)
    event_id: str
    event_at: datetime
    meter: str
    dims: str
    quantity: Decimal


@dataclass
class Grant:
    grant_id: str
    customer_id: str
    subscription_id: str | None
    kind: str                    # grant | purchase | top_up | rollover
    granted_at: datetime
    expires_at: datetime | None
    credits: Decimal
    price: Decimal               # what was paid for these credits (0 when free)
    currency: str | None
    remaining: Decimal = ZERO
    rollover_max: Decimal = ZERO

    @property
    def cost_basis(self) -> Decimal:
        return self.price / self.credits if self.price else ZERO


@dataclass(frozen=True, slots=True)
class Entry:
    customer_id: str
    grant_id: str
    kind: str                    # grant | purchase | top_up | consume | expire | rollover
    credits: Decimal             # signed
    balance_after: Decimal
    occurred_at: datetime
    expires_at: datetime | None
    cost_basis: Decimal
    subscription_id: str | None = None
    event_id: str | None = None
    meter: str | None = None


@dataclass(slots=True)
class ConsumeRun:
    """Consecutive `consume` entries of one customer drawn from one grant, as columns: a stretch
    of events that each drew only from `grant_id` and left it holding credits (see
    wallet.Wallet.consume_events). Entry k of the run is the consume Entry of event k; all of a
    run's events fall in one period, so a run is in a period or not as a whole."""

    customer_id: str
    grant_id: str
    expires_at: datetime | None
    cost_basis: Decimal
    subscription_id: str | None
    event_ids: list[str]
    meters: list[str]
    occurred_at: list[datetime]
    credits: list[Decimal]        # signed (negative), one per event
    balance_after: list[Decimal]

    kind = "consume"

    def __len__(self) -> int:
        return len(self.credits)

    def entries(self) -> list[Entry]:
        """The run as Entry objects (tests and small readers; the tables read the columns)."""
        return [Entry(self.customer_id, self.grant_id, "consume", c, b, at, self.expires_at, self.cost_basis,
                      self.subscription_id, event_id, meter)
                for c, b, at, event_id, meter in zip(self.credits, self.balance_after, self.occurred_at,
                                                     self.event_ids, self.meters, strict=True)]


Movement = Entry | ConsumeRun
"""A ledger movement as a replay keeps it: one entry, or a run of consume entries as columns."""


@dataclass
class WalletReplay:
    """What a wallet replay gives back: its ledger movements (entries and runs of consume
    entries, in replay order), and what they mean for billing, revenue and alerts."""

    movements: list[Movement] = field(default_factory=list)
    # per (subscription_id, segment_no, meter, dims): units left for the charges (uncovered, or
    # covered by grace) and units blocked (not billed)
    billable_units: dict[tuple, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    # the same by UTC day of the event (key + (day,)), for spend replayed in event time
    billable_by_day: dict[tuple, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    blocked_units: dict[tuple, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    grants: dict[str, Grant] = field(default_factory=dict)
    alerts: list[tuple] = field(default_factory=list)  # (customer, subscription, kind, threshold, value, at)

    @property
    def entries(self) -> list[Entry]:
        """Every ledger entry in replay order, runs spelled out one Entry per event (for tests and
        readers of a few wallets; the published tables read `movements`)."""
        out: list[Entry] = []
        for m in self.movements:
            if isinstance(m, ConsumeRun):
                out.extend(m.entries())
            else:
                out.append(m)
        return out

    @entries.setter
    def entries(self, entries: list[Entry]) -> None:
        self.movements = list(entries)

    def entry_count(self) -> int:
        """How many ledger entries the movements hold."""
        return sum(len(m) if isinstance(m, ConsumeRun) else 1 for m in self.movements)

