"""Ingest: how fast the node takes images, against DCMTK's storescp receiving the same files in the same run.

    python bench/ingest.py [--n 40] [--rounds 3] [--size 2300 2200] [--json OUT]

N synthetic DX files of about 10 MB (16-bit, 2300 x 2200) are sent with DCMTK storescu over 1 and over 4 parallel
associations, to a plain storescp (`--fork` for the parallel case, its multi-process mode) and to cxrnode with its
durable writes (fsync of file and folder, SQLite synchronous=FULL) and the models running on what arrives.
Images/s is N over the wall time of the sending; the ratio is cxrnode's over storescp's. The two alternate,
`--rounds` times each (a fresh node, with an empty queue, every round), and the medians are reported: on a shared
machine one run of either can be off by a third.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import free_port  # noqa: E402
from dicom_peers import NodeProcess, StoreSCP, synthetic_file, wait_for_port, write_config  # noqa: E402


def send_parallel(port: int, called: str, files: list[Path], associations: int) -> float:
    """Seconds for `associations` storescu processes to send their share of `files`."""
    shares = [files[i::associations] for i in range(associations)]
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            ["storescu", "-xe", "--aetitle", "BENCH", "--call", called, "127.0.0.1", str(port), *map(str, share)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for share in shares
        if share
    ]
    for process in processes:
        _, error = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"storescu failed: {error[-500:]}")
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--size", type=int, nargs=2, default=(2300, 2200), metavar=("ROWS", "COLUMNS"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cxrnode-ingest-"))
    images = work / "images"
    images.mkdir()
    files = [
        synthetic_file(images, f"i{i:03d}", seed=11000 + i, size=tuple(args.size), bits=16, positive=i % 4 == 0)
        for i in range(args.n)
    ]
    megabytes = sum(f.stat().st_size for f in files) / 1e6 / len(files)
    results: dict[str, object] = {
        "images": args.n,
        "megabytes_per_image": round(megabytes, 1),
        "cpu_count": os.cpu_count(),
    }
    for associations in (1, 4):
        plain_runs: list[float] = []
        node_runs: list[float] = []
        for round_ in range(args.rounds):
            name = f"{associations}-{round_}"
            scp = StoreSCP(
                "PLAIN", free_port(), work / f"plain{name}", options=("--fork",) if associations > 1 else ()
            ).start()
            plain_runs.append(send_parallel(scp.port, "PLAIN", files, associations))
            scp.stop()
            subprocess.run(["rm", "-rf", str(work / f"plain{name}")], check=False)
            port = free_port()
            config = write_config(work / f"node{name}.toml", port=port, data_dir=work / f"data{name}")
            config.write_text(config.read_text().replace("[node]\n", "[node]\nmax_associations_per_peer = 8\n"))
            node = NodeProcess(config, port, work / f"node{name}.log").start()
            try:
                wait_for_port(port, 30)
                node_runs.append(send_parallel(port, "CXRNODE", files, associations))
            finally:
                node.stop()
            subprocess.run(["rm", "-rf", str(work / f"data{name}")], check=False)
        plain, ours = statistics.median(plain_runs), statistics.median(node_runs)
        results[f"{associations}_association"] = {
            "storescp_images_per_s": args.n / plain,
            "cxrnode_images_per_s": args.n / ours,
            "ratio": plain / ours,
            "storescp_seconds": plain_runs,
            "cxrnode_seconds": node_runs,
        }
    print(
        f"{args.n} images of {megabytes:.1f} MB, {os.cpu_count()} CPU(s); durable writes on, models running; "
        f"median of {args.rounds} round(s)"
    )
    for associations in (1, 4):
        r = results[f"{associations}_association"]
        assert isinstance(r, dict)
        print(
            f"{associations} association(s): storescp {r['storescp_images_per_s']:.2f} img/s, "
            f"cxrnode {r['cxrnode_images_per_s']:.2f} img/s, ratio {r['ratio']:.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
