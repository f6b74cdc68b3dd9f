"""Customer documents as HTML: invoices, credit notes and debit notes, one jinja2 template family.

Autoescaping and StrictUndefined: a customer's name is always text and a missing field is an
error, never a blank. The close renders every invoice of a period (100k at scale), so the
templates are compiled once per process and the views below are plain dicts built in one pass
over the lines, with money formatted through a cache (Babel's formatter is most of the cost).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from functools import lru_cache

from babel.numbers import format_currency
from jinja2 import Environment, PackageLoader, StrictUndefined, Template, select_autoescape
from jinja2.compiler import CodeGenerator
from markupsafe import Markup, escape

from transforms.credits.reports import CreditSummary, GrantMovement
from transforms.engine.invoices import INVOICE_LEVEL_KINDS, TAX_LINE_KINDS, USAGE_LINE_KINDS, Invoice, Line
from transforms.inputs.adjustments import KINDS as ADJUSTMENT_KINDS
from transforms.money import format_money, minor_exponent
from transforms.pricing.base import fmt_units

TITLES = {"invoice": "Invoice", "credit_note": "Credit note", "debit_note": "Debit note"}
TEMPLATES = {"invoice": "invoice.html.j2", "credit_note": "note.html.j2", "debit_note": "note.html.j2"}
TOTAL_LABELS = {"invoice": "Total due", "credit_note": "Total credited", "debit_note": "Additional amount due"}

# Invoice-level lines, grouped after the subscription's own lines, in this order.
SECTIONS = (
    (INVOICE_LEVEL_KINDS, "Spend controls and commitments"),
    (("top_up", "credit_purchase"), "Credits bought"),
    (ADJUSTMENT_KINDS, "One-off charges and credits"),
)
AMOUNT_ONLY_KINDS = INVOICE_LEVEL_KINDS + ADJUSTMENT_KINDS
"""Lines billed as an amount: no quantity is shown for them, nor for a correction of one."""
BADGES = {"cap_waiver": "Hard cap", "commitment_true_up": "Commitment", "top_up": "Top-up",
          "credit_purchase": "Credit pack", "adjustment_charge": "One-off", "adjustment_credit": "Credit"}
GRANT_LABELS = {"grant": "Plan credits", "purchase": "Credit pack", "top_up": "Automatic top-up",
                "rollover": "Rolled over", "opening": "Brought forward"}
DRAFT_PAYMENT_REFERENCE = "the invoice number, given at the close"


@dataclass(frozen=True)
class Draft:
    """What a draft document says about itself: `note` on its banner (why it is not the
    invoice), `source` in its footer (what its figures come from)."""

    note: str
    source: str


MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")


# Unicode bidi embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069) reorder the
# text after them: "Acme\u202eFDP.exe" displays as "Acmeexe.PDF". A document shows them
# visibly ([U+202E]) instead, wherever they come from: names, addresses, descriptions, dimensions.
_BIDI_VISIBLE = {c: f"[U+{c:04X}]" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))}
_BIDI = frozenset(chr(c) for c in _BIDI_VISIBLE)


def visible_bidi(value):
    """`value` with every bidi control written out as [U+XXXX]; anything but text unchanged.
    The templates' finalize: it sees every printed value before it is escaped."""
    if isinstance(value, str) and not _BIDI.isdisjoint(value):
        marked = str.translate(value, _BIDI_VISIBLE)
        return Markup(marked) if isinstance(value, Markup) else marked
    return value


# What escape(visible_bidi(text)) changes: a text without any of these prints as it is.
_NOT_PLAIN = _BIDI | frozenset("&<>\"'")


def escaped(value) -> str:
    """escape(visible_bidi(value)), what the templates print for `{{ value }}`: a text without
    markup characters or bidi controls (nearly every value of a document) is returned as it is,
    without the Markup object escape() would build around it; a count is its digits."""
    kind = type(value)
    if kind is str:
        if _NOT_PLAIN.isdisjoint(value):
            return value
    elif kind is int:
        return str(value)
    return escape(visible_bidi(value))


class _CodeGenerator(CodeGenerator):
    """jinja2 compiles `{{ value }}` under autoescaping to escape(environment.finalize(value)),
    two calls and a Markup object per printed value (~80 per document); this writes one call to
    `escaped`, which gives the same text. The hooks are those jinja2's own native-types
    generator overrides."""

    def _output_child_pre(self, node, frame, finalize) -> None:
        if frame.eval_ctx.volatile or not frame.eval_ctx.autoescape:
            super()._output_child_pre(node, frame, finalize)
        else:
            self.write("environment.escaped(")

    def _output_child_post(self, node, frame, finalize) -> None:
        if frame.eval_ctx.volatile or not frame.eval_ctx.autoescape:
            super()._output_child_post(node, frame, finalize)
        else:
            self.write(")")


