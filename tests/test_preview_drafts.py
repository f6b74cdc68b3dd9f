"""Previews without Prefect: drafts read back from a night's tables, numbered and dated as
drafts, marked DRAFT on the page, and the command's refusals (answered before anything slow).
The real flow runs are in tests/test_preview.py."""
from __future__ import annotations

import hashlib
import shutil
from datetime import date
from pathlib import Path

import pytest
from typer.testing import CliRunner

import renderutil
from flows.cli import app
from flows.store import open_store
from transforms.credits.ledger import balances_table
from transforms.credits.reports import credit_summaries
from transforms.documents.drafts import customer_drafts, draft_file_stem, wallet_from_balances
from transforms.documents.render import Draft, invoice_html
from transforms.engine.invoices import invoices_from_tables, invoices_table, lines_table

runner = CliRunner()
SELLER_TERMS = {**renderutil.SELLER, "payment_terms_days": 30,
                "payment": [("Bank", "Example Bank"), ("IBAN", "NL91ABNA0417164300")]}


@pytest.mark.parametrize("document", [renderutil.sample_invoice, renderutil.sample_credit_note])
def test_a_nights_tables_read_back_into_the_documents_they_were_written_from(document):
    doc = document()
    assert invoices_from_tables(invoices_table([doc]), lines_table([doc])) == [doc]


def test_a_nights_credit_balances_read_back_into_the_wallet_the_invoice_shows():
    replay = renderutil.wallet()
    balances = balances_table(replay, renderutil.OCT)
    assert wallet_from_balances(balances, "c1") == credit_summaries(replay, renderutil.OCT)["c1"]
    assert wallet_from_balances(balances, "someone-else") is None


def test_drafts_are_numbered_as_drafts_and_dated_the_day_they_show():
    inv = renderutil.sample_invoice()
    second = inv.__class__(**{**inv.__dict__, "subscription_id": "sub_0", "invoice_id": "INV-2026-10-000002"})
    # the customer's own terms (14 days) win over the seller's 30: due 2026-10-14 + 14 = 2026-10-28
    drafts = customer_drafts([inv, second], "c1", date(2026, 10, 14), SELLER_TERMS, {"payment_terms_days": 14})
    assert [(d.invoice_id, d.subscription_id, d.issued_on, d.due_on, d.run_id) for d in drafts] == [
        ("DRAFT-c1-2026-10-1", "sub_0", date(2026, 10, 14), date(2026, 10, 28), None),
        ("DRAFT-c1-2026-10-2", "sub_1", date(2026, 10, 14), date(2026, 10, 28), None)]
    [one] = customer_drafts([inv], "c1", date(2026, 10, 14), SELLER_TERMS, {})
    assert (one.invoice_id, one.due_on, one.lines) == ("DRAFT-c1-2026-10", date(2026, 11, 13), inv.lines)
    assert customer_drafts([inv], "someone-else", date(2026, 10, 14), SELLER_TERMS, {}) == []


@pytest.mark.parametrize("customer, safe", [("acme-01", True), ("C_42.eu", True), ("../../etc/passwd", False),
                                            ("a/b", False), ("..hidden", False), ("", False)])
def test_a_customer_id_names_a_file_only_when_it_is_safe_in_one(customer, safe):
    hashed = "customer-" + hashlib.sha256(customer.encode()).hexdigest()[:12]
    assert draft_file_stem(customer, "2026-10", 1, 1) == f"DRAFT-{customer if safe else hashed}-2026-10"


def test_a_draft_is_marked_draft_and_carries_no_invoice_number():
    [draft] = customer_drafts([renderutil.sample_invoice()], "c1", date(2026, 10, 14), SELLER_TERMS, {})
    html = invoice_html(draft, renderutil.CUSTOMER, SELLER_TERMS, "half_up", "",
                        draft=Draft("the 2026-10 invoice as it stands", "figures from the nightly run of 2026-10-14"))
    assert "<title>Draft invoice DRAFT-c1-2026-10</title>" in html
    assert 'class="draft-banner"><strong>DRAFT</strong>' in html and 'class="draft-mark"' in html
    assert "INV-" not in html and "manifest" not in html
    assert '<td class="k">As of</td><td>2026-10-14</td>' in html
    assert '<td class="k">Due</td><td>2026-11-13</td>' in html
    assert "the invoice number, given at the close" in html  # the payment reference
    final = invoice_html(renderutil.sample_invoice(), renderutil.CUSTOMER, SELLER_TERMS, "half_up", "r")
    assert "DRAFT" not in final and "draft" not in final


# -- refusals: one line, exit 1, before Prefect -----------------------------------------------------

PLAN = ("plan: svc\nversion: 1\neffective_from: 2026-01-01\ncurrency: EUR\n"
        "fixed_fees:\n  - {name: Platform fee, amount: \"100.00\"}\n")


