"""HTML documents: hostile text stays text, a missing field is an error, money reads as money,
lines are grouped as the customer reads them, and the credits section says what the ledger says."""
from __future__ import annotations

import re
from dataclasses import replace
from datetime import date
from decimal import Decimal as D

import pytest
from babel.numbers import format_currency
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2 import UndefinedError

import renderutil
from creditutil import at, catalog, event, plan, purchase, subscription
from transforms.credits.grants import history_grants
from transforms.credits.ledger import balances_table, ledger_table
from transforms.credits.replay import replayed_wallets
from transforms.credits.reports import credit_summaries
from transforms.documents.render import compiled_template, exact_money_text, invoice_html, line_groups, money_text
from transforms.engine.invoices import Invoice, Line, period_invoices
from transforms.inputs.plans import parse_plan
from transforms.inputs.reference import Segment, Subscription
from transforms.money import format_money
from transforms.periods import Period
from transforms.pricing.base import Step

OCT = Period(2026, 10)
CUSTOMER = {"customer_id": "c1", "name": "Acme Ltd", "email": "billing@acme.test", "address": "1 Main St",
            "tax_id": None}
SELLER = {"name": "billrun Demo Inc.", "address": "2 Market St", "email": None, "tax_id": "US-123"}


def invoice(*lines: Line, currency: str = "USD", kind: str = "invoice", corrects: str | None = None) -> Invoice:
    return Invoice("INV-2026-10-000001", kind, "c1", "s1", "2026-10", currency, date(2026, 11, 1), lines,
                   date(2026, 10, 1), date(2026, 11, 1), corrects)


def line(amount_minor: int, description: str = "Platform fee", kind: str = "fixed_fee") -> Line:
    return Line(kind, description, D(1), amount_minor)


def html(inv: Invoice, customer: dict | None = None, seller: dict | None = None) -> str:
    return invoice_html(inv, customer or CUSTOMER, seller or SELLER, "half_up", "close-2026-10-abc")


# Hostile input --------------------------------------------------------------------------------

def test_customer_name_with_a_script_tag_is_escaped():
    out = html(invoice(line(100)), {**CUSTOMER, "name": "<script>alert(1)</script>"})
    assert "<script>" not in out
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in out


def test_address_with_an_ampersand_is_escaped():
    out = html(invoice(line(100)), {**CUSTOMER, "address": "Smith & Sons, 5 <b>Road</b>"})
    assert "Smith &amp; Sons, 5 &lt;b&gt;Road&lt;/b&gt;" in out
    assert "Smith & Sons" not in out


@pytest.mark.parametrize("field", ["email", "tax_id"])
def test_every_customer_field_is_escaped(field):
    out = html(invoice(line(100)), {**CUSTOMER, field: '"><img src=x onerror=alert(1)>'})
    assert "<img" not in out
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in out


def test_seller_fields_are_escaped():
    out = html(invoice(line(100)), seller={**SELLER, "name": "<i>Evil</i> & Co"})
    assert "<i>Evil</i>" not in out
    assert "&lt;i&gt;Evil&lt;/i&gt; &amp; Co" in out


def test_a_plan_charge_name_with_markup_is_escaped_in_the_description():
    pf = parse_plan('plan: p\nversion: 1\neffective_from: 2026-01-01\ncurrency: USD\n'
                    'fixed_fees:\n  - {name: "<b>Seat</b>", amount: "20.00"}\n'
                    'charges:\n  - {name: "<b>Bold</b> calls", meter: calls, '
                    'price: {model: standard, unit_price: "1.00"}}\n', "plans/p-v1.yaml")
    sub = Subscription("s1", "c1", "p", None, date(2026, 1, 1), None, None, None, 1)
    [inv] = period_invoices(OCT, [Segment(sub, 1, pf, OCT.start_at, OCT.end_at, OCT)], {})
    assert [line.description for line in inv.lines] == ["<b>Seat</b>", "<b>Bold</b> calls"]
    out = html(inv)
    assert "<b>" not in out
    assert "&lt;b&gt;Seat&lt;/b&gt;" in out and "&lt;b&gt;Bold&lt;/b&gt; calls" in out


