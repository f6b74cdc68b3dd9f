"""The one retry rule of billrun's IO tasks."""
from __future__ import annotations

from transforms.errors import BillrunError


def transient(task, task_run, state) -> bool:
    """Retry an IO task on what may pass (network, throttling, a full disk freed), never on a
    user's mistake: a missing customers file or a bad cost row is still wrong 40 seconds later."""
    try:
        state.result()
    except BillrunError:
        return False
    except Exception:
        return True
    return False


IO_RETRIES = {"retries": 3, "retry_delay_seconds": [2, 10, 30], "retry_condition_fn": transient}
