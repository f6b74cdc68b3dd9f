"""Invoices: a function of the period's segments, their billed usage and the plans.

One invoice per subscription active in the period (even at zero), one line per fixed fee, per
charge (and per group of a charge's `group_by`), then the invoice-level lines: the hard cap's
waiver and the commitment's true-up. Every line is rounded once, with its plan's rule; the total
is the sum of the rounded lines.
"""
from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from datetime import date
from decimal import Decimal
from itertools import accumulate, chain, repeat
from operator import attrgetter, is_not

import polars as pl

from transforms.collector import cycle_collector_paused
from transforms.engine.dims import parsed_dims
from transforms.errors import InputError
from transforms.inputs.reference import Segment, Subscription, segments_by_subscription
from transforms.money import decimal_text, from_minor, to_minor
from transforms.periods import Period
from transforms.pricing import Step, Usage, rate
from transforms.pricing.base import ZERO


@dataclass(frozen=True)
class Line:
    kind: str
    description: str
    quantity: Decimal
    amount_minor: int
    meter: str | None = None
    unit: str = ""
    segment_no: int | None = None
    plan: str | None = None
    plan_version: int | None = None
    group: dict[str, str | None] = field(default_factory=dict)
    filter: dict[str, str] = field(default_factory=dict)
    total_units: Decimal | None = None
    included_units: Decimal | None = None
    amount: Decimal | None = None  # unrounded, for the audit trail
    steps: tuple[Step, ...] = ()
    # on correction documents: the kind of the line adjusted, and what was issued vs what is due
    adjusts_kind: str | None = None
    adjusts_description: str | None = None
    old_quantity: Decimal | None = None
    new_quantity: Decimal | None = None
    old_amount_minor: int | None = None
    new_amount_minor: int | None = None
    # tax (see transforms.tax): on a taxed line, the rate it was taxed at; on a `tax` line, also
    # the taxable base and the legal mention; tax_inclusive: the line's price contains the tax
    tax_rate: Decimal | None = None
    taxable_base_minor: int | None = None
    tax_note: str | None = None
    tax_inclusive: bool | None = None
    # a one-off charge or manual credit (transforms.inputs.adjustments): its id, and False when it is
    # outside tax
    adjustment_id: str | None = None
    taxable: bool | None = None


_LINE_STATE = {f.name: f.default for f in fields(Line)}
"""Every field of a Line, in order, at its default (`group` and `filter` have factories: MISSING)."""


def _line(given: dict) -> Line:
    """A Line of the fields `given` (which must include `group` and `filter`), the others at their
    defaults: the state Line's own __init__ leaves, set as one dict. That __init__, frozen, sets
    its 30 fields one object.__setattr__ at a time, about 9 us a line; rating a 10M-event close
    makes 300k lines, so this is about 2 s less."""
    line = object.__new__(Line)
    object.__setattr__(line, "__dict__", {**_LINE_STATE, **given})
    return line


TAX_LINE_KINDS = ("tax", "tax_included")

USAGE_LINE_KINDS = ("usage", "overage")
"""The lines that bill metered usage: a charge's units (`overage`: those beyond its allowance)."""

INVOICE_LEVEL_KINDS = ("cap_waiver", "commitment_true_up")
"""Lines of the invoice as a whole, amounts with no meter or segment: the hard cap's waiver and
the commitment's true-up. They follow the plan of the subscription's last segment."""

SPEND_KINDS = ("fixed_fee", "usage", "overage", "cap_waiver")
"""What counts toward a commitment: the service, not credits bought in advance."""


def usage_spend_minor(lines: Iterable[Line]) -> int:
    """Usage spend: what the usage and overage lines bill (after credits, before any hard cap's
    waiver), the amount budgets, spend alerts and the hard cap are measured against."""
    return sum(line.amount_minor for line in lines if line.kind in USAGE_LINE_KINDS)


def commitment_spend_minor(lines: Iterable[Line]) -> int:
    """Spend toward a minimum commitment: fixed fees and usage net of any cap's waiver."""
    return sum(line.amount_minor for line in lines if line.kind in SPEND_KINDS)


