"""`billrun preview` through the real command line and a real Prefect server.

One small taxed store (a Dutch seller, 30 days net; a French consumer at 20% VAT under the
One-Stop-Shop with her own 14-day terms), copied twice. On copy A: a preview from the inputs
(no nightly yet), the nightly run of the same day, previews from that night (HTML and PDF), each
preview while a close holds the period's lock (a preview takes none), then the close. On copy B:
the same nightly and close, without previews. The close bytes must be the same.

fr_b2c's bill as of 2026-11-10: the 100.00 fee + 12,347 calls x 0.01 = 223.47; VAT 20%:
44.694 -> 44.69; total 268.16; due 2026-11-10 + 14 = 2026-11-24. Her 1,000 calls of
2026-11-20 come after the day and are not in it (the close bills them: 233.47 + 46.69).
"""
from __future__ import annotations

import io
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from closeutil import close
from flows.cli import app
from flows.locks import period_lock
from flows.nightly import nightly
from flows.store import open_store
from transforms.periods import Period

runner = CliRunner()
PERIOD, DAY = "2026-11", "2026-11-10"
PLAN = ("plan: svc\nversion: 1\neffective_from: 2026-01-01\ncurrency: EUR\n"
        "fixed_fees:\n  - {name: Platform fee, amount: \"100.00\"}\n"
        "charges:\n  - {name: API calls, meter: calls, price: {model: standard, unit_price: \"0.01\"}}\n")
INPUTS = {
    "seller.yaml": "name: Rekenwerk B.V.\ntax_id: NL004495445B01\npayment_terms_days: 30\n"
                   "payment: {bank: Example Bank, iban: NL91ABNA0417164300}\n",
    "tax/rules.yaml": "seller:\n  country: NL\n  registrations: [NL, EU-OSS]\n"
                      "rates:\n  - {country: NL, rate: \"21\"}\n  - {country: FR, rate: \"20\"}\n",
    "customers/customers.csv": "customer_id,name,email,address,tax_id,country,region,tax_exempt,payment_terms_days\n"
                               "fr_b2c,Camille Martin,,,,FR,,,14\nnl,Voorbeeld B.V.,,,NL004495445B01,NL,,,\n",
    "subscriptions/subscriptions.csv": "subscription_id,customer_id,plan,plan_version,start_date,end_date,budget,"
                                       "hard_cap\ns_fr,fr_b2c,svc,,2026-01-01,,,\ns_nl,nl,svc,,2026-01-01,,,\n",
    "usage/day/u.csv": "event_id,customer_id,meter,quantity,timestamp\ne1,fr_b2c,calls,12347,2026-11-03T10:00:00Z\n"
                       "e2,nl,calls,500,2026-11-03T10:00:00Z\ne3,fr_b2c,calls,1000,2026-11-20T10:00:00Z\n",
}


def files(root: str) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def preview(store: str, plans: str, *extra: str):
    return runner.invoke(app, ["preview", "--customer", "fr_b2c", "--date", DAY, "--store", store, "--plans", plans,
                               *extra], catch_exceptions=False)


def close_running(store: str):
    """The period's lock, held as a close holds it."""
    return period_lock(open_store(store), [Period.parse(PERIOD)], f"close {PERIOD}", datetime.now(timezone.utc))


@pytest.fixture(scope="module")
def previewed(prefect_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("preview")
    (root / "plans").mkdir()
    (root / "plans" / "svc-v1.yaml").write_text(PLAN)
    plans = str(root / "plans")
    seed = open_store(str(root / "seed"), create=True)
    for key, text in INPUTS.items():
        seed.put_bytes(key, text.encode())
    a, b = str(root / "a"), str(root / "b")
    shutil.copytree(root / "seed", a)
    shutil.copytree(root / "seed", b)
    out = {"root": root, "a": a, "plans": plans}
    # the previews run while a close holds the period's lock: one that took it would be refused
    with close_running(a):
        before = files(a)
        out["from_inputs"] = preview(a, plans, "--out", str(root / "inputs.html"))
        out["untouched"] = before == files(a)
    nightly(store=a, plans=plans, day=DAY)
    with close_running(a):
        out["from_night"] = preview(a, plans, "--out", str(root / "night.html"))
        out["pdf"] = preview(a, plans, "--pdf", "--out", str(root / "night.pdf"))
        out["json"] = preview(a, plans, "--json", "--out", str(root / "json.html"))
        out["later_day"] = runner.invoke(app, ["preview", "--customer", "fr_b2c", "--date", "2026-11-25", "--store",
                                               a, "--plans", plans, "--out", str(root / "later.html")])
    nightly(store=b, plans=plans, day=DAY)
    out["close_a"], out["close_b"] = close(a, plans, PERIOD), close(b, plans, PERIOD)
    out["closed_a"] = {k: v for k, v in files(a).items() if k.startswith(f"billing/period={PERIOD}/")}
    out["closed_b"] = {k: v for k, v in files(b).items() if k.startswith(f"billing/period={PERIOD}/")}
    return out


def test_a_preview_without_a_nightly_rates_the_inputs_through_the_day(previewed):
    result = previewed["from_inputs"]
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"fr_b2c: draft of {PERIOD} as of {DAY}, from the store's inputs through {DAY}",
        f"  DRAFT-fr_b2c-{PERIOD}: €268.16 incl. tax €44.69, due 2026-11-24 -> {previewed['root'] / 'inputs.html'}"]
    assert previewed["untouched"], "a preview wrote into the store"


