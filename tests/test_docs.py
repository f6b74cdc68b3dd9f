"""The documentation in docs/ holds true against the code, so it cannot rot.

- docs/plans.md: every YAML block is a plan file the loader accepts, and every worked-example
  table (`| subscription | usage in 2026-10 | invoice total |`) is rated with billrun's own
  invoice code (segments, fixed fees, allowances, charge models, caps, commitments, rounding).
- docs/outputs.md: its data dictionary is the one generated from transforms/schema/outputs.yaml.
- docs/inputs.md: every quarantine reason the code can emit is documented, and only those.
- docs/exit-codes.md and the other pages: every page the index and README link exists.
"""
from __future__ import annotations

import json
import os
import re
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest

from transforms.invoices import SegmentUsage, period_invoices
from transforms.money import from_minor
from transforms.periods import Period
from transforms.plans import Catalog, parse_plan
from transforms.reference import Subscription, segments_in

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
UPDATE = os.environ.get("BILLRUN_UPDATE_DOCS") == "1"

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(text: str, language: str) -> list[tuple[int, str]]:
    """(offset, body) of every fenced block in `language`."""
    return [(m.start(), m.group(2)) for m in FENCE.finditer(text) if m.group(1) == language]


# -- docs/plans.md ------------------------------------------------------------------------------

PLANS_MD = DOCS / "plans.md"
EXAMPLE_HEADER = "| subscription | usage in 2026-10 | invoice total |"
PERIOD = Period.parse("2026-10")


def worked_tables(text: str) -> list[tuple[list[str], list[tuple[str, str, str]]]]:
    """Each worked-example table with the plan files it rates: the YAML blocks above it in its
    section, after the previous table (so the two versions of a plan make one catalog)."""
    out = []
    for section in re.split(r"^#{2,4} ", text, flags=re.M):
        files: list[str] = []
        lines = section.splitlines(keepends=True)
        i = 0
        while i < len(lines):
            if lines[i].startswith("```yaml"):
                j = next(k for k in range(i + 1, len(lines)) if lines[k].startswith("```"))
                files.append("".join(lines[i + 1:j]))
                i = j + 1
                continue
            if lines[i].strip() == EXAMPLE_HEADER:
                rows = []
                for row in lines[i + 2:]:
                    if not row.startswith("|"):
                        break
                    cells = [c.strip() for c in row.strip().strip("|").split("|")]
                    rows.append((cells[0], cells[1], cells[2]))
                assert files, f"a worked example without a plan file above it: {rows[0]}"
                out.append((files, rows))
                files = []
            i += 1
    return out


def number(text: str) -> Decimal:
    return Decimal(text.replace(",", "").replace("$", "").replace("€", "").strip())


USAGE_TERM = re.compile(r"^(?P<meter>[A-Za-z_][\w.-]*)(\{(?P<dims>[^}]*)\})?:\s*(?P<events>.+)$")


def parsed_usage(cell: str) -> list[tuple[str, dict, Decimal, date]]:
    """`meter{dim: value}: 50 + 5 @2026-10-20; other: 3` -> events (meter, dims, quantity, day),
    in event-time order. Each `+` term is one event; without `@day` an event falls on the 2nd."""
    cell = cell.strip().strip("`")
    if cell in ("", "none", "(none)"):
        return []
    out = []
    for part in cell.split(";"):
        match = USAGE_TERM.match(part.strip().strip("`"))
        assert match, f"cannot read usage {part!r}"
        dims = dict(pair.split(":", 1) for pair in match["dims"].split(",")) if match["dims"] else {}
        dims = {k.strip(): v.strip() for k, v in dims.items()}
        for term in match["events"].split("+"):
            quantity, _, day = term.partition("@")
            out.append((match["meter"], dims, number(quantity), date.fromisoformat(day.strip()) if day else date(2026, 10, 2)))
    return out


def subscription_of(cell: str, plan: str) -> Subscription:
    """`all month`, `from 2026-10-11`, optionally `, pinned to version 1`."""
    start = date(2026, 10, 1)
    found = re.search(r"from (\d{4}-\d{2}-\d{2})", cell)
    if found:
        start = date.fromisoformat(found.group(1))
    else:
        assert "all month" in cell, f"cannot read subscription {cell!r}"
    pinned = re.search(r"pinned to version (\d+)", cell)
    return Subscription("sub_1", "cus_1", plan, int(pinned.group(1)) if pinned else None, start, None, None, None, 1)


def invoice_total(catalog: Catalog, plan: str, subscription: str, usage: str) -> Decimal:
    sub = subscription_of(subscription, plan)
    segments = segments_in(PERIOD, [sub], catalog)
    by_segment: dict[tuple, SegmentUsage] = {}
    for seg in segments:
        mine = [e for e in parsed_usage(usage) if seg.start_at.date() <= e[3] < seg.end_at.date()]
        totals: dict[tuple, list] = {}
        for meter, dims, quantity, _ in mine:
            key = (meter, json.dumps(dims, sort_keys=True, separators=(",", ":")))
            acc = totals.setdefault(key, [Decimal(0), 0])
            acc[0] += quantity
            acc[1] += 1
        by_segment[(sub.subscription_id, seg.segment_no)] = SegmentUsage(
            tuple((m, d, u, n) for (m, d), (u, n) in totals.items()),
            tuple((m, json.dumps(dims, sort_keys=True, separators=(",", ":")), q) for m, dims, q, _ in mine))
    (invoice,) = period_invoices(PERIOD, segments, by_segment)
    return from_minor(invoice.total_minor, invoice.currency)


def test_every_yaml_block_of_the_plan_reference_is_a_plan_file_billrun_accepts():
    found = [body for _, body in blocks(PLANS_MD.read_text(encoding="utf-8"), "yaml")]
    assert len(found) >= 10
    for i, body in enumerate(found):
        parse_plan(body, f"docs/plans.md yaml block {i + 1}")


def test_every_charge_model_has_a_worked_example():
    from transforms.pricing import PRICE_MODELS

    text = PLANS_MD.read_text(encoding="utf-8")
    for model in PRICE_MODELS:
        assert re.search(rf"^#+ .*`{model}`", text, re.M), f"docs/plans.md has no section for {model}"
        assert f"model: {model}" in text, f"docs/plans.md has no example of {model}"


def worked_examples() -> list:
    cases = []
    for files, rows in worked_tables(PLANS_MD.read_text(encoding="utf-8")):
        plans = [parse_plan(body, "docs/plans.md") for body in files]
        assert all(p.plan.credits is None for p in plans), "credit wallets are not rated by this check"
        for subscription, usage, total in rows:
            cases.append(pytest.param(plans, subscription, usage, total, id=f"{plans[0].plan.plan}: {usage} = {total}"))
    return cases


@pytest.mark.parametrize("plans, subscription, usage, total", worked_examples())
def test_worked_example_is_what_billrun_bills(plans, subscription, usage, total):
    catalog = Catalog.from_files(plans)
    assert invoice_total(catalog, plans[0].plan.plan, subscription, usage) == number(total)


def test_the_worked_examples_reader_reads_what_the_page_says():
    assert parsed_usage("`input_tokens{model: gpt-4o, region: eu}: 1,500 + 2 @2026-10-20`") == [
        ("input_tokens", {"model": "gpt-4o", "region": "eu"}, Decimal(1500), date(2026, 10, 2)),
        ("input_tokens", {"model": "gpt-4o", "region": "eu"}, Decimal(2), date(2026, 10, 20))]
    assert subscription_of("from 2026-09-01, pinned to version 1", "api").plan_version == 1
    assert len(worked_examples()) >= 20
