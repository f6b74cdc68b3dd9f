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

from transforms.engine.invoices import SegmentUsage, period_invoices
from transforms.inputs.plans import Catalog, parse_plan
from transforms.inputs.reference import Subscription, segments_in
from transforms.money import from_minor
from transforms.periods import Period

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
            out.append((match["meter"], dims, number(quantity),
                        date.fromisoformat(day.strip()) if day else date(2026, 10, 2)))
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


# -- docs/outputs.md ----------------------------------------------------------------------------

OUTPUTS_MD = DOCS / "outputs.md"
GENERATED = re.compile(r"(<!-- generated from transforms/schema/outputs.yaml[^>]*-->\n)"
                       r"(.*?)(<!-- end of generated tables -->)", re.S)


def test_the_data_dictionary_is_the_one_the_schema_file_generates():
    from transforms.schema import data_dictionary

    text = OUTPUTS_MD.read_text(encoding="utf-8")
    match = GENERATED.search(text)
    assert match, "docs/outputs.md lost its generated-tables markers"
    wanted = "\n" + data_dictionary() + "\n"
    if UPDATE:
        OUTPUTS_MD.write_text(text[:match.start(2)] + wanted + text[match.end(2):], encoding="utf-8")
        return
    assert match.group(2) == wanted, ("docs/outputs.md is out of date with transforms/schema/outputs.yaml; "
                                      "regenerate it with BILLRUN_UPDATE_DOCS=1 pytest tests/test_docs.py")


def test_every_table_and_column_of_the_schema_is_in_the_data_dictionary_and_only_those():
    from transforms.schema import output_tables

    text = OUTPUTS_MD.read_text(encoding="utf-8").split("<!-- end of generated tables -->")[0]
    documented: dict[str, list[str]] = {}
    for section in re.split(r"^### ", text, flags=re.M)[1:]:
        name = section.split("\n", 1)[0].strip()
        documented[name] = re.findall(r"^\| `([^`]+)` \| `", section, flags=re.M)
    schema = {name: [c.name for c in spec.columns] for name, spec in output_tables().items()}
    assert documented == schema


# -- docs/inputs.md -----------------------------------------------------------------------------

INPUTS_MD = DOCS / "inputs.md"


def input_example(header_starts: str, language: str = "csv") -> str:
    found = [body for _, body in blocks(INPUTS_MD.read_text(encoding="utf-8"), language)
             if body.startswith(header_starts)]
    assert len(found) == 1, f"docs/inputs.md: expected one {language} example starting {header_starts!r}"
    return found[0]


def test_the_usage_examples_are_valid_rows_and_the_quantity_forms_parse():
    import polars as pl

    from transforms.inputs.usage import normalized_usage

    csv_rows = normalized_usage(pl.read_csv(input_example("event_id,").encode(), infer_schema=False), "usage/a.csv")
    jsonl_rows = normalized_usage(pl.read_ndjson(input_example('{"event_id"', "jsonl").encode()), "usage/a.jsonl")
    for rows in (csv_rows, jsonl_rows):
        assert rows["reason"].null_count() == rows.height, rows.filter(pl.col("reason").is_not_null())
    assert csv_rows["dims"].to_list()[:3] == ['{"model":"gpt-4o","region":"eu"}'] * 2 + ["{}"]
    # the quantity and timestamp forms the page names
    text = pl.DataFrame({"event_id": ["a", "b", "c", "d", "e"], "customer_id": ["c"] * 5, "meter": ["m"] * 5,
                         "quantity": ["1520", "0.5", "1.5e3", "+2", "0.0000000001"],
                         "timestamp": ["2026-10-03T14:02:11Z", "2026-10-03T14:02:11.250+02:00", "2026-10-03 14:02:11",
                                       "2026-10-03t14:02:11z", "2026-10-03T14:02:11Z"]})
    rows = normalized_usage(text, "usage/b.csv")
    assert rows["reason"].to_list() == [None, None, None, None, "bad_quantity"]
    assert [str(q) for q in rows["quantity"].to_list()[:4]] == ["1520.000000000", "0.500000000", "1500.000000000",
                                                                "2.000000000"]
    # what a Parquet DOUBLE column holds when a producer computed 0.1 + 0.2 (the input a user sends)
    floats = text.head(2).with_columns(pl.Series("quantity", ["0.1", "0.30000000000000004"]).cast(pl.Float64))
    assert normalized_usage(floats, "usage/c.parquet")["reason"].to_list() == [None, "bad_quantity"]


