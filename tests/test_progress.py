"""The live list of steps: which log records say what about a step (pure, fake records), how the
list shows them, when it is switched on, and one close through the CLI with it on."""
from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from closeutil import copy_tree_to_store
from flows import progress
from flows.cli import app
from flows.progress import StepEvent, StepLog, StepProgress, show_steps, step_event, wanted
from flows.settings import Settings

GOLDEN = Path(__file__).parent / "golden"


def task_record(message: str, *args, task: str | None = "check-usage", run_id: str | None = "run-1",
                level: int = logging.INFO) -> logging.LogRecord:
    """A record as Prefect's task-run logger makes it: the task's name and run id ride along."""
    record = logging.LogRecord("prefect.task_runs", level, __file__, 1, message, args, None)
    if task is not None:
        record.task_name, record.task_run_name = task, f"{task}-a1b"
    if run_id is not None:
        record.task_run_id = run_id
    return record


@pytest.mark.parametrize("record, event", [
    pytest.param(task_record("Created task run 'check-usage-a1b' for task 'check-usage'", level=logging.DEBUG),
                 StepEvent("start", "run-1", "check-usage"), id="created: the step starts"),
    pytest.param(task_record("Executing task 'check-usage' for task run 'check-usage-a1b'...", level=logging.DEBUG),
                 StepEvent("start", "run-1", "check-usage"), id="executing: starts too (once is enough)"),
    pytest.param(task_record("check-usage: read %d, billed %d in %.2fs", 14, 8, 1.234),
                 StepEvent("note", "run-1", "check-usage", "read 14, billed 8"),
                 id="the step's own summary, without its timing"),
    pytest.param(task_record("check-usage: shard 0: read 14"),
                 StepEvent("note", "run-1", "check-usage", "shard 0: read 14"), id="a summary without a timing"),
    pytest.param(task_record("Finished in state Completed()"),
                 StepEvent("finish", "run-1", "check-usage"), id="completed"),
    pytest.param(task_record("Finished in state Cached(type=COMPLETED)"),
                 StepEvent("finish", "run-1", "check-usage"), id="cached is done too"),
    pytest.param(task_record("Finished in state Failed('Task run encountered an exception InputError: bad')",
                             level=logging.ERROR),
                 StepEvent("finish", "run-1", "check-usage", "failed", ok=False), id="failed"),
    pytest.param(task_record("Finished in state Crashed('Execution was interrupted')", level=logging.ERROR),
                 StepEvent("finish", "run-1", "check-usage", "crashed", ok=False), id="crashed"),
    pytest.param(task_record("Task run failed with %s: %r - Retry %s/%s will start %s", "exception",
                             OSError("timed out"), 1, 3, "2 second(s) from now", task="fetch-inputs"),
                 StepEvent("retry", "run-1", "fetch-inputs", "retry 1/3 after OSError('timed out')"), id="retry"),
    pytest.param(task_record("Finished in state Completed()", task=None), None, id="not a task run"),
    pytest.param(task_record("Finished in state Completed()", run_id=None), None, id="no run id"),
])
def test_step_event_reads_what_prefect_logs(record: logging.LogRecord, event: StepEvent | None) -> None:
    assert step_event(record) == event


def shown(steps: StepProgress) -> str:
    console = Console(file=io.StringIO(), width=120, record=True, color_system=None)
    console.print(steps.progress.get_renderable())
    return console.export_text()


def rows(steps: StepProgress) -> list[list[str]]:
    return [line.split() for line in shown(steps).splitlines() if line.strip()]


def test_the_list_shows_done_running_and_failed_steps_in_the_order_they_started() -> None:
    steps = StepProgress(Console(file=io.StringIO()))
    feed = StepLog(steps)
    for record in [task_record("Created", task="fetch-inputs", run_id="a"),
                   task_record("fetch-inputs: 3 usage objects, 815 bytes in 0.01s", task="fetch-inputs", run_id="a"),
                   task_record("Finished in state Completed()", task="fetch-inputs", run_id="a"),
                   task_record("Created", task="normalize-usage", run_id="b"),
                   task_record("Created", task="normalize-usage", run_id="c"),  # a second run of one task
                   task_record("Finished in state Failed('boom')", task="normalize-usage", run_id="c"),
                   logging.LogRecord("prefect.flow_runs", logging.INFO, __file__, 1, "Beginning flow run", (), None)]:
        feed.handle(record)
    lines = rows(steps)
    assert len(lines) == 3
    assert lines[0][:2] == ["✓", "fetch-inputs"] and lines[0][3:] == "3 usage objects, 815 bytes".split()
    assert lines[1][1] == "normalize-usage" and lines[1][0] not in ("✓", "✗")  # still running: a spinner
    assert lines[2][:3] == ["✗", "normalize-usage", "(2)"] and lines[2][-1] == "failed"
    steps.stop()
    assert rows(steps)[1][:2] == ["·", "normalize-usage"] and rows(steps)[1][-1] == "stopped"  # cut short


