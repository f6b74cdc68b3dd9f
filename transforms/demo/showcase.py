"""The demo's showcase: a handful of named customers whose month shows one feature each.

The seeded sample (`transforms.demo.synth`) is realistic but small-spending, so on its own a demo
close never crosses a price tier, reaches a hard cap, splits a month between two plan versions
or draws a purchased credit pack, and it has no one-off charge or manual credit.
`showcase(catalog, period)` adds one customer per feature that the catalog can show, drawn from
the catalog itself (never from plan names), two adjustments on them (an onboarding fee, a
goodwill credit), plus a cost file so margins are real. Pure: frames and bytes out, no IO, no clock.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from decimal import ROUND_CEILING, Decimal

import polars as pl

from transforms.inputs.plans import Catalog, Charge, PlanFile
from transforms.layout import ADJUSTMENTS_PREFIX, PURCHASES_PREFIX, USAGE_PREFIX
from transforms.periods import Period

COST_SHARE = Decimal("0.4")  # the demo's cost of goods: 40% of the list price
USAGE_KEY = USAGE_PREFIX + "showcase/events.jsonl"
PURCHASES_KEY = PURCHASES_PREFIX + "purchases.csv"
ADJUSTMENTS_KEY = ADJUSTMENTS_PREFIX + "adjustments.csv"


@dataclass(frozen=True)
class Feature:
    """One showcase customer: who, on what, and what to look for on their invoice."""

    customer_id: str
    name: str
    shows: str


@dataclass(frozen=True)
class Showcase:
    features: tuple[Feature, ...]
    customers: pl.DataFrame       # the contract's customers columns, all strings
    subscriptions: pl.DataFrame   # the contract's subscriptions columns, all strings
    usage: pl.DataFrame           # event_id, customer_id, meter, quantity, timestamp + dimensions
    purchases: pl.DataFrame       # the contract's credit_purchases columns, all strings
    adjustments: pl.DataFrame     # the adjustments input's columns, all strings
    costs: pl.DataFrame           # costs/costs.csv columns, all strings

    @property
    def usage_jsonl(self) -> bytes:
        """The showcase's usage as JSON lines: a dimension an event does not have is left out."""
        lines = (json.dumps({k: v for k, v in row.items() if v is not None}, sort_keys=True)
                 for row in self.usage.iter_rows(named=True))
        return "".join(line + "\n" for line in lines).encode()


def _plans_in_force(catalog: Catalog, day: date) -> list[PlanFile]:
    return [f for plan in sorted({k[0] for k in catalog.files}) if (f := catalog.in_force_on(plan, day))]


def _first_tier_bound(charge: Charge) -> Decimal | None:
    tiers = getattr(charge.price, "tiers", None)
    if charge.price.model != "graduated" or not tiers or tiers[0].up_to is None:
        return None
    return Decimal(tiers[0].up_to)


def _instant(day: date, hour: int) -> str:
    return datetime.combine(day, time(hour), tzinfo=timezone.utc).isoformat().replace("+00:00", "Z")


def _events(customer_id: str, meter: str, units: Decimal, days: list[date], dims: dict[str, str],
            tag: str = "") -> list[dict]:
    """`units` of `meter` spread evenly over `days` (the last event takes the rest)."""
    each = (units / len(days)).to_integral_value(rounding=ROUND_CEILING)
    rows, left = [], units
    for i, day in enumerate(days):
        quantity = min(each, left) if i < len(days) - 1 else left
        left -= quantity
        rows.append({"event_id": f"showcase-{customer_id}-{meter}{tag}-{i + 1:02d}", "customer_id": customer_id,
                     "meter": meter, "quantity": str(quantity), "timestamp": _instant(day, 12), **dims})
    return rows


def _standard_usage_charge(plan: PlanFile) -> Charge | None:
    """A plainly priced, uncredited charge without an allowance: the simplest one to overspend."""
    for charge in plan.plan.charges:
        if charge.price.model == "standard" and not charge.included and not plan.plan.consumes(charge.meter):
            return charge
    return None


