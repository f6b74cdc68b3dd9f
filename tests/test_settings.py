"""What billrun reads from its environment: the test seam's points.

The crash tests stop a real run at points named in flows/testing_seam.py; a point the code marks
but the seam does not list (or the reverse) is a crash test that silently never fires.
"""
from __future__ import annotations

import re
from pathlib import Path

from flows import testing_seam

REPO = Path(__file__).resolve().parent.parent
CODE = sorted((REPO / "flows").glob("*.py")) + sorted((REPO / "transforms").rglob("*.py"))


def test_every_point_the_code_marks_is_the_seams_and_only_those():
    marked = {m for path in CODE for m in re.findall(r"\b(?:fault|pause)_point\(\"([\w-]+)\"\)", path.read_text())}
    assert marked == set(testing_seam.POINTS)


def test_only_the_seam_reads_its_variables():
    readers = {path.name for path in CODE if re.search(r"BILLRUN_(?:FAULT|PAUSE)_AT", path.read_text())}
    assert readers == {"testing_seam.py"}
