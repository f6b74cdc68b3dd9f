"""What a change to the plan catalog does to revenue: the pure parts of `billrun impact`.

The flow re-rates each closed period twice with the close's own steps, once with the catalog at
the base revision and once with the working tree's, and hands both results here as
`transforms.finance.simulate.ModelTables`. This module sets them side by side (per currency, per plan, per
customer), finds the bill shocks, the breakage and margin change and the subscriptions whose
contract is billed at another price (their customers need a notice), and writes the report as
markdown. The report's bytes depend only on its inputs: rows are sorted, nothing reads a clock.
Nothing here reads a store or git.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal, InvalidOperation

import polars as pl

from transforms.errors import InputError
from transforms.finance.simulate import ModelTables, change_pct, compare, outcome
from transforms.inputs.plans import Catalog, PlanFile
from transforms.inputs.reference import Subscription, bound_versions
from transforms.money import format_money, to_minor
from transforms.periods import Period

SHOCK_PCT_DEFAULT = Decimal("0.2")
SHOCK_AMOUNT_DEFAULT = Decimal("10")
"""A bill shock rises by more than 20% and by more than 10 of its currency's major unit."""
TOP_DEFAULT = 20

NOT_PRICING = {"description", "notice_days", "effective_from", "migrate_existing_on", "version"}
"""Plan fields that bind or announce a version but do not price it: two versions equal in every
other field bill every subscription the same."""


@dataclass(frozen=True)
class PeriodRerates:
    """One closed period re-rated with the base catalog and with the head catalog."""

    period: Period
    run_id: str        # the close that closed it (what the store's invoices are)
    base: ModelTables
    head: ModelTables


@dataclass(frozen=True)
class Thresholds:
    shock: Decimal          # a fraction: 0.2 is +20%
    shock_amount: Decimal   # in the major unit of each bill's currency
    top: int                # rows of the per-plan and per-customer tables before the rest is summed up


def thresholds(shock: str, shock_amount: str, top: int) -> Thresholds:
    """`--shock 0.2 --shock-amount 10 --top 20`, checked."""
    values = []
    for option, text in (("--shock", shock), ("--shock-amount", shock_amount)):
        try:
            value = Decimal(text)
        except InvalidOperation:
            value = None
        if value is None or not value.is_finite() or value < 0:
            raise InputError(f"{option} {text!r} is not a number of at least 0 "
                             f"({'0.2 means 20%' if option == '--shock' else 'in the bill currency, e.g. 10'})")
        values.append(value)
    if top < 1:
        raise InputError(f"--top {top}: show at least 1 row")
    return Thresholds(values[0], values[1], top)


# --- the catalog ------------------------------------------------------------------------------

def pricing(plan: PlanFile) -> dict:
    """What a version bills with: every field but those that only bind or announce it."""
    return plan.plan.model_dump(mode="json", exclude=NOT_PRICING)


def catalog_changes(base: Catalog, head: Catalog) -> list[dict]:
    """One entry per plan version added, removed or changed between the catalogs: `changed`
    prices differently, `dates or notice changed` binds subscriptions differently (what that does
    to them is in the notices), `reworded` differs in its text only (comments, description)."""
    out = []
    for key in sorted(set(base.files) | set(head.files)):
        b, h = base.files.get(key), head.files.get(key)
        if b is None:
            change = "added"
        elif h is None:
            change = "removed"
        elif b.sha256 == h.sha256:
            continue
        elif pricing(b) != pricing(h):
            change = "changed"
        elif _binding(b) != _binding(h):
            change = "dates or notice changed"
        else:
            change = "reworded"
        out.append({"plan": key[0], "version": key[1], "change": change})
    return out


def _binding(plan: PlanFile) -> tuple:
    return plan.plan.effective_from, plan.plan.migrate_existing_on, plan.plan.notice_days


def label(plan: PlanFile) -> str:
    return f"{plan.plan.plan} v{plan.plan.version}"