_DICT_ATTRIBUTES = frozenset(dir(dict))


class DictFirstEnvironment(Environment):
    """jinja2 reads `line.amount` as getattr(line, "amount") first and as the key only once that
    has raised; the views here are dicts, and that raise (~1 us, ~80 per document) was a third of
    the template's time. A plain dict's key is read first unless the name is a dict attribute
    (`items`, `keys`...), which gives what jinja2 gives. Its templates print each value with one
    call to `escaped` (_CodeGenerator)."""

    def getattr(self, obj, attribute):
        if type(obj) is dict and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except KeyError:
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)

    code_generator_class = _CodeGenerator
    escaped = staticmethod(escaped)


@lru_cache(maxsize=None)
def compiled_template(name: str) -> Template:
    """Compiled once per process; auto_reload off, so no file check per document."""
    env = DictFirstEnvironment(loader=PackageLoader("transforms", "templates"),
                               autoescape=select_autoescape(default=True, default_for_string=True),
                               undefined=StrictUndefined, keep_trailing_newline=True, auto_reload=False,
                               trim_blocks=True, lstrip_blocks=True, finalize=visible_bidi, cache_size=-1)
    # The documents call none of jinja2's default globals (range, dict, lipsum, cycler, joiner,
    # namespace); without them each render does not copy them into its context.
    env.globals.clear()
    return env.get_template(name)


@lru_cache(maxsize=None)
def _money_shape(currency: str) -> tuple[str, str, str, str] | None:
    """What format_money puts around the digits in `currency` (positive prefix and suffix,
    negative prefix and suffix), read off Babel once per currency; None if its output is not
    digits with text around them."""
    exponent = minor_exponent(currency)
    probe = 1234567 * 10 ** exponent + int("8" * exponent or "0")  # 1,234,567.888...
    digits = money_digits(probe, currency)
    shape = []
    for text in (format_money(probe, currency), format_money(-probe, currency)):
        if text.count(digits) != 1:
            return None
        shape += text.split(digits)
    return tuple(shape)


def money_digits(amount_minor: int, currency: str) -> str:
    """`123456789` USD -> `1,234,567.89`: integer arithmetic on the minor units, exact like the
    Decimal formatting it replaces (format(from_minor(...), ",.2f")) at a third of its cost."""
    exponent = minor_exponent(currency)
    if not exponent:
        return f"{abs(amount_minor):,}"
    major, minor = divmod(abs(amount_minor), 10 ** exponent)
    return f"{major:,}.{minor:0{exponent}d}"


def money_text(amount_minor: int, currency: str) -> str:
    """format_money, without Babel's pattern engine on every amount (16 us each, most of the
    cost of a document): the currency's symbol and sign placement come from Babel once, the
    digits from exact Decimal formatting. tests/test_render.py checks both agree."""
    shape = _money_shape(currency)
    if shape is None:
        return format_money(amount_minor, currency)
    prefix, suffix = (shape[0], shape[1]) if amount_minor >= 0 else (shape[2], shape[3])
    return prefix + money_digits(amount_minor, currency) + suffix


def exact_money_text(amount: Decimal, currency: str) -> str:
    """A rating step's unrounded amount with all its digits ($0.0000025, never less than the
    currency's own): the audit trail, not a line amount (lines are rounded once and shown with
    money_text). Babel's format_currency(..., decimal_quantization=False), in the same shape."""
    shape = _money_shape(currency)
    if shape is None:
        return format_currency(amount, currency, locale="en_US", currency_digits=True, decimal_quantization=False)
    exact = amount.normalize()
    if -exact.as_tuple().exponent < minor_exponent(currency):
        exact = exact.quantize(Decimal(1).scaleb(-minor_exponent(currency)))
    prefix, suffix = (shape[0], shape[1]) if amount >= 0 else (shape[2], shape[3])
    return prefix + format(abs(exact), ",f") + suffix


def _period_text(period: str) -> str:
    year, month = period.split("-")
    return f"{MONTHS[int(month) - 1]} {year}"


def _quantity(value: Decimal | None, unit: str) -> str:
    return "" if value is None else f"{fmt_units(value)} {unit}".strip()


@lru_cache(maxsize=4096)
def _meter_text(meter: str, filter_items: tuple, group_items: tuple) -> str:
    """`meter input_tokens · model gpt-4o`: the meter and the dimension values a usage line
    counts (its charge's filter, then its group; a missing group value is `(none)`). The same
    few per plan across all the period's invoices, so built once each."""
    dims = {**dict(filter_items), **{k: v if v is not None else "(none)" for k, v in group_items}}
    return " · ".join([f"meter {meter}"] + [f"{k} {v}" for k, v in dims.items()])


