"""The layout holds: the close flow is a flow, not a library, and no module reaches into another's
private names.

What the flows share (the steps of billing a period, the close's outputs, publishing) lives in
flows/steps.py, flows/outputs.py and flows/publish.py; flows/close.py is imported only for the
flow itself, `close_period`. A name with a leading underscore is its module's own business: a
module that needs it from elsewhere needs a public name in a module meant to be shared.

Tests are held to the second rule too: what a test calls, it calls by a public name (a helper a
test pins down, such as a fast path checked against the plain rule, is public for that reason).
Tests may also import the close's public names besides `close_period`. The checks read the source
(ast), so they cost no import and run in the fast lane.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
OWN_PACKAGES = ("flows", "transforms", "plans")
"""Where billrun's importable modules are."""
CODE = ("flows", "transforms", "plans", "bench")
"""Where billrun's code is (tests/ besides it)."""
CLOSE = "flows.close"


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def own(module: str) -> bool:
    return module.split(".")[0] in OWN_PACKAGES


def imported(path: Path) -> Iterator[tuple[int, str, str | None]]:
    """(line, module, name) for every import in the file: name is None for `import a.b`, and
    `from a import b` of a submodule b is given as (a.b, None)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                if (REPO / node.module.replace(".", "/") / f"{alias.name}.py").exists():
                    yield node.lineno, f"{node.module}.{alias.name}", None
                else:
                    yield node.lineno, node.module, alias.name


def private_attributes(path: Path) -> Iterator[tuple[int, str, str]]:
    """(line, module, name) for every `module._name` read through a billrun module imported whole
    (`import flows.x as x; x._name`, `import flows.x; flows.x._name`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    bound: dict[str, str] = {}  # the dotted name in the source -> the module it is
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if own(alias.name):
                    bound[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and own(node.module):
            for alias in node.names:
                if (REPO / node.module.replace(".", "/") / f"{alias.name}.py").exists():
                    bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"

    def dotted(node: ast.expr) -> str | None:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute):
            head = dotted(node.value)
            return f"{head}.{node.attr}" if head else None
        return None

    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and dotted(node.value) in bound):
            yield node.lineno, bound[dotted(node.value)], node.attr


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(REPO)}:{line}"


def test_only_close_period_is_imported_from_the_close():
    wrong = []
    for path in sources(*CODE, "tests"):
        if module_name(path) == CLOSE:
            continue
        in_tests = path.relative_to(REPO).parts[0] == "tests"
        for line, module, name in imported(path):
            if module != CLOSE:
                continue
            if name is None:
                wrong.append(f"{where(path, line)}: imports {CLOSE} whole")
            elif name != "close_period" and (not in_tests or name.startswith("_")):
                wrong.append(f"{where(path, line)}: imports {name} from {CLOSE}")
    assert not wrong, ("flows/close.py is the close flow, not a library: import what the flows share from "
                       "flows/steps.py, flows/outputs.py, flows/publish.py or transforms/layout.py, and only "
                       "close_period from flows/close.py:\n" + "\n".join(wrong))


def test_no_module_imports_a_private_name_from_another():
    wrong = []
    for path in sources(*CODE, "tests"):
        me = module_name(path)
        for line, module, name in imported(path):
            if own(module) and module != me and name is not None and name.startswith("_"):
                wrong.append(f"{where(path, line)}: imports {name} from {module}")
        for line, module, name in private_attributes(path):
            if module != me:
                wrong.append(f"{where(path, line)}: reads {module}.{name}")
    assert not wrong, ("a name with a leading underscore is private to its module; give what other modules "
                       "need a public name (in a module meant to be shared):\n" + "\n".join(wrong))


def test_the_checks_see_what_they_look_for(tmp_path, monkeypatch):
    """Each rule on a file that breaks it: a check that saw nothing would pass on any code."""
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "close.py").write_text("", encoding="utf-8")
    (tmp_path / "flows" / "shards.py").write_text("", encoding="utf-8")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "b.py").write_text(
        "import flows.close as close\nfrom flows import shards\nfrom flows.close import close_period, PARQUET\n"
        "from flows.store import _cache_name\nshards._merge\nclose.close_period\n", encoding="utf-8")
    b = tmp_path / "bench" / "b.py"
    assert list(imported(b)) == [(1, "flows.close", None), (2, "flows.shards", None),
                                 (3, "flows.close", "close_period"), (3, "flows.close", "PARQUET"),
                                 (4, "flows.store", "_cache_name")]
    assert list(private_attributes(b)) == [(5, "flows.shards", "_merge")]
