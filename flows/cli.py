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
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

DEFAULT_STORE = "./billing-data"
DEFAULT_PLANS = "./plans"
WEBHOOK_ENV = "BILLRUN_WEBHOOK_URL"  # where `--webhook URL` is put for the nightly flow to read

app = typer.Typer(
    help="billrun: batch billing for AI and API products (usage, credits and hybrids), exact to the cent.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)


def prefect_defaults(environ: dict = os.environ) -> None:
    """Run Prefect offline and quietly unless the user configured it: no analytics, an embedded
    server whose state lives in ./.prefect, and warnings only on the console."""
    environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    environ.setdefault("DO_NOT_TRACK", "1")
    environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")
    environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    if "PREFECT_API_URL" not in environ:
        environ.setdefault("PREFECT_HOME", str(Path(".prefect").resolve()))


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
    from flows.secrets import keep_secrets_out_of_logs

    keep_secrets_out_of_logs()
    for handler in logging.getLogger("prefect").handlers + logging.getLogger().handlers:
        handler.addFilter(_OneLineUserErrors())


def _fail(message: str) -> None:
    err.print(f"billrun: error: {message}", markup=False, soft_wrap=True)
    raise typer.Exit(1)


def _run(fn, *args, **kwargs):
    """Call into billrun; a user error (or a full disk) becomes one line and exit 1."""
    from flows.diskfull import full_disk_message, watch_store
    from flows.store import StoreError
    from transforms.errors import BillrunError

    watch_store(kwargs.get("store"))
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
    on = wanted(as_json=as_json, verbose=options.get("verbose", False), enabled=options.get("progress", True))

    def shown(*args, **kwargs):
        with show_steps(err, on, flow=own_step is None) as steps:
            if steps is None or own_step is None:
                return fn(*args, **kwargs)
            with steps.step(own_step):
                return fn(*args, **kwargs)
    return shown


StoreOpt = typer.Option(None, "--store", help="Store: a local folder or s3://bucket/prefix [default: ./billing-data]")
PlansOpt = typer.Option(None, "--plans", help="Folder of plan files (*.yaml) [default: ./plans]")
JsonOpt = typer.Option(False, "--json", help="Print the result as JSON (for scripts).")


@app.callback()
def main_options(ctx: typer.Context, store: Optional[str] = StoreOpt, plans: Optional[str] = PlansOpt,
                 verbose: bool = typer.Option(False, "--verbose", "-v", help="Log one line per step (Prefect's "
                                              "INFO logs) instead of the live list of steps."),
                 progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the steps of close, "
                                               "nightly, backfill and demo live in a terminal (never with --json, "
                                               "in CI or when stderr is not a terminal).")) -> None:
    ctx.obj = {"store": store, "plans": plans, "verbose": verbose, "progress": progress}
    if verbose:
        import prefect.main  # noqa: F401 - configures Prefect's logging (once), which -v then opens up to INFO

        logging.getLogger("prefect").setLevel(logging.INFO)


def _opts(ctx: typer.Context, store: str | None, plans: str | None) -> tuple[str, str]:
    base = ctx.obj or {}
    return (store or base.get("store") or DEFAULT_STORE, plans or base.get("plans") or DEFAULT_PLANS)


def _print_close(result: dict, as_json: bool) -> None:
    from transforms.money import format_money

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
    html = [o for o in result["outputs"] if o.endswith(".html")]
    if html:
        out.print(f"  invoices: {result['store'].rstrip('/')}/{html[0]} (and {len(html) - 1} more)")


@app.command(epilog="Example: billrun close --period 2026-10 --store s3://acme-billing/prod")
def close(ctx: typer.Context,
          period: str = typer.Option(..., "--period", help="The month to close, YYYY-MM (UTC)."),
          store: Optional[str] = StoreOpt, plans: Optional[str] = PlansOpt, as_json: bool = JsonOpt,
          dask: Optional[str] = typer.Option(
              None, "--dask", envvar="BILLRUN_DASK_ADDRESS", metavar="ADDRESS",
              help="Run the shard steps on this Dask scheduler (tcp://scheduler:8786); the store must "
                   "be on S3 for workers on other machines. Default: threads on this machine.")) -> None:
    """Close a month: final invoices, lines, quarantine, HTML invoices and the manifest.

    Re-running a failed close resumes it; re-running a closed period changes nothing and says so."""
    from flows.close import close_period

    store, plans = _opts(ctx, store, plans)
    _quiet_user_errors()
    _print_close(_run(_shown(ctx, as_json, close_period), store=store, plans=plans, period=period,
                      dask_address=dask), as_json)


