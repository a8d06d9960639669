"""The ``ifnet serve`` web application: REST API, OpenAPI schema and the upload page.

Routes:

* ``POST /v1/reports`` -- multipart/form-data with ``frontal`` (required) and ``lateral`` (optional)
  images (PNG, JPEG or DICOM, recognised by content), optional ``findings`` (comma-separated
  observation names to condition on instead of the model's predictions) and ``heatmap`` (true/false).
  ``?include_images=true`` adds the original, enhanced and heatmap images as PNG data URLs.
* ``GET /v1/model`` -- what is loaded and the server's limits; ``GET /healthz`` -- liveness and queue.
* ``GET /openapi.json`` -- the schema; ``GET /`` -- the page (``static/``).

Every error is JSON ``{"error": "..."}``: 400 bad field or corrupt image (with the decoder's reason),
408 upload too slow, 413 too large, 415 not an image, 503 busy (with ``Retry-After``). The model is loaded once, before
the app exists; inference runs in :class:`~ifnet.serve.limits.InferenceQueue` workers, so the event
loop keeps answering (and refusing) while a report is being generated. Uploads are parsed in memory
(:mod:`ifnet.serve.upload`); nothing is written to disk.
"""

from __future__ import annotations

import logging
import time
import unicodedata
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ifnet import __version__
from ifnet.data.images import ImageError, read_xray_bytes
from ifnet.labels import OBSERVATIONS
from ifnet.serve.display import heatmap_image, view_images
from ifnet.serve.limits import InferenceQueue, QueueFull, ServeLimits, describe_unsupported, sniff_format
from ifnet.serve.schemas import ERROR_RESPONSES, REPORT_FORM, Health, ModelResponse, ReportResponse
from ifnet.serve.upload import Part, UploadError, check_declared_length, multipart_boundary, read_multipart

log = logging.getLogger("ifnet.serve")

IMAGE_FIELDS = ("frontal", "lateral")
TEXT_FIELDS = ("findings", "heatmap")
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off", ""}

# The page loads nothing from elsewhere; images arrive as data: URLs.
_PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
             "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8",
           "favicon.svg": "image/svg+xml"}


# -- request handling -----------------------------------------------------------------------------

class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: Optional[dict[str, str]] = None) -> None:
        self.status, self.headers = status, headers
        super().__init__(message)


@dataclass
class Upload:
    field: str
    filename: Optional[str]
    label: str  # how error messages name it: "frontal (chest.png)"
    format: str
    data: bytes


@dataclass
class Study:
    uploads: list[Upload]
    findings: Optional[np.ndarray]
    heatmap: bool
    include_images: bool


def _clean_filename(name: Optional[str]) -> Optional[str]:
    """The client's file name without path or control characters, at most 100 characters."""
    if name is None:
        return None
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C")
    return name[:100] or None


