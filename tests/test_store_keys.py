"""The store layout is a public contract (docs/store-layout.md) and one module spells it out:
transforms/layout.py. Every other module of flows/, transforms/ and bench/ builds its keys with
that module's functions and constants, so a key typed out by hand elsewhere is a second copy of
the contract that can drift from it.

This scans the source (string constants and the literal parts of f-strings; docstrings are prose
and are skipped) for what only a store key looks like: a top-level folder of the store
(`billing/`, `usage/`, `customers/`, ...), a `key=value` folder of the layout (`period=`,
`date=`, `run=`, `night=`), `_state/`, or one of the store's own file names; and for a folder of
the store joined onto a path by name (`store / "usage"`).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

from transforms import layout

REPO = Path(__file__).resolve().parent.parent
LAYOUT = REPO / "transforms" / "layout.py"
SCANNED = ("flows", "transforms", "bench")

_FOLDERS = "billing|usage|customers|subscriptions|credit_purchases|adjustments|costs|tax"
STORE_KEY = re.compile(
    rf"^\^?(?:{_FOLDERS})/"                                  # a key from the store's root
    r"|(?:^|[/^])_state/"                                   # billrun's bookkeeping
    r"|(?:^|[/^])(?:period|date|run|night)="                # a folder of the layout
    r"|(?:^|/)(?:manifest\\?\.json|seller\.yaml|billrun\.yaml|rules\.yaml|costs\.csv)\$?$")
FOLDER = re.compile(rf"^(?:{_FOLDERS}|_state)$")
"""A bare folder name: a key only where it is joined onto a path."""


def _docstrings(tree: ast.AST) -> set[int]:
    """The ids of the string constants that are docstrings (module, class, function)."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                ids.add(id(first.value))
    return ids


def typed_keys(path: Path, root: Path = REPO) -> list[str]:
    """`path:line: text` for every string constant (or f-string part) in `path` shaped like a store key."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    skip = _docstrings(tree)
    joined = {id(side) for node in ast.walk(tree) if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)
              for side in (node.left, node.right)}
    return sorted((f"{path.relative_to(root)}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
                   if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
                   and (STORE_KEY.search(node.value) or (id(node) in joined and FOLDER.match(node.value)))),
                  key=lambda hit: int(hit.split(":")[1]))


def test_the_pattern_finds_keys_and_leaves_prose():
    found = [s for s in ("billing/period=", "usage/", "billing/_state/runs/", "period=", "/manifest.json",
                         r"^billing/corrections/run=([^/]+)/manifest\.json$", "nights/night=", "seller.yaml",
                         "customers/customers.csv", "date=")
             if STORE_KEY.search(s)]
    assert len(found) == 10
    assert not [s for s in ("usage", "period", "upload it under usage/ first", "a period=P folder",
                            "invoices.parquet", "subscription_id")
                if STORE_KEY.search(s)]


def test_a_folder_joined_onto_a_path_is_a_key(tmp_path):
    source = tmp_path / "joined.py"
    source.write_text('store / "usage" / "x.parquet"\nlabel = "usage"\n')
    assert [hit.split(": ", 1)[1] for hit in typed_keys(source, tmp_path)] == ["'usage'"]


def test_no_store_key_is_typed_outside_the_layout_module():
    found = [hit for folder in SCANNED for path in sorted((REPO / folder).rglob("*.py"))
             if path != LAYOUT
             for hit in typed_keys(path)]
    assert not found, ("store keys typed outside transforms/layout.py (build them with its functions and "
                       "constants):\n" + "\n".join(found))


def test_the_parsers_read_back_what_the_builders_wrote():
    assert layout.period_of_manifest(layout.manifest_key("2026-10")) == "2026-10"
    assert layout.period_of_manifest(layout.period_prefix("2026-10") + "invoices.parquet") is None
    assert layout.period_file(layout.period_prefix("2026-10") + "invoices.parquet") == ("2026-10", "invoices.parquet")
    assert layout.run_of_correction_manifest(layout.correction_prefix("backfill-1") + layout.MANIFEST) == "backfill-1"
    assert layout.night_of_manifest(layout.night_prefix("2026-10-03") + layout.MANIFEST) == "2026-10-03"
    assert layout.period_of_lock(layout.lock_key("2026-10")) == "2026-10"
    assert layout.period_of_lock(layout.claim_key("2026-10")) is None
    assert layout.billed_index_file(layout.billed_index_key("2026-10", "close-2026-10-ab")) == ("2026-10",
                                                                                                "close-2026-10-ab")
    assert layout.night_of_commit("2026-10", layout.night_commit_key("2026-10", "2026-10-03")) == "2026-10-03"
    run_id = layout.close_run_id("2026-10", "ab")
    assert run_id == "close-2026-10-ab"
    key = layout.staging_prefix(run_id, "t0k3n") + "invoices.parquet"
    assert layout.run_folder_of(key) == layout.run_folder(run_id)
    assert key.startswith(layout.close_runs_prefix("2026-10"))


def test_the_store_layout_page_shows_the_keys_the_module_builds():
    """docs/store-layout.md and transforms/layout.py describe one layout: each key the module
    builds, with the page's placeholders, is on the page."""
    page = (REPO / "docs" / "store-layout.md").read_text(encoding="utf-8")
    p, day, run = "YYYY-MM", "YYYY-MM-DD", "RUN_ID"
    keys = [
        layout.USAGE_PREFIX, *layout.CUSTOMERS_KEYS, layout.SUBSCRIPTIONS_KEYS[0], layout.PURCHASES_PREFIX + "*.csv",
        layout.ADJUSTMENTS_PREFIX + "*.csv", layout.COSTS_KEY, layout.SELLER_KEY, layout.RULES_KEY, layout.CONFIG_KEY,
        layout.period_prefix(p) + "*.parquet", layout.invoice_html_key(p, "<INVOICE_ID>"), layout.manifest_key(p),
        layout.correction_prefix(run) + "*.parquet", layout.correction_prefix(run) + layout.document_html_name("<ID>"),
        layout.correction_prefix(run) + layout.MANIFEST, layout.night_prefix(day) + "*.parquet",
        layout.night_prefix(day) + layout.MANIFEST, layout.simulation_prefix("SIMULATION_ID"), layout.report_key(p),
        layout.TABLES_LOCATION + "/delta/<table>/", layout.lock_key(p), layout.claim_key(p),
        layout.staging_prefix("<RUN_ID>", "<TOKEN>"), layout.billed_index_key(p, "<RUN_ID>"), layout.checked_key(p),
        layout.USAGE_INDEX_KEY, layout.nightly_object_key(p, "x").rsplit("/", 1)[0] + "/",
        layout.to_date_key(p, day, ""), layout.night_commit_key(p, day), layout.fired_alerts_key(p),
        layout.WORK_PREFIX,
    ]
    missing = [key for key in keys if f"`{key}" not in page]
    assert not missing, f"docs/store-layout.md does not show these keys of transforms/layout.py: {missing}"