def test_missing_customer_field_raises_instead_of_rendering_blank():
    with pytest.raises(UndefinedError, match="name"):
        html(invoice(line(100)), {k: v for k, v in CUSTOMER.items() if k != "name"})


def test_missing_optional_customer_key_raises_too():
    # StrictUndefined: the close always passes every column of checked_customers, so a missing key is a bug.
    with pytest.raises(UndefinedError, match="address"):
        html(invoice(line(100)), {k: v for k, v in CUSTOMER.items() if k != "address"})


def test_absent_optional_fields_render_nothing():
    out = html(invoice(line(100)), {**CUSTOMER, "address": None, "email": None, "tax_id": None})
    assert "None" not in out
    assert "Tax ID" in out  # the seller's
    assert out.count("Tax ID") == 1


# Money ----------------------------------------------------------------------------------------

MONEY = [
    pytest.param(123456, "USD", "$1,234.56", id="USD 123456 minor = $1,234.56"),
    pytest.param(5, "USD", "$0.05", id="USD 5 minor = $0.05"),
    pytest.param(0, "USD", "$0.00", id="USD 0 = $0.00"),
    pytest.param(-1234, "USD", "-$12.34", id="USD -1234 minor = -$12.34"),
    pytest.param(123456789, "USD", "$1,234,567.89", id="USD 123456789 minor = $1,234,567.89"),
    pytest.param(100, "EUR", "€1.00", id="EUR 100 minor = €1.00"),
    pytest.param(1235, "JPY", "¥1,235", id="JPY 1235 (0 decimals) = ¥1,235"),
    pytest.param(-1235, "JPY", "-¥1,235", id="JPY -1235 = -¥1,235"),
]


@pytest.mark.parametrize("amount_minor, currency, text", MONEY)
def test_money_formatting(amount_minor, currency, text):
    assert format_money(amount_minor, currency) == text


@pytest.mark.parametrize("amount_minor, digits", [
    pytest.param(1234567, "1,234.567", id="KWD 1234567 fils (3 decimals) = KWD 1,234.567"),
    pytest.param(-5, "-KWD", id="KWD -5 fils = -KWD 0.005"),
    pytest.param(1000, "1.000", id="KWD 1000 fils = KWD 1.000"),
])
def test_kwd_has_three_decimals(amount_minor, digits):
    text = format_money(amount_minor, "KWD")
    assert "KWD" in text and digits in text
    assert text.replace("\xa0", "").replace(" ", "").lstrip("-").removeprefix("KWD") == format(
        abs(D(amount_minor).scaleb(-3)), ",.3f")


def test_amounts_and_total_render_formatted():
    out = html(invoice(line(123456), line(-1234, "Hard cap", "cap_waiver")))
    assert "$1,234.56" in out and "-$12.34" in out
    assert "$1,222.22" in out  # total: 1,234.56 - 12.34


def test_jpy_and_kwd_invoices_render_in_their_own_digits():
    assert "¥1,235" in html(invoice(line(1235), currency="JPY"))
    kwd = html(invoice(line(1234567), currency="KWD"))
    assert "1,234.567" in kwd and "Total due (KWD)" in kwd


def quantity_cell(out: str, description: str) -> str:
    cell = rf"{re.escape(description)}\s*(?:<ul class=\"details\">.*?</ul>\s*)?</td>\s*<td class=\"num\">([^<]*)</td>"
    return re.search(cell, out, re.S).group(1)


@pytest.mark.parametrize("kind, shown", [("cap_waiver", ""), ("commitment_true_up", ""), ("fixed_fee", "1")])
def test_cap_waiver_and_true_up_show_no_quantity(kind, shown):
    assert quantity_cell(html(invoice(line(-500, "The line", kind))), "The line") == shown


# Titles ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, title", [("invoice", "Invoice"), ("credit_note", "Credit note"),
                                         ("debit_note", "Debit note")])
def test_document_title_follows_its_kind(kind, title):
    out = html(invoice(line(-100), kind=kind))
    assert f"<title>{title} INV-2026-10-000001</title>" in out
    assert f"<h1>{title}</h1>" in out


