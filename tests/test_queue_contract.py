"""The queue contract (node.queue.Queue), run against both backends: SQLite and a real PostgreSQL server
(tests/postgres.py). Several handles on one database stand for several nodes."""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import free_port
from node.queue import (
    JobState,
    NewJob,
    Queue,
    QueueSchemaError,
    QueueUnavailable,
    QueueURLError,
    ResultObject,
    Work,
    check_url,
    connect,
    holder_is_gone,
    redacted,
)
from node.queue.leases import LeaseKeeper
from postgres import PASSWORD, PostgresServer, require_postgres

SEG = ResultObject("SEG", "1.2.840.10008.5.1.4.1.1.66.4", "2.25.1", "results/1/seg.dcm")
Opener = Callable[[], Queue]


def new_job(uid: str, state: JobState = JobState.RECEIVED, spool: bool = True) -> NewJob:
    return NewJob(
        uid,
        "1.2.840.10008.5.1.4.1.1.1",
        "1.2.3",
        "1.2.3.4",
        "1.2.840.10008.1.2.1",
        "MOD",
        "CXRNODE",
        "127.0.0.1",
        f"spool/{uid}.dcm" if spool else None,
        state,
        None if state is JobState.RECEIVED else "lateral",
        accession_number="A-17",
        study_date="20240102",
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'queue.sqlite'}"
    return str(request.getfixturevalue("postgres").new_database())


@pytest.fixture
def open_queue(url: str) -> Iterator[Opener]:
    """Opens handles on the test's database (each one a node); all closed at the end."""
    opened: list[Queue] = []

    def opener() -> Queue:
        opened.append(connect(url))
        return opened[-1]

    yield opener
    for queue in opened:
        queue.close()


@pytest.fixture
def queue(open_queue: Opener) -> Queue:
    return open_queue()


def to_sending(queue: Queue, uid: str) -> int:
    job_id, _ = queue.add(new_job(uid))
    [job] = [j for j in queue.claim(100, "worker", 30) if j.id == job_id]
    assert queue.set_results(job.id, [SEG], JobState.SENDING, finding={"opacity_present": True}, model_version="m1")
    return job_id


# -- recording --------------------------------------------------------------------------------------------------------


def test_add_once_per_sop_instance(queue: Queue) -> None:
    job_id, created = queue.add(new_job("1.1"))
    again, created_again = queue.add(new_job("1.1"))
    assert created and not created_again and again == job_id
    skipped, _ = queue.add(new_job("1.2", JobState.SKIPPED, spool=False))
    job = queue.get(job_id)
    assert job is not None and job == queue.find("1.1")
    assert (job.state, job.owner, job.accession_number, job.study_date) == (JobState.RECEIVED, None, "A-17", "20240102")
    assert abs(job.received_at - time.time()) < 60
    assert queue.get(skipped).error == "lateral"  # type: ignore[union-attr]
    assert queue.get(999_999) is None and queue.find("9.9") is None
    counts = queue.counts()
    assert counts[JobState.RECEIVED] == 1 and counts[JobState.SKIPPED] == 1 and sum(counts.values()) == 2


def test_results_finding_and_timings_round_trip(queue: Queue) -> None:
    job_id = to_sending(queue, "1.1")
    queue.add_timing(job_id, "inference", 0.25)
    queue.add_timing(job_id, "inference", 0.5)
    queue.add_timing(job_id, "writing", 0.125)
    job = queue.get(job_id)
    assert job is not None and job.results == (SEG,) and job.finding == {"opacity_present": True}
    assert job.model_version == "m1" and job.owner is None and job.state is JobState.SENDING
    assert job.timings == {"inference": 0.75, "writing": 0.125}


def test_jobs_newest_first_with_pages(queue: Queue) -> None:
    ids = [queue.add(new_job(f"1.{n}"))[0] for n in range(7)]
    queue.set_state(ids[2], JobState.FAILED, error="bad pixels")
    assert [j.id for j in queue.jobs(limit=3)] == ids[:-4:-1]
    assert [j.id for j in queue.jobs(limit=3, before=ids[4])] == [ids[3], ids[2], ids[1]]
    assert [j.id for j in queue.jobs(limit=100, before=ids[0])] == []
    assert [j.id for j in queue.jobs(JobState.FAILED)] == [ids[2]]
    assert [j.id for j in queue.jobs(JobState.RECEIVED, limit=2, before=ids[2])] == [ids[1], ids[0]]
    assert queue.oldest_unfinished() == queue.get(ids[0]).received_at  # type: ignore[union-attr]
    queue.check_writable()