def migration_notices(subscriptions: list[Subscription], base: Catalog, head: Catalog, since: date,
                      closed_until: date) -> list[dict]:
    """One entry per subscription active on or after `since` that the head catalog bills at
    another price than the base from some day on: the version it is bound to changes (a new
    version that grandfathering does not protect, one that moves existing subscriptions, a pin
    to a version whose prices changed) or the version it is on changes its prices in place.

    Sorted by that day, earliest first. `from` is the first such day (not before `since` or the
    subscription's start); `notify_by` is that day less the head version's `notice_days`, where it
    sets them. `closed` says the day falls inside a closed period (`closed_until` is the end of the
    last one): those invoices stand as issued, and only a backfill would re-rate them."""
    out = []
    for sub in sorted(subscriptions, key=lambda s: s.subscription_id):
        if sub.end_date is not None and sub.end_date <= since:
            continue
        if not base.versions(sub.plan) or not head.versions(sub.plan):
            continue  # a plan one side lacks fails its re-rate before this is asked
        before, after = bound_versions(sub, base), bound_versions(sub, head)
        first = max(since, sub.start_date)
        days = sorted({first} | {max(d, first) for d, _ in before + after})
        for day in days:
            if sub.end_date is not None and day >= sub.end_date:
                break
            b, h = _on(before, day), _on(after, day)
            if pricing(b) == pricing(h) and b.plan.currency == h.plan.currency:
                continue
            if b.key == h.key:
                why = f"{label(b)} prices changed in place"
            elif h.plan.migrate_existing_on == day and day > sub.start_date:
                why = f"{label(h)} moves existing subscriptions on {day}"
            else:
                why = f"bound to {label(h)} instead of {label(b)}"
            notice = h.plan.notice_days
            out.append({"customer_id": sub.customer_id, "subscription_id": sub.subscription_id,
                        "plan": sub.plan, "base": label(b), "head": label(h), "from": day.isoformat(),
                        "notify_by": (day - timedelta(days=notice)).isoformat() if notice is not None else None,
                        "closed": day < closed_until, "why": why})
            break
    return sorted(out, key=lambda n: (n["from"], n["customer_id"], n["subscription_id"]))


def _on(timeline: list[tuple[date, PlanFile]], day: date) -> PlanFile:
    """The version of a `bound_versions` timeline on `day` (its first before it starts)."""
    current = timeline[0][1]
    for starts_on, plan in timeline:
        if starts_on <= day:
            current = plan
    return current


# --- the figures ------------------------------------------------------------------------------

def period_totals(rerated: list[PeriodRerates]) -> list[dict]:
    """One entry per period x currency: what the documents of the period total with each catalog."""
    out = []
    for r in rerated:
        base, head = _sums(r.base.documents, "currency"), _sums(r.head.documents, "currency")
        for currency in sorted(set(base) | set(head)):
            b, h = base.get(currency, 0), head.get(currency, 0)
            out.append({"period": str(r.period), "currency": currency, "base_minor": b, "head_minor": h,
                        "change_minor": h - b, "change_pct": change_pct(b, h)})
    return out


def currency_totals(periods: list[dict]) -> list[dict]:
    """The period totals summed over the periods, one entry per currency."""
    sums: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for t in periods:
        sums[t["currency"]][0] += t["base_minor"]
        sums[t["currency"]][1] += t["head_minor"]
    return [{"currency": c, "base_minor": b, "head_minor": h, "change_minor": h - b, "change_pct": change_pct(b, h)}
            for c, (b, h) in sorted(sums.items())]


def _sums(frame: pl.DataFrame, *keys: str, value: str = "total_minor") -> dict:
    if frame.height == 0:
        return {}
    grouped = frame.group_by(*keys).agg(pl.col(value).sum())
    return {(row[0] if len(keys) == 1 else row[:-1]): int(row[-1]) for row in grouped.iter_rows()}


