"""Reading chest X-rays from PNG, JPEG and DICOM into one 2-D grayscale array.

Every reader in the toolkit (datasets, ``ifnet enhance``, ``ifnet generate``, the web server) goes
through :func:`read_xray` / :func:`read_xray_bytes`, so an image means the same pixels everywhere.

What comes back is a 2-D ``np.ndarray`` [H, W]:

* 8-bit PNG/JPEG -> ``uint8``; 16-bit PNG -> ``uint16`` (values as stored, no rescaling).
* RGB is converted to gray with the ITU-R BT.601 luma weights (0.299 R + 0.587 G + 0.114 B), the
  weights PIL's ``convert("L")`` uses; an X-ray saved as RGB has R = G = B, so the gray value is the
  stored value exactly.
* Alpha is *composited on black*: ``gray * alpha / max``. A fully transparent pixel becomes black,
  which in a radiograph means "no attenuation" (air), the neutral background; an opaque alpha
  (the usual case) leaves the pixels unchanged.
* DICOM -> ``uint16`` spanning the display range: modality LUT (rescale slope/intercept), then the
  VOI LUT or window centre/width, then MONOCHROME1 is inverted so that bone is bright, as in every
  other format. The first VOI view (index 0) is used when the file holds several. A DICOM with neither a
  VOI LUT nor a window is stretched from its own minimum to its maximum (what most viewers show by default),
  so a low-contrast image stored without a window reads as full contrast: give such files a window.

The format is recognised from the first bytes of the file (magic numbers), never from the file
name: R2Gen-style datasets are full of ``.png`` files that are really JPEGs.

Decompression bombs: width and height are read from the header (PNG IHDR, JPEG SOF, DICOM
Rows/Columns) and checked against ``max_pixels`` and ``max_side`` before any pixel is decoded, so a
50-byte file declaring 10^10 pixels is refused without allocating anything. PIL applies its own
limit (``PIL.Image.MAX_IMAGE_PIXELS``, about 89 megapixels, an error above twice that); our default
``MAX_PIXELS`` is below it, so ours is the one users meet. Raising ``max_pixels`` above PIL's limit
needs PIL's limit raised as well.
"""

from __future__ import annotations

import contextlib
import io
import struct
import sys
import threading
import warnings
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterator, Optional

import numpy as np

from ifnet.errors import DataError
from ifnet.io_utils import PathLike

if TYPE_CHECKING:
    from pydicom.dataset import Dataset as DicomDataset

#: Largest image (width * height) we decode. The biggest chest radiographs are about 4300 x 4300
#: (18 MP); 80 MP leaves room for unusual detectors and stays below PIL's own bomb limit.
MAX_PIXELS = 80_000_000
#: Largest side in pixels: refuses absurd aspect ratios (1 x 80M) that pass the pixel limit.
MAX_SIDE = 16_384

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_DICOM_MAGIC_OFFSET = 128  # Part 10 files: a 128-byte preamble, then b"DICM"

# JPEG start-of-frame markers carry the image size: SOF0-3, 5-7, 9-11, 13-15 (not DHT C4, JPG C8,
# DAC CC, which share the range).
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# Markers that stand alone, without a length field.
_JPEG_STANDALONE = {0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8}

_LUMA = np.array([0.299, 0.587, 0.114])


class ImageError(DataError):
    """An image that cannot be read: missing, unknown format, corrupt, truncated or too large."""


# -- sources: a path or bytes, reopened as often as needed -------------------------------------

Opener = Callable[[], BinaryIO]


def _path_opener(path: Path) -> Opener:
    def open_() -> BinaryIO:
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise ImageError(path, "file not found") from None
        except IsADirectoryError:
            raise ImageError(path, "is a directory, expected an image file") from None
        except PermissionError:
            raise ImageError(path, "permission denied") from None
        except OSError as e:
            raise ImageError(path, f"cannot open: {e.strerror or e}") from None
    return open_


def _bytes_opener(data: bytes) -> Opener:
    return lambda: io.BytesIO(data)


