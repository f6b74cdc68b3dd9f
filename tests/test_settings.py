"""What billrun reads from its environment, and where.

- Only flows/settings.py reads the environment (the test seam reads its own two variables
  through it); every variable billrun names is in VARIABLES or is the seam's, every Settings
  field comes from one of them, and docs/configuration.md shows the table VARIABLES generates.
- The crash tests stop a real run at points named in flows/testing_seam.py; a point the code
  marks but the seam does not list (or the reverse) is a crash test that silently never fires.
"""
from __future__ import annotations

import dataclasses
import os
import re
import signal
from pathlib import Path

import pytest

from flows import testing_seam
from flows.settings import VARIABLES, Settings, configuration_table
from transforms.errors import InputError

REPO = Path(__file__).resolve().parent.parent
CODE = sorted((REPO / "flows").glob("*.py")) + sorted((REPO / "transforms").rglob("*.py"))
CONFIGURATION_MD = REPO / "docs" / "configuration.md"
UPDATE = os.environ.get("BILLRUN_UPDATE_DOCS") == "1"
GENERATED = re.compile(r"(<!-- generated from flows/settings.py.*?-->\n)(.*?)(<!-- end of the generated table -->)",
                       re.S)


class Recording(dict):
    """An environment that notes every name asked of it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked: set[str] = set()

    def get(self, name, default=None):
        self.asked.add(name)
        return super().get(name, default)

    def __contains__(self, name):
        self.asked.add(name)
        return super().__contains__(name)

    def __getitem__(self, name):
        self.asked.add(name)
        return super().__getitem__(name)


def test_the_settings_come_from_the_documented_variables_and_only_those():
    environ = Recording()
    assert Settings.from_environ(environ) == Settings()  # nothing set: the documented defaults
    by_field = {v.field: v.name for v in VARIABLES if v.field}
    assert set(by_field) == {f.name for f in dataclasses.fields(Settings)}
    assert environ.asked == set(by_field.values())


def test_the_settings_read_what_the_variables_say():
    settings = Settings.from_environ({"BILLRUN_SHARDS": " 7 ", "BILLRUN_WORKERS": "3", "BILLRUN_DUCKDB_MEMORY": "2GB",
                                      "PREFECT_HOME": "/srv/prefect", "CI": "", "TERM": "dumb"})
    assert settings == Settings(shards=7, workers=3, duckdb_memory="2GB", prefect_home=Path("/srv/prefect"),
                                ci=True, dumb_terminal=True)


@pytest.mark.parametrize("name, value, expected", [
    ("BILLRUN_SHARDS", "1025", "from 1 to 1024"), ("BILLRUN_SHARDS", "lots", "from 1 to 1024"),
    ("BILLRUN_WORKERS", "0", "of at least 1"), ("BILLRUN_WORKERS", "-2", "of at least 1")])
def test_a_malformed_setting_is_one_line_naming_the_variable(name, value, expected):
    with pytest.raises(InputError, match=f"^{name}={value!r}: expected a whole number {expected}$"):
        Settings.from_environ({name: value})


def test_only_the_settings_module_reads_the_environment():
    readers = {path.name for path in CODE if re.search(r"os\.environ|getenv", path.read_text())}
    assert readers == {"settings.py"}


def test_every_variable_the_code_names_is_documented():
    named = {m for path in CODE for m in re.findall(r"\bBILLRUN_[A-Z_]+\b", path.read_text())}
    documented = {v.name for v in VARIABLES} | {testing_seam.FAULT_ENV, testing_seam.PAUSE_ENV}
    assert named - documented == set()


def test_the_configuration_page_shows_the_generated_table():
    page = CONFIGURATION_MD.read_text()
    match = GENERATED.search(page)
    assert match, "docs/configuration.md lost its generated table's markers"
    if UPDATE and match.group(2) != configuration_table():
        CONFIGURATION_MD.write_text(page[:match.start(2)] + configuration_table() + page[match.end(2):])
        page = CONFIGURATION_MD.read_text()
        match = GENERATED.search(page)
    assert match.group(2) == configuration_table(), (
        "docs/configuration.md is not what flows/settings.py generates: "
        "regenerate it with BILLRUN_UPDATE_DOCS=1 pytest tests/test_settings.py")


def test_every_point_the_code_marks_is_the_seams_and_only_those():
    marked = {m for path in CODE for m in re.findall(r"\b(?:fault|pause)_point\(\"([\w-]+)\"\)", path.read_text())}
    # a publish's points are named in its CrashPoints (flows/publish.py), reached there one by one
    marked |= {m for path in CODE for call in re.findall(r"\bCrashPoints\(([^)]*)\)", path.read_text())
               for m in re.findall(r"\b(?:staged|copied_first|copied|committed)=\"([\w-]+)\"", call)}
    assert marked == set(testing_seam.POINTS)


def test_only_the_seam_reads_its_variables():
    readers = {path.name for path in CODE if re.search(r"BILLRUN_(?:FAULT|PAUSE)_AT", path.read_text())}
    assert readers == {"testing_seam.py"}


def test_a_point_acts_when_the_seams_variable_names_it_and_a_pause_acts_once(monkeypatch):
    signals = []
    monkeypatch.setattr(testing_seam.os, "kill", lambda pid, sig: signals.append(sig))
    monkeypatch.setenv(testing_seam.FAULT_ENV, "staged")
    monkeypatch.setenv(testing_seam.PAUSE_ENV, "fence-checked")
    testing_seam.fault_point("rated")
    assert signals == []
    testing_seam.fault_point("staged")
    assert signals == [signal.SIGKILL]
    testing_seam.pause_point("fence-checked")
    testing_seam.pause_point("fence-checked")  # resumed: the variable was dropped before the stop
    assert signals == [signal.SIGKILL, signal.SIGSTOP]
    assert testing_seam.PAUSE_ENV not in os.environ