@dataclass(frozen=True)
class Invoice:
    invoice_id: str
    kind: str
    customer_id: str
    subscription_id: str
    period: str
    currency: str
    issued_on: date
    lines: tuple[Line, ...]
    service_start: date
    service_end: date
    corrects_invoice_id: str | None = None
    run_id: str | None = None
    reason: str | None = None
    due_on: date | None = None

    @property
    def total_minor(self) -> int:
        return sum(line.amount_minor for line in self.lines)

    @property
    def tax_minor(self) -> int:
        """The tax on the invoice: its `tax` lines (a `tax_included` line is the same tax backed
        out of tax-inclusive prices, so it belongs to the subtotal)."""
        return sum(line.amount_minor for line in self.lines if line.kind == "tax")

    @property
    def subtotal_minor(self) -> int:
        """Net of tax: total = subtotal + tax."""
        return self.total_minor - self.tax_minor

    @property
    def usage_spend_minor(self) -> int:
        """The invoice's usage spend (see the module function `usage_spend_minor`)."""
        return usage_spend_minor(self.lines)

    @property
    def commitment_spend_minor(self) -> int:
        """The invoice's spend toward a minimum commitment (see `commitment_spend_minor`)."""
        return commitment_spend_minor(self.lines)


@dataclass(frozen=True)
class SegmentUsage:
    """Billed usage of one segment: units per meter x dims, and the per-event quantities.

    `per_event` holds either one row per event, (meter, dims, quantity) in event-time order, or
    (as `usage_by_segment` builds it) one row per meter, (meter, the distinct dims, events), whose
    `events` frame holds each event's dims and quantity in event-time order: a month of events
    never becomes a Python object per event."""

    by_dims: tuple[tuple[str, str, Decimal, int], ...]           # meter, dims, units, events
    per_event: tuple[tuple[str, str | tuple[str, ...], Decimal | pl.DataFrame], ...] = ()  # meter, dims, quantity


NO_USAGE = SegmentUsage(())
"""The usage of a segment that used nothing."""


def usage_by_segment(usage_by_dims: pl.DataFrame, per_event_usage: pl.DataFrame
                     ) -> dict[tuple[str, int], SegmentUsage]:
    """Regroup the settled usage tables by (subscription_id, segment_no), rows in table order.
    Grouped in Polars: the per-event table stays columns, one slice per segment x meter."""
    # each segment's rows one after another, read as columns and cut per segment: a million rows
    # read as lists per segment cost about 60% more
    lists = usage_by_dims.group_by("subscription_id", "segment_no", maintain_order=True).agg(
        pl.len().alias("rows"), "meter", "dims", "units", "events")
    flat = lists.select(pl.col("meter", "dims", "units", "events").explode())
    rows = list(zip(*(flat[name].to_list() for name in flat.columns), strict=True))
    counts = lists["rows"].to_list()
    by_dims = {key: tuple(rows[end - count:end]) for key, count, end in zip(
        zip(lists["subscription_id"].to_list(), lists["segment_no"].to_list(), strict=True), counts,
        accumulate(counts), strict=True)}
    keys = ["subscription_id", "segment_no", "meter"]
    events = per_event_usage.select(*keys, "dims", "quantity").sort(keys, maintain_order=True)
    per_event: dict[tuple[str, int], list] = defaultdict(list)
    offset = 0
    groups = events.group_by(keys, maintain_order=True).agg(pl.len(), pl.col("dims").unique(maintain_order=True))
    narrow = events.select("dims", "quantity")  # sliced per group: a slice is a view, a select a query
    for sub, seg, meter, count, dims in groups.iter_rows():
        per_event[(sub, seg)].append((meter, tuple(dims), narrow.slice(offset, count)))
        offset += count
    return {key: SegmentUsage(by_dims.get(key, ()), tuple(per_event.get(key, ())))
            for key in set(by_dims) | set(per_event)}


_GROUPS: dict[tuple, dict[str, tuple | None]] = {}
"""group_of's answers per (meter, filter, group_by), shared by every charge that has them: the
group of a dims depends on nothing else, and a close asks it millions of times over 100k invoices."""


def _known_groups(charge) -> dict[str, tuple | None]:
    """The dims already placed in a group (or left out) for charges like `charge`."""
    key = (charge.meter, tuple(sorted(charge.filter.items())), tuple(charge.group_by))
    known = _GROUPS.get(key)
    if known is None:
        if len(_GROUPS) > 4096:  # a long-lived process with many catalogs: start over
            _GROUPS.clear()
        known = _GROUPS[key] = {}
    return known


_CHARGES: dict[int, tuple] = {}
"""Per charge (by id, the charge kept to tell a reused id), what charge_lines reads for it on
every invoice: its groups' answers, its group_of and its allowance pool."""


