"""The claim counter (`Job.claims`), on both backends: SQLite and a real PostgreSQL server (the fixtures of
tests/test_queue_contract.py). A job claimed again was held by a worker that never finished it; node.worker analyses
such a job alone and fails it after `[inference] max_tries` claims."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import psycopg

from node.queue import JobState, Queue, connect
from node.queue.migrations import migrations
from test_queue_contract import Opener, new_job, open_queue, queue, url  # noqa: F401 (fixtures)


def test_each_claim_is_counted_and_returned(open_queue: Opener) -> None:  # noqa: F811
    a, b = open_queue(), open_queue()
    first, _ = a.add(new_job("1.1"))
    second, _ = a.add(new_job("1.2"))
    assert a.get(first).claims == 0  # type: ignore[union-attr]
    assert [(j.id, j.claims) for j in a.claim(1, "node-a", 1.0)] == [(first, 1)]
    assert a.get(first).claims == 1 and a.get(second).claims == 0  # type: ignore[union-attr]
    time.sleep(1.3)  # node-a's lease on the first runs out: node-b takes it over, a second claim
    assert [(j.id, j.claims) for j in b.claim(5, "node-b", 30)] == [(first, 2), (second, 1)]
    assert b.get(first).claims == 2  # type: ignore[union-attr]


def test_recovered_jobs_keep_their_count_and_finished_ones_are_not_counted_again(queue: Queue) -> None:  # noqa: F811
    job_id, _ = queue.add(new_job("1.1"))
    done, _ = queue.add(new_job("1.2"))
    queue.claim(5, "me", 300)
    assert queue.set_results(done, [], JobState.DONE, expect=JobState.INFERRING, node_id="me")
    assert queue.recover("me") == 1  # the worker process died holding job_id
    job = queue.get(job_id)
    assert job is not None and (job.state, job.claims) == (JobState.RECEIVED, 1)
    assert [(j.id, j.claims) for j in queue.claim(5, "me", 300)] == [(job_id, 2)]
    assert queue.get(done).claims == 1  # type: ignore[union-attr]


def test_hand_back_takes_back_the_claim_of_jobs_not_tried(open_queue: Opener) -> None:  # noqa: F811
    a = open_queue()
    ids = [a.add(new_job(f"1.{n}"))[0] for n in range(3)]
    a.claim(3, "node-a", 30)
    assert a.hand_back(ids[1:], "node-b") == []  # not node-b's
    assert a.hand_back(ids[1:], "node-a", error="store away") == ids[1:]
    jobs = {j.id: j for j in a.jobs()}
    assert (jobs[ids[0]].state, jobs[ids[0]].owner, jobs[ids[0]].claims) == (JobState.INFERRING, "node-a", 1)
    for job_id in ids[1:]:
        job = jobs[job_id]
        assert (job.state, job.owner, job.claims, job.error) == (JobState.RECEIVED, None, 0, "store away")
    assert a.hand_back(ids[1:], "node-a") == []  # no longer held
    assert [j.claims for j in a.claim(3, "node-a", 30)] == [1, 1]


def test_resend_starts_the_count_again(queue: Queue) -> None:  # noqa: F811
    job_id, _ = queue.add(new_job("1.1"))
    for _ in range(4):
        queue.claim(1, "me", 300)
        queue.recover("me")
    assert queue.get(job_id).claims == 4  # type: ignore[union-attr]
    queue.claim(1, "me", 300)
    assert queue.set_state(job_id, JobState.FAILED, node_id="me", error="did not finish in 3 tries")
    [revived] = queue.revive([job_id])  # what `cxrnode resend` does
    assert (revived.state, revived.claims) == (JobState.RECEIVED, 0)
    assert queue.get(job_id).claims == 0  # type: ignore[union-attr]
    assert [j.claims for j in queue.claim(1, "me", 300)] == [1]


def test_a_database_of_schema_3_is_upgraded_with_a_count_of_0(url: str) -> None:  # noqa: F811
    """Jobs already in a queue written by the previous release start with claims = 0."""
    sql = "INSERT INTO jobs (sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid,"
    sql += " transfer_syntax_uid, calling_ae, called_ae, peer_address, spool_path, state, received_at, updated_at)"
    sql += " VALUES ('1.1', '1.2', '1.3', '1.4', '1.2.840.10008.1.2.1', 'MOD', 'CXRNODE', '127.0.0.1', 'spool/x.dcm',"
    sql += " 'received', 1, 1)"
    if url.startswith("sqlite"):
        with sqlite3.connect(Path(url[len("sqlite://") :])) as db:
            for migration in migrations("sqlite")[:3]:
                for statement in migration.statements():
                    db.execute(statement)
            db.execute("PRAGMA user_version = 3")
            db.execute(sql)
    else:
        with psycopg.connect(url, autocommit=True) as db:
            db.execute(
                "CREATE TABLE cxrnode_schema (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
                " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            for migration in migrations("postgresql")[:3]:
                db.execute(migration.sql.encode())
                db.execute("INSERT INTO cxrnode_schema VALUES (%s, %s)", (migration.version, migration.name))
            db.execute(sql)
    upgraded = connect(url)
    try:
        [job] = upgraded.jobs()
        assert (job.sop_instance_uid, job.claims) == ("1.1", 0)
        assert [j.claims for j in upgraded.claim(1, "me", 30)] == [1]
    finally:
        upgraded.close()
