"""Reports with pictures: one HTML file per simulation and per closed period.

Each report is one self-contained HTML page (inline CSS, charts as inline SVG drawn by
matplotlib, no scripts, nothing fetched), so it opens offline and can be mailed as is. The page
is rendered by jinja2 with autoescaping: customer names and every other value from the store are
text; only the SVG that matplotlib wrote is inserted as markup. Charts plot integer minor units
and label the axis in the currency, and the SVG carries no date and a fixed id salt, so the
same figures give the same bytes.

This module also reads what reports and margins need from a store (closed periods, the optional
cost file); it imports nothing from the close, so the close can import `fetch_costs` from here.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import polars as pl
from babel.numbers import format_currency
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.preflight import closed_periods
from flows.retries import IO_RETRIES
from flows.store import open_store
from transforms.documents.render import visible_bidi
from transforms.errors import InputError
from transforms.finance.margins import (
    NO_COSTS,
    Costs,
    costs_from,
    margin_pct,
    margins_table,
    segment_plans_from_lines,
)
from transforms.finance.simulate import (
    NO_METER,
    breakage_by_period,
    customer_plans,
    margin_by_meter,
    revenue_by_plan_stream,
)
from transforms.layout import (
    CORRECTIONS_PREFIX,
    COSTS_KEY,
    MANIFEST,
    period_prefix,
    report_key,
    run_of_correction_manifest,
)
from transforms.money import format_money, from_minor
from transforms.periods import Period

STREAM_COLORS = {"usage": "#3b6ea8", "fixed_fee": "#8fb1d9", "credits": "#e0a33b"}
MODEL_COLORS = {"current": "#7d8799", "candidate": "#3b6ea8", "closed": "#7d8799"}
SHOCK_COLOR = "#c0392b"


# --- reading a store --------------------------------------------------------------------------

@task(name="fetch-costs", cache_policy=NO_CACHE, **IO_RETRIES)
def fetch_costs(store_uri: str) -> tuple[Costs, dict | None]:
    """The store's cost file, checked (no file: no costs), and its manifest entry (key, sha256)."""
    store = open_store(store_uri)
    if not store.exists(COSTS_KEY):
        return NO_COSTS, None
    data = store.read_bytes(COSTS_KEY)
    try:
        frame = pl.read_csv(io.BytesIO(data), infer_schema=False)
    except Exception as exc:  # any parser failure is the file's fault, said in one line
        raise InputError(f"{COSTS_KEY}: cannot be read ({str(exc).strip().splitlines()[0]})") from None
    return costs_from(frame, COSTS_KEY), {"key": COSTS_KEY, "sha256": hashlib.sha256(data).hexdigest()}


def _parquet(store, key: str) -> pl.DataFrame:
    return pl.read_parquet(io.BytesIO(store.read_bytes(key)))


@dataclass(frozen=True)
class ClosedPeriod:
    """What a close published for one period, plus the corrections issued for it since."""

    period: Period
    manifest: dict
    documents: pl.DataFrame      # invoices and correction documents of the period
    lines: pl.DataFrame          # the close's invoice lines
    revenue: pl.DataFrame
    usage_summary: pl.DataFrame
    quarantine: pl.DataFrame
    margins: pl.DataFrame | None  # the close's margins.parquet, where it wrote one


