"""Customers and subscriptions: checked at the boundary, then cut into billable segments.

Unlike usage rows, a bad customer or subscription row fails the run: billing the wrong plan or
nobody at all is worse than billing late. Each error names the file, the row and the field.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from functools import cached_property
from itertools import pairwise

import pandera.polars as pa
import polars as pl
from pandera.errors import SchemaErrors

from transforms.errors import InputError
from transforms.inputs.plans import Catalog, Plan, PlanFile
from transforms.periods import Period, utc_midnight

DATE = r"^\d{4}-\d{2}-\d{2}$"
MONEY = r"^\d+(\.\d+)?$"  # budgets and caps are amounts, never negative


def _text_frame(frame: pl.DataFrame, required: tuple[str, ...], optional: tuple[str, ...],
                source: str) -> pl.DataFrame:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise InputError(f"{source}: missing column(s) {', '.join(missing)} "
                         f"(expected {', '.join(required + optional)})")
    cols = [pl.col(c).cast(pl.String).str.strip_chars().replace("", None).alias(c) for c in required]
    cols += [(pl.col(c).cast(pl.String).str.strip_chars().replace("", None) if c in frame.columns
              else pl.lit(None, dtype=pl.String)).alias(c) for c in optional]
    return frame.select(cols)


def _first_failure(exc: SchemaErrors, source: str, frame: pl.DataFrame) -> InputError:
    cases = exc.failure_cases.sort("index", nulls_last=True)
    case = cases.row(0, named=True)
    column = case["column"] if case["column"] and case["column"] != case.get("schema_context") else ""
    check = case["check"] or ""
    row = "" if case["index"] is None else f" row {int(case['index']) + 1}"
    value = case["failure_case"]
    more = f" ({cases.height - 1} more problem(s) in this file)" if cases.height > 1 else ""
    what = check.replace("_", " ") if check and not check.startswith(("str_", "not_nullable")) else check
    if check == "not_nullable":
        what = "is required"
    elif check.startswith("str_matches"):
        what = f"{value!r} is not in the expected format"
    elif check == "field_uniqueness" or check.startswith("unique"):
        what = f"{value!r} appears more than once"
    return InputError(f"{source}{row}{', ' + column if column else ''}: {what}{more}")


class CustomerRows(pa.DataFrameModel):
    customer_id: str = pa.Field(unique=True)
    name: str
    email: str = pa.Field(nullable=True)
    address: str = pa.Field(nullable=True)
    tax_id: str = pa.Field(nullable=True)
    country: str = pa.Field(nullable=True, str_matches=r"^[A-Z]{2}$")            # ISO 3166 alpha-2
    region: str = pa.Field(nullable=True, str_matches=r"^[A-Z0-9]{1,3}$")         # e.g. a US state: CA
    tax_exempt: str = pa.Field(nullable=True, isin=["true", "false", "yes", "no", "1", "0"])
    payment_terms_days: str = pa.Field(nullable=True, str_matches=r"^\d{1,4}$")


class SubscriptionRows(pa.DataFrameModel):
    subscription_id: str = pa.Field(unique=True)
    customer_id: str
    plan: str
    plan_version: str = pa.Field(nullable=True, str_matches=r"^[1-9]\d*$")
    start_date: str = pa.Field(str_matches=DATE)
    end_date: str = pa.Field(nullable=True, str_matches=DATE)
    budget: str = pa.Field(nullable=True, str_matches=MONEY)
    hard_cap: str = pa.Field(nullable=True, str_matches=MONEY)


def checked_customers(frame: pl.DataFrame, source: str) -> pl.DataFrame:
    """One row per customer: customer_id, name, email, address, tax_id, and for tax and payment
    terms country, region, tax_exempt, payment_terms_days (text; all but the first two optional)."""
    text = _text_frame(frame, ("customer_id", "name"),
                       ("email", "address", "tax_id", "country", "region", "tax_exempt", "payment_terms_days"),
                       source)
    text = text.with_columns(pl.col("tax_exempt").str.to_lowercase())
    try:
        return CustomerRows.validate(text, lazy=True)
    except SchemaErrors as exc:
        raise _first_failure(exc, source, text) from None


@dataclass(frozen=True)
class Subscription:
    subscription_id: str
    customer_id: str
    plan: str
    plan_version: int | None
    start_date: date
    end_date: date | None
    budget: Decimal | None
    hard_cap: Decimal | None
    row: int

    def active_in(self, period: Period) -> bool:
        return self.start_date < period.end and (self.end_date is None or self.end_date > period.start)

    def active_on(self, day: date) -> bool:
        return self.start_date <= day and (self.end_date is None or day < self.end_date)


def checked_subscriptions(frame: pl.DataFrame, source: str, customers: pl.DataFrame,
                          catalog: Catalog) -> list[Subscription]:
    """Every subscription row, checked alone, against customers and plans, and together
    (a customer has at most one subscription at any instant, so each event has one home)."""
    text = _text_frame(frame, ("subscription_id", "customer_id", "plan", "start_date"),
                       ("plan_version", "end_date", "budget", "hard_cap"), source)
    try:
        SubscriptionRows.validate(text, lazy=True)
    except SchemaErrors as exc:
        raise _first_failure(exc, source, text) from None
    known_customers = set(customers["customer_id"].to_list())
    subs = []
    for i, row in enumerate(text.iter_rows(named=True), start=1):
        where = f"{source} row {i}"
        start, end = _date(row, "start_date", where), _date(row, "end_date", where)
        if end is not None and end <= start:
            raise InputError(f"{where}, end_date: {end} is not after start_date {start} (end_date is exclusive)")
        if row["customer_id"] not in known_customers:
            raise InputError(f"{where}, customer_id: {row['customer_id']!r} is not in customers")
        if not catalog.versions(row["plan"]):
            raise InputError(f"{where}, plan: no plan file defines plan {row['plan']!r}")
        version = int(row["plan_version"]) if row["plan_version"] else None
        if version is not None and catalog.get(row["plan"], version) is None:
            raise InputError(f"{where}, plan_version: plan {row['plan']!r} has no version {version}")
        if version is None and catalog.in_force_on(row["plan"], start) is None:
            first = catalog.versions(row["plan"])[0].plan.effective_from
            raise InputError(f"{where}, start_date: plan {row['plan']!r} has no version in force on "
                             f"{start} (its first starts {first}); pin plan_version or move start_date")
        subs.append(Subscription(row["subscription_id"], row["customer_id"], row["plan"], version, start,
                                 end, _opt_money(row["budget"]), _opt_money(row["hard_cap"]), i))
    _refuse_overlaps(subs, source)
    return subs


def _date(row: dict, column: str, where: str) -> date | None:
    text = row[column]
    try:
        return None if text is None else date.fromisoformat(text)
    except ValueError as exc:
        raise InputError(f"{where}, {column}: {text!r} is not a date ({exc})") from None


def _opt_money(text: str | None) -> Decimal | None:
    return None if text is None else Decimal(text)


def _refuse_overlaps(subs: list[Subscription], source: str) -> None:
    by_customer: dict[str, list[Subscription]] = {}
    for s in subs:
        by_customer.setdefault(s.customer_id, []).append(s)
    for rows in by_customer.values():
        rows.sort(key=lambda s: (s.start_date, s.subscription_id))
        for a, b in pairwise(rows):
            if a.end_date is None or a.end_date > b.start_date:
                raise InputError(
                    f"{source} row {b.row}: subscription {b.subscription_id!r} starts {b.start_date} while "
                    f"{a.subscription_id!r} (row {a.row}) of the same customer is still active; end the "
                    f"old one where the new one starts")


@dataclass(frozen=True)
class Segment:
    """A stretch of one subscription on one plan version inside one period: the unit of rating.
    A subscription has one segment per period unless a migration moves it mid-period."""

    subscription: Subscription
    segment_no: int
    plan: PlanFile
    start_at: datetime
    end_at: datetime
    period: Period

    @property
    def days(self) -> int:
        return (self.end_at - self.start_at).days

    @property
    def is_full_period(self) -> bool:
        return self.days == self.period.days


def bound_versions(sub: Subscription, catalog: Catalog) -> list[tuple[date, PlanFile]]:
    """The versions a subscription is on over its life, each with the day it starts applying.

    A pinned `plan_version` is a contract and stays; a blank one binds to the version in force
    on start_date and keeps it (grandfathering) until a later version says `migrate_existing_on`.
    """
    if sub.plan_version is not None:
        return [(sub.start_date, catalog.get(sub.plan, sub.plan_version))]
    current = catalog.in_force_on(sub.plan, sub.start_date)
    timeline = [(sub.start_date, current)]
    for later in catalog.versions(sub.plan):
        moves_on = later.plan.migrate_existing_on
        if later.plan.version > current.plan.version and moves_on is not None and moves_on > sub.start_date:
            if moves_on <= timeline[-1][0]:
                timeline[-1] = (timeline[-1][0], later)
            else:
                timeline.append((moves_on, later))
            current = later
    return timeline


def plan_on(sub: Subscription, catalog: Catalog, day: date) -> PlanFile:
    """The plan version `sub` is billed on, on `day`."""
    return [plan for starts_on, plan in bound_versions(sub, catalog) if starts_on <= day][-1]


def segments_in(period: Period, subs: list[Subscription], catalog: Catalog) -> list[Segment]:
    """One row per subscription x plan version x stretch inside `period`, ordered by
    subscription_id then start."""
    out = []
    for sub in sorted(subs, key=lambda s: s.subscription_id):
        if not sub.active_in(period):
            continue
        timeline = bound_versions(sub, catalog)
        ends = [d for d, _ in timeline[1:]] + [sub.end_date]
        number = 0
        for (starts_on, plan), ends_on in zip(timeline, ends, strict=True):
            start = max(starts_on, period.start)
            end = min(ends_on or period.end, sub.end_date or period.end, period.end)
            if start < end:
                number += 1
                out.append(Segment(sub, number, plan, utc_midnight(start), utc_midnight(end), period))
    return out


def segments_by_subscription(segments) -> dict[str, list[Segment]]:
    """Each subscription's segments, in the order given (`segments_in`: in time), subscriptions
    in order of first appearance."""
    by_sub: dict[str, list[Segment]] = {}
    for seg in segments:
        by_sub.setdefault(seg.subscription.subscription_id, []).append(seg)
    return by_sub


@dataclass(frozen=True)
class SubscriptionPlans:
    """Per subscription id, the plan version it ends the period on: its last segment's. A
    subscription's invoice-level lines (credits bought, the hard cap, tax), its documents'
    rounding and its credits' breakage follow that plan, whatever it ran on earlier."""

    last_segment: dict[str, Segment]

    @cached_property
    def plan(self) -> dict[str, Plan]:
        return {sub: seg.plan.plan for sub, seg in self.last_segment.items()}

    @cached_property
    def plan_version(self) -> dict[str, tuple[str, int]]:
        """(plan, version), the key tax rules and inclusive prices are looked up by."""
        return {sub: (plan.plan, plan.version) for sub, plan in self.plan.items()}

    @cached_property
    def currency(self) -> dict[str, str]:
        return {sub: plan.currency for sub, plan in self.plan.items()}

    @cached_property
    def rounding(self) -> dict[str, str]:
        return {sub: plan.rounding for sub, plan in self.plan.items()}


def subscription_plans(segments) -> SubscriptionPlans:
    """The plan view of `segments` (in subscription then time order, as `segments_in` makes
    them): a later segment of a subscription replaces an earlier one."""
    return SubscriptionPlans({seg.subscription.subscription_id: seg for seg in segments})


def segments_frame(segments: list[Segment]) -> pl.DataFrame:
    """The segments as a table for SQL joins: one row per segment."""
    return pl.DataFrame(
        {
            "subscription_id": [s.subscription.subscription_id for s in segments],
            "segment_no": [s.segment_no for s in segments],
            "customer_id": [s.subscription.customer_id for s in segments],
            "plan": [s.plan.plan.plan for s in segments],
            "plan_version": [s.plan.plan.version for s in segments],
            "start_at": [s.start_at for s in segments],
            "end_at": [s.end_at for s in segments],
        },
        schema={"subscription_id": pl.String, "segment_no": pl.Int32, "customer_id": pl.String,
                "plan": pl.String, "plan_version": pl.Int32, "start_at": pl.Datetime("us", "UTC"),
                "end_at": pl.Datetime("us", "UTC")},
    )
