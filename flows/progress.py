"""A live list of a flow's steps in the terminal, read from the log records Prefect already writes.

Prefect logs every task run under `prefect.task_runs`, each record carrying the task's name and
run id: a debug line when the run is created, the step's own summary ("check-usage: read 14,
billed 8, duplicates 1, quarantined 5 in 0.07s") and "Finished in state Completed()" at the end.
`step_event` turns one record into a step event, `StepLog` (a logging handler) feeds those events
to `StepProgress`, which shows them with rich: a spinner and the time so far on the running step,
a tick, the summary and the time taken on the finished ones. The flows know nothing of it.

It is only ever switched on for a person at a terminal (`wanted`): scripts, CI, `--json` and
tests see exactly the output they saw before, and `--verbose` (or PREFECT_LOGGING_LEVEL=INFO)
gives one log line per step instead.
"""
from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TextIO

from rich.console import Console
from rich.progress import Progress, ProgressColumn, SpinnerColumn, Task, TextColumn
from rich.text import Text

if TYPE_CHECKING:
    from flows.settings import Settings

TASK_RUNS = "prefect.task_runs"
_FINISHED = "Finished in state "
_RETRY = re.compile(r"^Task run failed with \w+: (?P<error>.*) - Retry (?P<n>\d+)/(?P<of>\d+) will start")
_WAITING = "cli:waiting"
_TOOK = re.compile(r" in \d+(\.\d+)?s$")  # the summary's own timing: the display shows the step's


@dataclass(frozen=True)
class StepEvent:
    kind: Literal["start", "note", "retry", "finish"]
    run_id: str
    step: str
    text: str = ""
    ok: bool = True


def step_event(record: logging.LogRecord) -> StepEvent | None:
    """What one log record says about a step (a task run), or None if it is not about one."""
    run_id, step = getattr(record, "task_run_id", None), getattr(record, "task_name", None)
    if not run_id or not step:
        return None
    message = record.getMessage()
    if message.startswith(_FINISHED):
        state = message[len(_FINISHED):].split("\n", 1)[0]
        ok = state.startswith(("Completed", "Cached"))
        return StepEvent("finish", str(run_id), step, "" if ok else state.split("(", 1)[0].lower(), ok)
    if message.startswith(f"{step}: "):
        return StepEvent("note", str(run_id), step, _TOOK.sub("", message[len(step) + 2:]).strip())
    retry = _RETRY.match(message)
    if retry:
        return StepEvent("retry", str(run_id), step, f"retry {retry['n']}/{retry['of']} after {retry['error']}")
    return StepEvent("start", str(run_id), step)


class _Mark(SpinnerColumn):
    """A spinner while the step runs, then its mark: a tick, or a cross for a failed step."""

    def render(self, task: Task) -> Text:
        mark = task.fields.get("mark")
        return Text(mark, style="green" if mark == "✓" else "red") if mark else super().render(task)


class _Took(ProgressColumn):
    """Time so far, or the time the step took: 0.4s, 12.3s, 2m05s."""

    def render(self, task: Task) -> Text:
        seconds = task.finished_time if task.finished else task.elapsed
        if seconds is None:
            return Text("")
        minutes, rest = divmod(seconds, 60)
        return Text(f"{int(minutes)}m{int(rest):02d}s" if minutes else f"{rest:.1f}s", style="yellow", justify="right")