@task(name="load-closed-period", cache_policy=NO_CACHE, **IO_RETRIES)
def load_closed_period(store_uri: str, period: Period) -> ClosedPeriod:
    store = open_store(store_uri)
    prefix = period_prefix(period)
    if not store.exists(prefix + MANIFEST):
        raise InputError(f"{period} is not closed in {store.uri} (run `billrun close --period {period}` first)")
    documents = [_parquet(store, prefix + "invoices.parquet")]
    for obj in store.list(CORRECTIONS_PREFIX):
        if run_of_correction_manifest(obj.key):
            documents.append(_parquet(store, obj.key.removesuffix(MANIFEST) + "invoices.parquet"))
    return ClosedPeriod(
        period=period, manifest=json.loads(store.read_bytes(prefix + MANIFEST)),
        documents=pl.concat(documents, how="diagonal_relaxed").filter(pl.col("period") == str(period)),
        lines=_parquet(store, prefix + "invoice_lines.parquet"), revenue=_parquet(store, prefix + "revenue.parquet"),
        usage_summary=_parquet(store, prefix + "usage_summary.parquet"),
        quarantine=_parquet(store, prefix + "quarantine.parquet"),
        margins=_parquet(store, prefix + "margins.parquet") if store.exists(prefix + "margins.parquet") else None)


@task(name="load-revenue-history", cache_policy=NO_CACHE, **IO_RETRIES)
def load_revenue_history(store_uri: str) -> dict[str, pl.DataFrame]:
    """Period -> revenue rows, for every closed period (breakage over time)."""
    store = open_store(store_uri)
    return {str(p): _parquet(store, period_prefix(p) + "revenue.parquet") for p in closed_periods(store_uri)}


# --- charts -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Chart:
    title: str
    caption: str
    svg: Markup


@dataclass(frozen=True)
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    numeric: set[int] = field(default_factory=set)
    caption: str = ""


def _label(value: int, currency: str | None) -> str:
    """An axis or bar label: a count, or minor units in the currency ($1,234.5)."""
    if currency is None:
        return f"{value:,}"
    return format_currency(from_minor(value, currency), currency, format="¤#,##0.##", currency_digits=False,
                           locale="en_US")


def _money_axis(ax, currency: str | None) -> None:
    """Integer ticks in minor units, labelled in the currency (or as counts)."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
    # matplotlib hands the formatter its tick positions as floats; the locator makes them whole
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _label(int(round(v)), currency)))
    ax.grid(axis="y", color="#e3e6ec", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _figure(width: float = 7.5, height: float = 3.4):
    # matplotlib is imported here, not at the top: the close imports this module for
    # `fetch_costs` and draws nothing.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(min(width, 10.0), height), layout="constrained")
    return fig, fig.subplots()


def _svg(fig) -> Markup:
    """The figure as inline SVG: text kept as text, no date, ids salted with a constant."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": "billrun", "svg.fonttype": "none"}):
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    return Markup(text[text.index("<svg"):])  # drop the XML prolog and doctype: this SVG lives in HTML


def stacked_bars(title: str, caption: str, categories: list[str], stacks: dict[str, list[int]], currency: str | None,
                 colors: dict[str, str]) -> Chart:
    fig, ax = _figure(max(5.0, 1.1 * len(categories) + 2))
    bottoms = [0] * len(categories)
    for name, values in stacks.items():
        if any(values):
            ax.bar(categories, values, bottom=bottoms, label=name.replace("_", " "), color=colors.get(name, "#9aa3b2"),
                   width=0.6)
            bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    for x, total in enumerate(bottoms):
        if total:
            ax.annotate(_label(total, currency), (x, total), ha="center", va="bottom", fontsize=7, color="#1d2330")
    _money_axis(ax, currency)
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.tick_params(axis="x", labelsize=8, labelrotation=30 if len(categories) > 6 else 0)
    return Chart(title, caption, _svg(fig))