# -- claiming and leases ----------------------------------------------------------------------------------------------


def test_claim_takes_received_jobs_oldest_first_and_records_the_lease(open_queue: Opener) -> None:
    a, b = open_queue(), open_queue()
    ids = [a.add(new_job(f"1.{n}"))[0] for n in range(3)]
    a.add(new_job("1.9", JobState.SKIPPED))
    first = a.claim(2, "node-a", 30)
    assert [j.id for j in first] == ids[:2]
    assert all(j.state is JobState.INFERRING and j.owner == "node-a" for j in first)
    stored = b.get(ids[0])
    assert stored is not None and stored.owner == "node-a" and stored.lease_until > time.time() + 20
    assert [j.id for j in b.claim(5, "node-b", 30)] == [ids[2]]
    assert a.claim(5, "node-a", 30) == [] and b.claim(5, "node-b", 30) == []


def test_an_expired_lease_is_taken_over_and_the_old_holder_loses_every_race(open_queue: Opener) -> None:
    a, b = open_queue(), open_queue()
    job_id, _ = a.add(new_job("1.1"))
    a.claim(1, "node-a", 1.0)
    assert b.claim(1, "node-b", 30) == []  # the lease runs
    time.sleep(1.3)
    [taken] = b.claim(1, "node-b", 30)  # any time, not only at start-up
    assert taken.id == job_id and taken.owner == "node-b" and taken.state is JobState.INFERRING
    assert a.renew([job_id], "node-a", 30) == []
    assert not a.set_state(job_id, JobState.WRITING, expect=JobState.INFERRING, node_id="node-a")
    assert b.set_state(job_id, JobState.WRITING, expect=JobState.INFERRING, node_id="node-b")
    assert not a.set_results(job_id, [SEG], JobState.SENDING, expect=JobState.WRITING, node_id="node-a")
    assert b.get(job_id).results == ()  # type: ignore[union-attr]
    assert b.set_results(job_id, [SEG], JobState.SENDING, expect=JobState.WRITING, node_id="node-b")
    assert b.get(job_id).owner is None  # type: ignore[union-attr]


def test_writing_jobs_are_taken_over_too(open_queue: Opener) -> None:
    a, b = open_queue(), open_queue()
    job_id, _ = a.add(new_job("1.1"))
    a.claim(1, "node-a", 1.0)
    assert a.set_state(job_id, JobState.WRITING, expect=JobState.INFERRING, node_id="node-a")
    assert a.get(job_id).owner == "node-a"  # type: ignore[union-attr]  # writing keeps the lease
    time.sleep(1.3)
    assert [j.id for j in b.claim(1, "node-b", 30)] == [job_id]


def test_a_renewed_lease_is_never_taken(open_queue: Opener) -> None:
    a, b = open_queue(), open_queue()
    job_id, _ = a.add(new_job("1.1"))
    a.claim(1, "node-a", 1.0)
    keeper = LeaseKeeper(a, "node-a", 1.0)  # renews every third of a second
    keeper.hold([job_id])
    keeper.start()
    try:
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            assert b.claim(1, "node-b", 30) == []
            assert b.recover("node-b") == 0  # a live node's job is not recovered either
            time.sleep(0.2)
        assert a.set_state(job_id, JobState.WRITING, expect=JobState.INFERRING, node_id="node-a")
        assert a.set_results(job_id, [SEG], JobState.DONE, expect=JobState.WRITING, node_id="node-a")
        time.sleep(0.7)
        assert keeper.held() == set()  # done: no longer renewed, dropped by itself
    finally:
        keeper.stop()


