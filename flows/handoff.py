"""What one step of a run hands the next as files in the run's work folder, not as objects.

A Prefect task's arguments live as long as the call, and a flow's variables as long as the flow:
an object handed from step to step stays in memory until the run ends, beside every later step's
own. The close's 100k rated invoices are handed over as pickles instead (exact: the same
Decimals, dates and shared objects come back), so each step holds them only while it uses them,
and the render workers read their invoices from the files themselves. The wallet replay is not:
pickled, its ledger and per-day units cost about 10 CPU s at 10M events, and the memory it gave
back went to no later step (the interpreter keeps the arenas its freed objects leave behind).

Rating shares one line object among the invoices that bill the same thing (see
transforms.engine.invoices.charge_lines): most of a close's line rows are a few thousand
objects. A pickle keeps that sharing only within itself, so the lines that invoices of more than
one file bill are written once, to a file of their own, and each invoice file names them by
their place there: pickled into every file that used them, they cost about a third of the files'
writing and reading, and came back as one object per file, which the invoice_lines table then
formatted once per copy.
"""
from __future__ import annotations

import copyreg
import pickle
from dataclasses import dataclass
from pathlib import Path

from transforms.collector import cycle_collector_paused
from transforms.engine.invoices import Line

CHUNK_INVOICES = 1000
"""Invoices per file: what a render worker reads and holds at once."""


def shared_line(index: int) -> Line:
    """What an invoice file holds for the line at `index` of the shared lines' file: its readers
    (read_chunk) resolve it to that line, so a file read without them fails here."""
    raise pickle.UnpicklingError(f"shared line {index}: an invoice file is read with its shared lines "
                                 f"(flows.handoff.read_chunk)")


class _ChunkReader(pickle.Unpickler):
    """An invoice file's unpickler: `shared_line(i)` in it is the i-th line of `shared`."""

    def __init__(self, fh, shared: tuple[Line, ...]):
        super().__init__(fh)
        self._shared = shared

    def find_class(self, module: str, name: str):
        if module == __name__ and name == shared_line.__name__:
            return self._shared.__getitem__  # called by the C unpickler, once per line and file
        return super().find_class(module, name)


def hand_over(obj, path: Path) -> Path:
    """`obj` pickled to `path` in the work folder, for a later step to read back (`taken`)."""
    with path.open("wb") as fh:
        pickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)
    return path


def taken(path: str | Path):
    """The object a step left at `path` (`hand_over`), read with the cycle collector paused: what
    crosses is acyclic, and built of objects by the thousand."""
    with cycle_collector_paused(), open(path, "rb") as fh:
        return pickle.load(fh)


def read_shared(path: str) -> tuple[Line, ...]:
    """The lines that invoices of more than one file bill, in their order (see read_chunk)."""
    return taken(path)


def read_chunk(path: str, shared: tuple[Line, ...]) -> list[tuple]:
    """An invoice file's jobs, (invoice, customer, rounding, credits) each, its lines that other
    files bill too taken from `shared` (read_shared of its InvoiceFiles). The cycle collector is
    paused: the jobs are acyclic, and built of objects by the hundred thousand."""
    with cycle_collector_paused(), open(path, "rb") as fh:
        return _ChunkReader(fh, shared).load()


@dataclass(frozen=True)
class InvoiceFiles:
    """The rated invoices as files of up to CHUNK_INVOICES each, in invoice order: each invoice
    with what its document shows beside it, (invoice, customer, rounding, credits), the job a
    render worker is given (flows/render_pool.py); and the file of the lines that invoices of
    more than one file bill (read_shared)."""

    chunks: tuple[str, ...]
    counts: tuple[int, ...]  # invoices per file
    shared: str

    @property
    def count(self) -> int:
        return sum(self.counts)

    def read(self) -> list:
        """Every invoice, in order, a line shared by invoices one object as it was when rated."""
        shared = read_shared(self.shared)
        return [job[0] for path in self.chunks for job in read_chunk(path, shared)]


def invoice_files(jobs: list[tuple], folder: Path, chunk: int = CHUNK_INVOICES) -> InvoiceFiles:
    """`jobs`, (invoice, customer, rounding, credits) each, into files under `folder`, `chunk`
    at a time, and the lines that invoices of more than one file bill into a file of their own.
    Written with the invoices, the customers and credits of their documents are never built in
    the step that writes the tables, where they would outlive the invoices read back there and
    keep their memory from the process when those go."""
    parts = [jobs[i:i + chunk] for i in range(0, len(jobs), chunk)]
    first_file: dict[int, int] = {}  # id of a line -> the first file that bills it (the jobs keep it alive)
    shared: dict[int, Line] = {}
    for number, part in enumerate(parts):
        for job in part:
            for line in job[0].lines:
                if first_file.setdefault(id(line), number) != number:
                    shared[id(line)] = line
    del first_file
    place = {ident: n for n, ident in enumerate(shared)}
    folder.mkdir(parents=True, exist_ok=True)
    shared_path = hand_over(tuple(shared.values()), folder / "shared-lines.pickle")

    def reduced(line: Line):
        """A shared line as its place in the shared file; any other as pickle reduces it. Called
        once per line object and file: the pickler's memo answers for it after the first."""
        index = place.get(id(line))
        return line.__reduce_ex__(pickle.HIGHEST_PROTOCOL) if index is None else (shared_line, (index,))

    paths = []
    for number, part in enumerate(parts):
        path = folder / f"invoices-{number:05d}.pickle"
        with path.open("wb") as fh:
            pickler = pickle.Pickler(fh, protocol=pickle.HIGHEST_PROTOCOL)
            pickler.dispatch_table = {**copyreg.dispatch_table, Line: reduced}
            pickler.dump(part)
        paths.append(str(path))
    return InvoiceFiles(tuple(paths), tuple(map(len, parts)), str(shared_path))
