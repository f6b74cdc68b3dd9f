"""Every name prints: `billrun pdf` refuses a document with characters no installed font has.

The set-up installs fonts that cover CJK, Cyrillic, Arabic and accented names (README, .ci/run);
a character outside every font (here one from Unicode's private use area, which no font maps)
must fail the command in one line naming the character and the document, never exit 0 with
boxes in the PDF.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import renderutil
from flows.cli import app
from flows.fonts import document_characters, missing_glyphs
from flows.store import open_store
from transforms.documents.render import invoice_html

pytestmark = pytest.mark.skipif(shutil.which("fc-list") is None, reason="fontconfig's fc-list is not installed")
runner = CliRunner()
INVOICE = "INV-2026-10-000001"
CJK, PRIVATE = "東京データ株式会社", "Acme \ue000 Ltd"


def _covered(ch: str) -> bool:
    return not missing_glyphs({ch})


def _store(tmp_path: Path, name: str) -> str:
    store = str(tmp_path / "store")
    html = invoice_html(renderutil.sample_invoice(), {**renderutil.CUSTOMER, "name": name}, renderutil.SELLER,
                        "half_up", renderutil.RUN_ID)
    open_store(store, create=True).put_bytes(f"billing/period=2026-10/invoices/{INVOICE}.html", html.encode())
    return store


def test_the_text_is_what_a_reader_sees_not_the_css():
    chars = document_characters('<style>body { content: "\\e000"; }</style><p>Añ &amp; 東</p>')
    assert chars == {"A", "ñ", "&", "東"}


def test_a_character_no_font_has_is_found():
    assert missing_glyphs({"A", "\ue000"}) == ["\ue000"]


@pytest.mark.slow
@pytest.mark.skipif(not all(_covered(ch) for ch in "東Жعé") if shutil.which("fc-list") else True,
                    reason="fonts for CJK, Cyrillic, Arabic and accents are not installed (see README setup)")
@pytest.mark.parametrize("name", [CJK, "Пётр Ильич Чайковский", "شركة البيانات", "Zoë Müller-Łukasiewicz"])
def test_every_name_prints(tmp_path, name):
    out = tmp_path / "inv.pdf"
    result = runner.invoke(app, ["pdf", "--invoice", INVOICE, "--store", _store(tmp_path, name), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(b"%PDF-")


@pytest.mark.slow
def test_a_missing_glyph_fails_in_one_line_naming_it_and_the_document(tmp_path):
    out = tmp_path / "inv.pdf"
    result = runner.invoke(app, ["pdf", "--invoice", INVOICE, "--store", _store(tmp_path, PRIVATE), "--out", str(out)])
    assert result.exit_code == 1, result.output
    text = result.stderr.strip()
    assert text.startswith("billrun: error: ") and "\n" not in text and "Traceback" not in result.output
    assert INVOICE in text and "U+E000" in text and "no installed font" in text
    assert not out.exists()