def _charge_parts(charge) -> tuple[dict[str, tuple | None], Callable[[str], tuple | None], tuple]:
    """(known groups, group_of, allowance pool) of `charge`, worked out once per charge."""
    entry = _CHARGES.get(id(charge))
    if entry is None or entry[0] is not charge:
        if len(_CHARGES) > 4096:  # a long-lived process with many catalogs: start over
            _CHARGES.clear()
        known = _known_groups(charge)
        entry = _CHARGES[id(charge)] = (charge, known, groups_by_dims(charge, known),
                                        (charge.meter, tuple(sorted(charge.filter.items()))))
    return entry[1:]


_PLAN_CHARGES: dict[int, tuple] = {}
"""Per plan version (by id, the plan kept to tell a reused id), what charge_lines reads of each of
its charges on every segment: (index, charge, meter, group_by, included, known groups, group_of,
allowance pool)."""


def _plan_charges(plan) -> tuple[tuple, ...]:
    """The charges of `plan` with what charge_lines reads of each (see _PLAN_CHARGES), worked out
    once per plan version: a close rates 100k segments of a few plan versions."""
    entry = _PLAN_CHARGES.get(id(plan))
    if entry is None or entry[0] is not plan:
        if len(_PLAN_CHARGES) > 4096:  # a long-lived process with many catalogs: start over
            _PLAN_CHARGES.clear()
        entry = _PLAN_CHARGES[id(plan)] = (plan, tuple(
            (index, charge, charge.meter, charge.group_by, charge.included, *_charge_parts(charge))
            for index, charge in enumerate(plan.charges)))
    return entry[1]


def groups_by_dims(charge, known: dict | None = None) -> Callable[[str], tuple | None]:
    """The group (values of `group_by`) of `charge` that a row of its meter falls in, by the
    row's dims; None when the charge's filter leaves the row out. Worked out once per dims."""
    known = _known_groups(charge) if known is None else known

    def group_of(dims_json: str) -> tuple | None:
        if dims_json not in known:
            dims = parsed_dims(dims_json)
            known[dims_json] = (tuple(dims.get(g) for g in charge.group_by)
                                if charge.prices(charge.meter, dims) else None)
        return known[dims_json]
    return group_of


def _event_columns(events: pl.DataFrame, dims_seen: tuple[str, ...], group_of: Callable[[str], tuple | None]
                   ) -> dict[tuple, pl.Series]:
    """The quantities of one meter's events that a charge prices, per group, in event-time order."""
    key_of = {d: group_of(d) for d in dims_seen}
    keys = set(key_of.values())
    if len(keys) == 1 and None not in keys:
        return {keys.pop(): events["quantity"]}
    return {key: events.filter(pl.col("dims").is_in([d for d, k in key_of.items() if k == key]))["quantity"]
            for key in keys if key is not None}


Made = dict[tuple, Line]
"""Lines already made in one rating of a period, by everything a line is a function of (see
charge_lines): a charge model is pure and a line is frozen, so an equal usage is rated once and
its line shared by every invoice that bills it."""


