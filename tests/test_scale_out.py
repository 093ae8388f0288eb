"""Scale-out on PostgreSQL, all real processes on one machine (issue 10): a `--role receive --receivers 2` node, two
`--role infer` nodes and a `--role send` node share one PostgreSQL queue; DCMTK storescu sends, DCMTK storescp is the
PACS. One infer node is SIGKILLed mid-run; later PostgreSQL itself is stopped while images arrive.

The spool and results are shared through one folder: each node's data folder holds `spool` and `results` links to
it (each node keeps its own data folder and lock). When the storage contract (`[store] url`) lands, point every
node's store at that folder instead."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from conftest import REPO, free_port
from dicom_peers import StoreSCP, require_dcmtk, source_of, synthetic_file, wait_for_port, wait_until, write_config
from node.queue import JobState, connect
from postgres import PostgresServer, require_postgres

pytestmark = pytest.mark.slow

LEASE_S = 4.0
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass
class RoleNode:
    """`cxrnode serve --role ...` with its own data folder; ready when its HTTP port answers /readyz with 200."""

    name: str
    config: Path
    args: tuple[str, ...]
    http_port: int
    log: Path
    process: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> RoleNode:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CXRNODE_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "serve", "--config", str(self.config), *self.args],
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
        )
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"{self.name} exited: {self.log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/readyz", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                pass
            assert time.monotonic() < deadline, f"{self.name} not ready: {self.log.read_text()[-3000:]}"
            time.sleep(0.3)

    def status(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/api/status", timeout=10) as answer:
            return json.loads(answer.read())

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> int:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            return self.process.wait(90)
        return self.process.returncode if self.process else 0


class Cluster:
    """Nodes sharing one queue URL and one spool/results folder; one DICOM port, for the receiving node."""

    def __init__(self, tmp: Path, url: str, pacs_port: int) -> None:
        self.tmp, self.url, self.pacs_port = tmp, url, pacs_port
        self.port = free_port()
        self.shared = tmp / "shared"
        for folder in ("spool", "results"):
            (self.shared / folder).mkdir(parents=True, exist_ok=True)
        self.nodes: list[RoleNode] = []

    def node(self, name: str, *args: str) -> RoleNode:
        data = self.tmp / f"{name}-data"
        data.mkdir()
        for folder in ("spool", "results"):
            (data / folder).symlink_to(self.shared / folder)
        http_port = free_port()
        config = write_config(
            self.tmp / f"{name}.toml",
            port=self.port,
            data_dir=data,
            destination_port=self.pacs_port,
            retry="retry_base_s = 0.5\nretry_factor = 1\nretry_max_delay_s = 1\nmax_attempts = 1000",
            http_port=http_port,
            extra=f'[queue]\nurl = "{self.url}"\nlease_s = {LEASE_S}\n',
        )
        node = RoleNode(name, config, ("--node-id", name, *args), http_port, self.tmp / f"{name}.log")
        self.nodes.append(node)
        return node

    def kill_all(self) -> None:
        for node in self.nodes:
            node.kill()


def send_parallel(port: int, groups: list[list[Path]]) -> tuple[set[Path], list[str]]:
    """One storescu per group, all at once (parallel associations); the files answered Success, and each output."""
    runs = [
        subprocess.Popen(
            ["storescu", "-v", "-xs", "--aetitle", f"MOD{i}", "--call", "CXRNODE", "127.0.0.1", str(port)]
            + [str(p) for p in group],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, group in enumerate(groups)
    ]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    return set().union(*(acknowledged(output) for output in outputs)), outputs


def acknowledged(output: str) -> set[Path]:
    """Files storescu reports as stored with Success."""
    done, current = set(), None
    for line in output.splitlines():
        if "Sending file:" in line:
            current = Path(line.split("Sending file:", 1)[1].strip())
        elif "Received Store Response (Success)" in line and current is not None:
            done.add(current)
    return done


def uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def delivered_results(pacs: StoreSCP) -> dict[str, dict[str, set[str]]]:
    """Source image UID -> {"SEG": {UIDs}, "SR": {UIDs}} as received by the PACS (a re-delivery repeats a UID)."""
    found: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for ds in pacs.received():
        kind = "SEG" if ds.SOPClassUID == SEG_CLASS else str(ds.Modality)
        found[source_of(ds)][kind].add(str(ds.SOPInstanceUID))
    return found


def images(folder: Path, count: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [synthetic_file(folder, f"i{seed}-{i}", seed=seed + i, size=(300, 280)) for i in range(count)]


def test_receivers_two_gpu_nodes_and_a_sender_lose_nothing_when_a_gpu_node_is_killed(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    require_dcmtk()
    sent = images(tmp_path / "in", 40, seed=5000)
    url = postgres.new_database()
    pacs = StoreSCP("PACS", free_port(), tmp_path / "pacs").start()
    cluster = Cluster(tmp_path, url, pacs.port)
    queue = connect(url)
    try:
        receiving = cluster.node("rx", "--role", "receive", "--receivers", "2").start()
        gpu_1 = cluster.node("infer-1", "--role", "infer").start()
        gpu_2 = cluster.node("infer-2", "--role", "infer").start()
        cluster.node("tx", "--role", "send").start()
        wait_for_port(cluster.port, 10)
        killed_at: list[float] = []
        orphaned: list[int] = []  # the jobs infer-1 held when it died

        def kill_gpu_1_once_it_holds_jobs() -> None:
            wait_until(
                lambda: any(j.owner == "infer-1" for j in queue.jobs(limit=100)), timeout=240, what="infer-1 working"
            )
            gpu_1.kill()  # SIGKILL; its worker process dies with it (PR_SET_PDEATHSIG)
            killed_at.append(time.time())
            orphaned.extend(j.id for j in queue.jobs(limit=100) if j.owner == "infer-1")

        killer = threading.Thread(target=kill_gpu_1_once_it_holds_jobs)
        killer.start()
        ok, outputs = send_parallel(cluster.port, [sent[i::4] for i in range(4)])
        killer.join(300)
        assert killed_at and orphaned, "infer-1 never took a job, or finished it before the kill"
        assert ok == set(sent), "every C-STORE over the 4 associations is acknowledged:\n" + "\n".join(outputs)[-3000:]

        # The dead node renews nothing: what it holds expires within its lease, then another node takes it.
        held = [j for j in queue.jobs(limit=100) if j.owner == "infer-1" and j.state.value in ("inferring", "writing")]
        assert all(j.lease_until <= killed_at[0] + LEASE_S + 1.0 for j in held), "a lease of the dead node grew"
        wait_until(
            lambda: not any(j.owner == "infer-1" for j in queue.jobs(limit=100)),
            timeout=LEASE_S + 60,
            what="infer-1's jobs taken over",
        )
        wait_until(lambda: queue.counts()[JobState.DONE] == 40, timeout=600, interval=1.0, what="every job done")
        results = delivered_results(pacs)
        assert set(results) == {uid(p) for p in ok}
        for source, kinds in results.items():
            assert len(kinds["SEG"]) == 1 and len(kinds["SR"]) == 1, f"{source}: {dict(kinds)}"
        assert all(job.error is None for job in queue.jobs(limit=100))

        # Both receiving processes answer on the one port (16 C-ECHOs all landing on one: 2 in 65536).
        for _ in range(16):
            assert (
                subprocess.run(
                    ["echoscu", "--call", "CXRNODE", "127.0.0.1", str(cluster.port)], capture_output=True, timeout=30
                ).returncode
                == 0
            )
        wait_until(
            lambda: (
                {line.split()[3] for line in receiving.log.read_text().splitlines() if "C-ECHO from" in line}
                == {"MainProcess", "cxrnode-receiver-1"}
            ),
            timeout=10,
            what="C-ECHOs answered by both receiving processes",
        )
        # Every node's status page shows the whole cluster: its queue and each node's roles and heartbeat.
        page = gpu_2.status()
        assert page["queue"]["done"] == 40 and page["node"]["roles"] == ["infer"]
        roles = {n["node_id"]: n["roles"] for n in page["nodes"]}
        assert roles == {"rx": ["receive"], "infer-1": ["infer"], "infer-2": ["infer"], "tx": ["send"]}
        # the live nodes beat every min(5, lease/3) s; the killed one has not beaten since its kill
        ages = {n["node_id"]: n["last_heartbeat_s"] for n in page["nodes"]}
        beat = min(5.0, LEASE_S / 3)
        assert all(ages[n] < 3 * beat + 1.0 for n in ("rx", "infer-2", "tx")), ages
        assert ages["infer-1"] >= time.time() - killed_at[0] - 1.0, ages
        with urllib.request.urlopen(f"http://127.0.0.1:{receiving.http_port}/", timeout=10) as answer:
            html = answer.read().decode()
        assert "<table id=nodes>" in html and "infer-2" in html and "(this node)" in html
        with urllib.request.urlopen(f"http://127.0.0.1:{receiving.http_port}/metrics", timeout=10) as answer:
            metrics = answer.read().decode()
        assert "cxrnode_node_heartbeat_age_seconds{host=" in metrics and 'node_id="infer-2",roles="infer"' in metrics
        # the node counts what each of its receiving processes received (process 1 reports to process 0)
        stored = [ln for ln in receiving.log.read_text().splitlines() if "C-STORE from" in ln and " received (" in ln]
        assert len(stored) == 40 and "cxrnode_images_received_total 40.0" in metrics, (
            {line.split()[3] for line in stored},
            [m for m in metrics.splitlines() if m.startswith("cxrnode_images_received")],
        )
        for node in cluster.nodes:
            if node is not gpu_1:
                assert node.stop() == 0, node.log.read_text()[-3000:]
    finally:
        cluster.kill_all()
        pacs.stop()
        queue.close()


def test_postgresql_stopped_while_receiving_refuses_then_resumes_without_a_restart(tmp_path: Path) -> None:
    require_dcmtk()
    require_postgres()
    server = PostgresServer(free_port())
    pacs = StoreSCP("PACS", free_port(), tmp_path / "pacs").start()
    url = server.new_database()
    cluster = Cluster(tmp_path, url, pacs.port)
    before, during, after = (
        images(tmp_path / "a", 4, 6000),
        images(tmp_path / "b", 6, 6100),
        images(tmp_path / "c", 4, 6200),
    )
    try:
        cluster.node("rx", "--role", "receive", "--receivers", "2").start()
        cluster.node("work", "--role", "infer,send").start()
        ok_before, _ = send_parallel(cluster.port, [before[:2], before[2:]])
        assert ok_before == set(before)

        server.stop()
        ok_during, outputs = send_parallel(cluster.port, [during[:3], during[3:]])
        text = "\n".join(outputs)
        assert ok_during == set(), f"Success without a commit while PostgreSQL was down:\n{text[-3000:]}"
        assert "Refused: OutOfResources" in text or "Association Rejected" in text, text[-3000:]

        server.start()  # the same nodes, not restarted
        ok_after: set[Path] = set()
        deadline = time.monotonic() + 90
        while ok_after != set(after):
            assert time.monotonic() < deadline, "receiving did not resume after PostgreSQL came back"
            ok_after |= send_parallel(cluster.port, [[p for p in after if p not in ok_after]])[0]
            time.sleep(1)
        acknowledged_uids = {uid(p) for p in ok_before | ok_after}
        queue = connect(url)
        try:
            wait_until(
                lambda: {j.sop_instance_uid for j in queue.jobs(JobState.DONE, limit=100)} >= acknowledged_uids,
                timeout=600,
                interval=1.0,
                what="every acknowledged image done",
            )
            assert {j.sop_instance_uid for j in queue.jobs(limit=100)} == acknowledged_uids  # nothing from B
        finally:
            queue.close()
        results = delivered_results(pacs)
        assert set(results) == acknowledged_uids
        assert all(len(k["SEG"]) == 1 and len(k["SR"]) == 1 for k in results.values())
        for node in cluster.nodes:
            assert node.stop() == 0, node.log.read_text()[-3000:]
    finally:
        cluster.kill_all()
        pacs.stop()
        server.close()


# -- roles without PostgreSQL: the refusal, and the association limits across receiving processes ------------------


def test_a_partial_role_with_the_queue_in_its_own_data_folder_is_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path / "rx.toml", port=free_port(), data_dir=tmp_path / "rx-data")
    done = subprocess.run(
        [sys.executable, "-m", "node.cli", "serve", "--config", str(config), "--role", "receive"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("CXRNODE_")},
    )
    assert done.returncode == 2, done.stderr
    assert "role receive runs only part of a node" in done.stderr and "[queue] url" in done.stderr
    assert "postgresql://" in done.stderr


def receiving_processes(pid: int) -> list[int]:
    """The node's extra receiving processes (multiprocessing spawns; not its resource tracker)."""
    children = [c for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    return [
        int(child)
        for child in children
        if "spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace")
    ]