def _sniff(head: bytes, name: str) -> str:
    """'png', 'jpeg' or 'dicom', from the first bytes; anything else is an ImageError."""
    if not head:
        raise ImageError(name, "empty file")
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    if head[_DICOM_MAGIC_OFFSET:_DICOM_MAGIC_OFFSET + 4] == b"DICM":
        return "dicom"
    raise ImageError(name, "unrecognised image format (expected PNG, JPEG or a DICOM Part 10 file "
                           "with the 'DICM' prefix)")


# -- header probes: size without decoding -------------------------------------------------------

def _png_header(fh: BinaryIO, name: str) -> tuple[int, int, int, int]:
    """(width, height, bit_depth, color_type) from the IHDR chunk, which PNG requires first."""
    head = fh.read(33)
    if len(head) < 33:
        raise ImageError(name, "truncated PNG header")
    length, ctype = struct.unpack(">I4s", head[8:16])
    if ctype != b"IHDR" or length != 13:
        raise ImageError(name, "corrupt PNG: the first chunk is not a valid IHDR")
    width, height, bit_depth, color_type = struct.unpack(">IIBB", head[16:26])
    return width, height, bit_depth, color_type


def _jpeg_size(fh: BinaryIO, name: str) -> tuple[int, int]:
    """(width, height) from the first start-of-frame segment, skipping other segments by length."""
    fh.seek(2)  # past SOI
    while True:
        byte = fh.read(1)
        if not byte:
            raise ImageError(name, "truncated JPEG: no frame header before end of file")
        if byte != b"\xff":
            raise ImageError(name, "corrupt JPEG: expected a marker")
        marker = fh.read(1)
        while marker == b"\xff":  # fill bytes
            marker = fh.read(1)
        if not marker:
            raise ImageError(name, "truncated JPEG: no frame header before end of file")
        code = marker[0]
        if code in _JPEG_STANDALONE:
            continue
        if code in (0xD9, 0xDA):  # EOI or start of scan before any frame header
            raise ImageError(name, "corrupt JPEG: no frame header before the image data")
        raw_len = fh.read(2)
        if len(raw_len) < 2:
            raise ImageError(name, "truncated JPEG header")
        (seg_len,) = struct.unpack(">H", raw_len)
        if seg_len < 2:
            raise ImageError(name, "corrupt JPEG: bad segment length")
        if code in _JPEG_SOF:
            body = fh.read(5)
            if len(body) < 5:
                raise ImageError(name, "truncated JPEG frame header")
            _precision, height, width = struct.unpack(">BHH", body)
            return width, height
        fh.seek(seg_len - 2, io.SEEK_CUR)


