"""DICOM TLS with DCMTK on both sides: storescu +tls sends to the node, the node sends its results to storescp +tls.
Certificates are made here with openssl: a CA, the node, a trusted client, the PACS, and an untrusted client."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import free_port
from dicom_peers import NodeProcess, StoreSCP, require_dcmtk, synthetic_file, wait_until, write_config

pytestmark = pytest.mark.slow


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.crt"
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(cert),
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
    )
    return key, cert


def make_certificate(folder: Path, name: str, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    key, request, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.crt"
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(request), "-subj", f"/CN={name}")
    openssl(
        "x509",
        "-req",
        "-in",
        str(request),
        "-CA",
        str(ca[1]),
        "-CAkey",
        str(ca[0]),
        "-CAcreateserial",
        "-out",
        str(cert),
        "-days",
        "2",
    )
    return key, cert


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    ca = make_ca(folder, "test-ca")
    other_ca = make_ca(folder, "untrusted-ca")
    return {
        "ca": ca,
        "node": make_certificate(folder, "node", ca),
        "client": make_certificate(folder, "client", ca),
        "pacs": make_certificate(folder, "pacs", ca),
        "stranger": make_certificate(folder, "stranger", other_ca),
    }


def storescu_tls(port: int, files: list[Path], key: Path, cert: Path, ca: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "storescu",
            "+tls",
            str(key),
            str(cert),
            "+cf",
            str(ca),
            "-rc",
            "-xs",
            "--aetitle",
            "MODALITY",
            "--call",
            "CXRNODE",
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_tls_round_trip_with_dcmtk(certificates: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    require_dcmtk()
    ca = certificates["ca"][1]
    pacs_key, pacs_cert = certificates["pacs"]
    pacs = StoreSCP(
        "PACS", free_port(), tmp_path / "pacs", options=("+tls", str(pacs_key), str(pacs_cert), "+cf", str(ca), "-rc")
    )
    pacs_port = pacs.port
    node_key, node_cert = certificates["node"]
    port = free_port()
    config = write_config(
        tmp_path / "tls.toml",
        port=port,
        data_dir=tmp_path / "data",
        destination_port=pacs_port,
        extra=(
            f'[tls]\nenabled = true\ncertificate = "{node_cert}"\nprivate_key = "{node_key}"\n'
            f'ca_certificates = "{ca}"\nrequire_client_certificate = true\n'
        ),
    )
    config.write_text(config.read_text().replace("may_send = false\n", "may_send = false\ntls = true\n"))
    node = NodeProcess(config, port, tmp_path / "node.log").start()
    pacs.start()
    try:
        image = synthetic_file(tmp_path, "tls-image", seed=4242, size=(300, 280))
        client_key, client_cert = certificates["client"]
        sent = storescu_tls(port, [image], client_key, client_cert, ca)
        assert sent.returncode == 0, sent.stderr
        wait_until(lambda: len(pacs.files()) == 2, timeout=120, what="results over TLS")

        stranger_key, stranger_cert = certificates["stranger"]
        refused = storescu_tls(port, [image], stranger_key, stranger_cert, ca)
        assert refused.returncode != 0  # the node does not trust the stranger's CA
        plain = subprocess.run(
            ["storescu", "--aetitle", "MODALITY", "--call", "CXRNODE", "127.0.0.1", str(port), str(image)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert plain.returncode != 0  # no TLS, no association
        assert "association accepted from MODALITY" in node.log.read_text()
    finally:
        node.kill()
        pacs.stop()
