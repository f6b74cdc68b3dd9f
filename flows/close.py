"""The monthly close as a Prefect flow.

fetch inputs -> check customers and subscriptions -> normalize usage -> settle usage -> rate
invoices -> write outputs -> publish. IO tasks retry with backoff; rating is pure and never
retried. Outputs are written to a local work folder, staged in the store under
`billing/_state/runs/<run_id>/`, copied into `billing/period=P/`, and the manifest is written
last with a create-if-absent, which is the commit point: two closes of one period cannot both
publish, and a close killed before it leaves no manifest, so the period stays open.
"""
from __future__ import annotations

import hashlib
import heapq
import io
import json
import shutil
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib.metadata import version as package_version
from itertools import groupby
from operator import itemgetter
from pathlib import Path
from typing import Iterator

import polars as pl
import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from flows import tables as lakehouse
from flows.billed_index import committed_index, index_billed, index_key, record_billed
from flows.documents_out import write_invoice_documents
from flows.embedded import mark_owner, reclaim_stale_work
from flows.ingest import (
    CUSTOMERS_KEYS,
    SUBSCRIPTIONS_KEYS,
    is_adjustments_key,
    is_purchases_key,
    is_usage_key,
    read_table,
)
from flows.keys import MANIFEST, SELLER_KEY, period_prefix  # noqa: F401 - the close's layout, shared
from flows.locks import Fence, Hold, after_commit, fault_point, period_lock, tidy_closed, warn
from flows.preflight import close_summary, closed_periods
from flows.report import fetch_costs
from flows.retries import IO_RETRIES
from flows.secrets import keep_secrets_out_of_logs
from flows.shards import (
    Normalized,
    drop_scratch,
    local_workers,
    normalize_shards,
    scratch_for,
    settle_shards,
    shard_runner,
)
from flows.statement import billed_events_table, with_local_lineage
from flows.store import open_store, store_identity
from transforms.adjustments import (
    Adjustment,
    adjustment_counts,
    adjustment_rows,
    billed_by_periods,
    billed_table,
    checked_rows,
    period_adjustments,
)
from transforms.alerts import alerts_table, credit_alerts, price_change_notices
from transforms.collector import cycle_collector_paused
from transforms.credits.events import credit_meters
from transforms.credits.grants import history_grants
from transforms.credits.ledger import balances_table, ledger_table
from transforms.credits.model import CreditEvent, Outcome, Purchase
from transforms.credits.purchases import purchases_from
from transforms.credits.reports import credit_report, credit_summaries
from transforms.credits.wallet import replay
from transforms.engine import rated_invoices
from transforms.errors import BillrunError, InputError
from transforms.guards import close_too_early, close_without_usage, rows_in_period
from transforms.invoices import Invoice, invoices_table, lines_table
from transforms.margins import margins_table, segment_plans
from transforms.periods import Period
from transforms.plans import Catalog, PlanFile, load_catalog
from transforms.reference import (
    Segment,
    Subscription,
    checked_customers,
    checked_subscriptions,
    plan_on,
    segments_in,
    subscription_plans,
)
from transforms.revenue import journal, revenue_table, tax_rows
from transforms.settle import Settlement, split_at_replay
from transforms.spend import spend_alerts, usage_spend_by_subscription
from transforms.tax.rules import RULES_KEY, RulesProvider, load_rules
from transforms.terms import seller_block as terms_seller_block

PARQUET = {"compression": "zstd", "statistics": True, "row_group_size": 262_144}
"""How every published table is written. The row group size is fixed: without it Polars cuts a
row group per in-memory chunk, and a sorted table's chunks follow the machine's thread count, so
the same close wrote different bytes on a 2-core and an 8-core machine."""

QUARANTINE_SCHEMA = {
    "source_key": pl.String, "source_row": pl.Int64, "event_id": pl.String, "customer_id": pl.String,
    "meter": pl.String, "quantity": pl.String, "timestamp": pl.String, "dims": pl.String,
    "reason": pl.String, "detail": pl.String, "source": pl.String,
}


class AlreadyClosed(BillrunError):
    """Raised only where a caller must stop; a close of a closed period just reports it."""


class LostRace(BillrunError):
    """Another close of the same period published first."""


@dataclass(frozen=True)
class InputObject:
    key: str
    size: int
    sha256: str
    path: Path
    etag: str | None = None

    def manifest_entry(self) -> dict:
        entry = {"key": self.key, "size": self.size, "sha256": self.sha256}
        if self.etag:
            entry["etag"] = self.etag
        return entry


@dataclass(frozen=True)
class Inputs:
    usage: tuple[InputObject, ...]
    customers: InputObject
    subscriptions: InputObject
    seller: InputObject | None
    purchases: tuple[InputObject, ...] = ()
    tax_rules: InputObject | None = None
    adjustments: tuple[InputObject, ...] = ()

    @property
    def all(self) -> tuple[InputObject, ...]:
        """Every input object, ordered by key (for manifests and run ids)."""
        rest = ((self.customers, self.subscriptions) + ((self.seller,) if self.seller else ())
                + ((self.tax_rules,) if self.tax_rules else ()))
        return tuple(sorted(self.usage + self.purchases + self.adjustments + rest, key=lambda o: o.key))


