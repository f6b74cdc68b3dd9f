"""What if these customers had been on another plan? Simulation and migration, the pure parts.

A simulation moves subscriptions to candidate plans in memory (`moved_subscriptions`), the close's
own steps re-rate the closed period's usage with them, and `compare` sets what each moved customer
was billed (every document issued for the period: the invoice and any correction) beside what it
would have been billed, with the breakage and margin of both models. Nothing here reads a store.

A migration (`migration`) is the same move made real from a date: the subscription's row ends on
the date and a new row on the new plan starts there, so closed periods keep the rows they were
billed with.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import date
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

import polars as pl

from transforms.credits.model import WalletReplay
from transforms.engine.invoices import Invoice, invoices_table, lines_table
from transforms.errors import InputError
from transforms.finance.margins import Costs, decimal_text_fixed, margins_table, segment_plans
from transforms.finance.revenue import revenue_table
from transforms.inputs.guards import closed_period_problem, notice_problem  # noqa: F401 - the migration's date rules
from transforms.inputs.plans import Catalog
from transforms.inputs.reference import Segment, Subscription, checked_subscriptions, plan_on, segments_in
from transforms.periods import Period

SHOCK_DEFAULT = Decimal("0.2")
NO_METER = "(fees and credits)"
"""How charts and tables name the margins row of lines that belong to no meter."""


@dataclass(frozen=True)
class PlanRef:
    """`api` (any version) or `api:2` (that version)."""

    plan: str
    version: int | None = None

    def __str__(self) -> str:
        return self.plan if self.version is None else f"{self.plan}:{self.version}"


@dataclass(frozen=True)
class Move:
    """Subscriptions on `old` move to `new`: to the version in force on their start date when
    `new` names none (as a blank plan_version would), else pinned to it."""

    old: PlanRef
    new: PlanRef

    def __str__(self) -> str:
        return f"{self.old}={self.new}"

    def takes(self, sub: Subscription, catalog: Catalog, period: Period) -> bool:
        """Whether `sub` is on `old`: its plan, and if `old` names a version, a version it is
        billed on in `period` (or, for a row outside the period, the one it starts on)."""
        if sub.plan != self.old.plan:
            return False
        if self.old.version is None:
            return True
        versions = {s.plan.plan.version for s in segments_in(period, [sub], catalog)}
        return self.old.version in (versions or {plan_on(sub, catalog, sub.start_date).plan.version})


def plan_ref(text: str, catalog: Catalog, where: str) -> PlanRef:
    """`plan` or `plan:version`, checked against the catalog."""
    plan, _, version_text = text.strip().partition(":")
    if not catalog.versions(plan):
        known = ", ".join(sorted({k[0] for k in catalog.files}))
        raise InputError(f"{where}: no plan file defines plan {plan!r} (plans: {known})")
    if not version_text:
        return PlanRef(plan)
    if not version_text.isdigit() or catalog.get(plan, int(version_text)) is None:
        versions = ", ".join(str(f.plan.version) for f in catalog.versions(plan))
        raise InputError(f"{where}: plan {plan!r} has no version {version_text!r} (versions: {versions})")
    return PlanRef(plan, int(version_text))


def plan_moves(texts: list[str], catalog: Catalog) -> tuple[Move, ...]:
    """`--plan-map OLD=NEW` arguments, checked: known plans and versions, each OLD once."""
    if not texts:
        raise InputError("--plan-map: give at least one OLD=NEW, e.g. --plan-map images=api")
    moves: list[Move] = []
    for text in texts:
        old_text, sep, new_text = text.partition("=")
        if not sep or not old_text.strip() or not new_text.strip():
            raise InputError(f"--plan-map {text!r} is not OLD=NEW (e.g. images=api, or api:1=api:2 for versions)")
        where = f"--plan-map {text}"
        move = Move(plan_ref(old_text, catalog, where), plan_ref(new_text, catalog, where))
        if move.old == move.new:
            raise InputError(f"--plan-map {text}: moves a plan onto itself")
        if any(m.old == move.old for m in moves):
            raise InputError(f"--plan-map {text}: {move.old} is mapped twice")
        moves.append(move)
    return tuple(moves)


def moved_subscriptions(subs: tuple[Subscription, ...], moves: tuple[Move, ...], catalog: Catalog,
                        period: Period, customers: frozenset[str] | None = None
                        ) -> tuple[tuple[Subscription, ...], frozenset[str]]:
    """Every subscription, those on a mapped plan (of `customers`, when given) moved to their new
    plan for their whole life, so a wallet replays as if they had always been there. Each moves
    at most once, by the plan it is on: `a=b` and `b=c` do not chain. Returns the subscriptions
    and the ids of those moved."""
    out, moved = [], set()
    for sub in subs:
        move = None
        if customers is None or sub.customer_id in customers:
            move = next((m for m in moves if m.takes(sub, catalog, period)), None)
        if move is None:
            out.append(sub)
            continue
        if move.new.version is None and catalog.in_force_on(move.new.plan, sub.start_date) is None:
            first = catalog.versions(move.new.plan)[0]
            raise InputError(f"--plan-map {move}: subscription {sub.subscription_id!r} starts {sub.start_date}, before "
                             f"plan {move.new.plan!r} has a version in force (its first starts "
                             f"{first.plan.effective_from}); map to {move.new.plan}:{first.plan.version} to pin one")
        out.append(replace(sub, plan=move.new.plan, plan_version=move.new.version))
        moved.add(sub.subscription_id)
    return tuple(out), frozenset(moved)


def _in_order(segment_plans: pl.DataFrame) -> pl.DataFrame:
    """Each customer's segments in time order."""
    return segment_plans.sort("customer_id", "start_on", "subscription_id", "segment_no", nulls_last=False)