def showcase(catalog: Catalog, period: Period) -> Showcase:
    """One customer per feature the catalog can show in `period`, and a cost file."""
    start = period.start
    days = [start + timedelta(days=d) for d in range(0, period.days, 3)]
    plans = _plans_in_force(catalog, start)
    features, customers, subs, usage, purchases, adjustments = [], [], [], [], [], []

    def add(key: str, name: str, shows: str) -> str:
        customer_id = f"cus_showcase_{key}"
        features.append(Feature(customer_id, name, shows))
        customers.append({"customer_id": customer_id, "name": name, "email": f"billing@{key}.example",
                          "address": "1 Demo Street, 94105 San Francisco, US", "country": "US", "region": "CA"})
        return customer_id

    def subscribe(customer_id: str, plan: str, begins: date, ends: date | None = None, hard_cap: str | None = None,
                  suffix: str = "") -> None:
        subs.append({"subscription_id": f"sub_{customer_id.removeprefix('cus_')}{suffix}", "customer_id": customer_id,
                     "plan": plan, "plan_version": None, "start_date": begins.isoformat(),
                     "end_date": ends.isoformat() if ends else None, "budget": None, "hard_cap": hard_cap})

    # A graduated charge used past its first tier: the invoice shows both tiers' steps.
    tiered = next(((p, c, b) for p in plans for c in p.plan.charges if (b := _first_tier_bound(c))
                   and not p.plan.consumes(c.meter)), None)
    if tiered:
        plan, charge, bound = tiered
        customer = add("tiers", "Helix Research Ltd", f"{charge.title} past the first tier of {bound} units")
        subscribe(customer, plan.plan.plan, start - timedelta(days=31))
        dims = {**charge.filter, **{d: "eu-west-1" for d in charge.group_by}}
        usage += _events(customer, charge.meter, bound + bound / 5, days, dims)
        # a one-off charge on the same invoice: an onboarding fee, taxed like the plan
        adjustments.append({"adjustment_id": f"adj_{period}_onboarding", "customer_id": customer,
                            "subscription_id": None, "period": str(period), "description": "Onboarding workshop",
                            "amount": "250.00", "currency": plan.plan.currency,
                            "reason": "signed order form, onboarding package", "taxable": None})
        features[-1] = Feature(customer, features[-1].name, features[-1].shows + "; a one-off onboarding fee")

    # A hard cap reached: usage worth twice the cap; the invoice waives the excess, an alert fires.
    capped = next(((p, c) for p in plans if (c := _standard_usage_charge(p)) and not p.plan.credits), None)
    if capped:
        plan, charge = capped
        cap = Decimal(25)
        customer = add("cap", "Kestrel Bots Inc.", f"a hard cap of {cap} {plan.plan.currency} reached; "
                       f"the excess waived")
        subscribe(customer, plan.plan.plan, start - timedelta(days=31), hard_cap=f"{cap:.2f}")
        price = charge.price
        units = (2 * cap * price.per / price.unit_price).to_integral_value(rounding=ROUND_CEILING)
        usage += _events(customer, charge.meter, units, days, dict(charge.filter))
        # a goodwill credit: a manual credit, contra-revenue in the books
        adjustments.append({"adjustment_id": f"adj_{period}_goodwill", "customer_id": customer,
                            "subscription_id": None, "period": str(period),
                            "description": "Goodwill credit for the API slowdown", "amount": "-10.00",
                            "currency": plan.plan.currency, "reason": "support ticket, approved by finance",
                            "taxable": None})
        features[-1] = Feature(customer, features[-1].name, features[-1].shows + "; a goodwill credit")

    # A plan version that takes effect inside the period: the month splits into two subscriptions.
    newer = next((f for plan in sorted({k[0] for k in catalog.files}) for f in catalog.versions(plan)
                  if start < f.plan.effective_from < period.end and not f.plan.credits
                  and (old := catalog.in_force_on(plan, start)) and old.plan.version < f.plan.version
                  and _standard_usage_charge(f)), None)
    if newer:
        charge = _standard_usage_charge(newer)
        switch = newer.plan.effective_from
        customer = add("versions", "Marlow Translate GmbH",
                       f"{newer.plan.plan} v{newer.plan.version} from {switch}: the month split between versions")
        subscribe(customer, newer.plan.plan, start - timedelta(days=31), ends=switch, suffix="_a")
        subscribe(customer, newer.plan.plan, switch, suffix="_b")
        units = charge.price.per * 4
        usage += _events(customer, charge.meter, units, [d for d in days if d < switch], dict(charge.filter))
        usage += _events(customer, charge.meter, units, [d for d in days if d >= switch], dict(charge.filter),
                         tag=f"-v{newer.plan.version}")

    # A credit pack bought outside the plan, drawn after the plan's own grant runs out.
    credited = next((p for p in plans if p.plan.credits and p.plan.credits.unit == "credits"
                     and p.plan.credits.grants), None)
    if credited:
        meter = sorted(credited.plan.credits.consume)[0]
        rate = credited.plan.credits.consume[meter]
        granted = sum((g.credits for g in credited.plan.credits.grants), Decimal(0))
        pack, bought = Decimal(500), start + timedelta(days=2)
        customer = add("credits", "Saffron Pixel Studio", f"a {pack}-credit pack bought on {bought}, drawn after "
                       f"the monthly grant")
        subscribe(customer, credited.plan.plan, start - timedelta(days=31))
        purchases.append({"purchase_id": "pur_showcase_0001", "customer_id": customer, "credits": str(pack),
                          "price": "15.00", "currency": credited.plan.currency,
                          "purchased_at": _instant(bought, 9), "expires_at": None})
        units = ((granted + pack / 2) / rate).to_integral_value(rounding=ROUND_CEILING)
        usage += _events(customer, meter, units, [d for d in days if d > bought], {})

    return Showcase(
        features=tuple(features),
        customers=_strings(customers, ["customer_id", "name", "email", "address"]),
        subscriptions=_strings(subs, ["subscription_id", "customer_id", "plan", "plan_version", "start_date",
                                      "end_date", "budget", "hard_cap"]),
        usage=_strings(usage, ["event_id", "customer_id", "meter", "quantity", "timestamp"]),
        purchases=_strings(purchases, ["purchase_id", "customer_id", "credits", "price", "currency",
                                       "purchased_at", "expires_at"]),
        adjustments=_strings(adjustments, ["adjustment_id", "customer_id", "subscription_id", "period", "description",
                                           "amount", "currency", "reason", "taxable"]),
        costs=demo_costs(catalog),
    )


