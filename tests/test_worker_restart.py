"""A worker process restarted after a crash gets the settings the node runs with, not the configuration file as it
is now: [node] and [inference] change only when the node itself restarts (README: "need a restart")."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import free_port
from dicom_peers import NodeProcess, StoreSCP, require_dcmtk, storescu, synthetic_file, wait_until, write_config

pytestmark = pytest.mark.slow


def worker_pids(node: NodeProcess) -> list[str]:
    """The spawned worker process, not multiprocessing's resource tracker."""
    assert node.process is not None
    found = subprocess.run(["pgrep", "-P", str(node.process.pid), "-f", "spawn_main"], capture_output=True, text=True)
    return found.stdout.split()


def test_restarted_worker_keeps_the_settings_the_node_started_with(tmp_path: Path) -> None:
    require_dcmtk()
    images = [synthetic_file(tmp_path, f"w{i}", seed=7300 + i, size=(320, 300), positive=i == 0) for i in range(2)]
    pacs = StoreSCP("PACS", free_port(), tmp_path / "pacs").start()
    port = free_port()
    config = write_config(tmp_path / "node.toml", port=port, data_dir=tmp_path / "data", destination_port=pacs.port)
    node = NodeProcess(config, port, tmp_path / "node.log").start()
    try:
        # While the node runs, the file changes what needs a restart: a data folder that cannot exist (under a file)
        # and weights that are not there. A worker that read the file again could not even open its queue.
        (tmp_path / "a-file").write_text("not a folder")
        changed = config.read_text()
        changed = changed.replace(f'data_dir = "{tmp_path / "data"}"', f'data_dir = "{tmp_path / "a-file" / "data"}"')
        changed = changed.replace("[inference]\n", f'[inference]\nweights = "{tmp_path / "no-weights"}"\n')
        assert changed.count("a-file") == 1 and changed.count("no-weights") == 1
        config.write_text(changed)

        workers = worker_pids(node)
        assert workers, "no worker process found"
        for pid in workers:
            os.kill(int(pid), signal.SIGKILL)
        wait_until(lambda: "restarting it in 5 s" in node.log.read_text(), timeout=15, what="the restart")
        wait_until(
            lambda: "worker process restarted" in node.log.read_text() or "could not start" in node.log.read_text(),
            timeout=180,
            what="the new worker",
        )
        assert "could not start" not in node.log.read_text(), node.log.read_text()[-3000:]
        assert storescu(port, images).returncode == 0
        wait_until(lambda: len(pacs.files()) == 2 * len(images), timeout=120, what="results from the new worker")
        assert not (tmp_path / "a-file").is_dir()
        assert node.process is not None and node.process.poll() is None
    finally:
        node.kill()
        pacs.stop()