def plan_labels(segment_plans: pl.DataFrame) -> dict[str, str]:
    """Customer -> the plan versions it is billed on in the period, in order: "images v1, pro v1"."""
    out: dict[str, list[str]] = defaultdict(list)
    for row in _in_order(segment_plans).iter_rows(named=True):
        label = f"{row['plan']} v{row['plan_version']}"
        if label not in out[row["customer_id"]]:
            out[row["customer_id"]].append(label)
    return {c: ", ".join(labels) for c, labels in out.items()}


def customer_plans(segment_plans: pl.DataFrame) -> dict[tuple[str, str], str]:
    """(customer, currency) -> the plan of its last segment in the period billing in that
    currency: where charts file its revenue."""
    return {(r["customer_id"], r["currency"]): r["plan"]
            for r in _in_order(segment_plans).iter_rows(named=True)}


@dataclass(frozen=True)
class ModelTables:
    """One billing model's tables for a period: what it bills, its revenue and margins, and which
    plan each subscription segment is on."""

    documents: pl.DataFrame   # every document billed for the period: customer_id, currency, total_minor
    revenue: pl.DataFrame     # revenue rows (transforms.finance.revenue)
    margins: pl.DataFrame     # margins rows (transforms.finance.margins)
    segments: pl.DataFrame    # segment_plans rows (transforms.finance.margins)


def rated_model_tables(period: Period, invoices: list[Invoice], replay: WalletReplay, segments: tuple[Segment, ...],
                       usage: pl.DataFrame, costs: Costs) -> ModelTables:
    """A re-rated model's results: the invoices it would issue, and the revenue and margins the
    close would write for them. `usage` is the billed units the margins cost (by day, or for the
    whole period: see `margins_table`)."""
    plans = segment_plans(segments)
    return ModelTables(invoices_table(invoices), revenue_table(period, invoices, replay, segments),
                       margins_table(lines_table(invoices), usage, plans, costs, period), plans)


def closed_model_tables(closed, segments: tuple[Segment, ...], costs: Costs) -> ModelTables:
    """The billed model's results: every document issued for `closed.period` (the close's and
    its corrections'), the close's revenue, and margins of its lines costed over its usage summary
    (`closed`: a closed period as read back from the store, flows.report.ClosedPeriod)."""
    plans = segment_plans(segments)
    return ModelTables(closed.documents, closed.revenue,
                       margins_table(closed.lines, closed.usage_summary, plans, costs, closed.period), plans)


@dataclass(frozen=True)
class Comparison:
    """Both models side by side, over the customers the simulation moved."""

    customers: pl.DataFrame       # one row per moved customer x currency (`compare`)
    totals: list[dict]            # one entry per currency (`summarize`)
    quarantined: dict             # usage the candidate plans would refuse (`newly_quarantined`)
    drift: list[str]              # customers not moved whose bill re-rates differently (`drifted_customers`)
    margins: pl.DataFrame         # the moved customers' margins rows of both models, `model` saying which
    moved_customers: frozenset[str]   # customers with a moved subscription active in the period