def test_compare_and_set_reports_a_lost_race(queue: Queue) -> None:
    job_id, _ = queue.add(new_job("1.1"))
    assert not queue.set_state(job_id, JobState.WRITING, expect=JobState.INFERRING)
    assert not queue.set_results(job_id, [SEG], JobState.SENDING, expect=JobState.WRITING)
    assert not queue.record_attempt(job_id, delivered=["pacs"], error=None, next_attempt_at=0, state=JobState.DONE)
    job = queue.get(job_id)
    assert job is not None and job.state is JobState.RECEIVED and job.results == () and job.delivered == ()
    assert not queue.set_state(999_999, JobState.FAILED)
    assert queue.set_state(job_id, JobState.FAILED, expect=JobState.RECEIVED, error="x")
    assert queue.get(job_id).error == "x"  # type: ignore[union-attr]


def test_two_senders_never_get_the_same_job(open_queue: Opener) -> None:
    a, b = open_queue(), open_queue()
    ids = [to_sending(a, f"1.{n}") for n in range(6)]
    now = time.time()
    first = a.claim_due(now, 4, "sender-a", 30)
    second = b.claim_due(now, 4, "sender-b", 30)
    assert [j.id for j in first] == ids[:4] and [j.id for j in second] == ids[4:]
    assert all(j.owner == "sender-a" and j.state is JobState.SENDING for j in first)
    assert a.claim_due(now, 4, "sender-a", 30) == []
    # A failed attempt lets go and is due later; the other sender cannot record on a job it does not hold.
    assert not b.record_attempt(
        ids[0], delivered=[], error="x", next_attempt_at=0, state=JobState.DEAD, node_id="sender-b"
    )
    assert a.record_attempt(
        ids[0],
        delivered=[],
        error="pacs: refused",
        next_attempt_at=now + 60,
        state=JobState.SENDING,
        node_id="sender-a",
    )
    job = b.get(ids[0])
    assert job is not None and job.owner is None and job.attempts == 1 and job.error == "pacs: refused"
    assert b.claim_due(now, 10, "sender-b", 30) == []  # not due yet, the others held
    assert [j.id for j in b.claim_due(now + 61, 10, "sender-b", 30)] == [ids[0]]
    assert a.record_attempt(
        ids[1], delivered=["pacs"], error=None, next_attempt_at=0, state=JobState.DONE, node_id="sender-a"
    )
    assert b.get(ids[1]).delivered == ("pacs",)  # type: ignore[union-attr]


