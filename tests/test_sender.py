"""A sender per destination (node.sender, node.delivery): a destination that takes TCP connections but never answers
delays only its own results; associations are kept open while work keeps coming and released when idle; a job's
delivery to one destination is recorded once and not repeated while another destination is retried."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt

from conftest import free_port
from dicom_peers import NodeProcess, StoreSCP, require_dcmtk, source_of, storescu, synthetic_file, wait_until
from node.config import Peer, TLSSettings
from node.delivery import IDLE_RELEASE_S, DestinationWorker, Parcel
from node.queue import Job, JobState, ResultObject


@contextmanager
def silent_destination() -> Iterator[int]:
    """A port where TCP connections are accepted (by the kernel, from the backlog) and nothing is ever answered:
    an A-ASSOCIATE-RQ waits there until the sender's timeout."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield listener.getsockname()[1]


# -- one destination's worker -----------------------------------------------------------------------------------------


def parcel(job_id: int, path: Path, port: int, timeout: float = 10.0) -> Parcel:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    job = Job(
        job_id, str(ds.SOPInstanceUID), str(ds.SOPClassUID), "1.2", "1.2.3", "1.2.840.10008.1.2.1", "MOD", "CXRNODE",
        "127.0.0.1", None, JobState.SENDING, None, 0, 0.0, 0.0, 0.0,
    )  # fmt: skip
    result = ResultObject("SC", str(ds.SOPClassUID), str(ds.SOPInstanceUID), path.name)
    peer = Peer(name="pacs", ae_title="PACS", host="127.0.0.1", port=port, may_send=False)
    return Parcel(job, peer, (result,), (path,), "CXRNODE", timeout, TLSSettings())


class Outcomes:
    def __init__(self) -> None:
        self.seen: list[tuple[int, Exception | None, float]] = []
        self.lock = threading.Lock()

    def __call__(self, parcel: Parcel, error: Exception | None, seconds: float) -> None:
        with self.lock:
            self.seen.append((parcel.job.id, error, time.monotonic()))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("sender-images")
    return [synthetic_file(folder, f"s{i}", seed=900 + i, size=(128, 120)) for i in range(4)]