def compared_models(current: ModelTables, candidate: ModelTables, rerated, names: dict[str, str], shock: Decimal,
                    closed_quarantine: pl.DataFrame) -> Comparison:
    """The billed model (`current`) beside the candidate re-rate (`candidate`, from `rerated`:
    its reference, the subscription ids it moved and its checked usage). `names`: customer names by
    id; `closed_quarantine`: the rows the close quarantined."""
    segments, moved = rerated.reference.segments, rerated.moved
    ever_moved = frozenset(s.customer_id for s in rerated.reference.subscriptions if s.subscription_id in moved)
    in_period = frozenset(s.subscription.customer_id for s in segments if s.subscription.subscription_id in moved)
    comparison = compare(current, candidate, in_period, names, shock)
    margins = pl.concat([tables.margins.filter(pl.col("customer_id").is_in(list(in_period)))
                         .with_columns(pl.lit(model).alias("model"))
                         for model, tables in (("current", current), ("candidate", candidate))])
    return Comparison(comparison, summarize(comparison, current, candidate),
                      newly_quarantined(rerated.checked.quarantine, closed_quarantine, in_period),
                      drifted_customers(current, candidate, ever_moved), margins, in_period)


def _by_customer(frame: pl.DataFrame, value: pl.Expr, nullable: bool = False) -> dict[tuple[str, str], int | None]:
    """Per (customer_id, currency): the sum of `value`; with `nullable`, None if any term is."""
    if frame.height == 0:
        return {}
    grouped = frame.group_by("customer_id", "currency").agg(
        value.sum().alias("v"), value.is_null().any().alias("unknown"))
    return {(c, cur): (None if nullable and unknown else int(v or 0))
            for c, cur, v, unknown in grouped.iter_rows()}


def _breakage(revenue: pl.DataFrame) -> dict[tuple[str, str], int | None]:
    return _by_customer(revenue.filter(pl.col("stream") == "credits"), pl.col("breakage_minor"))


def change_pct(paid_minor: int, would_pay_minor: int) -> str | None:
    """The change as a percent of what was paid, one decimal; None when nothing was paid."""
    if paid_minor == 0:
        return None
    return decimal_text_fixed(Decimal(would_pay_minor - paid_minor) * 100 / Decimal(paid_minor))


def outcome(paid_minor: int, would_pay_minor: int, shock: Decimal) -> str:
    """`shock`: up by more than the threshold (or a bill where there was none); `up`: up by at
    most the threshold; `same`; `down`."""
    if would_pay_minor == paid_minor:
        return "same"
    if would_pay_minor < paid_minor:
        return "down"
    if paid_minor <= 0 or would_pay_minor - paid_minor > paid_minor * shock:
        return "shock"
    return "up"


COMPARISON_SCHEMA = {
    "customer_id": pl.String, "name": pl.String, "currency": pl.String, "plans_before": pl.String,
    "plans_after": pl.String, "paid_minor": pl.Int64, "would_pay_minor": pl.Int64, "difference_minor": pl.Int64,
    "change_pct": pl.String, "outcome": pl.String, "breakage_current_minor": pl.Int64,
    "breakage_candidate_minor": pl.Int64, "margin_current_minor": pl.Int64, "margin_candidate_minor": pl.Int64,
}


def compare(current: ModelTables, candidate: ModelTables, customers: frozenset[str], names: dict[str, str],
            shock: Decimal) -> pl.DataFrame:
    """One row per moved customer x currency: what it was billed for the period and what it
    would have been billed, the change, whether that is a bill shock, and the breakage and
    margin of its credits and usage under both models."""
    paid = _by_customer(current.documents, pl.col("total_minor"))
    would = _by_customer(candidate.documents, pl.col("total_minor"))
    breakage = (_breakage(current.revenue), _breakage(candidate.revenue))
    margin = (_by_customer(current.margins, pl.col("margin_minor"), nullable=True),
              _by_customer(candidate.margins, pl.col("margin_minor"), nullable=True))
    before, after = plan_labels(current.segments), plan_labels(candidate.segments)
    rows = []
    for key in sorted(k for k in set(paid) | set(would) if k[0] in customers):
        p, w = paid.get(key, 0), would.get(key, 0)
        rows.append({"customer_id": key[0], "name": names.get(key[0], ""), "currency": key[1],
                     "plans_before": before.get(key[0], ""), "plans_after": after.get(key[0], ""),
                     "paid_minor": p, "would_pay_minor": w, "difference_minor": w - p,
                     "change_pct": change_pct(p, w), "outcome": outcome(p, w, shock),
                     "breakage_current_minor": breakage[0].get(key, 0),
                     "breakage_candidate_minor": breakage[1].get(key, 0),
                     "margin_current_minor": margin[0].get(key), "margin_candidate_minor": margin[1].get(key)})
    return pl.DataFrame(rows, schema=COMPARISON_SCHEMA)


