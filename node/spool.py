"""Durable file storage under the data dir: write to a temporary file, fsync it, rename it into place, fsync the
folder. A file is either completely there under its final name or not there at all.

    data_dir/spool/<2 hex>/<SOP Instance UID>.dcm    received objects waiting for (or failed in) analysis
    data_dir/spool/tmp/                              partial receptions; emptied at start-up
    data_dir/results/<Study Instance UID>/<kind>-<SOP Instance UID>.dcm   result objects
    data_dir/thumbnails/<job id>.png                 overlay thumbnails for the status page (not fsynced)
    data_dir/overlays/<job id>.jpg                   the same overlays at full size (long side up to 1600 px)
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
THUMBNAILS = "thumbnails"  # written by node.worker, served by node.web
OVERLAYS = "overlays"  # likewise, full size


class SpoolError(OSError):
    """A file could not be stored durably (disk full, permissions, I/O error)."""


def safe_uid(uid: str) -> str:
    """A UID as a file name; anything that is not a well-formed UID is refused (no path tricks)."""
    uid = uid.strip().rstrip("\x00")
    if not UID_PATTERN.match(uid) or len(uid) > 64:
        raise ValueError(f"{uid!r} is not a valid DICOM UID")
    return uid


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes | memoryview, temp_dir: Path | None = None) -> None:
    """Write `data` to `path` so that after a crash it is either complete or absent. Raises SpoolError."""
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
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        fsync_directory(folder)
    except OSError as error:
        raise SpoolError(error.errno, f"cannot store {path.name}: {error.strerror or error}") from error
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass


class Spool:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.root = data_dir / "spool"
        self.temp = self.root / "tmp"
        self.results = data_dir / "results"

    def prepare(self) -> int:
        """Create the folders and delete partial files left by a crash. Returns how many were deleted."""
        for folder in (self.root, self.temp, self.results):
            folder.mkdir(parents=True, exist_ok=True)
        removed = 0
        for leftover in list(self.temp.iterdir()) + list(self.results.rglob(".part-*")):
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.data_dir))

    def absolute(self, relative: str) -> Path:
        return self.data_dir / relative

    def object_path(self, sop_instance_uid: str) -> Path:
        uid = safe_uid(sop_instance_uid)
        bucket = hashlib.sha1(uid.encode()).hexdigest()[:2]
        return self.root / bucket / f"{uid}.dcm"

    def store_object(self, sop_instance_uid: str, data: bytes | memoryview) -> Path:
        path = self.object_path(sop_instance_uid)
        write_durably(path, data, temp_dir=self.temp)
        return path

    def result_path(self, study_instance_uid: str, kind: str, sop_instance_uid: str) -> Path:
        return self.results / safe_uid(study_instance_uid) / f"{kind.lower()}-{safe_uid(sop_instance_uid)}.dcm"

    def store_result(self, path: Path, data: bytes) -> None:
        write_durably(path, data)

    def objects(self) -> Iterator[Path]:
        for bucket in self.root.iterdir():
            if bucket.is_dir() and bucket != self.temp:
                yield from bucket.glob("*.dcm")

    def remove(self, relative: str | None) -> None:
        if relative:
            self.absolute(relative).unlink(missing_ok=True)

    def free_bytes(self) -> int:
        stats = os.statvfs(self.root if self.root.exists() else self.data_dir)
        return stats.f_bavail * stats.f_frsize

    def total_bytes(self) -> int:
        stats = os.statvfs(self.root if self.root.exists() else self.data_dir)
        return stats.f_blocks * stats.f_frsize
