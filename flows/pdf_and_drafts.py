"""Customer documents as files: the PDF of an invoice, credit note or debit note, rendered from
the HTML that the close or backfill published (WeasyPrint; nothing is re-rated), and the drafts
of `billrun preview` (see flows/preview.py)."""
from __future__ import annotations

import errno
import io
import re
from datetime import date
from pathlib import Path

import polars as pl

from flows.fonts import check_glyphs
from flows.store import open_store
from transforms.credits.reports import CreditSummary
from transforms.documents.drafts import draft_file_stem, wallet_from_balances
from transforms.documents.render import Draft, invoice_html
from transforms.engine.invoices import Invoice, invoices_from_tables
from transforms.errors import InputError
from transforms.layout import CORRECTIONS_PREFIX, MANIFEST, document_html_name, invoice_html_key, night_prefix

_ID = re.compile(r"^(INV|CN|DN)-(\d{4}-\d{2})-\d{6}$")


def document_html_key(store, invoice_id: str) -> str:
    """Where the published HTML of a document is."""
    match = _ID.match(invoice_id)
    if not match:
        raise InputError(f"{invoice_id!r} is not a document id (INV-, CN- or DN-YYYY-MM-NNNNNN)")
    if match.group(1) == "INV":
        key = invoice_html_key(match.group(2), invoice_id)
        if store.exists(key):
            return key
    else:
        for obj in store.list(CORRECTIONS_PREFIX):
            if obj.key.endswith("/" + document_html_name(invoice_id)) and store.exists(
                    obj.key.removesuffix(document_html_name(invoice_id)) + MANIFEST):
                return obj.key
    raise InputError(f"{invoice_id}: no such published document in {store.uri}")


def document_pdf(store_uri: str, invoice_id: str, out: Path) -> Path:
    """Render the document to `out` as PDF and return the path; a character no installed font
    can draw fails the command (flows.fonts) before anything is written."""
    store = open_store(store_uri)
    html = store.read_bytes(document_html_key(store, invoice_id)).decode("utf-8")
    return html_pdf(html, invoice_id, out)


def html_pdf(html: str, document: str, out: Path) -> Path:
    """A document's HTML to `out` as PDF; a character no installed font can draw fails before
    anything is written (flows.fonts)."""
    from weasyprint import HTML

    check_glyphs(html, document)
    out.parent.mkdir(parents=True, exist_ok=True)
    HTML(string=html).write_pdf(out)
    return out


def drafts_from_night(store_uri: str, night: date, customer_id: str) -> tuple[list[Invoice], CreditSummary | None]:
    """The customer's draft invoices as the nightly run of `night` wrote them (none when that
    night drafted nothing for the customer), and the customer's credit wallet of that night."""
    store = open_store(store_uri)
    prefix = night_prefix(night)

    def read(name: str) -> pl.DataFrame:
        frame = pl.read_parquet(io.BytesIO(store.read_bytes(prefix + name)))
        return frame.filter(pl.col("customer_id") == customer_id)

    return (invoices_from_tables(read("draft_invoices.parquet"), read("draft_invoice_lines.parquet")),
            wallet_from_balances(read("credit_balances.parquet"), customer_id))


def write_drafts(drafts: list[Invoice], customer: dict, seller: dict, roundings: dict[str, str], draft: Draft,
                 credits: CreditSummary | None, out: Path | None, pdf: bool) -> list[Path]:
    """Each draft as HTML (or PDF) at `out`, else in the current folder under its draft id
    (`DRAFT-<customer>-<period>.html`); with several drafts and `out`, `out`'s name gets -1, -2, ...
    Nothing goes into the store."""
    suffix = ".pdf" if pdf else ".html"
    written = []
    for n, inv in enumerate(drafts, start=1):
        if out is None:
            path = Path(draft_file_stem(inv.customer_id, inv.period, n, len(drafts)) + suffix)
        else:
            path = out if len(drafts) == 1 else out.with_name(f"{out.stem}-{n}{out.suffix or suffix}")
        html = invoice_html(inv, customer, seller, roundings.get(inv.subscription_id, "half_up"), "",
                            credits=credits, draft=draft)
        try:
            if pdf:
                html_pdf(html, inv.invoice_id, path)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(html, encoding="utf-8")
        except OSError as exc:  # a folder that is a file, no permission: the user's --out (or folder)
            if exc.errno == errno.ENOSPC:
                raise  # a full disk is said by the command line's own check
            raise InputError(f"{inv.invoice_id}: cannot write {path} ({exc.strerror or exc}); pass --out with a "
                             f"writable file") from None
        written.append(path)
    return written
