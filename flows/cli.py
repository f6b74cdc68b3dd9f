"""The `billrun` command line.

Every command takes `--store` and `--plans` (before or after the command name). A user's mistake
(bad plan, bad argument, missing input, unreachable storage) prints one line and exits 1; exit 0
means the command did what it says. Prefect runs embedded unless PREFECT_API_URL points at a server.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from transforms.layout import report_key  # light: the command line imports the heavy modules lazily

DEFAULT_STORE = "./billing-data"
DEFAULT_PLANS = "./plans"

class _PlainHelp:
    """--help shows no type placeholder (typer would print `<bool>` beside it)."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class _Command(_PlainHelp, TyperCommand):
    pass


class _Group(_PlainHelp, TyperGroup):
    pass


app = typer.Typer(
    help="billrun: batch billing for AI and API products (usage, credits and hybrids), exact to the cent.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, cls=_Group)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)


class _OneLineUserErrors(logging.Filter):
    """Prefect logs a failed task's traceback; for a user's mistake the one-line message is the
    whole story, so drop the traceback (a bug keeps its traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from flows.diskfull import full_disk_message
        from flows.store import StoreError
        from transforms.errors import BillrunError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (BillrunError, StoreError)) or (exc is not None and full_disk_message(exc)):
            record.exc_info = None
            record.exc_text = None
            record.msg, record.args = f"{type(exc).__name__}: {exc}", ()
            record.billrun_user_error = True  # the live list of steps leaves it to `billrun: error:`
        return True


def _quiet_user_errors() -> None:
    from flows.embedded import watch_embedded_server
    from flows.secrets import keep_secrets_out_of_logs

    keep_secrets_out_of_logs()
    watch_embedded_server()
    for handler in logging.getLogger("prefect").handlers + logging.getLogger().handlers:
        handler.addFilter(_OneLineUserErrors())


def _settings():
    """The command's settings (flows/settings.py), read from the environment once, on first need,
    and kept with the command's options; a malformed value is one line and exit 1."""
    import click

    from flows.settings import Settings

    ctx = click.get_current_context(silent=True)
    options = ctx.obj if ctx is not None and isinstance(ctx.obj, dict) else {}
    if "settings" not in options:
        options["settings"] = _checked(Settings.from_environ)
    return options["settings"]


def _now() -> datetime:
    """The one read of the clock per command; everything downstream gets it as a parameter."""
    return datetime.now(timezone.utc)


def _version(shown: bool) -> None:
    if shown:
        from importlib.metadata import version

        out.print(f"billrun {version('billrun')}")
        raise typer.Exit(0)


def _fail(message: str) -> None:
    err.print(f"billrun: error: {message}", markup=False, soft_wrap=True)
    raise typer.Exit(1)


def _run(fn, *args, **kwargs):
    """Call into billrun; a user error (or a full disk) becomes one line and exit 1."""
    from flows.diskfull import full_disk_message, watch_store
    from flows.store import StoreError
    from transforms.errors import BillrunError

    watch_store(kwargs.get("store"), _settings().prefect_home)
    try:
        return fn(*args, **kwargs)
    except (BillrunError, StoreError) as exc:
        _fail(str(exc))
    except Exception as exc:
        if (message := full_disk_message(exc)) is None:
            raise
        _fail(message)


def _shown(ctx: typer.Context, as_json: bool, fn, own_step: str | None = None):
    """`fn` with the steps of the flow it runs shown live on the terminal, when a person is
    watching (flows/progress.py); the display is gone before `_run` prints an error."""
    from flows.progress import show_steps, wanted

    options = ctx.obj or {}
    on = wanted(_settings(), as_json=as_json, verbose=options.get("verbose", False),
                enabled=options.get("progress", True))

    def shown(*args, **kwargs):
        with show_steps(err, on, flow=own_step is None) as steps:
            if steps is None or own_step is None:
                return fn(*args, **kwargs)
            with steps.step(own_step):
                return fn(*args, **kwargs)
    return shown


StoreOpt = typer.Option(None, "--store", metavar="URI", show_default=False,
                        help="Store: a local folder or s3://bucket/prefix \\[default: ./billing-data]")
PlansOpt = typer.Option(None, "--plans", metavar="DIR", show_default=False,
                        help="Folder of plan files (*.yaml) \\[default: ./plans]")
JsonOpt = typer.Option(False, "--json", metavar="", help="Print the result as JSON (for scripts).")
PERIOD = "YYYY-MM"
DAY = "YYYY-MM-DD"


@app.callback()
def main_options(ctx: typer.Context, store: Optional[str] = StoreOpt, plans: Optional[str] = PlansOpt,
                 verbose: bool = typer.Option(False, "--verbose", "-v", metavar="", help="Log one line per step "
                                              "(Prefect's INFO logs) instead of the live list of steps."),
                 progress: bool = typer.Option(True, "--progress/--no-progress", metavar="", help="Show the steps "
                                               "of close, nightly, backfill and demo live in a terminal (never with "
                                               "--json, in CI or when stderr is not a terminal)."),
                 version: bool = typer.Option(False, "--version", metavar="", callback=_version, is_eager=True,
                                              help="Print billrun's version and exit.")) -> None:
    ctx.obj = {"store": store, "plans": plans, "verbose": verbose, "progress": progress}
    if verbose:
        import prefect.main  # noqa: F401 - configures Prefect's logging (once), which -v then opens up to INFO

        logging.getLogger("prefect").setLevel(logging.INFO)


def _opts(ctx: typer.Context, store: str | None, plans: str | None) -> tuple[str, str]:
    base = ctx.obj or {}
    return (store or base.get("store") or DEFAULT_STORE, plans or base.get("plans") or DEFAULT_PLANS)


def _checked(check, *args, **kwargs):
    """A check of the arguments and the store made before Prefect starts (flows/preflight.py):
    a mistake answers at once, as one line."""
    from transforms.errors import BillrunError

    try:
        return check(*args, **kwargs)
    except Exception as exc:
        store = sys.modules.get("flows.store")  # a StoreError needs the store module; never import it for this
        if isinstance(exc, BillrunError) or (store is not None and isinstance(exc, store.StoreError)):
            _fail(str(exc))
        raise


def _where(store: str, plans: str) -> str:
    """The --store/--plans to repeat in a command printed for the user (when not the defaults)."""
    return "".join(f" {flag} {value}" for flag, value, default in (("--store", store, DEFAULT_STORE),
                                                                    ("--plans", plans, DEFAULT_PLANS))
                   if value != default)


def _warnings(result: dict) -> None:
    """What a run that did its job could not tidy up: one line each, exit code unchanged."""
    for line in result.get("warnings", []):
        err.print(f"billrun: warning: {line}", markup=False, soft_wrap=True)


def _print_close(result: dict, as_json: bool) -> None:
    from transforms.money import format_money

    _warnings(result)
    if as_json:
        out.print_json(json.dumps(result))
        return
    said = {"closed": "closed", "already_closed": "already closed: nothing changed"}[result["status"]]
    out.print(f"[bold]{result['period']}[/bold] {said} (run {result['run_id']})")
    table = Table(show_header=True, header_style="bold")
    for col in ("rows read", "billed", "duplicates", "quarantined", "invoices"):
        table.add_column(col, justify="right")
    rows = result["rows"]
    table.add_row(*(str(v) for v in (rows["read"], rows["billed"], rows["duplicates"], rows["quarantined"],
                                     result["invoices"])))
    out.print(table)
    for total in result["totals"]:
        out.print(f"  total {total['currency']}: {format_money(total['total_minor'], total['currency'])} "
                  f"over {total['invoices']} invoices")
    for reason, n in result.get("quarantined_by_reason", {}).items():
        out.print(f"  quarantined {reason}: {n}")
    if result.get("adjustments"):
        a = result["adjustments"]
        reasons = ", ".join(f"{r} {n}" for r, n in a["quarantined_by_reason"].items())
        out.print(f"  adjustments: {a['read']} rows, {a['billed']} billed, {a['quarantined']} quarantined"
                  f"{' (' + reasons + ')' if reasons else ''}")
    html = [o for o in result["outputs"] if o.endswith(".html")]
    if html:
        out.print(f"  invoices: {result['store'].rstrip('/')}/{html[0]} (and {len(html) - 1} more)")


@app.command(cls=_Command, epilog="Example: billrun close --period 2026-10 --store s3://acme-billing/prod")
def close(ctx: typer.Context,
          period: str = typer.Option(..., "--period", metavar=PERIOD, help="The month to close (UTC)."),
          before_period_end: bool = typer.Option(False, "--before-period-end", metavar="",
                                                 help="Close a month that has not ended yet (its invoices are "
                                                      "final and miss the days still to come)."),
          allow_empty: bool = typer.Option(False, "--allow-empty", metavar="",
                                           help="Close a month without a single usage row although "
                                                "subscriptions in it are on plans that meter usage."),
          store: Optional[str] = StoreOpt, plans: Optional[str] = PlansOpt, as_json: bool = JsonOpt,
          dask: Optional[str] = typer.Option(
              None, "--dask", envvar="BILLRUN_DASK_ADDRESS", metavar="ADDRESS", show_default=False,
              help="Run the shard steps on this Dask scheduler (tcp://scheduler:8786); the store must "
                   "be on S3 for workers on other machines. Default: threads on this machine.")) -> None:
    """Close a month: final invoices, lines, quarantine, HTML invoices and the manifest.

    A close is final: a month that has not ended, or one without usage while its subscriptions
    meter usage, is refused unless forced. Re-running a failed close resumes it; re-running a
    closed period changes nothing and says so."""
    store, plans = _opts(ctx, store, plans)
    now = _now()
    closed = _checked(_close_checks, store, plans, period, now, before_period_end, allow_empty)
    if closed is not None:
        _print_close(closed, as_json)
        return
    from flows.close import close_period

    _quiet_user_errors()
    _print_close(_run(_shown(ctx, as_json, close_period), store=store, plans=plans, period=period,
                      dask_address=dask, now=now, before_period_end=before_period_end, allow_empty=allow_empty,
                      settings=_settings()),
                 as_json)


def _close_checks(store: str, plans: str, period: str, now: datetime, before_period_end: bool,
                  allow_empty: bool) -> dict | None:
    """What a close can answer without Prefect: a malformed month, missing folders, a closed
    period (answered from its manifest), a month not ended, a store without any usage."""
    from flows import preflight
    from transforms.inputs.guards import close_too_early
    from transforms.periods import Period

    the_period = Period.parse(period)
    preflight.plans_folder(plans)
    preflight.store_folder(store)
    manifest = preflight.closed_manifest(store, the_period)
    if manifest is not None and not preflight.has_settings(store):
        # (a store with settings may have lakehouse tables to catch up: the flow answers it)
        from flows.locks import tidy_closed
        from flows.store import open_store

        # a close that ended after its manifest without tidying up: this run finishes it
        warnings = tidy_closed(open_store(store), the_period, manifest)
        return {**preflight.close_summary(manifest, store, "already_closed"), "warnings": warnings}
    refusal = close_too_early(the_period, now)
    if refusal and not before_period_end:
        raise preflight.InputError(refusal)
    refusal = None if allow_empty else preflight.usage_missing_refusal(store, plans, the_period)
    if refusal:
        raise preflight.InputError(refusal)
    return None


@app.command(cls=_Command, epilog="Example: billrun demo --store ./billing-data --customers 300")
def demo(ctx: typer.Context,
         period: str = typer.Option("2026-10", "--period", metavar=PERIOD,
                                    help="The month the sample usage falls in."),
         customers: int = typer.Option(300, "--customers", min=1, metavar="N", help="How many sample customers."),
         seed: int = typer.Option(7, "--seed", metavar="N",
                                  help="Seed of the sample generator (same seed, same store)."),
         overwrite: bool = typer.Option(False, "--overwrite", metavar="", help="Write the sample over the "
                                        "customers, subscriptions and usage the store already holds."),
         store: Optional[str] = StoreOpt, plans: Optional[str] = PlansOpt, as_json: bool = JsonOpt) -> None:
    """Make a realistic sample store from the plans in --plans, then close one month of it.

    A store that already holds customers, subscriptions or usage is left alone (pass another
    --store, or --overwrite). The sample month is closed whenever it is: it is a sample."""
    store, plans = _opts(ctx, store, plans)
    _checked(_demo_checks, store, plans, period, overwrite)
    from flows.close import close_period
    from flows.demo import write_demo_store

    _quiet_user_errors()
    written = _run(_shown(ctx, as_json, write_demo_store, own_step="sample-store"), store, plans, period, customers,
                   seed)
    if not as_json:
        out.print(f"sample store at {store}: {written['customers']} customers, "
                  f"{written['subscriptions']} subscriptions, {written['usage_objects']} usage objects")
    closed = _run(_shown(ctx, as_json, close_period), store=store, plans=plans, period=period,
                  before_period_end=True, allow_empty=True, settings=_settings())
    _print_close(closed, as_json)
    if not as_json:
        _print_showcase(store, plans, period, written["showcase"])


def _print_showcase(store: str, plans: str, period: str, features: list[dict]) -> None:
    """What the demo's showcase customers show, and what to open or run next."""
    from flows.demo import showcase_invoices

    where = "" if (store, plans) == (DEFAULT_STORE, DEFAULT_PLANS) else f" --store {store} --plans {plans}"
    shown = _run(showcase_invoices, store, period, features)
    if shown:
        out.print("what to look at:")
    for feature in shown:
        out.print(f"  {', '.join(feature['invoices'])}  {feature['name']}: {feature['shows']}", markup=False)
    first = next((f["invoices"][0] for f in shown if f["invoices"]), None)
    out.print("next:")
    if first:
        out.print(f"  billrun{where} explain --invoice {first}    (how each line was computed)", markup=False)
        out.print(f"  billrun{where} pdf --invoice {first}        (the invoice as a PDF)", markup=False)
    out.print(f"  billrun{where} report --period {period}       (the month in charts: revenue, breakage, margins)",
              markup=False)
    out.print(f"  billrun{where} status                       (closed periods and what changed since)", markup=False)


def _demo_checks(store: str, plans: str, period: str, overwrite: bool) -> None:
    from flows import preflight
    from transforms.periods import Period

    Period.parse(period)
    preflight.plans_folder(plans)
    if overwrite or store.startswith("s3://") or not Path(store).exists():
        return
    held = preflight.has_inputs(store)
    if held:
        raise preflight.InputError(
            f"store {store} already holds {', '.join(p.rstrip('/') for p in held)}: the demo never overwrites a "
            f"store's inputs; pass another --store (e.g. --store ./billing-demo), or --overwrite to replace them")


@app.command(cls=_Command, epilog="Example: billrun status --store s3://acme-billing/prod --json")
def status(ctx: typer.Context, store: Optional[str] = StoreOpt, plans: Optional[str] = PlansOpt,
           as_json: bool = JsonOpt) -> None:
    """Closed, incomplete and locked periods, and what changed since each was closed.

    The first thing to run on call: it names the backfill that would bring drifted periods up
    to date and the close that would finish an incomplete one."""
    store, plans = _opts(ctx, store, plans)
    _checked(_checked_folders, store, plans)
    from flows.status import store_status

    report = _run(store_status, store, plans)
    if as_json:
        out.print_json(json.dumps(report))
        return
    if not report["periods"]:
        out.print(f"{store}: no period closed yet")
    for p in report["periods"]:
        lock = ("  LOCKED by a run that already published (the next run removes it)" if p.get("lock") == "stale"
                else "  LOCKED (see `billrun unlock`)" if p["locked"] else "")
        if p["status"] == "closed":
            totals = ", ".join(f"{t['currency']} {t['total_minor']}" for t in p["totals"])
            out.print(f"{p['period']}  closed      run {p['run_id']}  invoices {p['invoices']}  "
                      f"totals (minor) {totals}{lock}")
            for change in p["changes"]:
                out.print(f"           changed since rated by {p['last_rated_by']}: {change}")
        elif p["status"] == "open":
            out.print(f"{p['period']}  open        no outputs yet{lock}")
        else:
            out.print(f"{p['period']}  incomplete  outputs without a manifest: "
                      f"run `billrun close --period {p['period']}{_where(store, plans)}` to finish it{lock}")
    for gap in report.get("gaps", []):
        out.print(f"{gap}  not closed  (between closed periods): run `billrun close --period {gap}"
                  f"{_where(store, plans)}` once its usage is in")
    if report["backfill"]:
        out.print(f"inputs or plans changed since the close: run `{report['backfill']}{_where(store, plans)}`")
    _print_tables_lag(report.get("tables"), store)


def _print_tables_lag(lake: dict | None, store: str) -> None:
    """Runs whose lakehouse tables lag their manifest, one line each."""
    if not lake:
        return
    for lag in lake["lagging"]:
        what = (f"{lag['period']} (close run {lag['run_id']})" if lag["kind"] == "close"
                else f"backfill run {lag['run_id']}")
        shown = ", ".join(lag["tables"][:4]) + (f" and {len(lag['tables']) - 4} more" if len(lag["tables"]) > 4 else "")
        out.print(f"tables behind the manifest of {what}: {shown}", markup=False)
    if lake["lagging"]:
        out.print(f"run `billrun sync-tables --store {store}` to catch up ({', '.join(lake['formats'])} tables at "
                  f"{lake['location']})", markup=False)


@app.command(name="sync-tables", epilog="Example: billrun sync-tables --store s3://acme-billing/prod")
def sync_tables(ctx: typer.Context, store: Optional[str] = StoreOpt, plans: Optional[str] = PlansOpt,
                as_json: bool = JsonOpt) -> None:
    """Commit every closed period and backfill to the lakehouse tables that lack it.

    The tables are configured in the store's billrun.yaml (`tables:`); each run is committed
    once, however often this runs. `billrun status` shows which tables lag."""
    from flows.tables import sync_tables as sync

    store, _ = _opts(ctx, store, plans)
    result = _run(sync, store)
    if as_json:
        out.print_json(json.dumps(result))
        return
    if not result["enabled"]:
        out.print(f"{store}: tables are off (no `tables:` formats in {store.rstrip('/')}/billrun.yaml)", markup=False)
        return
    out.print(f"{len(result['commits'])} table commits ({', '.join(result['formats'])} tables at "
              f"{result['location']})" + ("" if result["commits"] else ": every table is up to date"), markup=False)


@app.command(cls=_Command, epilog="Example: BILLING_HOOK=https://hooks.example.com/billing?token=... "
                     "billrun nightly --date 2026-10-14 --webhook-env BILLING_HOOK")
def nightly(ctx: typer.Context,
            day: str = typer.Option(..., "--date", metavar=DAY, help="The night's date: takes in the usage that "
                                    "arrived since the last run, up to and including this day (later days wait "
                                    "for their night)."),
            webhook_env: Optional[str] = typer.Option(None, "--webhook-env", metavar="NAME", help="POST the night's "
                                                      "new alerts as JSON to the URL this environment variable holds."),
            webhook_secret: Optional[str] = typer.Option(None, "--webhook-secret", metavar="BLOCK", help="... or to "
                                                         "the URL this Prefect Secret block holds."),
            webhook: Optional[str] = typer.Option(None, "--webhook", metavar="URL", help="... or to this URL (kept out "
                                                  "of Prefect; prefer --webhook-env: a command line is visible to "
                                                  "every user of the machine)."),
            store: Optional[str] = StoreOpt, plans: Optional[str] = PlansOpt, as_json: bool = JsonOpt) -> None:
    """Take in new usage and bring the period to date: estimates, credit balances, alerts.

    Only objects new or rewritten since the last night (or holding days a night has not taken in
    yet) are read, and only their events up to the end of --date count. An alert fires once per
    customer, period, kind and threshold; re-running a night changes nothing."""
    store, plans = _opts(ctx, store, plans)
    _checked(_nightly_checks, store, plans, day)
    from flows.nightly import nightly as nightly_flow
    from flows.settings import hand_over_webhook

    _quiet_user_errors()
    if sum(1 for given in (webhook_env, webhook_secret, webhook) if given) > 1:
        _fail("--webhook-env, --webhook-secret and --webhook name one webhook: give one of them")
    if webhook:
        # the flow gets the reference, never the URL: its parameters are stored in Prefect
        webhook_env = hand_over_webhook(webhook)
    result = _run(_shown(ctx, as_json, nightly_flow), store=store, plans=plans, day=day, webhook_env=webhook_env,
                  webhook_secret=webhook_secret, settings=_settings())
    _warnings(result)
    if as_json:
        out.print_json(json.dumps(result))
        return
    if result["status"] == "already_ran":
        out.print(f"{day}: already ran; nothing changed")
        return
    intake = result["intake"]
    out.print(f"{day} ({result['period']} to date): {intake['objects']} new objects, {intake['read']} rows read, "
              f"{intake['billed']} taken in, {intake['duplicates']} duplicates, {intake['quarantined']} quarantined; "
              f"{result['alerts_fired']} alerts fired; {len(result['over_80_percent_of_budget'])} customers over "
              f"80% of budget")


def _nightly_checks(store: str, plans: str, day: str) -> None:
    from flows import preflight
    from transforms.inputs.guards import night_of_closed_period
    from transforms.periods import Period, parse_day

    the_day = parse_day(day, "--date")
    _checked_folders(store, plans)
    if preflight.closed_manifest(store, Period.containing(the_day)) is not None \
            and not preflight.night_already_ran(store, the_day):
        raise preflight.InputError(night_of_closed_period(the_day))


@app.command(cls=_Command, epilog="Example: billrun backfill --from 2026-08 --to 2026-10 --reason 'gpt-4o price fix'")
def backfill(ctx: typer.Context,
             first: str = typer.Option(..., "--from", metavar=PERIOD, help="First period to re-rate."),
             last: str = typer.Option(..., "--to", metavar=PERIOD, help="Last period to re-rate."),
             reason: str = typer.Option("re-rated with current usage and plans", "--reason", metavar="TEXT",
                                        help="Why: printed on every document and kept in the manifest."),
             as_of: Optional[str] = typer.Option(None, "--as-of", metavar=DAY, show_default=False,
                                                 help="issued_on of the documents, on or after the day the "
                                                      "corrected invoices were issued \\[default: today, UTC]."),
             store: Optional[str] = StoreOpt, plans: Optional[str] = PlansOpt, as_json: bool = JsonOpt) -> None:
    """Re-rate closed periods and issue credit and debit notes for the differences.

    Finalized invoices are never rewritten. No difference, no document; running it twice issues
    nothing the second time. Periods in the range that are not closed are skipped (close them)."""
    store, plans = _opts(ctx, store, plans)
    as_of = as_of or _now().date().isoformat()
    _checked(_backfill_checks, store, plans, first, last, as_of)
    from flows.backfill import backfill as backfill_flow

    _quiet_user_errors()
    result = _run(_shown(ctx, as_json, backfill_flow), store=store, plans=plans, first=first, last=last, reason=reason,
                  as_of=as_of, settings=_settings())
    _warnings(result)
    if as_json:
        out.print_json(json.dumps(result))
        return
    for period in result["skipped"]:
        out.print(f"{period}: not closed, skipped (run `billrun close --period {period}`)")
    if result["status"] == "nothing_to_correct":
        out.print("nothing to correct: every closed period in the range matches what was issued")
        return
    if result["revenue_adjustments"] or result["ledger_adjustments"]:
        out.print(f"{result['revenue_adjustments']} revenue and {result['ledger_adjustments']} credit ledger "
                  f"adjustments (run {result['run_id']})")
    from transforms.money import format_money

    out.print(f"issued {len(result['documents'])} documents (run {result['run_id']}):")
    for doc in result["documents"]:
        out.print(f"  {doc['invoice_id']}  {doc['kind']:<11} {doc['period']}  corrects "
                  f"{doc['corrects_invoice_id'] or '-'}  {format_money(doc['total_minor'], doc['currency'])}")


def _backfill_checks(store: str, plans: str, first: str, last: str, as_of: str) -> None:
    from flows import preflight
    from transforms.inputs.guards import backfill_dated_too_early, periods_in_order
    from transforms.periods import Period, parse_day

    start, end = Period.parse(first, "--from"), Period.parse(last, "--to")
    issued_on = parse_day(as_of, "--as-of")
    for refusal in (periods_in_order(start, end),):
        if refusal:
            raise preflight.InputError(refusal)
    _checked_folders(store, plans)
    closed = [p for p in preflight.closed_periods(store) if start <= p <= end]
    refusal = backfill_dated_too_early(issued_on, closed)
    if refusal:
        raise preflight.InputError(refusal)


@app.command(cls=_Command, epilog="Example: billrun explain --invoice INV-2026-10-000042")
def explain(ctx: typer.Context,
            invoice: str = typer.Option(..., "--invoice", metavar="ID",
                                        help="An invoice, credit note or debit note id."),
            line: Optional[int] = typer.Option(None, "--line", metavar="N", show_default=False,
                                               help="With --events: only the events of line N."),
            events: bool = typer.Option(False, "--events", metavar="",
                                        help="List the events behind the invoice's usage lines, and the "
                                             "customer's duplicate and quarantined rows with why."),
            store: Optional[str] = StoreOpt, plans: Optional[str] = PlansOpt, as_json: bool = JsonOpt) -> None:
    """How each line of a document was computed: the rating steps, the usage behind it (by
    dimensions), the plan version file and hash, and the run and manifest that issued it."""
    store, _ = _opts(ctx, store, plans)
    _checked(_checked_folders, store, None)
    if line is not None and not events:
        _fail(f"--line {line}: needs --events (the events of that line)")
    if events:
        _explain_events(store, invoice, line, as_json)
        return
    from flows.explain import explain_invoice
    from transforms.money import format_money

    report = _run(explain_invoice, store, invoice)
    if as_json:
        out.print_json(json.dumps(report))
        return
    inv = report["invoice"]
    out.print(f"[bold]{inv['invoice_id']}[/bold] {inv['kind']} for {inv['customer_id']} "
              f"(subscription {inv['subscription_id']}), period {inv['period']}, "
              f"total {format_money(inv['total_minor'], inv['currency'])}")
    if inv.get("corrects_invoice_id"):
        out.print(f"  corrects {inv['corrects_invoice_id']}; reason: {report['reason']}")
    out.print(f"  issued by run {report['run_id']} ({report['manifest']})")
    for line in report["lines"]:
        out.print(f"\n  {line['line_no']}. [{line['kind']}] {line['description']}: "
                  f"{format_money(line['amount_minor'], inv['currency'])}", markup=False)
        if "plan" in line:
            p = line["plan"]
            out.print(f"     plan {p['plan']} v{p['version']} ({p['file']}, sha256 {str(p['sha256'])[:12]})",
                      markup=False)
        for step in line["steps"]:
            out.print(f"     = {step['label']}: {step['amount']}", markup=False)
        for row in line.get("usage", []):
            out.print(f"     <- {row['units']} units in {row['events']} events with {row['dims']}", markup=False)
        if "adjustment" in line:
            a = line["adjustment"]
            said = ([f"reason: {a['reason']}"] if "reason" in a else []) + (
                ["not taxed"] if a.get("taxable") is False else []) + (
                [f"{format_money(a['unapplied_minor'], inv['currency'])} not applied"] if a.get("unapplied_minor")
                else []) + ([f"from {a['source']}"] if "source" in a else [])
            out.print(f"     <- adjustment {a['adjustment_id']}{': ' + '; '.join(said) if said else ''}",
                      markup=False)


def _explain_events(store: str, invoice: str, line: int | None, as_json: bool) -> None:
    from flows.statement import explain_events
    from transforms.money import format_money

    report = _run(explain_events, store, invoice, line)
    if as_json:
        out.print_json(json.dumps(report))
        return
    out.print(f"{report['invoice_id']}: events of {report['customer_id']} in {report['period']}", markup=False)
    for entry in report["lines"]:
        if "events" in entry and "description" not in entry:
            out.print(f"\n  {entry['line_no']}. [{entry['kind']}] bills no events", markup=False)
            continue
        out.print(f"\n  {entry['line_no']}. {entry['description']}: {len(entry['events'])} events, "
                  f"{entry['event_units']} units, {entry['total_units']} after credits, "
                  f"{entry['included_units'] or 0} included, billed {entry['quantity']}: "
                  f"{format_money(entry['amount_minor'], report['currency'])}", markup=False)
        for e in entry["events"]:
            paid = f"  credits: {e['grant_id']}" if e["grant_id"] else ""
            out.print(f"     {e['event_id']}  {e['event_at']}  {e['quantity']}  {e['dims']}{paid}", markup=False)
    if line is None:
        out.print(f"\n  not billed: {len(report['not_billed'])} rows", markup=False)
        for r in report["not_billed"]:
            why = r["reason"] + (f" of {r['duplicate_of']}" if r["duplicate_of"] else "") + \
                (f" ({r['detail']})" if r["detail"] else "")
            out.print(f"     [{r['status']}] {r['event_id']}  {r['event_at']}  {r['quantity']}  {why}  "
                      f"<- {r['source_key']}#row={r['source_row']}", markup=False)


@app.command(cls=_Command, epilog="Example: billrun statement --invoice INV-2026-10-000042 --out statement.csv")
def statement(ctx: typer.Context,
              invoice: str = typer.Option(..., "--invoice", metavar="ID", help="An invoice id of a close."),
              out_path: Optional[Path] = typer.Option(None, "--out", metavar="FILE", show_default=False,
                                                      help="Where to write the CSV \\[default: ./<ID>-statement.csv]."),
              store: Optional[str] = StoreOpt, plans: Optional[str] = PlansOpt) -> None:
    """Write the customer's usage statement of an invoice as CSV: the events behind each line,
    then the line's total row (events, allowance, credits, billed quantity and amount)."""
    store, _ = _opts(ctx, store, plans)
    _checked(_checked_folders, store, None)
    from flows.statement import write_statement

    written = _run(write_statement, store, invoice, out_path or Path(f"{invoice}-statement.csv"))
    out.print(f"{invoice}: {written['out']} ({written['events']} events on {written['lines']} lines)", markup=False)


@app.command(cls=_Command, epilog="Example: billrun pdf --invoice INV-2026-10-000042 --out ./INV-2026-10-000042.pdf")
def pdf(ctx: typer.Context,
        invoice: str = typer.Option(..., "--invoice", metavar="ID", help="An invoice, credit note or debit note id."),
        out_path: Optional[Path] = typer.Option(None, "--out", metavar="FILE", show_default=False,
                                                help="Where to write the PDF \\[default: ./<ID>.pdf]."),
        store: Optional[str] = StoreOpt, plans: Optional[str] = PlansOpt) -> None:
    """Write the PDF of a published invoice, credit note or debit note (from its HTML)."""
    store, _ = _opts(ctx, store, plans)
    _checked(_checked_folders, store, None)
    from flows.pdf_and_drafts import document_pdf

    written = _run(document_pdf, store, invoice, out_path or Path(f"{invoice}.pdf"))
    out.print(f"{invoice}: {written}")


@app.command(cls=_Command, epilog="Example: billrun preview --customer acme --date 2026-11-14 --pdf")
def preview(ctx: typer.Context,
            customer: str = typer.Option(..., "--customer", metavar="ID", help="A customer_id of customers/."),
            day: Optional[str] = typer.Option(None, "--date", metavar=DAY, show_default=False,
                                              help="Show the open period holding this day, as of its end "
                                                   "\\[default: today, UTC]."),
            as_pdf: bool = typer.Option(False, "--pdf", metavar="", help="Write a PDF instead of HTML."),
            out_path: Optional[Path] = typer.Option(None, "--out", metavar="FILE", show_default=False,
                                                    help="Where to write it \\[default: ./DRAFT-<customer>-<period>"
                                                         ".html or .pdf]; several drafts get -1, -2, ..."),
            store: Optional[str] = StoreOpt, plans: Optional[str] = PlansOpt, as_json: bool = JsonOpt) -> None:
    """Preview a customer's draft invoice(s) of the open period, marked DRAFT and never numbered.

    From the latest nightly run of the period up to --date, or else rated from the store's
    inputs through --date by the close's own steps. Writes nothing into the store."""
    store, plans = _opts(ctx, store, plans)
    the_day = day or _now().date().isoformat()
    target = _checked(_preview_checks, store, plans, customer, the_day)
    from flows.pdf_and_drafts import drafts_from_night, write_drafts
    from transforms.documents.drafts import customer_drafts
    from transforms.documents.render import Draft

    period, night = target["period"], target["night"]
    invoices, credits = _run(drafts_from_night, store, night, customer) if night is not None else ([], None)
    if invoices:
        source = f"the nightly run of {night}"
        if night < target["day"] and not as_json:
            err.print(f"billrun: note: the figures are those of the nightly run of {night}; usage taken in "
                      f"since is not in them", markup=False, soft_wrap=True)
    else:
        from flows.preview import rate_so_far

        _quiet_user_errors()
        rated = _run(_shown(ctx, as_json, rate_so_far), store=store, plans=plans, customer=customer, day=the_day,
                     settings=_settings())
        invoices, credits = rated.invoices, rated.credits
        source = f"the store's inputs through {the_day}"
    drafts = customer_drafts(invoices, customer, target["day"], target["seller"], target["customer"])
    note = (f"the {period} invoice as it stands on {the_day} ({source}); the final invoice is numbered and "
            f"issued when the period closes, and may differ")
    written = _run(write_drafts, drafts, target["customer"], target["seller"], target["roundings"],
                   Draft(note, f"figures from {source}"), credits, out_path, as_pdf)
    if as_json:
        out.print_json(json.dumps({
            "customer_id": customer, "period": str(period), "as_of": the_day, "source": source,
            "drafts": [{"draft_id": inv.invoice_id, "subscription_id": inv.subscription_id, "currency": inv.currency,
                        "subtotal_minor": inv.subtotal_minor, "tax_minor": inv.tax_minor,
                        "total_minor": inv.total_minor, "due_on": inv.due_on.isoformat() if inv.due_on else None,
                        "path": str(path)} for inv, path in zip(drafts, written, strict=True)]}))
        return
    out.print(f"{customer}: draft of {period} as of {the_day}, from {source}", markup=False)
    for inv, path in zip(drafts, written, strict=True):
        tax = f" incl. tax {_money(inv.tax_minor, inv.currency)}" if inv.tax_minor else ""
        due = f", due {inv.due_on}" if inv.due_on else ""
        out.print(f"  {inv.invoice_id}: {_money(inv.total_minor, inv.currency)}{tax}{due} -> {path}", markup=False)


def _preview_checks(store: str, plans: str, customer: str, day: str) -> dict:
    from flows import preflight
    from transforms.periods import parse_day

    the_day = parse_day(day, "--date")
    _checked_folders(store, plans)
    return preflight.preview_target(store, plans, customer, the_day)


@app.command(cls=_Command, epilog="Example: billrun unlock --period 2026-10 --store s3://acme-billing/prod")
def unlock(ctx: typer.Context,
           period: str = typer.Option(..., "--period", metavar=PERIOD, help="The period whose lock to remove."),
           store: Optional[str] = StoreOpt, plans: Optional[str] = PlansOpt) -> None:
    """Remove the lock a killed close or backfill left on a period.

    Only when you know that run is dead: a live run that loses its lock could publish while
    another runs. The lock says which command, machine and process held it, and since when."""
    from flows.locks import unlock as remove_lock
    from flows.store import open_store
    from transforms.periods import Period

    store, _ = _opts(ctx, store, plans)
    the_period = _checked(Period.parse, period)
    holder = _run(lambda: remove_lock(open_store(store), the_period))
    out.print(f"{period}: removed the lock held by {holder}" if holder else f"{period}: not locked")


def _checked_folders(store: str, plans: str | None) -> None:
    from flows import preflight

    if plans is not None:
        preflight.plans_folder(plans)
    preflight.store_folder(store)


def _report_checks(store: str, period: str) -> None:
    from transforms.periods import Period

    Period.parse(period)
    _checked_folders(store, None)


def _money(minor, currency: str) -> str:
    from transforms.money import format_money

    return "unknown" if minor is None else format_money(minor, currency)


def _csv_option(text: Optional[str]) -> Optional[list[str]]:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def _signed_pct(text: Optional[str]) -> str:
    return "new" if text is None else (text if text.startswith("-") else f"+{text}") + "%"


def _print_simulation(result: dict, top: int = 10) -> None:
    out.print(f"[bold]{result['period']}[/bold] simulated with {', '.join(result['plan_map'])}: "
              f"{result['moved']['customers']} customers moved ({result['moved']['subscriptions']} subscriptions)")
    for t in result["totals"]:
        c = t["currency"]
        out.print(f"  {c}: billed {_money(t['paid_minor'], c)}, would be billed {_money(t['would_pay_minor'], c)} "
                  f"({_signed_pct(t['change_pct'])}); revenue {_money(t['revenue_current_minor'], c)} -> "
                  f"{_money(t['revenue_candidate_minor'], c)}; breakage {_money(t['breakage_current_minor'], c)} -> "
                  f"{_money(t['breakage_candidate_minor'], c)}; margin {_money(t['margin_current_minor'], c)} -> "
                  f"{_money(t['margin_candidate_minor'], c)}")
        out.print(f"  {c}: {t['shock']} bill shocks (above +{result['shock_pct']}%), {t['up']} up within it, "
                  f"{t['same']} unchanged, {t['down']} down")
    changes = sorted(result["customers"], key=lambda r: (-abs(r["difference_minor"]), r["customer_id"]))[:top]
    if changes:
        out.print(f"largest changes (of {len(result['customers'])}):")
        for r in changes:
            out.print(f"  {r['customer_id']}  {r['plans_before']} -> {r['plans_after']}: "
                      f"{_money(r['paid_minor'], r['currency'])} -> {_money(r['would_pay_minor'], r['currency'])} "
                      f"({_signed_pct(r['change_pct'])}, {r['outcome']})", markup=False)
    for note in result["notes"]:
        out.print(f"note: {note}", markup=False)
    if result["report"]:
        out.print(f"report: {result['store'].rstrip('/')}/{result['report']}")


@app.command(cls=_Command,
             epilog="Example: billrun simulate --period 2026-10 --plan-map images=api --plan-map api:1=api:2")
def simulate(ctx: typer.Context,
             period: str = typer.Option(..., "--period", metavar=PERIOD, help="A closed month to re-rate."),
             plan_map: list[str] = typer.Option(..., "--plan-map", metavar="OLD=NEW", help="Move subscriptions on "
                                                "plan OLD to NEW (plan, or plan:version to pin one). Repeatable."),
             shock: str = typer.Option("0.2", "--shock", metavar="FRACTION",
                                       help="A rise above this fraction of the bill is a bill shock."),
             customers: Optional[str] = typer.Option(None, "--customers", metavar="IDS", show_default=False,
                                                     help="Only these customers (c1,c2,...)."),
             candidates: Optional[str] = typer.Option(None, "--candidates", metavar="DIR", show_default=False,
                                                      help="A folder of candidate plan files that only simulations "
                                                           "see (never billed)."),
             no_report: bool = typer.Option(False, "--no-report", metavar="", help="Write nothing to the store (no "
                                            "HTML report under billing/simulations/)."),
             store: Optional[str] = StoreOpt, plans: Optional[str] = PlansOpt, as_json: bool = JsonOpt) -> None:
    """What would a closed month have billed with some customers on other plans?

    Re-rates the period's usage with the close's own steps and compares, per moved customer and
    in total: billed vs would be billed, breakage and margin under both, bill shocks and drops.
    Nothing in billing/period=P/ changes."""
    store, plans = _opts(ctx, store, plans)
    _checked(_simulate_checks, store, plans, period, plan_map, candidates)
    from flows.simulate import simulate as simulate_flow

    _quiet_user_errors()
    result = _run(simulate_flow, store=store, plans=plans, period=period, plan_map=plan_map, shock=shock,
                  customers=_csv_option(customers), candidates=candidates, report=not no_report,
                  settings=_settings())
    if as_json:
        out.print_json(json.dumps(result))
        return
    _print_simulation(result)


def _simulate_checks(store: str, plans: str, period: str, plan_map: list[str], candidates: str | None) -> None:
    from flows import preflight
    from transforms.periods import Period

    Period.parse(period)
    _checked_folders(store, plans)
    if candidates is not None:
        preflight.plans_folder(candidates)
    preflight.plan_map_names(plan_map, plans, candidates)


@app.command(cls=_Command,
             epilog="Example (on the demo store): billrun migrate --plan enterprise --to api --on 2026-12-01 "
                    "--as-of 2026-10-25 --dry-run")
def migrate(ctx: typer.Context,
            plan: str = typer.Option(..., "--plan", metavar="PLAN[:VERSION]", help="The plan to move from."),
            to: str = typer.Option(..., "--to", metavar="PLAN[:VERSION]",
                                   help="The plan to move to (a version pins it; without, the one in force)."),
            on: str = typer.Option(..., "--on", metavar=DAY, help="First day on the new plan, after every closed "
                                   "period and at least --notice-days after --as-of."),
            customers: Optional[str] = typer.Option(None, "--customers", metavar="IDS", show_default=False,
                                                    help="Only these customers (c1,c2,...)."),
            notice_days: int = typer.Option(30, "--notice-days", metavar="DAYS", min=0,
                                            help="Refuse a date fewer days than this after --as-of."),
            as_of: Optional[str] = typer.Option(None, "--as-of", metavar=DAY, show_default=False,
                                                help="Today, for the notice \\[default: today, UTC]."),
            dry_run: bool = typer.Option(False, "--dry-run", metavar="",
                                         help="Preview only: the subscriptions file is not changed."),
            no_report: bool = typer.Option(False, "--no-report", metavar="", help="No HTML report for the preview."),
            store: Optional[str] = StoreOpt, plans: Optional[str] = PlansOpt, as_json: bool = JsonOpt) -> None:
    """Move subscriptions to another plan from a date.

    Previews the move on the last closed period, then ends each subscription on the date and
    starts a new one on the new plan there. Closed periods are never changed."""
    store, plans = _opts(ctx, store, plans)
    as_of = as_of or _now().date().isoformat()
    _checked(_migrate_checks, store, plans, plan, to, on, as_of, notice_days)
    from flows.simulate import migrate as migrate_flow

    _quiet_user_errors()
    result = _run(migrate_flow, store=store, plans=plans, plan=plan, to=to, on=on,
                  as_of=as_of, customers=_csv_option(customers),
                  notice_days=notice_days, dry_run=dry_run, report=not no_report, settings=_settings())
    if as_json:
        out.print_json(json.dumps(result))
        return
    if result["status"] == "nothing_to_migrate":
        out.print(f"nothing to migrate: no subscription on {result['plan']} is active on or after {result['on']}")
        return
    said = {"dry_run": "would move (dry run, nothing written)", "migrated": "moved"}[result["status"]]
    out.print(f"{said} {len(result['changes'])} subscriptions from {result['plan']} to {result['to']} on "
              f"{result['on']}; notify customers by {result['notify_by']}")
    for c in result["changes"]:
        out.print(f"  {c['customer_id']}  {c['subscription_id']} ({c['from']}) -> {c['new_subscription_id']} "
                  f"({c['to']}), {c['action']}", markup=False)
    preview = result["preview"]
    if preview:
        for t in preview["totals"]:
            cur = t["currency"]
            out.print(f"preview on {preview['period']}: {t['customers']} customers billed "
                      f"{_money(t['paid_minor'], cur)}, would be {_money(t['would_pay_minor'], cur)} "
                      f"({_signed_pct(t['change_pct'])}); breakage {_money(t['breakage_current_minor'], cur)} -> "
                      f"{_money(t['breakage_candidate_minor'], cur)}; {t['shock']} bill shocks, {t['down']} drops")
        for note in preview["notes"]:
            out.print(f"note: {note}", markup=False)
        if preview["report"]:
            out.print(f"preview report: {result['store'].rstrip('/')}/{preview['report']}")
    out.print(f"after the first close on the new plan: {result['after']}", markup=False)


def _migrate_checks(store: str, plans: str, plan: str, to: str, on: str, as_of: str, notice_days: int) -> None:
    from flows import preflight
    from transforms.inputs.guards import closed_period_problem, notice_problem
    from transforms.periods import parse_day

    on_day, as_of_day = parse_day(on, "--on"), parse_day(as_of, "--as-of")
    _checked_folders(store, plans)
    preflight.known_plan(plan, f"--plan {plan}", plans)
    preflight.known_plan(to, f"--to {to}", plans)
    for problem in (notice_problem(on_day, as_of_day, notice_days),
                    closed_period_problem(on_day, preflight.closed_periods(store))):
        if problem:
            raise preflight.InputError(problem)


@app.command(cls=_Command, epilog="Example: billrun report --period 2026-10 --out report-2026-10.html")
def report(ctx: typer.Context,
           period: str = typer.Option(..., "--period", metavar=PERIOD, help="A closed month."),
           out_file: Optional[str] = typer.Option(None, "--out", metavar="FILE", show_default=False,
                                                  help=f"Write the HTML here instead of the store's "
                                                       f"{report_key('P')}."),
           store: Optional[str] = StoreOpt, plans: Optional[str] = PlansOpt, as_json: bool = JsonOpt) -> None:
    """A closed month in pictures: revenue by plan and stream, breakage over the closed
    periods, margin by meter. One self-contained HTML file."""
    store, _ = _opts(ctx, store, plans)
    _checked(_report_checks, store, period)
    from flows.report import report_period

    _quiet_user_errors()
    result = _run(report_period, store=store, period=period, out=out_file)
    if as_json:
        out.print_json(json.dumps(result))
        return
    out.print(f"{result['period']}: report with {result['charts']} charts at {result['report']}")


@app.command(cls=_Command, epilog="Example (in a pull request): billrun impact --base origin/main --periods 3 "
                                  "--out impact.md --store s3://acme-billing/prod")
def impact(ctx: typer.Context,
           base: str = typer.Option(..., "--base", metavar="REV", help="The git revision whose plans folder to "
                                    "compare with the working tree's (a branch, tag or commit)."),
           periods: int = typer.Option(1, "--periods", metavar="N", help="Re-rate the last N closed periods."),
           out_file: Optional[str] = typer.Option(None, "--out", metavar="FILE", show_default=False,
                                                  help="Write the markdown report here \\[default: print it]."),
           shock: str = typer.Option("0.2", "--shock", metavar="FRACTION", help="A bill shock rises by more than "
                                     "this fraction of the bill..."),
           shock_amount: str = typer.Option("10", "--shock-amount", metavar="AMOUNT", help="...and by more than "
                                            "this amount of its currency."),
           top: int = typer.Option(20, "--top", metavar="N", help="Rows per table before the rest is summed up."),
           store: Optional[str] = StoreOpt, plans: Optional[str] = PlansOpt, as_json: bool = JsonOpt) -> None:
    """What a change to the plan files does to revenue, before it merges.

    Re-rates the last closed periods with the close's own steps twice: with the plans folder as it
    is at git revision --base, and as it is in the working tree. Writes a markdown report: totals,
    per plan and per customer changes, bill shocks, breakage and margin, migration notices.
    Nothing in the store changes."""
    store, plans = _opts(ctx, store, plans)
    _checked(_impact_checks, store, plans, base, periods, shock, shock_amount, top, out_file)
    from flows.impact import impact as impact_flow

    _quiet_user_errors()
    result = _run(impact_flow, store=store, plans=plans, base=base, periods=periods, shock=shock,
                  shock_amount=shock_amount, top=top, settings=_settings())
    if out_file is not None:
        _checked(_write_text, out_file, result["markdown"])
    if as_json:
        out.print_json(json.dumps(result))
    elif out_file is None:
        sys.stdout.write(result["markdown"])
        sys.stdout.flush()
    else:
        for t in result["currency_totals"]:
            c = t["currency"]
            out.print(f"{c}: {_money(t['base_minor'], c)} -> {_money(t['head_minor'], c)} "
                      f"({_signed_pct(t['change_pct']) if t['base_minor'] else 'new'}) over "
                      f"{', '.join(p['period'] for p in result['periods'])}", markup=False)
        out.print(f"report: {out_file}", markup=False)


def _impact_checks(store: str, plans: str, base: str, periods: int, shock: str, shock_amount: str, top: int,
                   out_file: str | None) -> None:
    """Everything a mistake can be found in before Prefect starts: the options, the folders, the
    revision and both catalogs, a closed period to re-rate and a folder for the report."""
    from flows import preflight
    from flows.gitplans import catalog_at, revision
    from transforms.finance.impact import thresholds
    from transforms.inputs.plans import load_catalog

    thresholds(shock, shock_amount, top)
    if periods < 1:
        raise preflight.InputError(f"--periods {periods}: re-rate at least 1 closed period")
    _checked_folders(store, plans)
    rev = revision(plans, base)
    catalog_at(plans, rev)
    load_catalog(plans)
    if out_file is not None and not Path(out_file).resolve().parent.is_dir():
        raise preflight.InputError(f"--out {out_file}: no such folder {Path(out_file).parent}")
    if not preflight.closed_periods(store):
        raise preflight.InputError(f"--store {store}: no closed period to re-rate (close one first: "
                                   f"billrun close --period YYYY-MM)")


def _write_text(path: str, text: str) -> None:
    """Write a file whole or not at all (a temporary file beside it, renamed over it)."""
    from transforms.errors import InputError

    target = Path(path)
    temporary = target.with_name(f".{target.name}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, target)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise InputError(f"--out {path}: cannot write ({exc.strerror})") from None


def main() -> None:
    from flows.settings import prefect_defaults

    prefect_defaults()
    try:
        app()
    except KeyboardInterrupt:
        err.print("billrun: interrupted; a close can be run again and resumes")
        sys.exit(130)


if __name__ == "__main__":
    main()
