"""The SQLite queue's state machine and the spool's durable writes."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest

from node.queue import JobState, NewJob, QueueError, ResultObject
from node.queue.sqlite import SQLiteQueue
from node.spool import Spool, SpoolError, safe_uid, write_durably
from node.worker_process import Doorbell


def new_job(uid: str, state: JobState = JobState.RECEIVED) -> NewJob:
    return NewJob(
        uid,
        "1.2.840.10008.5.1.4.1.1.1",
        "1.2.3",
        "1.2.3.4",
        "1.2.840.10008.1.2.1",
        "MOD",
        "CXRNODE",
        "127.0.0.1",
        f"spool/{uid}.dcm",
        state,
        None if state is JobState.RECEIVED else "lateral",
    )


def test_wal_and_full_sync(tmp_path: Path) -> None:
    queue = SQLiteQueue(tmp_path / "q.sqlite")
    with queue._borrowed() as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_short_lived_threads_do_not_leak_connections(tmp_path: Path) -> None:
    """pynetdicom runs every association in a new thread: 200 of them, each adding a job and reading it back, must
    leave the process with no more open files than a few concurrent ones need."""
    queue = SQLiteQueue(tmp_path / "q.sqlite")
    before = len(os.listdir("/proc/self/fd"))
    read_back: dict[int, str | None] = {}  # what each thread read back, checked here: an assert in a thread only warns

    def association(n: int) -> None:
        job_id, _ = queue.add(new_job(f"1.2.{n}"))
        job = queue.get(job_id)
        read_back[n] = None if job is None else job.sop_instance_uid

    for n in range(200):
        thread = threading.Thread(target=association, args=(n,))
        thread.start()
        thread.join()
    assert read_back == {n: f"1.2.{n}" for n in range(200)}
    assert len(queue.jobs(None, limit=1000)) == 200
    assert len(os.listdir("/proc/self/fd")) - before <= 4  # one pooled connection: the database and its WAL


def test_one_job_per_sop_instance(tmp_path: Path) -> None:
    queue = SQLiteQueue(tmp_path / "q.sqlite")
    first, created = queue.add(new_job("1.1"))
    again, created_again = queue.add(new_job("1.1"))
    assert created and not created_again and first == again
    assert queue.counts()[JobState.RECEIVED] == 1


def test_life_of_a_job(tmp_path: Path) -> None:
    queue = SQLiteQueue(tmp_path / "q.sqlite")
    job_id, _ = queue.add(new_job("1.1"))
    queue.add(new_job("1.2", JobState.SKIPPED))
    [claimed] = queue.claim(4, "node-a", 30)
    assert claimed.id == job_id and claimed.state is JobState.INFERRING
    assert queue.claim(4, "node-b", 30) == []  # nobody else gets it
    queue.set_state(job_id, JobState.WRITING, expect=JobState.INFERRING)
    result = ResultObject("SEG", "1.2.840.10008.5.1.4.1.1.66.4", "2.25.1", "results/x.dcm")
    queue.set_results(job_id, [result], JobState.SENDING)
    assert [j.id for j in queue.claim_due(1e12, 10, "node-a", 30)] == [job_id]
    queue.record_attempt(job_id, delivered=[], error="pacs: refused", next_attempt_at=1e12 + 5, state=JobState.SENDING)
    assert queue.claim_due(1e12, 10, "node-a", 30) == []
    job = queue.get(job_id)
    assert job is not None and job.attempts == 1 and job.error == "pacs: refused" and job.results == (result,)
    queue.record_attempt(job_id, delivered=["pacs"], error="archive: down", next_attempt_at=0, state=JobState.DEAD)
    [revived] = queue.revive(None)
    assert revived.state is JobState.SENDING
    job = queue.get(job_id)
    assert job is not None and job.attempts == 0 and job.delivered == () and job.state is JobState.SENDING


def test_recover_returns_interrupted_jobs_to_received(tmp_path: Path) -> None:
    queue = SQLiteQueue(tmp_path / "q.sqlite")
    for uid in ("1.1", "1.2", "1.3"):
        queue.add(new_job(uid))
    a, b, _ = queue.claim(3, "node-a", 30)
    queue.set_state(b.id, JobState.WRITING)
    queue.close()
    reopened = SQLiteQueue(tmp_path / "q.sqlite")
    assert reopened.recover("node-a") == 3
    assert reopened.counts()[JobState.RECEIVED] == 3


def test_claims_from_many_threads_never_overlap(tmp_path: Path) -> None:
    queue = SQLiteQueue(tmp_path / "q.sqlite")
    for i in range(200):
        queue.add(new_job(f"1.{i}"))
    taken: list[int] = []
    lock = threading.Lock()

    def take() -> None:
        while jobs := queue.claim(3, threading.current_thread().name, 30):
            with lock:
                taken.extend(j.id for j in jobs)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == sorted(set(taken)) and len(taken) == 200


def test_unwritable_database_is_a_queue_error(tmp_path: Path) -> None:
    (tmp_path / "dir.sqlite").mkdir()
    with pytest.raises(QueueError, match="dir.sqlite"):
        SQLiteQueue(tmp_path / "dir.sqlite")


def test_durable_write_is_all_or_nothing(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b.dcm"
    write_durably(target, b"x" * 100)
    assert target.read_bytes() == b"x" * 100
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SpoolError):
        write_durably(blocker / "c.dcm", b"data")  # parent is a file
    assert not list(tmp_path.rglob(".part-*"))


def test_spool_paths_only_for_real_uids(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.prepare()
    path = spool.store_object("1.2.3", b"dicom")
    assert path.name == "1.2.3.dcm" and path.parent.parent == spool.root
    for bad in ("../../etc/passwd", "1.2.a", "", "1." * 40 + "1"):
        with pytest.raises(ValueError):
            safe_uid(bad)


def test_prepare_removes_partial_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.prepare()
    (spool.temp / ".part-123").write_bytes(b"half")
    (spool.results / "1.2").mkdir()
    (spool.results / "1.2" / ".part-9").write_bytes(b"half")
    assert spool.prepare() == 2
    assert not os.listdir(spool.temp)


def _ring_and_die(bell: Doorbell) -> None:
    bell.wait(timeout=0.01)  # takes and gives back what a lock-based Event would hold
    bell.set()
    os._exit(0)


def test_doorbell_wakes_across_processes_and_survives_a_killed_waiter() -> None:
    """The wake-up between the receiving and the worker process: after a waiter is killed mid-wait, a ring from
    another process is still heard; waiting does not clear, clear() forgets every ring, excess rings are capped.
    (The lock a killed process could leave held in multiprocessing.Event is covered end to end by
    test_node_reliability.py::test_a_dead_worker_process_is_restarted, which hung on it.)"""
    context = multiprocessing.get_context("spawn")
    bell = Doorbell(context)
    assert not bell.wait(timeout=0.05)
    waiter = context.Process(target=Doorbell.wait, args=(bell, 60.0))
    waiter.start()
    time.sleep(0.5)
    waiter.kill()
    waiter.join()
    ringer = context.Process(target=_ring_and_die, args=(bell,))
    ringer.start()
    ringer.join(30)
    assert ringer.exitcode == 0
    assert bell.wait(timeout=5.0)  # heard, and waiting does not clear it
    assert bell.wait(timeout=0.05)
    bell.clear()
    assert not bell.wait(timeout=0.05)
    for _ in range(100):
        bell.set()  # rings beyond MAX_RINGS are dropped, not counted
    bell.clear()
    assert not bell.wait(timeout=0.05)