def charge_lines(segment: Segment, usage: SegmentUsage, label_suffix: str,
                 allowance_used: dict[tuple, Decimal], made: Made | None = None) -> list[Line]:
    """One line per charge of the segment's plan (per group with `group_by`).

    An allowance (`included`) belongs to the subscription's period, not to a segment: when a
    migration splits the period, the first segment draws on it first and the second gets what
    is left (up to its own version's `included`). `allowance_used` carries that across segments.

    `made` (period_invoices passes one per period) shares the lines of equal usage: most of
    100k invoices bill a charge they did not use (0 units) or the same few units, so the line of
    a (plan version, charge, segment, group, units, allowance used, events) is rated once. Lines
    of models given each event's quantity are always rated.
    """
    plan = segment.plan.plan
    plan_id, segment_no = id(plan), segment.segment_no
    lines = []
    # a charge prices one meter: each charge looks only at its meter's rows
    by_dims_of, per_event_of = defaultdict(list), defaultdict(list)
    for row in usage.by_dims:
        by_dims_of[row[0]].append(row)
    for row in usage.per_event:
        per_event_of[row[0]].append(row)
    # known: group_of's answers, read inline (millions of rows)
    for index, charge, meter, group_by, included, known, group_of, pool in _plan_charges(plan):
        rows, event_rows = by_dims_of.get(meter), per_event_of.get(meter)
        if made is not None and not rows and not event_rows:
            # unused: 0 units, none of them from the allowance, so the line is the same on every
            # invoice of the plan version (and the allowance used is left as it was)
            if not group_by:
                unused_key = (plan_id, index, segment_no, label_suffix)
                line = made.get(unused_key)
                if line is None:
                    line = made[unused_key] = _charge_line(segment, charge, (), ZERO, ZERO, 0, (), label_suffix)
                lines.append(line)
            continue
        groups: dict[tuple, list] = {}
        events: dict[tuple, list[Decimal] | pl.Series] = defaultdict(list)
        if rows or event_rows:
            for _, dims_json, units, count in rows or ():
                key = known[dims_json] if dims_json in known else group_of(dims_json)
                if key is not None:
                    total = groups.setdefault(key, [ZERO, 0])
                    total[0] += units
                    total[1] += count
            for _, dims_json, quantity in event_rows or ():
                if isinstance(quantity, pl.DataFrame):  # all of the meter's events, see usage_by_segment
                    events.update(_event_columns(quantity, dims_json, group_of))
                    continue
                key = known[dims_json] if dims_json in known else group_of(dims_json)
                if key is not None:
                    events[key].append(quantity)
        if not group_by and not groups:
            groups[()] = [ZERO, 0]  # a metered charge shows on the invoice even when unused
        for key in sorted(groups, key=lambda k: tuple((v is None, v or "") for v in k)) if len(groups) > 1 else groups:
            units, count = groups[key]
            allowance = max(included - allowance_used.get(pool, ZERO), ZERO)
            used = min(units, allowance)
            if included > 0:
                allowance_used[pool] = allowance_used.get(pool, ZERO) + used
            quantities = events.get(key, ())
            if made is None or len(quantities):
                lines.append(_charge_line(segment, charge, key, units, used, count, quantities, label_suffix))
                continue
            # str: the exact decimal (5 and 5.000 are equal, but a line shows the one it was given)
            made_key = (plan_id, index, segment_no, label_suffix, key,
                        "0" if units is ZERO else str(units), "0" if used is ZERO else str(used), count)
            line = made.get(made_key)
            if line is None:
                line = made[made_key] = _charge_line(segment, charge, key, units, used, count, (), label_suffix)
            lines.append(line)
    return lines


def _charge_line(segment: Segment, charge, key: tuple, units: Decimal, used: Decimal, count: int,
                 quantities: list[Decimal] | pl.Series, label_suffix: str) -> Line:
    """The line of one charge (one group of it): `units` used, `used` of them drawn from the
    allowance, the rest rated by the charge's model."""
    plan = segment.plan.plan
    billable = units - used
    rating = rate(charge.price, Usage(billable, count, quantities if isinstance(quantities, pl.Series)
                                      else tuple(quantities)))
    kind, description, group, filter_ = _charge_face(charge, key, label_suffix)
    return _line({
        "kind": kind, "description": description, "quantity": billable,
        "amount_minor": to_minor(rating.amount, plan.currency, plan.rounding),
        "meter": charge.meter, "unit": "units", "segment_no": segment.segment_no, "plan": plan.plan,
        "plan_version": plan.version, "group": group, "filter": filter_, "total_units": units,
        "included_units": used if kind == "overage" else None, "amount": rating.amount, "steps": rating.steps})


_FACES: dict[tuple, tuple] = {}
"""_charge_face's answers, by (charge id, group, label suffix), the charge kept to tell a reused id."""


def _charge_face(charge, key: tuple, label_suffix: str) -> tuple[str, str, dict, dict]:
    """(kind, description, group, filter) of the lines of one group of `charge`: the same on every
    invoice that bills the group, so worked out once and shared (a line's dicts are never changed)."""
    face_key = (id(charge), key, label_suffix)
    face = _FACES.get(face_key)
    if face is None or face[0] is not charge:
        if len(_FACES) > 65536:  # a long-lived process with many catalogs: start over
            _FACES.clear()
        group = dict(zip(charge.group_by, key, strict=True))
        group_text = ", ".join(f"{k}: {v if v is not None else '(none)'}" for k, v in group.items())
        face = _FACES[face_key] = (charge, "overage" if charge.included > 0 else "usage",
                                   charge.title + (f" ({group_text})" if group_text else "") + label_suffix,
                                   group, dict(charge.filter))
    return face[1:]


