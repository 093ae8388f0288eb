"""The names of the file store from before `node.store`: the durable write (bench/ uses it) and `Spool`, the file
store in a data dir with the file-level helpers older callers and tests use. New code uses `node.store`."""

from __future__ import annotations

from pathlib import Path

from node.store import OVERLAYS, THUMBNAILS, object_key, result_key, safe_uid
from node.store.file import FileStore, SpoolError, fsync_directory, write_durably

__all__ = ["OVERLAYS", "THUMBNAILS", "Spool", "SpoolError", "fsync_directory", "safe_uid", "write_durably"]


class Spool(FileStore):
    """The file store in `data_dir` (keys are paths relative to it)."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.data_dir = data_dir
        self.root = self.spool

    def absolute(self, key: str) -> Path:
        return self.path(key)

    def relative(self, path: Path) -> str:
        return path.relative_to(self.folder).as_posix()

    def object_path(self, sop_instance_uid: str) -> Path:
        return self.path(object_key(sop_instance_uid))

    def store_object(self, sop_instance_uid: str, data: bytes | memoryview) -> Path:
        self.put(object_key(sop_instance_uid), data)
        return self.object_path(sop_instance_uid)

    def result_path(self, study_instance_uid: str, kind: str, sop_instance_uid: str) -> Path:
        return self.path(result_key(study_instance_uid, kind, sop_instance_uid))
