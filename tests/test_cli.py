"""The small things an admin meets in the first half hour with the `cxrnode` command (issue 9), each as they would
meet it: the command run as a subprocess, its output and exit status read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from dicom_peers import require_dcmtk, running_node, synthetic_file
from node.cli import SEND_CALLING_AE, build_parser
from node.config import load_settings, with_command_line_peers
from node.queue import JobState, NewJob
from node.queue.sqlite import SQLiteQueue


def cxrnode(*args: str, shell_tail: str = "") -> subprocess.CompletedProcess[str]:
    command = " ".join([f"'{sys.executable}'", "-m", "node.cli", *(f"'{a}'" for a in args)]) + shell_tail
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXRNODE_")}  # as the other node tests do
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, cwd=REPO, timeout=120, env=env
    )


@pytest.fixture
def busy_data_dir(tmp_path: Path) -> Path:
    """A data folder whose queue holds 120 jobs."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    queue = SQLiteQueue(data_dir / "queue.sqlite")
    for n in range(120):
        queue.add(
            NewJob(
                sop_instance_uid=f"1.2.3.{n}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                study_instance_uid="1.2.3",
                series_instance_uid="1.2.3.0",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                calling_ae="MODALITY",
                called_ae="CXRNODE",
                peer_address="127.0.0.1",
                spool_path=None,
                state=JobState.SKIPPED,
                error="lateral view",
            )
        )
    queue.close()
    return data_dir


def test_jobs_into_head_exits_quietly(busy_data_dir: Path) -> None:
    done = cxrnode("jobs", "--data-dir", str(busy_data_dir), "--limit", "120", shell_tail=" | head -3")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert len(done.stdout.splitlines()) == 3


def test_jobs_says_when_the_list_is_cut(busy_data_dir: Path) -> None:
    done = cxrnode("jobs", "--data-dir", str(busy_data_dir))
    assert done.returncode == 0, done.stderr
    assert "showing the 50 most recent of 120 jobs" in done.stdout
    header = done.stdout.splitlines()[1]
    for column in ("finding", "to", "seconds", "from"):
        assert column in header
    whole = json.loads(cxrnode("jobs", "--data-dir", str(busy_data_dir), "--json", "--limit", "500").stdout)
    assert whole["total"] == 120 and len(whole["jobs"]) == 120


def test_resend_of_an_unknown_job_says_so(busy_data_dir: Path) -> None:
    done = cxrnode("resend", "999", "--data-dir", str(busy_data_dir))
    assert done.returncode == 1
    assert "job 999: no such job" in done.stderr


def test_help_version_and_options() -> None:
    version = cxrnode("--version")
    assert version.returncode == 0 and version.stdout.startswith("cxrnode ")
    top = cxrnode("--help").stdout
    assert "receives chest X-rays" in top and "Start here" in top
    jobs_help = cxrnode("jobs", "--help").stdout
    assert (
        "only jobs in this state" in jobs_help and "most recent first" in jobs_help and "machine-readable" in jobs_help
    )
    assert build_parser().parse_args(["send", "X@h:104", "f"]).calling_ae == SEND_CALLING_AE != "CXRNODE"


def test_a_command_line_destination_is_named_by_its_ae_title() -> None:
    settings = with_command_line_peers(load_settings(None, environ={}), ["PACS@127.0.0.1:11113"], [])
    assert [p.name for p in settings.destinations_for("")] == ["PACS"]


def test_a_quoted_number_in_the_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[node]\nport = "11112"\n')
    done = cxrnode("config", "check", str(config))
    assert done.returncode == 2
    assert "node.port: '11112' is a quoted string; an integer goes without quotes: port = 11112" in done.stderr


@pytest.mark.slow
def test_echo_and_send_against_a_node(tmp_path: Path) -> None:
    require_dcmtk()
    image = synthetic_file(tmp_path, "one", seed=5, size=(300, 280))
    with running_node(tmp_path, destination_port=None) as node:
        wrong = cxrnode("echo", f"NOTUS@127.0.0.1:{node.port}")
        assert wrong.returncode == 1
        assert "association rejected by the service user (permanent): Called AE title not recognised" in (
            wrong.stderr
        ), wrong.stderr
        echo = cxrnode("echo", f"CXRNODE@127.0.0.1:{node.port}")
        assert echo.returncode == 0 and echo.stderr == "", echo.stderr  # quiet: no library logging
        sent = cxrnode("send", f"CXRNODE@127.0.0.1:{node.port}", str(image))
        assert sent.returncode == 0 and f"{image}: Success" in sent.stdout, sent.stdout + sent.stderr
        assert sent.stderr == ""
        listed = json.loads(node.cli("jobs", "--json").stdout)["jobs"]
        assert [job["calling_ae"] for job in listed] == [SEND_CALLING_AE]
