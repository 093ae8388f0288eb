"""DICOMweb in and out against real peers: Orthanc with its DICOMweb plugin (Debian `orthanc-dicomweb`) and DCMTK's
storescp, with `dicomweb-client` as the STOW-RS, QIDO-RS and WADO-RS client.

- Orthanc pushes an image to the node by STOW-RS (its DicomWeb.Servers and /dicom-web/servers/NAME/stow); the node
  sends SEG + SR back by STOW-RS with basic credentials; QIDO-RS and WADO-RS find them in Orthanc.
- dicomweb-client posts an image to the node's STOW-RS: SEG, SR and GSPS arrive at a DIMSE destination; a bad token
  is refused (401) with nothing stored; a malformed part gets its own failure reason (202, then 409 alone).
- A DICOMweb destination that is down: the job ends `dead` after the configured attempts; once the destination is
  up, `cxrnode resend` delivers.
- Without the model (the HTTP side in this process): curl with Expect: 100-continue, the address policy (403), and
  the STOW-RS client's bearer token against the node's own STOW-RS server.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from conftest import free_port
from dicom_peers import (
    NodeProcess,
    StoreSCP,
    orthanc_executable,
    require_dcmtk,
    require_orthanc,
    source_of,
    synthetic_file,
    wait_for_port,
    wait_until,
    write_config,
)
from dicom_validation import assert_valid_dicom
from node.audit import AuditLog
from node.config import ConfigError, Peer, Settings, TLSSettings, describe, load_settings, with_command_line_peers
from node.queue.sqlite import SQLiteQueue
from node.receiving import Receiver
from node.spool import Spool
from node.stow_client import STOWError, problems_in, store_dicomweb
from node.stow_server import RequestError, client_peer, split_multipart
from node.web import StatusSources, start_http

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
TOKEN = "stow-token-5e1f"
ORTHANC_USER, ORTHANC_PASSWORD = "cxrnode", "orthanc-pw-93ab"
TESTER = ("tester", "tester-pw")
BOUNDARY = "cxrnode-test-boundary"


def require_orthanc_dicomweb() -> None:
    if orthanc_executable() is None or not DICOMWEB_PLUGIN.is_file():
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (make tools installs orthanc-dicomweb)")


class OrthancWeb:
    """A real Orthanc with the DICOMweb plugin, on free ports, with HTTP basic authentication on."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.http_port, self.dicom_port = free_port(), free_port()
        self.process: subprocess.Popen | None = None

    @property
    def dicomweb(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def start(self, servers: dict[str, object] | None = None) -> OrthancWeb:
        self.folder.mkdir(parents=True, exist_ok=True)
        configuration = {
            "Name": "cxrnode-dicomweb-test",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {ORTHANC_USER: ORTHANC_PASSWORD, TESTER[0]: TESTER[1]},
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": servers or {}},
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(configuration, indent=2))
        self.process = subprocess.Popen(
            [require_orthanc(), str(path)], stdout=open(self.folder / "orthanc.log", "ab"), stderr=subprocess.STDOUT
        )
        wait_for_port(self.http_port, 60, self.process)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)

    def rest(self, method: str, path: str, body: bytes | None = None) -> object:
        response = requests.request(
            method, f"http://127.0.0.1:{self.http_port}{path}", data=body, auth=TESTER, timeout=120
        )
        response.raise_for_status()
        return response.json() if response.content[:1] in (b"{", b"[") else response.content

    def client(self) -> DICOMwebClient:
        session = requests.Session()
        session.auth = TESTER
        return DICOMwebClient(self.dicomweb, session=session)


def node_client(http_port: int, token: str) -> DICOMwebClient:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    return DICOMwebClient(f"http://127.0.0.1:{http_port}/dicom-web", session=session)


def multipart(*parts: bytes) -> bytes:
    body = b"".join(
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n" for part in parts
    )
    return body + f"--{BOUNDARY}--\r\n".encode()


def post_raw(http_port: int, body: bytes, token: str = TOKEN, study: str = "") -> requests.Response:
    return requests.post(
        f"http://127.0.0.1:{http_port}/dicom-web/studies" + (f"/{study}" if study else ""),
        data=body,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
            "Accept": "application/dicom+json",
            "Authorization": f"Bearer {token}",
        },
        timeout=60,
    )


