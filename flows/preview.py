"""`billrun preview --customer C --date D`: the customer's draft invoice(s) of the open period.

With a nightly run of the period up to D, the drafts are that night's (flows/nightly.py wrote
them: what the close would bill if the period ended that night). Without one, this flow rates the
store's inputs with the close's own steps, as `simulate` does: fetch, check, normalize, settle
(events up to the end of D, cut as a night cuts them), credits, rating with tax and terms. It
publishes nothing: no period lock, nothing under billing/, the billed-event index only read.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass

from prefect import flow, get_run_logger
from prefect.utilities.annotations import quote

from flows.billed_index import committed_index
from flows.engine import period_usage
from flows.publish import closed_manifest
from flows.secrets import keep_secrets_out_of_logs
from flows.settings import Settings
from flows.steps import (
    adjustments_billed_elsewhere,
    check_reference,
    fetch_inputs,
    private_work_dir,
    rate_invoices,
    replay_credits,
)
from transforms.credits.reports import CreditSummary, credit_summaries
from transforms.engine.invoices import Invoice
from transforms.errors import InputError
from transforms.inputs.plans import load_catalog
from transforms.periods import Period, parse_day


@dataclass(frozen=True)
class Rated:
    """The customer's invoices as the close would issue them if the period ended on the day."""

    invoices: list[Invoice]
    credits: CreditSummary | None  # the customer's wallet over the period so far (None: no credits)


@flow(name="preview", log_prints=False)
def rate_so_far(store: str, plans: str, customer: str, day: str, settings: Settings | None = None) -> Rated:
    """Rate the period holding `day` from the store's inputs through the end of `day`, with the
    close's steps, and keep the customer's invoices. Writes nothing to the store."""
    settings = settings or Settings.from_environ()
    keep_secrets_out_of_logs()
    the_day = parse_day(day, "--date")
    period = Period.containing(the_day)
    if closed_manifest(store, period) is not None:
        raise InputError(f"--date {day} is in {period}, which is closed: its final invoices are published")
    catalog = load_catalog(plans)
    # a preview holds no lock, so two may run at once: each its own work folder
    work_dir = private_work_dir(store, f"preview-{the_day}")
    try:
        inputs = fetch_inputs(store, work_dir / "inputs")
        # as the close: an adjustment that a closed period's documents bill is not billed here
        billed_elsewhere = adjustments_billed_elsewhere(store, inputs, [period])
        reference = check_reference(inputs, catalog, period, billed_elsewhere)
        index = committed_index(store, leave_out=[str(period)])
        with period_usage(store, inputs, work_dir, f"preview-{the_day}", settings) as usage:
            # the events up to the end of the day, as a night of that day takes them in
            checked = usage.through(the_day).checked(reference, catalog, period, index)
        replay = replay_credits(checked, quote(reference), catalog, period)
        invoices = rate_invoices(checked, quote(reference), quote(replay), period)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    mine = [inv for inv in invoices if inv.customer_id == customer]
    get_run_logger().info("preview: %d draft invoices of %s for %s as of %s", len(mine), period, customer, the_day)
    return Rated(mine, credit_summaries(replay, period).get(customer))
