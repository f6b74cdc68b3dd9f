"""`billrun nightly --date D`: the period to date, kept current night by night.

Each night takes in only the usage objects that are new or rewritten since the last run (by
content: ETag, else size and sha256), validates and deduplicates them against everything taken
in this period (first seen wins), and keeps each object's accepted events as state, so a
rewritten object replaces its own contribution. From the period-to-date usage it writes what the
close would bill if the period ended now, credit balances, and the alerts that fired for the
first time (an alert fires once per customer, period, kind and threshold, however often nights
are run or re-run). The close derives the same alerts from the same events in event time.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from datetime import date, datetime, timezone
from importlib.metadata import version as package_version
from pathlib import Path

import duckdb
import polars as pl
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from flows.close import (IO_RETRIES, MANIFEST, PARQUET, Inputs, InputObject, _one_of, _sha256, check_reference,
                         normalize_usage, work_dir_for)
from flows.ingest import CUSTOMERS_KEYS, SUBSCRIPTIONS_KEYS, is_purchases_key, is_usage_key
from flows.locks import period_lock
from flows.store import open_store
from transforms.alerts import Alert, alerts_table, credit_alerts, price_change_notices
from transforms.credits import (balances_table, credit_lines, credit_meters, grants_from_balances,
                                period_credit_events, wallet_history, wallets_from_opening)
from transforms.errors import BillrunError, InputError
from transforms.invoices import apply_credits, invoices_table, lines_table, period_invoices, usage_by_segment
from transforms.periods import Period
from transforms.plans import load_catalog
from transforms.queries import statements
from transforms.reference import segments_frame
from transforms.settle import settled_usage
from transforms.spend import spend_alerts, thresholds

SQL_FILE = "nightly.sql"
ACCEPTED_COLUMNS = {"event_id": pl.String, "customer_id": pl.String, "meter": pl.String, "dims": pl.String,
                    "quantity": pl.Decimal(38, 9), "event_at": pl.Datetime("us", "UTC"), "source_key": pl.String,
                    "night": pl.Date}


class DeliveryFailed(BillrunError):
    """Alerts were written but could not be delivered to the webhook."""


def state_prefix(period: Period) -> str:
    return f"billing/_state/nightly/period={period}/"


def _object_state_key(period: Period, key: str) -> str:
    return f"{state_prefix(period)}objects/{hashlib.sha256(key.encode()).hexdigest()[:24]}.parquet"


@dataclass(frozen=True)
class Intake:
    inputs: Inputs                 # only the usage objects to take in tonight
    intake: dict[str, dict]        # every usage object taken in so far, with its fingerprint
    removed: tuple[str, ...]       # objects gone from the store since the last night
    state_files: dict[str, Path]   # accepted events of objects kept from earlier nights


@task(name="take-in", cache_policy=NO_CACHE, **IO_RETRIES)
def take_in(store_uri: str, period: Period, cache_dir: Path) -> Intake:
    """What is new since the last night, and the state of everything taken in before."""
    store = open_store(store_uri)
    key = state_prefix(period) + "intake.json"
    before = json.loads(store.read_bytes(key)) if store.exists(key) else {}
    listed = {o.key: o for o in store.list("usage/") if is_usage_key(o.key)}
    customers_key = _one_of(store, CUSTOMERS_KEYS, "customers")
    subscriptions_key = _one_of(store, SUBSCRIPTIONS_KEYS, "subscriptions")
    if customers_key is None or subscriptions_key is None:
        raise InputError(f"{store.uri}: customers and subscriptions are needed (see the store layout)")
    purchases = [o.key for o in store.list("credit_purchases/") if is_purchases_key(o.key)]

    def unchanged(info, seen: dict) -> bool:
        if info.etag and seen.get("etag"):
            return info.etag == seen["etag"]
        return info.size == seen["size"] and store.sha256(info.key) == seen["sha256"]

    fresh = [k for k, info in sorted(listed.items()) if k not in before or not unchanged(info, before[k])]
    removed = tuple(sorted(set(before) - set(listed)))
    local = store.fetch(fresh + [customers_key, subscriptions_key] + purchases, cache_dir)

    def obj(k: str) -> InputObject:
        path = local[k]
        info = listed.get(k)
        return InputObject(k, info.size if info else path.stat().st_size, _sha256(path), path,
                           info.etag if info else None)

    kept = [k for k in before if k in listed and k not in fresh]
    state = store.fetch([_object_state_key(period, k) for k in kept], cache_dir / "state")
    inputs = Inputs(tuple(obj(k) for k in fresh), obj(customers_key), obj(subscriptions_key), None,
                    tuple(obj(k) for k in purchases))
    intake = {k: v for k, v in before.items() if k in kept}
    for o in inputs.usage:
        intake[o.key] = {"size": o.size, "sha256": o.sha256, "etag": o.etag}
    get_run_logger().info("take-in: %d new or rewritten objects, %d removed, %d kept from earlier nights",
                          len(fresh), len(removed), len(kept))
    return Intake(inputs, intake, removed, {k: state[_object_state_key(period, k)] for k in kept})


@dataclass(frozen=True)
class NightUsage:
    counts: dict[str, int]
    accepted: dict[str, Path]          # tonight's accepted events, by object key
    usage_by_dims: pl.DataFrame
    usage_by_day: pl.DataFrame
    per_event_usage: pl.DataFrame


@task(name="settle-night", cache_policy=NO_CACHE)
def settle_night(normalized, intake: Intake, reference, catalog, period: Period, day: date,
                 work_dir: Path) -> NightUsage:
    """Tonight's rows settled as a close would (scope, rules, duplicates among themselves), then
    against every event taken in before; then the period to date, per segment."""
    started = time.perf_counter()
    sql = statements(SQL_FILE)
    con = duckdb.connect(config={"temp_directory": str(work_dir / "duckdb-spill")})
    try:
        settlement = settled_usage(con, list(normalized.paths), reference.customers, list(reference.subscriptions),
                                   list(reference.segments), catalog, period)
        earlier = [str(p) for p in intake.state_files.values()]
        if earlier:
            con.read_parquet(earlier, union_by_name=True).create_view("earlier")
        else:
            con.register("earlier", pl.DataFrame(schema=ACCEPTED_COLUMNS).to_arrow())
        tonight = con.sql(sql["accepted_tonight"], params={"night": day}).pl()
        out_dir = work_dir / "accepted"
        out_dir.mkdir(exist_ok=True)
        accepted = {}
        for o in intake.inputs.usage:
            path = out_dir / f"{hashlib.sha256(o.key.encode()).hexdigest()}.parquet"  # by key: two keys may share bytes
            tonight.filter(pl.col("source_key") == o.key).select(list(ACCEPTED_COLUMNS)).write_parquet(path, **PARQUET)
            accepted[o.key] = path
        all_files = earlier + [str(p) for p in accepted.values()]
        con.read_parquet(all_files, union_by_name=True).create_view("all_accepted")
        con.execute(sql["first_copies"])
        con.register("segments", segments_frame(list(reference.segments)).to_arrow())
        per_meter = [m for m, per_event in _per_event_meters(catalog)]
        con.register("per_event_meters", pl.DataFrame({"meter": per_meter}, schema={"meter": pl.String}).to_arrow())
        usage_by_day = con.sql(sql["to_date_by_day"]).pl()
        per_event = con.sql(sql["to_date_per_event"]).pl()
    finally:
        con.close()
    c = settlement.counts
    new = int(tonight["is_new"].sum())
    counts = {"read": c["read"] + len(normalized.unreadable), "billed": new,
              "duplicates": c["duplicates"] + c["billed"] - new,
              "quarantined": c["quarantined"] + len(normalized.unreadable)}
    usage_by_dims = (usage_by_day.group_by("subscription_id", "segment_no", "meter", "dims")
                     .agg(pl.col("units").sum(), pl.col("events").sum())
                     .sort("subscription_id", "segment_no", "meter", "dims"))
    get_run_logger().info("settle-night: read %d, accepted %d, duplicates %d, quarantined %d in %.2fs",
                          counts["read"], counts["billed"], counts["duplicates"], counts["quarantined"],
                          time.perf_counter() - started)
    return NightUsage(counts, accepted, usage_by_dims, usage_by_day, per_event)


def _per_event_meters(catalog):
    from transforms.settle import plan_meters
    frame = plan_meters(catalog).filter(pl.col("per_event"))
    return sorted({(m, True) for m in frame["meter"].to_list()})


@dataclass(frozen=True)
class NightResult:
    invoices: list
    balances: pl.DataFrame
    alerts: list[Alert]
    balances_from: str


@task(name="estimate", cache_policy=NO_CACHE, **IO_RETRIES)
def estimate(store_uri: str, usage: NightUsage, reference, catalog, period: Period) -> NightResult:
    """Credits, the draft invoices and every alert of the period so far."""
    store = open_store(store_uri)
    segments = list(reference.segments)
    events = period_credit_events(usage.per_event_usage, segments)
    previous = f"billing/period={period.previous()}/credit_balances.parquet"
    if store.exists(previous):
        opening = grants_from_balances(pl.read_parquet(io.BytesIO(store.read_bytes(previous))))
        outcome = wallets_from_opening(opening, list(reference.subscriptions), catalog, list(reference.purchases),
                                       events, period)
        balances_from = f"the {period.previous()} close"
    else:
        outcome = wallet_history(list(reference.subscriptions), catalog, list(reference.purchases), events, period)
        balances_from = f"grants only ({period.previous()} is not closed: earlier consumption is not known)"
    billable = apply_credits(usage_by_segment(usage.usage_by_dims, usage.per_event_usage), outcome.billable_units,
                             credit_meters(segments))
    currency_of = {s.subscription.subscription_id: s.plan.plan.currency for s in segments}
    rounding_of = {s.subscription.subscription_id: s.plan.plan.rounding for s in segments}
    extra = credit_lines(period, outcome, list(reference.purchases), list(reference.subscriptions), currency_of,
                         rounding_of)
    invoices = [replace(i, kind="invoice") for i in period_invoices(period, segments, billable, extra)]
    spend = {i.subscription_id: sum(l.amount_minor for l in i.lines if l.kind in ("usage", "overage"))
             for i in invoices}
    alerts = (price_change_notices(period, list(reference.subscriptions), catalog) + credit_alerts(outcome, period)
              + spend_alerts(period, segments, usage.usage_by_day, usage.per_event_usage, outcome.billable_by_day,
                             credit_meters(segments), spend))
    return NightResult(invoices, balances_table(outcome, period), alerts, balances_from)


def customers_over(invoices: list, segments: list, fraction: str = "0.8") -> list[dict]:
    """Subscriptions whose usage so far is above `fraction` of their budget."""
    from decimal import Decimal

    from transforms.money import to_minor
    last = {s.subscription.subscription_id: s for s in segments}
    out = []
    for inv in invoices:
        seg = last[inv.subscription_id]
        budgets = [amount for kind, amount, label in thresholds(seg) if kind == "spend_threshold" and "budget" in label]
        controls = seg.plan.plan.spend_controls
        budget = seg.subscription.budget or (controls.budget if controls else None)
        if budget is None or not budgets:
            continue
        spend = sum(l.amount_minor for l in inv.lines if l.kind in ("usage", "overage"))
        if spend >= to_minor(budget * Decimal(fraction), inv.currency):
            out.append({"customer_id": inv.customer_id, "subscription_id": inv.subscription_id,
                        "spend_minor": spend, "budget_minor": to_minor(budget, inv.currency),
                        "currency": inv.currency})
    return out


def deliver(webhook: str, payload: dict, attempts: int = 3) -> None:
    """POST the alerts as JSON; retried with backoff; raises DeliveryFailed at the end."""
    body = json.dumps(payload, sort_keys=True).encode()
    last = ""
    for attempt in range(attempts):
        try:
            request = urllib.request.Request(webhook, data=body, headers={"Content-Type": "application/json"},
                                             method="POST")
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - the operator's URL
                if 200 <= response.status < 300:
                    return
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(getattr(exc, "reason", exc))
        time.sleep(min(2 ** attempt, 4) if attempt + 1 < attempts else 0)
    raise DeliveryFailed(f"alerts written, but the webhook did not take them after {attempts} tries ({last}); "
                         f"they stay pending and the next nightly run delivers them")


@flow(name="nightly", log_prints=False)
def nightly(store: str, plans: str, day: str, webhook: str | None = None) -> dict:
    """Take in the day's usage and bring the period to date: estimates, balances, alerts."""
    try:
        the_day = date.fromisoformat(day)
    except ValueError:
        raise InputError(f"--date {day!r} is not a date (YYYY-MM-DD)") from None
    period = Period.containing(the_day)
    catalog = load_catalog(plans)
    the_store = open_store(store)
    out_prefix = f"billing/nightly/date={the_day}/"
    pending_key = state_prefix(period) + "pending_delivery.json"
    if the_store.exists(out_prefix + MANIFEST):
        manifest = json.loads(the_store.read_bytes(out_prefix + MANIFEST))
        _deliver_pending(the_store, pending_key, webhook)
        return {**manifest, "status": "already_ran"}
    with period_lock(the_store, [period], f"nightly {the_day}", datetime.now(timezone.utc)):
        work_dir = work_dir_for(store, f"nightly-{the_day}")
        try:
            intake = take_in(store, period, work_dir / "inputs")
            reference = check_reference(quote(intake.inputs), quote(catalog), period)
            normalized = normalize_usage(quote(intake.inputs), work_dir)
            usage = settle_night(quote(normalized), quote(intake), quote(reference), quote(catalog), period,
                                 the_day, work_dir)
            result = estimate(store, quote(usage), quote(reference), quote(catalog), period)
            manifest = publish_night(store, period, the_day, quote(intake), quote(usage), quote(result),
                                     quote(reference), work_dir / "out")
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
    _report(manifest)
    _deliver_pending(the_store, pending_key, webhook)
    return {**manifest, "status": "ran"}


