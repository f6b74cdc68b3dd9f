"""Tax: one small interface between invoices and whatever decides tax.

A provider is given one invoice's taxable lines and its parties (seller and customer) and
returns the invoice's tax lines: per rate, the lines it covers, the taxable base and the tax.
Rating never knows how tax is decided: the built-in provider reads rules from the store's
`tax/rules.yaml` (transforms.tax.rules); an external tax service is another provider with the
same method.

The arithmetic every provider and every correction shares is here, in one place:
- tax is computed per invoice and per rate, on the sum of the (already rounded) lines at that
  rate, and rounded once with the invoice's rounding rule;
- prices are tax-exclusive by default: tax = base x rate;
- a plan with `tax_inclusive: true` prices its lines with tax in them: on the gross sum G of
  those lines, tax = G x rate / (100 + rate), rounded once; the invoice then carries a `tax`
  line of +tax and a `tax_included` line of -tax (the tax backed out of the prices), so the
  lines still sum to G, the subtotal is G - tax and subtotal + tax = total.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Protocol, Sequence

from transforms.engine.invoices import INVOICE_LEVEL_KINDS, TAX_LINE_KINDS, Invoice, Line
from transforms.money import from_minor, to_minor

TAX_KINDS = TAX_LINE_KINDS
"""Lines that carry tax, never taxed themselves and never revenue."""

REVERSE_CHARGE = ("Reverse charge: VAT to be accounted for by the recipient, "
                  "Article 196 Council Directive 2006/112/EC")
EXEMPT = "Exempt: the customer is exempt from tax"


@dataclass(frozen=True)
class Party:
    """Where a seller or customer is for tax: ISO 3166 country, region (a US state, a Canadian
    province) where rates differ within the country, tax ID, exemption."""

    country: str | None = None
    region: str | None = None
    tax_id: str | None = None
    tax_exempt: bool = False


@dataclass(frozen=True)
class TaxableLine:
    """One invoice line as a provider sees it (`line_no` counts from 1 within the invoice)."""

    line_no: int
    kind: str
    plan: str | None
    meter: str | None
    amount_minor: int
    inclusive: bool = False


@dataclass(frozen=True)
class TaxLine:
    """One rate of one invoice: `base_minor` is the taxable amount net of tax, `amount_minor`
    the tax, `line_nos` the lines taxed at this rate. `note` is a legal mention printed on the
    document (reverse charge, exemption)."""

    label: str
    rate: Decimal
    base_minor: int
    amount_minor: int
    inclusive: bool = False
    note: str | None = None
    line_nos: tuple[int, ...] = ()


class TaxProvider(Protocol):
    def tax_lines(self, lines: Sequence[TaxableLine], seller: Party, customer: Party, currency: str,
                  rounding: str) -> list[TaxLine]:
        """The tax lines of one invoice; an empty list when nothing is taxed."""


def tax_line(label: str, rate: Decimal, amount_minor: int, inclusive: bool, currency: str, rounding: str,
             note: str | None = None, line_nos: tuple[int, ...] = ()) -> TaxLine:
    """The tax at `rate` (a percent) on lines summing to `amount_minor`: exclusive prices are
    the base; inclusive prices are gross, and the tax comes out of them. Rounded once."""
    amount = from_minor(amount_minor, currency)
    if inclusive:
        tax = to_minor(amount * rate / (100 + rate), currency, rounding)
        return TaxLine(label, rate, amount_minor - tax, tax, True, note, line_nos)
    return TaxLine(label, rate, amount_minor, to_minor(amount * rate / 100, currency, rounding), False, note,
                   line_nos)


def rate_text(rate: Decimal) -> str:
    text = format(rate.normalize(), "f")
    return text if text != "-0" else "0"


def tax_document_lines(tax: TaxLine) -> list[Line]:
    """The invoice lines that carry one rate: a `tax` line, and for inclusive prices the
    `tax_included` line that backs the same amount out of the prices."""
    out = [Line(kind="tax", description=tax.label, quantity=Decimal(1), amount_minor=tax.amount_minor,
                tax_rate=tax.rate, taxable_base_minor=tax.base_minor,
                tax_note=tax.note, tax_inclusive=tax.inclusive)]
    if tax.inclusive:
        out.append(Line(kind="tax_included", description=f"{tax.label}, included in the prices above",
                        quantity=Decimal(1), amount_minor=-tax.amount_minor, tax_rate=tax.rate,
                        taxable_base_minor=tax.base_minor, tax_note=tax.note, tax_inclusive=True))
    return out


def _with_rate(line: Line, rate: Decimal, inclusive: bool) -> Line:
    """`line` marked with the rate it is taxed at: a shallow copy with two fields set, at a
    third of dataclasses.replace's cost (it rebuilds every field; a close marks a million lines)."""
    new = copy.copy(line)
    object.__setattr__(new, "tax_rate", rate)
    object.__setattr__(new, "tax_inclusive", inclusive)
    return new


def invoice_with_tax(invoice: Invoice, taxes: list[TaxLine]) -> Invoice:
    """`invoice` with its tax lines appended and each taxed line marked with its rate."""
    if not taxes:
        return invoice
    rate_of = {no: (t.rate, t.inclusive) for t in taxes for no in t.line_nos}
    lines = [_with_rate(line, *rate_of[no]) if no in rate_of else line
             for no, line in enumerate(invoice.lines, start=1)]
    for tax in taxes:
        lines += tax_document_lines(tax)
    return replace(invoice, lines=tuple(lines))


def taxable_lines(invoice: Invoice, inclusive_plans: frozenset[tuple[str, int]], last_plan: tuple[str, int] | None
                  ) -> list[TaxableLine]:
    """The invoice's lines a provider taxes. A line is priced with tax in it when its plan
    version says `tax_inclusive: true`; invoice-level lines (cap waiver, commitment true-up)
    follow the plan of the invoice's last segment; credit packs, top-ups and adjustments are
    always priced without tax, and an adjustment with `taxable: false` is not taxed at all."""
    out = []
    for no, line in enumerate(invoice.lines, start=1):
        if line.kind in TAX_KINDS or line.taxable is False:  # an adjustment marked outside tax
            continue
        if line.plan is not None:
            key = (line.plan, line.plan_version)
        elif line.kind in INVOICE_LEVEL_KINDS:
            key = last_plan
        else:
            key = None
        out.append(TaxableLine(no, line.kind, line.plan or (last_plan[0] if last_plan else None), line.meter,
                               line.amount_minor, key in inclusive_plans))
    return out


def taxed_invoices(invoices: list[Invoice], provider: TaxProvider, seller: Party, parties: dict[str, Party],
                   inclusive_plans: frozenset[tuple[str, int]], last_plan_of: dict[str, tuple[str, int]],
                   rounding_of: dict[str, str]) -> list[Invoice]:
    """Every invoice through `provider`: its tax lines appended (see invoice_with_tax)."""
    out = []
    for inv in invoices:
        lines = taxable_lines(inv, inclusive_plans, last_plan_of.get(inv.subscription_id))
        taxes = provider.tax_lines(lines, seller, parties.get(inv.customer_id, Party()), inv.currency,
                                   rounding_of.get(inv.subscription_id, "half_up"))
        out.append(invoice_with_tax(inv, taxes))
    return out


def customer_parties(customers) -> dict[str, Party]:
    """Customer id -> Party, from the checked customers table (transforms.inputs.reference)."""
    return {row["customer_id"]: Party(row.get("country"), row.get("region"), row.get("tax_id"),
                                      (row.get("tax_exempt") or "false") in ("true", "yes", "1"))
            for row in customers.iter_rows(named=True)}