def customer_changes(rerated: list[PeriodRerates], names: dict[str, str], thresholds: Thresholds) -> list[dict]:
    """One entry per customer x currency billed under either catalog, summed over the periods:
    the bills with each, the change, whether it is a bill shock, breakage and margin with each.
    Sorted by the size of the change, largest first."""
    acc: dict[tuple[str, str], dict] = {}
    for r in rerated:
        comparison = compare(r.base, r.head, frozenset(names), names, thresholds.shock)
        for row in comparison.iter_rows(named=True):
            key = (row["customer_id"], row["currency"])
            entry = acc.setdefault(key, {
                "customer_id": key[0], "name": row["name"], "currency": key[1], "plans_base": [], "plans_head": [],
                "base_minor": 0, "head_minor": 0, "breakage_base_minor": 0, "breakage_head_minor": 0,
                "margin_base_minor": 0, "margin_head_minor": 0})
            for side, labels in (("base", row["plans_before"]), ("head", row["plans_after"])):
                for one in filter(None, (labels or "").split(", ")):
                    if one not in entry[f"plans_{side}"]:
                        entry[f"plans_{side}"].append(one)
            entry["base_minor"] += row["paid_minor"]
            entry["head_minor"] += row["would_pay_minor"]
            entry["breakage_base_minor"] += row["breakage_current_minor"]
            entry["breakage_head_minor"] += row["breakage_candidate_minor"]
            for side, column in (("base", "margin_current_minor"), ("head", "margin_candidate_minor")):
                known = entry[f"margin_{side}_minor"]
                entry[f"margin_{side}_minor"] = None if known is None or row[column] is None else known + row[column]
    out = []
    for entry in acc.values():
        b, h = entry["base_minor"], entry["head_minor"]
        result = outcome(b, h, thresholds.shock)
        out.append({**entry, "plans_base": ", ".join(entry["plans_base"]),
                    "plans_head": ", ".join(entry["plans_head"]), "change_minor": h - b,
                    "change_pct": change_pct(b, h), "outcome": result,
                    "shock": result == "shock" and h - b > to_minor(thresholds.shock_amount, entry["currency"])})
    return sorted(out, key=lambda e: (-abs(e["change_minor"]), e["customer_id"], e["currency"]))


def plan_changes(rerated: list[PeriodRerates]) -> list[dict]:
    """One entry per plan x currency: what the documents of its subscriptions total with each
    catalog over the periods, the versions billed with each, and how many customers' bills on
    it change. Sorted by the size of the change, largest first."""
    totals: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    versions: dict[tuple[str, str], tuple[set, set]] = defaultdict(lambda: (set(), set()))
    by_customer: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    for r in rerated:
        for side, tables in enumerate((r.base, r.head)):
            plan_of = dict(tables.segments.select("subscription_id", "plan").iter_rows())
            for plan, version, currency in tables.segments.select("plan", "plan_version", "currency").iter_rows():
                versions[(plan, currency)][side].add(version)
            docs = tables.documents.with_columns(
                pl.col("subscription_id").replace_strict(plan_of, default="(no plan)", return_dtype=pl.String)
                .alias("plan"))
            for (plan, currency, customer), total in _sums(docs, "plan", "currency", "customer_id").items():
                totals[(plan, currency)][side] += total
                by_customer[(plan, currency, customer)][side] += total
    changed = defaultdict(int)
    for (plan, currency, _), (b, h) in by_customer.items():
        changed[(plan, currency)] += b != h
    out = []
    for (plan, currency), (b, h) in totals.items():
        vb, vh = versions[(plan, currency)]
        out.append({"plan": plan, "currency": currency, "versions_base": _versions(vb),
                    "versions_head": _versions(vh), "base_minor": b, "head_minor": h, "change_minor": h - b,
                    "change_pct": change_pct(b, h), "customers_changed": changed[(plan, currency)]})
    return sorted(out, key=lambda e: (-abs(e["change_minor"]), e["plan"], e["currency"]))


def _versions(versions: set[int]) -> str:
    return ", ".join(f"v{v}" for v in sorted(versions))


