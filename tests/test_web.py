"""Metrics, health and the status page of a running node; the page is checked in a real headless Chromium."""

from __future__ import annotations

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
    images = [synthetic_file(folder, f"w{i}", seed=7100 + i, size=(300, 280), positive=True) for i in range(2)]
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
    yield node, base
    node.kill()


def test_health_and_readiness(node) -> None:  # type: ignore[no-untyped-def]
    _, base = node
    assert get(f"{base}/healthz") == (200, b"ok\n")
    code, body = get(f"{base}/readyz")
    assert code == 200 and json.loads(body) == {"ready": True, "problems": []}


def test_metrics(node) -> None:  # type: ignore[no-untyped-def]
    _, base = node
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


def test_status_page_in_a_real_browser(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("chromium / chromedriver not installed (make test installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    _, base = node
    assert get(f"{base}/")[0] == 401
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
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    try:
        browser.get(f"{base}/?token={TOKEN}")
        assert "cxrnode" in browser.title
        assert browser.find_element(By.ID, "ready").text.startswith("ready")
        jobs = browser.find_element(By.ID, "jobs").text
        assert jobs.count("done") == 2 and "skipped" in jobs and "View Position LL" in jobs
        assert "PACS" in browser.find_element(By.ID, "peers").text
        thumbnails = browser.find_elements(By.CSS_SELECTOR, "#jobs img")
        assert len(thumbnails) == 2
        assert all(
            browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", t) > 0
            for t in thumbnails
        )  # the overlay pictures loaded
        boxes = [t.rect for t in thumbnails]
        shot = Path(os.environ.get("CXRNODE_SCREENSHOT", tmp_path / "status.png"))
        browser.save_screenshot(str(shot))
    finally:
        browser.quit()
    picture = np.asarray(Image.open(shot).convert("RGB"))
    assert picture.shape[0] >= 800 and picture.shape[1] >= 1300
    for box in boxes:  # where the browser drew each thumbnail there is a radiograph, not a blank or broken image
        x, y, w, h = (int(box[k]) for k in ("x", "y", "width", "height"))
        region = picture[y : y + h, x : x + w]
        assert w > 50 and h > 50 and region.std() > 25 and region.mean() < 230
