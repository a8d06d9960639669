"""What the server accepts and how much work it takes on at once.

:class:`InferenceQueue` is the concurrency limit: ``workers`` threads run inference and at most
``queue_size`` more requests wait for one; a request beyond that is refused at once (HTTP 503 with
``Retry-After``) instead of piling up memory and latency. Admission is counted from the moment a job
is handed over until it finishes, so a request whose client hung up keeps its slot until the worker
that is running it is done, and a request cancelled while still waiting frees its slot right away.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

T = TypeVar("T")

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_DICOM_PREFIX_OFFSET = 128  # DICOM Part 10: a 128-byte preamble, then b"DICM"

# Formats people upload by mistake, named so that the 415 message says what was sent.
_OTHER_FORMATS: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "a PDF document"),
    (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"PK\x03\x04", "a ZIP archive (a DOCX, XLSX or zipped folder?)"),
    (b"\x1f\x8b", "a gzip archive"),
)


@dataclass(frozen=True)
class ServeLimits:
    max_upload_bytes: int = 64 * 1024 * 1024  # whole request body: both images and the form fields
    workers: int = 1  # inference threads sharing the one loaded model
    queue_size: int = 8  # requests allowed to wait for a worker; beyond that: 503
    max_display_side: int = 768  # long side of the PNGs returned for the page (include_images)
    upload_timeout_s: float = 120.0  # the whole body must arrive within this (408 otherwise): 64 MB at ~0.5 MB/s

    def __post_init__(self) -> None:
        if self.max_upload_bytes < 1024:
            raise ValueError(f"max_upload_bytes must be at least 1024, got {self.max_upload_bytes}")
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.queue_size < 0:
            raise ValueError(f"queue_size must be 0 or more, got {self.queue_size}")
        if self.max_display_side < 64:
            raise ValueError(f"max_display_side must be at least 64, got {self.max_display_side}")
        if not self.upload_timeout_s > 0:
            raise ValueError(f"upload_timeout_s must be positive, got {self.upload_timeout_s}")


def sniff_format(head: bytes) -> Optional[str]:
    """'png', 'jpeg' or 'dicom' from the first bytes (the checks ``read_xray_bytes`` makes); else None."""
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    if head[_DICOM_PREFIX_OFFSET:_DICOM_PREFIX_OFFSET + 4] == b"DICM":
        return "dicom"
    return None


def describe_unsupported(head: bytes) -> str:
    """A short guess at what a non-image upload is, for the 415 message."""
    for magic, what in _OTHER_FORMATS:
        if head.startswith(magic):
            return what
    if head.lstrip()[:1] in (b"{", b"["):
        return "JSON or other text"
    try:
        head[:512].decode("utf-8")
        return "text"
    except UnicodeDecodeError:
        return "an unknown binary format"


class QueueFull(Exception):
    """Every worker is busy and the waiting line is full."""

    def __init__(self, retry_after_s: int) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(f"server busy: every worker is busy and the queue is full; retry in about {retry_after_s} s")


class InferenceQueue:
    """``workers`` threads run jobs; up to ``queue_size`` more wait; anything beyond is refused."""

    def __init__(self, workers: int, queue_size: int) -> None:
        self.workers = workers
        self.queue_size = queue_size
        self.capacity = workers + queue_size
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ifnet-infer")
        self._lock = threading.Lock()
        self._admitted = 0  # running + waiting
        self._running = 0
        self._completed = 0
        self._rejected = 0
        self._mean_job_s = 1.0  # running mean of job time, for Retry-After; 1 s until measured

    def stats(self) -> dict:
        with self._lock:
            return {"workers": self.workers, "queue_size": self.queue_size, "running": self._running,
                    "waiting": self._admitted - self._running, "completed": self._completed,
                    "rejected": self._rejected}

    def refuse_if_full(self) -> None:
        """Raise :class:`QueueFull` now if a job could not be admitted (before reading a large upload)."""
        with self._lock:
            full = self._admitted >= self.capacity
            if full:
                self._rejected += 1
        if full:
            raise QueueFull(self.retry_after_s())

    def retry_after_s(self) -> int:
        """Seconds until a slot is likely free: the queue ahead of a newcomer, drained by the workers."""
        with self._lock:
            return max(1, math.ceil(self._mean_job_s * self._admitted / self.workers))

    def submit(self, fn: Callable[[], T]) -> "Future[T]":
        """Hand ``fn`` to a worker, or raise :class:`QueueFull` at once."""
        with self._lock:
            if self._admitted >= self.capacity:
                self._rejected += 1
                full = True
            else:
                self._admitted += 1
                full = False
        if full:
            raise QueueFull(self.retry_after_s())

        def job() -> T:
            started = time.perf_counter()
            with self._lock:
                self._running += 1
            try:
                return fn()
            finally:
                elapsed = time.perf_counter() - started
                with self._lock:
                    self._running -= 1
                    self._completed += 1
                    self._mean_job_s = 0.8 * self._mean_job_s + 0.2 * elapsed

        future = self._executor.submit(job)
        future.add_done_callback(self._release)  # also runs when cancelled before starting
        return future

    def _release(self, _future: Future) -> None:
        with self._lock:
            self._admitted -= 1

    async def run(self, fn: Callable[[], T]) -> T:
        """:meth:`submit` and await the result without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(fn))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
