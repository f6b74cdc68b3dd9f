"""The steps of billing a period that every flow shares: the close, and the nightly drafts,
backfill, simulate, preview and impact, which bill a period the same way without closing it.

fetch inputs -> check customers and subscriptions (the period's reference data) -> replay the
credit wallets -> rate invoices; and the local work folder each run does this in. Usage is
normalized and settled in shards (flows/shards.py); what the close writes and publishes after
rating is in flows/outputs.py and flows/publish.py. IO tasks retry with backoff; rating is pure
and never retried.

What a step hands the next is small: Prefect walks every argument of a task looking for futures,
and keeps every task's result until the flow ends. So the inputs cross as their keys, hashes and
local paths, the catalog as its few plan files, the checked usage as its Parquet files
(transforms.engine.checked_usage.CheckedFiles), the close's invoices as files
(flows/handoff.py), a simulation's report as the files it publishes. Three values still cross
whole, in quote() at the call: the checked reference, the wallet replay and (but in the close)
the rated invoices, with what simulate builds of them and its closed period (whose manifest
lists every document). At 100k customers Prefect's walk of the reference costs 6.7 CPU s;
pickled, it is 39 MB, 1.7 s to write and 1.5 s to read back in each step that takes it, and the
flow keeps it anyway for the shards' checks (flows/shards.py); the replay pickled costs about 10
CPU s at 10M events (flows/handoff.py). They become files when the shards and the rating read
the reference's tables from Parquet.
"""
from __future__ import annotations

import hashlib
import io
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.embedded import mark_owner, reclaim_stale_work
from flows.handoff import InvoiceFiles, invoice_files
from flows.ingest import is_adjustments_key, is_purchases_key, is_usage_key, read_table
from flows.preflight import closed_periods
from flows.retries import IO_RETRIES
from flows.store import open_store, store_identity
from transforms.collector import cycle_collector_paused
from transforms.credits.events import CREDIT_EVENT_SCHEMA, credit_events_frame, period_credit_rows
from transforms.credits.grants import history_grants
from transforms.credits.model import Purchase, WalletReplay
from transforms.credits.purchases import purchases_from
from transforms.credits.replay import replayed_wallets
from transforms.credits.reports import credit_summaries
from transforms.documents.terms import seller_block as terms_seller_block
from transforms.engine.checked_usage import CheckedFiles, CheckedUsage
from transforms.engine.invoices import Invoice
from transforms.engine.rating import rated_invoices
from transforms.errors import InputError
from transforms.inputs.adjustments import (
    Adjustment,
    adjustment_rows,
    billed_by_periods,
    checked_rows,
    period_adjustments,
)
from transforms.inputs.plans import Catalog
from transforms.inputs.reference import (
    Segment,
    Subscription,
    checked_customers,
    checked_subscriptions,
    segments_in,
    subscription_plans,
)
from transforms.layout import (
    ADJUSTMENTS_PREFIX,
    CORRECTIONS_PREFIX,
    CUSTOMERS_KEYS,
    MANIFEST,
    PURCHASES_PREFIX,
    RULES_KEY,
    SELLER_KEY,
    SUBSCRIPTIONS_KEYS,
    USAGE_PREFIX,
    period_prefix,
)
from transforms.periods import Period
from transforms.tax.rules import RulesProvider, load_rules


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
class CheckedReference:
    """The period's reference data, checked: customers, subscriptions and their segments, credit
    purchases, the seller, the tax rules and the adjustments (every input of the period but usage)."""

    customers: pl.DataFrame
    subscriptions: tuple[Subscription, ...]
    segments: tuple[Segment, ...]
    purchases: tuple[Purchase, ...] = ()
    seller: dict = field(default_factory=dict)       # transforms.documents.terms.seller_block
    tax: RulesProvider | None = None                  # None: the store bills no tax
    adjustments: tuple[Adjustment, ...] = ()          # the period's, each resolved to its invoice
    adjustments_table: pl.DataFrame | None = None     # every adjustment row of the period; None: no input


