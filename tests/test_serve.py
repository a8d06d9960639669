"""`ifnet serve`: the REST API in-process (FastAPI TestClient), with a tiny model trained for the session."""

from __future__ import annotations

import base64
import io
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ifnet.cli import main as cli_main
from ifnet.demo.phantom import make_study
from ifnet.errors import IFNetError
from ifnet.inference import Predictor
from ifnet.labels import OBSERVATIONS
from ifnet.serve import InferenceQueue, QueueFull, ServeLimits, create_app
from ifnet.serve.tiny_checkpoint import train_tiny_checkpoint

MODEL_STAGES = {"enhance", "preprocess", "backbone", "memory_encoder", "decode", "total"}
SERVER_STAGES = {"upload", "queue_wait", "image_decode", "request"}


# -- fixtures and helpers ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def serve_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of a tiny IFNet on phantoms (~20 s), shared with test_serve_browser.py through basetemp."""
    return train_tiny_checkpoint(tmp_path_factory.getbasetemp() / "serve-tiny-checkpoint")


@pytest.fixture(scope="module")
def predictor(serve_checkpoint: Path) -> Predictor:
    return Predictor(serve_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def client(predictor: Predictor):
    with TestClient(create_app(predictor)) as c:
        yield c


@pytest.fixture(scope="module")
def study_pngs(iu_synth_images: Path) -> tuple[bytes, bytes]:
    """A synthetic IU-Xray study from ../shared, read in place."""
    folder = sorted(p for p in iu_synth_images.iterdir() if p.is_dir())[0]
    return (folder / "0.png").read_bytes(), (folder / "1.png").read_bytes()


def encode(img: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def dicom_bytes(img: np.ndarray, photometric: str = "MONOCHROME2") -> bytes:
    """A minimal DX DICOM Part 10 file (16-bit, explicit VR little endian) in memory."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("upload.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = img.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = img.astype("<u2").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def phantom(size: int = 128, study: str = "SERVE0001") -> np.ndarray:
    return make_study(study, size=size).frontal


def post(client: TestClient, files: dict, data: dict | None = None, **params):
    return client.post("/v1/reports", files=files, data=data or {}, params=params)


def check_report(doc: dict) -> None:
    assert isinstance(doc["report"], str) and doc["report"].strip()
    assert list(doc["findings"]) == list(OBSERVATIONS)
    assert all(0.0 <= p <= 1.0 for p in doc["findings"].values())
    assert MODEL_STAGES | SERVER_STAGES <= set(doc["timings_ms"])
    said = doc["consistency"]
    held = {k for k, v in doc["condition"].items() if v >= 0.5} - {"No Finding"}
    assert set(said["unsaid"]) == held - set(said["said"]) and set(said["unsupported"]) == set(said["said"]) - held
    assert doc["model"]["extractor"] == "resnet18" and doc["model"]["iec"] == "clahe"


def multipart_body(fields: dict[str, tuple[str, bytes]], boundary: str = "ifnet-test-boundary") -> tuple[bytes, str]:
    body = bytearray()
    for name, (filename, data) in fields.items():
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
                 "Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return bytes(body), f"multipart/form-data; boundary={boundary}"


class HeldPredictor:
    """The real predictor, but each predict() waits for ``release``: holds a worker busy on demand."""

    def __init__(self, inner: Predictor) -> None:
        self.inner = inner
        self.release = threading.Event()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def predict(self, *args, **kwargs):
        assert self.release.wait(60), "test never released the held predictor"
        return self.inner.predict(*args, **kwargs)


# -- the server's own routes -----------------------------------------------------------------------

def test_healthz_reports_model_and_idle_queue(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["model"] == "run/best"
    assert body["queue"]["workers"] == 1 and body["queue"]["running"] == 0 and body["queue"]["waiting"] == 0
    assert r.headers["cache-control"] == "no-store" and r.headers["x-content-type-options"] == "nosniff"


def test_openapi_schema_documents_the_report_endpoint(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    op = schema["paths"]["/v1/reports"]["post"]
    form = op["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["frontal"]
    assert set(form["properties"]) == {"frontal", "lateral", "findings", "heatmap"}
    assert {"200", "400", "413", "415", "503"} <= set(op["responses"])
    assert [p["name"] for p in op["parameters"]] == ["include_images"]
    assert "/healthz" in schema["paths"] and "/v1/model" in schema["paths"]


def test_model_route_lists_observations_and_limits(client: TestClient) -> None:
    body = client.get("/v1/model").json()
    assert body["observations"] == list(OBSERVATIONS)
    assert body["limits"]["max_upload_bytes"] == ServeLimits().max_upload_bytes
    assert body["image_size"] == 64 and body["max_views"] == 2


def test_page_and_assets_are_served_self_contained(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN
    for asset, kind in (("app.js", "javascript"), ("style.css", "css")):
        r = client.get(f"/static/{asset}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
        assert "https://" not in r.text
    assert ".innerHTML" not in client.get("/static/app.js").text  # text goes through textContent
    missing = client.get("/static/../app.py")
    assert missing.status_code == 404 and "error" in missing.json()


def test_unknown_route_and_method_give_json_errors(client: TestClient) -> None:
    r = client.get("/v2/nothing")
    assert r.status_code == 404 and r.json() == {"error": "not found: /v2/nothing"}
    r = client.get("/v1/reports")
    assert r.status_code == 405 and "GET" in r.json()["error"]
    r = client.post("/v1/reports?include_images=maybe", files={"frontal": ("a.png", encode(phantom()))})
    assert r.status_code == 422 and r.json()["error"].startswith("include_images:")


# -- successful uploads ------------------------------------------------------------------------------

def test_png_upload_returns_report_findings_and_timings(client: TestClient, study_pngs) -> None:
    r = post(client, {"frontal": ("0.png", study_pngs[0], "image/png")})
    assert r.status_code == 200, r.text
    doc = r.json()
    check_report(doc)
    assert doc["conditioned_on"] == "predicted" and doc["heatmap_label"] is None
    assert doc["views"] == [{"field": "frontal", "filename": "0.png", "format": "png", "width": 256,
                             "height": 256, "dtype": "uint8"}]
    assert "images" not in doc  # the API stays lean unless asked


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_upload_is_recognised_by_content(client: TestClient, photometric: str) -> None:
    img16 = phantom(96).astype(np.uint16) * 257
    # Declared as a PNG with a .png name: the content decides, not the name or the content type.
    r = post(client, {"frontal": ("scan.png", dicom_bytes(img16, photometric), "image/png")})
    assert r.status_code == 200, r.text
    check_report(r.json())
    assert r.json()["views"][0] | {"filename": None} == {"field": "frontal", "filename": None, "format": "dicom",
                                                         "width": 96, "height": 96, "dtype": "uint16"}


def test_jpeg_upload(client: TestClient) -> None:
    r = post(client, {"frontal": ("chest.jpg", encode(phantom(), "JPEG"), "image/jpeg")})
    assert r.status_code == 200, r.text
    check_report(r.json())
    assert r.json()["views"][0]["format"] == "jpeg"


def test_two_views_with_heatmap_and_page_images(client: TestClient, study_pngs) -> None:
    r = post(client, {"frontal": ("0.png", study_pngs[0]), "lateral": ("1.png", study_pngs[1])},
             {"heatmap": "true"}, include_images="true")
    assert r.status_code == 200, r.text
    doc = r.json()
    check_report(doc)
    assert [v["field"] for v in doc["views"]] == ["frontal", "lateral"] and doc["warnings"] == []
    assert doc["heatmap_label"] in OBSERVATIONS[:-1]
    assert {"heatmap", "render_images"} <= set(doc["timings_ms"])
    images = doc["images"]
    for src in (images["frontal"]["original"], images["frontal"]["enhanced"], images["lateral"]["original"],
                images["lateral"]["enhanced"], images["heatmap"]):
        assert src.startswith("data:image/png;base64,")
        decoded = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert decoded.size == (256, 256)
    assert Image.open(io.BytesIO(base64.b64decode(images["heatmap"].split(",", 1)[1]))).mode == "RGB"
    original = np.asarray(Image.open(io.BytesIO(base64.b64decode(images["frontal"]["original"].split(",", 1)[1]))))
    assert np.array_equal(original, np.asarray(Image.open(io.BytesIO(study_pngs[0]))))


def test_page_images_are_downscaled(predictor: Predictor) -> None:
    with TestClient(create_app(predictor, ServeLimits(max_display_side=100))) as c:
        r = post(c, {"frontal": ("big.png", encode(phantom(300)))}, {"heatmap": "1"}, include_images="true")
    assert r.status_code == 200, r.text
    for src in (r.json()["images"]["frontal"]["enhanced"], r.json()["images"]["heatmap"]):
        assert Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).size == (100, 100)


def test_supplied_findings_condition_the_report(client: TestClient) -> None:
    r = post(client, {"frontal": ("a.png", encode(phantom()))}, {"findings": "cardiomegaly,  Pleural Effusion"})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["conditioned_on"] == "supplied"
    assert {k for k, v in doc["condition"].items() if v == 1.0} == {"Cardiomegaly", "Pleural Effusion"}
    empty = post(client, {"frontal": ("a.png", encode(phantom()))}, {"findings": " "})
    assert empty.status_code == 200 and empty.json()["conditioned_on"] == "predicted"


# -- refusals ---------------------------------------------------------------------------------------------

def test_corrupt_png_is_400_with_the_decoders_reason(client: TestClient) -> None:
    png = encode(phantom(128) + np.random.default_rng(0).integers(0, 20, (128, 128), dtype=np.uint8))
    r = post(client, {"frontal": ("broken.png", png[: len(png) // 2], "image/png")})
    assert r.status_code == 400
    message = r.json()["error"]
    assert message.startswith("frontal (broken.png): cannot decode PNG (corrupt or truncated)"), message
    r = post(client, {"frontal": ("a.png", encode(phantom())), "lateral": ("stub.png", png[:20])})
    assert r.status_code == 400 and r.json()["error"] == "lateral (stub.png): truncated PNG header"


def test_corrupt_dicom_is_400(client: TestClient) -> None:
    data = dicom_bytes(phantom(64).astype(np.uint16))
    r = post(client, {"frontal": ("x.dcm", data[:300])})
    assert r.status_code == 400 and r.json()["error"].startswith("frontal (x.dcm):"), r.text


@pytest.mark.parametrize("content, looks_like", [
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "a PDF document"),
    (b"patient report\nno image here\n", "text"),
    (b"GIF89a\x01\x00\x01\x00", "a GIF image"),
])
def test_non_image_upload_is_415(client: TestClient, content: bytes, looks_like: str) -> None:
    # Declared as image/png: the type comes from the bytes.
    r = post(client, {"frontal": ("scan.png", content, "image/png")})
    assert r.status_code == 415
    assert r.json() == {"error": f"frontal (scan.png): not a PNG, JPEG or DICOM image (it looks like {looks_like})"}


def test_non_multipart_request_is_415(client: TestClient) -> None:
    r = client.post("/v1/reports", json={"frontal": "aGVsbG8="})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]


@pytest.mark.parametrize("files, data, message", [
    ({"lateral": ("l.png", b"x")}, {}, "missing the frontal image"),
    ({"frontal": ("f.png", b"")}, {}, "frontal (f.png): empty file"),
    ({"frontal": ("f.png", b"x"), "photo": ("p.png", b"x")}, {}, "unexpected form field 'photo'"),
    ({"frontal": ("f.png", b"\x89PNG\r\n\x1a\n")}, {"heatmap": "maybe"}, "heatmap: expected true or false"),
    ({"frontal": ("f.png", b"\x89PNG\r\n\x1a\n")}, {"findings": "Cardiomegaly, Broken Heart"},
     "findings: unknown observation 'Broken Heart'; choose from: Enlarged Cardiomediastinum"),
])
def test_bad_fields_are_400(client: TestClient, files: dict, data: dict, message: str) -> None:
    r = post(client, files, data)
    assert r.status_code == 400 and message in r.json()["error"], r.text


def test_file_name_is_cleaned_before_it_reaches_a_message(client: TestClient) -> None:
    r = post(client, {"frontal": ("../../etc/\x1b[31mevil.txt", b"hello")})
    assert r.status_code == 415 and r.json()["error"].startswith("frontal ([31mevil.txt):")


def test_upload_over_the_limit_is_413_before_it_is_read(predictor: Predictor) -> None:
    limits = ServeLimits(max_upload_bytes=50_000)
    big = np.random.default_rng(1).integers(0, 256, (300, 300), dtype=np.uint8)
    with TestClient(create_app(predictor, limits)) as c:
        r = post(c, {"frontal": ("big.png", encode(big))})  # ~90 KB, with Content-Length
        assert r.status_code == 413
        assert r.json()["error"].startswith("upload larger than the server's limit of 0.0477 MB")
        # Chunked: no Content-Length, so the cap is enforced while streaming.
        body, content_type = multipart_body({"frontal": ("big.png", encode(big))})
        chunks = (body[i:i + 8192] for i in range(0, len(body), 8192))
        r = c.post("/v1/reports", content=chunks, headers={"content-type": content_type})
        assert "content-length" not in {k.lower() for k in r.request.headers}
        assert r.status_code == 413
        # The same image below the limit goes through.
        small = encode(phantom(96))
        assert post(c, {"frontal": ("small.png", small)}).status_code == 200
        assert c.get("/healthz").json()["queue"]["completed"] == 1


def test_an_upload_that_trickles_in_is_cut_off_with_408() -> None:
    import asyncio

    from ifnet.serve.upload import UploadError, read_multipart

    async def trickle():
        yield b"--b\r\nContent-Disposition: form-data; name=\"frontal\"; filename=\"x.png\"\r\n\r\n"
        while True:  # a client sending a byte now and then, forever
            await asyncio.sleep(0.05)
            yield b"x"

    with pytest.raises(UploadError) as info:
        asyncio.run(read_multipart(trickle(), b"b", 1 << 20, timeout_s=0.3))
    assert info.value.status == 408 and "did not arrive within 0.3 s" in str(info.value)
    with pytest.raises(ValueError, match="upload_timeout_s must be positive"):
        ServeLimits(upload_timeout_s=0)


def test_queue_full_is_503_with_retry_after_and_recovers(predictor: Predictor) -> None:
    held = HeldPredictor(predictor)
    png = encode(phantom(96))
    with TestClient(create_app(held, ServeLimits(workers=1, queue_size=1))) as c, ThreadPoolExecutor(2) as pool:
        running = pool.submit(post, c, {"frontal": ("a.png", png)})
        _wait_for_queue(c, running=1, waiting=0)
        waiting = pool.submit(post, c, {"frontal": ("b.png", png)})
        _wait_for_queue(c, running=1, waiting=1)
        refused = post(c, {"frontal": ("c.png", png)})
        assert refused.status_code == 503
        assert "queue is full" in refused.json()["error"]
        assert int(refused.headers["retry-after"]) >= 1
        held.release.set()
        assert running.result(timeout=60).status_code == 200
        assert waiting.result(timeout=60).status_code == 200
        stats = c.get("/healthz").json()["queue"]
        assert stats["completed"] == 2 and stats["rejected"] == 1 and stats["running"] == stats["waiting"] == 0
        assert post(c, {"frontal": ("d.png", png)}).status_code == 200  # slots were given back


def test_concurrent_workers_give_the_same_answers_as_one(predictor: Predictor) -> None:
    """Two workers share one model: results match a one-at-a-time run exactly."""
    pngs = [encode(phantom(96, f"SERVE{i:04d}")) for i in range(3)]
    with TestClient(create_app(predictor)) as c:
        expected = [post(c, {"frontal": ("x.png", png)}).json() for png in pngs]
    with TestClient(create_app(predictor, ServeLimits(workers=2, queue_size=8))) as c, ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda png: post(c, {"frontal": ("x.png", png)}).json(), pngs * 2))
    for i, doc in enumerate(got):
        want = expected[i % len(pngs)]
        assert (doc["report"], doc["findings"]) == (want["report"], want["findings"])


def _wait_for_queue(c: TestClient, *, running: int, waiting: int, timeout: float = 30.0) -> None:
    """Poll /healthz: it answers while the worker is held, because inference is off the event loop."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = c.get("/healthz").json()["queue"]
        if queue["running"] == running and queue["waiting"] == waiting:
            return
        time.sleep(0.02)
    raise AssertionError(f"queue never reached running={running} waiting={waiting}: {queue}")


def test_unexpected_host_header_is_refused(predictor: Predictor) -> None:
    with TestClient(create_app(predictor, allowed_hosts=("127.0.0.1", "localhost", "::1")),
                    base_url="http://127.0.0.1:8000") as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/healthz", headers={"host": "[::1]:8000"}).status_code == 200
        r = c.get("/healthz", headers={"host": "attacker.example:8000"})
        assert r.status_code == 400 and "not allowed" in r.json()["error"]


# -- model loading, disk use -----------------------------------------------------------------------------

def test_model_is_loaded_once(serve_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loads = []
    original_init = Predictor.__init__

    def counting_init(self, *args, **kwargs):
        loads.append(args)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(Predictor, "__init__", counting_init)
    app = create_app(serve_checkpoint, device="cpu")
    assert len(loads) == 1  # at start-up, before any request
    with TestClient(app) as c:
        for _ in range(3):
            assert post(c, {"frontal": ("a.png", encode(phantom(64)))}).status_code == 200
        assert c.get("/healthz").status_code == 200
    assert len(loads) == 1


def test_nothing_is_written_to_disk(predictor: Predictor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 3 MB upload (above the 1 MB at which frameworks spool to a temporary file) leaves no file behind."""
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir(), tmp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    noise = np.random.default_rng(2).integers(0, 256, (1800, 1800), dtype=np.uint8)
    big = encode(noise)
    assert len(big) > 3_000_000
    with TestClient(create_app(predictor)) as c:
        r = post(c, {"frontal": ("big.png", big), "lateral": ("small.png", encode(phantom()))},
                 {"heatmap": "true"}, include_images="true")
        assert r.status_code == 200, r.text
        assert post(c, {"frontal": ("bad.png", big[:-5000])}).status_code == 400
    assert list(cwd.iterdir()) == [] and list(tmp.iterdir()) == []


# -- the limiter on its own --------------------------------------------------------------------------------

def test_inference_queue_admits_workers_plus_queue_and_frees_cancelled_slots() -> None:
    queue = InferenceQueue(workers=1, queue_size=2)
    gate = threading.Event()
    try:
        first = queue.submit(lambda: gate.wait(10))
        second, third = queue.submit(lambda: 2), queue.submit(lambda: 3)
        with pytest.raises(QueueFull) as busy:
            queue.submit(lambda: 4)
        assert busy.value.retry_after_s >= 1
        assert third.cancel()  # still waiting: cancelling frees its slot at once
        fourth = queue.submit(lambda: 4)
        gate.set()
        assert (first.result(10), second.result(10), fourth.result(10)) == (True, 2, 4)
        stats = queue.stats()
        assert stats == {"workers": 1, "queue_size": 2, "running": 0, "waiting": 0, "completed": 3, "rejected": 1}
    finally:
        gate.set()
        queue.shutdown()


@pytest.mark.parametrize("kwargs", [{"workers": 0}, {"queue_size": -1}, {"max_upload_bytes": 10}])
def test_limits_are_validated(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ServeLimits(**kwargs)


# -- the command line ----------------------------------------------------------------------------------------

def test_cli_reports_a_busy_port_before_loading_the_model(tmp_path: Path, capsys) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code = cli_main(["serve", "--checkpoint", str(tmp_path / "no-such-checkpoint"), "--port", str(port)])
    assert code == 1
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "another server on that port?" in err


def test_an_address_not_of_this_machine_gets_the_host_hint_not_the_port_one() -> None:
    from ifnet.errors import IFNetError
    from ifnet.serve.server import bind

    with pytest.raises(IFNetError, match=r"cannot listen on 192\.0\.2\.1:0: .*is --host an address of this machine"):
        bind("192.0.2.1", 0)  # TEST-NET-1 (RFC 5737): never assigned to a machine


@pytest.mark.parametrize("flags, message", [
    (["--port", "70000"], "--port must be 0..65535"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--max-upload-mb", "0"], "--max-upload-mb must be positive"),
])
def test_cli_rejects_bad_options(tmp_path: Path, capsys, flags: list, message: str) -> None:
    assert cli_main(["serve", "--checkpoint", str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err


def test_cli_warns_when_listening_beyond_loopback(tmp_path: Path, capsys) -> None:
    # A missing checkpoint stops it after the warning and the bind, before any serving.
    code = cli_main(["serve", "--checkpoint", str(tmp_path / "missing"), "--host", "0.0.0.0", "--port", "0"])
    err = capsys.readouterr().err
    assert "warning: listening on 0.0.0.0" in err and "no authentication" in err
    assert code != 0


# -- serving an ONNX export ------------------------------------------------------------------------------

def test_onnx_export_folder_is_served_with_onnx_runtime(serve_checkpoint: Path, tmp_path: Path, study_pngs,
                                                        client: TestClient) -> None:
    """`ifnet serve --checkpoint EXPORT`: the same API, answered by ONNX Runtime (the export's int8 variant)."""
    from ifnet.data.images import read_xray_bytes
    from ifnet.export.onnx_export import export_checkpoint
    from ifnet.export.runtime import OnnxPredictor
    from ifnet.inference import open_predictor

    folder = tmp_path / "onnx"
    export_checkpoint(serve_checkpoint, folder, int8=True)
    assert client.get("/v1/model").json()["runtime"] == "pytorch"
    with TestClient(create_app(folder)) as onnx_client:
        info = onnx_client.get("/v1/model").json()
        assert info["runtime"] == "onnxruntime-int8" and info["device"] == "cpu"
        assert info["image_size"] == 64 and info["max_views"] == 2 and info["checkpoint"].endswith("/onnx")
        r = post(onnx_client, {"frontal": ("0.png", study_pngs[0], "image/png"),
                               "lateral": ("1.png", study_pngs[1], "image/png")})
        assert r.status_code == 200, r.text
        doc = r.json()
        check_report(doc)
    views = [read_xray_bytes(b, name) for b, name in ((study_pngs[0], "0.png"), (study_pngs[1], "1.png"))]
    assert doc["report"] == OnnxPredictor(folder).predict(views).report
    with pytest.raises(IFNetError, match="runs on the CPU"):
        open_predictor(folder, device="cuda")


def test_a_tiny_or_strip_shaped_image_is_answered_with_a_warning(client: TestClient) -> None:
    for shape, message in (((1, 1), "frontal (dot.png) is 1x1 px, far below the model's"),
                           ((10, 400), "frontal (dot.png) is 400x10 px; chest radiographs are close to square")):
        img = np.full(shape, 128, np.uint8)
        r = post(client, {"frontal": ("dot.png", encode(img, "PNG"), "image/png")})
        assert r.status_code == 200, r.text
        assert any(message in w for w in r.json()["warnings"]), r.json()["warnings"]
