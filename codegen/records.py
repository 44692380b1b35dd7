"""Reading meta-schedule tuning records: which ones measured a time, and what time."""
from __future__ import annotations

from tvm.s_tir import meta_schedule as ms

#: the run time meta-schedule stores for a candidate that failed to run
STORED_FAILURE = 1e10
#: any run time past this is a failure
FAILED_RUN_SECS = 1e9


def measured_seconds(record: ms.database.TuningRecord) -> float | None:
    """Mean run time of a record; None when it failed or was never run."""
    if not record.run_secs:
        return None
    seconds = sum(float(s) for s in record.run_secs) / len(record.run_secs)
    return seconds if seconds < FAILED_RUN_SECS else None