def test_associations_are_kept_while_work_comes_and_released_when_idle(images: list[Path]) -> None:
    events: list[str] = []
    received: list[bytes] = []

    def stored(event: evt.Event) -> int:
        received.append(event.request.DataSet.getvalue())
        return 0x0000

    scp = AE(ae_title="PACS")
    for context in AllStoragePresentationContexts:  # preferring Explicit VR Little Endian, as storescp does
        scp.add_supported_context(context.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    port = free_port()
    handlers = [
        (evt.EVT_C_STORE, stored),
        (evt.EVT_ACCEPTED, lambda e: events.append("accepted")),
        (evt.EVT_RELEASED, lambda e: events.append("released")),
    ]
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    stopping = threading.Event()
    outcomes = Outcomes()
    worker = DestinationWorker("pacs", outcomes, stopping).start()
    try:
        for n, path in enumerate(images[:3]):
            worker.put(parcel(n, path, port))
        wait_until(lambda: len(outcomes.seen) == 3, timeout=30, what="three jobs delivered")
        assert [error for _, error, _ in outcomes.seen] == [None] * 3
        assert events == ["accepted"]  # one association for the three jobs, still open
        wait_until(lambda: events == ["accepted", "released"], timeout=IDLE_RELEASE_S + 5, what="released when idle")
        worker.put(parcel(3, images[3], port))
        wait_until(lambda: len(outcomes.seen) == 4, timeout=30, what="a fourth job")
        assert outcomes.seen[3][1] is None and events[2:] == ["accepted"]  # a new association for new work
    finally:
        stopping.set()
        worker.join(10)
        server.shutdown()
    # Streamed from the files as they are stored: each data set arrived byte for byte as in its file.
    for path, data in zip(images, received, strict=True):
        raw = path.read_bytes()
        assert raw.endswith(data), f"{path.name} was re-encoded on the way"


def test_jobs_waiting_for_an_association_that_fails_fail_together(images: list[Path]) -> None:
    stopping = threading.Event()
    outcomes = Outcomes()
    worker = DestinationWorker("pacs", outcomes, stopping)
    with silent_destination() as port:
        for n, path in enumerate(images[:3]):
            worker.put(parcel(n, path, port, timeout=2.0))
        started = time.monotonic()
        worker.start()
        try:
            wait_until(lambda: len(outcomes.seen) == 3, timeout=30, what="three jobs answered")
        finally:
            stopping.set()
            worker.join(10)
    assert all(error is not None and "no answer within 2 s" in str(error) for _, error, _ in outcomes.seen), (
        outcomes.seen
    )
    assert max(at for _, _, at in outcomes.seen) - started < 2 * 2.0  # one timeout for all, not one each


# -- a real node with a dead and a live destination -------------------------------------------------------------------


def two_destination_config(path: Path, *, port: int, data_dir: Path, dead_port: int, live_port: int) -> Path:
    path.write_text(
        f'[node]\nae_title = "CXRNODE"\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{data_dir}"\n\n'
        f'[[peers]]\nname = "dead"\nae_title = "DEAD"\nhost = "127.0.0.1"\nport = {dead_port}\nmay_send = false\n\n'
        f'[[peers]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {live_port}\nmay_send = false\n\n'
        '[routing]\ndefault = ["dead", "pacs"]\n\n'
        '[inference]\ndevice = "cpu"\nbatch_size = 4\nmax_wait_ms = 100\n\n'
        "[sender]\nretry_base_s = 0.5\nretry_factor = 1\nretry_max_delay_s = 0.5\nmax_attempts = 100\ntimeout_s = 10\n\n"
        '[outputs]\nobjects = ["SEG", "SR"]\n\n[http]\nport = 0\n'
    )
    return path


def test_a_silent_destination_delays_only_its_own_results(images: list[Path], tmp_path: Path) -> None:
    """Each job's results reach the live destination before the silent one has even failed for that job: under
    one sender for all destinations, listed after the silent one, each job waited out its 10 s timeout first."""
    require_dcmtk()
    pacs = StoreSCP("PACS", free_port(), tmp_path / "pacs").start()
    port = free_port()
    data_dir = tmp_path / "data"
    with silent_destination() as dead_port:
        config = two_destination_config(
            tmp_path / "node.toml", port=port, data_dir=data_dir, dead_port=dead_port, live_port=pacs.port
        )
        node = NodeProcess(config, port, tmp_path / "node.log").start()
        try:
            assert storescu(port, images).returncode == 0
            wait_until(lambda: len(pacs.files()) == 2 * len(images), timeout=180, what="every live result")

            def live_deliveries() -> list[dict]:  # the audit line follows the PACS's answer: wait for it too
                audit = [json.loads(line) for line in (data_dir / "audit.jsonl").read_text().splitlines()]
                deliveries = [a for a in audit if a["event"] == "delivery"]
                live = [a for a in deliveries if a["destination"] == "pacs"]
                return deliveries if len(live) == len(images) else []

            deliveries = wait_until(live_deliveries, timeout=30, what="every live delivery in the audit log")
            live = {a["job"]: a["time"] for a in deliveries if a["destination"] == "pacs"}
            dead_failures = [a for a in deliveries if a["destination"] == "dead"]
            assert len(live) == len(images)
            for job, delivered_at in live.items():
                first_failure = min((a["time"] for a in dead_failures if a["job"] == job), default="9999")
                assert delivered_at < first_failure, f"job {job}: live results waited for the silent destination"
            # The silent destination is retried, and only it: the live one keeps exactly one copy of each result.
            wait_until(
                lambda: all(j["attempts"] >= 1 for j in jobs(node)) and any(j["attempts"] >= 2 for j in jobs(node)),
                timeout=120,
                what="retries to the silent destination",
            )
            assert all(j["delivered"] == ["pacs"] and j["error"].startswith("dead: association") for j in jobs(node))
            assert len(pacs.files()) == 2 * len(images)
        finally:
            node.kill()
            pacs.stop()
    assert {source_of(ds) for ds in pacs.received()} == {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in images
    }


def jobs(node: NodeProcess) -> list[dict]:
    done = node.cli("jobs", "--json", "--limit", "1000")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["jobs"]
