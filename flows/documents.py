"""Customer documents as files: the PDF of an invoice, credit note or debit note, rendered from
the HTML that the close or backfill published (WeasyPrint; nothing is re-rated)."""
from __future__ import annotations

import re
from pathlib import Path

from flows.fonts import check_glyphs
from flows.keys import MANIFEST
from flows.store import open_store
from transforms.errors import InputError

_ID = re.compile(r"^(INV|CN|DN)-(\d{4}-\d{2})-\d{6}$")


def document_html_key(store, invoice_id: str) -> str:
    """Where the published HTML of a document is."""
    match = _ID.match(invoice_id)
    if not match:
        raise InputError(f"{invoice_id!r} is not a document id (INV-, CN- or DN-YYYY-MM-NNNNNN)")
    if match.group(1) == "INV":
        key = f"billing/period={match.group(2)}/invoices/{invoice_id}.html"
        if store.exists(key):
            return key
    else:
        for obj in store.list("billing/corrections/"):
            if obj.key.endswith(f"/documents/{invoice_id}.html") and store.exists(
                    obj.key.rsplit("/documents/", 1)[0] + "/" + MANIFEST):
                return obj.key
    raise InputError(f"{invoice_id}: no such published document in {store.uri}")


def document_pdf(store_uri: str, invoice_id: str, out: Path) -> Path:
    """Render the document to `out` as PDF and return the path; a character no installed font
    can draw fails the command (flows.fonts) before anything is written."""
    from weasyprint import HTML

    store = open_store(store_uri)
    html = store.read_bytes(document_html_key(store, invoice_id)).decode("utf-8")
    check_glyphs(html, invoice_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    HTML(string=html).write_pdf(out)
    return out