def test_two_destination_workers_never_overwrite_each_others_progress(open_queue: Opener) -> None:
    """node.sender: each destination's worker records its own delivery as it happens (`add_delivered`), on handles
    of its own and at the same time; every name stays, once, and only the job's holder may add one."""
    holder, other = open_queue(), open_queue()
    job_id = to_sending(holder, "1.1")
    [job] = holder.claim_due(time.time(), 1, "node-a", 30)
    names = [f"pacs-{n:02d}" for n in range(12)]
    handles = [open_queue() for _ in names]
    start = threading.Barrier(len(names))
    added: list[bool] = []

    def deliver(queue: Queue, name: str) -> None:
        start.wait()
        added.append(queue.add_delivered(job_id, name, node_id="node-a"))

    threads = [threading.Thread(target=deliver, args=pair) for pair in zip(handles, names, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert added == [True] * len(names)
    assert holder.add_delivered(job_id, "pacs-00", node_id="node-a")  # again: still once
    assert not other.add_delivered(job_id, "intruder", node_id="node-b")  # not the holder
    stored = other.get(job_id)
    assert stored is not None and stored.delivered == tuple(names)
    assert stored.owner == "node-a" and stored.state is JobState.SENDING  # still held: the attempt goes on
    assert holder.record_attempt(
        job_id, delivered=names, error=None, next_attempt_at=0, state=JobState.DONE, node_id="node-a"
    )
    assert not holder.add_delivered(job_id, "late", node_id="node-a")  # done: nothing more to add
    assert other.get(job_id).delivered == tuple(names)  # type: ignore[union-attr]


def test_a_dead_senders_jobs_are_sent_by_another(open_queue: Opener) -> None:
    a, b = open_queue(), open_queue()
    job_id = to_sending(a, "1.1")
    a.claim_due(time.time(), 1, "sender-a", 1.0)
    assert b.claim_due(time.time(), 1, "sender-b", 30) == []
    time.sleep(1.3)
    assert [j.id for j in b.claim_due(time.time(), 1, "sender-b", 30)] == [job_id]


def test_recover_takes_its_own_expired_and_vanished_holders_jobs_only(open_queue: Opener) -> None:
    a = open_queue()
    ids = [a.add(new_job(f"1.{n}"))[0] for n in range(5)]
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    vanished = f"{socket.gethostname()}:{gone.pid}"
    alive = f"{socket.gethostname()}:{os.getpid()}"
    assert holder_is_gone(vanished) and not holder_is_gone(alive) and not holder_is_gone("elsewhere:1")
    a.claim(1, "me", 300)  # ids[0]: this node's, from before a restart
    a.claim(1, "other-node", 300)  # ids[1]: a live node elsewhere
    a.claim(1, "expired", 1.0)  # ids[2]: a dead node elsewhere
    a.claim(1, vanished, 300)  # ids[3]: a process of this host that is gone
    a.claim(1, alive, 300)  # ids[4]: a process of this host that runs
    time.sleep(1.3)
    assert open_queue().recover("me") == 3
    states = {j.id: (j.state, j.owner) for j in a.jobs()}
    assert states[ids[0]] == states[ids[2]] == states[ids[3]] == (JobState.RECEIVED, None)
    assert states[ids[1]] == (JobState.INFERRING, "other-node") and states[ids[4]] == (JobState.INFERRING, alive)


def test_revive(queue: Queue) -> None:
    dead = to_sending(queue, "1.1")
    queue.claim_due(time.time(), 1, "s", 30)
    queue.record_attempt(
        dead, delivered=["pacs"], error="archive down", next_attempt_at=0, state=JobState.DEAD, node_id="s"
    )
    failed, _ = queue.add(new_job("1.2"))
    queue.set_state(failed, JobState.FAILED, error="bad pixels")
    kept, _ = queue.add(new_job("1.3", JobState.SKIPPED))
    dropped, _ = queue.add(new_job("1.4", JobState.SKIPPED, spool=False))
    waiting, _ = queue.add(new_job("1.5"))
    assert {j.id: j.state for j in queue.revive([kept, dropped, waiting])} == {kept: JobState.RECEIVED}
    revived = {j.id: j for j in queue.revive(None)}
    assert {i: j.state for i, j in revived.items()} == {dead: JobState.SENDING, failed: JobState.RECEIVED}
    job = queue.get(dead)
    assert job is not None and job.attempts == 0 and job.delivered == () and job.error is None and job.results == (SEG,)
    assert queue.revive(None) == []


# -- concurrency ------------------------------------------------------------------------------------------------------


def test_claims_from_many_threads_never_overlap(open_queue: Opener) -> None:
    first = open_queue()
    for n in range(120):
        first.add(new_job(f"1.{n}"))
    handles = [first, *(open_queue() for _ in range(3))]
    taken: dict[str, list[int]] = {f"node-{i}": [] for i in range(4)}

    def take(handle: Queue, node: str) -> None:
        while jobs := handle.claim(3, node, 30):
            taken[node].extend(j.id for j in jobs)

    threads = [threading.Thread(target=take, args=(h, n)) for h, n in zip(handles, taken)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    every = [i for ids in taken.values() for i in ids]
    assert len(every) == 120 and len(set(every)) == 120


def _claim_all(url: str, node: str, kind: str, start: threading.Barrier, out: multiprocessing.Queue) -> None:
    queue = connect(url)
    start.wait(60)  # every process connected: they all claim at once
    taken: list[int] = []
    while True:
        jobs = queue.claim(2, node, 30) if kind == "claim" else queue.claim_due(time.time(), 2, node, 30)
        if not jobs:
            break
        taken += [j.id for j in jobs]
        time.sleep(0.01)  # the work (SQLite's lock is not fair: a process that never pauses keeps taking it)
    queue.close()
    out.put(taken)


@pytest.mark.parametrize("kind", ["claim", "claim_due"])
def test_claims_from_many_processes_never_overlap(url: str, open_queue: Opener, kind: str) -> None:
    queue = open_queue()
    for n in range(90):
        if kind == "claim":
            queue.add(new_job(f"1.{n}"))
        else:
            to_sending(queue, f"1.{n}")
    context = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue = context.Queue()
    start = context.Barrier(3)
    processes = [context.Process(target=_claim_all, args=(url, f"node-{i}", kind, start, out)) for i in range(3)]
    for p in processes:
        p.start()
    results = [out.get(timeout=120) for _ in processes]
    for p in processes:
        p.join(30)
    every = [i for ids in results for i in ids]
    assert sorted(every) == sorted(set(every)) and len(every) == 90
    assert sum(1 for ids in results if ids) >= 2, "one process took everything: the test proved nothing"


def test_nodes_starting_together_apply_the_schema_once(url: str) -> None:
    opened: list[Queue] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            opened.append(connect(url))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors and len(opened) == 4
        job_id, _ = opened[0].add(new_job("1.1"))
        assert opened[3].get(job_id) is not None
    finally:
        for queue in opened:
            queue.close()


# -- the nodes' heartbeats ----------------------------------------------------------------------------------------------


def test_heartbeats_show_every_node_its_roles_and_when_it_was_last_seen(open_queue: Opener) -> None:
    receiving, gpu = open_queue(), open_queue()
    before = time.time()
    receiving.heartbeat("rx-1", ["receive"], "host-a", 1000.0)
    gpu.heartbeat("gpu-1", ["infer"], "host-b", 2000.0)
    seen = {n.node_id: n for n in receiving.nodes()}
    assert set(seen) == {"rx-1", "gpu-1"}
    assert seen["gpu-1"].roles == ("infer",) and seen["gpu-1"].host == "host-b" and seen["gpu-1"].started_at == 2000
    assert seen["rx-1"].roles == ("receive",) and seen["rx-1"].last_seen >= before - 5  # server clock, same host
    time.sleep(0.05)
    gpu.heartbeat("rx-1", ["receive", "send"], "host-a", 1000.0)  # the row is the node's, whichever handle writes
    nodes = receiving.nodes()
    assert [n.node_id for n in nodes] == ["rx-1", "gpu-1"], "most recently seen first"
    assert nodes[0].roles == ("receive", "send") and nodes[0].last_seen > nodes[1].last_seen


def test_a_node_silent_for_a_day_is_forgotten(url: str, open_queue: Opener) -> None:
    queue = open_queue()
    queue.heartbeat("old", ["infer"], "h", 1.0)
    queue.heartbeat("new", ["send"], "h", 1.0)
    if url.startswith("sqlite"):
        import sqlite3

        with sqlite3.connect(url[len("sqlite://") :]) as db:
            db.execute("UPDATE nodes SET last_seen = last_seen - 90000 WHERE node_id = 'old'")
    else:
        import psycopg

        with psycopg.connect(url, autocommit=True) as db:
            db.execute("UPDATE nodes SET last_seen = last_seen - 90000 WHERE node_id = 'old'")
    assert [n.node_id for n in queue.nodes()] == ["new"]


# -- wake-ups ---------------------------------------------------------------------------------------------------------


def test_listeners_are_woken_by_new_work(queue: Queue) -> None:
    infer, send = threading.Event(), threading.Event()
    queue.listen(Work.INFER, infer)
    queue.listen(Work.SEND, send)
    job_id, _ = queue.add(new_job("1.1"))
    assert infer.wait(5) and not send.is_set()
    [job] = queue.claim(1, "w", 30)
    queue.set_results(job.id, [SEG], JobState.SENDING)
    assert send.wait(5)


def test_notify_wakes_another_node(postgres: PostgresServer) -> None:
    """PostgreSQL only: with SQLite, one host, the node rings its own wake-ups between its processes."""
    url = postgres.new_database()
    worker_node, sender_node, receiver_node = connect(url), connect(url), connect(url)
    try:
        infer, send = threading.Event(), threading.Event()
        worker_node.listen(Work.INFER, infer)
        sender_node.listen(Work.SEND, send)
        receiver_node.add(new_job("1.1"))
        assert infer.wait(5), "the worker node heard nothing"
        assert not send.is_set()
        [job] = worker_node.claim(1, "w", 30)
        worker_node.set_results(job.id, [SEG], JobState.SENDING)
        assert send.wait(5), "the sender node heard nothing"
    finally:
        for queue in (worker_node, sender_node, receiver_node):
            queue.close()


# -- schema, URLs, an unreachable server ------------------------------------------------------------------------------


def test_a_newer_schema_is_refused(url: str) -> None:
    connect(url).close()
    if url.startswith("sqlite"):
        import sqlite3

        with sqlite3.connect(url[len("sqlite://") :]) as db:
            db.execute("PRAGMA user_version = 99")
    else:
        import psycopg

        with psycopg.connect(url, autocommit=True) as db:
            db.execute("INSERT INTO cxrnode_schema (version, name) VALUES (99, '0099_future')")
    with pytest.raises(QueueSchemaError, match="newer cxrnode"):
        connect(url)


def test_sqlite_file_from_before_schema_versions_is_upgraded(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, sop_instance_uid TEXT NOT NULL UNIQUE,"
            " sop_class_uid TEXT NOT NULL, study_instance_uid TEXT NOT NULL, series_instance_uid TEXT NOT NULL,"
            " transfer_syntax_uid TEXT NOT NULL, calling_ae TEXT NOT NULL, called_ae TEXT NOT NULL,"
            " peer_address TEXT NOT NULL, spool_path TEXT, state TEXT NOT NULL, error TEXT,"
            " attempts INTEGER NOT NULL DEFAULT 0, received_at REAL NOT NULL, updated_at REAL NOT NULL,"
            " next_attempt_at REAL NOT NULL DEFAULT 0, results TEXT NOT NULL DEFAULT '[]',"
            " delivered TEXT NOT NULL DEFAULT '[]', timings TEXT NOT NULL DEFAULT '{}')"
        )
        db.execute(
            "INSERT INTO jobs (sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid,"
            " transfer_syntax_uid, calling_ae, called_ae, peer_address, spool_path, state, received_at, updated_at)"
            " VALUES ('1.1', '1.2', '1.3', '1.4', '1.2.840.10008.1.2.1', 'MOD', 'CXRNODE', '127.0.0.1',"
            " 'spool/1.1.dcm', 'inferring', 1, 1)"
        )
    queue = connect(f"sqlite://{path}")
    try:
        job = queue.find("1.1")
        assert job is not None and job.accession_number == "" and job.owner is None and job.lease_until == 0
        assert queue.recover("me") == 1  # a job in hand before the upgrade has no lease: taken back
        assert [j.sop_instance_uid for j in queue.claim(1, "me", 30)] == ["1.1"]
    finally:
        queue.close()


def test_urls() -> None:
    assert redacted("postgresql://cxr:s3cret@db:5432/q") == "postgresql://cxr:***@db:5432/q"
    assert redacted("postgresql://cxr@db/q") == "postgresql://cxr@db/q"
    assert check_url("sqlite:////var/q.sqlite") == "sqlite:////var/q.sqlite"
    for bad in ("mysql://a:s3cret@h/q", "sqlite://relative.sqlite", "sqlite:///", "/var/q.sqlite"):
        with pytest.raises(QueueURLError) as error:
            check_url(bad)
        assert "s3cret" not in str(error.value)


def test_postgresql_password_from_pgpassword_and_wrong_password(
    postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    bare = postgres.url(password=False)
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    connect(bare).close()
    monkeypatch.delenv("PGPASSWORD")
    wrong = bare.replace("@", ":not-the-password@")
    with pytest.raises(QueueUnavailable) as error:
        connect(wrong)
    assert "not-the-password" not in str(error.value) and "password" in str(error.value)


def test_postgresql_away_and_back(tmp_path: Path) -> None:
    """While the server is down every call fails with QueueUnavailable (nothing is acknowledged by mistake); once
    it is back the same queue object works again, and listeners are rung to look at the queue again."""
    require_postgres()
    server = PostgresServer(free_port())
    try:
        queue = connect(server.new_database())
        woken = threading.Event()
        queue.listen(Work.INFER, woken)
        job_id, _ = queue.add(new_job("1.1"))
        woken.wait(5)
        server.stop()
        woken.clear()
        with pytest.raises(QueueUnavailable):
            queue.add(new_job("1.2"))
        server.start()
        deadline = time.monotonic() + 30
        while True:
            try:
                assert queue.add(new_job("1.2"))[1]
                break
            except QueueUnavailable:
                assert time.monotonic() < deadline, "the queue did not come back with the server"
                time.sleep(0.5)
        assert woken.wait(10)
        assert [j.id for j in queue.claim(5, "w", 30)][0] == job_id
        queue.close()
    finally:
        server.close()
