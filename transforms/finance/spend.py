"""Spend alerts, replayed in event time: the day a subscription's spend reached each threshold.

Spend is the period's usage charges so far (usage and overage lines, before any hard cap, after
credits): what a customer is about to be billed for what they used. Thresholds are fractions of
the budget (subscription override, else the plan's `spend_controls.budget`); without a budget,
usage plans alert at DEFAULT_AMOUNTS of their currency. `hard_cap_reached` fires on the day spend
reaches the cap. The close and the nightly runs call the same function on the same days, so they
fire the same alerts; an alert is identified by (customer, period, kind, threshold).

Only subscriptions whose whole-period spend reaches their lowest threshold are replayed, all of
them at once in columns (`spend_by_day`): each line's units, events and per-event fees are summed
through each day in Polars, priced with the charge models' arithmetic in exact integers and
rounded as the invoice rounds them, and a threshold's day is the first whose spend reaches it.
Python only turns each plan's charges into integer terms and builds the alerts that fire. A
hypothesis property holds the column path to the models' own `rate` on random plans and usage.

A subscription the column path leaves out (meters paid with credits, whose units are the wallet's
Decimal division; negative usage; a price or amount past what the integers hold exactly; an
allowance drawn by several lines) is rated day by day: its per-day usage summed cumulatively in
Polars, and when every price can only grow with its units, the day a threshold was crossed found
by bisection.
"""
from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal

import polars as pl

from transforms.collector import cycle_collector_paused
from transforms.engine.invoices import Invoice, SegmentUsage, charge_lines, groups_by_dims, usage_spend_minor
from transforms.finance.alerts import Alert
from transforms.inputs.reference import Segment, segments_by_subscription, subscription_plans
from transforms.money import decimal_text, from_minor, minor_exponent, to_minor, to_minor_column
from transforms.periods import Period

DEFAULT_AMOUNTS = (Decimal(100), Decimal(1000), Decimal(10000))
"""Alerts for a usage plan with no budget: when spend reaches 100, 1,000 and 10,000 of its currency."""

ZERO = Decimal(0)

MONOTONE_MODELS = frozenset({"standard", "package", "graduated", "graduated_percentage", "percentage"})
"""Charge models whose amount never falls as units or events are added (prices are checked
non-negative on load). Volume is not one: crossing a bound reprices every unit, lower."""

USAGE_KEY = ["subscription_id", "segment_no", "meter", "dims"]


def thresholds(segment: Segment) -> list[tuple[str, Decimal, str]]:
    """(kind, amount, label) to watch for the subscription of `segment`, on its plan's terms."""
    plan = segment.plan.plan
    sub = segment.subscription
    controls = plan.spend_controls
    budget = sub.budget if sub.budget is not None else (controls.budget if controls else None)
    out = []
    if budget is not None:
        fractions = controls.alerts if controls else [Decimal("0.5"), Decimal("0.8"), Decimal("1.0")]
        out += [("spend_threshold", budget * f, f"{decimal_text(f * 100)}% of budget {budget}") for f in fractions]
    elif plan.charges:
        out += [("spend_threshold", amount, f"{amount} {plan.currency}") for amount in DEFAULT_AMOUNTS]
    cap = sub.hard_cap if sub.hard_cap is not None else (controls.hard_cap if controls else None)
    if cap is not None:
        out.append(("hard_cap_reached", cap, f"hard cap {cap}"))
    return out


def usage_spend_by_subscription(invoices: list[Invoice]) -> dict[str, int]:
    """Each subscription's usage spend over its invoice (one per subscription): the whole
    period's spend that `spend_alerts` starts from."""
    return {inv.subscription_id: inv.usage_spend_minor for inv in invoices}


def subscriptions_over_budget(invoices: list[Invoice], segments: list[Segment], fraction: str = "0.8") -> list[dict]:
    """One row per subscription whose usage spend so far is at or above `fraction` of its budget
    (subscription override, else the plan's `spend_controls.budget` of its last segment)."""
    last = subscription_plans(segments).last_segment
    out = []
    for inv in invoices:
        seg = last[inv.subscription_id]
        budgets = [amount for kind, amount, label in thresholds(seg) if kind == "spend_threshold" and "budget" in label]
        controls = seg.plan.plan.spend_controls
        budget = seg.subscription.budget or (controls.budget if controls else None)
        if budget is None or not budgets:
            continue
        spend = inv.usage_spend_minor
        if spend >= to_minor(budget * Decimal(fraction), inv.currency):
            out.append({"customer_id": inv.customer_id, "subscription_id": inv.subscription_id,
                        "spend_minor": spend, "budget_minor": to_minor(budget, inv.currency),
                        "currency": inv.currency})
    return out


_WATCHED: dict[tuple, tuple] = {}
"""What watched_thresholds gives, by (plan, budget, hard cap), the only things it depends on: a
close asks for 100k subscriptions' thresholds, and most share a few plans and no overrides."""