def _usage_details(line: Line, currency: str) -> list[str]:
    """What a usage line bills, in the customer's words: the meter and dimensions it counts,
    the allowance, and the tiers (or packages, or rates) the units went through."""
    details = []
    if line.meter:
        details.append(_meter_text(line.meter, tuple(line.filter.items()), tuple(line.group.items())))
    if line.included_units is not None:
        details.append(f"{fmt_units(line.total_units)} units used, {fmt_units(line.included_units)} included, "
                       f"{fmt_units(line.quantity)} billed")
    if len(line.steps) > 1:
        details += [f"{s.label} = {exact_money_text(s.amount, currency)}" for s in line.steps]
    elif line.steps:
        details.append(line.steps[0].label)
    return details


def _line_view(no: int, line: Line, invoice: Invoice) -> dict:
    kind, currency = line.kind, invoice.currency
    if kind in USAGE_LINE_KINDS:  # most lines: a quantity, a unit price when one price applies
        steps = line.steps
        return {"no": no, "kind": kind, "badge": "", "description": line.description,
                "quantity": _quantity(line.quantity, line.unit),
                "unit_price": steps[0].price_text if len(steps) == 1 else "",
                "amount": money_text(line.amount_minor, currency), "details": _usage_details(line, currency)}
    details: list[str] = []
    if kind == "cap_waiver":
        usage_minor = invoice.usage_spend_minor
        details = [f"Usage charges {money_text(usage_minor, currency)}, billed up to the cap: "
                   f"{money_text(usage_minor + line.amount_minor, currency)}"]
    elif kind == "commitment_true_up":
        spend_minor = invoice.commitment_spend_minor
        details = [f"Minimum spend {money_text(spend_minor + line.amount_minor, currency)} for the period, "
                   f"spend {money_text(spend_minor, currency)}: the difference is billed"]
    elif kind in ADJUSTMENT_KINDS:
        details = [s.label for s in line.steps] + (["Not subject to tax"] if line.taxable is False else [])
    return {
        "no": no, "kind": kind, "badge": BADGES.get(kind, ""), "description": line.description,
        "quantity": "" if kind in AMOUNT_ONLY_KINDS else _quantity(line.quantity, line.unit),
        "unit_price": "", "amount": money_text(line.amount_minor, currency), "details": details,
    }


def _group(title: str, subtitle: str, rows: list[tuple[int, Line]], invoice: Invoice) -> dict:
    return {"title": title, "subtitle": subtitle,
            "lines": [_line_view(no, line, invoice) for no, line in rows],
            "subtotal": money_text(sum(line.amount_minor for _, line in rows), invoice.currency)}


_SECTION_OF = {kind: title for kinds, title in SECTIONS for kind in kinds}
_SECTION_ORDER = tuple(title for _, title in SECTIONS) + ("Other charges",)


def line_groups(invoice: Invoice) -> list[dict]:
    """The invoice's lines grouped as the customer reads them: the subscription's lines per plan
    version it ran on (a plan change mid-period gives two groups), then spend controls and
    commitments, then credits bought. Line numbers stay those of invoice_lines."""
    by_plan: dict[tuple, list] = {}
    by_section: dict[str, list] = {}
    for no, line in enumerate(invoice.lines, start=1):
        if line.kind in TAX_LINE_KINDS:  # shown with the totals (tax_view)
            continue
        if line.plan is not None:
            by_plan.setdefault((line.segment_no, line.plan, line.plan_version), []).append((no, line))
        else:
            by_section.setdefault(_SECTION_OF.get(line.kind, "Other charges"), []).append((no, line))
    groups = [_group(f"Subscription {invoice.subscription_id}", f"Plan {plan} v{version}", rows, invoice)
              for (_, plan, version), rows in by_plan.items()]
    if by_section:
        groups += [_group(title, "", by_section[title], invoice) for title in _SECTION_ORDER if title in by_section]
    return groups


def _adjustment_view(no: int, line: Line, currency: str) -> dict:
    """A correction line: what was issued, what is due now, and the difference."""
    known = line.old_amount_minor is not None and line.new_amount_minor is not None
    # amounts only, as on the invoice
    counted = line.adjusts_kind not in AMOUNT_ONLY_KINDS
    if known and counted:
        quantity = (f"Quantity {_quantity(line.old_quantity, line.unit)} \u2192 "
                    f"{_quantity(line.new_quantity, line.unit)}")
    else:
        quantity = f"Quantity {_quantity(line.quantity, line.unit)}" if counted and line.quantity else ""
    return {
        "no": no, "description": line.adjusts_description or line.description, "quantity": quantity,
        "was": money_text(line.old_amount_minor, currency) if known else "",
        "now": money_text(line.new_amount_minor, currency) if known else "",
        "change": money_text(line.amount_minor, currency),
    }


