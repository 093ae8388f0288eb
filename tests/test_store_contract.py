"""The store contract (node.store.Store), run against both backends: a folder (file://) with the SQLite queue, and
a real PostgreSQL server (tests/postgres.py) holding the queue and the objects. Also: a full disk (a small tmpfs)
answers StoreFull, keys never reach outside the store, and start-up's reconcile leaves other nodes' work alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import REPO
from node.queue import JobState, NewJob, Queue, QueueError, connect
from node.service import reconcile
from node.store import (
    Store,
    StoreFull,
    StoreKeyError,
    StoreMissing,
    StoreURLError,
    keep_received,
    object_key,
    result_key,
)
from node.store import connect as connect_store
from postgres import PostgresServer


def new_job(uid: str) -> NewJob:
    return NewJob(uid, "1.2.840.10008.5.1.4.1.1.1", "1.2.3", "1.2.3.4", "1.2.840.10008.1.2.1", "MOD", "CXRNODE",
                  "127.0.0.1", None)  # fmt: skip


@pytest.fixture(params=["file", "postgresql"])
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(store URL, queue URL) of one backend."""
    if request.param == "file":
        return f"file://{tmp_path / 'store'}", f"sqlite://{tmp_path / 'queue.sqlite'}"
    url = request.getfixturevalue("postgres").new_database()
    return url, url


@pytest.fixture
def backend(urls: tuple[str, str]) -> Iterator[tuple[Store, Queue]]:
    queue = connect(urls[1])
    store = connect_store(urls[0], urls[1])
    store.prepare()
    yield store, queue
    store.close()
    queue.close()


def test_put_get_exists_delete(backend: tuple[Store, Queue]) -> None:
    store, _ = backend
    key = object_key("1.2.3")
    assert not store.exists(key)
    with pytest.raises(StoreMissing):
        store.get(key)
    store.put(key, b"first")
    store.put(key, memoryview(b"second"))  # replaces, from a memoryview as pynetdicom hands them
    assert store.exists(key) and store.get(key) == b"second"
    result = result_key("1.2.3", "SEG", "1.2.3.4")
    store.put(result, bytes(range(256)) * 1000)
    assert store.get(result) == bytes(range(256)) * 1000  # binary-safe
    assert sorted(store.keys("spool")) == [key] and sorted(store.keys("results")) == [result]
    assert list(store.keys("spool", older_than_s=3600)) == []  # just written
    store.delete(key)
    store.delete(key)  # nothing there: no error
    assert not store.exists(key) and store.exists(result)


@pytest.mark.parametrize(
    "key", ["../x", "/etc/passwd", "spool/../../x", "a//b", ".hidden", "spool/.part-1", "a/b\x00", "", "a b", "x/"]
)
def test_keys_never_reach_outside_the_store(backend: tuple[Store, Queue], key: str, tmp_path: Path) -> None:
    store, _ = backend
    before = sorted(p for p in tmp_path.rglob("*"))
    for call in (lambda: store.put(key, b"x"), lambda: store.get(key), lambda: store.exists(key),
                 lambda: store.delete(key)):  # fmt: skip
        with pytest.raises(StoreKeyError):
            call()
    assert sorted(p for p in tmp_path.rglob("*")) == before
    with pytest.raises(ValueError):
        object_key("../../etc/passwd")


def test_an_object_and_its_job_are_kept_together_or_not_at_all(backend: tuple[Store, Queue]) -> None:
    store, queue = backend
    job_id, created = keep_received(store, queue, new_job("1.5"), b"image")
    job = queue.get(job_id)
    assert created and job is not None and job.spool_path == object_key("1.5")
    assert store.get(job.spool_path) == b"image"
    again = keep_received(store, queue, new_job("1.5"), b"image")
    assert again == (job_id, False) and store.get(object_key("1.5")) == b"image"
    # A job the queue refuses (NOT NULL peer_address): the object is not kept either.
    with pytest.raises(QueueError):
        keep_received(store, queue, replace(new_job("1.6"), peer_address=None), b"image")  # type: ignore[arg-type]
    assert queue.find("1.6") is None and not store.exists(object_key("1.6"))


def test_postgresql_object_and_job_are_one_commit(postgres: PostgresServer) -> None:
    """The object row is written after the job row in the same transaction: if it fails, the job is gone too."""
    url = postgres.new_database()
    queue, store = connect(url), connect_store(url, url)
    try:
        with pytest.raises(QueueError):
            store.add_with_job(queue, object_key("1.7"), None, new_job("1.7"))  # type: ignore[arg-type]
        assert queue.find("1.7") is None and not store.exists(object_key("1.7"))
        with pytest.raises(QueueError, match="keeps no objects"):
            connect(f"sqlite:///{postgres.folder}/q.sqlite").add(new_job("1.8"), objects={"spool/x.dcm": b"x"})
    finally:
        store.close()
        queue.close()