def test_credit_note_names_the_invoice_it_corrects():
    out = html(invoice(line(-100), kind="credit_note", corrects="INV-2026-09-000007"))
    assert "Corrects" in out and "INV-2026-09-000007" in out
    assert "Corrects" not in html(invoice(line(100)))


def test_service_dates_show_the_last_day_inclusive():
    out = html(invoice(line(100)))
    assert "2026-10-01 to 2026-10-31" in out
    assert "2026-11-01" in out  # issued on


def test_a_note_without_old_and_new_amounts_still_shows_its_change():
    out = html(invoice(Line("adjustment", "Goodwill credit", D(1), -500), kind="credit_note"))
    assert "Goodwill credit" in out and "-$5.00" in out


# Money, fast path ------------------------------------------------------------------------------

CURRENCIES = ["USD", "EUR", "JPY", "KWD", "CHF", "GBP", "INR", "BHD", "CLF"]


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=-10**15, max_value=10**15), st.sampled_from(CURRENCIES))
def test_cached_money_shape_formats_exactly_like_format_money(amount_minor, currency):
    assert money_text(amount_minor, currency) == format_money(amount_minor, currency)


@settings(max_examples=300, deadline=None)
@given(st.decimals(min_value=-10**9, max_value=10**9, places=9, allow_nan=False, allow_infinity=False),
       st.sampled_from(CURRENCIES))
def test_step_amounts_show_every_digit_like_babel(amount, currency):
    assert exact_money_text(amount, currency) == format_currency(amount, currency, locale="en_US", currency_digits=True,
                                                              decimal_quantization=False)


def test_template_is_compiled_once():
    compiled_template.cache_clear()
    for _ in range(3):
        html(invoice(line(100)))
    assert compiled_template.cache_info().misses == 1


# The whole invoice: groups, usage detail, caps, commitments -------------------------------------

SAMPLE = renderutil.sample_invoice()
SAMPLE_HTML = invoice_html(SAMPLE, renderutil.CUSTOMER, renderutil.SELLER, "half_up", renderutil.RUN_ID,
                           credits=renderutil.sample_credits())