def jobs_of(node: NodeProcess) -> list[dict]:
    done = node.cli("jobs", "--json", "--limit", "100")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["jobs"]


def results_in(orthanc: OrthancWeb, study_uid: str) -> dict[str, str]:
    """Modality -> SOP Instance UID of what QIDO-RS finds in the study."""
    found = orthanc.client().search_for_instances(
        study_instance_uid=study_uid, fields=["Modality", "SOPInstanceUID", "SeriesInstanceUID"]
    )
    return {
        pydicom.Dataset.from_json(item).Modality: str(pydicom.Dataset.from_json(item).SOPInstanceUID) for item in found
    }


# -- without a node ---------------------------------------------------------------------------------------------------


def test_multipart_parts_and_malformed_bodies() -> None:
    parts = split_multipart(b"preamble\r\n" + multipart(b"first\r\n--not-a-boundary", b""), BOUNDARY)
    assert [p.content for p in parts] == [b"first\r\n--not-a-boundary", b""]
    assert parts[0].headers == {"content-type": "application/dicom"}
    no_headers = split_multipart(f"--{BOUNDARY}\r\n\r\nX\r\n--{BOUNDARY}--".encode(), BOUNDARY)
    assert [(p.headers, p.content) for p in no_headers] == [({}, b"X")]
    for body, words in (
        (multipart(b"x")[: -len(f"--{BOUNDARY}--\r\n")], "close delimiter"),
        (b"no parts at all", "no part delimited"),
        (f"--{BOUNDARY}\r\nContent-Type: application/dicom".encode(), "no empty line after its header"),
    ):
        with pytest.raises(RequestError, match=words) as error:
            split_multipart(body, BOUNDARY)
        assert error.value.status == 400