def watched_thresholds(segs: list[Segment]) -> list[tuple[str, int, str]]:
    """The subscription's thresholds in minor units, lowest first (ties keep their order)."""
    plan, sub = segs[-1].plan.plan, segs[-1].subscription
    key = (id(plan), str(sub.budget), str(sub.hard_cap))  # as text: labels print 10.0 and 10 apart
    known = _WATCHED.get(key)
    if known is None or known[0] is not plan:  # the plan object itself is held, so its id stays its own
        if len(_WATCHED) > 4096:
            _WATCHED.clear()
        currency, rounding = plan.currency, plan.rounding
        known = _WATCHED[key] = (plan, sorted(
            ((kind, to_minor(amount, currency, rounding), label) for kind, amount, label in thresholds(segs[-1])),
            key=lambda w: w[1]))
    return list(known[1])  # a copy: the caller pops from it


def _may_alert(segs: list[Segment], final_minor: int) -> bool:
    """Whether the subscription can fire a spend alert: spend only ever reaches a threshold if
    the period's whole spend reaches its lowest."""
    watch = watched_thresholds(segs)
    return bool(watch) and final_minor >= watch[0][1]


def _monotone(segs: list[Segment]) -> bool:
    """Whether spend through a day can only grow with the day: every charge of every segment
    is priced by a model whose amount never falls as usage is added (allowances only move
    units from free to billable, and rounding keeps order)."""
    return all(charge.price.model in MONOTONE_MODELS for seg in segs for charge in seg.plan.plan.charges)


@dataclass
class _SubscriptionUsage:
    """One subscription's usage as rating a day reads it, per segment: for each (meter, dims),
    its days with usage and the units and events summed through each of them (units after
    credits for meters paid with credits); and per meter priced event by event, its events
    (day, dims, quantity) in the order of the per-event table, with their last day and
    distinct dims. The events stay a Polars frame: rating a day takes those up to it as a
    column (as the invoice rates them), never a Python object per event."""

    by_key: dict[int, dict[tuple[str, str], tuple[list, list, list]]] = field(
        default_factory=lambda: defaultdict(dict))
    per_event: dict[int, list[tuple[str, pl.DataFrame, date, tuple[str, ...]]]] = field(
        default_factory=lambda: defaultdict(list))

    def segment_usage(self, segment_no: int, through: date) -> SegmentUsage:
        rows = []
        for (meter, dims), (days, units, events) in sorted(self.by_key.get(segment_no, {}).items()):
            i = bisect_right(days, through)
            if i:
                rows.append((meter, dims, units[i - 1], events[i - 1]))
        per_event = []
        for meter, events, last_day, dims in self.per_event.get(segment_no, ()):
            if last_day > through:  # the meter's events up to `through` only, in table order
                events = events.filter(pl.col("day") <= through)
                dims = tuple(events["dims"].unique(maintain_order=True))
            if events.height:
                per_event.append((meter, dims, events))
        return SegmentUsage(tuple(rows), tuple(per_event))


def spend_to_date_minor(segments: list[Segment], usage: _SubscriptionUsage, through: date) -> int:
    """Usage charges of the subscription for its usage up to and including `through`."""
    allowance_used: dict[tuple, Decimal] = {}
    return sum(usage_spend_minor(charge_lines(seg, usage.segment_usage(seg.segment_no, through), "", allowance_used))
               for seg in segments)