def _text(fragment: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", fragment)).strip()


def test_lines_are_grouped_by_subscription_plan_then_invoice_level_sections():
    groups = line_groups(SAMPLE)
    assert [(g["title"], g["subtitle"], [line["no"] for line in g["lines"]]) for g in groups] == [
        ("Subscription sub_1", "Plan pro v2", [1, 2, 3, 4, 5, 6]),
        ("Spend controls and commitments", "", [7]),
        ("Credits bought", "", [8]),
    ]
    heads = [_text(h) for h in re.findall(r'<tr class="group-head">(.*?)</tr>', SAMPLE_HTML, re.S)]
    assert heads == ["Subscription sub_1 Plan pro v2", "Spend controls and commitments", "Credits bought"]
    # the subscription's subtotal: 49.00 + 46.00 + 130.00 + 134.00 + 1.50 + 6.00 = 366.50
    assert groups[0]["subtotal"] == "$366.50"
    assert "Subtotal</td><td class=\"num\">$366.50" in SAMPLE_HTML.replace("\n", "").replace("  ", "")


def test_a_plan_change_mid_period_gives_one_group_per_plan_version():
    two = replace(SAMPLE, lines=SAMPLE.lines[:2] + (replace(SAMPLE.lines[1], segment_no=2, plan_version=3),))
    assert [(g["subtitle"], [line["no"] for line in g["lines"]]) for g in line_groups(two)] == [
        ("Plan pro v2", [1, 2]), ("Plan pro v3", [3])]


def test_usage_lines_show_dimensions_allowance_and_each_tier():
    details = {line["description"]: line["details"] for g in line_groups(SAMPLE) for line in g["lines"]}
    assert details["Input tokens (model: gpt-4o)"][0] == "meter input_tokens · model gpt-4o"
    # graduated: 10,000,000 x 10.00/1M = 100 and 4,250,000 x 8.00/1M = 34, the step amounts unrounded
    assert details["Output tokens"] == [
        "meter output_tokens",
        "tier 1 (first 10,000,000): 10,000,000 units at 10.00 per 1,000,000 = $100.00",
        "tier 2 (10,000,001 and up): 4,250,000 units at 8.00 per 1,000,000 = $34.00"]
    # allowance: 12,345 calls - 10,000 included = 2,345 billed -> 3 packages of 1,000 at 0.50
    assert details["API calls"][1:] == ["12,345 units used, 10,000 included, 2,345 billed",
                                        "3 packages of 1,000 units at 0.50 (2,345 units)"]
    for text in ("tier 2 (10,000,001 and up): 4,250,000 units at 8.00 per 1,000,000 = $34.00",
                 "12,345 units used, 10,000 included, 2,345 billed"):
        assert text in SAMPLE_HTML


def test_tier_amounts_keep_their_digits_while_the_line_is_rounded_once():
    steps = (Step("tier 1", D(1), D("0.0000025"), D("0.0000025")), Step("tier 2", D(3), D("0.001"), D("0.003")))
    tiny = Line("usage", "Tokens", D(4), 0, meter="tokens", unit="units", plan="p", plan_version=1, segment_no=1,
                steps=steps)
    out = html(invoice(tiny))
    assert "tier 1 = $0.0000025" in out and "tier 2 = $0.003" in out
    assert quantity_cell(out, "Tokens") == "4 units"


def test_cap_waiver_is_its_own_marked_line_with_the_usage_it_caps():
    [cap] = [line for g in line_groups(SAMPLE) for line in g["lines"] if line["kind"] == "cap_waiver"]
    # usage 46.00 + 130.00 + 134.00 + 1.50 + 6.00 = 317.50; the cap is 300.00, so 17.50 is waived
    assert cap["badge"] == "Hard cap" and cap["amount"] == "-$17.50"
    assert cap["details"] == ["Usage charges $317.50, billed up to the cap: $300.00"]
    assert '<tr class="line cap_waiver">' in SAMPLE_HTML and "Usage charges $317.50" in SAMPLE_HTML


def test_commitment_true_up_is_shown_under_commitments():
    pf = parse_plan('plan: ent\nversion: 1\neffective_from: 2026-01-01\ncurrency: USD\n'
                    'fixed_fees:\n  - {name: Platform fee, amount: "250.00"}\n'
                    'commitment: {minimum: "2000.00"}\n', "plans/ent-v1.yaml")
    sub = Subscription("s1", "c1", "ent", None, date(2026, 1, 1), None, None, None, 1)
    [inv] = period_invoices(OCT, [Segment(sub, 1, pf, OCT.start_at, OCT.end_at, OCT)], {})
    groups = line_groups(inv)
    assert [g["title"] for g in groups] == ["Subscription s1", "Spend controls and commitments"]
    [true_up] = groups[1]["lines"]
    # 2,000.00 committed - 250.00 spent = 1,750.00
    assert (true_up["badge"], true_up["amount"], true_up["quantity"]) == ("Commitment", "$1,750.00", "")
    assert true_up["details"] == ["Minimum spend $2,000.00 for the period, spend $250.00: the difference is billed"]
    assert "Minimum commitment true-up: commitment 2000.00 USD, spend 250.00 USD" in html(inv)


def test_summary_and_total_agree_and_due_date_shows_when_known():
    assert SAMPLE_HTML.count("$357.00") == 2  # the summary box and the total row
    assert "Due" not in _text(SAMPLE_HTML)
    due = invoice_html(replace(SAMPLE, due_on=date(2026, 12, 1)), renderutil.CUSTOMER, renderutil.SELLER, "half_up",
                       "r")
    assert "<td class=\"k\">Due</td><td>2026-12-01</td>" in due and "Due 2026-12-01" in due


def test_run_id_is_in_the_footer_and_pages_are_numbered_for_print():
    footer = SAMPLE_HTML[SAMPLE_HTML.index("<footer>"):]
    assert renderutil.RUN_ID in footer
    assert "@page { size: A4" in SAMPLE_HTML and "counter(pages)" in SAMPLE_HTML


# Credits ---------------------------------------------------------------------------------------

def test_credits_section_lists_each_grant_and_the_wallet_total():
    body = SAMPLE_HTML[SAMPLE_HTML.index('<table class="credits">'):]
    rows = [_text(r) for r in re.findall(r"<tr>(.*?)</tr>", body[body.index("<tbody>"):], re.S)]
    # 900 images: the 500-credit monthly grant, then one 250-credit top-up (bought below 20), the
    # rest (150) billed as overage; columns: opening, added, used, expired, remaining
    assert rows == ["Plan credits 2026-10-01 2026-11-01 0 500 500 0 0",
                    "Automatic top-up 2026-10-12 never 0 250 250 0 0"]
    assert "Wallet of customer c1" in SAMPLE_HTML
    # the top-up cost 8.00 for 250 credits, all used: 250 x 0.032 = 8.00
    assert "credits used $8.00, credits remaining $0.00" in SAMPLE_HTML


def test_no_wallet_no_credits_section():
    assert 'class="credits"' not in invoice_html(SAMPLE, renderutil.CUSTOMER, renderutil.SELLER, "half_up", "r")


CREDIT_PLAN = """\
    plan: img
    version: 1
    effective_from: 2026-01-01
    currency: USD
    fixed_fees:
      - {name: Base, amount: "5.00"}
    charges:
      - {name: Images, meter: images, price: {model: standard, unit_price: "0.05"}}
    credits:
      grants:
        - {credits: 100, every: period, expires: period_end, rollover_max: 30}
        - {credits: 50, every: once, expires: P45D, allocated: "2.00"}
      consume: {images: 1}
      when_exhausted: overage
    """


def _story():
    """Two customers over Sep and Oct. c1: September's plan credits roll 30 into October (10
    expire); the one-time grant (Sep 1 + 45 days) has 10 left when it expires on Oct 16; the
    pack bought in September is untouched; October's plan credits roll 30 into November and 60
    expire. c2 starts mid-September."""
    subs = [subscription("s1", "c1", "img", start=date(2026, 9, 1)), subscription("s2", "c2", "img",
                                                                                start=date(2026, 9, 20))]
    events = [event("c1", "s1", "e1", at(9, 5), 60), event("c1", "s1", "e2", at(10, 3), 40),
              event("c1", "s1", "e3", at(10, 29), 40), event("c2", "s2", "e4", at(10, 10), 20)]
    purchases = [purchase("p1", "c1", 200, "9.00", at(9, 28))]
    plans = catalog(plan(CREDIT_PLAN, "img-v1.yaml"))
    return replayed_wallets(history_grants(subs, plans, purchases, OCT), subs, plans, events, OCT)


def test_credit_summaries_equal_the_balances_table_grant_by_grant():
    replay = _story()
    summaries = credit_summaries(replay, OCT)
    balances = balances_table(replay, OCT)
    shown = {(c, g.grant_id): [g.opening, g.granted, g.used, g.expired, g.rolled_over, g.closing]
             for c, s in summaries.items() for g in s.grants}
    recorded = {(r["customer_id"], r["grant_id"]): [D(r[k]) for k in ("opening", "granted", "consumed", "expired",
                                                                      "rolled_over", "closing")]
                for r in balances.iter_rows(named=True)}
    assert shown == recorded
    assert sorted(summaries) == ["c1", "c2"]
    c1 = summaries["c1"]
    assert c1.total("opening") > 0 and c1.total("rolled_over") > 0 and c1.total("expired") > 0


def test_credit_summaries_used_and_closing_equal_the_ledger():
    replay = _story()
    ledger = ledger_table(replay, OCT)
    for customer, summary in credit_summaries(replay, OCT).items():
        mine = ledger.filter(ledger["customer_id"] == customer)
        consumed = -sum((D(c) for c, k in zip(mine["credits"], mine["kind"], strict=True) if k == "consume"), D(0))
        assert summary.total("used") == consumed
        assert summary.total("closing") == D(mine["balance_after"][-1])  # the wallet's last balance


def test_the_rendered_credit_totals_are_the_summary_totals():
    replay = _story()
    summary = credit_summaries(replay, OCT)["c1"]
    out = invoice_html(SAMPLE, CUSTOMER, SELLER, "half_up", "r", credits=summary)
    total = _text(re.search(r'<tr class="total"><td colspan="3">(.*?)</tr>', out, re.S).group(1))
    columns = ["opening", "granted", "used", "expired", "rolled_over", "closing"]
    assert total == "Wallet of customer c1 " + " ".join(format(summary.total(c).normalize(), ",f") for c in columns)
    assert "Rolled over" in out and "Credit pack p1" in out


def test_grant_value_is_what_was_paid_for_the_credits():
    summary = credit_summaries(_story(), OCT)["c1"]
    # the pack: 200 credits for 9.00 (0.045 each); the once-grant: 50 for 2.00 (0.04 each); plan
    # credits are free. value_minor rounds the exact sum once.
    expected = sum((g.used * g.cost_basis for g in summary.grants), D(0))
    assert summary.value_minor("used", "USD") == int((expected * 100).quantize(D(1), rounding="ROUND_HALF_UP"))


# Credit and debit notes -------------------------------------------------------------------------

NOTE = renderutil.sample_credit_note()
NOTE_HTML = invoice_html(NOTE, renderutil.CUSTOMER, renderutil.SELLER, "half_up", NOTE.run_id)


def test_credit_note_says_which_invoice_it_corrects_why_and_by_how_much():
    text = _text(NOTE_HTML)
    assert "<h1>Credit note</h1>" in NOTE_HTML and "CN-2026-10-000001" in text
    assert "This credit note corrects invoice INV-2026-10-000001 for October 2026" in text
    assert "Reason: gpt-4o-mini input tokens of Oct 14-15 were counted twice" in text
    # 52M -> 26M tokens at 2.50/1M: 130.00 -> 65.00; usage 317.50 -> 252.50 is under the 300.00
    # cap, so the -17.50 waiver goes: -65.00 + 17.50 = -47.50
    assert "Quantity 52,000,000 units → 26,000,000 units" in text
    rows = [_text(r) for r in re.findall(r'<tr class="line">(.*?)</tr>', NOTE_HTML, re.S)]
    assert rows == ["1 Input tokens (model: gpt-4o-mini) Quantity 52,000,000 units → 26,000,000 units "
                    "$130.00 $65.00 -$65.00",
                    "2 Hard cap: usage above 300.00 USD is waived -$17.50 $0.00 $17.50"]
    assert "Total credited (USD) -$47.50" in text
    assert NOTE.run_id in NOTE_HTML and 'class="credits"' not in NOTE_HTML


def test_debit_note_asks_for_the_difference():
    debit = replace(NOTE, invoice_id="DN-2026-10-000001", kind="debit_note",
                    lines=tuple(replace(line, amount_minor=-line.amount_minor) for line in NOTE.lines))
    text = _text(invoice_html(debit, CUSTOMER, SELLER, "half_up", "r"))
    assert "This debit note corrects invoice INV-2026-10-000001" in text
    assert "the amount below is due in addition to it" in text and "Additional amount due (USD) $47.50" in text


def test_hostile_reason_and_corrected_line_names_are_escaped():
    evil = replace(NOTE, reason="<script>steal()</script> & more",
                   lines=(replace(NOTE.lines[0], adjusts_description="<img src=x onerror=alert(1)>"),))
    out = invoice_html(evil, CUSTOMER, SELLER, "half_up", "r")
    assert "<script>" not in out and "<img" not in out
    assert "&lt;script&gt;steal()&lt;/script&gt; &amp; more" in out
    assert "&lt;img src=x onerror=alert(1)&gt;" in out


def test_hostile_dimension_values_are_escaped_in_usage_details():
    line = Line("usage", "Tokens", D(1), 100, meter="tokens", unit="units", plan="p", plan_version=1, segment_no=1,
                group={"region": "<b>eu</b>"}, steps=(Step("1 units at 1.00", D(1), D(1), D(1)),))
    out = html(invoice(line))
    assert "<b>eu</b>" not in out and "region &lt;b&gt;eu&lt;/b&gt;" in out