def _parse_bool(field: str, text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ApiError(400, f"{field}: expected true or false, got {text[:40]!r}")


def _parse_findings(text: str) -> Optional[np.ndarray]:
    """Comma-separated observation names -> [14] vector; empty text means "not supplied"."""
    from ifnet.inference import parse_findings

    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        return None
    known = {name.lower() for name in OBSERVATIONS}
    unknown = [n for n in names if n.lower() not in known]
    if unknown:
        raise ApiError(400, f"findings: unknown observation {unknown[0][:60]!r}; choose from: "
                            + ", ".join(OBSERVATIONS))
    return parse_findings(text)


def _study_from_parts(parts: list[Part], include_images: bool) -> Study:
    by_name: dict[str, Part] = {}
    for part in parts:
        if part.name not in IMAGE_FIELDS + TEXT_FIELDS:
            raise ApiError(400, f"unexpected form field {part.name[:40]!r}; expected "
                                + ", ".join(IMAGE_FIELDS + TEXT_FIELDS))
        if part.name in by_name:
            raise ApiError(400, f"form field {part.name!r} sent more than once")
        by_name[part.name] = part
    if "frontal" not in by_name:
        raise ApiError(400, "missing the frontal image: send it as the multipart file field 'frontal'")
    uploads = []
    for field in IMAGE_FIELDS:
        part = by_name.get(field)
        if part is None:
            continue
        filename = _clean_filename(part.filename)
        label = f"{field} ({filename})" if filename else field
        data = bytes(part.data)
        if not data:
            raise ApiError(400, f"{label}: empty file")
        fmt = sniff_format(data[:132])
        if fmt is None:
            raise ApiError(415, f"{label}: not a PNG, JPEG or DICOM image (it looks like "
                                f"{describe_unsupported(data[:512])})")
        uploads.append(Upload(field, filename, label, fmt, data))
    try:
        text = {name: bytes(by_name[name].data).decode("utf-8") for name in TEXT_FIELDS if name in by_name}
    except UnicodeDecodeError:
        raise ApiError(400, "findings and heatmap must be UTF-8 text") from None
    findings = _parse_findings(text["findings"]) if "findings" in text else None
    heatmap = _parse_bool("heatmap", text["heatmap"]) if "heatmap" in text else False
    return Study(uploads, findings, heatmap, include_images)


def _model_info(predictor: Any) -> dict:
    ckpt = Path(predictor.checkpoint)
    return {"checkpoint": "/".join(ckpt.parts[-2:]), **predictor.describe(), "version": __version__}


def _run_study(predictor: Any, study: Study, limits: ServeLimits, submitted: float) -> dict:
    """Decode, predict, and render the page's images: the work done in an inference worker."""
    started = time.perf_counter()
    views = [read_xray_bytes(u.data, u.label) for u in study.uploads]  # ImageError -> 400
    decoded = time.perf_counter()
    pred = predictor.predict(views, findings=study.findings, heatmap=study.heatmap)
    out = pred.to_json()
    out["views"] = [{"field": u.field, "filename": u.filename, "format": u.format, "width": int(v.shape[1]),
                     "height": int(v.shape[0]), "dtype": str(v.dtype)} for u, v in zip(study.uploads, views)]
    from ifnet.inference import study_warnings

    out["warnings"] = study_warnings([u.label for u in study.uploads], views, predictor)
    timings = {"queue_wait": (started - submitted) * 1000, "image_decode": (decoded - started) * 1000}
    if study.include_images:
        t0 = time.perf_counter()
        images: dict[str, Any] = {}
        for upload, view in zip(study.uploads, views):
            images[upload.field] = view_images(view, predictor.transform.enhance(view), limits.max_display_side)
        if pred.heatmap is not None:
            images["heatmap"] = heatmap_image(views[0], pred.heatmap, limits.max_display_side)
        out["images"] = images
        timings["render_images"] = (time.perf_counter() - t0) * 1000
    out["server_timings"] = timings
    return out


def warm_up(predictor: Any, limits: ServeLimits = ServeLimits()) -> None:
    """One throw-away report at start-up, so that the first user does not pay for lazy initialisation
    (CLAHE set-up, matplotlib's colour maps, the allocator's first large blocks)."""
    from ifnet.serve.display import gray_png

    ramp = np.tile(np.linspace(0, 255, 256, dtype=np.uint8), (256, 1))
    study = Study([Upload("frontal", None, "warm-up image", "png", gray_png(ramp))], None, True, True)
    _run_study(predictor, study, limits, time.perf_counter())


def _error(status: int, message: str, headers: Optional[dict[str, str]] = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _host_name(host_header: str) -> str:
    """``example.org:8000`` -> ``example.org``; ``[::1]:8000`` -> ``::1``."""
    if host_header.startswith("["):
        return host_header[1:].split("]", 1)[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


class _Guard:
    """ASGI middleware: refuse unexpected Host headers (DNS rebinding against a loopback server) and add
    headers to every response: no MIME sniffing, no referrer, no caching of patient data."""

    _HEADERS = ((b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                (b"cache-control", b"no-store"))

    def __init__(self, app: Any, allowed_hosts: Optional[Sequence[str]] = None) -> None:
        self.app = app
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.allowed_hosts is not None:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if _host_name(host).lower() not in self.allowed_hosts:
                response = _error(400, f"Host header {host[:80]!r} not allowed: this server answers only "
                                       f"to {', '.join(sorted(self.allowed_hosts))}")
                await response(scope, receive, send)
                return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in self._HEADERS if k not in names]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _read_static(name: str) -> bytes:
    return (resources.files("ifnet.serve") / "static" / name).read_bytes()


# -- the app ----------------------------------------------------------------------------------------

def create_app(predictor: Union[Any, str, Path], limits: ServeLimits = ServeLimits(), *,
               device: str = "auto", allowed_hosts: Optional[Sequence[str]] = None) -> FastAPI:
    """The ASGI app for a :class:`~ifnet.inference.Predictor` or an ONNX Runtime
    :class:`~ifnet.export.runtime.OnnxPredictor` (or a checkpoint or export folder, loaded here, once).

    ``allowed_hosts``: Host header values to accept (e.g. the loopback names, against DNS rebinding
    when the server listens on 127.0.0.1); None accepts any.
    """
    if isinstance(predictor, (str, Path)):
        from ifnet.inference import open_predictor

        predictor = open_predictor(predictor, device=device)
    queue = InferenceQueue(limits.workers, limits.queue_size)
    info = _model_info(predictor)
    page = {name: _read_static(name) for name in ("index.html", *_STATIC)}

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        queue.shutdown()

    app = FastAPI(
        title="IFNet report generation",
        version=__version__,
        description="Chest X-ray radiology report generation with IFNet. Research software, not a medical device.",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI and ReDoc load their scripts from a CDN; the schema is at /openapi.json
        redoc_url=None,
    )
    app.state.predictor = predictor
    app.state.queue = queue
    app.state.limits = limits

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, str(exc), exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"not found: {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "query")
        return _error(422, f"{where}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error while handling a request", exc_info=exc)
        return _error(500, f"internal server error ({type(exc).__name__}); see the server log")

    @app.get("/healthz", response_model=Health, tags=["server"])
    async def healthz() -> dict:
        """Liveness: the model is loaded (it is loaded before the server starts) and the queue's state."""
        return {"status": "ok", "model": info["checkpoint"], "queue": queue.stats()}

    @app.get("/v1/model", response_model=ModelResponse, tags=["reports"])
    async def model() -> dict:
        """The loaded checkpoint, the observation names ``findings`` accepts and the upload limits."""
        return {**info, "observations": list(OBSERVATIONS),
                "limits": {"max_upload_bytes": limits.max_upload_bytes, "workers": limits.workers,
                           "queue_size": limits.queue_size}}

    @app.post("/v1/reports", tags=["reports"], openapi_extra={"requestBody": REPORT_FORM},
              responses={200: {"model": ReportResponse}, **ERROR_RESPONSES})
    async def create_report(
        request: Request,
        include_images: bool = Query(False, description="add the original, enhanced and heatmap images "
                                                        "(PNG data URLs, downscaled) for display"),
    ) -> JSONResponse:
        """Generate the report for one study: a frontal image and optionally a lateral one."""
        t_request = time.perf_counter()
        queue.refuse_if_full()  # before reading a large body we could not process anyway
        try:
            boundary = multipart_boundary(request.headers.get("content-type"))
            check_declared_length(request.headers.get("content-length"), limits.max_upload_bytes)
            parts = await read_multipart(request.stream(), boundary, limits.max_upload_bytes,
                                         timeout_s=limits.upload_timeout_s)
        except UploadError as e:
            raise ApiError(e.status, str(e)) from None
        study = _study_from_parts(parts, include_images)
        del parts
        t_read = time.perf_counter()
        try:
            out = await queue.run(lambda: _run_study(predictor, study, limits, t_read))
        except ImageError as e:
            raise ApiError(400, str(e)) from None
        server = out.pop("server_timings")
        server["upload"] = (t_read - t_request) * 1000
        server["request"] = (time.perf_counter() - t_request) * 1000
        out["timings_ms"].update({k: round(v, 2) for k, v in server.items()})
        out["model"] = info
        return JSONResponse(out)

    @app.exception_handler(QueueFull)
    async def _busy(_request: Request, exc: QueueFull) -> JSONResponse:
        return _error(503, str(exc), {"Retry-After": str(exc.retry_after_s)})

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return Response(page["index.html"], media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": _PAGE_CSP})

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in _STATIC:
            raise StarletteHTTPException(404)
        return Response(page[name], media_type=_STATIC[name])

    app.add_middleware(_Guard, allowed_hosts=allowed_hosts)
    return app