def usage_from(usage_by_day: pl.DataFrame, per_event_usage: pl.DataFrame, since: dict[str, date],
               billable_by_day: dict[tuple, Decimal], credit_meters: set[tuple[str, int, str]]
               ) -> dict[str, _SubscriptionUsage]:
    """The usage of the subscriptions of `since`, for rating any day on or after their day in
    `since`: units and events are summed per (segment, meter, dims) through each day in Polars,
    and of the days before `since` only each key's last is kept (it carries the sums so far).

    Units of meters paid with credits are the units the wallet left (`billable_by_day`, which
    the wallet replay computed with Decimal division): they are summed here in Python, in day
    order, as rating them one day at a time would."""
    usage: dict[str, _SubscriptionUsage] = defaultdict(_SubscriptionUsage)
    if not since:
        return usage
    sub_dtype = usage_by_day.schema["segment_no"]
    starts = pl.DataFrame({"subscription_id": list(since), "_from": list(since.values())},
                          schema={"subscription_id": pl.String, "_from": pl.Date})
    paid_with_credits = pl.DataFrame(sorted(credit_meters), orient="row",
                                     schema={"subscription_id": pl.String, "segment_no": sub_dtype,
                                             "meter": pl.String}).with_columns(pl.lit(True).alias("_credits"))
    rows = (usage_by_day.lazy().select(*USAGE_KEY, "day", "units", "events")
            .join(starts.lazy(), on="subscription_id")
            .join(paid_with_credits.lazy(), on=["subscription_id", "segment_no", "meter"], how="left")
            .with_columns(pl.col("_credits").fill_null(False))
            .sort(*USAGE_KEY, "day")
            .with_columns(pl.col("units").cum_sum().over(USAGE_KEY).alias("units_so_far"),
                          pl.col("events").cum_sum().over(USAGE_KEY).alias("events_so_far"),
                          pl.col("day").shift(-1).over(USAGE_KEY).alias("_next"))
            .filter(pl.col("_credits") | (pl.col("day") >= pl.col("_from")) | pl.col("_next").is_null()
                    | (pl.col("_next") >= pl.col("_from")))
            .collect())
    for sub, seg, meter, dims, day, so_far, events in rows.filter(~pl.col("_credits")).select(
            *USAGE_KEY, "day", "units_so_far", "events_so_far").iter_rows():
        days, units, counts = usage[sub].by_key[seg].setdefault((meter, dims), ([], [], []))
        days.append(day)
        units.append(so_far)
        counts.append(events)
    for sub, seg, meter, dims, day, events in rows.filter(pl.col("_credits")).select(
            *USAGE_KEY, "day", "events_so_far").iter_rows():
        days, units, counts = usage[sub].by_key[seg].setdefault((meter, dims), ([], [], []))
        days.append(day)
        units.append((units[-1] if units else ZERO) + billable_by_day.get((sub, seg, meter, dims, day), ZERO))
        counts.append(events)
    keys = ["subscription_id", "segment_no", "meter"]
    events_of = (per_event_usage.lazy()
                 .select(*keys, "dims", "quantity", pl.col("event_at").dt.date().alias("day"))
                 .join(starts.lazy().select("subscription_id"), on="subscription_id", how="semi",
                       maintain_order="left")
                 .join(paid_with_credits.lazy(), on=["subscription_id", "segment_no", "meter"], how="anti",
                       maintain_order="left")
                 .sort(keys, maintain_order=True)  # each meter's events together, in table order
                 .collect())
    groups = events_of.group_by(keys, maintain_order=True).agg(
        pl.len(), pl.col("day").max(), pl.col("dims").unique(maintain_order=True))
    narrow = events_of.select("day", "dims", "quantity")  # sliced per meter: a slice is a view
    offset = 0
    for sub, seg, meter, count, last_day, dims in groups.iter_rows():
        usage[sub].per_event[seg].append((meter, narrow.slice(offset, count), last_day, tuple(dims)))
        offset += count
    return usage


def _days_with_usage(usage_by_day: pl.DataFrame, subs: list[str]) -> dict[str, list[date]]:
    """Each subscription's days with usage, in order."""
    return {sub: days for sub, days in usage_by_day.lazy()
            .filter(pl.col("subscription_id").is_in(pl.Series(subs, dtype=pl.String).implode()))
            .group_by("subscription_id").agg(pl.col("day").unique().sort())
            .collect().iter_rows()}


def _with_negative_usage(usage_by_day: pl.DataFrame, per_event_usage: pl.DataFrame) -> set[str]:
    """Subscriptions with a negative quantity somewhere (the usage check quarantines them, but a
    spend that can fall from one day to the next must be walked, not bisected)."""
    return (set(usage_by_day.filter(pl.col("units") < 0)["subscription_id"].to_list())
            | set(per_event_usage.filter(pl.col("quantity") < 0)["subscription_id"].to_list()))


# The column path: every subscription's spend through each of its days at once ---------------------

EXACT_LIMIT = 10**27
"""Python's decimal context keeps 28 digits: while every amount of a line, counted in the finest
unit its prices and units are written in, stays below this, the charge model's own arithmetic is
exact, and integers in that unit give its amounts to the last digit."""

PRICE_LIMIT = 10**11
"""The largest unit price or rate (an integer at its charge's scale) the column path takes: times
units below EXACT_LIMIT (in billionths), a product stays inside Int128 (fees, bounds and counts
are only added, or multiplied by a count of events)."""

NANO = 9
"""The scale of the usage tables' units and quantities (Decimal(38, 9)): here they are integers
of billionths."""

LINE = ["subscription_id", "segment_no", "charge_no", "group"]
"""A line of the invoice: one charge (one group of it) of one segment."""

TERMS_SCHEMA = {"plan_no": pl.Int32, "charge_no": pl.Int32, "kind": pl.String, "tier": pl.Int32,
                "above": pl.Int128, "up_to": pl.Int128, "coef": pl.Int128, "flat": pl.Int128,
                "size": pl.Int128, "fixed": pl.Int128, "min_fee": pl.Int128, "max_fee": pl.Int128,
                "free": pl.Int64, "included": pl.Int128, "div": pl.Int128, "half_even": pl.Boolean}


def _scale(value: Decimal) -> int:
    """Digits after the point as `value` is written (0 for 5 and for 1E+6, 2 for 1.80)."""
    return max(-value.as_tuple().exponent, 0)


def _scaled(value: Decimal | None, scale: int) -> int | None:
    """`value` counted in 10^-scale (exact: `scale` is at least `_scale(value)`)."""
    return None if value is None else int(value.scaleb(scale))


def _power_of_ten(per: Decimal) -> int | None:
    """k when `per` is 10^k: dividing by it only moves the point, so the model stays exact."""
    digits = per.normalize().as_tuple()
    return digits.exponent if digits.digits == (1,) else None