@dataclass(frozen=True)
class Reference:
    customers: pl.DataFrame
    subscriptions: tuple[Subscription, ...]
    segments: tuple[Segment, ...]
    purchases: tuple[Purchase, ...] = ()
    seller: dict = field(default_factory=dict)       # transforms.terms.seller_block
    tax: RulesProvider | None = None                  # None: the store bills no tax
    adjustments: tuple[Adjustment, ...] = ()          # the period's, each resolved to its invoice
    adjustments_table: pl.DataFrame | None = None     # every adjustment row of the period; None: no input


@dataclass
class CloseResult:
    period: str
    status: str  # closed | already_closed
    run_id: str
    store: str
    rows: dict[str, int] = field(default_factory=dict)
    totals: list[dict] = field(default_factory=list)
    invoices: int = 0
    outputs: list[str] = field(default_factory=list)
    quarantined_by_reason: dict[str, int] = field(default_factory=dict)
    adjustments: dict | None = None  # the manifest's account of adjustment rows; None without the input

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _one_of(store, keys: tuple[str, ...], what: str) -> str | None:
    present = [k for k in keys if store.exists(k)]
    if len(present) > 1:
        raise InputError(f"{store.uri}: both {' and '.join(present)} exist; keep one {what} file")
    return present[0] if present else None


@task(name="fetch-inputs", cache_policy=NO_CACHE, **IO_RETRIES)
def fetch_inputs(store_uri: str, cache_dir: Path) -> Inputs:
    """List and fetch every input object; hash each (content, never modification times)."""
    logger = get_run_logger()
    started = time.perf_counter()
    store = open_store(store_uri)
    customers_key = _one_of(store, CUSTOMERS_KEYS, "customers")
    subscriptions_key = _one_of(store, SUBSCRIPTIONS_KEYS, "subscriptions")
    for key, keys in ((customers_key, CUSTOMERS_KEYS), (subscriptions_key, SUBSCRIPTIONS_KEYS)):
        if key is None:
            raise InputError(f"{store.uri}: {keys[0]} (or .parquet) not found; "
                             f"every store needs customers and subscriptions")
    seller_key = SELLER_KEY if store.exists(SELLER_KEY) else None
    rules_key = RULES_KEY if store.exists(RULES_KEY) else None
    usage_infos = [o for o in store.list("usage/") if is_usage_key(o.key)]
    purchase_infos = [o for o in store.list("credit_purchases/") if is_purchases_key(o.key)]
    adjustment_infos = [o for o in store.list("adjustments/") if is_adjustments_key(o.key)]
    listed = usage_infos + purchase_infos + adjustment_infos
    keys = ([o.key for o in listed] + [customers_key, subscriptions_key]
            + ([seller_key] if seller_key else []) + ([rules_key] if rules_key else []))
    local = store.fetch(keys, cache_dir)
    etags = {o.key: o.etag for o in listed}

    def obj(key: str) -> InputObject:
        # size and hash of the local copy, the very bytes the close reads and bills
        path = local[key]
        return InputObject(key, path.stat().st_size, _sha256(path), path, etags.get(key))

    inputs = Inputs(tuple(obj(o.key) for o in usage_infos), obj(customers_key), obj(subscriptions_key),
                    obj(seller_key) if seller_key else None, tuple(obj(o.key) for o in purchase_infos),
                    obj(rules_key) if rules_key else None, tuple(obj(o.key) for o in adjustment_infos))
    logger.info("fetch-inputs: %d usage objects, %d bytes in %.2fs", len(inputs.usage),
                sum(o.size for o in inputs.usage), time.perf_counter() - started)
    return inputs


@task(name="check-reference", cache_policy=NO_CACHE)
def check_reference(inputs: Inputs, catalog: Catalog, period: Period,
                    adjustments_billed: dict[str, str] | None = None) -> Reference:
    """Customers and subscriptions checked; the period's subscription segments and adjustments
    (`adjustments_billed`: adjustment id -> the other period whose documents bill it)."""
    customers = checked_customers(read_table(inputs.customers.path, inputs.customers.key), inputs.customers.key)
    subs = checked_subscriptions(read_table(inputs.subscriptions.path, inputs.subscriptions.key),
                                 inputs.subscriptions.key, customers, catalog)
    segments = segments_in(period, subs, catalog)
    known = set(customers["customer_id"].to_list())
    purchases = [p for obj in inputs.purchases
                 for p in purchases_from(read_table(obj.path, obj.key), obj.key, known)]
    tax = tax_rules(inputs, customers)
    adjustments, table = [], None
    if inputs.adjustments:
        rows = adjustment_rows([(obj.key, read_table(obj.path, obj.key)) for obj in inputs.adjustments])
        adjustments, table = period_adjustments(checked_rows(rows, known), str(period), segments, adjustments_billed)
    get_run_logger().info("check-reference: %d customers, %d subscriptions, %d segments, %d credit purchases, "
                          "%d adjustments in %s", customers.height, len(subs), len(segments), len(purchases),
                          len(adjustments), period)
    return Reference(customers, tuple(subs), tuple(segments), tuple(purchases), seller_block(inputs), tax,
                     tuple(adjustments), table)


