"""The built-in tax provider: rules from the store's `tax/rules.yaml`.

    seller:
      country: NL                          # where the seller is established
      registrations: [NL, EU-OSS, US-CA]   # where it collects tax: a country, COUNTRY-REGION (a US
                                           # state), or EU-OSS (the EU One-Stop-Shop: B2C in every
                                           # member state)
    rates:                                 # percent, by the customer's country (and region)
      - {country: NL, rate: "21"}
      - {country: NL, category: reduced, rate: "9"}
      - {country: US, region: CA, rate: "7.25", label: Sales tax}
    categories:                            # product tax categories where rates differ (default: standard)
      - {plan: images, category: reduced}  # a plan, or one meter of a plan: {plan: api, meter: x, ...}

What it covers, exactly:
- a customer marked `tax_exempt`: 0%, with the exemption mentioned;
- an EU customer with a valid-looking VAT ID of its own member state, other than the seller's
  country, when the seller is registered in the EU: 0%, reverse charge (Article 196);
- otherwise a customer in the seller's country or in any member state under EU-OSS (B2C), or in
  a country or region where the seller is registered: the customer's country (and region) rate;
- anywhere else, no tax (the seller has no registration there).
A registered place without a rate for a line's category is an error, never 0%.
"""
from __future__ import annotations

import re
from decimal import Decimal
from functools import lru_cache
from typing import Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from stdnum.eu import vat

from transforms.errors import InputError
from transforms.layout import RULES_KEY
from transforms.tax import EXEMPT, REVERSE_CHARGE, Party, TaxableLine, TaxLine, rate_text, tax_line