def _charge_terms(charge, currency: str, rounding: str) -> list[dict] | None:
    """The charge as integers (one row per tier, see TERMS_SCHEMA), counted in 10^-scale for the
    finest scale its model computes at, or None when the column path does not price it (a `per`
    that is not a power of ten, a bound finer than the units, a constant past the limits, an
    allowance on prices per event) and its subscriptions are rated day by day as before.

    kind `graduated` (standard: one open tier; graduated_percentage: a percent is per 100) fills
    tiers; `volume` prices all units at the tier they land in; `package` counts started
    packages; `percentage` is the rate of the units plus a fee per event; `per_event` is a
    percentage whose free events or fee bounds need each event's amount."""
    price, minor = charge.price, minor_exponent(currency)
    model = price.model
    if _scale(charge.included) > NANO:
        return None
    base = {"tier": 0, "above": 0, "up_to": None, "flat": 0, "size": None, "fixed": None, "min_fee": None,
            "max_fee": None, "free": 0, "included": _scaled(charge.included, NANO)}
    if model in ("standard", "graduated", "volume", "graduated_percentage"):
        if model == "standard":
            tiers = [(None, price.unit_price, ZERO)]
        elif model == "graduated_percentage":
            tiers = [(t.up_to, t.rate, t.flat_fee) for t in price.tiers]
        else:
            tiers = [(t.up_to, t.unit_price, t.flat_fee) for t in price.tiers]
        shift = 2 if model == "graduated_percentage" else _power_of_ten(price.per)
        if shift is None or any(up_to is not None and _scale(up_to) > NANO for up_to, _, _ in tiers):
            return None
        scale = max([minor] + [max(NANO + _scale(p) + shift, _scale(f)) for _, p, f in tiers])
        rows, above = [], 0
        for number, (up_to, unit_price, flat) in enumerate(tiers):
            top = _scaled(up_to, NANO)
            rows.append({**base, "kind": "volume" if model == "volume" else "graduated", "tier": number,
                         "above": above, "up_to": top, "coef": _scaled(unit_price, scale - NANO - shift),
                         "flat": _scaled(flat, scale), "scale": scale})
            above = top
    elif model == "package":
        if _scale(price.package_size) > NANO:
            return None
        scale = max(minor, _scale(price.package_price))
        rows = [{**base, "kind": "package", "size": _scaled(price.package_size, NANO),
                 "coef": _scaled(price.package_price, scale), "scale": scale}]
    elif model == "percentage":
        if price.prices_each_event and charge.included:
            return None
        fees = [price.fixed_fee, price.min_fee, price.max_fee]
        scale = max([minor, NANO + _scale(price.rate) + 2] + [_scale(f) for f in fees if f is not None])
        rows = [{**base, "kind": "per_event" if price.prices_each_event else "percentage",
                 "coef": _scaled(price.rate, scale - NANO - 2), "fixed": _scaled(price.fixed_fee, scale),
                 "min_fee": _scaled(price.min_fee, scale), "max_fee": _scaled(price.max_fee, scale),
                 "free": price.free_events, "scale": scale}]
    else:
        return None
    added = [r[k] for r in rows for k in ("flat", "fixed", "min_fee", "max_fee", "above", "up_to", "size", "included")
             if r[k] is not None]
    if any(r["coef"] >= PRICE_LIMIT for r in rows) or any(v >= EXACT_LIMIT for v in added):
        return None
    for row in rows:
        row["div"], row["half_even"] = 10 ** (row.pop("scale") - minor), rounding == "half_even"
    return rows


def _pooled_alone(segs: list[Segment]) -> bool:
    """Whether each allowance of the subscription is drawn by one line only: a single segment,
    whose charges with `included` (never grouped) share their meter and filter with no other
    charge. Then the line's allowance is simply its first `included` units; a pool drawn in turn
    by several lines or segments is left to the day-by-day rating."""
    charges = segs[0].plan.plan.charges
    pooled = [(c.meter, tuple(sorted(c.filter.items()))) for c in charges if c.included > 0]
    if not pooled:
        return True
    every = [(c.meter, tuple(sorted(c.filter.items()))) for c in charges]
    return len(segs) == 1 and all(every.count(pool) == 1 for pool in pooled)


@dataclass
class _ColumnPlans:
    """The plans of the subscriptions the column path prices, as frames: `terms` (TERMS_SCHEMA,
    one row per plan x charge x tier), `plan_of` (subscription_id, segment_no -> plan_no) and
    `groups` ((plan_no, meter, dims) -> charge_no and the group the charge puts the dims in)."""

    terms: pl.DataFrame
    plan_of: pl.DataFrame
    groups: pl.DataFrame
    priced: list[str]