@task(name="adjustments-billed", cache_policy=NO_CACHE, **IO_RETRIES)
def adjustments_billed_elsewhere(store_uri: str, inputs: Inputs, leave_out: list[Period]) -> dict[str, str]:
    """Adjustment id -> the closed period (not one of `leave_out`) whose documents bill it: its
    close's adjustments table and the committed corrections of it. Nothing is read for a store
    without an adjustments input."""
    if not inputs.adjustments:
        return {}
    store = open_store(store_uri)
    skip = {str(p) for p in leave_out}
    closes = {}
    for period in closed_periods(store_uri):
        key = period_prefix(period) + "adjustments.parquet"
        if str(period) not in skip and store.exists(key):
            closes[str(period)] = pl.read_parquet(io.BytesIO(store.read_bytes(key)))
    lines = [pl.read_parquet(io.BytesIO(store.read_bytes(info.key.removesuffix(MANIFEST) + "invoice_lines.parquet")))
             for info in store.list("billing/corrections/") if info.key.endswith("/" + MANIFEST)
             and store.exists(info.key.removesuffix(MANIFEST) + "invoice_lines.parquet")]
    corrections = pl.concat(lines, how="diagonal_relaxed") if lines else pl.DataFrame()
    if corrections.height:
        corrections = corrections.filter(~pl.col("period").is_in(sorted(skip)))
    return billed_by_periods(closes, corrections)


def tax_rules(inputs: Inputs, customers: pl.DataFrame) -> RulesProvider | None:
    """The store's tax rules (None without tax/rules.yaml); with rules, every customer needs a
    country, or its tax could not be decided."""
    if inputs.tax_rules is None:
        return None
    provider = load_rules(inputs.tax_rules.path.read_text(encoding="utf-8"), inputs.tax_rules.key)
    missing = customers.with_row_index("row", 1).filter(pl.col("country").is_null())
    if missing.height:
        row = missing.row(0, named=True)
        raise InputError(f"{inputs.customers.key} row {row['row']}, country: required when {RULES_KEY} exists "
                         f"(customer {row['customer_id']!r}; two letters, e.g. NL, US)")
    return provider


CREDIT_EVENT_COLUMNS = ("customer_id", "subscription_id", "segment_no", "event_id", "event_at", "meter", "dims",
                        "quantity")
"""The per-event usage columns a CreditEvent is made of, in the order of its fields."""


def credit_events_by_customer(per_event_usage: pl.DataFrame, segments: list[Segment]
                              ) -> Iterator[tuple[str, list[CreditEvent]]]:
    """Per customer (in customer_id order), the period's billed events that their segment's plan
    pays with credits: the events of one customer at a time, never a list of millions."""
    keys = pl.DataFrame(sorted(credit_meters(segments)), orient="row",
                        schema={"subscription_id": pl.String, "segment_no": pl.Int64, "meter": pl.String})
    keys = keys.cast({c: per_event_usage.schema[c] for c in keys.columns})
    rows = (per_event_usage.join(keys, on=list(keys.columns), how="semi", maintain_order="left")
            .select(pl.col("customer_id").cast(pl.String), *CREDIT_EVENT_COLUMNS[1:])
            .sort("customer_id", maintain_order=True))  # within a customer, settlement order
    for customer_id, group in groupby(rows.iter_rows(), key=itemgetter(0)):
        yield customer_id, [CreditEvent(*row) for row in group]


def replayed_wallets(subs: list[Subscription], catalog: Catalog, purchases: list[Purchase],
                     history: list[CreditEvent], period_events: Iterator[tuple[str, list[CreditEvent]]],
                     period: Period) -> tuple[Outcome, int]:
    """`transforms.credits.wallet_history`, fed one customer at a time: each customer's grants,
    earlier events (`history`) and period events (`period_events`, by customer in customer_id
    order) replayed through `period`, customers in order. The same entries in the same order as
    `wallet_history` of all events at once; returns the outcome and the number of events."""
    grants: dict[str, list] = defaultdict(list)
    for g in history_grants(subs, catalog, purchases, period):
        grants[g.customer_id].append(g)
    earlier: dict[str, list[CreditEvent]] = defaultdict(list)
    for ev in history:
        earlier[ev.customer_id].append(ev)
    subs_by_id = {s.subscription_id: s for s in subs}
    plan_that_day: dict[tuple[str, object], PlanFile] = {}  # one lookup per subscription and day, not per event
    outcome, count = Outcome(), 0
    without_events = ((customer, []) for customer in sorted(set(grants) | set(earlier)))
    every_customer = heapq.merge(without_events, period_events, key=itemgetter(0))
    for customer, lists in groupby(every_customer, key=itemgetter(0)):
        events = earlier.pop(customer, []) + [ev for _, period_list in lists for ev in period_list]
        plans_of = {}
        for ev in events:
            key = (ev.subscription_id, ev.event_at.date())
            if key not in plan_that_day:
                plan_that_day[key] = plan_on(subs_by_id[ev.subscription_id], catalog, key[1])
            plans_of[ev.event_id] = plan_that_day[key]
        replay(customer, events, grants.pop(customer, []), plans_of, period.end_at, outcome)
        count += len(events)
    return outcome, count