def demo_costs(catalog: Catalog) -> pl.DataFrame:
    """costs/costs.csv for the catalog: each priced meter (and filter) costs COST_SHARE of its first
    list price, in force from the earliest plan version; percentage fees have no unit cost."""
    rows: dict[tuple, dict] = {}
    for _, f in sorted(catalog.files.items()):
        for charge in f.plan.charges:
            price = charge.price
            if price.model == "standard":
                unit, per = price.unit_price, price.per
            elif price.model in ("graduated", "volume"):
                unit, per = price.tiers[0].unit_price, price.per
            elif price.model == "package":
                unit, per = price.package_price, Decimal(price.package_size)
            else:
                continue
            cost = (unit * COST_SHARE).normalize()
            if cost <= 0:
                continue
            key = (charge.meter, json.dumps(charge.filter, sort_keys=True) if charge.filter else "", f.plan.currency)
            if any(_could_both_cost(charge.filter, json.loads(k[1] or "{}")) and k[1] != key[1]
                   for k in rows if k[0] == key[0] and k[2] == key[2]):
                continue  # the cost file's rule: one event is costed by one row at most
            rows.setdefault(key, {"meter": key[0], "filter": key[1], "unit_cost": f"{cost:f}",
                                  "per": "" if per == 1 else f"{per:f}", "currency": key[2],
                                  "effective_from": min(v.plan.effective_from for v in catalog.versions(f.plan.plan))
                                  .isoformat()})
    return _strings(list(rows.values()), ["meter", "filter", "unit_cost", "per", "currency", "effective_from"])


def _could_both_cost(one: dict[str, str], other: dict[str, str]) -> bool:
    return all(one[k] == other[k] for k in set(one) & set(other))


def _strings(rows: list[dict], first: list[str]) -> pl.DataFrame:
    columns = first + sorted({k for row in rows for k in row} - set(first))
    return pl.DataFrame([{c: row.get(c) for c in columns} for row in rows],
                        schema={c: pl.String for c in columns}, orient="row")
