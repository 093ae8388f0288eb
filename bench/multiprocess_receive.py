"""Experiment: would receiving in several processes close the 4-association ingest gap to DCMTK storescp --fork?

    python bench/multiprocess_receive.py [--n 40] [--rounds 2] [--json OUT]

A bare pynetdicom storage SCP with cxrnode's durable write (node.spool.write_durably: temporary file, fsync, rename,
folder fsync) and a job row committed in SQLite (WAL, synchronous=FULL) before each Success, run as 1, 2 and 4
processes sharing one port (SO_REUSEPORT: the kernel spreads the associations). No models, metrics, audit or
policy: an upper bound for what a multi-process cxrnode receiver could do. storescp --fork receives the same files
in the same run. 4 parallel storescu associations, N synthetic 10 MB DX files.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pynetdicom import AE, evt, transport
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import send_parallel  # noqa: E402

from conftest import free_port  # noqa: E402
from dicom_peers import StoreSCP, synthetic_file, wait_for_port  # noqa: E402
from node.spool import write_durably  # noqa: E402

_bind = transport.AssociationServer.server_bind


def _bind_shared(self: transport.AssociationServer) -> None:
    self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    _bind(self)


def receive(port: int, root: Path) -> None:
    transport.AssociationServer.server_bind = _bind_shared  # type: ignore[method-assign]

    def store(event: Event) -> int:
        data = event.encoded_dataset(include_meta=True)
        uid = str(event.request.AffectedSOPInstanceUID)
        write_durably(root / "spool" / f"{uid}.dcm", data, temp_dir=root / "tmp")
        db = sqlite3.connect(root / "queue.sqlite", isolation_level=None, timeout=30)
        db.execute("PRAGMA synchronous=FULL")
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO jobs VALUES (?)", (uid,))
        db.execute("COMMIT")
        db.close()
        return 0x0000

    ae = AE("CXRNODE")
    ae.maximum_pdu_size = 0
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, store)])


def run_receivers(processes: int, files: list[Path], work: Path) -> float:
    root = work / f"receivers{processes}"
    (root / "spool").mkdir(parents=True)
    (root / "tmp").mkdir()
    db = sqlite3.connect(root / "queue.sqlite")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE jobs (uid TEXT)")
    db.commit()
    db.close()
    port = free_port()
    context = multiprocessing.get_context("fork")
    receivers = [context.Process(target=receive, args=(port, root), daemon=True) for _ in range(processes)]
    for receiver in receivers:
        receiver.start()
    try:
        wait_for_port(port, 30)
        time.sleep(1.0)  # every receiver listening
        return send_parallel(port, "CXRNODE", files, 4)
    finally:
        for receiver in receivers:
            receiver.kill()
            receiver.join()
        subprocess.run(["rm", "-rf", str(root)], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cxrnode-mpreceive-"))
    (work / "images").mkdir()
    files = [
        synthetic_file(work / "images", f"i{i:03d}", seed=11000 + i, size=(2300, 2200), bits=16, positive=False)
        for i in range(args.n)
    ]
    seconds: dict[str, list[float]] = {"storescp --fork": [], "1 process": [], "2 processes": [], "4 processes": []}
    for round_ in range(args.rounds):
        scp = StoreSCP("PLAIN", free_port(), work / f"plain{round_}", options=("--fork",)).start()
        seconds["storescp --fork"].append(send_parallel(scp.port, "PLAIN", files, 4))
        scp.stop()
        subprocess.run(["rm", "-rf", str(work / f"plain{round_}")], check=False)
        for processes in (1, 2, 4):
            key = f"{processes} process" + ("es" if processes > 1 else "")
            seconds[key].append(run_receivers(processes, files, work))
    results = {key: args.n / statistics.median(runs) for key, runs in seconds.items()}
    print(f"{args.n} images of 10 MB over 4 associations; images/s, median of {args.rounds} round(s)")
    for key, rate in results.items():
        print(f"  {key:<16} {rate:6.1f}   ratio to storescp {rate / results['storescp --fork']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"images_per_s": results, "seconds": seconds}, indent=2) + "\n")
    subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