EU = frozenset(code.upper() for code in vat.MEMBER_STATES if code != "xi")
OSS = "EU-OSS"
COUNTRY = re.compile(r"^[A-Z]{2}$")
PLACE = re.compile(r"^([A-Z]{2}(-[A-Z0-9]{1,3})?|EU-OSS)$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Seller(_Strict):
    country: str
    registrations: list[str] = Field(default_factory=list)

    @field_validator("country")
    @classmethod
    def _country(cls, value: str) -> str:
        if not COUNTRY.match(value):
            raise ValueError(f"{value!r} is not a two-letter country code (ISO 3166, e.g. NL, US)")
        return value

    @field_validator("registrations")
    @classmethod
    def _places(cls, value: list[str]) -> list[str]:
        for place in value:
            if not PLACE.match(place):
                raise ValueError(f"{place!r} is not a country (NL), a country and region (US-CA) or EU-OSS")
        return value


class Rate(_Strict):
    country: str
    region: str | None = None
    category: str = "standard"
    rate: Decimal
    label: str | None = None

    @field_validator("rate", mode="before")
    @classmethod
    def _quoted(cls, value):
        if not isinstance(value, str):
            raise ValueError('rates are quoted decimal strings (rate: "21"), never floats')
        return value

    @field_validator("rate")
    @classmethod
    def _percent(cls, value: Decimal) -> Decimal:
        if not value.is_finite() or value < 0 or value >= 100:
            raise ValueError("a rate is a percent from 0 up to 100")
        return value


class Category(_Strict):
    plan: str
    meter: str | None = None
    category: str


class Rules(_Strict):
    seller: Seller
    rates: list[Rate] = Field(default_factory=list)
    categories: list[Category] = Field(default_factory=list)


def load_rules(text: str, source: str = RULES_KEY) -> "RulesProvider":
    """The rules file checked on load; a mistake is one line naming the file and the field."""
    try:
        data = yaml.safe_load(text)
        rules = Rules.model_validate(data)
    except yaml.YAMLError as exc:
        raise InputError(f"{source}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise InputError(f"{source}, {where or 'top level'}: {err['msg']}") from None
    keys = [(r.country, r.region, r.category) for r in rules.rates]
    twice = next((k for k in keys if keys.count(k) > 1), None)
    if twice:
        raise InputError(f"{source}, rates: country {twice[0]} region {twice[1] or '-'} category {twice[2]} "
                         f"has two rates; keep one")
    return RulesProvider(rules, source)


@lru_cache(maxsize=65536)
def valid_vat_id(tax_id: str | None, country: str) -> bool:
    """A VAT ID that looks valid (format and check digits) and belongs to `country`."""
    if not tax_id:
        return False
    number = vat.compact(tax_id)
    prefix = "EL" if country == "GR" else country
    return number.upper().startswith(prefix) and vat.is_valid(number)


def default_label(country: str) -> str:
    return "VAT" if country in EU else "Sales tax" if country == "US" else "Tax"


class RulesProvider:
    """TaxProvider over a rules file (see the module docstring)."""

    def __init__(self, rules: Rules, source: str = RULES_KEY):
        self.rules = rules
        self.source = source
        self.rates = {(r.country, r.region, r.category): r for r in rules.rates}
        self.categories = {(c.plan, c.meter): c.category for c in rules.categories}
        self.registrations = frozenset(rules.seller.registrations)

    @property
    def country(self) -> str:
        return self.rules.seller.country

    def _category(self, line: TaxableLine) -> str:
        return (self.categories.get((line.plan, line.meter)) or self.categories.get((line.plan, None))
                or "standard")

    def _rate(self, country: str, region: str | None, category: str) -> Rate:
        for key in ((country, region, category), (country, None, category)):
            if key in self.rates:
                return self.rates[key]
        place = f"{country}-{region}" if region else country
        raise InputError(f"{self.source}, rates: no rate for {place}, category {category} (the seller is "
                         f"registered to collect tax there); add {{country: {country}"
                         f"{', region: ' + region if region else ''}, category: {category}, rate: \"...\"}}")

    def _treatment(self, customer: Party) -> str | None:
        """`reverse_charge`, `taxable` or None (no tax: the seller is not registered there)."""
        country, seller = customer.country, self.rules.seller
        eu_registered = any(p in EU or p == OSS for p in self.registrations)
        if country in EU and eu_registered and country != seller.country and valid_vat_id(customer.tax_id, country):
            return "reverse_charge"
        if country in EU and country != seller.country and OSS in self.registrations:
            return "taxable"  # B2C at the customer's country rate (EU One-Stop-Shop)
        if country in self.registrations or (customer.region and f"{country}-{customer.region}" in self.registrations):
            return "taxable"
        if country == seller.country and (country in self.registrations or country in EU and OSS in self.registrations):
            return "taxable"
        return None

    def tax_lines(self, lines: Sequence[TaxableLine], seller: Party, customer: Party, currency: str,
                  rounding: str) -> list[TaxLine]:
        if not lines or customer.country is None:
            return []
        treatment = self._treatment(customer)
        if treatment is None:
            return []
        country, region = customer.country, customer.region
        groups: dict[tuple, list[TaxableLine]] = {}
        for line in lines:
            rate = self._rate(country, region, self._category(line))
            label = rate.label or default_label(country)
            if customer.tax_exempt:
                key = (label, Decimal(0), line.inclusive, EXEMPT)
            elif treatment == "reverse_charge":
                key = (label, Decimal(0), line.inclusive, REVERSE_CHARGE)
            else:
                key = (label, rate.rate, line.inclusive, None)
            groups.setdefault(key, []).append(line)
        regional = region is not None and any(k[:2] == (country, region) for k in self.rates)
        place = f"{country}-{region}" if regional else country
        out = []
        for (label, rate, inclusive, note), taxed in sorted(groups.items(), key=lambda kv: (-kv[0][1], kv[0][2])):
            suffix = ", reverse charge" if note == REVERSE_CHARGE else ", exempt" if note == EXEMPT else ""
            out.append(tax_line(f"{label} {rate_text(rate)}% ({place}){suffix}", rate,
                                sum(line.amount_minor for line in taxed), inclusive, currency, rounding, note,
                                tuple(line.line_no for line in taxed)))
        return out