def grouped_bars(title: str, caption: str, categories: list[str], series: dict[str, list[int | None]],
                 currency: str | None, colors: dict[str, str], none_is: str = "unknown") -> Chart:
    """Side-by-side bars, each labelled with its value; a None value is a gap marked "unknown"
    (or, with `none_is=""`, a bar that is not there)."""
    fig, ax = _figure(max(5.0, 0.9 * len(categories) * max(len(series), 1) + 2))
    width = 0.8 / max(len(series), 1)
    positions = list(range(len(categories)))
    for i, (name, values) in enumerate(series.items()):
        xs = [p - 0.4 + width * (i + 0.5) for p in positions]
        ax.bar(xs, [v or 0 for v in values], width=width * 0.95, label=name, color=colors.get(name, "#9aa3b2"))
        for x, v in zip(xs, values, strict=True):
            if v is None and not none_is:
                continue
            text = none_is if v is None else _label(v, currency)
            ax.annotate(text, (x, max(v or 0, 0)), ha="center", va="bottom", fontsize=7, rotation=90,
                        color="#5b6475" if v is None else "#1d2330")
    ax.set_xticks(positions, categories)
    ax.axhline(0, color="#5b6475", linewidth=0.8)
    _money_axis(ax, currency)
    if len(series) > 1:
        ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.tick_params(axis="x", labelsize=8, labelrotation=30 if len(categories) > 5 else 0)
    return Chart(title, caption, _svg(fig))


def revenue_charts(entries: list[dict], scope: str) -> list[Chart]:
    """Revenue by plan and stream, one chart per currency. Entries may carry a `model` (current
    or candidate): each model x plan is then one bar."""
    charts = []
    for currency in sorted({e["currency"] for e in entries}):
        mine = [e for e in entries if e["currency"] == currency]
        bars = list(dict.fromkeys((e.get("model"), e["plan"]) for e in mine))
        labels = [f"{plan}\n({model})" if model else plan for model, plan in bars]
        streams = list(dict.fromkeys(s for s in STREAM_COLORS if any(e["stream"] == s for e in mine)))
        streams += sorted({e["stream"] for e in mine} - set(streams))
        stacks = {s: [sum(e["revenue_minor"] for e in mine if (e.get("model"), e["plan"]) == bar and e["stream"] == s)
                      for bar in bars] for s in streams}
        charts.append(stacked_bars(f"Revenue by plan and stream, {currency}",
                                   f"Revenue of the period (recognized + breakage) {scope}, by revenue stream.",
                                   labels, stacks, currency, STREAM_COLORS))
    return charts


def breakage_charts(history: list[dict], candidate: list[dict] | None = None, period: str | None = None) -> list[Chart]:
    """Breakage per closed period, one chart per currency with credits; a simulation adds its
    period's breakage under the candidate model beside it."""
    charts = []
    for currency in sorted({e["currency"] for e in history + (candidate or [])}):
        periods = [e["period"] for e in history if e["currency"] == currency]
        closed = [e["breakage_minor"] for e in history if e["currency"] == currency]
        series: dict[str, list[int | None]] = {"closed": closed}
        labels = periods
        if candidate is not None:
            labels = periods + [f"{period}\n(candidate)"]
            series = {"closed": closed + [None],
                      "candidate": [None] * len(periods) + [sum(e["breakage_minor"] for e in candidate
                                                                if e["currency"] == currency)]}
        charts.append(grouped_bars(f"Breakage over the closed periods, {currency}",
                                   "Credits that expired unused, recognized as breakage revenue, per period.",
                                   labels, series, currency, MODEL_COLORS, none_is=""))
    return charts


def changes_chart(bins: list[dict], shock_pct: str) -> Chart:
    labels = [b["label"] for b in bins]
    stacks = {"down, same or within the threshold": [b["customers"] - b["shock"] for b in bins],
              f"bill shock (above +{shock_pct}%)": [b["shock"] for b in bins]}
    return stacked_bars("Distribution of bill changes",
                        "Moved customers by the change of their bill for the period, in bins of 10 points.",
                        labels, stacks, None, {"down, same or within the threshold": MODEL_COLORS["candidate"],
                                               f"bill shock (above +{shock_pct}%)": SHOCK_COLOR})


