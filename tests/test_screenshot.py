"""Screenshots of a fixed invoice and credit note in headless Chromium, against committed
baselines, so that a layout regression shows as a failing test and a picture to look at.

Exact bytes differ across Chromium and font versions, so the comparison has a tolerance: the
share of pixels that differ visibly must stay under MAX_CHANGED, and the page (the white sheet
on the grey background) must keep its height within a few pixels; a section that disappears, a
column that wraps or a table that grows changes one or the other. On failure the actual
screenshot and a difference image are kept, and the message says where.

Regenerate the baselines (and look at them) with BILLRUN_UPDATE_SCREENSHOTS=1 pytest
tests/test_screenshot.py. Chromium is Debian's `chromium` package (BILLRUN_CHROMIUM names
another binary); without one the tests skip, unless BILLRUN_REQUIRE_CHROMIUM=1.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageChops

import renderutil
from transforms.documents.render import invoice_html

pytestmark = pytest.mark.slow  # every test here starts headless Chromium

BASELINES = Path(__file__).parent / "golden" / "screenshots"
UPDATE = os.environ.get("BILLRUN_UPDATE_SCREENSHOTS") == "1"
WIDTH = 900
MAX_CHANGED = 0.01          # share of pixels that may differ visibly (font rasterizing, hinting)
VISIBLE = 16                # a smaller difference is anti-aliasing; white sheet vs grey background is 17
HEIGHT_SLACK = 4            # pixels the sheet's height may move
BACKGROUND = (0xEE, 0xF0, 0xF4)  # the template's html background around the sheet
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
         "--no-first-run", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--force-device-scale-factor=1", "--force-color-profile=srgb"]


def chromium() -> str | None:
    named = os.environ.get("BILLRUN_CHROMIUM")
    if named:
        return named
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.fixture(scope="module")
def browser() -> str:
    binary = chromium()
    if binary is None:
        if os.environ.get("BILLRUN_REQUIRE_CHROMIUM") == "1":
            pytest.fail("BILLRUN_REQUIRE_CHROMIUM=1 but no chromium binary was found")
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium; "
                    "or set BILLRUN_CHROMIUM to a Chromium binary)")
    return binary


def screenshots(binary: str, pages: dict[str, tuple[str, int]], work: Path) -> dict[str, Image.Image]:
    """Each page (name -> html, window height) screenshotted by its own Chromium, all at once."""
    runs = {}
    for name, (html, height) in pages.items():
        page = work / f"{name}.html"
        page.write_text(html, encoding="utf-8")
        runs[name] = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={work / ('profile-' + name)}", f"--window-size={WIDTH},{height}",
             f"--screenshot={work / (name + '.png')}", page.as_uri()],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    images = {}
    for name, run in runs.items():
        _, err = run.communicate(timeout=60)
        png = work / f"{name}.png"
        assert run.returncode == 0 and png.exists(), f"chromium failed on {name} ({run.returncode}): {err[-2000:]}"
        images[name] = Image.open(png).convert("RGB")
    return images


def sheet_height(image: Image.Image) -> int:
    """Height of the document's sheet: the rows that are not all background."""
    box = ImageChops.difference(image, Image.new("RGB", image.size, BACKGROUND)).convert("L").point(
        lambda v: 255 if v > 8 else 0).getbbox()
    return 0 if box is None else box[3] - box[1]


def changed_share(actual: Image.Image, baseline: Image.Image) -> tuple[float, Image.Image]:
    diff = ImageChops.difference(actual, baseline).convert("L").point(lambda v: 255 if v >= VISIBLE else 0)
    changed = diff.histogram()[255]
    return changed / (diff.width * diff.height), diff


def _invoice(credits: bool = True) -> str:
    return invoice_html(renderutil.sample_invoice(), renderutil.CUSTOMER, renderutil.SELLER, "half_up",
                        renderutil.RUN_ID, credits=renderutil.sample_credits() if credits else None)


def _credit_note() -> str:
    return invoice_html(renderutil.sample_credit_note(), renderutil.CUSTOMER, renderutil.SELLER, "half_up",
                        "backfill-20261205-0123456789ab")


def _cjk_invoice() -> str:
    """Every name prints: a Japanese customer's name and address in the Noto CJK font the
    documents' font stack names (set-up: fonts-noto-cjk), never empty boxes."""
    customer = {**renderutil.CUSTOMER, "name": "東京データ株式会社", "address": "東京都千代田区丸の内1-1"}
    return invoice_html(renderutil.sample_invoice(), customer, renderutil.SELLER, "half_up", renderutil.RUN_ID)


