"""A dead destination beside a live one: do the live one's results arrive as fast as without it?

    python bench/dead_destination.py [--n 8] [--size 512 480] [--timeout 10] [--dead silent|closed] [--json OUT]

Two runs of a real node (`python -m node.cli serve`), each sent the same N images at once with DCMTK storescu:
  live only   routing = [pacs]          pacs: DCMTK storescp
  with dead   routing = [dead, pacs]    dead: --dead silent, a port that accepts TCP connections and never answers
                                        (each association waits out sender.timeout_s), or --dead closed, a port
                                        nobody listens on (refused at once)
Reported per run: the time from the first C-STORE to the last result at the live destination, and per image the time
from its receipt to its last live result (p50, p95). With a sender per destination the two runs match; with one
sender for all destinations each job of the second run waited for the dead destination's timeout first.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import free_port  # noqa: E402
from dicom_peers import NodeProcess, StoreSCP, source_of, storescu, synthetic_file, wait_until  # noqa: E402


def config(path: Path, *, port: int, data_dir: Path, live_port: int, dead_port: int | None, timeout: float) -> Path:
    dead = ""
    if dead_port is not None:
        dead = (
            f'[[peers]]\nname = "dead"\nae_title = "DEAD"\nhost = "127.0.0.1"\nport = {dead_port}\nmay_send = false\n\n'
        )
    routing = '["dead", "pacs"]' if dead_port is not None else '["pacs"]'
    path.write_text(
        f'[node]\nae_title = "CXRNODE"\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{data_dir}"\n\n'
        f'{dead}[[peers]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {live_port}\nmay_send = false\n\n'
        f"[routing]\ndefault = {routing}\n\n"
        '[inference]\ndevice = "cpu"\nbatch_size = 4\nmax_wait_ms = 100\n\n'
        "[sender]\nretry_base_s = 1\nretry_factor = 2\nretry_max_delay_s = 30\nmax_attempts = 100\n"
        f'timeout_s = {timeout:g}\n\n[outputs]\nobjects = ["SEG", "SR"]\n\n[http]\nport = 0\n'
    )
    return path


def run(name: str, work: Path, files: list[Path], *, dead_port: int | None, timeout: float) -> dict[str, object]:
    folder = work / name
    pacs = StoreSCP("PACS", free_port(), folder / "pacs").start()
    port = free_port()
    node_config = config(
        folder / "node.toml",
        port=port,
        data_dir=folder / "data",
        live_port=pacs.port,
        dead_port=dead_port,
        timeout=timeout,
    )
    node = NodeProcess(node_config, port, folder / "node.log").start()
    expected = 2 * len(files)  # SEG + SR per image
    try:
        first_store = time.time()
        assert storescu(port, files).returncode == 0
        wait_until(lambda: len(pacs.files()) >= expected, timeout=120 + 60 * len(files), interval=0.1, what=name)
        done = node.cli("jobs", "--json", "--limit", str(10 * len(files)))
        jobs = json.loads(done.stdout)["jobs"]
    finally:
        node.kill()
        pacs.stop()
    arrival: dict[str, float] = {}
    for path in pacs.files():
        source = source_of(pydicom.dcmread(path, stop_before_pixels=True))
        arrival[source] = max(arrival.get(source, 0.0), path.stat().st_mtime)
    latencies = [arrival[job["sop_instance_uid"]] - job["received_at_unix"] for job in jobs]
    return {
        "run": name,
        "destinations": ["dead", "pacs"] if dead_port is not None else ["pacs"],
        "first_store_to_last_live_result_s": round(max(arrival.values()) - first_store, 2),
        "live_latency_median_s": round(statistics.median(latencies), 2),
        "live_latency_p95_s": round(float(np.percentile(latencies, 95)), 2),
        "live_results": len(pacs.files()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=2, default=(512, 480), metavar=("ROWS", "COLUMNS"))
    parser.add_argument("--timeout", type=float, default=10.0, help="sender.timeout_s (default 10)")
    parser.add_argument("--dead", choices=("silent", "closed"), default="silent")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", type=Path, help="keep the working folder here")
    args = parser.parse_args()

    work = Path(args.keep or tempfile.mkdtemp(prefix="cxrnode-bench-dead-"))
    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    files = [
        synthetic_file(images, f"img{i:03d}", seed=9500 + i, size=tuple(args.size), positive=i % 3 == 0)
        for i in range(args.n)
    ]
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as silent:
        if args.dead == "silent":
            silent.bind(("127.0.0.1", 0))
            silent.listen(256)  # connections complete in the kernel's backlog; nothing ever reads or answers
            dead_port = silent.getsockname()[1]
        else:
            dead_port = free_port()
        rows = [
            run("live only", work, files, dead_port=None, timeout=args.timeout),
            run("with dead", work, files, dead_port=dead_port, timeout=args.timeout),
        ]
    base, dead = rows[0], rows[1]
    results = {
        "images": args.n,
        "size": list(args.size),
        "cpu_count": os.cpu_count(),
        "sender_timeout_s": args.timeout,
        "dead": args.dead,
        "runs": rows,
        "ratio_with_dead_to_live_only": round(
            float(dead["first_store_to_last_live_result_s"]) / float(base["first_store_to_last_live_result_s"]), 2
        ),
    }
    print(
        f"{args.n} images {args.size[1]} x {args.size[0]}, {os.cpu_count()} CPU(s), sender.timeout_s {args.timeout:g}, "
        f"dead destination: {args.dead}"
    )
    print(f"{'run':<11} {'destinations':<14} {'first C-STORE to last live result':>34} {'p50':>7} {'p95':>7}")
    for row in rows:
        print(
            f"{row['run']:<11} {','.join(row['destinations']):<14} {row['first_store_to_last_live_result_s']:>32.2f} s"
            f" {row['live_latency_median_s']:>6.2f}s {row['live_latency_p95_s']:>6.2f}s"
        )
    print(f"with dead / live only: {results['ratio_with_dead_to_live_only']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if not args.keep:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