def test_the_reference_examples_pass_the_checks_a_close_makes():
    import polars as pl
    import yaml

    from transforms.credits.purchases import purchases_from
    from transforms.finance.margins import costs_from
    from transforms.inputs.plans import load_catalog
    from transforms.inputs.reference import checked_customers, checked_subscriptions

    def frame(header: str) -> pl.DataFrame:
        return pl.read_csv(input_example(header).encode(), infer_schema=False)

    customers = checked_customers(frame("customer_id,name"), "customers/customers.csv")
    subs = checked_subscriptions(frame("subscription_id,"), "subscriptions/subscriptions.csv", customers,
                                 load_catalog(REPO / "plans"))
    assert [s.plan_version for s in subs] == [None, None, 1]
    assert len(purchases_from(frame("purchase_id,"), "credit_purchases/p.csv", set(customers["customer_id"]))) == 1
    assert len(costs_from(frame("meter,filter,")).rows) == 3
    seller = yaml.safe_load(input_example("name:", "yaml"))
    assert set(seller) == {"name", "address", "email", "tax_id", "payment_terms_days", "payment"}
    from transforms.documents.terms import seller_block
    assert seller_block(seller)["payment_terms_days"] == 30


def test_every_quarantine_reason_the_code_emits_is_documented_and_only_those():
    from transforms.inputs.usage import MALFORMED_LINE, ROW_REASONS

    sql = (REPO / "transforms" / "sql" / "checked_usage.sql").read_text(encoding="utf-8")
    emitted = set(ROW_REASONS) | set(re.findall(r"THEN '([a-z_]+)'", sql)) - {"billed", "quarantined"}
    emitted.add("unreadable_object")  # flows/outputs.py: one row per object that cannot be read
    emitted.add(MALFORMED_LINE)  # transforms.inputs.usage.malformed_usage: one row per line that does not parse
    text = INPUTS_MD.read_text(encoding="utf-8")
    table = text.split("### Quarantine reason codes")[1].split("\n\n")[2]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.M))
    assert documented == emitted


# -- docs/warehouse.md: the DuckDB recipe, for real -----------------------------------------------

WAREHOUSE_MD = DOCS / "warehouse.md"
GOLDEN = Path(__file__).parent / "golden"

# The warehouse table the recipe reads: golden customers on golden plans (tok: input_tokens by
# model and region, api_calls; jp: images), one event a few hours apart over the month.
WAREHOUSE_ROWS = [
    ("w-01", "c1", "input_tokens", "1500000", "2026-10-01 08:00:00+00", "gpt-4o", "eu"),
    ("w-02", "c1", "input_tokens", "250000.5", "2026-10-01 23:59:59.999+00", "gpt-4o-mini", None),
    ("w-03", "c3", "images", "3", "2026-10-01 12:00:00+09", None, None),
    ("w-04", "c1", "api_calls", "120", "2026-10-02 00:00:00+00", None, None),
    ("w-05", "c1", "input_tokens", "2000000", "2026-10-15 10:00:00+00", "gpt-4o", "us"),
    ("w-06", "c2", "api_calls", "60", "2026-10-20 10:00:00+00", None, None),
    ("w-07", "c3", "images", "2", "2026-10-31 23:00:00+00", None, None),
]


@pytest.fixture(scope="module")
def warehouse_close(prefect_server, tmp_path_factory):
    import shutil

    import duckdb

    from closeutil import close

    root = tmp_path_factory.mktemp("warehouse")
    store = root / "billing-data"
    for folder in ("customers", "subscriptions"):
        shutil.copytree(GOLDEN / "store" / folder, store / folder)
    con = duckdb.connect()
    con.execute("CREATE SCHEMA analytics")
    con.execute("CREATE TABLE analytics.usage_events (event_id VARCHAR, account_id VARCHAR, meter VARCHAR, "
                "quantity DECIMAL(18, 3), occurred_at TIMESTAMPTZ, model VARCHAR, region VARCHAR)")
    con.executemany("INSERT INTO analytics.usage_events VALUES (?, ?, ?, CAST(? AS DECIMAL(18, 3)), "
                    "CAST(? AS TIMESTAMPTZ), ?, ?)", WAREHOUSE_ROWS)
    text = WAREHOUSE_MD.read_text(encoding="utf-8")
    (mkdir,) = [body for _, body in blocks(text, "bash") if body.startswith("mkdir -p ")]
    (store / mkdir.split()[-1].removeprefix("billing-data/")).mkdir(parents=True)
    statements = [body for _, body in blocks(text, "sql")]
    assert len(statements) == 2
    for sql in statements:
        con.execute(sql.replace("'billing-data/", f"'{store}/").replace("'billing-data'", f"'{store}'"))
    return store, close(str(store), str(GOLDEN / "plans"), "2026-10")


