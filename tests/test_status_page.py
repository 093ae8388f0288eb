"""The status page's parts without a running node: paging the queue, the throughput windows, the query checks, the
HTML of a job, and the overlay header that must fit its picture. The whole page in a real browser: test_web.py."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from node.overlay import render_overlay
from node.queue import JobState, NewJob
from node.queue.sqlite import SQLiteQueue
from node.status_page import job_row
from node.web import JobsPage, Throughput
from test_overlay import finding


def new_job(n: int, state: JobState = JobState.RECEIVED) -> NewJob:
    return NewJob(
        sop_instance_uid=f"1.2.3.{n}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.0",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_ae="MODALITY",
        called_ae="CXRNODE",
        peer_address="127.0.0.1",
        spool_path=None,
        state=state,
    )


def test_jobs_page_by_page(tmp_path: Path) -> None:
    queue = SQLiteQueue(tmp_path / "queue.sqlite")
    try:
        for n in range(1, 8):
            queue.add(new_job(n, JobState.SKIPPED if n % 2 else JobState.RECEIVED))  # odd ids skipped
        ids = lambda jobs: [j.id for j in jobs]  # noqa: E731
        assert ids(queue.jobs(limit=3)) == [7, 6, 5]
        assert ids(queue.jobs(limit=3, before=5)) == [4, 3, 2]
        assert ids(queue.jobs(limit=3, before=2)) == [1]
        assert ids(queue.jobs(limit=3, before=1)) == []
        assert ids(queue.jobs(JobState.SKIPPED, limit=2)) == [7, 5]
        assert ids(queue.jobs(JobState.SKIPPED, limit=2, before=5)) == [3, 1]
        assert ids(queue.jobs(JobState.RECEIVED, before=100)) == [6, 4, 2]
    finally:
        queue.close()


def test_throughput_counts_the_last_minutes() -> None:
    rate = Throughput(started_at=1000.0, keep_s=3600)
    for minute in range(1, 121):  # two hours, the counter grows by 2 a minute
        rate.sample(1000.0 + 60 * minute, 2.0 * minute)
    now = 1000.0 + 60 * 120 + 30
    assert rate.in_last(5 * 60, now, 241.0) == 241 - 2 * 115  # baseline: the sample at minute 115
    assert rate.in_last(60 * 60, now, 241.0) == 241 - 2 * 60
    young = Throughput(started_at=1000.0)
    young.sample(1010.0, 3.0)
    assert young.in_last(3600, 1020.0, 4.0) == 4  # younger than the window: everything since the start


def test_query_is_checked() -> None:
    page = JobsPage.from_query({"state": ["dead"], "before": ["42"], "limit": ["5"]})
    assert page == JobsPage(JobState.DEAD, 42, 5)
    assert JobsPage.from_query({}) == JobsPage(None, None, 20)
    for query, message in (
        ({"before": ["x"]}, "before='x': give a job id (a whole number, 1 or more)"),
        ({"before": ["-3"]}, "before='-3'"),
        ({"before": ["²"]}, "before='²'"),
        ({"limit": ["0"]}, "limit='0': give a whole number from 1 to 500"),
        ({"limit": ["501"]}, "limit='501'"),
        ({"state": ["finished"]}, "state='finished': choose one of received, inferring"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            JobsPage.from_query(query)


def test_job_row_shows_finding_study_and_timings() -> None:
    job = {
        "id": 12,
        "state": "done",
        "calling_ae": "MODALITY",
        "sop_instance_uid": "1.2.3.4",
        "accession_number": "ACC<1>",
        "study_date": "20240131",
        "received": "2026-12-02 07:00:00",
        "error": None,
        "finding": {
            "opacity_present": True,
            "opacity_probability": 0.8734,
            "boxes": 2,
            "severity_percent": {"right": 10.0, "left": 14.6, "total": 12.3},
            "extent_score": {"right": 2, "left": 1, "total": 3},
        },
        "timings": {"queue_wait": 0.1234, "inference": 1.5, "writing": 0.25},
        "model_version": "cxr-1.0",
        "delivered": [],
        "results": ["SEG", "SR"],
        "thumbnail": "/thumbnails/12.png",
        "overlay": "/overlays/12.jpg",
    }
    row = job_row(job, token="t&k")
    for text in (
        "opacity present",
        "p = 0.87",
        "2 boxes",
        "12.3 %",
        "R 10.0 % · L 14.6 %",
        "3/8",
        "R 2 · L 1",
        "acc. ACC&lt;1&gt;",  # escaped
        "2024-01-31",
        "queue wait 0.12 s",
        "inference 1.50 s",
        "writing 0.25 s",
        "total 1.87 s",
        "cxr-1.0",
        "href='/overlays/12.jpg?token=t%26k'",
        "src='/thumbnails/12.png?token=t%26k'",
    ):
        assert text in row, text
    skipped = job_row({**job, "finding": None, "timings": {}, "thumbnail": None, "overlay": None}, token=None)
    assert "opacity" not in skipped and "<img" not in skipped and skipped.count("—") == 4


@pytest.mark.parametrize("max_side", [320, 1600])
def test_overlay_header_fits_the_picture(max_side: int) -> None:
    """On a black image only the burned-in text is bright: the caption's letters (the top eighth of the picture)
    stay clear of the right edge, and at 320 px the caption wraps onto a second line instead of being cut."""
    shape = (900, 900)
    picture = np.asarray(
        render_overlay(np.zeros(shape, np.float32), finding(shape, (150.0, 300.0, 330.0, 520.0)), max_side=max_side)
    )
    header = picture[: picture.shape[0] // 8]
    text = header.min(axis=2) > 128  # white letters; lung outlines and boxes are coloured
    rows = np.flatnonzero(text.any(axis=1))
    columns = np.flatnonzero(text.any(axis=0))
    assert len(rows) and len(columns)
    assert columns.max() < picture.shape[1] - 4  # no letter runs into the right edge
    if max_side == 320:  # too narrow for one line: the text wraps instead of being cut
        assert rows.max() - rows.min() > 2 * 12
