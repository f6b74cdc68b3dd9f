"""Which billing model is right: simulation and migration as Prefect flows.

`simulate` re-rates a closed period's usage with some subscriptions moved to candidate plans,
using the close's own steps on the close's own inputs, and compares each moved customer's bill,
breakage and margin with what the period's documents billed. It writes nothing into
billing/period=P/; with a report it writes billing/simulations/<id>/ (report.html,
customers.parquet, margins.parquet, summary.json last). The comparison writes those files in the
run's work folder, the bytes it publishes, and the publishing step copies them: the comparison,
the margins and the charts never cross a task boundary (what does, and why: flows/steps.py).

`migrate` makes a move real from a date: after a preview (a simulation of the last closed period)
it rewrites the subscriptions file, ending each moved row on the date and starting a new row on
the new plan there. It refuses a date that a closed period covers, so closed periods keep the
rows they were billed with.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
from dataclasses import dataclass, replace
from datetime import date, datetime, timezone
from decimal import Decimal, InvalidOperation
from importlib.metadata import version as package_version
from pathlib import Path

import polars as pl
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from flows.billed_index import committed_index
from flows.engine import period_usage
from flows.ingest import read_table
from flows.locks import period_lock
from flows.outputs import PARQUET
from flows.preflight import closed_periods
from flows.report import (
    IO_RETRIES,
    NO_COSTS_NOTE,
    Chart,
    ClosedPeriod,
    breakage_charts,
    changes_chart,
    fetch_costs,
    load_closed_period,
    load_revenue_history,
    margin_charts,
    revenue_charts,
    simulation_html,
)
from flows.settings import Settings
from flows.steps import (
    CheckedReference,
    Inputs,
    check_reference,
    fetch_inputs,
    private_work_dir,
    rate_invoices,
    replay_credits,
)
from flows.store import open_store
from transforms.credits.model import WalletReplay
from transforms.engine.checked_usage import CheckedFiles
from transforms.engine.invoices import Invoice
from transforms.errors import InputError
from transforms.finance.margins import Costs
from transforms.finance.simulate import (
    SHOCK_DEFAULT,
    ModelTables,
    Move,
    PlanRef,
    breakage_by_period,
    change_bins,
    closed_model_tables,
    closed_period_problem,
    compared_models,
    customer_plans,
    margin_by_meter,
    migration,
    moved_subscriptions,
    notice_problem,
    plan_moves,
    plan_ref,
    rated_model_tables,
    revenue_by_plan_stream,
)
from transforms.inputs.plans import Catalog, load_catalog, plan_entries_for
from transforms.inputs.reference import checked_customers, segments_in
from transforms.layout import CUSTOMERS_KEYS, SUBSCRIPTIONS_KEYS, period_prefix, simulation_prefix
from transforms.money import decimal_text
from transforms.periods import Period


def shock_threshold(text: str) -> Decimal:
    """`--shock 0.2`: a bill that rises by more than this fraction is a bill shock."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        value = None
    if value is None or not value.is_finite() or value < 0:
        raise InputError(f"--shock {text!r} is not a fraction of at least 0 (0.2 means 20%)")
    return value


def simulation_catalog(plans: str, candidates: str | None) -> Catalog:
    """The billing catalog plus candidate plan files that only simulations see (never billed)."""
    catalog = load_catalog(plans)
    if candidates is None:
        return catalog
    return Catalog.from_files(list(catalog.files.values()) + list(load_catalog(candidates).files.values()))


@dataclass(frozen=True)
class Rerated:
    """The close's steps run on the candidate subscriptions."""

    reference: CheckedReference
    moved: frozenset[str]          # subscription ids moved
    checked: CheckedFiles
    replay: WalletReplay
    invoices: list[Invoice]
    inputs: Inputs


SIMULATION_FILES = ("customers.parquet", "margins.parquet", "report.html", "summary.json")
"""What a simulation publishes, in the order it is written: summary.json last, as a folder
without it is an interrupted write."""


