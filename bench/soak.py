"""Soak: ≥ 1000 images through the node; its resident memory and open file descriptors must stay flat.

    python bench/soak.py [--n 1000] [--json OUT]

Small synthetic radiographs (so that 1000 fit in minutes on a CPU) are sent in batches by DCMTK storescu to the node,
which sends its results to a DCMTK storescp. RSS and open FDs of the node's two processes (the receiving one and the
worker it spawned) are sampled from /proc after every batch. Reported for each and for both together: start (after
the first 100 images, the warm-up), peak and end, the growth after warm-up in percent; the FDs; and whether every
image's results arrived.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import free_port  # noqa: E402
from dicom_peers import NodeProcess, StoreSCP, storescu, synthetic_file, wait_until, write_config  # noqa: E402


def sample(pid: int) -> tuple[float, int]:
    """(RSS in MB, open file descriptors) of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def worker_pid(node_pid: int) -> int:
    """The worker process: the node's child started by multiprocessing's spawn (not its resource tracker)."""
    for child in Path(f"/proc/{node_pid}/task/{node_pid}/children").read_text().split():
        command = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"spawn_main" in command:
            return int(child)
    raise RuntimeError("the node has no worker process")


def growth(samples: list[tuple[int, float, int]], warm_index: int) -> dict[str, float]:
    start, end = samples[warm_index][1], samples[-1][1]
    return {
        "start": start,
        "peak": max(s[1] for s in samples),
        "end": end,
        "growth_after_warmup_percent": 100 * (end - start) / start,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--distinct", type=int, default=50, help="distinct pictures; each is sent with new UIDs")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cxrnode-soak-"))
    import pydicom
    from pydicom.uid import generate_uid

    pictures = [
        pydicom.dcmread(synthetic_file(work, f"p{i}", seed=12000 + i, size=(320, 300), positive=i % 4 == 0))
        for i in range(args.distinct)
    ]
    pacs = StoreSCP("PACS", free_port(), work / "pacs").start()
    port = free_port()
    config = write_config(work / "node.toml", port=port, data_dir=work / "data", destination_port=pacs.port)
    node = NodeProcess(config, port, work / "node.log").start()
    assert node.process is not None
    worker = worker_pid(node.process.pid)
    samples: dict[str, list[tuple[int, float, int]]] = {"receiver": [], "worker": [], "both": []}
    started = time.perf_counter()
    try:
        for first in range(0, args.n, args.batch):
            folder = work / f"batch{first}"
            folder.mkdir()
            files = []
            for index in range(first, min(args.n, first + args.batch)):
                ds = pictures[index % len(pictures)].copy()
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
                    entropy_srcs=[f"soak-{index}"]
                )
                path = folder / f"{index}.dcm"
                ds.save_as(path, enforce_file_format=True)
                files.append(path)
            assert storescu(port, files).returncode == 0
            done = first + len(files)
            wait_until(
                lambda done=done: len(list(pacs.folder.glob("*.dcm"))) >= 2 * done,
                timeout=600,
                interval=0.5,
                what=f"results of {done} images",
            )
            for path in files:
                path.unlink()
            assert worker_pid(node.process.pid) == worker, "the worker process was restarted during the soak"
            receiver_rss, receiver_fds = sample(node.process.pid)
            worker_rss, worker_fds = sample(worker)
            samples["receiver"].append((done, receiver_rss, receiver_fds))
            samples["worker"].append((done, worker_rss, worker_fds))
            samples["both"].append((done, receiver_rss + worker_rss, receiver_fds + worker_fds))
            print(
                f"{done:>5} images  RSS receiver {receiver_rss:7.1f} MB, worker {worker_rss:7.1f} MB  "
                f"FDs {receiver_fds} + {worker_fds}",
                flush=True,
            )
        seconds = time.perf_counter() - started
    finally:
        node.stop()
        pacs.stop()
    warm_index = next(i for i, s in enumerate(samples["both"]) if s[0] >= min(100, args.n))
    results: dict[str, object] = {
        "images": args.n,
        "seconds": round(seconds, 1),
        "images_per_s": args.n / seconds,
        "results_received": len(list(pacs.folder.glob("*.dcm"))),
        "rss_mb": {name: growth(series, warm_index) for name, series in samples.items()},
        "fds": {
            name: {"start": series[warm_index][2], "peak": max(s[2] for s in series), "end": series[-1][2]}
            for name, series in samples.items()
        },
        "samples": samples,
    }
    print(f"{args.n} images in {seconds:.0f} s; {results['results_received']} result objects")
    for name in samples:
        rss = results["rss_mb"][name]  # type: ignore[index]
        fds = results["fds"][name]  # type: ignore[index]
        print(
            f"{name:>8}: RSS start {rss['start']:.0f} MB, peak {rss['peak']:.0f}, end {rss['end']:.0f} "
            f"({rss['growth_after_warmup_percent']:+.1f} % after warm-up); FDs start {fds['start']}, "
            f"peak {fds['peak']}, end {fds['end']}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
