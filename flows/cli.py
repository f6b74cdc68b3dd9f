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
        from flows.store import StoreError
        from transforms.errors import BillrunError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (BillrunError, StoreError)):
            record.exc_info = None
            record.exc_text = None
            record.msg, record.args = f"{type(exc).__name__}: {exc}", ()
        return True


def _quiet_user_errors() -> None:
    for handler in logging.getLogger("prefect").handlers + logging.getLogger().handlers:
        handler.addFilter(_OneLineUserErrors())


def _fail(message: str) -> None:
    err.print(f"billrun: error: {message}", markup=False, soft_wrap=True)
    raise typer.Exit(1)


def _run(fn, *args, **kwargs):
    """Call into billrun; a user error becomes one line and exit 1."""
    from flows.store import StoreError
    from transforms.errors import BillrunError

    try:
        return fn(*args, **kwargs)
    except (BillrunError, StoreError) as exc:
        _fail(str(exc))


StoreOpt = typer.Option(None, "--store", help="Store: a local folder or s3://bucket/prefix [default: ./billing-data]")
PlansOpt = typer.Option(None, "--plans", help="Folder of plan files (*.yaml) [default: ./plans]")
JsonOpt = typer.Option(False, "--json", help="Print the result as JSON (for scripts).")


@app.callback()
def main_options(ctx: typer.Context, store: Optional[str] = StoreOpt, plans: Optional[str] = PlansOpt) -> None:
    ctx.obj = {"store": store, "plans": plans}


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
          store: Optional[str] = StoreOpt, plans: Optional[str] = PlansOpt, as_json: bool = JsonOpt) -> None:
    """Close a month: final invoices, lines, quarantine, HTML invoices and the manifest.

    Re-running a failed close resumes it; re-running a closed period changes nothing and says so."""
    from flows.close import close_period

    store, plans = _opts(ctx, store, plans)
    _quiet_user_errors()
    _print_close(_run(close_period, store=store, plans=plans, period=period), as_json)


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
    written = _run(write_demo_store, store, plans, period, customers, seed)
    if not as_json:
        out.print(f"sample store at {store}: {written['customers']} customers, "
                  f"{written['subscriptions']} subscriptions, {written['usage_objects']} usage objects")
    _print_close(_run(close_period, store=store, plans=plans, period=period), as_json)


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


@app.command(epilog="Example: billrun nightly --date 2026-10-14 --webhook https://hooks.example.com/billing")
def nightly(ctx: typer.Context,
            day: str = typer.Option(..., "--date", help="The night's date, YYYY-MM-DD (usage up to and including it)."),
            webhook: Optional[str] = typer.Option(None, "--webhook", help="POST the night's new alerts here as JSON."),
            store: Optional[str] = StoreOpt, plans: Optional[str] = PlansOpt, as_json: bool = JsonOpt) -> None:
    """Take in new usage and bring the period to date: estimates, credit balances, alerts.

    Only objects new or rewritten since the last night are read. An alert fires once per
    customer, period, kind and threshold; re-running a night changes nothing."""
    from flows.nightly import nightly as nightly_flow

    store, plans = _opts(ctx, store, plans)
    _quiet_user_errors()
    result = _run(nightly_flow, store=store, plans=plans, day=day, webhook=webhook)
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
    result = _run(backfill_flow, store=store, plans=plans, first=first, last=last, reason=reason, as_of=as_of)
    if as_json:
        out.print_json(json.dumps(result))
        return
    for period in result["skipped"]:
        out.print(f"{period}: not closed, skipped (run `billrun close --period {period}`)")
    if not result["documents"]:
        out.print("nothing to correct: every closed period in the range matches what was issued")
        return
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


def main() -> None:
    prefect_defaults()
    try:
        app()
    except KeyboardInterrupt:
        err.print("billrun: interrupted; a close can be run again and resumes")
        sys.exit(130)


if __name__ == "__main__":
    main()