def _column_plans(by_sub: dict[str, list[Segment]], subs: list[str], dims_by_meter: dict[str, list[str]],
                  left_out: set[str]) -> _ColumnPlans:
    """The terms of every plan of `subs` but those of `left_out` (per subscription, small: a
    close has a handful of plan versions); a subscription with a charge the column path does not
    price, or an allowance drawn by several lines, is left out of `priced`."""
    plan_no: dict[int, int] = {}
    plans, terms, plan_rows, priced = [], [], [], []
    for sub_id in subs:
        segs = by_sub[sub_id]
        if sub_id in left_out or not _pooled_alone(segs):
            continue
        numbers = []
        for seg in segs:
            plan = seg.plan.plan
            number = plan_no.get(id(plan))
            if number is None:
                number = plan_no[id(plan)] = len(plans)
                charge_rows = [_charge_terms(c, plan.currency, plan.rounding) for c in plan.charges]
                plans.append((plan, None if None in charge_rows else charge_rows))
            numbers.append(number)
        if all(plans[n][1] is not None for n in numbers):
            priced.append(sub_id)
            plan_rows += [(sub_id, seg.segment_no, n) for seg, n in zip(segs, numbers, strict=True)]
    groups = []
    for number, (plan, charge_rows) in enumerate(plans):
        if charge_rows is None:
            continue
        for charge_no, (charge, rows) in enumerate(zip(plan.charges, charge_rows, strict=True)):
            terms += [{"plan_no": number, "charge_no": charge_no, **row} for row in rows]
            group_of = groups_by_dims(charge)
            for dims in dims_by_meter.get(charge.meter, ()):
                key = group_of(dims)
                if key is not None:
                    groups.append((number, charge.meter, dims, charge_no, repr(key)))
    return _ColumnPlans(
        pl.DataFrame(terms, schema=TERMS_SCHEMA),
        pl.DataFrame(plan_rows, schema={"subscription_id": pl.String, "segment_no": pl.Int32, "plan_no": pl.Int32},
                     orient="row"),
        pl.DataFrame(groups, schema={"plan_no": pl.Int32, "meter": pl.String, "dims": pl.String,
                                     "charge_no": pl.Int32, "group": pl.String}, orient="row"),
        priced)


def _nano(column: str) -> pl.Expr:
    """A Decimal(38, 9) column as an integer count of billionths."""
    return (pl.col(column) * 10**NANO).cast(pl.Int128)


