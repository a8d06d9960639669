"""`ifnet serve` end to end: the real server in a subprocess, driven in headless Chromium by Playwright.

Needs Debian's ``chromium`` package (``/usr/bin/chromium``, or ``IFNET_CHROMIUM``) and the Python
``playwright`` package (``make setup`` installs both). A missing browser fails these tests; it does not
skip them. Playwright's own browser download is never used.

Environment knobs, for refreshing the documentation:
``IFNET_SCREENSHOT=docs/serve-screenshot.png`` also writes the page's screenshot there;
``IFNET_SERVE_CHECKPOINT=runs/x/best`` serves that checkpoint instead of the tiny one trained here.
"""

from __future__ import annotations

import base64
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from ifnet.labels import OBSERVATIONS
from ifnet.serve.tiny_checkpoint import train_tiny_checkpoint

CHROMIUM = Path(os.environ.get("IFNET_CHROMIUM", "/usr/bin/chromium"))
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SERVER_START_TIMEOUT_S = 120
REPORT_TIMEOUT_MS = 90_000


@pytest.fixture(scope="session")
def serve_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint test_serve.py trains (shared through basetemp), or IFNET_SERVE_CHECKPOINT."""
    given = os.environ.get("IFNET_SERVE_CHECKPOINT")
    if given:
        return Path(given)
    return train_tiny_checkpoint(tmp_path_factory.getbasetemp() / "serve-tiny-checkpoint")


@pytest.fixture(scope="module")
def server_url(serve_checkpoint: Path) -> Iterator[str]:
    """``ifnet serve --port 0`` in a subprocess; the URL is read from what it prints."""
    cmd = [sys.executable, "-m", "ifnet", "serve", "--checkpoint", str(serve_checkpoint), "--port", "0",
           "--device", "cpu", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: "queue.Queue[str]" = queue.Queue()
    output: list[str] = []

    def pump() -> None:  # keeps draining the pipe so the server never blocks on a full one
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    url = None
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    try:
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if "open http://" in line:
                url = line.split("open ", 1)[1].split()[0]
        assert url is not None, "ifnet serve did not start:\n" + "".join(output)
        assert url.startswith("http://127.0.0.1:")  # loopback by default
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM.is_file(), (f"Chromium not found at {CHROMIUM}: install Debian's package "
                                "(`apt-get install chromium`; `make setup` does it) or set IFNET_CHROMIUM")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser, server_url: str):
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    pg = context.new_page()
    problems: list[str] = []  # console errors include Content-Security-Policy violations
    pg.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
    pg.on("pageerror", lambda exc: problems.append(str(exc)))
    pg.goto(server_url)
    pg.wait_for_selector("#model-info .chip")
    pg.problems = problems
    yield pg
    context.close()


@pytest.fixture(scope="module")
def study(iu_synth_images: Path) -> tuple[Path, Path]:
    """A synthetic IU-Xray study from ../shared, read in place."""
    folder = sorted(p for p in iu_synth_images.iterdir() if p.is_dir())[0]
    return folder / "0.png", folder / "1.png"


def test_upload_shows_report_findings_and_images(page, study, tmp_path: Path) -> None:
    assert page.is_disabled("#generate")  # nothing to send yet
    page.set_input_files("#frontal-input", str(study[0]))
    assert "0.png" in page.inner_text("#frontal-name")
    page.click("#generate")
    page.wait_for_selector("#report-text", state="visible", timeout=REPORT_TIMEOUT_MS)

    assert page.inner_text("#report-text").strip()
    names = page.eval_on_selector_all("#findings-list li", "rows => rows.map(r => r.dataset.name)")
    assert sorted(names) == sorted(OBSERVATIONS)
    probabilities = page.eval_on_selector_all("#findings-list li", "rows => rows.map(r => +r.dataset.probability)")
    assert probabilities == sorted(probabilities, reverse=True)
    # Original and enhanced side by side, and the heatmap: all decoded by the browser.
    widths = page.eval_on_selector_all("#image-rows img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
    assert len(widths) == 3 and all(w == 256 for w in widths)
    assert page.is_visible("img.enhanced-image")
    assert "Heatmap" in page.inner_text("#image-rows")
    assert page.is_hidden("#error")
    assert page.problems == []

    shot = tmp_path / "serve-screenshot.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("IFNET_SCREENSHOT"):
        page.screenshot(path=os.environ["IFNET_SCREENSHOT"], full_page=True)
    # the results belong to their image: a new file, or a request that fails, takes them off the page
    page.set_input_files("#frontal-input", {"name": "bad.png", "mimeType": "image/png", "buffer": b"not an x-ray"})
    assert page.is_hidden("#output")
    page.click("#generate")
    page.wait_for_selector("#error", state="visible", timeout=REPORT_TIMEOUT_MS)
    assert page.is_hidden("#output") and page.is_visible("#placeholder")


def test_drop_two_files_on_the_frontal_box(page, study) -> None:
    """Drag and drop: two files dropped on the frontal box become frontal and lateral."""
    payload = [{"name": p.name, "data": base64.b64encode(p.read_bytes()).decode()} for p in study]
    page.evaluate("""files => {
        const dt = new DataTransfer();
        for (const f of files) {
            const bytes = Uint8Array.from(atob(f.data), c => c.charCodeAt(0));
            dt.items.add(new File([bytes], f.name, {type: "image/png"}));
        }
        document.getElementById("drop-frontal").dispatchEvent(
            new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""", payload)
    assert "0.png" in page.inner_text("#frontal-name") and "1.png" in page.inner_text("#lateral-name")
    page.uncheck("#heatmap-input")
    page.fill("#findings-input", "Cardiomegaly")
    page.click("#generate")
    page.wait_for_selector("#report-text", state="visible", timeout=REPORT_TIMEOUT_MS)
    assert page.locator(".image-row").count() == 2  # frontal and lateral, each original + enhanced
    assert page.locator("#image-rows img").count() == 4
    assert "supplied findings: Cardiomegaly" in page.inner_text("#conditioned")
    # the page says whether the report leaves the supplied finding unsaid (or asserts others)
    from ifnet.inference import parse_findings
    from ifnet.metrics.consistency import check_reports

    (said,), _ = check_reports(parse_findings("Cardiomegaly")[None], [page.inner_text("#report-text")])
    expected = []
    if said.unsaid:
        expected.append("in the condition but not said by the report: " + ", ".join(said.unsaid))
    if said.unsupported:
        expected.append("said by the report but not in the condition: " + ", ".join(said.unsupported))
    shown = page.eval_on_selector_all("#consistency li", "rows => rows.map(r => r.textContent)")
    assert shown == expected
    assert page.problems == []


def test_server_errors_are_shown_as_text(page) -> None:
    """A non-image upload: the 415 message appears, and the hostile file name stays text."""
    name = "<img src=x onerror=window.pwned=1>.png"
    page.set_input_files("#frontal-input", {"name": name, "mimeType": "image/png", "buffer": b"not an x-ray"})
    page.click("#generate")
    page.wait_for_selector("#error", state="visible", timeout=REPORT_TIMEOUT_MS)
    message = page.inner_text("#error")
    assert "not a PNG, JPEG or DICOM image" in message and name in message
    assert page.locator("#error img").count() == 0
    assert page.evaluate("window.pwned === undefined")
    assert page.is_hidden("#output")
    assert page.is_enabled("#generate")  # ready for another try
