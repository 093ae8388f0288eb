"""The README's "Five minutes with DCMTK" walkthrough, run as written.

Its shell blocks are read from README.md and run in order from the repository, as a new user would: a command marked
`# keeps running` is started in the background (a terminal of its own) and waited for; every other command must
exit 0. Only what would collide with other tests changes: `/tmp/` becomes a temporary folder, the ports become free
ones (the node's by CXRNODE_NODE__PORT and CXRNODE_HTTP__PORT), and its data folder is a temporary one
(CXRNODE_NODE__DATA_DIR) rather than ./cxrnode-data."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, free_port
from dicom_peers import require_dcmtk, wait_for_port, wait_until

pytestmark = pytest.mark.slow

SECTION = "## Five minutes with DCMTK"
KEEPS_RUNNING = "# keeps running"


def walkthrough_commands(readme: str) -> list[str]:
    """The shell lines of the section's ```sh blocks, in order."""
    section = readme.split(SECTION, 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S):
        commands += [line.strip() for line in block.splitlines() if line.strip()]
    return commands


def test_the_walkthrough_has_the_steps_we_run() -> None:
    commands = walkthrough_commands((REPO / "README.md").read_text())
    assert commands[0] == "make tools"
    assert sum(KEEPS_RUNNING in c for c in commands) == 2  # storescp and the node
    assert not any(c.startswith(("cxrnode ", "source ")) for c in commands), (
        "call .venv/bin/cxrnode, not the venv's PATH"
    )


def test_readme_walkthrough(tmp_path: Path) -> None:
    require_dcmtk()
    ports = {"11112": str(free_port()), "11113": str(free_port()), "11180": str(free_port())}
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXRNODE_")}
    env["CXRNODE_NODE__DATA_DIR"] = str(tmp_path / "cxrnode-data")
    env["CXRNODE_NODE__PORT"] = ports["11112"]  # the node's defaults, moved to free ports
    env["CXRNODE_HTTP__PORT"] = ports["11180"]
    background: list[subprocess.Popen] = []
    try:
        for command in walkthrough_commands((REPO / "README.md").read_text()):
            line = command.replace("/tmp/", f"{tmp_path}/")
            for default, port in ports.items():
                line = line.replace(default, port)
            if line.startswith("ls ") or line.startswith("dsrdump "):
                # "the results reach the PACS within seconds": 4 images x (SEG, SR, GSPS)
                wait_until(lambda: len(list((tmp_path / "pacs").iterdir())) >= 12, 240, what="12 results at the PACS")
            if KEEPS_RUNNING in line:
                process = subprocess.Popen(
                    ["bash", "-c", line],
                    cwd=REPO,
                    env=env,
                    stdout=open(tmp_path / f"background-{len(background)}.log", "wb"),
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                background.append(process)
                # the node listens on its default port once its models are loaded; storescp on the one it is given
                port = ports["11112"] if " serve" in line else re.findall(r"\b(\d{4,5})\b", line.split("#")[0])[-1]
                wait_for_port(int(port), 180, process)
                continue
            done = subprocess.run(
                ["bash", "-o", "pipefail", "-c", line],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            # `| head` may close the pipe early: that is SIGPIPE (141) for the writer, not a failure
            assert done.returncode in (0, 141), f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            assert "Traceback" not in done.stderr, f"{command}\n{done.stderr[-3000:]}"
            if line.startswith("ls "):
                names = done.stdout.split()
                for prefix in ("SG.", "SRe.", "PSg."):
                    assert sum(n.startswith(prefix) for n in names) == 4, (prefix, names)
            if line.startswith("dsrdump "):
                assert "Measurement Report" in done.stdout, done.stdout[:2000]
    finally:
        for process in background:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