@task(name="replay-credits", cache_policy=NO_CACHE)
def replay_credits(settlement: Settlement, reference: Reference, catalog: Catalog, period: Period) -> Outcome:
    """Every wallet from its first grant through the period, in event time."""
    started = time.perf_counter()
    with cycle_collector_paused():  # a ledger entry per consumed event, none of them a cycle
        outcome, events = replayed_wallets(
            list(reference.subscriptions), catalog, list(reference.purchases), settlement.credit_history,
            credit_events_by_customer(settlement.per_event_usage, list(reference.segments)), period)
    get_run_logger().info("replay-credits: %d credit events, %d ledger entries in %.2fs", events,
                          len(outcome.entries), time.perf_counter() - started)
    return outcome


@task(name="rate-invoices", cache_policy=NO_CACHE)
def rate_invoices(settlement: Settlement, reference: Reference, outcome: Outcome, period: Period) -> list[Invoice]:
    """The period's invoices (transforms.engine.rated_invoices: nightly drafts with it too)."""
    started = time.perf_counter()
    invoices = rated_invoices(period, settlement.usage_by_dims, settlement.per_event_usage, outcome, reference)
    get_run_logger().info("rate-invoices: %d invoices, %d lines in %.2fs", len(invoices),
                          sum(len(i.lines) for i in invoices), time.perf_counter() - started)
    return invoices


def quarantine_table(settlement: Settlement, normalized: Normalized) -> pl.DataFrame:
    """One row per quarantined row, plus one per unreadable object (source_row empty)."""
    rows = settlement.quarantine
    whole = pl.DataFrame([{"source_key": key, "source_row": None, "reason": "unreadable_object", "detail": why}
                          for key, why in normalized.unreadable],
                         schema={"source_key": pl.String, "source_row": pl.Int64, "reason": pl.String,
                                 "detail": pl.String})
    table = pl.concat([rows, whole], how="diagonal_relaxed").with_columns(
        pl.when(pl.col("source_row").is_null()).then(pl.col("source_key"))
        .otherwise(pl.format("{}#row={}", pl.col("source_key"), pl.col("source_row"))).alias("source"))
    return table.select([pl.col(c).cast(t) for c, t in QUARANTINE_SCHEMA.items()]).sort(
        "source_key", "source_row", nulls_last=False)


def run_id_for(period: Period, inputs: Inputs, plan_entries: list[dict]) -> str:
    """Deterministic: the same period, input contents and plans give the same run id (and so
    the same bytes everywhere the id is printed)."""
    digest = hashlib.sha256()
    digest.update(f"close|{period}|billrun {package_version('billrun')}".encode())
    for obj in inputs.all:
        digest.update(f"|{obj.key}|{obj.sha256}".encode())
    for entry in plan_entries:
        digest.update(f"|plan|{entry['plan']}|{entry['version']}|{entry['sha256']}".encode())
    return f"close-{period}-{digest.hexdigest()[:12]}"


def catalog_entries(catalog: Catalog) -> list[dict]:
    """Every plan file loaded (not only those used): a new version of a plan can re-bind
    subscriptions, so drift checks compare the whole catalog."""
    return [{"plan": f.plan.plan, "version": f.plan.version, "file": Path(f.path).name, "sha256": f.sha256}
            for _, f in sorted(catalog.files.items())]


def plan_entries_for(segments: tuple[Segment, ...]) -> list[dict]:
    used = {seg.plan.key: seg.plan for seg in segments}
    return [{"plan": f.plan.plan, "version": f.plan.version, "file": Path(f.path).name, "sha256": f.sha256}
            for _, f in sorted(used.items())]