def test_a_postgresql_store_must_be_the_queues_database(postgres: PostgresServer, tmp_path: Path) -> None:
    url = postgres.new_database()
    with pytest.raises(StoreURLError, match="queue's database"):
        connect_store(url, f"sqlite://{tmp_path / 'q.sqlite'}")
    with pytest.raises(StoreURLError, match="queue's database"):
        connect_store(url, postgres.new_database())
    with pytest.raises(StoreURLError, match="file:///PATH"):
        connect_store("s3://bucket/x")


def test_concurrent_writers(backend: tuple[Store, Queue]) -> None:
    """Sixteen threads write their own objects and the same one: every object is whole, the shared one is one
    writer's whole value."""
    store, _ = backend
    values = {n: bytes([n]) * (200_000 + n) for n in range(16)}

    def write(n: int) -> None:
        for round_ in range(5):
            store.put(object_key(f"2.{n}.{round_}"), values[n])
            store.put(object_key("2.0"), values[n])

    threads = [threading.Thread(target=write, args=(n,)) for n in values]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for n, value in values.items():
        assert all(store.get(object_key(f"2.{n}.{r}")) == value for r in range(5))
    assert store.get(object_key("2.0")) in values.values()
    assert len(list(store.keys("spool"))) == 16 * 5 + 1


WRITER = """
import sys
from node.store import connect, object_key
store = connect(sys.argv[1], sys.argv[2])
for n in range(10_000):
    store.put(object_key(f"3.{n}"), bytes([n % 256]) * 300_000)
    print(n, flush=True)
"""


def test_what_put_returned_survives_a_kill(urls: tuple[str, str]) -> None:
    """A writer killed (SIGKILL) mid-stream: every object whose put returned is whole, no half-written one is
    listed, and prepare() removes what the kill left behind."""
    queue = connect(urls[1])  # the schema
    queue.close()
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, *urls], stdout=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert writer.stdout is not None
    done = [writer.stdout.readline() for _ in range(25)]
    time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait(30)
    returned = [int(line) for line in done if line.strip()]
    assert len(returned) == 25
    store = connect_store(*urls)
    try:
        store.prepare()
        keys = set(store.keys("spool"))
        for n in returned:
            assert store.get(object_key(f"3.{n}")) == bytes([n % 256]) * 300_000
        for key in keys:  # the one being written at the kill is either whole or absent
            n = int(key.rsplit("/", 1)[-1].removesuffix(".dcm").split(".")[1])
            assert store.get(key) == bytes([n % 256]) * 300_000
        if urls[0].startswith("file://"):
            folder = Path(urls[0][len("file://") :])
            assert not list(folder.rglob(".part-*")), "prepare() left partial files"
    finally:
        store.close()


def test_a_full_disk_is_store_full(tmp_path: Path) -> None:
    """A 4 MB tmpfs: a put that does not fit raises StoreFull, leaves no partial file and the old object whole."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        store = connect_store(f"file://{mount_point}")
        store.prepare()
        key = object_key("4.1")
        store.put(key, b"small")
        with pytest.raises(StoreFull, match="full"):
            store.put(key, b"x" * 8_000_000)
        assert store.get(key) == b"small"
        assert not list(mount_point.rglob(".part-*"))
        with pytest.raises(StoreFull):
            keep_received(store, connect(f"sqlite://{tmp_path / 'q.sqlite'}"), new_job("4.2"), b"x" * 8_000_000)
        assert not store.exists(object_key("4.2"))
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_reconcile_leaves_other_nodes_objects_and_jobs_alone(postgres: PostgresServer, tmp_path: Path) -> None:
    """A shared PostgreSQL queue: node B's unfinished job, whose object is in B's own folder, is not failed by
    node A's start-up, and a young object in a shared folder whose job is not committed yet is not deleted. On
    the embedded default (SQLite, the data dir) a lost object still fails its job, and an orphan is removed."""
    url = postgres.new_database()
    queue = connect(url)
    b_store = connect_store(f"file://{tmp_path / 'b'}")
    keep_received(b_store, queue, new_job("5.1"), b"image of node b")
    a_store = connect_store(f"file://{tmp_path / 'a'}")
    reconcile(a_store, queue, "node-a")
    job = queue.find("5.1")
    assert job is not None and job.state is JobState.RECEIVED and job.error is None
    shared = connect_store(f"file://{tmp_path / 'shared'}", shared=True)
    shared.put(object_key("5.2"), b"job not committed yet")
    reconcile(shared, queue, "node-a")
    assert shared.exists(object_key("5.2"))
    queue.close()

    local_queue = connect(f"sqlite://{tmp_path / 'queue.sqlite'}")
    local = connect_store(f"file://{tmp_path / 'local'}")
    keep_received(local, local_queue, new_job("5.3"), b"image")
    local.delete(object_key("5.3"))  # lost
    local.put(object_key("5.4"), b"never acknowledged")  # no job
    reconcile(local, local_queue, "node-a")
    lost = local_queue.find("5.3")
    assert lost is not None and lost.state is JobState.FAILED and not local.exists(object_key("5.4"))
    local_queue.close()
