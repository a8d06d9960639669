"""Reading a multipart/form-data upload into memory, with a hard cap on its size.

Frameworks usually spool uploads above about 1 MB into temporary files; a server that may receive
patient images should leave nothing on disk, so the body is parsed here as it streams in
(python-multipart's push parser) and every part is kept in memory. The cap is checked against
``Content-Length`` before anything is read, and again on every chunk, because a chunked request
declares no length.
"""

from __future__ import annotations

import asyncio

from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header


class UploadError(Exception):
    """A request body we will not process; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


def too_large(limit: int) -> UploadError:
    return UploadError(413, f"upload larger than the server's limit of {limit / 2 ** 20:.3g} MB "
                            "(both images together; `ifnet serve --max-upload-mb` sets it)")


@dataclass
class Part:
    name: str
    filename: Optional[str]  # None for a plain form field
    data: bytearray = field(default_factory=bytearray)


def multipart_boundary(content_type: Optional[str]) -> bytes:
    """The boundary of a multipart/form-data ``Content-Type``; a 415/400 UploadError otherwise."""
    kind, params = parse_options_header(content_type or "")
    if kind != b"multipart/form-data":
        raise UploadError(415, "send the images as multipart/form-data with a 'frontal' file field "
                               f"(got Content-Type {content_type or 'none'!r})")
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError(400, "multipart/form-data without a boundary parameter")
    return boundary


def check_declared_length(content_length: Optional[str], limit: int) -> None:
    """Refuse an oversized body from its ``Content-Length`` alone, before reading it."""
    if content_length is None:
        return
    try:
        declared = int(content_length)
    except ValueError:
        raise UploadError(400, f"invalid Content-Length {content_length!r}") from None
    if declared > limit:
        raise too_large(limit)


class _Collector:
    """python-multipart callbacks that gather parts into memory."""

    def __init__(self, max_parts: int) -> None:
        self.parts: list[Part] = []
        self.max_parts = max_parts
        self.finished = False
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._current: Optional[Part] = None

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._header_field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        if len(self.parts) >= self.max_parts:
            raise UploadError(400, f"too many form fields (at most {self.max_parts})")
        self._headers = {}

    def _header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        disposition, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        if disposition != b"form-data" or b"name" not in params:
            raise UploadError(400, "a multipart part has no Content-Disposition: form-data; name=...")
        filename = params.get(b"filename")
        self._current = Part(name=params[b"name"].decode("utf-8", "replace"),
                             filename=None if filename is None else filename.decode("utf-8", "replace"))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        assert self._current is not None
        self._current.data.extend(data[start:end])

    def _part_end(self) -> None:
        assert self._current is not None
        self.parts.append(self._current)
        self._current = None

    def _end(self) -> None:
        self.finished = True


async def read_multipart(chunks: AsyncIterator[bytes], boundary: bytes, limit: int,
                         *, max_parts: int = 8, timeout_s: Optional[float] = None) -> list[Part]:
    """Parse the body streamed by ``chunks``; 413 as soon as more than ``limit`` bytes arrived, 408 when the
    whole body has not arrived within ``timeout_s`` seconds (a client trickling bytes would otherwise hold
    its connection, and the server's shutdown, for as long as it likes)."""
    collector = _Collector(max_parts)
    parser = MultipartParser(boundary, collector.callbacks())
    received = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in chunks:
                received += len(chunk)
                if received > limit:
                    raise too_large(limit)
                parser.write(chunk)
        parser.finalize()
    except TimeoutError:
        raise UploadError(408, f"the upload did not arrive within {timeout_s:g} s ({received} bytes received)") \
            from None
    except MultipartParseError as e:
        raise UploadError(400, f"malformed multipart/form-data body: {e}") from None
    if not collector.finished:
        raise UploadError(400, "incomplete multipart/form-data body (no closing boundary)")
    return collector.parts
