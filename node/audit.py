"""The audit trail: one JSON object per line, appended to data_dir/audit.jsonl, never rewritten.

Events: association (accepted or rejected, with why), instance (received / skipped / duplicate / refused, with
UIDs and job id), delivery (results to a destination, with status), admin (resend). UIDs, AE titles and addresses
only — never patient names, IDs or birth dates. Together with `cxrnode jobs` it answers "did this study get its
result, when, and where did it go":

    grep 1.2.840.113619.2.55.3 cxrnode-data/audit.jsonl
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

AUDIT_FILE = "audit.jsonl"

log = logging.getLogger(__name__)


class AuditLog:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / AUDIT_FILE
        self._lock = threading.Lock()

    def record(self, event: str, **fields: Any) -> None:
        """Append one event. O_APPEND makes each line land whole even with several writers (the CLI included)."""
        entry = {
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
            "event": event,
            **fields,
        }
        line = (json.dumps(entry, default=str, ensure_ascii=False) + "\n").encode()
        with self._lock:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                try:
                    os.write(fd, line)
                finally:
                    os.close(fd)
            except OSError as error:  # a full disk must not stop the node; the job table remains the record
                log.warning("audit: cannot append to %s (%s): %s", self.path, error, line.decode().strip())

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