def breakage_and_margin(rerated: list[PeriodRerates], credit_plans: set[str], has_costs: bool) -> dict:
    """Per currency, and per credit plan x currency: the breakage recognized with each catalog
    (credits that expired unused); with a cost file, the margin (revenue less cost of goods) per
    currency and plan with each, unknown (None) where some usage has no cost."""
    breakage: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    margin: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0])
    for r in rerated:
        for side, tables in enumerate((r.base, r.head)):
            plan_of = dict(((c, cur), p) for c, cur, p in _in_order(tables.segments)
                           .select("customer_id", "currency", "plan").iter_rows())
            credits = tables.revenue.filter(pl.col("stream") == "credits")
            for customer, currency, minor in credits.select("customer_id", "currency", "breakage_minor").iter_rows():
                plan = plan_of.get((customer, currency), "(no plan)")
                breakage[(plan, currency)][side] += int(minor)
            for plan, currency, known, minor in (
                    tables.margins.group_by("plan", "currency")
                    .agg(pl.col("margin_minor").is_not_null().all().alias("known"), pl.col("margin_minor").sum())
                    .iter_rows()):
                before = margin[(plan or "(no plan)", currency)][side]
                margin[(plan or "(no plan)", currency)][side] = (
                    None if before is None or not known else before + int(minor or 0))
    by_plan = [{"plan": p, "currency": c, "base_minor": b, "head_minor": h, "change_minor": h - b}
               for (p, c), (b, h) in sorted(breakage.items()) if p in credit_plans or b or h]
    out = {"breakage": _per_currency(by_plan), "breakage_by_plan": by_plan, "margin": None, "margin_by_plan": None}
    if has_costs:
        rows = [{"plan": p, "currency": c, "base_minor": b, "head_minor": h,
                 "change_minor": None if b is None or h is None else h - b}
                for (p, c), (b, h) in sorted(margin.items())]
        out.update(margin=_per_currency(rows), margin_by_plan=rows)
    return out


def _in_order(segments: pl.DataFrame) -> pl.DataFrame:
    return segments.sort("customer_id", "start_on", "subscription_id", "segment_no", nulls_last=False)


def _per_currency(rows: list[dict]) -> list[dict]:
    sums: dict[str, list] = defaultdict(lambda: [0, 0])
    for row in rows:
        for side, column in enumerate(("base_minor", "head_minor")):
            known = sums[row["currency"]][side]
            sums[row["currency"]][side] = None if known is None or row[column] is None else known + row[column]
    return [{"currency": c, "base_minor": b, "head_minor": h, "change_minor": None if b is None or h is None else h - b}
            for c, (b, h) in sorted(sums.items())]


def attach_changes(notices: list[dict], customers: list[dict]) -> list[dict]:
    """Each notice with its customer's bill change over the re-rated periods (per currency)."""
    change: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for c in sorted(customers, key=lambda c: (c["customer_id"], c["currency"])):
        change[c["customer_id"]].append((c["currency"], c["change_minor"]))
    return [{**n, "changes": [{"currency": cur, "change_minor": m} for cur, m in change.get(n["customer_id"], [])]}
            for n in notices]


# --- the report -------------------------------------------------------------------------------

_MARKDOWN_SPECIAL = str.maketrans({c: f"\\{c}" for c in "\\`*_[]|~"} |
                                  {"<": "&lt;", ">": "&gt;", "&": "&amp;", "@": "&#64;", "\n": " ", "\r": " "})


def md(text: object) -> str:
    """Text from the store (names, ids) as literal markdown: no links, no HTML, no @mentions."""
    return str(text).translate(_MARKDOWN_SPECIAL)


def _money(minor: int | None, currency: str) -> str:
    return "unknown" if minor is None else format_money(minor, currency)


def _change(minor: int | None, currency: str) -> str:
    """A change with its sign: +$1.50, -$0.25, $0.00."""
    if minor is None:
        return "unknown"
    return ("+" if minor > 0 else "") + format_money(minor, currency)


