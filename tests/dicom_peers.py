"""Real DICOM peers for the integration tests: DCMTK's storescp / storescu / echoscu, the node as a subprocess, and
test images in every transfer syntax the node accepts (encoded by DCMTK and pydicom, not by our code)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)

from conftest import REPO, free_port
from models.synth import make_dataset, make_radiograph

DCMTK = ("storescp", "storescu", "echoscu", "dcmcjpeg", "dcmcjpls", "dcmcrle", "dcmconv")


def require_dcmtk() -> None:
    missing = [tool for tool in DCMTK if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"DCMTK tools missing: {', '.join(missing)} (make test installs them)")


SYSTEM_BIN = "/usr/local/sbin:/usr/sbin:/sbin"  # where Debian installs daemons, e.g. Orthanc: not on a user's PATH


def orthanc_executable() -> str | None:
    """Orthanc's executable: on the PATH, or in /usr/sbin where Debian's `orthanc` package puts it."""
    return shutil.which("Orthanc") or shutil.which("Orthanc", path=SYSTEM_BIN)


def require_orthanc() -> str:
    executable = orthanc_executable()
    if executable is None:
        pytest.skip("Orthanc is not installed (make test installs it)")
    return executable


def wait_for_port(port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


# -- test images ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SentImage:
    path: Path
    sop_instance_uid: str
    transfer_syntax: str
    in_scope: bool


def synthetic_file(
    folder: Path,
    name: str,
    *,
    seed: int,
    modality: str = "DX",
    photometric: str = "MONOCHROME2",
    bits: int = 12,
    size: tuple[int, int] = (600, 560),
    positive: bool = True,
    view: str = "PA",
) -> Path:
    rng = np.random.default_rng(seed)
    radiograph = make_radiograph(
        rng, *size, positive=positive, bits_stored=bits, photometric_interpretation=photometric, view_position=view
    )
    ds = make_dataset(radiograph, patient_id=f"test-{seed}", modality=modality, rng=rng)
    path = folder / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def transcode(source: Path, target: Path, syntax: str) -> Path:
    """Re-encode with DCMTK (JPEG, JPEG-LS, RLE, Big Endian) or pydicom (JPEG 2000, Deflated, Implicit)."""
    dcmtk = {
        "jpeg-lossless-sv1": ["dcmcjpeg", "+e1"],
        "jpeg-lossless": ["dcmcjpeg", "+el"],
        "jpeg-baseline": ["dcmcjpeg", "+eb"],
        "jpeg-extended": ["dcmcjpeg", "+ee"],
        "jpeg-ls": ["dcmcjpls", "+el"],
        "jpeg-ls-near": ["dcmcjpls", "+en"],
        "rle": ["dcmcrle"],
        "big-endian": ["dcmconv", "+tb"],
    }
    if syntax in dcmtk:
        subprocess.run([*dcmtk[syntax], str(source), str(target)], check=True, capture_output=True)
        return target
    ds = pydicom.dcmread(source)
    if syntax in ("j2k-lossless", "j2k"):
        ds.compress(
            JPEG2000Lossless if syntax == "j2k-lossless" else JPEG2000,
            **({} if syntax == "j2k-lossless" else {"j2k_cr": [20]}),
        )
    elif syntax == "deflated":
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    elif syntax == "implicit":
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    elif syntax != "explicit":
        raise ValueError(f"unknown test transfer syntax {syntax!r}")
    ds.save_as(target, enforce_file_format=True)
    return target


def out_of_scope_files(folder: Path, seed: int) -> list[Path]:
    """A lateral DX and a CT (an auto-routing rule's mistake): both must be acknowledged and skipped."""
    lateral_ds = pydicom.dcmread(synthetic_file(folder, "lateral", seed=seed))
    lateral_ds.ViewPosition = "LL"  # a frontal picture with a lateral's header is enough for the filter
    lateral = folder / "lateral.dcm"
    lateral_ds.save_as(lateral, enforce_file_format=True)
    ct_source = pydicom.dcmread(synthetic_file(folder, "ct-source", seed=seed + 1))
    ct_source.SOPClassUID = ct_source.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ct_source.Modality = "CT"
    ct_source.SOPInstanceUID = ct_source.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid(
        entropy_srcs=[f"ct-{seed}"]
    )
    ct = folder / "ct.dcm"
    ct_source.save_as(ct, enforce_file_format=True)
    (folder / "ct-source.dcm").unlink()
    return [lateral, ct]


# -- DCMTK ----------------------------------------------------------------------------------------------------------------


FILE_SETTLE_S = 0.5  # a file storescp has not touched for this long is whole


@dataclass
class StoreSCP:
    """DCMTK storescp as a fake PACS: every object it receives is a file named by its SOP Instance UID."""

    ae_title: str
    port: int
    folder: Path
    options: tuple[str, ...] = ()  # e.g. TLS: ("+tls", KEY, CERT, "+cf", CA)
    process: subprocess.Popen | None = None

    def start(self) -> StoreSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder.parent / f"storescp-{self.port}.log", "ab")
        self.process = subprocess.Popen(
            [
                "storescp",
                *self.options,
                "--aetitle",
                self.ae_title,
                "--output-directory",
                str(self.folder),
                "--filename-extension",
                ".dcm",
                "--unique-filenames",
                str(self.port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, 10, self.process)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def received(self) -> list[pydicom.Dataset]:
        datasets = []
        for path in self.files():
            try:
                datasets.append(pydicom.dcmread(path))
            except Exception:  # not DICOM: a test that counts on it reads the file itself
                continue
        return datasets

    def files(self) -> list[Path]:
        """Every file received, once none has been written to for FILE_SETTLE_S.

        storescp writes each object under its final name, so a file seen the moment it appears may be half written:
        a SEG counted whose SR is still arriving, or a dataset read without its last elements.
        """
        deadline = time.monotonic() + 10
        while True:
            paths = sorted(self.folder.glob("*.dcm"))
            newest = max((p.stat().st_mtime for p in paths if p.exists()), default=0.0)
            young = time.time() - newest
            if young >= FILE_SETTLE_S or time.monotonic() >= deadline:
                return paths
            time.sleep(FILE_SETTLE_S - young)


STORESCU_PROPOSE = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}
"""storescu proposes one family of transfer syntaxes per run: the option that proposes each file's own."""


def storescu(
    port: int, files: list[Path], *, called: str = "CXRNODE", calling: str = "MODALITY", extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Send with DCMTK storescu, one run per transfer syntax so that no file is converted on the way."""
    groups: dict[str, list[Path]] = {}
    for path in files:
        syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(STORESCU_PROPOSE[syntax], []).append(path)
    outputs, code = [], 0
    for option, group in groups.items():
        done = subprocess.run(
            [
                "storescu",
                "-v",
                option,
                *extra,
                "--aetitle",
                calling,
                "--call",
                called,
                "127.0.0.1",
                str(port),
                *map(str, group),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        outputs.append(done.stdout + done.stderr)
        code = code or done.returncode
    return subprocess.CompletedProcess(["storescu"], code, "", "\n".join(outputs))


def echoscu(port: int, *, called: str = "CXRNODE", calling: str = "ECHO") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["echoscu", "--aetitle", calling, "--call", called, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
    )


# -- the node -------------------------------------------------------------------------------------------------------------


@dataclass
class NodeProcess:
    config: Path
    port: int
    log: Path
    process: subprocess.Popen | None = None

    def start(
        self, timeout: float = 120, crash_at: str | None = None, faults: dict[str, str] | None = None
    ) -> NodeProcess:
        """Start `cxrnode serve`; `crash_at` ("point:n") makes it SIGKILL itself there, `faults` sets other
        node.faults variables (e.g. CXRNODE_WORKER_DIES_ON)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env = {k: v for k, v in env.items() if not k.startswith("CXRNODE_")}
        if crash_at:
            env["CXRNODE_CRASH_AT"] = crash_at
        env.update(faults or {})
        self.process = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "serve", "--config", str(self.config)],
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
        )
        try:
            wait_for_port(self.port, timeout, self.process)
        except Exception:
            print(self.log.read_text()[-5000:])
            raise
        return self

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as in a power cut or the OOM killer."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> int:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            return self.process.wait(60)
        return self.process.returncode if self.process else 0

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "node.cli", *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )


def write_config(
    path: Path,
    *,
    port: int,
    data_dir: Path,
    destination_port: int | None = None,
    extra: str = "",
    retry: str = "retry_base_s = 0.5\nretry_factor = 2\nretry_max_delay_s = 2\nmax_attempts = 3",
    objects: tuple[str, ...] = ("SEG", "SR"),
    http_port: int = 0,
) -> Path:
    destination = ""
    route = ""
    if destination_port is not None:
        destination = f'[[peers]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {destination_port}\nmay_send = false\n'
        route = '[routing]\ndefault = ["pacs"]\n'
    path.write_text(
        f'[node]\nae_title = "CXRNODE"\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{data_dir}"\n\n'
        f'{destination}\n{route}\n[inference]\ndevice = "cpu"\nbatch_size = 4\nmax_wait_ms = 100\n\n'
        f"[sender]\n{retry}\ntimeout_s = 10\n\n[outputs]\nobjects = {json.dumps(list(objects))}\n\n"
        f"[http]\nport = {http_port}\n\n{extra}\n"
    )
    return path


@contextmanager
def running_node(
    tmp: Path,
    *,
    destination_port: int | None,
    extra: str = "",
    name: str = "node",
    objects: tuple[str, ...] = ("SEG", "SR"),
) -> Iterator[NodeProcess]:
    port = free_port()
    config = write_config(
        tmp / f"{name}.toml",
        port=port,
        data_dir=tmp / f"{name}-data",
        destination_port=destination_port,
        extra=extra,
        objects=objects,
    )
    node = NodeProcess(config, port, tmp / f"{name}.log").start()
    try:
        yield node
    finally:
        node.kill()


SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def source_of(result: pydicom.Dataset) -> str:
    """The SOP Instance UID of the image a SEG, SR, GSPS or SC describes."""
    if result.SOPClassUID == SEG_CLASS:
        return str(result.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID)
    if result.Modality == "PR":
        return str(result.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID)
    if "SourceImageSequence" in result:
        return str(result.SourceImageSequence[0].ReferencedSOPInstanceUID)
    evidence = result.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    return next(
        str(i.ReferencedSOPInstanceUID)
        for s in evidence
        for i in s.ReferencedSOPSequence
        if i.ReferencedSOPClassUID != SEG_CLASS
    )


def wait_until(predicate, timeout: float, interval: float = 0.25, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached after {timeout} s")
