"""One node per data folder: an exclusive lock on `data_dir/cxrnode.lock`, held for as long as the node runs.

Two nodes on one folder would share its spool and its queue, and each would treat the other's jobs as its own: the
second node's worker would take the first's images and finish them with its own settings (another destination, or
none). So the second refuses to start, naming the process that holds the folder. The lock is `flock(2)`: the kernel
releases it when the holder exits, however it exits (SIGKILL included), so a stale lock file never keeps a node from
starting.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

LOCK_FILE = "cxrnode.lock"


class DataDirInUse(RuntimeError):
    """Another process holds the data folder."""


class DataDirLock:
    """Held from `acquire` until `release` (or the process's exit)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> DataDirLock:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirInUse(
                f"data folder {self.data_dir} is in use by cxrnode {holder}; stop that node, or give this one "
                "another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None

    def __enter__(self) -> DataDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