@contextlib.contextmanager
def warnings_only_on_success() -> Iterator[None]:
    """Hold back the warnings raised inside (pydicom warns about each odd element it meets): re-issued when the
    block succeeds, dropped when it raises, so a file that cannot be read gets one error line, not a warning
    cascade before it. It wraps the public readers (probe_image, read_xray, read_xray_bytes). Only in the main thread: ``catch_warnings`` swaps process-wide state, so in the server's
    worker threads warnings pass through as they come."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        yield
    for w in seen:  # re-issued under the module that raised it, so filters such as module="pydicom" still apply
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, module=_module_named_by(w.filename))


def _module_named_by(filename: str) -> Optional[str]:
    for name, module in list(sys.modules.items()):
        if getattr(module, "__file__", None) == filename:
            return name
    return None


def _read_dicom(fh: BinaryIO, name: str, *, pixels: bool) -> "DicomDataset":
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(fh, stop_before_pixels=not pixels)
        # pydicom decodes each element on first access: do it here, so that a damaged element (an
        # unknown VR in Rows, say) is reported as a corrupt file rather than raised later, anywhere.
        for _ in ds.iterall():
            pass
        return ds
    except InvalidDicomError as e:
        raise ImageError(name, f"not a valid DICOM file: {e}") from None
    except Exception as e:  # pydicom signals a damaged file with many exception types
        raise ImageError(name, f"corrupt or truncated DICOM: {type(e).__name__}: {e}") from None


def _dicom_size(ds: "DicomDataset", name: str) -> tuple[int, int]:
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if rows is None or cols is None:
        raise ImageError(name, "DICOM has no Rows/Columns (no image in this file)")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        width, height = int(cols), int(rows)
    except (TypeError, ValueError):  # an empty, multi-valued or garbled element
        raise ImageError(name, f"corrupt DICOM header: Rows {str(rows)[:20]!r}, Columns {str(cols)[:20]!r} "
                               f"or NumberOfFrames {str(ds.get('NumberOfFrames'))[:20]!r} is not one integer") from None
    if frames > 1:
        # A radiograph is one frame; a cine or tomosynthesis stack is not an input we understand.
        raise ImageError(name, f"multi-frame DICOM ({frames} frames); expected a single radiograph")
    return width, height


def _probe(opener: Opener, name: str) -> tuple[str, int, int, bool]:
    """(format, width, height, is_16bit_color_png) from the header only.

    One open per call: annotation validation probes every image of a dataset.
    """
    png16_color = False
    with opener() as fh:
        fmt = _sniff(fh.read(_DICOM_MAGIC_OFFSET + 4), name)
        fh.seek(0)
        if fmt == "png":
            width, height, bit_depth, color_type = _png_header(fh, name)
            png16_color = bit_depth == 16 and color_type != 0
        elif fmt == "jpeg":
            width, height = _jpeg_size(fh, name)
        else:
            width, height = _dicom_size(_read_dicom(fh, name, pixels=False), name)
    return fmt, width, height, png16_color


def check_size(width: int, height: int, name: str, *, max_pixels: int = MAX_PIXELS,
               max_side: int = MAX_SIDE) -> None:
    """Raise ImageError if the declared size is empty or absurd (decompression-bomb guard)."""
    if width <= 0 or height <= 0:
        raise ImageError(name, f"declares an empty image ({width} x {height})")
    if width > max_side or height > max_side:
        raise ImageError(name, f"declares {width} x {height} pixels; a side above {max_side} is "
                               "refused (corrupt file or decompression bomb)")
    if width * height > max_pixels:
        raise ImageError(name, f"declares {width} x {height} = {width * height:,} pixels, above the "
                               f"limit of {max_pixels:,} (corrupt file or decompression bomb)")


@warnings_only_on_success()
def probe_image(path: PathLike) -> tuple[int, int]:
    """(width, height) of a PNG, JPEG or DICOM file, reading only its header.

    Raises ImageError (naming the file) if it is missing, of an unknown format or has a corrupt
    header. It does not check the size limits; see :func:`check_size`.
    """
    p = Path(path)
    _, width, height, _ = _probe(_path_opener(p), str(p))
    return width, height


# -- decoding -------------------------------------------------------------------------------------

def _gray_from_color(arr: np.ndarray, alpha: Optional[np.ndarray], maxval: int, dtype: np.dtype) -> np.ndarray:
    """[H, W, 3] colour (+ [H, W] alpha) -> [H, W] luma composited on black, in ``dtype``."""
    gray = arr.astype(np.float64) @ _LUMA
    if alpha is not None:
        gray = gray * (alpha.astype(np.float64) / maxval)
    return np.clip(np.rint(gray), 0, maxval).astype(dtype)


def _gray_plus_alpha(gray: np.ndarray, alpha: np.ndarray, maxval: int, dtype: np.dtype) -> np.ndarray:
    out = gray.astype(np.float64) * (alpha.astype(np.float64) / maxval)
    return np.clip(np.rint(out), 0, maxval).astype(dtype)


def _decode_pil(opener: Opener, name: str, fmt: str) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        with opener() as fh:
            with Image.open(fh, formats=[fmt.upper()]) as im:
                im.load()
                if fmt == "jpeg":
                    # A JPEG from a phone or viewer export may be stored sideways with an EXIF
                    # orientation tag; show it the way every viewer does.
                    im = ImageOps.exif_transpose(im)
                return _pil_to_gray(im, name)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(name, f"refused by PIL's decompression-bomb limit: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as e:
        # PIL reports truncation as OSError("image file is truncated ..."), bad CRC as SyntaxError.
        raise ImageError(name, f"cannot decode {fmt.upper()} (corrupt or truncated): {e}") from None


def _pil_to_gray(im, name: str) -> np.ndarray:
    if im.mode == "1":
        im = im.convert("L")
    elif im.mode in ("P", "PA"):
        # Palette images may carry transparency; RGBA keeps it so it is composited like any alpha.
        im = im.convert("RGBA")
    elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGB")
    mode = im.mode
    arr = np.asarray(im)
    if mode == "L":
        return np.ascontiguousarray(arr, dtype=np.uint8)
    if mode.startswith("I;16"):
        return np.ascontiguousarray(arr).astype(np.uint16)
    if mode == "I":  # 32-bit container some PIL versions use for 16-bit PNG
        return np.clip(arr, 0, 65535).astype(np.uint16)
    if mode == "LA":
        return _gray_plus_alpha(arr[..., 0], arr[..., 1], 255, np.uint8)
    if mode == "RGB":
        return _gray_from_color(arr, None, 255, np.uint8)
    if mode == "RGBA":
        return _gray_from_color(arr[..., :3], arr[..., 3], 255, np.uint8)
    raise ImageError(name, f"unsupported pixel mode {mode!r}")


def _decode_png16_color(opener: Opener, name: str) -> np.ndarray:
    """16-bit colour/gray+alpha PNG, which PIL would truncate to 8 bits; OpenCV keeps 16."""
    import cv2

    with opener() as fh:
        data = np.frombuffer(fh.read(), dtype=np.uint8)
    arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if arr is None or arr.dtype != np.uint16:
        raise ImageError(name, "cannot decode 16-bit PNG (corrupt or truncated)")
    if arr.ndim == 2:
        return arr
    if arr.shape[2] == 2:  # gray + alpha
        return _gray_plus_alpha(arr[..., 0], arr[..., 1], 65535, np.uint16)
    # OpenCV orders channels BGR(A).
    alpha = arr[..., 3] if arr.shape[2] == 4 else None
    return _gray_from_color(arr[..., 2::-1], alpha, 65535, np.uint16)


def _pydicom_luts() -> tuple:
    """(apply_color_lut, apply_modality_lut, apply_voi_lut, apply_windowing) for pydicom 2 and 3."""
    try:
        from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, apply_windowing
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import (apply_color_lut, apply_modality_lut, apply_voi_lut,
                                                      apply_windowing)
    return apply_color_lut, apply_modality_lut, apply_voi_lut, apply_windowing


def _voi_output_range(ds: "DicomDataset", arr: np.ndarray, applied: str) -> tuple[float, float]:
    """The value range the VOI step maps into: what becomes black and white on a display."""
    apply_windowing = _pydicom_luts()[3]

    if applied == "window":
        # Linear windowing sends everything below the window to y_min and above it to y_max;
        # probing two values far outside the window gives pydicom's exact range (the sigmoid
        # function approaches the same bounds).
        center = float(np.atleast_1d(ds.WindowCenter)[0])
        width = abs(float(np.atleast_1d(ds.WindowWidth)[0]))
        probe = np.array([center - 1e3 * width - 1, center + 1e3 * width + 1], dtype=np.float64)
        with np.errstate(over="ignore"):
            lo, hi = apply_windowing(probe, ds)
        return float(lo), float(hi)
    if applied == "lut":
        lut = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64)
        return float(lut.min()), float(lut.max())
    return float(arr.min()), float(arr.max())


def _decode_dicom(opener: Opener, name: str) -> np.ndarray:
    apply_color_lut, apply_modality_lut, apply_voi_lut, _ = _pydicom_luts()

    with opener() as fh:
        ds = _read_dicom(fh, name, pixels=True)
    if "PixelData" not in ds:
        raise ImageError(name, "DICOM has no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    try:
        arr = ds.pixel_array
    except Exception as e:  # pydicom raises many types for missing codecs and bad data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        syntax_name = getattr(syntax, "name", syntax)
        raise ImageError(name, f"cannot decode DICOM pixel data (transfer syntax {syntax_name}): {e}. "
                               "Compressed DICOM may need pylibjpeg or gdcm installed") from None

    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        try:
            values = apply_modality_lut(arr, ds)
        except (TypeError, ValueError) as e:  # e.g. a RescaleIntercept that is not a number
            raise ImageError(name, f"invalid DICOM rescale slope/intercept: {_first_line(e)}") from None
        applied = "none"
        voi_seq = ds.get("VOILUTSequence")
        if voi_seq and "LUTDescriptor" in voi_seq[0] and "LUTData" in voi_seq[0]:
            applied = "lut"
        elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
            applied = "window"
        try:
            values = apply_voi_lut(values, ds, index=0, prefer_lut=True)
            lo, hi = _voi_output_range(ds, values, applied)
        except (ValueError, TypeError, NotImplementedError, AttributeError, IndexError) as e:
            raise ImageError(name, f"invalid DICOM VOI LUT / window settings: {_first_line(e)}") from None
        values = values.astype(np.float64)
        scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
        out = np.clip(np.rint(scaled * 65535), 0, 65535).astype(np.uint16)
        if photometric == "MONOCHROME1":
            # MONOCHROME1: the lowest value is displayed white. Inverting makes bone bright, as in
            # MONOCHROME2 files and every PNG/JPEG, so the model sees one convention.
            out = 65535 - out
        return out

    # Colour DICOM (secondary captures): pydicom already converted YBR to RGB.
    if photometric == "PALETTE COLOR":
        try:
            arr = apply_color_lut(arr, ds)
        except (ValueError, TypeError, AttributeError, IndexError) as e:
            raise ImageError(name, f"invalid DICOM palette: {_first_line(e)}") from None
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ImageError(name, f"unsupported DICOM photometric interpretation {photometric!r}")
    maxval = 65535 if arr.dtype.itemsize > 1 else 255
    gray = _gray_from_color(arr, None, maxval, np.uint16)
    return gray if maxval == 65535 else gray * np.uint16(257)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _read(opener: Opener, name: str, max_pixels: int, max_side: int) -> np.ndarray:
    fmt, width, height, png16_color = _probe(opener, name)
    check_size(width, height, name, max_pixels=max_pixels, max_side=max_side)
    if fmt == "dicom":
        img = _decode_dicom(opener, name)
    elif png16_color:
        img = _decode_png16_color(opener, name)
    else:
        img = _decode_pil(opener, name, fmt)
    if img.ndim != 2:
        raise ImageError(name, f"decoded to shape {img.shape}, expected a 2-D image")
    return img


@warnings_only_on_success()
def read_xray(path: PathLike, *, max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE) -> np.ndarray:
    """Read one X-ray file (PNG, JPEG or DICOM) into [H, W] uint8 or uint16 (see module doc).

    Raises ImageError naming the file for a missing file, an unknown format, a corrupt or
    truncated file, or declared dimensions above ``max_pixels`` / ``max_side`` (checked before
    decoding).
    """
    p = Path(path)
    return _read(_path_opener(p), str(p), max_pixels, max_side)


@warnings_only_on_success()
def read_xray_bytes(data: bytes, name: str = "<upload>", *, max_pixels: int = MAX_PIXELS,
                    max_side: int = MAX_SIDE) -> np.ndarray:
    """:func:`read_xray` for an in-memory file (an upload); ``name`` is used in error messages."""
    return _read(_bytes_opener(bytes(data)), name, max_pixels, max_side)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """[H, W] uint8 or uint16 -> uint8. uint16 is scaled by 255/65535 with rounding (x / 257).

    The scaling is fixed, not min-max, so the same stored value always maps to the same output.
    uint8 input is returned unchanged (the same array).
    """
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        # (x * 255 + 32767) // 65535 == round(x * 255 / 65535) in exact integer arithmetic.
        return ((img.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    raise TypeError(f"to_uint8 expects uint8 or uint16, got {img.dtype}")
