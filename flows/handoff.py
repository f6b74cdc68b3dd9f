"""What one step of a run hands the next as files in the run's work folder, not as objects.

A Prefect task's arguments live as long as the call, and a flow's variables as long as the flow:
an object handed from step to step stays in memory until the run ends, beside every later step's
own. The close's 100k rated invoices are handed over as pickles instead (exact: the same
Decimals, dates and shared objects come back), so each step holds them only while it uses them,
and the render workers read their invoices from the files themselves. The wallet replay is not:
pickled, its ledger and per-day units cost about 10 CPU s at 10M events, and the memory it gave
back went to no later step (the interpreter keeps the arenas its freed objects leave behind).
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

from transforms.collector import cycle_collector_paused

CHUNK_INVOICES = 1000
"""Invoices per file: what a render worker reads and holds at once."""


@dataclass(frozen=True)
class Handed:
    """One object a step left in a file of the work folder."""

    path: str

    def taken(self):
        """The object, read back (the cycle collector paused: it is acyclic, and built of
        objects by the hundred thousand)."""
        with cycle_collector_paused(), open(self.path, "rb") as fh:
            return pickle.load(fh)


def hand_over(obj, path: Path) -> Handed:
    """`obj` pickled to `path`, for the next steps to read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        pickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)
    return Handed(str(path))


@dataclass(frozen=True)
class InvoiceFiles:
    """The rated invoices as files of up to CHUNK_INVOICES each, in invoice order: each invoice
    with what its document shows beside it, (invoice, customer, rounding, credits), the job a
    render worker is given (flows/render_pool.py)."""

    chunks: tuple[Handed, ...]
    counts: tuple[int, ...]  # invoices per file

    @property
    def count(self) -> int:
        return sum(self.counts)

    def read(self) -> list:
        """Every invoice, in order."""
        return [job[0] for chunk in self.chunks for job in chunk.taken()]


def invoice_files(jobs: list[tuple], folder: Path, chunk: int = CHUNK_INVOICES) -> InvoiceFiles:
    """`jobs`, (invoice, customer, rounding, credits) each, into files under `folder`, `chunk`
    at a time. Written with the invoices, the customers and credits of their documents are never
    built in the step that writes the tables, where they would outlive the invoices read back
    there and keep their memory from the process when those go."""
    parts = [jobs[i:i + chunk] for i in range(0, len(jobs), chunk)]
    return InvoiceFiles(tuple(hand_over(part, folder / f"invoices-{n:05d}.pickle") for n, part in enumerate(parts)),
                        tuple(map(len, parts)))