def file_sha256(path: Path) -> str:
    """The hex sha256 of a local file's content, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def one_input_key(store, keys: tuple[str, ...], what: str) -> str | None:
    """The one of `keys` (the accepted names of one input, e.g. its .csv and .parquet) that the
    store holds; None for none, an error for two."""
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
    customers_key = one_input_key(store, CUSTOMERS_KEYS, "customers")
    subscriptions_key = one_input_key(store, SUBSCRIPTIONS_KEYS, "subscriptions")
    for key, keys in ((customers_key, CUSTOMERS_KEYS), (subscriptions_key, SUBSCRIPTIONS_KEYS)):
        if key is None:
            raise InputError(f"{store.uri}: {keys[0]} (or .parquet) not found; "
                             f"every store needs customers and subscriptions")
    seller_key = SELLER_KEY if store.exists(SELLER_KEY) else None
    rules_key = RULES_KEY if store.exists(RULES_KEY) else None
    usage_infos = [o for o in store.list(USAGE_PREFIX) if is_usage_key(o.key)]
    purchase_infos = [o for o in store.list(PURCHASES_PREFIX) if is_purchases_key(o.key)]
    adjustment_infos = [o for o in store.list(ADJUSTMENTS_PREFIX) if is_adjustments_key(o.key)]
    listed = usage_infos + purchase_infos + adjustment_infos
    keys = ([o.key for o in listed] + [customers_key, subscriptions_key]
            + ([seller_key] if seller_key else []) + ([rules_key] if rules_key else []))
    local = store.fetch(keys, cache_dir)
    etags = {o.key: o.etag for o in listed}

    def obj(key: str) -> InputObject:
        # size and hash of the local copy, the very bytes the close reads and bills
        path = local[key]
        return InputObject(key, path.stat().st_size, file_sha256(path), path, etags.get(key))

    inputs = Inputs(tuple(obj(o.key) for o in usage_infos), obj(customers_key), obj(subscriptions_key),
                    obj(seller_key) if seller_key else None, tuple(obj(o.key) for o in purchase_infos),
                    obj(rules_key) if rules_key else None, tuple(obj(o.key) for o in adjustment_infos))
    logger.info("fetch-inputs: %d usage objects, %d bytes in %.2fs", len(inputs.usage),
                sum(o.size for o in inputs.usage), time.perf_counter() - started)
    return inputs


@task(name="check-reference", cache_policy=NO_CACHE)
def check_reference(inputs: Inputs, catalog: Catalog, period: Period,
                    adjustments_billed: dict[str, str] | None = None) -> CheckedReference:
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
    return CheckedReference(customers, tuple(subs), tuple(segments), tuple(purchases), seller_block(inputs),
                            tax, tuple(adjustments), table)


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
             for info in store.list(CORRECTIONS_PREFIX) if info.key.endswith("/" + MANIFEST)
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


def seller_block(inputs: Inputs) -> dict:
    """The seller shown on documents, with payment terms and instructions, from the store's
    optional seller.yaml (see transforms.documents.terms)."""
    if inputs.seller is None:
        return terms_seller_block({})
    try:
        loaded = yaml.safe_load(inputs.seller.path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise InputError(f"{inputs.seller.key}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return terms_seller_block(loaded, inputs.seller.key)


def credit_events(checked: CheckedUsage | CheckedFiles, segments: list) -> pl.DataFrame:
    """The credit events a replay consumes (events.CREDIT_EVENT_SCHEMA): the earlier periods'
    (the usage check's credit history) and the period's rows of meters paid with credits, read
    from the checked usage's files when it has them (only those rows), never as objects."""
    if isinstance(checked, CheckedFiles):
        history = checked.scan("credit_history").collect().cast(CREDIT_EVENT_SCHEMA)
        return pl.concat([history, period_credit_rows(checked.scan("per_event_usage"), segments)])
    return pl.concat([credit_events_frame(checked.credit_history), period_credit_rows(checked.per_event_usage,
                                                                                      segments)])


@task(name="replay-credits", cache_policy=NO_CACHE)
def replay_credits(checked: CheckedUsage, reference: CheckedReference, catalog: Catalog,
                   period: Period) -> WalletReplay:
    """Every wallet from its first grant through the period, in event time."""
    started = time.perf_counter()
    subs = list(reference.subscriptions)
    with cycle_collector_paused():  # ledger entries and runs by the thousand, none of them a cycle
        replay = replayed_wallets(history_grants(subs, catalog, list(reference.purchases), period), subs, catalog,
                                  credit_events(checked, list(reference.segments)), period)
    get_run_logger().info("replay-credits: %d ledger entries in %.2fs", replay.entry_count(),
                          time.perf_counter() - started)
    return replay


@task(name="rate-invoices", cache_policy=NO_CACHE)
def rate_invoices(checked: CheckedUsage, reference: CheckedReference, replay: WalletReplay,
                  period: Period) -> list[Invoice]:
    """The period's invoices (transforms.engine.rating.rated_invoices: nightly drafts with it too)."""
    started = time.perf_counter()
    invoices = rated_invoices(period, checked.usage_by_dims, checked.per_event_usage, replay, reference)
    get_run_logger().info("rate-invoices: %d invoices, %d lines in %.2fs", len(invoices),
                          sum(len(i.lines) for i in invoices), time.perf_counter() - started)
    return invoices


@task(name="rate-invoices", cache_policy=NO_CACHE)
def rate_invoices_to_files(checked: CheckedUsage, reference: CheckedReference, replay: WalletReplay, period: Period,
                           folder: Path) -> InvoiceFiles:
    """rate_invoices, the invoices handed over as files of `folder`
    (flows/handoff.py), each with its document's customer, rounding and credits: the close's
    later steps, and its render workers, read them from there. The cycle collector is paused
    while the 100k customer rows and jobs are built and written: none is a cycle, and its full
    passes over the invoices, replay and reference alive here cost more than the rows (about
    1.7 of 1.9 CPU s for the customer rows at 1M events)."""
    invoices = rate_invoices.fn(checked, reference, replay, period)
    with cycle_collector_paused():
        customers = {row["customer_id"]: row for row in reference.customers.iter_rows(named=True)}
        roundings, credits = subscription_plans(reference.segments).rounding, credit_summaries(replay, period)
        return invoice_files([(inv, customers[inv.customer_id], roundings[inv.subscription_id],
                               credits.get(inv.customer_id)) for inv in invoices], folder / "invoices")


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