def margin_charts(by_model: dict[str, list[dict]]) -> list[Chart]:
    """Margin by meter, one chart per currency, one series per model."""
    charts = []
    rows = [(model, e) for model, entries in by_model.items() for e in entries]
    for currency in sorted({e["currency"] for _, e in rows}):
        meters = sorted({e["meter"] for _, e in rows if e["currency"] == currency}, key=lambda m: (m == NO_METER, m))
        series = {model: [next((e["margin_minor"] for e in entries if e["currency"] == currency and e["meter"] == m), 0)
                          for m in meters] for model, entries in by_model.items()}
        charts.append(grouped_bars(f"Margin by meter, {currency}",
                                   "Billed revenue less cost of goods (costs/costs.csv); \"unknown\" where the "
                                   "cost file does not cost the meter's usage.",
                                   [m.replace(" ", "\n", 1) if m == NO_METER else m for m in meters], series, currency,
                                   {**MODEL_COLORS, "margin": MODEL_COLORS["candidate"]}))
    return charts


# --- pages ------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _environment() -> Environment:
    return Environment(loader=PackageLoader("transforms", "templates"),
                       autoescape=select_autoescape(default=True, default_for_string=True),
                       undefined=StrictUndefined, keep_trailing_newline=True, finalize=visible_bidi)


def render_page(title: str, facts: list[tuple[str, str]], notes: list[str], tables_before: list[Table],
                charts: list[Chart], tables_after: list[Table]) -> str:
    return _environment().get_template("report.html.j2").render(
        title=title, facts=facts, notes=notes, tables_before=tables_before, charts=charts, tables_after=tables_after)


def money(minor: int | None, currency: str) -> str:
    return "unknown" if minor is None else format_money(minor, currency)


def _pct(text: str | None) -> str:
    return "" if text is None else (text if text.startswith("-") else f"+{text}") + "%"


def simulation_html(result: dict, comparison: pl.DataFrame, charts: list[Chart]) -> str:
    totals = result["totals"]
    summary = Table(
        "Moved customers, per currency",
        ["", *[t["currency"] for t in totals]],
        [["customers moved", *[str(t["customers"]) for t in totals]],
         ["billed (closed period)", *[money(t["paid_minor"], t["currency"]) for t in totals]],
         ["would be billed", *[money(t["would_pay_minor"], t["currency"]) for t in totals]],
         ["difference", *[f"{money(t['difference_minor'], t['currency'])} {_pct(t['change_pct'])}" for t in totals]],
         ["revenue now / candidate", *[f"{money(t['revenue_current_minor'], t['currency'])} / "
                                       f"{money(t['revenue_candidate_minor'], t['currency'])}" for t in totals]],
         ["breakage now / candidate", *[f"{money(t['breakage_current_minor'], t['currency'])} / "
                                        f"{money(t['breakage_candidate_minor'], t['currency'])}" for t in totals]],
         ["margin now / candidate", *[f"{money(t['margin_current_minor'], t['currency'])} / "
                                      f"{money(t['margin_candidate_minor'], t['currency'])}" for t in totals]],
         [f"bill shock (above +{result['shock_pct']}%)", *[str(t["shock"]) for t in totals]],
         ["up, within threshold / same / down", *[f"{t['up']} / {t['same']} / {t['down']}" for t in totals]]],
        numeric=set(range(1, len(totals) + 1)))
    customers = Table(
        "Per customer",
        ["customer", "name", "plans now", "plans candidate", "billed", "would be billed", "difference", "change",
         "outcome", "breakage now", "breakage candidate", "margin now", "margin candidate"],
        [[r["customer_id"], r["name"], r["plans_before"], r["plans_after"], money(r["paid_minor"], r["currency"]),
          money(r["would_pay_minor"], r["currency"]), money(r["difference_minor"], r["currency"]),
          _pct(r["change_pct"]), r["outcome"], money(r["breakage_current_minor"], r["currency"]),
          money(r["breakage_candidate_minor"], r["currency"]), money(r["margin_current_minor"], r["currency"]),
          money(r["margin_candidate_minor"], r["currency"])]
         for r in comparison.sort("difference_minor", "customer_id", descending=[True, False]).iter_rows(named=True)],
        numeric={4, 5, 6, 7, 9, 10, 11, 12},
        caption="Sorted by difference, largest increase first. Amounts are what the period's documents bill.")
    facts = [("store", result["store"]), ("period", result["period"]), ("plan map", ", ".join(result["plan_map"])),
             ("customers", ", ".join(result["customers_filter"] or ["all on the mapped plans"])),
             ("closed by run", result["closed_run_id"]), ("simulation", result["simulation_id"])]
    return render_page(f"Simulation of {result['period']}: {', '.join(result['plan_map'])}", facts,
                       result["notes"], [summary], charts, [customers])