def test_dicomweb_peers_in_the_config(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(
        '[[peers]]\nname = "web"\nurl = "https://archive.example.org:8443/dicom-web/"\nmay_send = false\n'
        'username = "cxr"\npassword_env = "ARCHIVE_PW"\nobjects = ["SR"]\n[routing]\ndefault = ["web"]\n'
    )
    settings = load_settings(path, environ={"ARCHIVE_PW": "s3cret-value"})
    peer = settings.peer("web")
    assert (peer.url, peer.host, peer.port) == (
        "https://archive.example.org:8443/dicom-web",
        "archive.example.org",
        8443,
    )
    assert peer.password_value({"ARCHIVE_PW": "s3cret-value"}) == "s3cret-value"
    assert "s3cret" not in repr(settings) + describe(settings)
    assert "https://archive.example.org:8443/dicom-web (DICOMweb" in describe(settings)

    def problem(text: str, environ: dict[str, str] | None = None) -> str:
        path.write_text(text)
        with pytest.raises(ConfigError) as error:
            load_settings(path, environ=environ or {})
        return str(error.value)

    base = '[[peers]]\nname = "web"\nmay_send = false\n'
    assert "peers[0].url: put credentials in username" in problem(base + 'url = "https://u:pw@h/dicom-web"\n')
    assert "peers[0].url: expected an http:// or https:// URL" in problem(base + 'url = "ftp://h/x"\n')
    assert "peers[0].password_env: environment variable NOPE is not set" in problem(
        base + 'url = "http://h/x"\nusername = "u"\npassword_env = "NOPE"\n'
    )
    assert "peers[0].port: a peer with url takes its port from it (80)" in problem(
        base + 'url = "http://h/x"\nport = 81\n'
    )
    assert "peers[0].token: give a bearer token or a username and password" in problem(
        base + 'url = "http://h/x"\ntoken = "t"\nusername = "u"\n'
    )
    assert "peers[0].ae_title: required" in problem(base + 'host = "h"\nport = 104\n')
    assert "peers[0].token: token is for a DICOMweb destination" in problem(
        base + 'ae_title = "A"\nhost = "h"\nport = 104\ntoken = "t"\n'
    )

    plain = load_settings(None, environ={})
    added = with_command_line_peers(
        plain, ["http://127.0.0.1:8042/dicom-web", "PACS@127.0.0.1:104"], [], {"CXRNODE_DESTINATION_TOKEN": "tok"}
    )
    web, dimse = added.peers
    assert (web.url, web.token_env, web.token_value({"CXRNODE_DESTINATION_TOKEN": "tok"})) == (
        "http://127.0.0.1:8042/dicom-web",
        "CXRNODE_DESTINATION_TOKEN",
        "tok",
    )
    assert dimse.url is None and dimse.ae_title == "PACS"
    assert added.routing.default == [web.name, dimse.name]
    with pytest.raises(ConfigError, match="--destination http://u:p@h/x: url: put credentials"):
        with_command_line_peers(plain, ["http://u:p@h/x"], [], {})


def test_stow_rs_clients_are_the_may_send_peers_by_address(tmp_path: Path) -> None:
    """HTTP has no calling AE title: with may_send peers declared, a client is the one whose addresses it calls from."""
    path = tmp_path / "node.toml"
    path.write_text(
        '[[peers]]\nname = "modality"\nae_title = "CR1"\nhost = "10.1.2.3"\nport = 104\n'
        '[[peers]]\nname = "ris"\nurl = "http://10.9.9.9/dicom-web"\nmay_send = true\naddresses = ["10.0.0.0/8"]\n'
        '[[peers]]\nname = "pacs"\nae_title = "PACS"\nhost = "10.5.5.5"\nport = 104\nmay_send = false\n'
        'addresses = ["10.5.5.5"]\n'
    )
    settings = load_settings(path, environ={})
    peer, refusal = client_peer(settings, "10.5.5.5")
    assert peer is not None and peer.name == "ris" and refusal is None  # pacs may not send; ris's network holds it
    assert client_peer(settings, "192.168.1.7") == (
        None,
        "no peer with may_send = true lists 192.168.1.7 in its addresses",
    )  # the modality lists no addresses, so it may send by C-STORE (its AE title) but not by STOW-RS
    assert settings.allowed_calling_aes() == {"CR1"}  # the DICOMweb peer has no AE title to call with
    assert client_peer(load_settings(None, environ={}), "192.168.1.7") == (None, None)  # no may_send peer: anyone
    path.write_text('[[peers]]\nname = "web"\nurl = "http://10.9.9.9/dicom-web"\n')
    assert load_settings(path, environ={}).allowed_calling_aes() is None  # a DICOMweb destination locks nobody out


def test_stow_response_problems_name_each_instance() -> None:
    sent = [pydicom.Dataset(), pydicom.Dataset(), pydicom.Dataset()]
    for number, ds in enumerate(sent, start=1):
        ds.SOPInstanceUID = f"1.2.3.{number}"
    response = pydicom.Dataset()
    stored, failed = pydicom.Dataset(), pydicom.Dataset()
    stored.ReferencedSOPInstanceUID = "1.2.3.1"
    failed.ReferencedSOPInstanceUID, failed.FailureReason = "1.2.3.2", 0xA700
    response.ReferencedSOPSequence, response.FailedSOPSequence = [stored], [failed]
    assert problems_in(response, sent) == [
        "1.2.3.2: failed, 0xA700 Refused: Out of Resources",
        "1.2.3.3: not listed as stored in the response",
    ]


@dataclass
class InProcessStow:
    """The node's HTTP side alone, in this process: real queue, spool and STOW-RS server, no model."""

    http_port: int
    config: Path
    holder: list[Settings]
    spool: Spool
    queue: SQLiteQueue

    def reload(self, extra: str) -> None:
        self.config.write_text(self.config.read_text() + extra)
        self.holder[0] = load_settings(self.config, environ={})


@contextmanager
def in_process_stow(tmp_path: Path) -> Iterator[InProcessStow]:
    http_port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n[http]\nport = {http_port}\ntoken = "{TOKEN}"\n')
    holder = [load_settings(config, environ={})]
    spool, queue = Spool(holder[0].node.data_dir), SQLiteQueue(tmp_path / "queue.db")
    spool.prepare()
    receiver = Receiver(lambda: holder[0], spool, queue, threading.Event(), AuditLog(holder[0].node.data_dir))
    sources = StatusSources(
        lambda: holder[0], queue, receiver.metrics, None, lambda: "test", lambda: None, spool.data_dir
    )
    server = start_http(replace(sources, receiver=receiver))
    assert server is not None
    try:
        yield InProcessStow(http_port, config, holder, spool, queue)
    finally:
        server.shutdown()
        queue.close()


def test_stow_rs_in_process_with_curl_expect_continue_and_the_address_policy(tmp_path: Path) -> None:
    """curl sends a 2 MB image the way Orthanc's libcurl does, with Expect: 100-continue, and gets 100 Continue,
    then 200 with the job committed; a client from an address no may_send peer lists gets 403, nothing stored."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    image = synthetic_file(tmp_path, "big", seed=77, size=(1100, 1000), bits=16)
    body = tmp_path / "body"
    body.write_bytes(multipart(image.read_bytes()))
    with in_process_stow(tmp_path) as node:

        def curl() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["curl", "-sS", "-v", "-X", "POST", "--data-binary", f"@{body}", "-H", "Expect: 100-continue",
                 "-H", f'Content-Type: multipart/related; type="application/dicom"; boundary={BOUNDARY}',
                 "-H", f"Authorization: Bearer {TOKEN}", "-w", "\nHTTP %{http_code}",
                 f"http://127.0.0.1:{node.http_port}/dicom-web/studies"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip

        done = curl()
        assert "100 Continue" in done.stderr and done.stdout.endswith("HTTP 200"), done.stderr + done.stdout
        job = node.queue.find(str(pydicom.dcmread(image, stop_before_pixels=True).SOPInstanceUID))
        assert job is not None and job.spool_path and node.spool.absolute(job.spool_path).is_file()
        node.reload(
            '[[peers]]\nname = "ris"\nae_title = "RIS"\nhost = "10.1.1.1"\nport = 104\naddresses = ["10.1.1.1"]\n'
        )
        refused = curl()
        assert refused.stdout.endswith("HTTP 403") and "lists 127.0.0.1" in refused.stdout, refused.stdout
        assert len(node.queue.jobs(limit=10)) == 1


def test_stow_client_with_a_bearer_token_against_the_nodes_own_stow_rs(tmp_path: Path) -> None:
    """node.stow_client sends with the peer's bearer token (read from the variable token_env names): the right one
    stores, a wrong one fails with HTTP 401 and a hint, never the token itself."""
    images = [synthetic_file(tmp_path, f"i{n}", seed=80 + n, size=(300, 280)) for n in range(2)]
    with in_process_stow(tmp_path) as node:
        url = f"http://127.0.0.1:{node.http_port}/dicom-web"
        peer = Peer.model_validate(
            {"name": "self", "url": url, "token_env": "SELF_TOKEN"}, context={"environ": {"SELF_TOKEN": "x"}}
        )
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("SELF_TOKEN", TOKEN)
            store_dicomweb(peer, images, timeout=30, tls=TLSSettings())
            assert len(node.queue.jobs(limit=10)) == 2
            patch.setenv("SELF_TOKEN", "not-the-token")
            with pytest.raises(STOWError) as refused:
                store_dicomweb(peer, images[:1], timeout=30, tls=TLSSettings())
    assert str(refused.value).startswith(f"{url}: HTTP 401 Unauthorized (check the peer's token")
    assert "not-the-token" not in str(refused.value)


# -- with real peers --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_orthanc_pushes_by_stow_rs_and_gets_seg_and_sr_back_by_stow_rs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_orthanc_dicomweb()
    orthanc = OrthancWeb(tmp_path / "orthanc")
    node_port, http_port = free_port(), free_port()
    monkeypatch.setenv("ORTHANC_TEST_PASSWORD", ORTHANC_PASSWORD)  # the node reads it; it is never in the file
    config = write_config(
        tmp_path / "node.toml",
        port=node_port,
        data_dir=tmp_path / "data",
        http_port=http_port,
        objects=("SEG", "SR", "GSPS"),
        extra=(
            f'token = "{TOKEN}"\n\n[[peers]]\nname = "orthanc"\nae_title = "ORTHANC"\nurl = "{orthanc.dicomweb}"\n'
            f'username = "{ORTHANC_USER}"\npassword_env = "ORTHANC_TEST_PASSWORD"\nmay_send = true\n'
            'addresses = ["127.0.0.1"]\nobjects = ["SEG", "SR"]\n\n[routing]\ndefault = ["orthanc"]\n'
        ),
    )
    node = NodeProcess(config, node_port, tmp_path / "node.log").start()
    servers = {
        "cxrnode": {
            "Url": f"http://127.0.0.1:{http_port}/dicom-web/",
            "HttpHeaders": {"Authorization": f"Bearer {TOKEN}"},
        }
    }
    orthanc.start(servers)
    try:
        image = synthetic_file(tmp_path, "chest", seed=4711, size=(512, 480), positive=True)
        source = pydicom.dcmread(image, stop_before_pixels=True)
        uploaded = orthanc.rest("POST", "/instances", image.read_bytes())
        assert isinstance(uploaded, dict) and uploaded["Status"] == "Success"
        pushed = orthanc.rest(
            "POST", "/dicom-web/servers/cxrnode/stow", json.dumps({"Resources": [uploaded["ID"]]}).encode()
        )
        assert pushed is not None
        found = wait_until(
            lambda: (lambda r: r if {"SEG", "SR"} <= set(r) else None)(results_in(orthanc, source.StudyInstanceUID)),
            timeout=240,
            what="SEG and SR in Orthanc by QIDO-RS",
        )
        assert set(found) == {"DX", "SEG", "SR"}  # the destination's profile: no GSPS
        jobs = jobs_of(node)
        assert [(j["sop_instance_uid"], j["state"], j["calling_ae"]) for j in jobs] == [
            (source.SOPInstanceUID, "done", "ORTHANC")  # the STOW-RS client is the peer whose addresses it calls from
        ]
        client = orthanc.client()
        for modality in ("SEG", "SR"):
            series = client.search_for_series(source.StudyInstanceUID, search_filters={"Modality": modality})
            series_uid = pydicom.Dataset.from_json(series[0]).SeriesInstanceUID
            ds = client.retrieve_instance(source.StudyInstanceUID, series_uid, found[modality])  # WADO-RS
            assert source_of(ds) == source.SOPInstanceUID
            path = tmp_path / f"{modality}.dcm"
            ds.save_as(path, enforce_file_format=True)
            assert_valid_dicom(path, allowed_warnings=("99CXRNODE",))
    finally:
        node.kill()
        orthanc.stop()
    seen = node.log.read_text() + (tmp_path / "data" / "audit.jsonl").read_text(errors="replace")
    assert ORTHANC_PASSWORD not in seen and TOKEN not in seen


@pytest.mark.slow
def test_stow_rs_in_dimse_out_refusals_and_a_dicomweb_dead_letter(tmp_path: Path) -> None:
    require_dcmtk()
    require_orthanc_dicomweb()
    pacs = StoreSCP("PACS", free_port(), tmp_path / "pacs").start()
    orthanc = OrthancWeb(tmp_path / "orthanc")  # its port is reserved, but it starts only after the job is dead
    node_port, http_port = free_port(), free_port()
    config = write_config(
        tmp_path / "node.toml",
        port=node_port,
        data_dir=tmp_path / "data",
        destination_port=pacs.port,
        http_port=http_port,
        objects=("SEG", "SR", "GSPS"),
        retry="retry_base_s = 0.5\nretry_factor = 1\nretry_max_delay_s = 1\nmax_attempts = 2",
        extra=(
            f'token = "{TOKEN}"\n\n[[peers]]\nname = "web"\nurl = "{orthanc.dicomweb}/"\nmay_send = false\n'
            f'username = "{ORTHANC_USER}"\npassword = "{ORTHANC_PASSWORD}"\nobjects = ["SEG", "SR"]\n'
        ),
    )
    config.write_text(config.read_text().replace('default = ["pacs"]', 'default = ["pacs", "web"]'))
    node = NodeProcess(config, node_port, tmp_path / "node.log").start()
    try:
        image = synthetic_file(tmp_path, "chest", seed=2024, size=(480, 448), positive=True)
        source = pydicom.dcmread(image)
        other = synthetic_file(tmp_path, "other", seed=2025, size=(480, 448), positive=True)
        truncated = other.read_bytes()[: other.stat().st_size // 2]  # a malformed part: its pixel data cut short

        with pytest.raises(requests.HTTPError) as refused:
            node_client(http_port, "wrong-token").store_instances([source])
        assert refused.value.response.status_code == 401
        assert jobs_of(node) == [] and not list((tmp_path / "data" / "spool").rglob("*.dcm"))

        result = node_client(http_port, TOKEN).store_instances([source])
        assert [str(i.ReferencedSOPInstanceUID) for i in result.ReferencedSOPSequence] == [source.SOPInstanceUID]
        assert "FailedSOPSequence" not in result
        # Listed as stored, so its job is committed already: no waiting here.
        assert [j["sop_instance_uid"] for j in jobs_of(node)] == [source.SOPInstanceUID]

        mixed = post_raw(http_port, multipart(image.read_bytes(), truncated))
        assert mixed.status_code == 202, mixed.text
        answer = pydicom.Dataset.from_json(mixed.json())
        assert [str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence] == [source.SOPInstanceUID]
        failed = [(str(i.ReferencedSOPInstanceUID), int(i.FailureReason)) for i in answer.FailedSOPSequence]
        assert failed == [(pydicom.dcmread(other, stop_before_pixels=True).SOPInstanceUID, 0xC000)]  # Cannot understand
        assert mixed.headers["Warning"].startswith("299 ") and "Pixel Data is truncated" in mixed.headers["Warning"]
        assert len(jobs_of(node)) == 1  # the image was there already; nothing of the malformed part was kept

        alone = post_raw(http_port, multipart(b"not DICOM at all"))
        assert alone.status_code == 409
        assert [int(i.FailureReason) for i in pydicom.Dataset.from_json(alone.json()).FailedSOPSequence] == [0xC000]
        assert "not a DICOM PS3.10 file" in alone.headers["Warning"]
        elsewhere = post_raw(http_port, multipart(other.read_bytes()), study="1.2.3.4")  # another study's URL
        assert elsewhere.status_code == 409 and "another study than 1.2.3.4" in elsewhere.headers["Warning"]
        assert [int(i.FailureReason) for i in pydicom.Dataset.from_json(elsewhere.json()).FailedSOPSequence] == [0xA900]
        assert len(jobs_of(node)) == 1
        wrong_type = requests.post(
            f"http://127.0.0.1:{http_port}/dicom-web/studies",
            data=b"{}",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
            timeout=30,
        )
        assert wrong_type.status_code == 415

        wait_until(lambda: len(pacs.files()) >= 3, timeout=240, what="SEG, SR and GSPS at the DIMSE destination")
        assert sorted(ds.Modality for ds in pacs.received()) == ["PR", "SEG", "SR"]
        assert all(source_of(ds) == source.SOPInstanceUID for ds in pacs.received())

        dead = wait_until(
            lambda: next((j for j in jobs_of(node) if j["state"] == "dead"), None), timeout=60, what="dead job"
        )
        assert (
            orthanc.dicomweb in dead["error"] and "cannot connect: [Errno 111] Connection refused" in dead["error"]
        ), dead["error"]
        assert dead["delivered"] == ["pacs"]

        orthanc.start()
        resent = node.cli("resend", str(dead["id"]))
        assert resent.returncode == 0, resent.stderr
        found = wait_until(
            lambda: (lambda r: r if {"SEG", "SR"} <= set(r) else None)(results_in(orthanc, source.StudyInstanceUID)),
            timeout=60,
            what="SEG and SR in Orthanc after resend",
        )
        assert set(found) == {"SEG", "SR"}
        wait_until(lambda: jobs_of(node)[0]["state"] == "done", timeout=30, what="job done after resend")
    finally:
        node.kill()
        pacs.stop()
        orthanc.stop()
    assert ORTHANC_PASSWORD not in node.log.read_text() and TOKEN not in node.log.read_text()