def simulation_id(period: Period, moves: tuple[Move, ...], customers: frozenset[str] | None, shock: Decimal,
                  rerated: Rerated, closed: ClosedPeriod, costs_source: dict | None) -> str:
    """Deterministic: the same question about the same store and plans has the same id (and the
    report the same bytes)."""
    digest = hashlib.sha256(f"simulate|{period}|{','.join(map(str, moves))}|{sorted(customers or [])}|{shock}|"
                            f"billrun {package_version('billrun')}|{closed.manifest['run_id']}".encode())
    for obj in rerated.inputs.all:
        digest.update(f"|{obj.key}|{obj.sha256}".encode())
    for entry in plan_entries_for(rerated.reference.segments):
        digest.update(f"|plan|{entry['plan']}|{entry['version']}|{entry['sha256']}".encode())
    digest.update(f"|costs|{(costs_source or {}).get('sha256')}".encode())
    return f"sim-{period}-{digest.hexdigest()[:12]}"


@task(name="move-subscriptions", cache_policy=NO_CACHE)
def candidate_reference(reference: CheckedReference, moves: tuple[Move, ...], catalog: Catalog, period: Period,
                        customers: frozenset[str] | None) -> tuple[CheckedReference, frozenset[str]]:
    """The close's reference data with the subscriptions moved, and the ids of those moved."""
    subs, moved = moved_subscriptions(reference.subscriptions, moves, catalog, period, customers)
    return replace(reference, subscriptions=subs, segments=tuple(segments_in(period, list(subs), catalog))), moved


@task(name="compare-models", cache_policy=NO_CACHE)
def compare_models(store: str, period: Period, moves: tuple[Move, ...], customers: frozenset[str] | None,
                   shock: Decimal, original: CheckedReference, rerated: Rerated, closed: ClosedPeriod, costs: Costs,
                   costs_source: dict | None, history: dict[str, pl.DataFrame], folder: Path | None) -> dict:
    """Both models side by side: per customer, per currency, and what the charts draw. With a
    `folder`, the simulation's files (SIMULATION_FILES) are written there with the bytes they are
    published with, the result naming its report; the comparison, the margins and the charts
    stay in this step."""
    current = closed_model_tables(closed, original.segments, costs)
    candidate = rated_model_tables(period, rerated.invoices, rerated.replay, rerated.reference.segments,
                                   rerated.checked.usage_by_dims, costs)
    names = dict(original.customers.select("customer_id", "name").iter_rows())
    models = compared_models(current, candidate, rerated, names, shock, closed.quarantine)
    result = {
        "simulation_id": simulation_id(period, moves, customers, shock, rerated, closed, costs_source),
        "store": store, "period": str(period), "plan_map": [str(m) for m in moves],
        "customers_filter": sorted(customers) if customers else [], "shock": str(shock),
        "shock_pct": decimal_text(shock * 100), "closed_run_id": closed.manifest["run_id"], "costs": costs_source,
        "moved": {"customers": len(models.moved_customers), "subscriptions": len(rerated.moved)},
        "totals": models.totals, "quarantined": models.quarantined,
        "drift": {"customers": len(models.drift), "examples": models.drift[:10]},
        "notes": _notes(models.quarantined, models.drift, costs_source), "report": None,
        "customers": models.customers.to_dicts(),
    }
    if folder is None:
        return result
    charts = _charts(current, candidate, models.customers, models.margins, models.moved_customers, history, period,
                     shock)
    result = {**result, "report": simulation_prefix(result["simulation_id"]) + "report.html"}
    folder.mkdir(parents=True)
    for name, frame in (("customers.parquet", models.customers), ("margins.parquet", models.margins)):
        frame.write_parquet(folder / name, **PARQUET)
    (folder / "report.html").write_bytes(simulation_html(result, models.customers, charts).encode())
    (folder / "summary.json").write_bytes((json.dumps(result, indent=2, sort_keys=True) + "\n").encode())
    return result