def fixed_fee_lines(segment: Segment, label_suffix: str, made: Made | None = None) -> list[Line]:
    """Fixed fees of the segment's plan, prorated by days when the segment is part of the period.
    `made`: the lines already made for a segment of the same plan version, number and days (see
    charge_lines)."""
    plan = segment.plan.plan
    made_key = (id(plan), "fixed_fees", segment.segment_no, segment.start_at, segment.end_at, segment.period,
                label_suffix)
    if made is not None and made_key in made:
        return list(made[made_key])
    lines = []
    for fee in plan.fixed_fees:
        amount = fee.amount * segment.days / segment.period.days
        prorated = "" if segment.is_full_period else f", {segment.days} of {segment.period.days} days"
        lines.append(Line(
            kind="fixed_fee",
            description=f"{fee.name}{prorated}{label_suffix}",
            quantity=Decimal(segment.days),
            amount_minor=to_minor(amount, plan.currency, plan.rounding),
            unit="days",
            segment_no=segment.segment_no,
            plan=plan.plan,
            plan_version=plan.version,
            amount=amount,
            steps=(Step(f"{fee.amount} x {segment.days}/{segment.period.days} days", Decimal(segment.days),
                        None, amount),),
        ))
    if made is not None:
        made[made_key] = tuple(lines)
    return lines


def _cap_and_commitment(segments: list[Segment], sub: Subscription, lines: list[Line]) -> list[Line]:
    """Invoice-level lines. The hard cap first: usage lines keep their full amounts and one
    `cap_waiver` carries the excess back. Then the commitment: if what remains falls short of the
    period's minimum (prorated by days like a fixed fee), a true-up makes up the difference."""
    last = segments[-1].plan.plan
    currency, rounding = last.currency, last.rounding
    out: list[Line] = []
    controls = last.spend_controls
    cap = sub.hard_cap if sub.hard_cap is not None else (controls.hard_cap if controls else None)
    if cap is not None:
        usage_minor, cap_minor = usage_spend_minor(lines), to_minor(cap, currency, rounding)
        if usage_minor > cap_minor:
            excess = usage_minor - cap_minor
            out.append(Line(kind="cap_waiver", quantity=Decimal(1), amount_minor=-excess,
                            description=f"Hard cap: usage above {cap} {currency} is waived",
                            amount=from_minor(-excess, currency)))
    if any(s.plan.plan.commitment for s in segments):
        minimum = sum((s.plan.plan.commitment.minimum * s.days / s.period.days
                       for s in segments if s.plan.plan.commitment), ZERO)
        minimum_minor = to_minor(minimum, currency, rounding)
        spend_minor = commitment_spend_minor(lines + out)
        if spend_minor < minimum_minor:
            shortfall = minimum_minor - spend_minor
            out.append(Line(kind="commitment_true_up", quantity=Decimal(1), amount_minor=shortfall,
                            description=f"Minimum commitment true-up: commitment "
                                        f"{from_minor(minimum_minor, currency)} {currency}, "
                                        f"spend {from_minor(spend_minor, currency)} {currency}",
                            amount=from_minor(shortfall, currency)))
    return out


def _segment_label(segment: Segment, many: bool) -> str:
    if not many:
        return ""
    last_day = segment.end_at.date().toordinal() - 1
    return (f" [{segment.start_at:%b} {segment.start_at.day}-{date.fromordinal(last_day).day}, "
            f"{segment.plan.plan.plan} v{segment.plan.plan.version}]")


def period_invoices(period: Period, segments: list[Segment], usage: dict[tuple[str, int], SegmentUsage],
                    extra_lines: dict[str, list[Line]] | None = None) -> list[Invoice]:
    """One invoice per subscription with a segment in `period`, numbered gap-free in order of
    customer_id then subscription_id: INV-2026-10-000001, ..."""
    ordered = sorted(segments_by_subscription(segments).values(), key=lambda segs: (segs[0].subscription.customer_id,
                                                       segs[0].subscription.subscription_id))
    invoices = []
    made: Made = {}
    period_text, issued_on = str(period), period.end
    for number, segs in enumerate(ordered, start=1):
        sub = segs[0].subscription
        currencies = {s.plan.plan.currency for s in segs}
        if len(currencies) > 1:
            raise InputError(f"subscription {sub.subscription_id!r}: its plan versions in {period} bill in "
                             f"{sorted(currencies)}; one invoice has one currency")
        many = len(segs) > 1
        lines: list[Line] = []
        allowance_used: dict[tuple, Decimal] = {}
        for seg in segs:
            suffix = _segment_label(seg, many)
            lines += fixed_fee_lines(seg, suffix, made)
            lines += charge_lines(seg, usage.get((sub.subscription_id, seg.segment_no)) or NO_USAGE,
                                  suffix, allowance_used, made)
        lines += _cap_and_commitment(segs, sub, lines)
        lines += (extra_lines or {}).get(sub.subscription_id, [])
        _representable(sub.subscription_id, currencies, lines)
        invoices.append(Invoice(
            invoice_id=f"INV-{period_text}-{number:06d}",
            kind="invoice",
            customer_id=sub.customer_id,
            subscription_id=sub.subscription_id,
            period=period_text,
            currency=currencies.pop(),
            issued_on=issued_on,
            lines=tuple(lines),
            service_start=segs[0].start_at.date(),
            service_end=segs[-1].end_at.date(),
        ))
    return invoices