def _known_sum(values: list[int | None]) -> int | None:
    return None if any(v is None for v in values) else sum(values)


def summarize(comparison: pl.DataFrame, current: ModelTables, candidate: ModelTables) -> list[dict]:
    """One entry per currency over the moved customers: billed, revenue (recognized + breakage),
    breakage and margin under both models, and how many customers' bills jump (`shock`), rise
    within the threshold, stay or drop."""
    out = []
    for currency in sorted(set(comparison["currency"])):
        rows = comparison.filter(pl.col("currency") == currency)
        customers = set(rows["customer_id"])

        def revenue(tables: ModelTables, column: str, customers=customers, currency=currency) -> int:
            r = tables.revenue.filter(pl.col("customer_id").is_in(list(customers)) & (pl.col("currency") == currency))
            return int(r[column].sum() or 0)

        paid, would = int(rows["paid_minor"].sum()), int(rows["would_pay_minor"].sum())
        counts = dict(rows.group_by("outcome").len().iter_rows())
        out.append({
            "currency": currency, "customers": rows.height,
            "paid_minor": paid, "would_pay_minor": would, "difference_minor": would - paid,
            "change_pct": change_pct(paid, would),
            "revenue_current_minor": revenue(current, "recognized_minor") + revenue(current, "breakage_minor"),
            "revenue_candidate_minor": revenue(candidate, "recognized_minor") + revenue(candidate, "breakage_minor"),
            "breakage_current_minor": int(rows["breakage_current_minor"].sum()),
            "breakage_candidate_minor": int(rows["breakage_candidate_minor"].sum()),
            "margin_current_minor": _known_sum(rows["margin_current_minor"].to_list()),
            "margin_candidate_minor": _known_sum(rows["margin_candidate_minor"].to_list()),
            **{k: counts.get(k, 0) for k in ("shock", "up", "same", "down")},
        })
    return out


def newly_quarantined(candidate: pl.DataFrame, closed: pl.DataFrame, customers: frozenset[str]) -> dict:
    """Usage rows of the moved customers that the candidate plans would refuse (a meter they do
    not price, dimensions no charge fits) and the close billed: counted by meter and reason, so
    a model that cannot bill some usage says so instead of looking cheaper."""
    keys = closed.filter(pl.col("source_row").is_not_null()).select("source_key", "source_row")
    new = (candidate.filter(pl.col("customer_id").is_in(list(customers)) & pl.col("source_row").is_not_null())
           .join(keys, on=["source_key", "source_row"], how="anti"))
    return {"rows": new.height,
            "by_meter": dict(sorted(new.group_by("meter").len().iter_rows())),
            "by_reason": dict(sorted(new.group_by("reason").len().iter_rows()))}


def drifted_customers(current: ModelTables, candidate: ModelTables, moved: frozenset[str]) -> list[str]:
    """Customers not moved whose re-rated bill differs from what was issued: the store's usage,
    subscriptions or plans changed since the close, and the moved customers' figures carry that
    change too (`billrun status` says what changed; a backfill settles it)."""
    paid = _by_customer(current.documents, pl.col("total_minor"))
    would = _by_customer(candidate.documents, pl.col("total_minor"))
    return sorted({k[0] for k in set(paid) | set(would)
                   if k[0] not in moved and paid.get(k, 0) != would.get(k, 0)})


# --- what the charts show ---------------------------------------------------------------------