class _Note(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(task.fields.get("note", ""), style="dim", overflow="ellipsis", no_wrap=True)


class StepProgress:
    """One row per step run, in the order they start. Thread-safe: tasks run in threads too."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(_Mark(), TextColumn("{task.description}"), _Took(), _Note(),
                                 console=console, transient=False)
        self._rows: dict[str, int] = {}
        self._runs = Counter()
        self._lock = threading.Lock()

    def _row(self, run_id: str, step: str) -> int:
        with self._lock:
            if run_id not in self._rows:
                if _WAITING in self._rows:  # the first step has started: the wait is over
                    self.progress.update(self._rows[_WAITING], completed=1, mark="✓")
                self._runs[step] += 1
                label = step if self._runs[step] == 1 else f"{step} ({self._runs[step]})"  # e.g. per period
                self._rows[run_id] = self.progress.add_task(label, total=1, mark="", note="")
            return self._rows[run_id]

    def apply(self, event: StepEvent) -> None:
        row = self._row(event.run_id, event.step)
        if event.kind in ("note", "retry"):
            self.progress.update(row, note=event.text)
        elif event.kind == "finish":
            fields = {"mark": "✓"} if event.ok else {"mark": "✗", "note": event.text}
            self.progress.update(row, completed=1, **fields)

    def waiting(self, label: str, note: str) -> None:
        """A row for the wait before the first step (Prefect's embedded server takes seconds)."""
        with self._lock:
            self._rows[_WAITING] = self.progress.add_task(label, total=1, mark="", note=note)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """A step of the command itself, outside any flow (the demo's sample store)."""
        run_id = f"cli:{name}"
        self.apply(StepEvent("start", run_id, name))
        ok = False
        try:
            yield
            ok = True
        finally:
            self.apply(StepEvent("finish", run_id, name, "" if ok else "failed", ok))

    def stop(self) -> None:
        """Steps still running when the command ends were cut short: no spinner left behind."""
        with self._lock:
            for task in self.progress.tasks:
                if not task.finished:
                    self.progress.update(task.id, mark="·", note="stopped")
        self.progress.stop()


class StepLog(logging.Handler):
    """Feeds the step events in Prefect's task-run records to a StepProgress."""

    def __init__(self, steps: StepProgress) -> None:
        super().__init__(level=logging.DEBUG)
        self.steps = steps

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event = step_event(record)
            if event is not None:
                self.steps.apply(event)
        except Exception:  # a display must never fail a close
            self.handleError(record)


class AsBefore(logging.Filter):
    """Keeps a handler's output as it was before the task-run logger was opened up to debug for
    the progress: task-run records below the level the user chose stay out. A console handler's
    records are printed through the progress console, above the live display, not across it,
    except what the display already says: a step's final state (its mark) and a user's mistake
    (the command's own `billrun: error:` line). A bug's traceback is still printed."""

    def __init__(self, level: int, handler: logging.Handler, console: Console | None) -> None:
        super().__init__()
        self.level, self.handler, self.console = level, handler, console

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(TASK_RUNS) and record.levelno < self.level:
            return False
        if self.console is not None:
            said = getattr(record, "billrun_user_error", False) or (
                record.name.startswith(("prefect.task_runs", "prefect.flow_runs")) and record.exc_info is None
                and record.getMessage().startswith(_FINISHED))
            if not said:
                self.console.print(Text(self.handler.format(record)), soft_wrap=True)
            return False
        return True


def wanted(settings: Settings, *, as_json: bool, verbose: bool, enabled: bool = True,
           stream: TextIO | None = None) -> bool:
    """Show progress only to a person at a terminal who asked for neither JSON nor log lines
    (and is not in CI or on a dumb terminal: `settings`)."""
    import sys

    stream = sys.stderr if stream is None else stream
    is_tty = getattr(stream, "isatty", lambda: False)()
    return (enabled and not as_json and not verbose and is_tty and not settings.ci and not settings.dumb_terminal
            and logging.getLogger(TASK_RUNS).getEffectiveLevel() > logging.INFO)


def _handlers_of(logger: logging.Logger) -> list[logging.Handler]:
    found: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        found += current.handlers
        current = current.parent if current.propagate else None
    return found


@contextmanager
def show_steps(console: Console, on: bool, flow: bool = True) -> Iterator[StepProgress | None]:
    """While the block runs, show the steps of the flows it runs (when `on`); restores logging.
    `flow`: the block starts a flow run, so the wait for its first step gets a row of its own."""
    if not on:
        yield None
        return
    logger = logging.getLogger(TASK_RUNS)
    level_before, user_level = logger.level, logger.getEffectiveLevel()
    filters = []
    for handler in _handlers_of(logger):
        to_console = isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "isatty", lambda: False)()
        keep = AsBefore(user_level, handler, console if to_console else None)
        handler.addFilter(keep)
        filters.append((handler, keep))
    steps = StepProgress(console)
    feed = StepLog(steps)
    logger.addHandler(feed)
    logger.setLevel(logging.DEBUG)  # the "created" records are debug: they say a step started
    if flow:
        steps.waiting("prefect", "starting the flow run")
    steps.progress.start()
    try:
        yield steps
    finally:
        steps.stop()
        logger.removeHandler(feed)
        logger.setLevel(level_before)
        for handler, keep in filters:
            handler.removeFilter(keep)