INT64_MAX_MINOR = 2 ** 63 - 1
"""The largest amount an `_minor` column holds."""


def _representable(subscription_id: str, currencies: set[str], lines: list[Line]) -> None:
    """Every line and the total fit int64 minor units. A single event cannot exceed them (it is
    quarantined as amount_out_of_range, see transforms.engine.checked_usage.ROW_AMOUNT_LIMIT_MINOR); only the
    sum of very many events at the largest legal amount can, and that is said in one line."""
    if sum(map(abs, map(attrgetter("amount_minor"), lines))) <= INT64_MAX_MINOR:
        return  # then no line and no running total can exceed it
    total = 0
    for line in lines:
        total += line.amount_minor
        if abs(line.amount_minor) > INT64_MAX_MINOR or abs(total) > INT64_MAX_MINOR:
            what = f"line {line.description!r}" if abs(line.amount_minor) > INT64_MAX_MINOR else "invoice total"
            raise InputError(f"subscription {subscription_id!r}: the {what} exceeds the largest amount billrun "
                             f"represents ({INT64_MAX_MINOR} minor units of {min(currencies)}); check its usage")


INVOICE_SCHEMA = {
    "invoice_id": pl.String, "kind": pl.String, "customer_id": pl.String, "subscription_id": pl.String,
    "period": pl.String, "currency": pl.String, "total_minor": pl.Int64, "issued_on": pl.Date,
    "corrects_invoice_id": pl.String, "service_start": pl.Date, "service_end": pl.Date,
    "line_count": pl.Int32, "run_id": pl.String, "reason": pl.String,
    "subtotal_minor": pl.Int64, "tax_minor": pl.Int64, "due_on": pl.Date,
}

LINE_SCHEMA = {
    "invoice_id": pl.String, "line_no": pl.Int32, "customer_id": pl.String, "subscription_id": pl.String,
    "period": pl.String, "kind": pl.String, "description": pl.String, "meter": pl.String,
    "quantity": pl.String, "unit": pl.String, "amount_minor": pl.Int64, "currency": pl.String,
    "segment_no": pl.Int32, "plan": pl.String, "plan_version": pl.Int32, "group": pl.String, "filter": pl.String,
    "total_units": pl.String, "included_units": pl.String, "amount": pl.String, "details": pl.String,
    "adjusts_kind": pl.String, "adjusts_description": pl.String, "old_quantity": pl.String, "new_quantity": pl.String,
    "old_amount_minor": pl.Int64, "new_amount_minor": pl.Int64,
    "tax_rate": pl.String, "taxable_base_minor": pl.Int64, "tax_note": pl.String, "tax_inclusive": pl.Boolean,
}


def totals_by_currency(invoices: list[Invoice]) -> list[dict]:
    """One entry per currency, in code order: how many invoices and their total (the manifest's
    `totals`)."""
    by_currency: dict[str, list[int]] = {}
    for inv in invoices:
        entry = by_currency.setdefault(inv.currency, [0, 0])
        entry[0] += 1
        entry[1] += inv.total_minor
    return [{"currency": c, "invoices": n, "total_minor": t} for c, (n, t) in sorted(by_currency.items())]


def invoices_table(invoices: list[Invoice]) -> pl.DataFrame:
    """One row per invoice (contract columns first)."""
    return pl.DataFrame(
        [{"invoice_id": i.invoice_id, "kind": i.kind, "customer_id": i.customer_id,
          "subscription_id": i.subscription_id, "period": i.period, "currency": i.currency,
          "total_minor": i.total_minor, "issued_on": i.issued_on, "corrects_invoice_id": i.corrects_invoice_id,
          "service_start": i.service_start, "service_end": i.service_end, "line_count": len(i.lines),
          "run_id": i.run_id, "reason": i.reason, "subtotal_minor": i.subtotal_minor, "tax_minor": i.tax_minor,
          "due_on": i.due_on}
         for i in invoices], schema=INVOICE_SCHEMA)