def revenue_by_plan_stream(revenue: pl.DataFrame, plans: dict[tuple[str, str], str],
                           customers: frozenset[str] | None = None) -> list[dict]:
    """One entry per currency x plan x stream: revenue of the period (recognized + breakage),
    each customer filed under its plan in that currency (`customer_plans`)."""
    totals: dict[tuple, int] = defaultdict(int)
    for r in revenue.iter_rows(named=True):
        if customers is None or r["customer_id"] in customers:
            key = (r["currency"], plans.get((r["customer_id"], r["currency"]), "(none)"), r["stream"])
            totals[key] += r["recognized_minor"] + r["breakage_minor"]
    return [{"currency": c, "plan": p, "stream": s, "revenue_minor": v} for (c, p, s), v in sorted(totals.items())]


def breakage_by_period(revenues: dict[str, pl.DataFrame]) -> list[dict]:
    """One entry per period x currency: the breakage recognized (credits that expired unused)."""
    out = []
    for period in sorted(revenues):
        credits = revenues[period].filter(pl.col("stream") == "credits")
        for currency, breakage in credits.group_by("currency").agg(pl.col("breakage_minor").sum()).sort(
                "currency").iter_rows():
            out.append({"period": period, "currency": currency, "breakage_minor": int(breakage)})
    return out


def margin_by_meter(margins: pl.DataFrame) -> list[dict]:
    """One entry per currency x meter: revenue, the cost known and the margin (None when some
    of the meter's usage has no cost in the cost file)."""
    out = []
    frame = margins.with_columns(pl.col("meter").fill_null(NO_METER))
    for currency, meter in sorted(set(frame.select("currency", "meter").iter_rows())):
        rows = frame.filter((pl.col("currency") == currency) & (pl.col("meter") == meter))
        unknown = rows["cost_minor"].null_count() > 0
        out.append({"currency": currency, "meter": meter, "revenue_minor": int(rows["revenue_minor"].sum()),
                    "cost_minor": None if unknown else int(rows["cost_minor"].sum()),
                    "margin_minor": None if unknown else int(rows["margin_minor"].sum())})
    return out


def change_bins(comparison: pl.DataFrame, shock: Decimal) -> list[dict]:
    """The distribution of bill changes in bins of 10 points: [-100, -90) ... [-10, 0), no
    change, (0, 10] ... (90, 100], above 100 (and a bill where there was none). Each bin counts
    its customers and, of those, the bill shocks."""
    labels = [f"{lo}% to {lo + 10}%" for lo in range(-100, 0, 10)] + ["no change"] + \
             [f"+{lo}% to +{lo + 10}%" for lo in range(0, 100, 10)] + ["above +100%"]
    counts = {label: [0, 0] for label in labels}
    for paid, would, result in comparison.select("paid_minor", "would_pay_minor", "outcome").iter_rows():
        if would == paid:
            label = "no change"
        elif paid <= 0:
            label = "above +100%" if would > paid else labels[0]
        elif would - paid > paid:
            label = "above +100%"
        else:
            tens = Decimal(would - paid) * 10 / Decimal(paid)  # the change in tens of percent
            if tens < 0:
                lo = max(int(tens.to_integral_value(rounding=ROUND_FLOOR)) * 10, -100)
                label = f"{lo}% to {lo + 10}%"
            else:  # up bins are closed above, so +20% exactly is not above a 20% threshold
                lo = (int(tens.to_integral_value(rounding=ROUND_CEILING)) - 1) * 10
                label = f"+{lo}% to +{lo + 10}%"
        counts[label][0] += 1
        counts[label][1] += result == "shock"
    return [{"label": label, "customers": n, "shock": s} for label, (n, s) in counts.items()]


# --- migrations -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Migration:
    """The subscriptions file after a migration, and one entry per subscription it moves."""

    subscriptions: pl.DataFrame
    changes: tuple[dict, ...]


def new_subscription_id(subscription_id: str, plan: str, on: date) -> str:
    """Deterministic, so running a migration twice cannot add a second row: sub_42-api-20261201."""
    return f"{subscription_id}-{plan}-{on:%Y%m%d}"