def _deliver_pending(store, key: str, webhook: str | None) -> None:
    if not webhook or not store.exists(key):
        return
    payload = json.loads(store.read_bytes(key))
    deliver(webhook, payload)
    store.delete(key)


@task(name="publish-night", cache_policy=NO_CACHE, **IO_RETRIES)
def publish_night(store_uri: str, period: Period, day: date, intake: Intake, usage: NightUsage,
                  result: NightResult, reference, out_dir: Path) -> dict:
    """State first (each object's accepted events), then the night's outputs, then the intake
    and fired alerts, the manifest last: a night killed anywhere reruns to the same result."""
    store = open_store(store_uri)
    prefix = state_prefix(period)
    for key, path in usage.accepted.items():
        store.put_file(_object_state_key(period, key), path)
    for key in intake.removed:
        store.delete(_object_state_key(period, key))
    fired_key = prefix + "fired_alerts.parquet"
    fired = pl.read_parquet(io.BytesIO(store.read_bytes(fired_key))) if store.exists(fired_key) else None
    if fired is not None:  # a retry of this task must find tonight's alerts new again
        if "night" not in fired.columns:  # state written before alerts remembered their night
            fired = fired.with_columns(pl.lit(None, dtype=pl.Date).alias("night"))
        fired = fired.filter(pl.col("night").is_null() | (pl.col("night") != day))
    every = alerts_table(result.alerts)
    identity = ["customer_id", "period", "kind", "threshold"]
    new = every if fired is None else every.join(fired.select(identity), on=identity, how="anti")
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {"alerts.parquet": new, "draft_invoices.parquet": invoices_table(result.invoices),
             "draft_invoice_lines.parquet": lines_table(result.invoices), "credit_balances.parquet": result.balances,
             "usage.parquet": _usage_per_customer(result.invoices)}
    for name, frame in names.items():
        frame.write_parquet(out_dir / name, **PARQUET)
    over = customers_over(result.invoices, list(reference.segments))
    manifest = {
        "billrun_version": package_version("billrun"), "date": day.isoformat(), "period": str(period),
        "intake": {"objects": len(intake.inputs.usage), "removed": list(intake.removed), **usage.counts},
        "alerts_fired": new.height, "over_80_percent_of_budget": over,
        "credit_balances_from": result.balances_from,
        "outputs": [{"key": f"billing/nightly/date={day}/{n}", "sha256": _sha256(out_dir / n)} for n in sorted(names)],
    }
    for name in names:
        store.put_file(f"billing/nightly/date={day}/{name}", out_dir / name)
    store.put_bytes(prefix + "intake.json", (json.dumps(intake.intake, indent=1, sort_keys=True) + "\n").encode())
    tonight = new.with_columns(pl.lit(day).alias("night"))
    merged = tonight if fired is None else pl.concat([fired, tonight])
    buffer = io.BytesIO()
    merged.write_parquet(buffer, **PARQUET)
    store.put_bytes(fired_key, buffer.getvalue())
    if new.height:
        pending = prefix + "pending_delivery.json"
        earlier = json.loads(store.read_bytes(pending))["alerts"] if store.exists(pending) else []
        ours = new.with_columns(pl.col("occurred_on").cast(pl.String)).to_dicts()
        earlier = [a for a in earlier if a not in ours]  # a retry does not queue them twice
        store.put_bytes(pending, json.dumps({"alerts": earlier + ours}, sort_keys=True).encode())
    store.put_bytes(f"billing/nightly/date={day}/{MANIFEST}", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return manifest


def _usage_per_customer(invoices: list) -> pl.DataFrame:
    """One row per customer x meter: usage so far and its estimated charges."""
    rows: dict[tuple, list] = {}
    for inv in invoices:
        for line in inv.lines:
            if line.kind in ("usage", "overage") and line.meter:
                acc = rows.setdefault((inv.customer_id, line.meter, inv.currency), [0, 0])
                acc[1] += line.amount_minor
    return pl.DataFrame([{"customer_id": c, "meter": m, "currency": cur, "estimated_minor": v[1]}
                         for (c, m, cur), v in sorted(rows.items())],
                        schema={"customer_id": pl.String, "meter": pl.String, "currency": pl.String,
                                "estimated_minor": pl.Int64})


def _report(manifest: dict) -> None:
    intake = manifest["intake"]
    create_table_artifact(
        key=f"nightly-{manifest['date']}",
        table=[{"measure": k, "value": str(v)} for k, v in intake.items() if k != "removed"]
        + [{"measure": "alerts fired", "value": str(manifest["alerts_fired"])}]
        + [{"measure": f"over 80% of budget: {o['customer_id']}", "value": f"{o['spend_minor']}/{o['budget_minor']}"}
           for o in manifest["over_80_percent_of_budget"]],
        description=f"Nightly run of {manifest['date']} ({manifest['period']} to date)")
