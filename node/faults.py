"""Named crash points for the fault-injection tests.

    CXRNODE_CRASH_AT=spooled:3 cxrnode serve ...

kills the node with SIGKILL (no clean-up, as a power cut would) the 3rd time a process of it reaches the point
`spooled`: the receiving process first, then the process that reached the point (the worker's points are reached
in the worker process).
Without the variable, `crash_point` does nothing. The points, in the order an image meets them:

    received   the whole object is in memory, nothing written yet
    spooled    the object is fsynced in the spool, its job row not yet committed
    inferring  a batch is claimed, the models are about to run
    writing    the first result object is on disk, the job not yet updated
    sending    a destination has the results, the job not yet marked delivered

A poison image, one that kills the worker process every time it is analysed (as a crash in a native library or the
out-of-memory killer would), is made with

    CXRNODE_WORKER_DIES_ON=<SOP Instance UID>[,<SOP Instance UID>...] cxrnode serve ...

`worker_dies_on` SIGKILLs the worker process alone (the node notices and starts another) each time the models are
about to run on a batch that contains one of these images.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterable

_counts: dict[str, int] = {}
_lock = threading.Lock()


def crash_point(name: str) -> None:
    target = os.environ.get("CXRNODE_CRASH_AT")
    if not target:
        return
    point, _, nth = target.partition(":")
    if point != name:
        return
    with _lock:
        _counts[name] = _counts.get(name, 0) + 1
        if _counts[name] >= int(nth or 1):
            main = int(os.environ.get("_CXRNODE_MAIN_PID", "0") or 0)
            if main and main != os.getpid():
                os.kill(main, signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)


def worker_dies_on(sop_instance_uids: Iterable[str]) -> None:
    """SIGKILL this process (the worker) if the batch about to be analysed holds an image of CXRNODE_WORKER_DIES_ON."""
    poison = {uid.strip() for uid in os.environ.get("CXRNODE_WORKER_DIES_ON", "").split(",") if uid.strip()}
    if poison.intersection(sop_instance_uids):
        os.kill(os.getpid(), signal.SIGKILL)