@pytest.fixture
def small_store(tmp_path: Path) -> tuple[str, str]:
    plans = tmp_path / "plans"
    plans.mkdir()
    (plans / "svc-v1.yaml").write_text(PLAN)
    store = str(tmp_path / "store")
    s = open_store(store, create=True)
    s.put_bytes("customers/customers.csv", b"customer_id,name,email\nacme,Acme,\nlater,Later Ltd,\n")
    s.put_bytes("subscriptions/subscriptions.csv",
                b"subscription_id,customer_id,plan,plan_version,start_date,end_date,budget,hard_cap\n"
                b"s1,acme,svc,,2026-01-01,,,\ns2,later,svc,,2027-01-01,,,\n")
    s.put_bytes("billing/period=2026-10/manifest.json", b"{}\n")  # 2026-10 is closed
    return store, str(plans)


@pytest.mark.parametrize("args, line", [
    (["--customer", "nobody", "--date", "2026-11-10"],
     "billrun: error: --customer 'nobody': no such customer in customers/customers.csv"),
    (["--customer", "acme", "--date", "2026-11-31"],
     "billrun: error: --date '2026-11-31' is not a date; write it as YYYY-MM-DD, e.g. 2026-10-14"),
    (["--customer", "acme", "--date", "14/11/2026"],
     "billrun: error: --date '14/11/2026' is not a date; write it as YYYY-MM-DD, e.g. 2026-10-14"),
    (["--customer", "later", "--date", "2026-11-10"],
     "billrun: error: --customer 'later': no subscription of theirs is active in 2026-11 "
     "(subscriptions/subscriptions.csv), so there is no invoice to preview"),
    (["--customer", "acme", "--date", "2026-10-14"],
     "billrun: error: --date 2026-10-14 is in 2026-10, which is closed: its final invoices are published (see "
     "them with `billrun pdf --invoice ID` or `billrun explain --invoice ID`); a preview shows an open period"),
])
def test_mistakes_are_one_line_before_anything_slow(small_store, monkeypatch, args, line):
    import flows.pdf_and_drafts

    def never(*_a, **_k):
        raise AssertionError("a refused preview read or rated something")
    monkeypatch.setattr(flows.pdf_and_drafts, "drafts_from_night", never)
    store, plans = small_store
    result = runner.invoke(app, ["preview", *args, "--store", store, "--plans", plans])
    assert (result.exit_code, result.output.strip()) == (1, line)


def test_several_drafts_get_numbered_files_and_nothing_goes_elsewhere(tmp_path, monkeypatch):
    from flows.pdf_and_drafts import write_drafts

    inv = renderutil.sample_invoice()
    other = inv.__class__(**{**inv.__dict__, "subscription_id": "sub_2"})
    drafts = customer_drafts([inv, other], "c1", date(2026, 10, 14), SELLER_TERMS, {})
    draft = Draft("as it stands", "figures from the nightly run of 2026-10-14")
    monkeypatch.chdir(tmp_path)
    default = write_drafts(drafts, renderutil.CUSTOMER, SELLER_TERMS, {}, draft, None, out=None, pdf=False)
    assert default == [Path("DRAFT-c1-2026-10-1.html"), Path("DRAFT-c1-2026-10-2.html")]
    named = write_drafts(drafts, renderutil.CUSTOMER, SELLER_TERMS, {}, draft, None, out=Path("out/c1.html"), pdf=False)
    assert named == [Path("out/c1-1.html"), Path("out/c1-2.html")]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.html")) == [
        "DRAFT-c1-2026-10-1.html", "DRAFT-c1-2026-10-2.html", "out/c1-1.html", "out/c1-2.html"]
    assert "<title>Draft invoice DRAFT-c1-2026-10-2</title>" in Path("out/c1-2.html").read_text()


@pytest.mark.skipif(shutil.which("fc-list") is None, reason="fontconfig's fc-list is not installed")
def test_a_draft_pdf_has_the_missing_glyph_check_of_billrun_pdf(tmp_path):
    from flows.pdf_and_drafts import write_drafts
    from transforms.errors import InputError

    drafts = customer_drafts([renderutil.sample_invoice()], "c1", date(2026, 10, 14), SELLER_TERMS, {})
    out = tmp_path / "draft.pdf"
    with pytest.raises(InputError, match=r"DRAFT-c1-2026-10: no installed font has a glyph for .*U\+E000"):
        write_drafts(drafts, {**renderutil.CUSTOMER, "name": "Acme \ue000 Ltd"}, SELLER_TERMS, {},
                     Draft("as it stands", "figures"), None, out=out, pdf=True)
    assert not out.exists()


def test_an_out_path_that_cannot_be_written_is_one_line(tmp_path):
    from flows.pdf_and_drafts import write_drafts
    from transforms.errors import InputError

    (tmp_path / "a-file").write_text("")
    drafts = customer_drafts([renderutil.sample_invoice()], "c1", date(2026, 10, 14), SELLER_TERMS, {})
    with pytest.raises(InputError, match=r"^DRAFT-c1-2026-10: cannot write .*a-file/draft.html \(.+\); pass --out"):
        write_drafts(drafts, renderutil.CUSTOMER, SELLER_TERMS, {}, Draft("as it stands", "figures"), None,
                     out=tmp_path / "a-file" / "draft.html", pdf=False)
