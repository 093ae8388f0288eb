"""End-to-end latency against real DCMTK peers, in one run on one machine.

    python bench/latency.py [--n 20] [--size 2500 2048] [--interval 0] [--json OUT]

--interval 0 (a burst): DCMTK storescu sends N files at once, to a plain storescp (ingest reference) and to cxrnode;
    reported: both ingest rates, and the time from the first C-STORE to the last result at a storescp destination.
--interval S (a steady arrival rate): one image every S seconds, each by its own storescu association.
In both, per image: the time from the start of its C-STORE to the arrival of its last result object at the
destination (p50, p95), and the node's own per-stage timings (receive, queue wait, inference, writing, sending).
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

import numpy as np
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import free_port  # noqa: E402
from dicom_peers import NodeProcess, StoreSCP, source_of, storescu, synthetic_file, wait_until, write_config  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--size", type=int, nargs=2, default=(2500, 2048), metavar=("ROWS", "COLUMNS"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between images (0: all at once)")
    parser.add_argument("--keep", type=Path, help="keep the working folder here")
    args = parser.parse_args()

    work = Path(args.keep or tempfile.mkdtemp(prefix="cxrnode-bench-"))
    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    files = [
        synthetic_file(
            images,
            f"img{i:03d}",
            seed=9000 + i,
            size=tuple(args.size),
            positive=i % 3 == 0,
            modality="DX" if i % 2 else "CR",
            bits=12,
        )
        for i in range(args.n)
    ]
    megabytes = sum(f.stat().st_size for f in files) / 1e6

    # 1. DCMTK storescp alone (burst only: the ingest reference).
    plain_seconds = None
    if args.interval == 0:
        plain = StoreSCP("PLAIN", free_port(), work / "plain").start()
        started = time.perf_counter()
        assert storescu(plain.port, files, called="PLAIN").returncode == 0
        plain_seconds = time.perf_counter() - started
        plain.stop()

    # 2. cxrnode with a storescp destination.
    pacs = StoreSCP("PACS", free_port(), work / "pacs").start()
    port = free_port()
    config = write_config(work / "node.toml", port=port, data_dir=work / "data", destination_port=pacs.port)
    node = NodeProcess(config, port, work / "node.log").start()
    sent_at: dict[str, float] = {}
    try:
        first_store = time.time()
        started = time.perf_counter()
        if args.interval == 0:
            assert storescu(port, files).returncode == 0
        else:
            for index, path in enumerate(files):
                time.sleep(max(0.0, first_store + index * args.interval - time.time()))
                sent_at[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = time.time()
                assert storescu(port, [path]).returncode == 0
        node_seconds = time.perf_counter() - started
        wait_until(lambda: len(pacs.files()) >= 2 * args.n, timeout=60 * args.n, interval=0.2, what="all results")
        last_result = max(p.stat().st_mtime for p in pacs.files())
        jobs = json.loads(node.cli("jobs", "--json", "--limit", str(10 * args.n)).stdout)["jobs"]
    finally:
        node.stop()
        pacs.stop()

    arrival: dict[str, float] = {}
    for path in pacs.files():
        source = source_of(pydicom.dcmread(path, stop_before_pixels=True))
        arrival[source] = max(arrival.get(source, 0.0), path.stat().st_mtime)
    latencies, stages = [], {"receive": [], "queue_wait": [], "inference": [], "writing": [], "sending": []}
    for job in jobs:
        start = sent_at.get(job["sop_instance_uid"], job["received_at_unix"])  # burst: from its own receipt
        latencies.append(arrival[job["sop_instance_uid"]] - start)
        job["timings"]["receive"] = max(0.0, job["received_at_unix"] - start) if sent_at else 0.0
        for stage, values in stages.items():
            values.append(job["timings"].get(stage, 0.0))
    results = {
        "images": args.n,
        "size": list(args.size),
        "megabytes": round(megabytes, 1),
        "cpu_count": os.cpu_count(),
        "interval_s": args.interval,
        "ingest_storescp_images_per_s": args.n / plain_seconds if plain_seconds else None,
        "ingest_cxrnode_images_per_s": args.n / node_seconds if not args.interval else None,
        "ingest_ratio": plain_seconds / node_seconds if plain_seconds else None,
        "first_store_to_last_result_s": last_result - first_store,
        "per_image_latency_median_s": statistics.median(latencies),
        "per_image_latency_p95_s": percentile(latencies, 95),
        "stage_median_s": {k: statistics.median(v) for k, v in stages.items()},
    }
    print(
        f"{args.n} images {args.size[1]} x {args.size[0]}, {megabytes:.0f} MB, {os.cpu_count()} CPU(s), "
        f"{'all at once' if not args.interval else f'one every {args.interval:g} s'}"
    )
    if plain_seconds:
        print(
            f"ingest  storescp {results['ingest_storescp_images_per_s']:.2f} img/s   "
            f"cxrnode {results['ingest_cxrnode_images_per_s']:.2f} img/s   ratio {results['ingest_ratio']:.2f}"
        )
    print(f"first C-STORE to last SEG/SR: {results['first_store_to_last_result_s']:.1f} s")
    print(
        f"per image, C-STORE to results (s): p50 {results['per_image_latency_median_s']:.2f}"
        f"  p95 {results['per_image_latency_p95_s']:.2f}"
    )
    print("stage medians (s): " + "  ".join(f"{k} {v:.2f}" for k, v in results["stage_median_s"].items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if not args.keep:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