def test_a_preview_after_a_nightly_shows_that_nights_draft(previewed):
    result = previewed["from_night"]
    assert result.exit_code == 0, result.output
    assert f"from the nightly run of {DAY}" in result.output.splitlines()[0]
    drafts = pl.read_parquet(io.BytesIO(open_store(previewed["a"]).read_bytes(
        f"billing/nightly/date={DAY}/draft_invoices.parquet"))).filter(pl.col("customer_id") == "fr_b2c")
    assert drafts.select("subtotal_minor", "tax_minor", "total_minor").row(0) == (22347, 4469, 26816)
    # the same engine: the inputs' draft and the night's are the same page but for where they come from
    night = (previewed["root"] / "night.html").read_text()
    inputs = (previewed["root"] / "inputs.html").read_text()
    assert inputs.replace("the store&#39;s inputs through", "the nightly run of") == night


def test_json_gives_the_figures_to_scripts(previewed):
    result = previewed["json"]
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {
        "customer_id": "fr_b2c", "period": PERIOD, "as_of": DAY, "source": f"the nightly run of {DAY}",
        "drafts": [{"draft_id": f"DRAFT-fr_b2c-{PERIOD}", "subscription_id": "s_fr", "currency": "EUR",
                    "subtotal_minor": 22347, "tax_minor": 4469, "total_minor": 26816, "due_on": "2026-11-24",
                    "path": str(previewed["root"] / "json.html")}]}


def test_the_draft_is_marked_and_never_numbered_like_an_invoice(previewed):
    html = (previewed["root"] / "night.html").read_text()
    assert f"<title>Draft invoice DRAFT-fr_b2c-{PERIOD}</title>" in html and 'class="draft-mark"' in html
    assert "INV-" not in html
    pdf = previewed["pdf"]
    assert pdf.exit_code == 0, pdf.output
    assert (previewed["root"] / "night.pdf").read_bytes().startswith(b"%PDF")


def test_a_close_after_previews_is_byte_for_byte_a_close_without(previewed):
    assert previewed["close_a"]["status"] == "closed"
    invoices = pl.read_parquet(io.BytesIO(previewed["closed_a"][f"billing/period={PERIOD}/invoices.parquet"]))
    assert sorted(invoices["invoice_id"].to_list()) == [f"INV-{PERIOD}-000001", f"INV-{PERIOD}-000002"]
    assert previewed["closed_a"] == previewed["closed_b"]


def test_a_date_in_the_closed_period_points_to_the_final_invoice(previewed):
    result = runner.invoke(app, ["preview", "--customer", "fr_b2c", "--date", "2026-11-03", "--store",
                                 previewed["a"], "--plans", previewed["plans"]])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "billrun: error: --date 2026-11-03 is in 2026-11, which is closed: its final invoices are published "
        f"(the customer's: INV-{PERIOD}-000001; see one with `billrun pdf --invoice INV-{PERIOD}-000001` or "
        f"`billrun explain --invoice INV-{PERIOD}-000001`); a preview shows an open period")


def test_a_later_day_shows_the_latest_night_and_says_so(previewed):
    result = previewed["later_day"]
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "billrun: note: the figures are those of the nightly run of 2026-11-10; usage taken in since is not in them",
        f"fr_b2c: draft of {PERIOD} as of 2026-11-25, from the nightly run of {DAY}",
        # the night's figures, due 14 days after the day shown: 2026-11-25 + 14
        f"  DRAFT-fr_b2c-{PERIOD}: €268.16 incl. tax €44.69, due 2026-12-09 -> {previewed['root'] / 'later.html'}"]
