"""X-ray image reading: every format and bit depth, DICOM LUTs, and every kind of bad file.

Images are built by hand in tmp_path. PNGs are written by a tiny encoder below, so the test
controls bit depth and colour type exactly and can declare any size in the IHDR header without
allocating the pixels.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ifnet.data import images
from ifnet.data.images import (MAX_PIXELS, MAX_SIDE, ImageError, probe_image, read_xray, read_xray_bytes,
                               to_uint8)
from ifnet.errors import DataError

# -- builders --------------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(arr: np.ndarray, color_type: int, bit_depth: int) -> bytes:
    """Minimal PNG encoder: arr [H, W] or [H, W, C] of the samples, filter 0 on every row."""
    h, w = arr.shape[:2]
    raw = arr.astype(">u2" if bit_depth == 16 else "u1").reshape(h, -1).tobytes()
    row = len(raw) // h
    data = b"".join(b"\x00" + raw[i * row:(i + 1) * row] for i in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(data))
            + _chunk(b"IEND", b""))


def bomb_png(width: int, height: int) -> bytes:
    """A valid-looking PNG header declaring width x height, with a 1-row IDAT: 60-odd bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + _chunk(b"IEND", b""))


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 12,
                **elements) -> Path:
    """A real Part 10 DICOM file (preamble, DICM, file meta) with uint16 pixels."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


# -- PNG / JPEG ------------------------------------------------------------------------------------

def test_png_8bit_gray(tmp_path):
    arr = np.array([[0, 17, 255], [128, 1, 200]], np.uint8)
    img = read_xray(write(tmp_path / "a.png", png_bytes(arr, 0, 8)))
    assert img.dtype == np.uint8 and img.shape == (2, 3)
    np.testing.assert_array_equal(img, arr)


def test_png_16bit_gray_keeps_values(tmp_path):
    arr = np.array([[0, 1000], [65535, 4095]], np.uint16)
    img = read_xray(write(tmp_path / "a.png", png_bytes(arr, 0, 16)))
    assert img.dtype == np.uint16
    np.testing.assert_array_equal(img, arr)


def test_png_rgb_uses_bt601_luma(tmp_path):
    # gray pixels stay exact; pure red/green/blue get 0.299/0.587/0.114 of 255 = 76.245/149.685/29.07
    arr = np.array([[[90, 90, 90], [255, 0, 0]], [[0, 255, 0], [0, 0, 255]]], np.uint8)
    img = read_xray(write(tmp_path / "a.png", png_bytes(arr, 2, 8)))
    assert img.dtype == np.uint8
    np.testing.assert_array_equal(img, [[90, 76], [150, 29]])


def test_png_rgba_composites_alpha_on_black(tmp_path):
    # value 200: opaque -> 200; alpha 128 -> 200*128/255 = 100.39 -> 100; transparent -> 0
    arr = np.array([[[200, 200, 200, 255], [200, 200, 200, 128], [200, 200, 200, 0]]], np.uint8)
    img = read_xray(write(tmp_path / "a.png", png_bytes(arr, 6, 8)))
    np.testing.assert_array_equal(img, [[200, 100, 0]])


def test_png_gray_alpha_8bit(tmp_path):
    arr = np.array([[[60, 255], [60, 51]]], np.uint8)  # 60 * 51/255 = 12
    img = read_xray(write(tmp_path / "a.png", png_bytes(arr, 4, 8)))
    np.testing.assert_array_equal(img, [[60, 12]])


def test_png_16bit_rgb_and_gray_alpha_keep_16_bits(tmp_path):
    # PIL would truncate these to 8 bits; the reader must keep uint16 values.
    rgb = np.array([[[1000, 1000, 1000], [40000, 40000, 40000]]], np.uint16)
    img = read_xray(write(tmp_path / "rgb16.png", png_bytes(rgb, 2, 16)))
    assert img.dtype == np.uint16
    np.testing.assert_array_equal(img, [[1000, 40000]])
    # gray+alpha: 65535*32768/65535 = 32768; alpha 0 -> 0
    ga = np.array([[[1000, 65535], [65535, 32768], [300, 0]]], np.uint16)
    img = read_xray(write(tmp_path / "ga16.png", png_bytes(ga, 4, 16)))
    assert img.dtype == np.uint16
    np.testing.assert_array_equal(img, [[1000, 32768, 0]])


def test_palette_png_with_transparency(tmp_path):
    im = Image.fromarray(np.array([[0, 1, 2]], np.uint8), mode="P")
    im.putpalette([10, 10, 10, 255, 0, 0, 80, 80, 80] + [0] * 759)
    im.save(tmp_path / "p.png", transparency=2)  # palette index 2 fully transparent
    # index 0 -> gray 10; index 1 -> pure red, luma 76.245 -> 76; index 2 -> transparent -> 0
    np.testing.assert_array_equal(read_xray(tmp_path / "p.png"), [[10, 76, 0]])


def test_jpeg_gray_and_rgb(tmp_path):
    # A flat image survives JPEG exactly (one DC value per block, no AC energy).
    Image.fromarray(np.full((16, 16), 77, np.uint8)).save(tmp_path / "g.jpg", quality=95)
    Image.fromarray(np.full((16, 16, 3), 77, np.uint8)).save(tmp_path / "c.jpg", quality=95)
    gray, color = read_xray(tmp_path / "g.jpg"), read_xray(tmp_path / "c.jpg")
    assert gray.dtype == color.dtype == np.uint8
    assert gray.shape == color.shape == (16, 16)
    assert np.abs(gray.astype(int) - 77).max() <= 1
    assert np.abs(color.astype(int) - 77).max() <= 1


def test_format_detected_from_content_not_extension(tmp_path):
    arr = np.array([[5, 6]], np.uint8)
    img = read_xray(write(tmp_path / "really_png.jpg", png_bytes(arr, 0, 8)))
    np.testing.assert_array_equal(img, arr)
    Image.fromarray(np.full((8, 8), 40, np.uint8)).save(tmp_path / "j.jpg")
    (tmp_path / "j.jpg").rename(tmp_path / "really_jpeg.dcm")
    assert read_xray(tmp_path / "really_jpeg.dcm").shape == (8, 8)


def test_read_xray_bytes_matches_file(tmp_path):
    arr = np.array([[0, 1000], [65535, 4095]], np.uint16)
    data = png_bytes(arr, 0, 16)
    np.testing.assert_array_equal(read_xray_bytes(data), read_xray(write(tmp_path / "a.png", data)))
    with pytest.raises(ImageError, match="upload-7"):
        read_xray_bytes(b"not an image at all", name="upload-7")


def test_probe_image_reads_header_only(tmp_path):
    assert probe_image(write(tmp_path / "a.png", png_bytes(np.zeros((3, 5), np.uint8), 0, 8))) == (5, 3)
    Image.fromarray(np.zeros((7, 9), np.uint8)).save(tmp_path / "a.jpg")
    assert probe_image(tmp_path / "a.jpg") == (9, 7)
    # a bomb is probed (not refused): probing does not decode
    assert probe_image(write(tmp_path / "b.png", bomb_png(100_000, 90_000))) == (100_000, 90_000)
    dcm = write_dicom(tmp_path / "a.dcm", np.zeros((4, 6), np.uint16))
    assert probe_image(dcm) == (6, 4)


def test_to_uint8():
    img16 = np.array([0, 128, 129, 257, 32767, 65535], np.uint16)
    # round(x / 257): 128/257 = 0.498 -> 0, 129/257 = 0.502 -> 1, 32767/257 = 127.498 -> 127
    np.testing.assert_array_equal(to_uint8(img16), [0, 0, 1, 1, 127, 255])
    img8 = np.array([[3, 4]], np.uint8)
    assert to_uint8(img8) is img8
    with pytest.raises(TypeError):
        to_uint8(np.zeros(2, np.float32))


# -- DICOM -----------------------------------------------------------------------------------------

PIX = np.array([[0, 1000], [3000, 4000]], np.uint16)
# No VOI: min-max over the image -> v / 4000 * 65535: 16383.75 -> 16384, 49151.25 -> 49151
PIX_MINMAX = np.array([[0, 16384], [49151, 65535]], np.uint16)


def test_dicom_monochrome2_without_window_spans_uint16(tmp_path):
    img = read_xray(write_dicom(tmp_path / "a.dcm", PIX))
    assert img.dtype == np.uint16
    np.testing.assert_array_equal(img, PIX_MINMAX)


def test_dicom_monochrome1_is_inverted(tmp_path):
    img = read_xray(write_dicom(tmp_path / "a.dcm", PIX, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(img, 65535 - PIX_MINMAX)


def test_dicom_window_center_width(tmp_path):
    # 12-bit unsigned -> output range [0, 4095]. LINEAR (PS3.3 C.11.2.1.2.1) with c=2048, w=2048:
    #   c' = 2047.5, w' = 2047; x <= 1024 -> min; x > 3071 -> max;
    #   else ((x - 2047.5) / 2047 + 0.5) -> [0, 1] -> * 65535.
    #   x=1536: (-511.5/2047 + 0.5) * 65535 = 16391.75 -> 16392
    #   x=2560: ( 512.5/2047 + 0.5) * 65535 = 49175.26 -> 49175
    pix = np.array([[0, 1024, 1536], [2560, 3071, 4095]], np.uint16)
    img = read_xray(write_dicom(tmp_path / "a.dcm", pix, WindowCenter=2048, WindowWidth=2048))
    np.testing.assert_array_equal(img, [[0, 0, 16392], [49175, 65535, 65535]])
    inv = read_xray(write_dicom(tmp_path / "b.dcm", pix, photometric="MONOCHROME1",
                                WindowCenter=2048, WindowWidth=2048))
    np.testing.assert_array_equal(inv, 65535 - img)


def test_dicom_rescale_then_window(tmp_path):
    # Modality LUT first: y = 2x - 100, and the window (c=1900, w=2000) is in those output units.
    # LINEAR: c' = 1899.5, w' = 1999, so y <= 900 -> min and y > 2899 -> max.
    #   x=500 -> y=900 -> 0;  x=2000 -> y=3900 -> 65535;
    #   x=1000 -> y=1900 -> (0.5/1999 + 0.5) * 65535 = 32783.89 -> 32784
    pix = np.array([[500, 1000, 2000]], np.uint16)
    img = read_xray(write_dicom(tmp_path / "a.dcm", pix, RescaleSlope=2, RescaleIntercept=-100,
                                WindowCenter=1900, WindowWidth=2000))
    np.testing.assert_array_equal(img, [[0, 32784, 65535]])


def test_dicom_voi_lut_sequence(tmp_path):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.add_new("LUTDescriptor", "US", [4, 0, 16])  # 4 entries, first mapped value 0, 16 bits
    item.add_new("LUTData", "US", [0, 100, 200, 400])
    pix = np.array([[0, 1, 2, 3, 10]], np.uint16)  # 10 is past the table -> last entry
    img = read_xray(write_dicom(tmp_path / "a.dcm", pix, VOILUTSequence=[item]))
    # LUT output [0, 400] -> [0, 65535]: 100 -> 16383.75 -> 16384, 200 -> 32767.5 -> 32768 (even)
    np.testing.assert_array_equal(img, [[0, 16384, 32768, 65535, 65535]])


def test_dicom_multiframe_refused(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", np.zeros((2, 2), np.uint16), NumberOfFrames=2)
    with pytest.raises(ImageError, match="multi-frame"):
        read_xray(path)


def test_dicom_without_pixels(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", np.zeros((2, 2), np.uint16))
    import pydicom

    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(ImageError, match="no pixel data"):
        read_xray(path)


# -- bad input -------------------------------------------------------------------------------------

def test_huge_declared_png_refused_before_decoding(tmp_path, monkeypatch):
    # 10000 x 10000: each side is plausible, the pixel count (100 M) is not
    path = write(tmp_path / "bomb.png", bomb_png(10_000, 10_000))
    assert path.stat().st_size < 100

    def no_decode(*args, **kwargs):
        raise AssertionError("the decoder must not be reached for a bomb")

    monkeypatch.setattr(images, "_decode_pil", no_decode)
    with pytest.raises(ImageError, match="decompression bomb") as info:
        read_xray(path)
    assert str(path) in str(info.value)
    assert "100,000,000 pixels" in str(info.value)


def test_absurd_side_and_custom_limit(tmp_path):
    # 1 x 20000 is only 20k pixels but one side is above MAX_SIDE
    assert MAX_SIDE < 20_000 and 20_000 < MAX_PIXELS
    with pytest.raises(ImageError, match="side above"):
        read_xray(write(tmp_path / "thin.png", bomb_png(20_000, 1)))
    small = write(tmp_path / "s.png", png_bytes(np.zeros((10, 10), np.uint8), 0, 8))
    with pytest.raises(ImageError, match="limit of 99"):
        read_xray(small, max_pixels=99)
    assert read_xray(small, max_pixels=100).shape == (10, 10)


def test_huge_jpeg_header_refused(tmp_path):
    # SOI, then a SOF0 segment declaring 60000 x 60000, then EOI: refused from the header alone
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 60_000, 60_000, 1) + b"\x01\x11\x00"
    path = write(tmp_path / "bomb.jpg", b"\xff\xd8" + sof + b"\xff\xd9")
    with pytest.raises(ImageError, match="decompression bomb"):
        read_xray(path)


def test_huge_dicom_refused(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", np.zeros((2, 2), np.uint16))
    import pydicom

    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 12_000, 12_000  # the header lies; pixel data is 8 bytes
    ds.save_as(path)
    with pytest.raises(ImageError, match="decompression bomb"):
        read_xray(path)


def test_zero_size_refused(tmp_path):
    with pytest.raises(ImageError, match="empty image"):
        read_xray(write(tmp_path / "z.png", bomb_png(0, 10)))


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_truncated_file(tmp_path, kind):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (64, 64), dtype=np.uint8)  # noise: the pixel data is most of the file
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=kind.upper())
    data = buf.getvalue()
    path = write(tmp_path / f"t.{kind}", data[: len(data) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated") as info:
        read_xray(path)
    assert str(path) in str(info.value)


def test_corrupt_png_crc(tmp_path):
    data = bytearray(png_bytes(np.full((4, 4), 9, np.uint8), 0, 8))
    data[41] ^= 0xFF  # a byte inside the IDAT payload: the CRC no longer matches
    with pytest.raises(ImageError, match="corrupt"):
        read_xray(write(tmp_path / "c.png", bytes(data)))


def test_random_bytes_and_empty_and_missing(tmp_path):
    rng = np.random.default_rng(1)
    path = write(tmp_path / "noise.png", rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(ImageError, match="unrecognised image format") as info:
        read_xray(path)
    assert info.value.path == str(path)
    with pytest.raises(ImageError, match="empty file"):
        read_xray(write(tmp_path / "empty.png", b""))
    with pytest.raises(ImageError, match="file not found"):
        read_xray(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="is a directory"):
        read_xray(tmp_path)


def test_broken_dicom(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", np.arange(64, dtype=np.uint16).reshape(8, 8))
    data = path.read_bytes()
    write(path, data[:140])  # preamble + DICM + a few bytes of file meta
    with pytest.raises(ImageError) as info:
        read_xray(path)
    assert str(path) in str(info.value)


def test_image_error_is_a_data_error(tmp_path):
    with pytest.raises(DataError):
        read_xray(tmp_path / "missing.png")


def _odd_dicom(truncate: bool) -> bytes:
    """An 8x8 DICOM whose SOP Instance UID pydicom warns about on reading; truncated: its pixels are cut short."""
    import warnings

    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", "1.2.3"
    ds = Dataset()
    ds.file_meta = meta
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.SOPInstanceUID = "1.2.abc!!"
        ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 8, 8, 7
        ds.PixelRepresentation, ds.SamplesPerPixel, ds.PhotometricInterpretation = 0, 1, "MONOCHROME2"
        ds.PixelData = np.arange(64, dtype=np.uint8).tobytes()
        mode = pydicom.config.settings.writing_validation_mode
        pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
        try:
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
        finally:
            pydicom.config.settings.writing_validation_mode = mode
    data = buf.getvalue()
    return data[:-40] if truncate else data


def test_a_dicom_that_fails_gives_one_error_and_not_the_warnings_before_it():
    import warnings

    good, bad = _odd_dicom(False), _odd_dicom(True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert read_xray_bytes(good, "odd.dcm").shape == (8, 8)
    assert any("Invalid value for VR UI" in str(w.message) for w in seen)  # a file that reads keeps its warnings
    with warnings.catch_warnings(record=True) as seen:  # ... under pydicom's name, so a filter on it still works
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", module="pydicom")
        read_xray_bytes(good, "odd.dcm")
    assert not seen, [str(w.message) for w in seen]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(ImageError, match="bad.dcm: cannot decode DICOM pixel data"):
            read_xray_bytes(bad, "bad.dcm")
    assert not seen, [str(w.message) for w in seen]