@task(name="write-outputs", cache_policy=NO_CACHE)
def write_outputs(invoices: list[Invoice], settlement: Settlement, normalized: Normalized,
                  reference: Reference, inputs: Inputs, catalog: Catalog, outcome: Outcome, period: Period,
                  run_id: str, costs: tuple,
                  plan_entries: list[dict], out_dir: Path, index_entry: dict | None = None) -> tuple[list[str], bytes]:
    """Tables and HTML into `out_dir`; returns the relative names and the manifest's bytes."""
    started = time.perf_counter()
    shutil.rmtree(out_dir, ignore_errors=True)  # a killed run's partial outputs
    out_dir.mkdir(parents=True)
    names: list[str] = []
    spent: dict[str, float] = {}  # seconds per table, for the step's log line

    def write(name: str, frame: pl.DataFrame | pl.LazyFrame) -> None:
        if isinstance(frame, pl.LazyFrame):  # a table with a row per event is streamed to its file
            frame.sink_parquet(out_dir / name, **PARQUET)
        else:
            frame.write_parquet(out_dir / name, **PARQUET)
        names.append(name)
        spent[name] = time.perf_counter() - started - sum(spent.values())

    invoices = [replace(inv, run_id=run_id) for inv in invoices]
    # The HTML invoices render in worker processes while this process writes the tables: the
    # documents need only the rated invoices, and the tables are mostly one core's work.
    customers = {row["customer_id"]: row for row in reference.customers.iter_rows(named=True)}
    plans = subscription_plans(reference.segments)
    stop = threading.Event()  # a table failed: render no further chunk
    rendering = ThreadPoolExecutor(max_workers=1, thread_name_prefix="documents")
    documents_future = rendering.submit(write_invoice_documents, invoices, customers, reference.seller, plans.rounding,
                                        credit_summaries(outcome, period), run_id, out_dir, local_workers(),
                                        stop=stop)
    try:
        with cycle_collector_paused():  # millions of table cells, none of them a cycle
            by_reason, adjusted = _write_tables(write, invoices, settlement, normalized, reference, catalog,
                                                outcome, period, costs)
        tables_done = time.perf_counter()
        documents = documents_future.result()
    except BaseException:
        stop.set()
        raise
    finally:
        rendering.shutdown(wait=True)
    names.extend(name for name, _, _ in documents)

    tables = [n for n in names if "/" not in n]
    outputs = [(n, (out_dir / n).stat().st_size, _sha256(out_dir / n)) for n in tables] + documents
    unreadable = len(normalized.unreadable)
    rows = {k: settlement.counts[k] + (unreadable if k in ("read", "quarantined") else 0)
            for k in ("read", "billed", "duplicates", "quarantined")}
    prefix = period_prefix(period)
    manifest = {
        "billrun_version": package_version("billrun"),
        "run_id": run_id,
        "period": str(period),
        "status": "closed",
        "issued_on": period.end.isoformat(),
        "inputs": [o.manifest_entry() for o in inputs.all],
        "credits": credit_report(outcome, period, plans.plan),
        "plans": plan_entries,
        "catalog": catalog_entries(catalog),
        "costs": costs[1],
        "rows": rows,
        "objects": {"usage": len(inputs.usage), "unreadable": unreadable},
        "quarantined_by_reason": by_reason,
        "conflicting_duplicates": settlement.conflicts.height,
        "billed_event_index": index_entry,
        **({"adjustments": adjusted} if adjusted is not None else {}),
        "totals": _totals(invoices),
        "outputs": [{"key": prefix + n, "size": size, "sha256": digest} for n, size, digest in sorted(outputs)],
    }
    get_run_logger().info("write-outputs: tables %.2fs (%s), documents %.2fs; %d files in %.2fs",
                          tables_done - started,
                          ", ".join(f"{n.removesuffix('.parquet')} {t:.1f}" for n, t in spent.items()),
                          time.perf_counter() - tables_done, len(names), time.perf_counter() - started)
    return sorted(names), (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def _write_tables(write, invoices: list[Invoice], settlement: Settlement, normalized: Normalized,
                  reference: Reference, catalog: Catalog, outcome: Outcome, period: Period,
                  costs: tuple) -> tuple[dict[str, int], dict | None]:
    """The period's tables, each through `write(name, frame)`; returns the quarantined rows per
    reason and the account of adjustment rows (None without the input)."""
    write("invoices.parquet", invoices_table(invoices))
    lines = lines_table(invoices)
    write("invoice_lines.parquet", lines)
    write("usage_summary.parquet", settlement.usage_by_dims)
    write("margins.parquet", margins_table(lines, settlement.usage_by_day, segment_plans(reference.segments),
                                           costs[0], period))
    quarantine = quarantine_table(settlement, normalized)
    write("quarantine.parquet", quarantine)
    write("conflicting_duplicates.parquet", settlement.conflicts)
    write("alerts.parquet", alerts_table(
        price_change_notices(period, list(reference.subscriptions), catalog) + credit_alerts(outcome, period)
        + spend_alerts(period, list(reference.segments), settlement.usage_by_day, settlement.per_event_usage,
                       outcome.billable_by_day, credit_meters(list(reference.segments)),
                       usage_spend_by_subscription(invoices))))
    ledger = ledger_table(outcome, period)
    write("credit_ledger.parquet", ledger)
    with billed_events_table(settlement, lines, quarantine, ledger) as billed_events:
        write("billed_events.parquet", billed_events)
    del ledger
    write("credit_balances.parquet", balances_table(outcome, period))
    del lines
    revenue = revenue_table(period, invoices, outcome, reference.segments)
    write("revenue.parquet", revenue)
    write("journal.parquet", journal(revenue, tax_rows(invoices, str(period))))
    adjustments = None
    if reference.adjustments_table is not None:  # a store without the input writes what it always wrote
        adjustments = billed_table(reference.adjustments_table, invoices)
        write("adjustments.parquet", adjustments)
    return (dict(sorted(quarantine.group_by("reason").len().iter_rows())),
            adjustment_counts(adjustments) if adjustments is not None else None)


def seller_block(inputs: Inputs) -> dict:
    """The seller shown on documents, with payment terms and instructions, from the store's
    optional seller.yaml (see transforms.terms)."""
    if inputs.seller is None:
        return terms_seller_block({})
    try:
        loaded = yaml.safe_load(inputs.seller.path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise InputError(f"{inputs.seller.key}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return terms_seller_block(loaded, inputs.seller.key)


def _totals(invoices: list[Invoice]) -> list[dict]:
    by_currency: dict[str, list[int]] = {}
    for inv in invoices:
        entry = by_currency.setdefault(inv.currency, [0, 0])
        entry[0] += 1
        entry[1] += inv.total_minor
    return [{"currency": c, "invoices": n, "total_minor": t} for c, (n, t) in sorted(by_currency.items())]


@task(name="publish", cache_policy=NO_CACHE, **IO_RETRIES)
def publish(store_uri: str, period: Period, run_id: str, out_dir: Path, names: list[str],
            manifest: bytes, hold: Hold) -> list[str]:
    """Stage every output in the store, claim the period, copy the outputs into its folder, then
    write the manifest only if none exists: the one atomic step that closes the period. Returns
    the warnings of the tidying after it (the period is closed whatever they say).

    Every write into `billing/period=P/` is fenced (flows/locks.py): a run that lost its lock or
    its claim while paused writes nothing there. Files an earlier, killed attempt left in the
    period (a subscription no longer billed) are deleted before the copies, and anything the
    manifest does not list is swept after it. On a folder store the outputs were written straight
    into the staging folder: they are flushed to disk once, and the invoices folder moves into the
    period in one rename."""
    started = time.perf_counter()
    store = open_store(store_uri)
    staging = staging_prefix(run_id, hold.token)
    prefix = period_prefix(period)
    keys = {prefix + name for name in names}
    if _read_if_exists(store, prefix + MANIFEST) != manifest:  # else: a retry after our own commit
        fence = Fence(store, hold, run_id, prefix + MANIFEST, [run_prefix(run_id, hold.token)])
        try:
            fence.clear(fence.claim())
            if in_place(store, run_id, hold.token, out_dir):
                store.sync()
            else:
                fence.guard(store).put_files([(staging + name, out_dir / name) for name in names])
            fault_point("staged")
            for leftover in [o.key for o in store.list(prefix) if o.key not in keys]:
                fence.ensure()  # nothing is final without a manifest: an earlier attempt's file
                store.delete(leftover)
            tables = [n for n in names if "/" not in n]
            documents = [n for n in names if "/" in n]
            fence.ensure()
            store.copy(staging + tables[0], prefix + tables[0])
            fault_point("copied-first")
            store.copy_many([(staging + name, prefix + name) for name in tables[1:]], before=fence.ensure)
            for folder in sorted({n.split("/", 1)[0] + "/" for n in documents}):
                store.move_prefix(staging + folder, prefix + folder,
                                  [staging + n for n in documents if n.startswith(folder)], before=fence.ensure)
            fault_point("copied-all")
            fence.ensure()
            if not store.put_if_absent(prefix + MANIFEST, manifest) and store.read_bytes(prefix + MANIFEST) != manifest:
                other = json.loads(store.read_bytes(prefix + MANIFEST)).get("run_id", "another run")
                raise LostRace(f"{period} was closed by {other} while this run ({run_id}) was publishing; "
                               f"nothing of this run was published as the result")
        except BaseException:
            _quietly(fence.release)
            raise
    fault_point("manifest-written")
    warnings = after_commit(store, prefix, keys | {prefix + MANIFEST}, f"billing/_state/runs/close-{period}-")
    get_run_logger().info("publish: %d outputs and the manifest to %s/%s in %.2fs", len(names), store.uri.rstrip("/"),
                          prefix, time.perf_counter() - started)
    return warnings


def _read_if_exists(store, key: str) -> bytes | None:
    return store.read_bytes(key) if store.exists(key) else None


def _quietly(action) -> None:
    """Tidying on the way out of a failure: its own failure must not replace the real error."""
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - logged; the error being raised is the one to report
        warn(f"could not tidy up after the failure: {exc}")


def run_prefix(run_id: str, token: str) -> str:
    """A run attempt's private folder: attempts of one run id never share files."""
    return f"billing/_state/runs/{run_id}/{token}/"


def staging_prefix(run_id: str, token: str) -> str:
    return run_prefix(run_id, token) + "out/"


def output_folder(store_uri: str, run_id: str, token: str, work_dir: Path) -> Path:
    """Where write-outputs writes: straight into the store's staging folder when the store is a
    local folder (no second copy of 100k invoices), else the local work folder."""
    return open_store(store_uri).local_folder(staging_prefix(run_id, token)) or work_dir / "out"


def in_place(store, run_id: str, token: str, out_dir: Path) -> bool:
    folder = store.local_folder(staging_prefix(run_id, token))
    return folder is not None and folder.resolve() == Path(out_dir).resolve()


def closed_manifest(store_uri: str, period: Period) -> dict | None:
    store = open_store(store_uri)
    key = period_prefix(period) + MANIFEST
    return json.loads(store.read_bytes(key)) if store.exists(key) else None


def _result_from_manifest(manifest: dict, store_uri: str, status: str) -> CloseResult:
    return CloseResult(**close_summary(manifest, store_uri, status))


def _report(result: CloseResult) -> None:
    key = f"close-{result.period}"
    create_table_artifact(
        key=key,
        table=[{"measure": k, "value": v} for k, v in result.rows.items()]
        + [{"measure": f"total {t['currency']} (minor units)", "value": t["total_minor"]} for t in result.totals]
        + [{"measure": f"quarantined: {r}", "value": n} for r, n in result.quarantined_by_reason.items()],
        description=f"Close of {result.period}: {result.status}, run {result.run_id}")
    create_markdown_artifact(key=f"{key}-report", markdown=close_report(result, open_store(result.store).uri),
                             description=f"Close of {result.period}")


def close_report(result: CloseResult, store_uri: str) -> str:
    """The close's markdown report: the manifest's row counts and totals as tables, then the
    outputs with their full paths (the report is read far from the run)."""
    rows = ["| usage rows | count |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in result.rows.items()]
    totals = ["| currency | invoices | total (minor units) |", "|---|---:|---:|"] + [
        f"| {t['currency']} | {t['invoices']} | {t['total_minor']} |" for t in result.totals]
    quarantined = (["| quarantine reason | rows |", "|---|---:|"]
                   + [f"| {r} | {n} |" for r, n in result.quarantined_by_reason.items()]
                   if result.quarantined_by_reason else [])
    return "\n".join(
        [f"# Close of {result.period}", "", f"Status: **{result.status}**, run `{result.run_id}`.", ""]
        + rows + [""] + totals + [""] + (quarantined + [""] if quarantined else []) + ["Outputs:", ""]
        + [f"- `{store_uri.rstrip('/')}/{o}`" for o in result.outputs if not o.endswith(".html")]
        + [f"- {result.invoices} HTML invoices under `{period_prefix(result.period)}invoices/`"])


FAULT_POINTS = ("locked", "fetched", "checked", "normalized", "settled", "rated", "written", "staged",
                "copied-first", "copied-all", "manifest-written")
"""Where the resume tests kill a close (see flows.locks.fault_point)."""


def work_dir_for(store: str, label: str) -> Path:
    """A local work folder per store (the folder it resolves to, or the bucket and prefix: the same
    relative `--store` from two folders is two stores) and job (`close-2026-10`), emptied at the
    start of every run, so a killed run's leftovers are reclaimed by the next instead of piling up;
    the folders of other jobs whose process is gone (a SIGKILL, a lost machine) are removed too. Runs that
    share a label also share a period lock, so they never share the folder at once."""
    tag = hashlib.sha256(store_identity(store).encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / "billrun-work" / f"{tag}-{label}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    mark_owner(path)
    reclaim_stale_work(path.parent)
    return path


def private_work_dir(store: str, job: str) -> Path:
    """A work folder of its own for a job that takes no period lock (simulate, impact, preview,
    migrate): two such runs on one store at once never empty each other's folder."""
    return work_dir_for(store, f"{job}-{uuid.uuid4().hex[:12]}")


@flow(name="close-period", log_prints=False)
def close_period(store: str, plans: str, period: str, dask_address: str | None = None, now: datetime | None = None,
                 before_period_end: bool = False, allow_empty: bool = False) -> dict:
    """Close one calendar month: final invoices, lines, quarantine, alerts, HTML invoices, manifest.

    A close is final, so it refuses a month that has not ended at `now` (default: the clock, read
    here once) unless `before_period_end`, and a month without a single usage row while
    subscriptions in it meter usage unless `allow_empty`. The row-level steps run in shards on a
    thread pool, or on the Dask cluster at `dask_address` (tcp://scheduler:8786): the outputs
    are the same bytes either way."""
    keep_secrets_out_of_logs()
    the_period = Period.parse(period)
    now = now or datetime.now(timezone.utc)
    catalog = load_catalog(plans)
    lake = lakehouse.tables_settings(open_store(store))  # a bad tables: section fails before any work
    existing = closed_manifest(store, the_period)
    warnings: list[str] = []
    if existing is None:
        too_early = close_too_early(the_period, now)
        if too_early and not before_period_end:
            raise InputError(too_early)
        with period_lock(open_store(store), [the_period], f"close {the_period}", datetime.now(timezone.utc),
                         warnings) as hold:
            fault_point("locked")
            existing = closed_manifest(store, the_period)  # closed while we waited for the lock?
            if existing is None:
                result = _close(store, catalog, the_period, hold, dask_address, allow_empty)
                _commit_tables(store, lake, the_period, result["run_id"])
        if existing is None:
            return {**result, "warnings": result["warnings"] + warnings}
    get_run_logger().info("%s is already closed by %s; nothing to do", the_period, existing["run_id"])
    _commit_tables(store, lake, the_period, existing["run_id"])  # catches up tables a killed close left behind
    warnings += tidy_closed(open_store(store), the_period, existing)
    return {**_result_from_manifest(existing, store, "already_closed").as_dict(), "warnings": warnings}


def _commit_tables(store: str, lake: lakehouse.TablesSettings, period: Period, run_id: str) -> None:
    """After the manifest: the period's outputs to the lakehouse tables, when configured. The
    period stays closed whatever happens here."""
    lakehouse.commit_published(store, lake, [period_prefix(period) + MANIFEST],
                            f"{period} is closed (run {run_id})")


def _close(store: str, catalog: Catalog, period: Period, hold: Hold, dask_address: str | None = None,
           allow_empty: bool = False) -> dict:
    work_dir = work_dir_for(store, f"close-{period}")
    indexing = None
    try:
        inputs = fetch_inputs(store, work_dir / "inputs")
        costs = fetch_costs(store)
        fault_point("fetched")
        # an adjustment that another closed period's documents bill is never billed here
        billed_elsewhere = adjustments_billed_elsewhere(store, quote(inputs), [period])
        reference = check_reference(quote(inputs), quote(catalog), period, billed_elsewhere)
        fault_point("checked")
        with shard_runner(dask_address) as runner:
            scratch = scratch_for(store, work_dir, f"close-{period}", distributed=dask_address is not None)
            normalized, shard_keys = normalize_shards(runner, store, inputs, scratch)
            fault_point("normalized")
            # what the closed periods' documents bill (their billed-event index) is never billed again
            index = committed_index(store)
            settlement = settle_shards(runner, scratch, shard_keys, reference, catalog, period, index)
            settlement = with_local_lineage(settlement, scratch, work_dir)
        # the period's index is sorted and written by DuckDB, off the interpreter's lock, while the
        # wallets replay and the invoices are rated in this process
        indexing = index_billed.submit(scratch.uri, list(settlement.billed_ids), str(period), work_dir)
        fault_point("settled")
        no_usage = close_without_usage(
            period, rows_in_period(settlement.counts["read"], settlement.quarantine) + len(normalized.unreadable),
            list(reference.segments))
        if no_usage and not allow_empty:
            raise InputError(no_usage)
        # the per-event rows of credit meters (millions at 100M events) go to the replay only;
        # Prefect keeps a task's arguments until the flow ends, so the whole settlement is not one
        for_replay, settlement = split_at_replay(settlement, credit_meters(list(reference.segments)))
        outcome = replay_credits(quote(for_replay), quote(reference), quote(catalog), period)
        invoices = rate_invoices(quote(settlement), quote(reference), quote(outcome), period)
        fault_point("rated")
        index_file, indexed = indexing.result()
        drop_scratch(scratch)
        plan_entries = plan_entries_for(reference.segments)
        run_id = run_id_for(period, inputs, plan_entries)
        # quote(): hand big values over as they are; Prefect would otherwise walk every
        # dataclass in them looking for futures (minutes for 100k invoices)
        out_dir = output_folder(store, run_id, hold.token, work_dir)
        # the period's index goes in before the manifest, which names it: it counts once the period is closed
        [index_entry] = record_billed(store, [(index_key(str(period), run_id), index_file, indexed)])
        names, manifest = write_outputs(quote(invoices), quote(settlement), quote(normalized), quote(reference),
                                        quote(inputs), quote(catalog), quote(outcome),
                                        period, run_id, quote(costs), plan_entries, out_dir, index_entry)
        fault_point("written")
        warnings = publish(store, period, run_id, out_dir, quote(names), quote(manifest), hold)
    finally:
        if indexing is not None:
            indexing.wait()  # a failure elsewhere: the index's files are in the work folder
        shutil.rmtree(work_dir, ignore_errors=True)
    result = _result_from_manifest(json.loads(manifest), store, "closed")
    _report(result)
    return {**result.as_dict(), "warnings": warnings}