def _pct(text: str | None, base_minor: int, head_minor: int) -> str:
    """The change in percent of the base bill, signed as the change is (+0.0% is a rise under
    0.05%); `new` for a bill where the base had none."""
    if text is None:
        return "new" if head_minor else ""
    sign = "+" if head_minor > base_minor else ""
    return f"{sign}{text.removeprefix('-') if head_minor == base_minor else text}%"


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    align = ["--:" if i in right else "---" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"] + \
        ["| " + " | ".join(row) + " |" for row in rows]


def impact_markdown(report: dict) -> str:
    """The report as GitHub-flavoured markdown: the same bytes for the same report."""
    base = report["base"]
    lines = [f"# Pricing impact: {md(base['given'])} ({base['commit'][:12]}) → working tree", ""]
    periods = [p["period"] for p in report["periods"]]
    which = (f"The last closed period ({periods[0]})" if len(periods) == 1
             else f"The last {len(periods)} closed periods ({', '.join(periods)})")
    lines += [f"{which} of the store {md(report['store'])}, re-rated twice with the close's own steps: with the "
              f"plan files of `{md(base['folder'] or './')}` at {base['commit'][:12]} (**base**) and as they are "
              f"in the working tree (**head**). Amounts are what the period's invoices total with each, exact to "
              f"the minor unit.", ""]
    changes = report["catalog_changes"]
    if changes:
        lines.append("**Plan files:** " + "; ".join(f"{md(c['plan'])} v{c['version']} {c['change']}"
                                                   for c in changes) + ".")
    else:
        lines.append("**Plan files:** no plan version differs between base and head.")
    lines.append("")

    lines += ["## Totals", ""]
    lines += _table(["period", "currency", "base", "head", "change", "change %"],
                    [[t["period"], t["currency"], _money(t["base_minor"], t["currency"]),
                      _money(t["head_minor"], t["currency"]), _change(t["change_minor"], t["currency"]),
                      _pct(t["change_pct"], t["base_minor"], t["head_minor"])] for t in report["totals"]]
                    + ([[f"**all {len(report['periods'])}**", t["currency"], _money(t["base_minor"], t["currency"]),
                         _money(t["head_minor"], t["currency"]), _change(t["change_minor"], t["currency"]),
                         _pct(t["change_pct"], t["base_minor"], t["head_minor"])]
                        for t in report["currency_totals"]] if len(report["periods"]) > 1 else []),
                    {2, 3, 4, 5})
    lines.append("")

    top = report["thresholds"]["top"]
    lines += ["## By plan", ""]
    plans = report["plans"]
    lines += _table(["plan", "currency", "versions billed (base → head)", "base", "head", "change", "change %",
                     "customers changed"],
                    [[md(p["plan"]), p["currency"], f"{p['versions_base'] or '-'} → {p['versions_head'] or '-'}",
                      _money(p["base_minor"], p["currency"]), _money(p["head_minor"], p["currency"]),
                      _change(p["change_minor"], p["currency"]),
                      _pct(p["change_pct"], p["base_minor"], p["head_minor"]),
                      str(p["customers_changed"])] for p in plans[:top]] + _rest(plans[top:], 8, 1, 3, "plans"),
                    {3, 4, 5, 6, 7})
    lines.append("")

    customers = report["customers"]
    moved = [c for c in customers if c["change_minor"]]
    up, down = sum(c["change_minor"] > 0 for c in moved), sum(c["change_minor"] < 0 for c in moved)
    lines += ["## By customer", ""]
    still = len(customers) - len(moved)
    lines.append(f"{_count(len(moved), 'customer bill changes', 'customer bills change')} ({up} up, {down} down), "
                 f"{still} {'does' if still == 1 else 'do'} not"
                 + (f"; the {min(top, len(moved))} largest changes:" if moved else "."))
    lines.append("")
    if moved:
        lines += _customer_table(moved, top)
        lines.append("")

    t = report["thresholds"]
    shocks = [c for c in customers if c["shock"]]
    lines += ["## Bill shock", ""]
    lines.append(f"A bill shock rises by more than {t['shock_pct']}% and by more than {t['shock_amount']} of its "
                 f"currency (`--shock`, `--shock-amount`): "
                 + (f"{len(shocks)} customer bills." if shocks else "none."))
    lines.append("")
    if shocks:
        lines += _customer_table(shocks, top)
        lines.append("")

    lines += ["## Breakage and margin", ""]
    bm = report["breakage_and_margin"]
    if bm["breakage_by_plan"]:
        lines.append("Breakage: the credits that expired unused, recognized as revenue.")
        lines.append("")
        lines += _table(["plan", "currency", "breakage base", "breakage head", "change"],
                        [[md(b["plan"]), b["currency"], _money(b["base_minor"], b["currency"]),
                          _money(b["head_minor"], b["currency"]), _change(b["change_minor"], b["currency"])]
                         for b in bm["breakage_by_plan"]], {2, 3, 4})
    else:
        lines.append("Breakage: no plan sells credits in these periods.")
    lines.append("")
    if bm["margin_by_plan"] is None:
        lines.append("Margin: the store has no cost file (`costs/costs.csv`), so margins are not known.")
    else:
        lines.append("Margin: revenue less the cost of goods of the usage (`costs/costs.csv`); unknown where some "
                     "usage has no cost.")
        lines.append("")
        lines += _table(["plan", "currency", "margin base", "margin head", "change"],
                        [[md(m["plan"]), m["currency"], _money(m["base_minor"], m["currency"]),
                          _money(m["head_minor"], m["currency"]), _change(m["change_minor"], m["currency"])]
                         for m in bm["margin_by_plan"]]
                        + [["**all plans**", m["currency"], _money(m["base_minor"], m["currency"]),
                            _money(m["head_minor"], m["currency"]), _change(m["change_minor"], m["currency"])]
                           for m in bm["margin"]], {2, 3, 4})
    lines.append("")

    notices = report["notices"]
    lines += ["## Migration notices", ""]
    if notices:
        customers_told = len({n["customer_id"] for n in notices})
        lines.append(f"{len(notices)} subscriptions ({customers_told} customers) active since "
                     f"{report['notices_since']} are billed at another price with the head plans from the day "
                     f"shown: tell them before it. A day inside a closed period (marked *closed*) does not change "
                     f"invoices already issued; `billrun backfill` would.")
        lines.append("")
        lines += _table(["customer", "subscription", "base", "head", "from", "notify by", "why",
                         "change in these periods"],
                        [[md(n["customer_id"]), md(n["subscription_id"]), md(n["base"]), md(n["head"]),
                          n["from"] + (" *closed*" if n["closed"] else ""), n["notify_by"] or "-", md(n["why"]),
                          ", ".join(_change(c["change_minor"], c["currency"]) for c in n["changes"]) or "-"]
                         for n in notices[:top]] + ([[f"… {len(notices) - top} more", "", "", "", "", "", "", ""]]
                                                    if len(notices) > top else []), set())
    else:
        lines.append(f"None: every subscription active since {report['notices_since']} is billed at the same prices "
                     f"with both catalogs.")
    lines.append("")
    if report["notes"]:
        lines += ["## Notes", ""] + [f"- {md(n)}" for n in report["notes"]] + [""]
    return "\n".join(lines)


def _customer_row(c: dict) -> list[str]:
    return [md(c["customer_id"]), md(c["name"]), md(f"{c['plans_base'] or '-'} → {c['plans_head'] or '-'}"),
            c["currency"], _money(c["base_minor"], c["currency"]), _money(c["head_minor"], c["currency"]),
            _change(c["change_minor"], c["currency"]), _pct(c["change_pct"], c["base_minor"], c["head_minor"])]


def _customer_table(customers: list[dict], top: int) -> list[str]:
    """The `top` customers' rows, then the rest summed up per currency."""
    return _table(["customer", "name", "plans (base → head)", "currency", "base", "head", "change", "change %"],
                  [_customer_row(c) for c in customers[:top]] + _rest(customers[top:], 8, 3, 4, "customers"),
                  {4, 5, 6, 7})


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _rest(rows: list[dict], width: int, currency_at: int, base_at: int, what: str) -> list[list[str]]:
    """The rows left out of a table, summed up per currency in one row each (currency, base, head
    and change in their columns)."""
    sums: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for row in rows:
        s = sums[row["currency"]]
        s[0], s[1], s[2] = s[0] + 1, s[1] + row["base_minor"], s[2] + row["head_minor"]
    out = []
    for currency, (n, b, h) in sorted(sums.items()):
        row = [""] * width
        row[0] = f"… {n} more {what if n != 1 else what[:-1]}"
        row[currency_at] = currency
        row[base_at:base_at + 3] = [_money(b, currency), _money(h, currency), _change(h - b, currency)]
        out.append(row)
    return out