@cycle_collector_paused()  # its JSON texts are built from dicts, once per distinct line
def lines_table(invoices: list[Invoice]) -> pl.DataFrame:
    """One row per invoice line, numbered from 1 within its invoice.

    Rating shares a line among the invoices that bill the same thing (see charge_lines: most of
    100k invoices bill a charge they did not use, or the same few units), so a close's lines are
    far fewer objects than rows. Each distinct line object is read and formatted once, into a
    frame of its own, and the rows are gathered from it in Polars; the invoice's own columns are
    gathered the same way from one row per invoice. Within the distinct lines, the filters,
    groups and tier details that repeat are formatted once per distinct value; a decimal is
    formatted per line, as hashing it to find its equals costs about what formatting it does."""
    counts = list(map(len, map(attrgetter("lines"), invoices)))
    lines = list(chain.from_iterable(map(attrgetter("lines"), invoices)))
    ids = list(map(id, lines))
    distinct = dict(zip(ids, lines, strict=True))  # one line per object, in first-seen order
    row_of = {ident: row for row, ident in enumerate(distinct)}
    fields: dict[str, list] = {name: [] for name in _LINE_FIELDS}
    every_field, into = attrgetter(*_LINE_FIELDS), list(fields.values())
    if distinct:  # a tuple of its fields per distinct line, in C
        for column, values in zip(into, zip(*map(every_field, distinct.values()), strict=True), strict=True):
            column.extend(values)

    def formatted(values, text, key=lambda value: value) -> list:
        """`text` of each value: computed once per distinct object, then once per distinct `key`
        of the value (equal values give equal texts); the per-line work runs in C."""
        value_ids = list(map(id, values))
        by_key: dict = {}
        texts_by_id = {}
        for ident, value in dict(zip(value_ids, values, strict=True)).items():  # values alive: ids their own
            k = key(value)
            got = by_key.get(k, by_key)
            if got is by_key:
                got = by_key[k] = text(value)
            texts_by_id[ident] = got
        return list(map(texts_by_id.__getitem__, value_ids))

    def as_json(mapping: dict) -> str | None:
        return json.dumps(mapping, sort_keys=True) if mapping else None

    def items(mapping: dict) -> tuple:
        return tuple(mapping.items())  # a dict is not hashable: equal ones are found by their items

    def optional_text(value: Decimal | None) -> str | None:
        return None if value is None else decimal_text(value)

    def details(steps: tuple[Step, ...]) -> str | None:
        return json.dumps([s.as_dict() for s in steps]) if steps else None

    def texts(name: str) -> list:
        values = fields[name]
        if not any(map(is_not, values, repeat(None))):  # correction and tax columns, empty on most closes
            return [None] * len(values)
        return list(map(optional_text, values))

    per_line = pl.DataFrame({
        "kind": fields["kind"], "description": fields["description"],
        "meter": fields["meter"], "quantity": texts("quantity"), "unit": fields["unit"],
        "amount_minor": fields["amount_minor"],
        "segment_no": fields["segment_no"], "plan": fields["plan"], "plan_version": fields["plan_version"],
        "group": formatted(fields["group"], as_json, items), "filter": formatted(fields["filter"], as_json, items),
        "total_units": texts("total_units"), "included_units": texts("included_units"), "amount": texts("amount"),
        "details": formatted(fields["steps"], details),
        "adjusts_kind": fields["adjusts_kind"], "adjusts_description": fields["adjusts_description"],
        "old_quantity": texts("old_quantity"), "new_quantity": texts("new_quantity"),
        "old_amount_minor": fields["old_amount_minor"], "new_amount_minor": fields["new_amount_minor"],
        "tax_rate": texts("tax_rate"), "taxable_base_minor": fields["taxable_base_minor"],
        "tax_note": fields["tax_note"], "tax_inclusive": fields["tax_inclusive"],
    }, schema={name: LINE_SCHEMA[name] for name in _LINE_COLUMNS})
    per_invoice = pl.DataFrame({name: list(map(attrgetter(name), invoices)) for name in _INVOICE_COLUMNS},
                               schema={name: LINE_SCHEMA[name] for name in _INVOICE_COLUMNS})
    invoice_rows = pl.Series([n for n, count in enumerate(counts) for _ in range(count)], dtype=pl.UInt32)
    return pl.concat([
        per_invoice[invoice_rows],
        pl.DataFrame({"line_no": [no for count in counts for no in range(1, count + 1)]}, schema={"line_no": pl.Int32}),
        per_line[pl.Series(list(map(row_of.__getitem__, ids)), dtype=pl.UInt32)],
    ], how="horizontal").select(list(LINE_SCHEMA))