def tax_view(invoice: Invoice) -> dict | None:
    """Subtotal, each rate with its base and amount, and the legal mentions (reverse charge,
    exemption); None for a document without tax lines, which shows its total alone."""
    taxes = [line for line in invoice.lines if line.kind == "tax"]
    if not taxes:
        return None
    currency = invoice.currency
    rows = [{"label": line.description + (", included in the prices" if line.tax_inclusive else ""),
             "base": money_text(line.taxable_base_minor or 0, currency),
             "amount": money_text(line.amount_minor, currency)}
            for line in taxes]
    notes = list(dict.fromkeys(line.tax_note for line in taxes if line.tax_note))
    return {"subtotal": money_text(invoice.subtotal_minor, currency), "rows": rows, "notes": notes,
            "inclusive": any(line.tax_inclusive for line in taxes)}


def _day(at: datetime | None) -> str:
    return "never" if at is None else at.date().isoformat()


def _grant_label(g: GrantMovement) -> str:
    label = GRANT_LABELS.get(g.kind, g.kind)
    if g.kind == "purchase":
        return f"{label} {g.grant_id.removeprefix('purchase/')}"
    if g.kind == "grant" and "/once/" in g.grant_id:
        return f"{label} (one-time)"
    return label


def credits_view(summary: CreditSummary, currency: str, rounding: str) -> dict:
    """The credits section: per grant and in total, opening + added - used - expired - rolled
    over = remaining, and what the used and remaining credits cost when they were bought."""
    n = fmt_units
    rolled = any(g.rolled_over for g in summary.grants)
    rows = [{"label": _grant_label(g), "granted_on": g.granted_at.date().isoformat(), "expires": _day(g.expires_at),
             "opening": n(g.opening), "granted": n(g.granted), "used": n(g.used), "expired": n(g.expired),
             "rolled_over": n(g.rolled_over), "closing": n(g.closing)} for g in summary.grants]
    total = {c: n(summary.total(c)) for c in ("opening", "granted", "used", "expired", "rolled_over", "closing")}
    used_value = summary.value_minor("used", currency, rounding)
    closing_value = summary.value_minor("closing", currency, rounding)
    return {"rows": rows, "total": total, "rolled": rolled,
            "used_value": money_text(used_value, currency) if used_value or closing_value else "",
            "closing_value": money_text(closing_value, currency) if used_value or closing_value else ""}


def invoice_html(invoice: Invoice, customer: dict, seller: dict, rounding: str, run_id: str, *,
                 credits: CreditSummary | None = None, draft: Draft | None = None) -> str:
    """The document a customer receives for `invoice` (an invoice, credit note or debit note).

    `credits`: the customer's wallet over the invoice's period (see credits.credit_summaries);
    without it the credits section is left out. The due date is the invoice's `due_on`; the
    payment instructions (seller.yaml's `payment`) are printed on what the customer pays.
    `draft`: a preview of an open period's invoice, not the document itself: marked DRAFT in
    its title, a banner and a watermark, dated "as of" instead of issued, and paid by the
    number the close will give it (see flows/preview.py)."""
    currency = invoice.currency
    note = invoice.kind != "invoice"
    due_on = invoice.due_on
    payment = (seller.get("payment") or []) if invoice.kind != "credit_note" else []
    return compiled_template(TEMPLATES[invoice.kind]).render(
        title=f"Draft {TITLES[invoice.kind].lower()}" if draft else TITLES[invoice.kind],
        draft={"note": draft.note, "source": draft.source} if draft else None,
        number_label="Draft id" if draft else f"{TITLES[invoice.kind]} number",
        issued_label="As of" if draft else "Issued",
        payment_reference=DRAFT_PAYMENT_REFERENCE if draft else invoice.invoice_id,
        invoice=invoice,
        customer=customer,
        seller=seller,
        period_text=_period_text(invoice.period),
        issued_on=invoice.issued_on.isoformat(),
        service_first_day=invoice.service_start.isoformat(),
        service_last_day=(invoice.service_end - timedelta(days=1)).isoformat(),
        due_on=due_on.isoformat() if due_on else "",
        groups=[] if note else line_groups(invoice),
        adjustments=[_adjustment_view(no, line, currency) for no, line in enumerate(invoice.lines, start=1)
                     if line.kind not in TAX_LINE_KINDS] if note else [],
        tax=tax_view(invoice),
        payment=payment,
        credits=credits_view(credits, currency, rounding) if credits is not None and not note else None,
        total_label=TOTAL_LABELS[invoice.kind],
        total=money_text(invoice.total_minor, currency),
        rounding=rounding.replace("_", " "),
        run_id=run_id,
    )
