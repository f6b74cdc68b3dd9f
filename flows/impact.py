"""What a pricing change would do to revenue, before it merges: `billrun impact` as a Prefect flow.

The plan catalog at a git revision (the base: `origin/main` in a pull request) and the working
tree's (the head) each re-rate the last N closed periods of the store with the close's own steps
(the ones `simulate` runs: fetch, check, normalize, settle, replay credits, rate), on the same
inputs, and transforms.finance.impact sets the two side by side and writes the markdown report. Nothing is
written to the store: the report is returned (the command line prints it or writes `--out`).
"""
from __future__ import annotations

import hashlib
import json
import shutil

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.utilities.annotations import quote

from flows.billed_index import committed_index
from flows.engine import PeriodUsage, period_usage
from flows.gitplans import catalog_at, revision
from flows.preflight import closed_periods
from flows.report import fetch_costs
from flows.settings import Settings
from flows.steps import (
    CheckedReference,
    adjustments_billed_elsewhere,
    check_reference,
    fetch_inputs,
    private_work_dir,
    rate_invoices,
    replay_credits,
)
from flows.store import open_store
from transforms.errors import BillrunError, InputError
from transforms.finance.impact import (
    SHOCK_AMOUNT_DEFAULT,
    SHOCK_PCT_DEFAULT,
    TOP_DEFAULT,
    PeriodRerates,
    attach_changes,
    breakage_and_margin,
    catalog_changes,
    currency_totals,
    customer_changes,
    impact_markdown,
    migration_notices,
    period_totals,
    plan_changes,
    thresholds,
)
from transforms.finance.margins import Costs
from transforms.finance.simulate import ModelTables, rated_model_tables
from transforms.inputs.plans import Catalog, load_catalog
from transforms.layout import manifest_key
from transforms.money import decimal_text
from transforms.periods import Period


def periods_to_rerate(store: str, periods: int) -> list[Period]:
    """The last `periods` closed periods (closed: a manifest); refused when there is none."""
    if periods < 1:
        raise InputError(f"--periods {periods}: re-rate at least 1 closed period")
    closed = closed_periods(store)
    if not closed:
        raise InputError(f"{open_store(store).uri}: no closed period to re-rate (close one first: "
                         f"billrun close --period YYYY-MM)")
    return closed[-periods:]


def _sided(which: str, step, *args):
    """A step of one side's re-rate; a user error says which plans it came from."""
    try:
        return step(*args)
    except BillrunError as exc:
        raise type(exc)(f"with the {which} plans: {exc}") from None


def rerated_model_tables(store: str, usage: PeriodUsage, reference: CheckedReference, catalog: Catalog, which: str,
                         period: Period, costs: Costs) -> ModelTables:
    """The period re-rated with `catalog` by the close's steps, as the close would bill it (and
    as `simulate` re-rates), with the revenue and margins the close would write."""
    index = committed_index(store, leave_out=[str(period)])
    checked = _sided(which, usage.checked, reference, catalog, period, index)
    replay = _sided(which, replay_credits, checked, quote(reference), catalog, period)
    invoices = _sided(which, rate_invoices, checked, quote(reference), quote(replay), period)
    return rated_model_tables(period, invoices, replay, reference.segments, checked.usage_by_day, costs)


@flow(name="impact", log_prints=False)
def impact(store: str, plans: str, base: str, periods: int = 1, shock: str = str(SHOCK_PCT_DEFAULT),
           shock_amount: str = str(SHOCK_AMOUNT_DEFAULT), top: int = TOP_DEFAULT,
           settings: Settings | None = None) -> dict:
    """Re-rate the last `periods` closed periods with the plans at git revision `base` and with
    the plans folder as it is; return the comparison and its markdown report (`markdown`)."""
    settings = settings or Settings.from_environ()
    limits = thresholds(shock, shock_amount, top)
    rev = revision(plans, base)
    base_catalog, head_catalog = catalog_at(plans, rev), load_catalog(plans)
    chosen = periods_to_rerate(store, periods)
    label = hashlib.sha256(f"{rev.commit}|{periods}".encode()).hexdigest()[:10]
    work_dir = private_work_dir(store, f"impact-{label}")
    rerated = []
    try:
        inputs = fetch_inputs(store, work_dir / "inputs")
        # customers and subscriptions checked against both catalogs first: a plan the pull request
        # removes while subscriptions are on it fails here, before any usage is settled
        references = {}
        for period in chosen:
            # as the close: an adjustment that another closed period's documents bill is not billed here
            billed_elsewhere = adjustments_billed_elsewhere(store, inputs, [period])
            for which, catalog in (("base", base_catalog), ("head", head_catalog)):
                references[(period, which)] = _sided(which, check_reference, inputs, catalog, period,
                                                     billed_elsewhere)
        costs, costs_source = fetch_costs(store)
        with period_usage(store, inputs, work_dir, f"impact-{label}", settings) as usage:  # normalized once for all
            for period in chosen:
                sides = {which: rerated_model_tables(store, usage, references[(period, which)], catalog, which, period,
                                                     costs)
                         for which, catalog in (("base", base_catalog), ("head", head_catalog))}
                rerated.append(PeriodRerates(period, _run_id(store, period), sides["base"], sides["head"]))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    reference = references[(chosen[-1], "head")]
    names = dict(reference.customers.select("customer_id", "name").iter_rows())
    customers = customer_changes(rerated, names, limits)
    credit_plans = {f.plan.plan for c in (base_catalog, head_catalog) for f in c.files.values() if f.plan.credits}
    notices = migration_notices(list(reference.subscriptions), base_catalog, head_catalog, chosen[0].start,
                                closed_periods(store)[-1].end)
    totals = period_totals(rerated)
    report = {
        "store": store, "plans_folder": plans, "periods_asked": periods,
        "base": {"given": rev.given, "commit": rev.commit, "folder": rev.folder},
        "periods": [{"period": str(r.period), "run_id": r.run_id} for r in rerated],
        "thresholds": {"shock_pct": decimal_text(limits.shock * 100), "shock_amount": decimal_text(limits.shock_amount),
                       "top": limits.top},
        "catalog_changes": catalog_changes(base_catalog, head_catalog),
        "totals": totals, "currency_totals": currency_totals(totals),
        "plans": plan_changes(rerated), "customers": customers,
        "breakage_and_margin": breakage_and_margin(rerated, credit_plans, costs_source is not None),
        "notices_since": chosen[0].start.isoformat(),
        "notices": attach_changes(notices, customers),
        "costs": costs_source,
        "notes": _notes(periods, rerated),
    }
    report["markdown"] = impact_markdown(report)
    create_markdown_artifact(key="pricing-impact", markdown=report["markdown"],
                             description=f"Pricing impact of the plans against {rev.given} ({rev.short})")
    get_run_logger().info("impact %s..working tree on %s: %d customers' bills change", rev.short,
                          ", ".join(str(r.period) for r in rerated), sum(1 for c in customers if c["change_minor"]))
    return report


def _run_id(store: str, period: Period) -> str:
    return json.loads(open_store(store).read_bytes(manifest_key(period)))["run_id"]


def _notes(asked: int, rerated: list[PeriodRerates]) -> list[str]:
    if len(rerated) < asked:
        return [f"--periods {asked}: the store has {len(rerated)} closed period(s); all of them are re-rated."]
    return []
