"""Metrics, health and the status page of a running node; the page is checked in a real headless Chromium."""

from __future__ import annotations

import io
import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import free_port
from dicom_peers import NodeProcess, require_dcmtk, storescu, synthetic_file, wait_until, write_config

pytestmark = pytest.mark.slow
TOKEN = "test-token-5d2f"


def get(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    require_dcmtk()
    folder = tmp_path_factory.mktemp("web")
    port, http_port = free_port(), free_port()
    config = write_config(
        folder / "web.toml", port=port, data_dir=folder / "data", http_port=http_port, extra=f'token = "{TOKEN}"\n'
    )  # appended to the [http] table
    config.write_text(
        config.read_text() + '\n[[peers]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
        "port = 11999\nmay_send = false\n"
    )
    node = NodeProcess(config, port, folder / "web.log").start()
    # larger than a thumbnail, so that the full-size overlay is larger too
    images = [synthetic_file(folder, f"w{i}", seed=7100 + i, size=(640, 600), positive=True) for i in range(2)]
    lateral = synthetic_file(folder, "lat", seed=7200, size=(300, 280))
    import pydicom

    ds = pydicom.dcmread(lateral)
    ds.ViewPosition = "LL"
    ds.save_as(lateral)
    assert storescu(port, images + [lateral]).returncode == 0
    base = f"http://127.0.0.1:{http_port}"
    wait_until(
        lambda: metric(get(f"{base}/metrics", TOKEN)[1].decode(), "cxrnode_images_processed_total") == 2,
        timeout=120,
        what="two images processed",
    )
    wait_until(lambda: len(list((folder / "data" / "overlays").glob("*.jpg"))) == 2, timeout=30, what="two overlays")
    sent = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(path) for path in images)}
    yield node, base, sent
    node.kill()


def test_health_and_readiness(node) -> None:  # type: ignore[no-untyped-def]
    _, base, _ = node
    assert get(f"{base}/healthz") == (200, b"ok\n")
    code, body = get(f"{base}/readyz")
    assert code == 200 and json.loads(body) == {"ready": True, "problems": [], "model": json.loads(body)["model"]}
    assert json.loads(body)["model"].startswith("cxrnode-demo")


