"""The file store: objects as files in a folder, each written to a temporary file, fsynced, renamed into place and
its folder fsynced, so that after a crash a file is either complete under its final name or not there at all.

    FOLDER/spool/<2 hex>/<SOP Instance UID>.dcm    received objects waiting for (or failed in) analysis
    FOLDER/spool/tmp/                              objects being received; what a crash left is removed at start
    FOLDER/results/<Study Instance UID>/<kind>-<SOP Instance UID>.dcm   result objects
    FOLDER/thumbnails/<job id>.png                 overlay thumbnails for the status page (not fsynced)
    FOLDER/overlays/<job id>.jpg                   the same overlays at full size (long side up to 1600 px)

FOLDER is the data dir unless `[store] url` names another (a shared mount, for several nodes).
"""

from __future__ import annotations

import errno
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from node.faults import crash_point
from node.store import OBJECTS, RESULTS, StoreError, StoreFull, StoreMissing, check_key

if TYPE_CHECKING:
    from node.queue import NewJob, Queue

FULL = (errno.ENOSPC, errno.EDQUOT)
LEFTOVER_AGE_S = 3600.0
"""On a shared folder, a temporary file this old is a crash's leftover, not another node's write in progress."""


class SpoolError(OSError):
    """A file could not be stored durably (disk full, permissions, I/O error)."""


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes | memoryview, temp_dir: Path | None = None, *, durable: bool = True) -> None:
    """Write `data` to `path` so that after a crash it is either complete or absent (`durable=False`: readers
    still see all or nothing, but a crash may lose it). Raises SpoolError."""
    folder = path.parent
    temp_folder = temp_dir or folder
    tmp_name: str | None = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        temp_folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=temp_folder, prefix=".part-", delete=False) as tmp:
            tmp_name = tmp.name
            tmp.write(data)
            tmp.flush()
            if durable:
                os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        if durable:
            fsync_directory(folder)
    except OSError as error:
        raise SpoolError(error.errno, f"cannot store {path.name}: {error.strerror or error}") from error
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass


class FileStore:
    def __init__(self, folder: Path, *, shared: bool = False) -> None:
        self.folder = folder
        self.shared = shared
        self.url = f"file://{folder}"
        self.spool = folder / OBJECTS
        self.temp = self.spool / "tmp"
        self.results = folder / RESULTS

    def path(self, key: str) -> Path:
        return self.folder / check_key(key)

    def put(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        path = self.path(key)
        try:
            write_durably(path, data, self.temp if key.startswith(OBJECTS + "/") else None, durable=durable)
        except SpoolError as error:
            if error.errno in FULL:
                raise StoreFull(f"{self.folder} is full: {error.strerror}") from error
            raise StoreError(str(error.strerror or error)) from error

    def get(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise StoreMissing(f"{key} is not in {self.folder}") from None
        except OSError as error:
            raise StoreError(f"cannot read {self.path(key)}: {error.strerror or error}") from error

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        try:
            self.path(key).unlink(missing_ok=True)
        except OSError as error:
            raise StoreError(f"cannot remove {self.path(key)}: {error.strerror or error}") from error

    def keys(self, prefix: str, *, older_than_s: float = 0.0) -> Iterator[str]:
        base = self.path(prefix)
        if not base.is_dir():
            return
        cutoff = time.time() - older_than_s
        for path in base.rglob("*"):
            if path.name.startswith(".") or path.parent == self.temp or not path.is_file():
                continue
            if older_than_s and path.stat().st_mtime > cutoff:
                continue
            yield path.relative_to(self.folder).as_posix()

    def add_with_job(self, queue: Queue, key: str, data: bytes | memoryview, job: NewJob) -> tuple[int, bool]:
        self.put(key, data)
        crash_point("spooled")
        try:
            return queue.add(job)
        except BaseException:
            self.delete(key)  # never acknowledged: nothing is kept
            raise

    def prepare(self) -> int:
        """Create the folders and delete partial files left by a crash (on a shared folder, only those older than
        an hour: younger ones may be another node's writes in progress)."""
        try:
            for folder in (self.spool, self.temp, self.results):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreError(f"cannot create {self.folder}'s folders: {error.strerror or error}") from error
        cutoff = time.time() - LEFTOVER_AGE_S if self.shared else float("inf")
        removed = 0
        for leftover in list(self.temp.iterdir()) + list(self.folder.glob("*/**/.part-*")):
            try:
                if leftover.stat().st_mtime <= cutoff:
                    leftover.unlink(missing_ok=True)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def space(self) -> tuple[int, int] | None:
        stats = os.statvfs(self.spool if self.spool.exists() else self.folder)
        return stats.f_bavail * stats.f_frsize, stats.f_blocks * stats.f_frsize

    def local_path(self, key: str) -> Path | None:
        return self.path(key)

    def where(self, key: str | None = None) -> str:
        return str(self.folder / key) if key else str(self.folder)

    def close(self) -> None:
        pass