def migration(frame: pl.DataFrame, source: str, customers_table: pl.DataFrame, catalog: Catalog, old: PlanRef,
              new: PlanRef, on: date, customers: frozenset[str] | None,
              used_meters: dict[str, set[str]] | None = None) -> Migration:
    """Move the subscriptions on `old` (of `customers`, when given) to `new` from `on`.

    A subscription active on `on` ends there (end_date is exclusive) and a new row, on `new`,
    starts there and keeps its end date, budget and hard cap (those two only if the currency
    stays). One that starts on or after `on` has no billed past: its row changes plan in place.
    `frame` is the subscriptions file as read; every other row and column is kept as it is.
    A move is refused when `new` neither prices nor pays with credits a meter the subscription
    uses: one its current plan bills, or one in `used_meters` (subscription -> meters of its
    usage in the last closed period); its usage would be quarantined, never billed.
    """
    subs = checked_subscriptions(frame, source, customers_table, catalog)
    if customers is not None:
        unknown = sorted(customers - set(customers_table["customer_id"].to_list()))
        if unknown:
            raise InputError(f"--customers: {', '.join(unknown)} not in customers")
    if new.version is None and catalog.in_force_on(new.plan, on) is None:
        raise InputError(f"--to {new}: no version of {new.plan!r} is in force on {on}")
    move = Move(old, new)
    existing = set(frame["subscription_id"].cast(pl.String).to_list())
    rows = frame.cast({c: pl.String for c in frame.columns}).to_dicts()
    out, changes, unpriced = [], [], {}
    for row, sub in zip(rows, subs, strict=True):
        takes = ((customers is None or sub.customer_id in customers) and move.takes(sub, catalog, Period.containing(on))
                 and (sub.end_date is None or sub.end_date > on))
        if not takes:
            out.append(row)
            continue
        old_plan = plan_on(sub, catalog, max(sub.start_date, on))
        new_plan = (catalog.get(new.plan, new.version) if new.version
                    else catalog.in_force_on(new.plan, max(on, sub.start_date)))
        keep_money = old_plan.plan.currency == new_plan.plan.currency
        needed = billed_meters(old_plan.plan) | (used_meters or {}).get(sub.subscription_id, set())
        for meter in needed - billed_meters(new_plan.plan):
            unpriced.setdefault(meter, set()).add(sub.subscription_id)
        moved = {**row, "plan": new.plan, "plan_version": str(new.version) if new.version else None}
        if not keep_money:
            moved.update({k: None for k in ("budget", "hard_cap") if k in moved})
        change = {"customer_id": sub.customer_id, "subscription_id": sub.subscription_id,
                  "from": f"{old_plan.plan.plan} v{old_plan.plan.version}",
                  "to": f"{new_plan.plan.plan} v{new_plan.plan.version}" + ("" if new.version else " (in force)"),
                  "on": on.isoformat(),
                  "overrides_dropped": not keep_money and any(row.get(k) for k in ("budget", "hard_cap"))}
        if sub.start_date >= on:
            out.append(moved)
            changes.append({**change, "action": "moved in place", "new_subscription_id": sub.subscription_id})
            continue
        new_id = new_subscription_id(sub.subscription_id, new.plan, on)
        if new_id in existing:
            raise InputError(f"{source}: subscription {new_id!r} already exists; {sub.subscription_id!r} was moved "
                             f"before and then changed by hand; end it on {on} yourself")
        out.append({**row, "end_date": on.isoformat()})
        out.append({**moved, "subscription_id": new_id, "start_date": on.isoformat()})
        changes.append({**change, "action": "split", "new_subscription_id": new_id})
    if unpriced:
        subscriptions = set().union(*unpriced.values())
        raise InputError(f"--to {new}: the plan neither prices nor pays with credits {', '.join(sorted(unpriced))}, "
                         f"metered by {len(subscriptions)} subscription(s) on {old} (e.g. {min(subscriptions)}); "
                         f"their usage would go unbilled: move them to a plan that prices these meters")
    if customers is not None:
        missing = sorted(customers - {c["customer_id"] for c in changes})
        if missing:
            raise InputError(f"--customers: {', '.join(missing)} has no subscription on {old} active on or after {on}")
    after = pl.DataFrame(out, schema={c: pl.String for c in frame.columns})
    checked_subscriptions(after, source, customers_table, catalog)  # the file stays valid: no overlaps
    return Migration(after, tuple(changes))


def billed_meters(plan) -> set[str]:
    """The meters a plan prices (charges) or pays with credits (consume)."""
    return {c.meter for c in plan.charges} | (set(plan.credits.consume) if plan.credits else set())