def period_html(period: ClosedPeriod, margins: pl.DataFrame, history: list[dict], costs_note: str | None,
                charts: list[Chart]) -> str:
    totals = period.manifest["totals"]
    facts = [("period", str(period.period)), ("closed by run", period.manifest["run_id"]),
             *[(f"billed {t['currency']}", f"{money(t['total_minor'], t['currency'])} over {t['invoices']} invoices")
               for t in totals]]
    by_meter = margin_by_meter(margins)
    table = Table("Margin by meter", ["currency", "meter", "revenue", "cost", "margin", "margin %"],
                  [[e["currency"], e["meter"], money(e["revenue_minor"], e["currency"]),
                    money(e["cost_minor"], e["currency"]), money(e["margin_minor"], e["currency"]),
                    _margin_pct(e)] for e in by_meter], numeric={2, 3, 4, 5})
    breakage = Table("Breakage per closed period", ["period", "currency", "breakage"],
                     [[e["period"], e["currency"], money(e["breakage_minor"], e["currency"])] for e in history],
                     numeric={2})
    return render_page(f"Closed period {period.period}", facts, [costs_note] if costs_note else [], [], charts,
                       [table, breakage])


def _margin_pct(entry: dict) -> str:
    value = margin_pct(entry["margin_minor"], entry["revenue_minor"])
    return "" if value is None else f"{value}%"


NO_COSTS_NOTE = (f"The store has no {COSTS_KEY}: margins are unknown where there is usage "
                 "(see docs/inputs.md for the cost file).")


# --- the period report ------------------------------------------------------------------------

@task(name="write-report", cache_policy=NO_CACHE, **IO_RETRIES)
def write_report(store_uri: str, key: str | None, out: str | None, html: str) -> str:
    """To a local file (`out`) or the store; returns where."""
    if out is not None:
        Path(out).write_text(html, encoding="utf-8")
        return out
    open_store(store_uri).put_bytes(key, html.encode("utf-8"))
    return f"{open_store(store_uri).uri.rstrip('/')}/{key}"


@flow(name="report-period", log_prints=False)
def report_period(store: str, period: str, out: str | None = None) -> dict:
    """One closed period in pictures: revenue by plan and stream, breakage over the closed
    periods, margin by meter. Written to billing/reports/period=P/report.html (or `out`)."""
    the_period = Period.parse(period)
    closed = load_closed_period(store, the_period)
    costs, costs_source = fetch_costs(store)
    history = breakage_by_period(load_revenue_history(store))
    segments = segment_plans_from_lines(closed.lines)
    margins = closed.margins if closed.margins is not None else margins_table(
        closed.lines, closed.usage_summary, segments, costs, the_period)
    charts = (revenue_charts(revenue_by_plan_stream(closed.revenue, customer_plans(segments)), "over all customers")
              + breakage_charts(history) + margin_charts({"margin": margin_by_meter(margins)}))
    html = period_html(closed, margins, history, None if costs_source or closed.margins is not None else NO_COSTS_NOTE,
                       charts)
    where = write_report(store, report_key(the_period), out, html)
    get_run_logger().info("report of %s: %s", the_period, where)
    return {"period": str(the_period), "report": where, "charts": len(charts)}