@app.command(epilog="Example: billrun demo --store ./billing-data --customers 300")
def demo(ctx: typer.Context,
         period: str = typer.Option("2026-10", "--period", help="The month the sample usage falls in."),
         customers: int = typer.Option(300, "--customers", min=1, help="How many sample customers."),
         seed: int = typer.Option(7, "--seed", help="Seed of the sample generator (same seed, same store)."),
         store: Optional[str] = StoreOpt, plans: Optional[str] = PlansOpt, as_json: bool = JsonOpt) -> None:
    """Make a realistic sample store from the plans in --plans, then close one month of it."""
    from flows.close import close_period
    from flows.demo import write_demo_store

    store, plans = _opts(ctx, store, plans)
    _quiet_user_errors()
    written = _run(_shown(ctx, as_json, write_demo_store, own_step="sample-store"), store, plans, period, customers,
                   seed)
    if not as_json:
        out.print(f"sample store at {store}: {written['customers']} customers, "
                  f"{written['subscriptions']} subscriptions, {written['usage_objects']} usage objects")
    closed = _run(_shown(ctx, as_json, close_period), store=store, plans=plans, period=period)
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


@app.command(epilog="Example: billrun status --store s3://acme-billing/prod --json")
def status(ctx: typer.Context, store: Optional[str] = StoreOpt, plans: Optional[str] = PlansOpt,
           as_json: bool = JsonOpt) -> None:
    """Closed, incomplete and locked periods, and what changed since each was closed.

    The first thing to run on call: it names the backfill that would bring drifted periods up
    to date and the close that would finish an incomplete one."""
    from flows.status import store_status

    store, plans = _opts(ctx, store, plans)
    report = _run(store_status, store, plans)
    if as_json:
        out.print_json(json.dumps(report))
        return
    if not report["periods"]:
        out.print(f"{store}: no period closed yet")
    for p in report["periods"]:
        lock = "  LOCKED (see `billrun unlock`)" if p["locked"] else ""
        if p["status"] == "closed":
            totals = ", ".join(f"{t['currency']} {t['total_minor']}" for t in p["totals"])
            out.print(f"{p['period']}  closed      run {p['run_id']}  invoices {p['invoices']}  "
                      f"totals (minor) {totals}{lock}")
            for change in p["changes"]:
                out.print(f"           changed since rated by {p['last_rated_by']}: {change}")
        else:
            out.print(f"{p['period']}  incomplete  outputs without a manifest: "
                      f"run `billrun close --period {p['period']}` to finish it{lock}")
    if report["backfill"]:
        out.print(f"inputs or plans changed since the close: run `{report['backfill']}`")
    _print_tables_lag(report.get("tables"), store)


def _print_tables_lag(lake: dict | None, store: str) -> None:
    """Runs whose lakehouse tables lag their manifest, one line each."""
    if not lake:
        return
    for lag in lake["lagging"]:
        what = f"{lag['period']} (close run {lag['run_id']})" if lag["kind"] == "close" else f"backfill run {lag['run_id']}"
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


@app.command(epilog="Example: BILLING_HOOK=https://hooks.example.com/billing?token=... "
                     "billrun nightly --date 2026-10-14 --webhook-env BILLING_HOOK")
