"""Python's cycle collector paused around the steps that build millions of small objects.

The close and nightly build invoice lines, ledger entries and table cells by the million. None of
them is part of a reference cycle, so the collector finds nothing to free, but each of its full
passes walks every object alive: a cProfile of the steps after the usage check on a 10M-event close
found it at about 40% of rating 100k invoices (533b3cc), and a few seconds a pass once a close's
invoices and ledger are in memory. Pausing it changes no result, only the time.

What a paused block built and keeps (the rated invoices, the replay) is moved into the oldest
generation when the collector comes back, without a pass over it: left in the youngest, the first
allocation after the block walks every one of those objects (1.4 CPU s after rating 100k
invoices at 10M events), and the middle generation's next pass walks them again.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager


@contextmanager
def cycle_collector_paused():
    """The cycle collector off for a block (or, as a decorator, a function) that builds acyclic
    objects by the million; the previous state comes back at the end, so nested uses and a
    caller that had it off are left as they were."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.freeze()  # every tracked object into the permanent generation, the young count reset,
            gc.unfreeze()  # and back into the oldest generation: promoted with no pass over them
            gc.enable()
