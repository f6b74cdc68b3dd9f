"""Plan files: typed, checked on load, resolved to the version a subscription is bound to.

One YAML file per (plan, version). `load_catalog` reads every file with YAML's safe loader,
checks it with pydantic and then across files (no two versions of a plan share a number or an
`effective_from`), and fails with one line that names the file, the field and the fix.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Literal

import isodate
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from transforms.errors import BillrunError
from transforms.money import is_known_currency
from transforms.pricing import PRICE_MODELS, Money, Price, Units

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")


class PlanError(BillrunError):
    """A plan file that billrun refuses; the message is the one line the user sees."""


def _identifier(value: str) -> str:
    # Meter and dimension names travel into queries as bound values and into invoices as text;
    # keeping them to plain identifiers means a plan file can never smuggle in anything else.
    if not IDENTIFIER.match(value):
        raise ValueError(f"{value!r} is not a plain name (letters, digits, _ . -; starting with a letter)")
    return value


def _currency(value: str) -> str:
    if not is_known_currency(value):
        raise ValueError(f"{value!r} is not an ISO 4217 currency code (e.g. USD, EUR, JPY)")
    return value


Identifier = Annotated[str, AfterValidator(_identifier)]
Currency = Annotated[str, AfterValidator(_currency)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FixedFee(Strict):
    name: str
    amount: Money

    @model_validator(mode="after")
    def _non_negative(self):
        if self.amount < 0:
            raise ValueError("amount must not be negative (use a credit note for refunds)")
        return self


class Charge(Strict):
    """One priced meter. With `included` it is an allowance + overage charge: the first
    `included` units of the period are free and the rest bill as `overage` lines."""

    name: str | None = None
    meter: Identifier
    filter: dict[Identifier, str] = Field(default_factory=dict)
    group_by: list[Identifier] = Field(default_factory=list)
    included: Units = Decimal(0)
    price: Price

    @model_validator(mode="after")
    def _check(self):
        if self.included < 0:
            raise ValueError("included must not be negative")
        if len(set(self.group_by)) != len(self.group_by):
            raise ValueError("group_by names a dimension twice")
        if self.included > 0 and self.group_by:
            raise ValueError("included with group_by is ambiguous (whose allowance is it?); split the "
                             "charge into one charge per value with filter")
        clash = set(self.group_by) & set(self.filter)
        if clash:
            raise ValueError(f"group_by and filter both name {sorted(clash)}: a filtered dimension has one value")
        return self

    @property
    def title(self) -> str:
        return self.name or self.meter

    def prices(self, meter: str, dims: dict[str, str]) -> bool:
        """Whether this charge bills an event of `meter` with dimensions `dims`."""
        return meter == self.meter and all(dims.get(k) == v for k, v in self.filter.items())

    def overlaps(self, other: "Charge") -> bool:
        """Whether one event could be billed by both charges: same meter, and no dimension that
        both filter on with different values."""
        return self.meter == other.meter and all(
            self.filter[k] == other.filter[k] for k in set(self.filter) & set(other.filter))


class Commitment(Strict):
    minimum: Money


class SpendControls(Strict):
    budget: Money | None = None
    alerts: list[Decimal] = Field(default_factory=lambda: [Decimal("0.5"), Decimal("0.8"), Decimal("1.0")])
    hard_cap: Money | None = None

    @field_validator("budget", "hard_cap")
    @classmethod
    def _positive(cls, value, info):
        if value is not None and value <= 0:
            raise ValueError(f"must be a positive amount (leave {info.field_name} out for none)")
        return value

    @model_validator(mode="after")
    def _check(self):
        if any(a <= 0 for a in self.alerts):
            raise ValueError("alerts are fractions of the budget above 0, e.g. [0.5, 0.8, 1.0]")
        if len(set(self.alerts)) != len(self.alerts):
            raise ValueError("alerts names a threshold twice")
        return self


def _expiry(value: str) -> str:
    if value in ("period_end", "never"):
        return value
    try:
        duration = isodate.parse_duration(value)
    except (isodate.ISO8601Error, ValueError):
        raise ValueError(f"{value!r} is not period_end, never or an ISO 8601 duration such as P90D") from None
    if not isinstance(duration, timedelta) or duration <= timedelta(0):
        raise ValueError(f"{value!r}: give a positive duration in days or hours (P90D, PT12H), not months or years")
    return value


Expiry = Annotated[str, AfterValidator(_expiry)]


class Grant(Strict):
    """Credits granted by the plan: at every period start (`every: period`, or at the
    subscription's start if it starts mid-period) or once at subscription start."""

    credits: Units
    every: Literal["period", "once"] = "period"
    expires: Expiry = "period_end"
    # The part of the plan's fixed fees that pays for these credits: it becomes their cost basis
    # (deferred, then recognized as the credits are used or expire) instead of fixed-fee revenue.
    allocated: Money = Decimal(0)
    # Unused credits of an expiring grant carried into the next period, up to this many.
    rollover_max: Units = Decimal(0)

    @model_validator(mode="after")
    def _check(self):
        if self.credits <= 0:
            raise ValueError("credits must be positive")
        if self.allocated < 0 or self.rollover_max < 0:
            raise ValueError("allocated and rollover_max must not be negative")
        if self.rollover_max > 0 and self.expires != "period_end":
            raise ValueError("rollover_max only applies to grants that expire at period_end")
        return self


class TopUp(Strict):
    """A pack of credits bought when the balance falls below `below` (auto) at `price`. As many
    packs as the history needs are bought; `max_per_period` (none by default) caps the automatic
    packs of one period, and the replay alerts `top_up_limit_reached` when the cap keeps one back."""

    credits: Units
    price: Money
    auto: bool = False
    below: Units = Decimal(0)
    max_per_period: int | None = Field(default=None, ge=1)
    expires: Expiry = "never"

    @model_validator(mode="after")
    def _check(self):
        if self.credits <= 0 or self.price < 0:
            raise ValueError("a top-up pack needs positive credits and a price of at least 0")
        if self.auto and self.below <= 0:
            raise ValueError("auto top-up needs `below`: the balance under which a pack is bought")
        return self


class ConsumeByDimension(Strict):
    """Credits per unit that depend on a dimension, e.g. {by: model, rates: {gpt-4o: 2}, default: 1}."""

    by: Identifier
    rates: dict[str, Units]
    default: Units | None = None


class Credits(Strict):
    """A credit wallet. `unit: credits` draws `consume` credits per unit of a meter; `unit: money`
    is a prepaid balance in the plan's currency that each event draws by its rated amount (its
    meters must have standard prices)."""

    unit: Literal["credits", "money"] = "credits"
    grants: list[Grant] = Field(default_factory=list)
    consume: dict[Identifier, Units | ConsumeByDimension] = Field(default_factory=dict)
    top_up: TopUp | None = None
    when_exhausted: Literal["overage", "block"] = "overage"
    grace: Units = Decimal(0)
    low_balance: Units | None = None
    breakage: Literal["at_expiry", "proportional"] = "at_expiry"
    expected_breakage: Decimal | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.grace < 0:
            raise ValueError("grace must not be negative")
        if self.breakage == "proportional" and not (self.expected_breakage is not None
                                                    and 0 <= self.expected_breakage < 1):
            raise ValueError("breakage: proportional needs expected_breakage, a fraction in [0, 1)")
        return self


class Plan(Strict):
    plan: Identifier
    version: int = Field(ge=1, strict=True)
    effective_from: date
    migrate_existing_on: date | None = None
    notice_days: int | None = Field(default=None, ge=0)
    currency: Currency
    rounding: Literal["half_up", "half_even"] = "half_up"
    tax_inclusive: bool = False  # prices contain tax; the tax is backed out of them (transforms.tax)
    description: str | None = None
    fixed_fees: list[FixedFee] = Field(default_factory=list)
    charges: list[Charge] = Field(default_factory=list)
    commitment: Commitment | None = None
    credits: Credits | None = None
    spend_controls: SpendControls | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.credits is not None:
            self._check_credits(self.credits)
        if self.migrate_existing_on is not None and self.migrate_existing_on < self.effective_from:
            raise ValueError("migrate_existing_on is before effective_from: existing subscriptions "
                             "cannot move to a version before it exists")
        for i, charge in enumerate(self.charges):
            for j in range(i):
                if charge.overlaps(self.charges[j]):
                    raise ValueError(
                        f"charges[{i}] and charges[{j}] could both bill one {charge.meter} event; give them "
                        f"filters on a common dimension with different values")
        return self

    def _check_credits(self, credits: Credits) -> None:
        priced = {c.meter for c in self.charges}
        meters = set(credits.consume) if credits.unit == "credits" else priced
        if credits.unit == "money":
            if credits.consume:
                raise ValueError("credits.consume: a money wallet draws each event's rated amount; "
                                 "leave consume out")
            for i, charge in enumerate(self.charges):
                if charge.price.model != "standard" or charge.included > 0:
                    raise ValueError(f"charges[{i}]: a money wallet draws per event, so its meters need "
                                     f"standard prices without included units")
        elif not credits.consume:
            raise ValueError("credits.consume: name the meters credits pay for, e.g. {images: 1}")
        if credits.when_exhausted == "overage":
            unpriced = sorted(meters - priced)
            if unpriced:
                raise ValueError(f"credits.when_exhausted: overage bills uncovered units by the charges, but "
                                 f"no charge prices {unpriced}; add charges or use block")
        for i, charge in enumerate(self.charges):
            if charge.meter in meters and (charge.included > 0 or charge.price.model == "percentage"):
                raise ValueError(f"charges[{i}]: a meter paid with credits cannot also have an allowance or a "
                                 f"percentage price")
        allocated = sum((g.allocated for g in credits.grants), Decimal(0))
        if allocated > sum((f.amount for f in self.fixed_fees), Decimal(0)):
            raise ValueError("credits.grants: allocated adds up to more than the plan's fixed fees")

    def consumes(self, meter: str) -> bool:
        """Whether events of `meter` draw credits under this plan."""
        if self.credits is None:
            return False
        if self.credits.unit == "money":
            return any(c.meter == meter for c in self.charges)
        return meter in self.credits.consume


@dataclass(frozen=True)
class PlanFile:
    """A checked plan version and where it came from (for errors, manifests and drift checks)."""

    plan: Plan
    path: str
    sha256: str

    @property
    def key(self) -> tuple[str, int]:
        return (self.plan.plan, self.plan.version)

    def manifest_entry(self) -> dict:
        """How manifests name the file: plan, version, file name and sha256."""
        return {"plan": self.plan.plan, "version": self.plan.version, "file": Path(self.path).name,
                "sha256": self.sha256}


def _format_location(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in PRICE_TAGS:
            continue  # pydantic's union tag (`standard`), not a field the user wrote
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


PRICE_TAGS = set(PRICE_MODELS)


class _PlanLoader(yaml.SafeLoader):
    """YAML's safe loader (no tags that build objects) that also refuses a key written twice,
    which plain YAML resolves silently in favour of the last: two `unit_price` keys are a typo
    to fix, not a price to guess."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_timestamp(self, node):
        # PyYAML builds dates itself and raises a bare ValueError on 2026-09-31; say where.
        try:
            return super().construct_yaml_timestamp(node)
        except ValueError as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value!r} is not a date ({exc})", node.start_mark) from None


_PlanLoader.add_constructor("tag:yaml.org,2002:timestamp", _PlanLoader.construct_yaml_timestamp)


def parse_plan(text: str, path: str) -> PlanFile:
    """Check one plan file's text; `path` is only used to say where an error is."""
    try:
        raw = yaml.load(text, Loader=_PlanLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise PlanError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except (ValueError, TypeError) as exc:  # any other value PyYAML fails to build
        raise PlanError(f"{path}: a value cannot be read ({exc})") from None
    if not isinstance(raw, dict):
        raise PlanError(f"{path}: a plan file must be a mapping with plan, version, currency, ...")
    try:
        plan = Plan.model_validate(raw)
    except ValidationError as exc:
        # An unknown field first: a typo (`unit_prise`) also makes its real field "missing",
        # and the typo is the thing to fix.
        err = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling against the plan reference, docs/plans.md)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] == "union_tag_invalid":
            msg = f"unknown price model {err['input'].get('model')!r}; use one of {sorted(PRICE_TAGS)}" \
                if isinstance(err.get("input"), dict) else msg
        raise PlanError(f"{path}: {_format_location(err['loc'])}: {msg}{more}") from None
    return PlanFile(plan, path, hashlib.sha256(text.encode()).hexdigest())


def load_catalog(plans_dir: str | Path) -> "Catalog":
    """Every `*.yaml` under `plans_dir`, checked alone and together."""
    root = Path(plans_dir)
    if not root.is_dir():
        raise PlanError(f"{root}: plans folder not found (pass --plans DIR)")
    files = [parse_plan(p.read_text(encoding="utf-8"), str(p))
             for p in sorted(root.glob("*.yaml")) + sorted(root.glob("*.yml"))]
    if not files:
        raise PlanError(f"{root}: no plan files (*.yaml) found")
    return Catalog.from_files(files)


@dataclass(frozen=True)
class Catalog:
    """All plan versions, by (plan, version)."""

    files: dict[tuple[str, int], PlanFile]

    @classmethod
    def from_files(cls, files: list[PlanFile]) -> "Catalog":
        by_key: dict[tuple[str, int], PlanFile] = {}
        by_start: dict[tuple[str, date], PlanFile] = {}
        for f in files:
            other = by_key.get(f.key)
            if other is not None:
                raise PlanError(f"{f.path}: version: plan {f.plan.plan!r} version {f.plan.version} "
                                f"is also defined in {other.path}; give each version its own number")
            start_key = (f.plan.plan, f.plan.effective_from)
            other = by_start.get(start_key)
            if other is not None:
                raise PlanError(f"{f.path}: effective_from: {f.plan.effective_from} is also the start of "
                                f"{other.path}; two versions of one plan cannot start on the same day")
            by_key[f.key] = f
            by_start[start_key] = f
        for plan_id in {k[0] for k in by_key}:
            versions = sorted((f for f in by_key.values() if f.plan.plan == plan_id), key=lambda f: f.plan.version)
            for older, newer in pairwise(versions):
                if newer.plan.effective_from < older.plan.effective_from:
                    raise PlanError(f"{newer.path}: effective_from: version {newer.plan.version} starts before "
                                    f"version {older.plan.version} ({older.plan.effective_from}); "
                                    f"later versions must start later")
        return cls(by_key)

    def get(self, plan: str, version: int) -> PlanFile | None:
        return self.files.get((plan, version))

    def versions(self, plan: str) -> list[PlanFile]:
        return sorted((f for f in self.files.values() if f.plan.plan == plan), key=lambda f: f.plan.version)

    def in_force_on(self, plan: str, day: date) -> PlanFile | None:
        """The version new subscriptions starting on `day` bind to."""
        candidates = [f for f in self.versions(plan) if f.plan.effective_from <= day]
        return candidates[-1] if candidates else None


def catalog_entries(catalog: Catalog) -> list[dict]:
    """Every plan file loaded (not only those used), in (plan, version) order: a new version of a
    plan can re-bind subscriptions, so drift checks compare the whole catalog."""
    return [f.manifest_entry() for _, f in sorted(catalog.files.items())]


def plan_entries_for(segments) -> list[dict]:
    """The plan files `segments` (transforms.inputs.reference.Segment) bill on, in (plan, version) order."""
    used = {seg.plan.key: seg.plan for seg in segments}
    return [f.manifest_entry() for _, f in sorted(used.items())]