def _notes(quarantined: dict, drift: list[str], costs_source: dict | None) -> list[str]:
    """What a reader must know before trusting the figures."""
    notes = []
    if quarantined["rows"]:
        meters = ", ".join(f"{m} {n}" for m, n in quarantined["by_meter"].items())
        notes.append(f"{quarantined['rows']} usage rows the close billed would not be billed under the candidate "
                     f"plans (they price no such meter or no charge fits: {meters}); they are left out of "
                     f"\"would be billed\", so the candidate looks cheaper than it would be with prices for them.")
    if drift:
        notes.append(f"{len(drift)} customers who were not moved re-rate to a different bill than was issued "
                     f"({', '.join(drift[:5])}{', ...' if len(drift) > 5 else ''}): the store or the plans changed "
                     f"since the close, and the moved customers' figures include that change. Run `billrun status`.")
    if costs_source is None:
        notes.append(NO_COSTS_NOTE)
    return notes


def _charts(current: ModelTables, candidate: ModelTables, comparison: pl.DataFrame, margins: pl.DataFrame,
            moved: frozenset[str], history: dict[str, pl.DataFrame], period: Period, shock: Decimal) -> list[Chart]:
    """Revenue by plan and stream, breakage over the closed periods, the distribution of bill
    changes and margin by meter, each model beside the other."""
    revenue = [{**e, "model": name} for name, tables in (("current", current), ("candidate", candidate))
               for e in revenue_by_plan_stream(tables.revenue, customer_plans(tables.segments), moved)]
    return (revenue_charts(revenue, "of the moved customers")
            + breakage_charts(breakage_by_period(history), breakage_by_period({str(period): candidate.revenue}),
                              str(period))
            + [changes_chart(change_bins(comparison, shock), decimal_text(shock * 100))]
            + margin_charts({name: margin_by_meter(margins.filter(pl.col("model") == name))
                             for name in ("current", "candidate")}))


@task(name="publish-simulation", cache_policy=NO_CACHE, **IO_RETRIES)
def publish_simulation(store_uri: str, folder: Path, simulation_id: str) -> None:
    """The simulation's files from `folder` (compare-models wrote them) into
    billing/simulations/<id>/, in the order of SIMULATION_FILES."""
    store = open_store(store_uri)
    prefix = simulation_prefix(simulation_id)
    for name in SIMULATION_FILES:
        store.put_file(prefix + name, folder / name)


@flow(name="simulate", log_prints=False)
def simulate(store: str, plans: str, period: str, plan_map: list[str], shock: str = str(SHOCK_DEFAULT),
             customers: list[str] | None = None, candidates: str | None = None, report: bool = True,
             require_moves: bool = True, settings: Settings | None = None) -> dict:
    """Re-rate a closed period with the subscriptions of `plan_map` moved (OLD=NEW, plan or
    plan:version) and compare bills, breakage and margins with what was billed."""
    settings = settings or Settings.from_environ()
    the_period = Period.parse(period)
    threshold = shock_threshold(shock)
    catalog = simulation_catalog(plans, candidates)
    moves = plan_moves(plan_map, catalog)
    wanted = frozenset(customers) if customers else None
    closed = load_closed_period(store, the_period)
    label = hashlib.sha256(f"{plan_map}|{sorted(wanted or [])}".encode()).hexdigest()[:10]
    work_dir = private_work_dir(store, f"simulate-{the_period}-{label}")
    try:
        # quote(): the reference, the replay and the invoices go to tasks as they are (Prefect
        # would otherwise walk every dataclass in them looking for futures: about 7 CPU s for the
        # reference of 100k customers); the inputs and the catalog are a few hundred objects at most
        inputs = fetch_inputs(store, work_dir / "inputs")
        original = check_reference(inputs, catalog, the_period)
        reference, moved = candidate_reference(quote(original), moves, catalog, the_period, wanted)
        _check_moves(reference, moved, moves, the_period, wanted, original, require_moves)
        # settled as the close settles it; what the other closed periods' documents bill is not billed here
        index = committed_index(store, leave_out=[str(the_period)])
        with period_usage(store, inputs, work_dir, f"simulate-{the_period}-{label}", settings) as usage:
            checked = usage.checked(reference, catalog, the_period, index)
        replay = replay_credits(checked, quote(reference), catalog, the_period)
        invoices = rate_invoices(checked, quote(reference), quote(replay), the_period)
        costs, costs_source = fetch_costs(store)
        history = load_revenue_history(store)
        # the checked usage is its files in the work folder, read by the comparison; the report's files
        # are written there too, and published from there
        files = work_dir / "simulation" if report else None
        result = compare_models(store, the_period, moves, wanted, threshold, quote(original),
                                quote(Rerated(reference, moved, checked, replay, invoices, inputs)),
                                quote(closed), costs, costs_source, history, files)
        if files is not None:
            publish_simulation(store, files, result["simulation_id"])
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    _artifact(result)
    get_run_logger().info("simulate %s %s: %d customers moved", the_period, ", ".join(result["plan_map"]),
                          result["moved"]["customers"])
    return result