def test_the_wait_for_the_first_step_is_a_row_that_ends_when_a_step_starts() -> None:
    steps = StepProgress(Console(file=io.StringIO()))
    steps.waiting("prefect", "starting the flow run")
    assert rows(steps)[0][1] == "prefect" and rows(steps)[0][0] != "✓"
    steps.apply(StepEvent("start", "a", "fetch-inputs"))
    assert rows(steps)[0][:2] == ["✓", "prefect"]


def test_a_step_of_the_command_itself_is_marked_failed_when_it_raises() -> None:
    steps = StepProgress(Console(file=io.StringIO()))
    with steps.step("sample-store"):
        pass
    with pytest.raises(ValueError), steps.step("other"):
        raise ValueError
    assert [row[:2] for row in rows(steps)] == [["✓", "sample-store"], ["✗", "other"]]


@pytest.fixture
def quiet_prefect():
    """Prefect's task-run logs at WARNING, as the billrun command sets them (tests log at INFO)."""
    logger = logging.getLogger("prefect.task_runs")
    before = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(before)


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("kwargs, environ, on", [
    pytest.param({}, {}, True, id="a person at a terminal"),
    pytest.param({"stream": io.StringIO()}, {}, False, id="stderr is not a terminal"),
    pytest.param({"as_json": True}, {}, False, id="--json"),
    pytest.param({"verbose": True}, {}, False, id="--verbose: log lines instead"),
    pytest.param({"enabled": False}, {}, False, id="--no-progress"),
    pytest.param({}, {"CI": "true"}, False, id="CI"),
    pytest.param({}, {"TERM": "dumb"}, False, id="a dumb terminal"),
])
def test_progress_is_only_for_a_person_at_a_terminal(quiet_prefect, kwargs: dict, environ: dict, on: bool) -> None:
    arguments = {"as_json": False, "verbose": False, "stream": Tty()} | kwargs
    assert wanted(Settings.from_environ(environ), **arguments) is on


def test_progress_is_off_when_prefect_logs_steps_at_info(quiet_prefect) -> None:
    assert wanted(Settings(), as_json=False, verbose=False, stream=Tty())
    logging.getLogger("prefect.task_runs").setLevel(logging.INFO)  # PREFECT_LOGGING_LEVEL=INFO
    assert not wanted(Settings(), as_json=False, verbose=False, stream=Tty())


def test_showing_steps_leaves_logging_as_it_found_it() -> None:
    logger = logging.getLogger("prefect.task_runs")
    before = (logger.level, list(logger.handlers), {h: list(h.filters) for h in logging.getLogger().handlers})
    with show_steps(Console(file=io.StringIO()), True) as steps:
        assert logger.level == logging.DEBUG and any(isinstance(h, StepLog) for h in logger.handlers)
        assert steps is not None
    assert (logger.level, list(logger.handlers), {h: list(h.filters) for h in logging.getLogger().handlers}) == before
    with show_steps(Console(file=io.StringIO()), False) as steps:
        assert steps is None and logger.level == before[0]


def test_a_close_with_progress_on_lists_every_step_done(prefect_server, tmp_path, monkeypatch) -> None:
    """Against Prefect's real records: if Prefect changes what it logs, this fails, not the display."""
    store = str(tmp_path / "store")
    copy_tree_to_store(GOLDEN / "store", store)
    monkeypatch.setattr(progress, "wanted", lambda settings, **kwargs: True)
    level = logging.getLogger("prefect.task_runs").level
    result = CliRunner().invoke(app, ["close", "--period", "2026-10", "--store", store, "--plans",
                                      str(GOLDEN / "plans")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    done = [line.split()[1] for line in result.stderr.splitlines() if line.startswith("✓")]
    for step in ("prefect", "fetch-inputs", "check-reference", "normalize-usage", "check-usage", "replay-credits",
                 "rate-invoices", "write-outputs", "publish"):
        assert step in done, result.stderr
    assert "closed" in result.stdout and "✓" not in result.stdout
    assert logging.getLogger("prefect.task_runs").level == level


def test_the_console_keeps_what_the_list_does_not_say() -> None:
    """While the list shows, the console prints above it what the user chose to see, minus a step's
    final state (its mark says it) and a user's mistake (the command's one line says it)."""
    printed = io.StringIO()
    handler = logging.StreamHandler(io.StringIO())
    keep = progress.AsBefore(logging.WARNING, handler, Console(file=printed, width=200))
    user_error = task_record("InputError: customers.csv row 2", level=logging.ERROR)
    user_error.billrun_user_error = True
    try:
        raise RuntimeError("a bug")
    except RuntimeError:
        import sys
        bug = task_record("Task run failed with exception", level=logging.ERROR)
        bug.exc_info = sys.exc_info()
    for record in [task_record("Created", level=logging.DEBUG), task_record("check-usage: read 3"),
                   task_record("Finished in state Failed('x')", level=logging.ERROR), user_error, bug,
                   logging.LogRecord("prefect.client", logging.WARNING, __file__, 1, "slow API", (), None)]:
        assert keep.filter(record) is False  # never written across the live display
    text = printed.getvalue()
    assert "a bug" in text and "Traceback" in text and "slow API" in text
    assert "read 3" not in text and "Finished in state" not in text and "customers.csv" not in text