def _units_amounts(usage_by_day: pl.LazyFrame, plans: _ColumnPlans) -> pl.LazyFrame:
    """One row per line x day with usage of it: the line's amount through that day (counted in
    10^-scale) from its units and events so far, for every kind but `per_event`; `reach`: its
    units so far (every partial sum the model adds is at most the amount)."""
    billable = pl.max_horizontal(pl.col("units_so_far") - pl.col("included"), pl.lit(0, dtype=pl.Int128))
    band = pl.min_horizontal(billable, pl.col("up_to")) - pl.col("above")  # up_to null: no bound
    lands = (((billable > pl.col("above")) | (pl.col("tier") == 0))
             & (pl.col("up_to").is_null() | (billable <= pl.col("up_to"))))
    flat = pl.when(billable > 0).then(pl.col("flat")).otherwise(0)
    part = (pl.when(pl.col("kind") == "graduated")
            .then(pl.when(band > 0).then(band * pl.col("coef") + pl.col("flat")).otherwise(0))
            .when(pl.col("kind") == "volume")
            .then(pl.when(lands).then(billable * pl.col("coef") + flat).otherwise(0))
            .when(pl.col("kind") == "package")
            .then((billable + pl.col("size") - 1) // pl.col("size") * pl.col("coef"))
            .otherwise(billable * pl.col("coef") + pl.col("events_so_far").cast(pl.Int128) * pl.col("fixed")))
    return (usage_by_day
            .join(plans.plan_of.lazy(), on=["subscription_id", "segment_no"])
            .join(plans.groups.lazy(), on=["plan_no", "meter", "dims"])
            .join(plans.terms.lazy().filter(pl.col("kind") != "per_event").select("plan_no", "charge_no").unique(),
                  on=["plan_no", "charge_no"], how="semi")
            .group_by(*LINE, "plan_no", "day").agg(_nano("units").sum().alias("units"), pl.col("events").sum())
            .sort(*LINE, "day")
            .with_columns(pl.col("units").cum_sum().over(LINE).alias("units_so_far"),
                          pl.col("events").cum_sum().over(LINE).alias("events_so_far"))
            .join(plans.terms.lazy(), on=["plan_no", "charge_no"])
            .group_by(*LINE, "day").agg(part.sum().alias("amount"), pl.col("units_so_far").first().alias("reach"),
                                        pl.col("div").first(), pl.col("half_even").first()))


def _event_amounts(per_event_usage: pl.LazyFrame, plans: _ColumnPlans) -> pl.LazyFrame:
    """`_units_amounts` for lines of kind `per_event`: each event, in the order of the per-event
    table (event time), pays its amount x rate + the fixed fee, raised to min_fee or capped at
    max_fee, unless it is one of the period's first `free_events`; a day's amount is the sum
    through its last event. `reach` bounds the amounts and every partial sum the model adds on
    the way (see EXACT_LIMIT)."""
    fee = _nano("quantity") * pl.col("coef") + pl.col("fixed")
    bounded = (pl.when(pl.col("min_fee").is_not_null() & (fee < pl.col("min_fee"))).then(pl.col("min_fee"))
               .when(pl.col("max_fee").is_not_null() & (fee > pl.col("max_fee"))).then(pl.col("max_fee"))
               .otherwise(fee))
    paid = pl.int_range(pl.len()).over(LINE) >= pl.col("free")
    return (per_event_usage.with_row_index("_at")
            .join(plans.plan_of.lazy(), on=["subscription_id", "segment_no"])
            .join(plans.groups.lazy(), on=["plan_no", "meter", "dims"])
            .join(plans.terms.lazy().filter(pl.col("kind") == "per_event"), on=["plan_no", "charge_no"])
            .sort(*LINE, "_at")
            .with_columns(pl.col("event_at").dt.date().alias("day"),
                          pl.when(paid).then(bounded).otherwise(0).alias("fee"),
                          pl.when(paid).then(pl.max_horizontal(fee, bounded)).otherwise(0).alias("gross"),
                          _nano("quantity").alias("quantity_nano"))
            .with_columns(pl.col("fee").cum_sum().over(LINE).alias("amount"),
                          pl.max_horizontal(pl.col("gross").cum_sum().over(LINE),
                                            pl.col("quantity_nano").cum_sum().over(LINE) * pl.col("coef"),
                                            pl.col("quantity_nano").cum_sum().over(LINE)).alias("reach"))
            .group_by(*LINE, "day", maintain_order=True)
            .agg(pl.col("amount").last(), pl.col("reach").last(), pl.col("div").first(), pl.col("half_even").first()))


def spend_by_day(by_sub: dict[str, list[Segment]], subs: list[str], usage_by_day: pl.DataFrame,
                 per_event_usage: pl.DataFrame, left_out: set[str]) -> tuple[pl.DataFrame, list[str]]:
    """Spend through each day with usage of the subscriptions `subs` (but `left_out`), in
    columns: one row per subscription x day (subscription_id, day, spend_minor), in order, and
    the subscriptions priced. A line's amount is rated only on the days it has usage (its units
    or events so far); the subscription's spend through a day is the sum of its lines' amounts
    at their last day up to it, each rounded to minor units as the invoice rounds it."""
    # the rows of the subscriptions replayed, taken once: a close replays a few percent of them
    by_day = usage_by_day.filter(pl.col("subscription_id").is_in(pl.Series(subs, dtype=pl.String).implode()))
    dims_by_meter = dict(by_day.group_by("meter").agg(pl.col("dims").unique().sort()).iter_rows())
    plans = _column_plans(by_sub, subs, dims_by_meter, left_out)
    priced = pl.col("subscription_id").is_in(pl.Series(plans.priced, dtype=pl.String).implode())
    by_day = by_day.filter(priced)
    lines = pl.concat([_units_amounts(by_day.lazy(), plans),
                       _event_amounts(per_event_usage.filter(priced).lazy(), plans)]).collect()
    beyond = set(lines.filter(pl.col("reach") >= EXACT_LIMIT)["subscription_id"]) | set(
        lines.filter(pl.col("amount") >= EXACT_LIMIT)["subscription_id"])
    exact = ~pl.col("subscription_id").is_in(pl.Series(sorted(beyond), dtype=pl.String).implode())
    changes = (lines.lazy().filter(exact)
               .sort(*LINE, "day")
               .with_columns(to_minor_column(pl.col("amount"), pl.col("div"), pl.col("half_even")).alias("minor"))
               .with_columns((pl.col("minor") - pl.col("minor").shift(1, fill_value=0).over(LINE)).alias("change"))
               .group_by("subscription_id", "day").agg(pl.col("change").sum()))
    spend = (by_day.lazy()
             .filter(exact)
             .select("subscription_id", "day").unique()
             .join(changes, on=["subscription_id", "day"], how="left")
             .sort("subscription_id", "day")
             .select("subscription_id", "day",
                     pl.col("change").fill_null(0).cum_sum().over("subscription_id").cast(pl.Int64).alias("spend_minor"))
             .collect())
    return spend, [s for s in plans.priced if s not in beyond]


def _column_alerts(period: Period, by_sub: dict[str, list[Segment]], spend: pl.DataFrame,
                   subs: list[str]) -> tuple[dict[str, list[Alert]], dict[str, date]]:
    """The alerts of `subs` from their spend through each day (`spend_by_day`), and per
    subscription the last day a walk in day order looks at: the day its highest threshold is
    crossed, or its last day with usage. A threshold fires on the first day whose spend reaches
    it: that day is never before the lower thresholds' (they are reached on it too), so this is
    the day the walk pops it on, falling spend or not."""
    watch = pl.DataFrame([(s, n, w[1]) for s in subs for n, w in enumerate(watched_thresholds(by_sub[s]))],
                         schema={"subscription_id": pl.String, "watch_no": pl.Int32, "minor": pl.Int64}, orient="row")
    first = (spend.lazy().join(watch.lazy(), on="subscription_id")
             .filter(pl.col("spend_minor") >= pl.col("minor"))
             .group_by("subscription_id", "watch_no")
             .agg(pl.col("day").min(), pl.col("spend_minor").sort_by("day").first())
             .sort("subscription_id", "watch_no").collect())
    last_day = dict(spend.group_by("subscription_id").agg(pl.col("day").max()).iter_rows())
    fired: dict[str, list[Alert]] = defaultdict(list)
    for sub_id, watch_no, day, spend_minor in first.iter_rows():
        segs = by_sub[sub_id]
        watched = watched_thresholds(segs)
        kind, minor, label = watched[watch_no]
        currency, sub = segs[-1].plan.plan.currency, segs[-1].subscription
        amount, spent = decimal_text(from_minor(minor, currency)), decimal_text(from_minor(spend_minor, currency))
        fired[sub_id].append(Alert(sub.customer_id, sub_id, str(period), kind, amount, spent, day,
                                   f"Spend {spent} {currency} reached {label} on {day}"))
        if len(fired[sub_id]) == len(watched):
            last_day[sub_id] = day
    return fired, last_day


def _column_priced(by_sub: dict[str, list[Segment]], replayed: list[str], usage_by_day, per_event_usage,
                   credit_meters: set[tuple[str, int, str]], falling: set[str]) -> tuple[pl.DataFrame, list[str]]:
    """`spend_by_day` of the subscriptions replayed, but those whose spend can fall (`falling`:
    a negative quantity) or whose units are what the wallet left (meters paid with credits):
    those are rated day by day, with the Decimal units the wallet replay left."""
    left_out = falling | {sub for sub, _, _ in credit_meters}
    return spend_by_day(by_sub, replayed, usage_by_day, per_event_usage, left_out)


@cycle_collector_paused()  # rating day after day builds lines by the million, none of them a cycle
def spend_alerts(period: Period, segments: list[Segment], usage_by_day, per_event_usage,
                 billable_by_day: dict[tuple, Decimal], credit_meters: set[tuple[str, int, str]],
                 final_spend_minor: dict[str, int]) -> list[Alert]:
    """The spend alerts of `period`. `usage_by_day`: rows (subscription_id, segment_no, meter,
    dims, day, units, events); `per_event_usage`: rows with event_at, for per-event prices;
    `billable_by_day`: units left after credits by (sub, seg, meter, dims, day) for meters paid
    with credits; `final_spend_minor`: each subscription's usage charges for the whole period
    (a subscription that never reaches its lowest threshold is not replayed at all).

    Spend through every day is computed in columns for all subscriptions at once
    (`spend_by_day`); the few the column path leaves out are rated day by day."""
    by_sub = segments_by_subscription(segments)
    replayed = sorted(s for s, segs in by_sub.items() if _may_alert(segs, final_spend_minor.get(s, 0)))
    falling = _with_negative_usage(usage_by_day, per_event_usage)
    spend, priced = _column_priced(by_sub, replayed, usage_by_day, per_event_usage, credit_meters, falling)
    fired, _ = _column_alerts(period, by_sub, spend, priced)
    rest = sorted(set(replayed) - set(priced))
    day_lists = _days_with_usage(usage_by_day, rest)
    usage = usage_from(usage_by_day, per_event_usage, {s: day_lists[s][0] for s in rest if s in day_lists},
                        billable_by_day, credit_meters)
    for sub_id in rest:
        segs, rated = by_sub[sub_id], {}

        def spend_through(day: date, segs=segs, usage=usage[sub_id], rated=rated) -> int:
            if day not in rated:
                rated[day] = spend_to_date_minor(segs, usage, day)
            return rated[day]

        fired[sub_id] = _crossings(period, segs, day_lists.get(sub_id, []), final_spend_minor.get(sub_id, 0),
                                   spend_through, bisect=_monotone(segs) and sub_id not in falling)
    return [alert for sub_id in replayed for alert in fired.get(sub_id, ())]


def _crossings(period: Period, segs: list[Segment], day_list: list[date], final_minor: int, spend_through,
               bisect: bool = False) -> list[Alert]:
    """The spend alerts of one subscription: its days with usage in order, each threshold firing
    on the first day whose spend so far (`spend_through(day)`) reaches it, lowest first.

    With `bisect` (spend never falls from one day to the next) the last day tells which
    thresholds are crossed at all, and each crossing day is searched for (`_first_reaching`),
    rating a few days instead of every day up to the last crossing."""
    if not _may_alert(segs, final_minor):
        return []
    currency = segs[-1].plan.plan.currency
    sub = segs[-1].subscription
    crossed: list[tuple[tuple[str, int, str], date, int]] = []
    pending = watched_thresholds(segs)
    if bisect:
        first = 0  # thresholds are sorted, so each crossing is on or after the one before
        for watch in pending:
            if not day_list or spend_through(day_list[-1]) < watch[1]:
                break
            first = _first_reaching(day_list, first, watch[1], spend_through)
            crossed.append((watch, day_list[first], spend_through(day_list[first])))
    else:
        for day in day_list:
            spend = spend_through(day)
            while pending and spend >= pending[0][1]:
                crossed.append((pending.pop(0), day, spend))
            if not pending:
                break
    alerts = []
    for (kind, minor, label), day, spend in crossed:
        amount, spent = from_minor(minor, currency), from_minor(spend, currency)
        alerts.append(Alert(sub.customer_id, sub.subscription_id, str(period), kind, decimal_text(amount),
                            decimal_text(spent), day,
                            f"Spend {decimal_text(spent)} {currency} reached {label} on {day}"))
    return alerts


def _first_reaching(day_list: list[date], start: int, minor: int, spend_through) -> int:
    """The index of the first day from `start` whose spend reaches `minor`, when spend never
    falls and the last day's reaches it: gallop from `start` (crossings are often close
    together, early in the month), then bisect the last stride."""
    if spend_through(day_list[start]) >= minor:
        return start
    low, high, stride = start, len(day_list) - 1, 1  # spend at low is below, at high reaches it
    while low + stride < high:
        if spend_through(day_list[low + stride]) >= minor:
            high = low + stride
            break
        low, stride = low + stride, stride * 2
    while high - low > 1:
        middle = (low + high) // 2
        if spend_through(day_list[middle]) >= minor:
            high = middle
        else:
            low = middle
    return high


def spend_alerts_resumed(period: Period, segments: list[Segment], usage_by_day, per_event_usage,
                         billable_by_day: dict[tuple, Decimal], credit_meters: set[tuple[str, int, str]],
                         final_spend_minor: dict[str, int], known_spend: dict[tuple[str, date], int],
                         changed_from: dict[str, date] | None) -> tuple[list[Alert], dict[tuple[str, date], int]]:
    """`spend_alerts`, resumed from what an earlier night worked out: the same alerts, and the
    spend through each (subscription, day) replayed, for the next night.

    Spend through a day depends only on the usage (and credits drawn) up to that day, so a
    subscription's spend through `day` in `known_spend` still holds when no usage of its
    customer changed on or before that day (`changed_from`: per customer, the first day that
    changed; None when anything may have). Only the other days are rated again, from the usage
    of their day on (and each key's sums just before it), so a night's cost follows what
    changed, not the length of the month. Days are walked in order, as every night did, so the
    spend handed to the next night covers the same days."""
    by_sub = segments_by_subscription(segments)
    replayed = sorted(s for s, segs in by_sub.items() if _may_alert(segs, final_spend_minor.get(s, 0)))
    spend_frame, priced = _column_priced(by_sub, replayed, usage_by_day, per_event_usage, credit_meters,
                                         _with_negative_usage(usage_by_day, per_event_usage))
    fired, last_day = _column_alerts(period, by_sub, spend_frame, priced)
    walked = pl.DataFrame(list(last_day.items()), schema={"subscription_id": pl.String, "_last": pl.Date},
                          orient="row")
    spend: dict[tuple[str, date], int] = {
        (sub_id, day): minor for sub_id, day, minor in spend_frame.join(walked, on="subscription_id")
        .filter(pl.col("day") <= pl.col("_last")).select("subscription_id", "day", "spend_minor").iter_rows()}
    rest = sorted(set(replayed) - set(priced))
    day_lists = _days_with_usage(usage_by_day, rest)

    def still_known(sub_id: str, day: date) -> bool:
        customer = by_sub[sub_id][-1].subscription.customer_id
        changed = date.min if changed_from is None else changed_from.get(customer, date.max)
        return day < changed and (sub_id, day) in known_spend

    # first pass: where each walk leaves what the last night knew (None: it never does)
    rate_from: dict[str, date] = {}
    for sub_id in rest:
        first_unknown: list[date] = []

        def from_known(day: date, sub_id=sub_id, first_unknown=first_unknown) -> int:
            if not first_unknown and still_known(sub_id, day):
                return known_spend[(sub_id, day)]
            first_unknown.append(day)
            return -1  # below every threshold: the walk goes on to the next day, unrated
        _crossings(period, by_sub[sub_id], day_lists.get(sub_id, []), final_spend_minor.get(sub_id, 0), from_known)
        if first_unknown:
            rate_from[sub_id] = first_unknown[0]
    usage = usage_from(usage_by_day, per_event_usage, rate_from, billable_by_day, credit_meters)

    for sub_id in rest:
        segs = by_sub[sub_id]

        def spend_through(day: date, sub_id=sub_id, segs=segs) -> int:
            if still_known(sub_id, day):
                spend[(sub_id, day)] = known_spend[(sub_id, day)]
            else:
                spend[(sub_id, day)] = spend_to_date_minor(segs, usage[sub_id], day)
            return spend[(sub_id, day)]

        fired[sub_id] = _crossings(period, segs, day_lists.get(sub_id, []), final_spend_minor.get(sub_id, 0),
                                   spend_through)
    return [alert for sub_id in replayed for alert in fired.get(sub_id, ())], spend