def nightly(ctx: typer.Context,
            day: str = typer.Option(..., "--date", help="The night's date, YYYY-MM-DD: takes in the usage that "
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
    from flows.nightly import nightly as nightly_flow

    store, plans = _opts(ctx, store, plans)
    _quiet_user_errors()
    if sum(1 for given in (webhook_env, webhook_secret, webhook) if given) > 1:
        _fail("--webhook-env, --webhook-secret and --webhook name one webhook: give one of them")
    if webhook:
        # the flow gets the reference, never the URL: its parameters are stored in Prefect
        os.environ[WEBHOOK_ENV] = webhook
        webhook_env = WEBHOOK_ENV
    result = _run(_shown(ctx, as_json, nightly_flow), store=store, plans=plans, day=day, webhook_env=webhook_env,
                  webhook_secret=webhook_secret)
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


@app.command(epilog="Example: billrun backfill --from 2026-08 --to 2026-10 --reason 'gpt-4o price fix'")
def backfill(ctx: typer.Context,
             first: str = typer.Option(..., "--from", help="First period to re-rate, YYYY-MM."),
             last: str = typer.Option(..., "--to", help="Last period to re-rate, YYYY-MM."),
             reason: str = typer.Option("re-rated with current usage and plans", "--reason",
                                        help="Why: printed on every document and kept in the manifest."),
             as_of: Optional[str] = typer.Option(None, "--as-of", help="issued_on of the documents, YYYY-MM-DD "
                                                 "[default: today, UTC]."),
             store: Optional[str] = StoreOpt, plans: Optional[str] = PlansOpt, as_json: bool = JsonOpt) -> None:
    """Re-rate closed periods and issue credit and debit notes for the differences.

    Finalized invoices are never rewritten. No difference, no document; running it twice issues
    nothing the second time. Periods in the range that are not closed are skipped (close them)."""
    from datetime import date, datetime, timezone

    from flows.backfill import backfill as backfill_flow
    from transforms.errors import InputError

    store, plans = _opts(ctx, store, plans)
    _quiet_user_errors()
    if as_of is None:
        as_of = datetime.now(timezone.utc).date().isoformat()
    else:
        try:
            date.fromisoformat(as_of)
        except ValueError:
            _fail(f"--as-of {as_of!r} is not a date (YYYY-MM-DD)")
    result = _run(_shown(ctx, as_json, backfill_flow), store=store, plans=plans, first=first, last=last, reason=reason,
                  as_of=as_of)
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


@app.command(epilog="Example: billrun explain --invoice INV-2026-10-000042")
def explain(ctx: typer.Context,
            invoice: str = typer.Option(..., "--invoice", help="An invoice, credit note or debit note id."),
            store: Optional[str] = StoreOpt, plans: Optional[str] = PlansOpt, as_json: bool = JsonOpt) -> None:
    """How each line of a document was computed: the rating steps, the usage behind it (by
    dimensions), the plan version file and hash, and the run and manifest that issued it."""
    from flows.explain import explain_invoice
    from transforms.money import format_money

    store, _ = _opts(ctx, store, plans)
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


@app.command(epilog="Example: billrun pdf --invoice INV-2026-10-000042 --out ./INV-2026-10-000042.pdf")
def pdf(ctx: typer.Context,
        invoice: str = typer.Option(..., "--invoice", help="An invoice, credit note or debit note id."),
        out_path: Optional[Path] = typer.Option(None, "--out", help="Where to write the PDF [default: ./<id>.pdf]."),
        store: Optional[str] = StoreOpt, plans: Optional[str] = PlansOpt) -> None:
    """Write the PDF of a published invoice, credit note or debit note (from its HTML)."""
    from flows.documents import document_pdf

    store, _ = _opts(ctx, store, plans)
    written = _run(document_pdf, store, invoice, out_path or Path(f"{invoice}.pdf"))
    out.print(f"{invoice}: {written}")


@app.command(epilog="Example: billrun unlock --period 2026-10 --store s3://acme-billing/prod")
def unlock(ctx: typer.Context,
           period: str = typer.Option(..., "--period", help="The period whose lock to remove, YYYY-MM."),
           store: Optional[str] = StoreOpt, plans: Optional[str] = PlansOpt) -> None:
    """Remove the lock a killed close or backfill left on a period.

    Only when you know that run is dead: a live run that loses its lock could publish while
    another runs. The lock says which command, machine and process held it, and since when."""
    from flows.locks import unlock as remove_lock
    from flows.store import open_store
    from transforms.periods import Period

    store, _ = _opts(ctx, store, plans)
    holder = _run(lambda: remove_lock(open_store(store), Period.parse(period)))
    out.print(f"{period}: removed the lock held by {holder}" if holder else f"{period}: not locked")


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


@app.command(epilog="Example: billrun simulate --period 2026-10 --plan-map images=api --plan-map api:1=api:2")
def simulate(ctx: typer.Context,
             period: str = typer.Option(..., "--period", help="A closed month to re-rate, YYYY-MM."),
             plan_map: list[str] = typer.Option(..., "--plan-map", help="OLD=NEW: move subscriptions on plan OLD "
                                                "to NEW (plan, or plan:version to pin one). Repeatable."),
             shock: str = typer.Option("0.2", "--shock", help="A rise above this fraction of the bill is a bill shock."),
             customers: Optional[str] = typer.Option(None, "--customers", help="Only these customers (c1,c2,...)."),
             candidates: Optional[str] = typer.Option(None, "--candidates", help="A folder of candidate plan files "
                                                      "that only simulations see (never billed)."),
             no_report: bool = typer.Option(False, "--no-report", help="Write nothing to the store (no HTML report "
                                            "under billing/simulations/)."),
             store: Optional[str] = StoreOpt, plans: Optional[str] = PlansOpt, as_json: bool = JsonOpt) -> None:
    """What would a closed month have billed with some customers on other plans?

    Re-rates the period's usage with the close's own steps and compares, per moved customer and
    in total: billed vs would be billed, breakage and margin under both, bill shocks and drops.
    Nothing in billing/period=P/ changes."""
    from flows.simulate import simulate as simulate_flow

    store, plans = _opts(ctx, store, plans)
    _quiet_user_errors()
    result = _run(simulate_flow, store=store, plans=plans, period=period, plan_map=plan_map, shock=shock,
                  customers=_csv_option(customers), candidates=candidates, report=not no_report)
    if as_json:
        out.print_json(json.dumps(result))
        return
    _print_simulation(result)


@app.command(epilog="Example: billrun migrate --plan images --to images-usage --on 2026-12-01 --dry-run")
def migrate(ctx: typer.Context,
            plan: str = typer.Option(..., "--plan", help="The plan to move from (plan or plan:version)."),
            to: str = typer.Option(..., "--to", help="The plan to move to (plan, or plan:version to pin one)."),
            on: str = typer.Option(..., "--on", help="First day on the new plan, YYYY-MM-DD, after every closed period."),
            customers: Optional[str] = typer.Option(None, "--customers", help="Only these customers (c1,c2,...)."),
            notice_days: int = typer.Option(30, "--notice-days", help="Refuse a date fewer days than this after --as-of."),
            as_of: Optional[str] = typer.Option(None, "--as-of", help="Today, for the notice, YYYY-MM-DD "
                                                "[default: today, UTC]."),
            dry_run: bool = typer.Option(False, "--dry-run", help="Preview only: the subscriptions file is not changed."),
            no_report: bool = typer.Option(False, "--no-report", help="No HTML report for the preview."),
            store: Optional[str] = StoreOpt, plans: Optional[str] = PlansOpt, as_json: bool = JsonOpt) -> None:
    """Move subscriptions to another plan from a date.

    Previews the move on the last closed period, then ends each subscription on the date and
    starts a new one on the new plan there. Closed periods are never changed."""
    from datetime import datetime, timezone

    from flows.simulate import migrate as migrate_flow

    store, plans = _opts(ctx, store, plans)
    _quiet_user_errors()
    result = _run(migrate_flow, store=store, plans=plans, plan=plan, to=to, on=on,
                  as_of=as_of or datetime.now(timezone.utc).date().isoformat(), customers=_csv_option(customers),
                  notice_days=notice_days, dry_run=dry_run, report=not no_report)
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


@app.command(epilog="Example: billrun report --period 2026-10 --out report-2026-10.html")
def report(ctx: typer.Context,
           period: str = typer.Option(..., "--period", help="A closed month, YYYY-MM."),
           out_file: Optional[str] = typer.Option(None, "--out", help="Write the HTML here instead of the store's "
                                                  "billing/reports/period=P/report.html."),
           store: Optional[str] = StoreOpt, plans: Optional[str] = PlansOpt, as_json: bool = JsonOpt) -> None:
    """A closed month in pictures: revenue by plan and stream, breakage over the closed
    periods, margin by meter. One self-contained HTML file."""
    from flows.report import report_period

    store, _ = _opts(ctx, store, plans)
    _quiet_user_errors()
    result = _run(report_period, store=store, period=period, out=out_file)
    if as_json:
        out.print_json(json.dumps(result))
        return
    out.print(f"{result['period']}: report with {result['charts']} charts at {result['report']}")


def main() -> None:
    prefect_defaults()
    try:
        app()
    except KeyboardInterrupt:
        err.print("billrun: interrupted; a close can be run again and resumes")
        sys.exit(130)


if __name__ == "__main__":
    main()