def _taxed_invoice() -> str:
    """The sample invoice taxed in California at 7.25% (subtotal, rate with its base, total),
    due 30 days after issue, with payment instructions."""
    from dataclasses import replace
    from datetime import date

    from transforms.tax import Party, invoice_with_tax, taxable_lines
    from transforms.tax.rules import load_rules

    rules = load_rules('seller: {country: US, registrations: [US-CA]}\n'
                       'rates: [{country: US, region: CA, rate: "7.25", label: Sales tax}]\n')
    invoice = renderutil.sample_invoice()
    taxes = rules.tax_lines(taxable_lines(invoice, frozenset(), None), Party("US"), Party("US", "CA"), "USD",
                            "half_up")
    invoice = replace(invoice_with_tax(invoice, taxes), due_on=date(2026, 12, 1))
    seller = {**renderutil.SELLER, "payment": [("Bank", "First Example Bank"), ("Account number", "000123456789"),
                                               ("Routing number", "121000248")]}
    return invoice_html(invoice, renderutil.CUSTOMER, seller, "half_up", renderutil.RUN_ID)


def _draft_invoice() -> str:
    """A preview (`billrun preview`) of the sample invoice: DRAFT in the title, a banner and a
    watermark over the page, a draft id instead of an invoice number, dated "as of" the day."""
    from datetime import date

    from transforms.documents.drafts import customer_drafts
    from transforms.documents.render import Draft

    seller = {**renderutil.SELLER, "payment_terms_days": 30, "payment": [("Bank", "First Example Bank")]}
    [draft] = customer_drafts([renderutil.sample_invoice()], "c1", date(2026, 10, 14), seller, {})
    return invoice_html(draft, renderutil.CUSTOMER, seller, "half_up", "", draft=Draft(
        "the 2026-10 invoice as it stands on 2026-10-14 (the nightly run of 2026-10-14); the final invoice is "
        "numbered and issued when the period closes, and may differ", "figures from the nightly run of 2026-10-14"))


# name -> (html, window height); the invoice's sheet is about 1,560 px tall and the window leaves
# room below it, so growth shows. `invoice-without-credits` proves the comparison sees a change.
PAGES = {"invoice": (_invoice, 1800), "credit_note": (_credit_note, 1000),
         "invoice-without-credits": (lambda: _invoice(credits=False), 1800),
         "invoice-cjk": (_cjk_invoice, 1800), "invoice-taxed": (_taxed_invoice, 1900),
         "invoice-draft": (_draft_invoice, 1900)}
BASELINED = ("credit_note", "invoice", "invoice-cjk", "invoice-taxed", "invoice-draft")


@pytest.fixture(scope="module")
def shots(browser, tmp_path_factory) -> tuple[dict[str, Image.Image], Path]:
    work = tmp_path_factory.mktemp("screenshots")
    return screenshots(browser, {name: (render(), height) for name, (render, height) in PAGES.items()}, work), work


@pytest.mark.parametrize("name", BASELINED)
def test_document_looks_like_its_baseline(shots, name):
    images, work = shots
    actual, height = images[name], PAGES[name][1]
    assert sheet_height(actual) < height - 20, f"{name}: the sheet no longer fits the {height}px window"
    baseline_path = BASELINES / f"{name}.png"
    if UPDATE:
        BASELINES.mkdir(parents=True, exist_ok=True)
        actual.save(baseline_path, optimize=True)
        return
    assert baseline_path.exists(), f"no baseline {baseline_path}: run with BILLRUN_UPDATE_SCREENSHOTS=1 and review it"
    baseline = Image.open(baseline_path).convert("RGB")
    kept = work / f"{name}.png"
    assert actual.size == baseline.size, f"{name}: {actual.size} vs baseline {baseline.size}; actual: {kept}"
    was, now = sheet_height(baseline), sheet_height(actual)
    assert abs(now - was) <= HEIGHT_SLACK, f"{name}: the page is {now}px tall, was {was}px; actual: {kept}"
    share, diff = changed_share(actual, baseline)
    diff.save(work / f"{name}-diff.png")
    assert share <= MAX_CHANGED, (f"{name}: {share:.2%} of pixels changed (max {MAX_CHANGED:.0%}); actual: {kept}, "
                                  f"difference: {work / f'{name}-diff.png'}, baseline: {baseline_path}")


def test_the_comparison_catches_a_dropped_section(shots):
    """The tolerance is not so loose that a layout change passes: the invoice without its
    credits section is shorter and differs in more pixels than allowed."""
    if UPDATE:
        pytest.skip("updating baselines")
    images, _ = shots
    baseline = Image.open(BASELINES / "invoice.png").convert("RGB")
    assert sheet_height(baseline) - sheet_height(images["invoice-without-credits"]) > 100
    assert changed_share(images["invoice-without-credits"], baseline)[0] > MAX_CHANGED