@pytest.mark.slow
def test_the_duckdb_export_recipe_bills_every_event_once(warehouse_close):
    import pyarrow.parquet as pq

    store, result = warehouse_close
    day_one = ["w-01", "w-02", "w-03"]  # October 1 in UTC (w-03 is noon in Tokyo, 03:00 UTC)
    parts = sorted(p.relative_to(store).as_posix() for p in (store / "usage").rglob("*.parquet"))
    assert "usage/date=2026-10-01/part-0.parquet" in parts and "usage/date=2026-10-31/data_0.parquet" in parts
    assert "date" not in pq.read_schema(store / "usage/date=2026-10-31/data_0.parquet").names
    # every event billed once; the day exported twice (both recipes) is all duplicates
    assert result["rows"] == {"read": len(WAREHOUSE_ROWS) + len(day_one), "billed": len(WAREHOUSE_ROWS),
                              "duplicates": len(day_one), "quarantined": 0}


# -- links --------------------------------------------------------------------------------------

def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", sorted(p.relative_to(REPO).as_posix() for p in DOCS.glob("*.md")) + ["README.md"])
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(page):
    source = REPO / page
    text = FENCE.sub("", source.read_text(encoding="utf-8"))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (source.parent / path).resolve() if path else source
        assert linked.exists(), f"{page}: link to {target}: no such file"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", FENCE.sub("", linked.read_text(encoding="utf-8")), flags=re.M)
            assert anchor in {slug(h) for h in headings}, f"{page}: link to {target}: no such heading"


def test_the_index_links_every_page():
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    for page in DOCS.glob("*.md"):
        if page.name != "README.md":
            assert f"]({page.name})" in index, f"docs/README.md does not link {page.name}"


# -- docs/exit-codes.md -------------------------------------------------------------------------

def test_the_exit_codes_page_names_the_codes_the_command_line_gives(monkeypatch, capsys):
    from typer.testing import CliRunner

    from flows import cli

    text = (DOCS / "exit-codes.md").read_text(encoding="utf-8")
    assert set(re.findall(r"^\| `(\d+)` \|", text, flags=re.M)) == {"0", "1", "2", "130"}
    runner = CliRunner()
    assert runner.invoke(cli.app, ["close"]).exit_code == 2  # a required option left out
    assert runner.invoke(cli.app, ["close", "--period", "2026-10", "--no-such-option"]).exit_code == 2
    mistake = runner.invoke(cli.app, ["backfill", "--from", "2026-10", "--to", "2026-10", "--as-of", "soon"])
    assert mistake.exit_code == 1 and "billrun: error:" in mistake.output

    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "app", interrupted)
    with pytest.raises(SystemExit) as ended:
        cli.main()
    assert ended.value.code == 130


def test_every_field_a_plan_file_accepts_is_documented():
    from transforms.inputs import plans
    from transforms.pricing import PRICE_MODELS
    from transforms.pricing.graduated_percentage import PercentTier
    from transforms.pricing.tiers import UnitTier

    text = PLANS_MD.read_text(encoding="utf-8")
    models = [plans.Plan, plans.FixedFee, plans.Charge, plans.Commitment, plans.SpendControls, plans.Grant,
              plans.TopUp, plans.ConsumeByDimension, plans.Credits, UnitTier, PercentTier]
    models += [module.Price for module in PRICE_MODELS.values()]
    missing = sorted({f"{m.__name__}.{name}" for m in models for name in m.model_fields
                      if f"`{name}`" not in text and f"{name}:" not in text})
    assert not missing, f"docs/plans.md does not document {missing}"


def test_the_parquet_usage_example_writes_rows_billrun_accepts(tmp_path, monkeypatch):
    import polars as pl

    from transforms.inputs.usage import normalized_usage

    (code,) = [body for _, body in blocks(INPUTS_MD.read_text(encoding="utf-8"), "python")]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "billing-data/usage/date=2026-10-03").mkdir(parents=True)
    exec(compile(code, "docs/inputs.md", "exec"), {})
    key = "usage/date=2026-10-03/part-0.parquet"
    rows = normalized_usage(pl.read_parquet(tmp_path / "billing-data" / key), key)
    assert rows["reason"].to_list() == [None, None]
    assert [str(q) for q in rows["quantity"]] == ["1520.000000000", "311.500000000"]