def _check_moves(reference: CheckedReference, moved: frozenset[str], moves: tuple[Move, ...], period: Period,
                 wanted: frozenset[str] | None, original: CheckedReference, require_moves: bool) -> None:
    """Refuse a simulation that moves nobody or names customers it cannot move (a typo)."""
    known = set(original.customers["customer_id"].to_list())
    unknown = sorted((wanted or frozenset()) - known)
    if unknown:
        raise InputError(f"--customers: {', '.join(unknown)} not in customers")
    in_period = {s.subscription.customer_id for s in reference.segments if s.subscription.subscription_id in moved}
    missing = sorted((wanted or frozenset()) - in_period)
    if require_moves and missing:
        raise InputError(f"--customers: {', '.join(missing)} has no subscription on "
                         f"{' or '.join(str(m.old) for m in moves)} in {period}")
    if require_moves and not in_period:
        raise InputError(f"no subscription is on {' or '.join(str(m.old) for m in moves)} in {period}: "
                         f"nothing to simulate")


def _artifact(result: dict) -> None:
    create_table_artifact(
        key=f"simulate-{result['period']}",
        table=[{"currency": t["currency"], "customers": t["customers"], "paid_minor": t["paid_minor"],
                "would_pay_minor": t["would_pay_minor"], "breakage_current_minor": t["breakage_current_minor"],
                "breakage_candidate_minor": t["breakage_candidate_minor"], "shock": t["shock"], "down": t["down"]}
               for t in result["totals"]],
        description=f"Simulation {result['simulation_id']} of {result['period']}: {', '.join(result['plan_map'])}")


# --- migrate ----------------------------------------------------------------------------------

