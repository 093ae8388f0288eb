"""Scale-out: inference with 1, 2 and 4 infer nodes on PostgreSQL against one on SQLite, and ingest with
`--receivers 1/2/4` against DCMTK storescp and Orthanc, the same files in the same run.

    python bench/scale_out.py [--infer-n 24] [--ingest-n 40] [--rounds 1] [--json OUT]

Inference: a `--role receive` node takes `--infer-n` synthetic DX images (600 x 560) while K `--role infer` nodes are
ready but stopped (SIGSTOP, their worker processes too, after the models loaded); then they are all continued
(SIGCONT) and images/s is N over the time until every job has its results. PostgreSQL: K = 1, 2, 4; SQLite: K = 1,
on a queue file the two nodes share (one host). No destination: results stay in the shared results folder.

Ingest: 10 MB DX files (16-bit, 2300 x 2200) sent by DCMTK storescu over 4 parallel associations (and over 1) to
storescp (`--fork` over 4), to Orthanc (its default SQLite index and file storage) and to a `--role receive` node on
PostgreSQL with `--receivers 1`, 2 and 4 (durable writes: fsync of file and folder, the job committed before
Success). Images/s is N over the wall time of the sending. Every server is fresh for each run; each round runs every
server once, in turn, and the medians over `--rounds` are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import send_parallel  # noqa: E402

from conftest import free_port  # noqa: E402
from dicom_peers import StoreSCP, orthanc_executable, synthetic_file, wait_for_port, write_config  # noqa: E402
from node.queue import JobState, connect  # noqa: E402
from postgres import PostgresServer  # noqa: E402
from test_scale_out import RoleNode  # noqa: E402


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def signal_tree(nodes: list[RoleNode], signum: int) -> None:
    for node in nodes:
        assert node.process is not None
        for pid in process_tree(node.process.pid):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


class Cluster:
    """Nodes with their own data folders sharing one queue URL and one spool/results folder (links in each)."""

    def __init__(self, work: Path, url: str) -> None:
        self.work, self.url, self.port = work, url, free_port()
        self.shared = work / "shared"
        for folder in ("spool", "results"):
            (self.shared / folder).mkdir(parents=True, exist_ok=True)
        self.nodes: list[RoleNode] = []

    def node(self, name: str, *args: str, node_options: str = "") -> RoleNode:
        data = self.work / f"{name}-data"
        data.mkdir()
        for folder in ("spool", "results"):
            (data / folder).symlink_to(self.shared / folder)
        http_port = free_port()
        config = write_config(
            self.work / f"{name}.toml",
            port=self.port,
            data_dir=data,
            http_port=http_port,
            extra=f'[queue]\nurl = "{self.url}"\n',
        )
        config.write_text(config.read_text().replace("[node]\n", f"[node]\n{node_options}"))
        node = RoleNode(name, config, ("--node-id", name, *args), http_port, self.work / f"{name}.log")
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                signal_tree([node], signal.SIGCONT)
                node.stop()


def inference_rate(work: Path, url: str, infer_nodes: int, files: list[Path]) -> float:
    cluster = Cluster(work, url)
    try:
        cluster.node("rx", "--role", "receive").start()
        workers = [cluster.node(f"gpu{i}", "--role", "infer").start() for i in range(infer_nodes)]
        time.sleep(2.0)  # every worker idle, its models loaded
        signal_tree(workers, signal.SIGSTOP)
        send_parallel(cluster.port, "CXRNODE", files, 4)
        queue = connect(url)
        try:
            started = time.perf_counter()
            signal_tree(workers, signal.SIGCONT)
            while queue.counts()[JobState.DONE] < len(files):
                time.sleep(0.1)
            return len(files) / (time.perf_counter() - started)
        finally:
            queue.close()
    finally:
        cluster.stop()


def orthanc_ingest(work: Path, files: list[Path], associations: int) -> float:
    executable = orthanc_executable()
    if executable is None:
        raise RuntimeError("Orthanc is not installed (/usr/sbin/Orthanc)")
    folder = work / "orthanc"
    folder.mkdir()
    http_port, dicom_port = free_port(), free_port()
    configuration = {
        "Name": "bench",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomAlwaysAllowStore": True,
        "DicomCheckCalledAet": False,
        "Plugins": [],
    }
    (folder / "orthanc.json").write_text(json.dumps(configuration))
    process = subprocess.Popen(
        [executable, str(folder / "orthanc.json")], stdout=open(folder / "log", "wb"), stderr=subprocess.STDOUT
    )
    try:
        wait_for_port(dicom_port, 60, process)
        return len(files) / send_parallel(dicom_port, "ORTHANC", files, associations)
    finally:
        process.terminate()
        process.wait(60)
        subprocess.run(["rm", "-rf", str(folder)], check=False)


def storescp_ingest(work: Path, files: list[Path], associations: int) -> float:
    options = ("--fork",) if associations > 1 else ()
    scp = StoreSCP("PLAIN", free_port(), work / "plain", options=options).start()
    try:
        return len(files) / send_parallel(scp.port, "PLAIN", files, associations)
    finally:
        scp.stop()
        subprocess.run(["rm", "-rf", str(work / "plain")], check=False)


def node_ingest(work: Path, url: str, files: list[Path], associations: int, receivers: int) -> float:
    cluster = Cluster(work, url)
    try:
        cluster.node(
            "rx", "--role", "receive", "--receivers", str(receivers), node_options="max_associations_per_peer = 8\n"
        ).start()
        wait_for_port(cluster.port, 30)
        return len(files) / send_parallel(cluster.port, "CXRNODE", files, associations)
    finally:
        cluster.stop()


def fresh(work: Path, name: str) -> Path:
    folder = work / name
    subprocess.run(["rm", "-rf", str(folder)], check=False)
    folder.mkdir()
    return folder


def median_of(rounds: int, run: Callable[[], float]) -> float:
    return statistics.median(run() for _ in range(rounds))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--infer-n", type=int, default=24)
    parser.add_argument("--ingest-n", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cxrnode-scale-out-"))
    server = PostgresServer(free_port())
    results: dict[str, dict] = {"inference_images_per_s": {}, "ingest_images_per_s": {}}
    try:
        if not args.skip_inference:
            (work / "small").mkdir()
            small = [synthetic_file(work / "small", f"s{i:03d}", seed=21000 + i) for i in range(args.infer_n)]
            inference = results["inference_images_per_s"]
            inference["sqlite, 1 infer node"] = median_of(
                args.rounds,
                lambda: inference_rate(
                    fresh(work, "run"), f"sqlite://{work / f'q{time.monotonic_ns()}.sqlite'}", 1, small
                ),
            )
            for k in (1, 2, 4):
                inference[f"postgresql, {k} infer node(s)"] = median_of(
                    args.rounds, lambda k=k: inference_rate(fresh(work, "run"), server.new_database(), k, small)
                )
        (work / "big").mkdir()
        big = [
            synthetic_file(work / "big", f"b{i:03d}", seed=11000 + i, size=(2300, 2200), bits=16, positive=False)
            for i in range(args.ingest_n)
        ]
        runs: dict[str, Callable[[], float]] = {}
        for a in (4, 1):
            runs[f"storescp, {a} assoc"] = lambda a=a: storescp_ingest(fresh(work, "run"), big, a)
            runs[f"orthanc, {a} assoc"] = lambda a=a: orthanc_ingest(fresh(work, "run"), big, a)
            for r in (1, 2, 4) if a > 1 else (1,):
                runs[f"cxrnode --receivers {r}, {a} assoc"] = lambda a=a, r=r: node_ingest(
                    fresh(work, "run"), server.new_database(), big, a, r
                )
        rates: dict[str, list[float]] = {key: [] for key in runs}
        for _ in range(args.rounds):  # every server once per round, so that a busy minute hits them all alike
            for key, run in runs.items():
                rates[key].append(run())
        results["ingest_images_per_s"] = {key: statistics.median(values) for key, values in rates.items()}
        results["ingest_rounds"] = rates  # type: ignore[assignment]
    finally:
        server.close()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    print(f"{os.cpu_count()} CPU(s); median of {args.rounds} round(s)")
    for key, rate in results["inference_images_per_s"].items():
        print(f"  inference  {key:<32} {rate:6.2f} img/s")
    ingest = results["ingest_images_per_s"]
    for key, rate in ingest.items():
        associations = key.rsplit(", ", 1)[1]
        plain, orthanc = ingest[f"storescp, {associations}"], ingest[f"orthanc, {associations}"]
        print(
            f"  ingest     {key:<32} {rate:6.2f} img/s  x storescp {rate / plain:.2f}  x Orthanc {rate / orthanc:.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