_INVOICE_COLUMNS = ("invoice_id", "customer_id", "subscription_id", "period", "currency")
"""The columns of invoice_lines that are the invoice's, the same on each of its lines."""

_LINE_COLUMNS = tuple(name for name in LINE_SCHEMA if name not in _INVOICE_COLUMNS and name != "line_no")
"""The columns of invoice_lines that are the line's own."""

_LINE_FIELDS = ("kind", "description", "meter", "quantity", "unit", "amount_minor", "segment_no", "plan",
                "plan_version", "group", "filter", "total_units", "included_units", "amount", "steps",
                "adjusts_kind", "adjusts_description", "old_quantity", "new_quantity", "old_amount_minor",
                "new_amount_minor", "tax_rate", "taxable_base_minor", "tax_note", "tax_inclusive")
"""The fields of a Line that `lines_table` writes, read in one pass."""


def apply_credits(usage: dict[tuple[str, int], SegmentUsage], billable: dict[tuple, Decimal],
                  credit_meters: set[tuple[str, int, str]]) -> dict[tuple[str, int], SegmentUsage]:
    """Usage left for the charges once credits have paid their part: for each segment x meter
    paid with credits, the units the wallet did not cover (`billable`, by segment x meter x
    dims) replace the units used."""
    out = {}
    paid = {(sub, seg) for sub, seg, _ in credit_meters}
    for (sub, seg), su in usage.items():
        if (sub, seg) not in paid:  # no meter of the segment paid with credits: its usage as it is
            out[(sub, seg)] = su
            continue
        rows = tuple((m, d, billable.get((sub, seg, m, d), ZERO) if (sub, seg, m) in credit_meters else u, n)
                     for m, d, u, n in su.by_dims)
        per_event = tuple(r for r in su.per_event if (sub, seg, r[0]) not in credit_meters)
        out[(sub, seg)] = SegmentUsage(rows, per_event)
    return out


def invoices_from_tables(invoices: pl.DataFrame, lines: pl.DataFrame) -> list[Invoice]:
    """The documents that `invoices_table` and `lines_table` wrote, read back (a nightly run's
    drafts, to show them): one Invoice per row of `invoices`, its lines in line_no order.
    Decimals come back equal in value (the tables hold them as plain text)."""
    def number(text: str | None) -> Decimal | None:
        return None if text is None else Decimal(text)

    def step(d: dict) -> Step:
        return Step(d["label"], Decimal(d["units"]), number(d["unit_price"]), Decimal(d["amount"]), number(d["per"]))

    by_invoice: dict[str, list[Line]] = defaultdict(list)
    for row in lines.sort("invoice_id", "line_no").iter_rows(named=True):
        by_invoice[row["invoice_id"]].append(Line(
            kind=row["kind"], description=row["description"], quantity=Decimal(row["quantity"]),
            amount_minor=row["amount_minor"], meter=row["meter"], unit=row["unit"] or "",
            segment_no=row["segment_no"], plan=row["plan"], plan_version=row["plan_version"],
            group=json.loads(row["group"]) if row["group"] else {},
            filter=json.loads(row["filter"]) if row["filter"] else {},
            total_units=number(row["total_units"]), included_units=number(row["included_units"]),
            amount=number(row["amount"]),
            steps=tuple(step(d) for d in json.loads(row["details"])) if row["details"] else (),
            adjusts_kind=row["adjusts_kind"], adjusts_description=row["adjusts_description"],
            old_quantity=number(row["old_quantity"]), new_quantity=number(row["new_quantity"]),
            old_amount_minor=row["old_amount_minor"], new_amount_minor=row["new_amount_minor"],
            tax_rate=number(row["tax_rate"]), taxable_base_minor=row["taxable_base_minor"],
            tax_note=row["tax_note"], tax_inclusive=row["tax_inclusive"]))
    return [Invoice(invoice_id=row["invoice_id"], kind=row["kind"], customer_id=row["customer_id"],
                    subscription_id=row["subscription_id"], period=row["period"], currency=row["currency"],
                    issued_on=row["issued_on"], lines=tuple(by_invoice.get(row["invoice_id"], ())),
                    service_start=row["service_start"], service_end=row["service_end"],
                    corrects_invoice_id=row["corrects_invoice_id"], run_id=row["run_id"], reason=row["reason"],
                    due_on=row["due_on"])
            for row in invoices.iter_rows(named=True)]