def test_metrics(node) -> None:  # type: ignore[no-untyped-def]
    _, base, _ = node
    assert get(f"{base}/metrics")[0] == 401  # token required
    code, body = get(f"{base}/metrics", TOKEN)
    text = body.decode()
    assert code == 200
    assert metric(text, "cxrnode_images_received_total") == 2
    assert metric(text, "cxrnode_images_skipped_total") == 1
    assert metric(text, "cxrnode_images_processed_total") == 2
    assert metric(text, "cxrnode_images_failed_total") == 0
    assert 'cxrnode_queue_depth{state="done"} 2.0' in text and 'cxrnode_queue_depth{state="skipped"} 1.0' in text
    assert metric(text, "cxrnode_oldest_job_age_seconds") == 0
    assert metric(text, "cxrnode_inference_batch_size_count") >= 1
    assert "cxrnode_inference_seconds_bucket" in text and "cxrnode_send_seconds" in text
    assert all(line.startswith(("#", "cxrnode_")) or not line for line in text.splitlines())


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("chromium / chromedriver not installed (make test installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path_factory.mktemp('profile')}",
        "--window-size=1500,1300",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    yield browser
    browser.quit()


def test_status_page_in_a_real_browser(node, browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    process, base, sent = node
    assert get(f"{base}/")[0] == 401
    api = json.loads(get(f"{base}/api/status", TOKEN)[1])
    browser.get(f"{base}/?token={TOKEN}")
    assert "cxrnode" in browser.title
    assert browser.find_element(By.ID, "ready").text.startswith("ready")
    jobs = browser.find_element(By.ID, "jobs").text
    assert jobs.count("done") == 2 and "skipped" in jobs and "View Position LL" in jobs
    assert "PACS" in browser.find_element(By.ID, "peers").text
    assert "127.0.0.1:11999 no" in browser.find_element(By.ID, "peers").text  # may send: no, not blank
    # per job: what was found, which study, how long each stage took (the numbers the queue holds)
    done = [j for j in api["jobs"] if j["state"] == "done"]
    assert len(done) == 2
    for job in done:
        row = browser.find_element(By.ID, f"job-{job['id']}").text
        source = sent[job["sop_instance_uid"]]
        finding, timings = job["finding"], job["timings"]
        assert source.AccessionNumber and f"acc. {source.AccessionNumber}" in row
        date = str(source.StudyDate)
        assert f"{date[:4]}-{date[4:6]}-{date[6:]}" in row
        assert f"opacity {'present' if finding['opacity_present'] else 'absent'}" in row
        assert f"p = {finding['opacity_probability']:.2f}" in row
        severity, extent = finding["severity_percent"], finding["extent_score"]
        assert (
            f"{severity['total']:.1f} %" in row and f"R {severity['right']:.1f} % · L {severity['left']:.1f} %" in row
        )
        assert f"{extent['total']}/8" in row and f"R {extent['right']} · L {extent['left']}" in row
        assert {"queue_wait", "inference", "writing"} <= set(timings)
        for key, name in (("queue_wait", "queue wait"), ("inference", "inference"), ("writing", "writing")):
            assert f"{name} {timings[key]:.2f} s" in row
        assert job["model_version"] and job["model_version"] in row
    page = browser.page_source
    for source in sent.values():  # never the patient
        assert str(source.PatientName) not in page and str(source.PatientID) not in page
        assert str(source.PatientBirthDate) not in page
    # totals, throughput, uptime, free disk
    assert "done 2" in browser.find_element(By.ID, "queue").text
    assert browser.find_element(By.ID, "throughput").text == (
        "images analysed: last 5 min: 2 · last 60 min: 2 · since start: 2"
    )
    about = browser.find_element(By.ID, "node").text
    assert about.startswith("up ") and "GB free of" in about and str(api["node"]["data_dir"]) in about
    thumbnails = browser.find_elements(By.CSS_SELECTOR, "#jobs img")
    assert len(thumbnails) == 2
    assert all(
        browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", t) > 0 for t in thumbnails
    )  # the overlay pictures loaded
    boxes = [t.rect for t in thumbnails]
    present = [element.rect for element in browser.find_elements(By.CSS_SELECTOR, "#jobs b.present")]
    shot = Path(os.environ.get("CXRNODE_SCREENSHOT", tmp_path / "status.png"))
    browser.save_screenshot(str(shot))
    # each thumbnail opens the full-size overlay
    small_width = browser.execute_script("return arguments[0].naturalWidth", thumbnails[0])
    link = thumbnails[0].find_element(By.XPATH, "..").get_attribute("href")
    assert "/overlays/" in link and link.endswith(f".jpg?token={TOKEN}")
    code, body = get(link.split("?")[0], TOKEN)
    full = Image.open(io.BytesIO(body))
    assert code == 200 and full.format == "JPEG" and full.width > small_width
    # the /metrics link works
    browser.find_element(By.ID, "metrics").click()
    assert "cxrnode_images_processed_total 2.0" in browser.find_element(By.TAG_NAME, "body").text

    picture = np.asarray(Image.open(shot).convert("RGB"))
    assert picture.shape[0] >= 800 and picture.shape[1] >= 1300
    for box in boxes:  # where the browser drew each thumbnail there is a radiograph, not a blank or broken image
        x, y, w, h = (int(box[k]) for k in ("x", "y", "width", "height"))
        region = picture[y : y + h, x : x + w]
        assert w > 50 and h > 50 and region.std() > 25 and region.mean() < 230
    for box in present:  # "opacity present" is drawn, in red, where the page put it
        x, y, w, h = (int(box[k]) for k in ("x", "y", "width", "height"))
        region = picture[y : y + h, x : x + w].astype(int)
        assert h > 0 and w > 0 and ((region[..., 0] - region[..., 1] > 80).sum() > 20)


def test_paging_and_state_filter(node, browser) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    _, base, _ = node
    first = json.loads(get(f"{base}/api/status?limit=2", TOKEN)[1])
    assert [j["id"] for j in first["jobs"]] == [3, 2] and first["paging"]["next_before"] == 2
    last = json.loads(get(f"{base}/api/status?limit=2&before=2", TOKEN)[1])
    assert [j["id"] for j in last["jobs"]] == [1] and last["paging"]["next_before"] is None
    skipped = json.loads(get(f"{base}/api/status?state=skipped", TOKEN)[1])
    assert [j["state"] for j in skipped["jobs"]] == ["skipped"]
    assert get(f"{base}/api/status?before=abc", TOKEN) == (
        400,
        b"before='abc': give a job id (a whole number, 1 or more)\n",
    )
    assert get(f"{base}/?state=finished", TOKEN)[0] == 400

    rows = lambda: [r.get_attribute("id") for r in browser.find_elements(By.CSS_SELECTOR, "#jobs tr[id]")]  # noqa: E731
    browser.get(f"{base}/?token={TOKEN}&limit=2")
    assert rows() == ["job-3", "job-2"]
    browser.find_element(By.ID, "older").click()
    assert rows() == ["job-1"] and not browser.find_elements(By.ID, "older")
    assert browser.find_element(By.ID, "shown").text == "Jobs (all states, older than job 2; newest first)"
    browser.find_element(By.ID, "newest").click()
    assert rows() == ["job-3", "job-2"]
    browser.find_element(By.LINK_TEXT, "skipped").click()  # the state filter in the totals
    assert len(rows()) == 1 and "skipped" in browser.find_element(By.ID, "jobs").text
    assert "done" not in browser.find_element(By.ID, "jobs").text