def test_association_limits_hold_across_receiving_processes_and_a_killed_one_frees_its_share(tmp_path: Path) -> None:
    """max_associations = 6 over 2 receiving processes: spread over both (the kernel picks), 6 are accepted and a
    7th is refused, which only a count across the processes can do; 2 per calling AE. A receiving process that is
    SIGKILLed with associations open is replaced and its share given back."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    port, http_port = free_port(), free_port()
    config = write_config(
        tmp_path / "rx.toml",
        port=port,
        data_dir=tmp_path / "rx-data",
        http_port=http_port,
        extra=f'[queue]\nurl = "sqlite://{tmp_path / "shared-queue.sqlite"}"\n',
    )
    config.write_text(
        config.read_text().replace("[node]\n", "[node]\nmax_associations = 6\nmax_associations_per_peer = 2\n")
    )
    node = RoleNode("rx", config, ("--role", "receive", "--receivers", "2"), http_port, tmp_path / "rx.log").start()
    opened: list = []

    def associate(calling: str):  # type: ignore[no-untyped-def]
        ae = AE(ae_title=calling)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="CXRNODE")
        if assoc.is_established:
            opened.append(assoc)
        return assoc

    try:
        assert [associate(f"MOD{i}").is_established for i in range(6)] == [True] * 6
        assert not associate("MOD9").is_established, "a 7th association over both processes"
        for assoc in opened[:3]:
            assoc.release()
        del opened[:3]
        time.sleep(0.5)
        assert [associate("SAME").is_established for _ in range(3)] == [True, True, False], "2 per calling AE"
        for assoc in opened:
            assoc.release()
        opened.clear()

        [child] = receiving_processes(node.process.pid)  # type: ignore[union-attr]
        held = [associate(f"K{i}") for i in range(6)]
        assert all(a.is_established for a in held)
        os.kill(child, signal.SIGKILL)  # its associations die with it; the node replaces it and frees their share
        wait_until(lambda: receiving_processes(node.process.pid) not in ([], [child]), 60, what="a new receiver")  # type: ignore[union-attr]
        for assoc in opened:
            assoc.release()
        opened.clear()
        time.sleep(1.5)  # the pynetdicom threads of the released ones end; the entries are swept
        assert [associate(f"N{i}").is_established for i in range(6)] == [True] * 6
        assert not associate("N9").is_established
        assert node.stop() == 0, node.log.read_text()[-3000:]
    finally:
        for assoc in opened:
            assoc.abort()
        node.kill()