def _day(text: str, option: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise InputError(f"{option} {text!r} is not a date (YYYY-MM-DD)") from None


@dataclass(frozen=True)
class SubscriptionsFile:
    key: str
    data: bytes
    frame: pl.DataFrame
    customers: pl.DataFrame


@task(name="read-subscriptions", cache_policy=NO_CACHE, **IO_RETRIES)
def read_subscriptions(store_uri: str) -> SubscriptionsFile:
    store = open_store(store_uri)
    work_dir = private_work_dir(store_uri, "migrate-read")
    try:
        keys = {}
        for candidates, what in ((SUBSCRIPTIONS_KEYS, "subscriptions"), (CUSTOMERS_KEYS, "customers")):
            present = [k for k in candidates if store.exists(k)]
            if len(present) != 1:
                raise InputError(f"{store.uri}: need exactly one of {' or '.join(candidates)} ({what})")
            keys[what] = present[0]
        local = store.fetch(list(keys.values()), work_dir)
        customers = checked_customers(read_table(local[keys["customers"]], keys["customers"]), keys["customers"])
        key = keys["subscriptions"]
        return SubscriptionsFile(key, local[key].read_bytes(), read_table(local[key], key), customers)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _file_bytes(frame: pl.DataFrame, key: str) -> bytes:
    buffer = io.BytesIO()
    if key.endswith(".parquet"):
        frame.write_parquet(buffer, **PARQUET)
    else:
        frame.write_csv(buffer)
    return buffer.getvalue()


@task(name="write-subscriptions", cache_policy=NO_CACHE)
def write_subscriptions(store_uri: str, before: SubscriptionsFile, after: pl.DataFrame, on: date,
                        command: str) -> None:
    """Replace the subscriptions file, holding the lock of the period the migration starts in
    (so that period's close reads the file before or after, never during), and only if no close
    has covered the date and nobody changed the file since it was read."""
    store = open_store(store_uri)
    with period_lock(store, [Period.containing(on)], command, datetime.now(timezone.utc)):
        problem = closed_period_problem(on, closed_periods(store_uri))
        if problem:
            raise InputError(problem)
        if store.read_bytes(before.key) != before.data:
            raise InputError(f"{before.key} changed while the migration was prepared; run it again")
        store.put_bytes(before.key, _file_bytes(after, before.key))


def meters_used(store_uri: str, period: Period) -> dict[str, set[str]]:
    """Subscription -> the meters it was billed usage of in a closed period."""
    key = period_prefix(period) + "usage_summary.parquet"
    store = open_store(store_uri)
    if not store.exists(key):
        return {}
    frame = pl.read_parquet(io.BytesIO(store.read_bytes(key)), columns=["subscription_id", "meter"]).unique()
    used: dict[str, set[str]] = {}
    for subscription_id, meter in frame.cast(pl.String).iter_rows():
        used.setdefault(subscription_id, set()).add(meter)
    return used


@flow(name="migrate-plan", log_prints=False)
def migrate(store: str, plans: str, plan: str, to: str, on: str, as_of: str, customers: list[str] | None = None,
            notice_days: int = 30, dry_run: bool = False, report: bool = True,
            settings: Settings | None = None) -> dict:
    """Move subscriptions on `plan` to `to` from `on`: preview on the last closed period, then
    (unless `dry_run`) rewrite the subscriptions file."""
    settings = settings or Settings.from_environ()
    catalog = load_catalog(plans)
    old, new = plan_ref(plan, catalog, "--plan"), plan_ref(to, catalog, "--to")
    on_day, as_of_day = _day(on, "--on"), _day(as_of, "--as-of")
    if notice_days < 0:
        raise InputError("--notice-days must be 0 or more")
    wanted = frozenset(customers) if customers else None
    closed = closed_periods(store)
    for problem in (closed_period_problem(on_day, closed), notice_problem(on_day, as_of_day, notice_days)):
        if problem:
            raise InputError(problem)
    current = read_subscriptions(store)
    used = meters_used(store, max(closed)) if closed else {}
    planned = migration(current.frame, current.key, current.customers, catalog, old, new, on_day, wanted, used)
    moved_customers = sorted({c["customer_id"] for c in planned.changes})
    result = {"status": "nothing_to_migrate", "store": store, "plan": str(old), "to": str(new),
              "on": on_day.isoformat(), "notify_by": date.fromordinal(on_day.toordinal() - notice_days).isoformat(),
              "subscriptions": current.key, "changes": list(planned.changes), "preview": None, "after": None}
    if not planned.changes:
        return result
    if closed:
        # the preview prices the version customers will get: the one in force on the date
        target = new if new.version else PlanRef(new.plan, catalog.in_force_on(new.plan, on_day).plan.version)
        preview = simulate(store=store, plans=plans, period=str(max(closed)), plan_map=[f"{old}={target}"],
                           customers=moved_customers, report=report, require_moves=False, settings=settings)
        result["preview"] = {k: preview[k] for k in ("simulation_id", "period", "plan_map", "moved", "totals",
                                                     "quarantined", "notes", "report")}
    first = Period.containing(on_day) if on_day.day == 1 else Period.containing(on_day).next()
    result["after"] = (f"billrun simulate --period {first} --plan-map {new.plan}={old} "
                       f"--customers {','.join(moved_customers)}")
    if dry_run:
        return {**result, "status": "dry_run"}
    write_subscriptions(store, current, planned.subscriptions, on_day,
                        f"migrate {old} to {new} on {on_day}")
    get_run_logger().info("migrate %s to %s on %s: %d subscriptions", old, new, on_day, len(planned.changes))
    return {**result, "status": "migrated"}
