"""Fuzzing with hypothesis: every parser of outside input returns a sane value or raises its documented,
clear error (an :class:`~ifnet.errors.IFNetError` subclass naming the input), and nothing else.

Each target is a check function over a hypothesis strategy, kept in :data:`TARGETS` so that
``benchmarks/bench_fuzz.py`` runs the very same targets for 10,000+ examples each. CI runs
``IFNET_FUZZ_EXAMPLES`` (default 300) derandomized examples per target, so a failure reproduces.

Targets: report cleaning, tokenizer, vocabulary files, the rule labeler, annotation files (with path
traversal attempts), label files, the parameters chunk `ifnet enhance` stores in its PNGs, image decoding (random bytes, truncated and bit-flipped PNG / JPEG /
DICOM), huge declared image sizes (refused before any pixel is decoded), checkpoint JSON files (with
their checksums fixed up, so the parsers behind the sha256 check are reached), and the REST API
(multipart bodies with random fields, names, sizes and bytes, through the ASGI app).
"""

from __future__ import annotations

import contextlib
import io
import json
import ntpath
import os
import posixpath
import shutil
import struct
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Optional
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import example as hypothesis_example
from hypothesis.errors import HypothesisWarning
from hypothesis import strategies as st

from ifnet.data import images as images_module
from ifnet.data.annotation import load_annotation, load_label_file
from ifnet.data.images import MAX_PIXELS, MAX_SIDE, ImageError, read_xray_bytes
from ifnet.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK, Tokenizer, get_cleaner
from ifnet.errors import DataError, IFNetError, ValidationError
from ifnet.labels import NUM_OBSERVATIONS, OBSERVATIONS

CI_EXAMPLES = int(os.environ.get("IFNET_FUZZ_EXAMPLES", "300"))


@dataclass
class Target:
    """A fuzz target: ``check(example, ctx)`` over ``strategy()``; ``context()`` yields ``ctx``."""

    name: str
    strategy: Callable[[], st.SearchStrategy]
    check: Callable[[Any, Any], None]
    context: Callable[[], ContextManager[Any]] = field(default=lambda: contextlib.nullcontext())
    available: Callable[[], Optional[str]] = field(default=lambda: None)  # a reason to skip, or None
    examples: Callable[[], list] = field(default=lambda: [])  # always tried first: inputs that once crashed


TARGETS: dict[str, Target] = {}


def target(name: str, strategy: Callable[[], st.SearchStrategy], *,
           context: Optional[Callable[[], ContextManager[Any]]] = None,
           available: Optional[Callable[[], Optional[str]]] = None,
           examples: Optional[Callable[[], list]] = None) -> Callable:
    def register(check: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
        TARGETS[name] = Target(name, strategy, check, context or contextlib.nullcontext,
                               available or (lambda: None), examples or (lambda: []))
        return check
    return register


def run_target(name: str, max_examples: int, *, derandomize: bool = True,
               random_seed: Optional[int] = None) -> int:
    """Run one target for ``max_examples`` examples; return how many examples were checked.

    A failing example raises (hypothesis shrinks it first and prints the minimal input).
    """
    t = TARGETS[name]
    count = 0
    with t.context() as ctx, warnings.catch_warnings():
        warnings.simplefilter("ignore", HypothesisWarning)  # "overly large repr" of the image seeds
        warnings.filterwarnings("ignore", module="pydicom")  # "invalid value for VR UI" in mangled DICOMs
        @settings(max_examples=max_examples, deadline=None, database=None, derandomize=derandomize,
                  suppress_health_check=list(HealthCheck), phases=(Phase.explicit, Phase.generate, Phase.shrink))
        @given(t.strategy())
        def fuzz(example: Any) -> None:
            nonlocal count
            count += 1
            t.check(example, ctx)

        for regression in t.examples():
            fuzz = hypothesis_example(regression)(fuzz)
        if random_seed is not None and not derandomize:
            fuzz = seed(random_seed)(fuzz)
        fuzz()
    return count


# -- shared strategies --------------------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers(-3, 100) | st.integers()
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)

REPORT_WORDS = [
    "the", "heart", "is", "normal", "size", "no", "pleural", "effusion", "pneumothorax", "cardiomegaly", "mild",
    "possible", "not", "without", "clear", "lungs", "xxxx", "opacity", "edema", "fracture", "may", "be",
    "1.", "2.", "3.", "4.", "5.", "..", "...", ".", ",", ";", ":", "-", "(", ")", "[", "]", "{", "}", "\n", "  ",
    "/", "\\", '"', "'", "?", "!", "_", "__", "%", "&", "^", "*", "+", "<unk>", "<pad>", "<eos>", "<bos>", "\t",
    "İ", "ß", "ﬁ", "\u0130", "\u2028", "\x00", "é", "Ω", "ǅ",
]
report_texts = st.one_of(
    st.text(max_size=200),
    st.lists(st.sampled_from(REPORT_WORDS) | st.text(max_size=6), max_size=50).map(" ".join),
    st.lists(st.sampled_from(REPORT_WORDS), max_size=50).map("".join),
)


def _message(error: BaseException, *, one_line: bool = True) -> str:
    """The error's text: not empty and (unless it lists several problems by design) one line."""
    text = str(error)
    assert text.strip(), f"{type(error).__name__} without a message"
    if one_line:
        assert "\n" not in text, f"{type(error).__name__} message spans several lines: {text!r}"
    return text


# -- report cleaning and tokenizer -----------------------------------------------------------------

@target("report_cleaning", lambda: report_texts)
def check_report_cleaning(text: str, _ctx: Any) -> None:
    for name in ("iu_xray", "mimic_cxr"):
        out = get_cleaner(name)(text)
        assert isinstance(out, str) and out.endswith(".")
        assert not any(c in out for c in "\"'/\\"), out
        assert not any("A" <= c <= "Z" for c in out), out  # lower-cased (and R2Gen's range ':'-'[' drops them)
        for token in out.split():  # a '.' survives only as the sentence separator R2Gen inserts
            assert token == "." or "." not in token, (token, out)


@target("tokenizer", lambda: st.tuples(st.lists(report_texts, max_size=6), report_texts,
                                       st.none() | st.integers(0, 80), st.sampled_from(["iu_xray", "mimic_cxr"])))
def check_tokenizer(example: tuple, _ctx: Any) -> None:
    train, text, max_tokens, cleaner = example
    tok = Tokenizer.build(train, cleaner=cleaner, threshold=1)
    ids = tok.encode(text, max_tokens)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert all(0 <= i < len(tok) for i in ids)
    assert not any(i in (PAD_ID, BOS_ID, EOS_ID) for i in ids[1:-1])
    words = tok.clean(text).split()[:max_tokens]
    assert len(ids) == len(words) + 2
    assert tok.decode(ids) == " ".join(w if w in tok.token_to_id else UNK for w in words)
    assert Tokenizer.from_dict(json.loads(json.dumps(tok.to_dict()))).tokens == tok.tokens


def _vocab_docs() -> st.SearchStrategy:
    base = {"format": "ifnet-vocab", "version": 1, "cleaner": "iu_xray", "threshold": 3,
            "tokens": ["<pad>", "<bos>", "<eos>", "<unk>", "heart"]}
    edits = st.dictionaries(st.sampled_from(sorted(base) + ["extra"]),
                            json_values | st.lists(st.text(max_size=6), max_size=6), max_size=3)
    return st.one_of(json_values, edits.map(lambda e: {**base, **e}))


@target("vocab_file", _vocab_docs)
def check_vocab_file(doc: Any, _ctx: Any) -> None:
    try:
        tok = Tokenizer.from_dict(doc, source="vocab.json")
    except DataError as e:
        assert _message(e).startswith("vocab.json")
        return
    assert tok.tokens[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"] and len(set(tok.tokens)) == len(tok.tokens)
    tok.encode("the heart is normal.")


# -- labeler --------------------------------------------------------------------------------------------

def _labeler_context() -> ContextManager[Any]:
    from ifnet.labeler import Labeler

    return contextlib.nullcontext(Labeler())


@target("labeler", lambda: report_texts, context=_labeler_context)
def check_labeler(text: str, labeler: Any) -> None:
    codes = labeler.label(text)
    assert codes.shape == (NUM_OBSERVATIONS,) and codes.dtype == np.int8
    assert set(codes.tolist()) <= {-2, -1, 0, 1}
    assert np.array_equal(labeler.label_batch([text, text]), np.stack([codes, codes]))
    assert np.array_equal(labeler.explain(text).codes, codes)


# -- annotation and label files -----------------------------------------------------------------------

TRICKY_PATHS = [
    "../x.png", "/etc/passwd", "C:\\x.png", "C:x.png", "c:/x.png", "\\..\\x.png", "\\x.png", "/x.png",
    "a/../../x.png", "a\\..\\..\\x.png", "//server/share/x.png", "\\\\server\\share\\x.png", "./a.png",
    "a/./b.png", "a/b/../../../x.png", "a.png", "sub/c.png", "sub\\c.png", "\\\\?\\C:\\x.png", "..\\x.png",
    "...", ".../x.png", "sub/../a.png", "a.png/..", ".", "..", "~/x.png", "a.png\x00.txt", " ../x.png",
]
PATH_PARTS = ["..", ".", "", "a.png", "sub", "c.png", "C:", "c:", "\\", "~", "...", " ", "x"]
image_path_strings = st.one_of(
    st.sampled_from(TRICKY_PATHS),
    st.tuples(st.lists(st.sampled_from(PATH_PARTS), min_size=1, max_size=5), st.sampled_from(["/", "\\"]))
    .map(lambda parts_sep: parts_sep[1].join(parts_sep[0])),
    st.text(max_size=16),
)
annotation_entries = st.fixed_dictionaries({}, optional={
    "id": st.text(max_size=6) | json_scalars,
    "report": st.sampled_from(["The heart is normal.", " ", ""]) | st.text(max_size=30) | json_scalars,
    "image_path": st.lists(image_path_strings | json_scalars, max_size=3) | json_values,
    "split": st.sampled_from(["train", "val", "test"]) | json_scalars,
    "tag": json_values,
})
well_formed_entries = st.fixed_dictionaries({
    "id": st.text("abc123", min_size=1, max_size=4), "report": st.just("The heart is normal."),
    "image_path": st.lists(image_path_strings, min_size=1, max_size=2)})
annotation_docs = st.one_of(
    json_values,
    st.dictionaries(st.sampled_from(["train", "val", "test", "other"]),
                    st.lists(annotation_entries | well_formed_entries | json_values, max_size=4) | json_values,
                    max_size=4),
    st.fixed_dictionaries({split: st.lists(well_formed_entries, max_size=3) for split in ("train", "val", "test")}),
)


def stays_inside(rel: str) -> bool:
    """``rel`` joined to an image folder stays in it, read as a POSIX *and* as a Windows path."""
    posix = posixpath.normpath(posixpath.join("/root", rel))
    win = ntpath.normpath(ntpath.join("C:\\root", rel)).lower()
    return ((posix == "/root" or posix.startswith("/root/"))
            and (win == "c:\\root" or win.startswith("c:\\root\\")))


@contextlib.contextmanager
def _folder_with_images() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ifnet-fuzz-") as tmp:
        root = Path(tmp)
        png = _png(np.zeros((8, 8), np.uint8), 0, 8)
        for rel in ("images/a.png", "images/sub/c.png", "images/x.png"):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(png)
        (root / "x.png").write_bytes(png)  # what '../x.png' would reach
        yield root


deeply_nested = st.tuples(st.integers(1, 100_000), st.sampled_from([b"[]", b"{}"])).map(
    lambda n_pair: n_pair[1][:1] * n_pair[0] + n_pair[1][1:] * n_pair[0])  # [[[...]]]: recursion depth
raw_json_files = st.binary(max_size=64) | deeply_nested


@target("annotation", lambda: st.tuples(annotation_docs.map(lambda d: json.dumps(d).encode()) | raw_json_files,
                                        st.booleans()), context=_folder_with_images)
def check_annotation(example: tuple, root: Path) -> None:
    raw, check_images = example
    path = root / "annotation.json"
    path.write_bytes(raw)
    try:
        ann = load_annotation(path, root / "images", check_images=check_images)
    except (DataError, ValidationError) as e:
        assert _message(e, one_line=isinstance(e, DataError)).startswith(str(path))
        return
    for study in ann.all_studies():
        assert isinstance(study.id, str) and study.id.strip() and isinstance(study.report, str) and study.report.strip()
        for rel in study.image_paths:
            assert isinstance(rel, str) and stays_inside(rel), f"accepted image path {rel!r} leaves the image folder"
            if check_images:
                assert (root / "images" / rel).is_file()


label_values = st.sampled_from([0, 1, -1, -2, True, False, None, "1", 1.0, 0.5, 2, [1]])
label_docs = st.one_of(
    json_values,
    st.dictionaries(st.text(max_size=6), st.lists(label_values, min_size=13, max_size=15) | json_values, max_size=4),
    st.fixed_dictionaries({"labels": st.dictionaries(st.text(max_size=6), st.lists(label_values, min_size=14,
                                                                                   max_size=14), max_size=3)},
                          optional={"columns": st.permutations(list(OBSERVATIONS))
                                    | json_values, "_note": json_values}),
)


@target("label_file", lambda: label_docs.map(lambda d: json.dumps(d).encode()) | raw_json_files,
        context=_folder_with_images)
def check_label_file(raw: bytes, root: Path) -> None:
    path = root / "labels.json"
    path.write_bytes(raw)
    try:
        labels = load_label_file(path)
    except (DataError, ValidationError) as e:
        assert _message(e, one_line=isinstance(e, DataError)).startswith(str(path))
        return
    for key, row in labels.items():
        assert isinstance(key, str) and row.shape == (NUM_OBSERVATIONS,) and row.dtype == np.int64
        assert set(row.tolist()) <= {0, 1}


# -- images ---------------------------------------------------------------------------------------------

PNG_MAGIC, JPEG_MAGIC = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(arr: np.ndarray, color_type: int, bit_depth: int) -> bytes:
    h = arr.shape[0]
    raw = arr.astype(">u2" if bit_depth == 16 else "u1").reshape(h, -1).tobytes()
    row = len(raw) // h
    data = b"".join(b"\x00" + raw[i * row:(i + 1) * row] for i in range(h))
    ihdr = struct.pack(">IIBBBBB", arr.shape[1], h, bit_depth, color_type, 0, 0, 0)
    return PNG_MAGIC + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(data)) + _chunk(b"IEND", b"")


def _png_header(width: int, height: int, bit_depth: int = 8, color_type: int = 0, rest: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return PNG_MAGIC + _chunk(b"IHDR", ihdr) + rest


def _jpeg_header(width: int, height: int, rest: bytes = b"") -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + sof + rest


def _dicom(rows: int, cols: int, pixels: Optional[bytes] = None, photometric: str = "MONOCHROME2",
           **elements: Any) -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("fuzz.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, "1.2.3.4", "DX"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for key, value in elements.items():
        setattr(ds, key, value)
    if pixels is not None:
        ds.PixelData = pixels
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


_SEEDS: list[bytes] = []


def image_seeds() -> list[bytes]:
    """Small valid images of every supported kind, to truncate and mutate."""
    if not _SEEDS:
        import cv2
        from PIL import Image

        rng = np.random.default_rng(0)
        gray = rng.integers(0, 256, (12, 16), dtype=np.uint8)
        gray16 = rng.integers(0, 65536, (12, 16), dtype=np.uint16)
        rgb = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        seeds = [_png(gray, 0, 8), _png(gray16, 0, 16), _png(rgb, 2, 8), _png(rng.integers(0, 256, (12, 16, 4)), 6, 8),
                 _png(rng.integers(0, 256, (12, 16, 2)), 4, 8), _png(rng.integers(0, 65536, (12, 16, 3)), 2, 16),
                 cv2.imencode(".jpg", gray)[1].tobytes(), cv2.imencode(".jpg", rgb)[1].tobytes(),
                 cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes(),
                 _dicom(12, 16, gray16.astype("<u2").tobytes()),
                 _dicom(12, 16, gray16.astype("<u2").tobytes(), "MONOCHROME1", WindowCenter=2048, WindowWidth=1000),
                 _dicom(12, 16, gray16.astype("<u2").tobytes(), RescaleSlope=2, RescaleIntercept=-100)]
        buf = io.BytesIO()
        Image.fromarray(gray).convert("P").save(buf, format="PNG", transparency=3)
        seeds.append(buf.getvalue())
        _SEEDS.extend(seeds)
    return _SEEDS


def _mutate(example: tuple) -> bytes:
    data, flips, cut = example
    out = bytearray(data)
    for pos, value in flips:
        if out:
            out[pos % len(out)] = value
    if cut is not None:
        out = out[: cut % (len(out) + 1)]
    return bytes(out)


def image_bytes() -> st.SearchStrategy:
    seeds = st.sampled_from(image_seeds())
    return st.one_of(
        st.binary(max_size=512),
        st.tuples(st.sampled_from([PNG_MAGIC, JPEG_MAGIC, b"\0" * 128 + b"DICM", b"\xff\xd8", b"GIF89a", b""]),
                  st.binary(max_size=512)).map(b"".join),
        seeds,
        seeds.flatmap(lambda s: st.integers(0, len(s)).map(lambda n: s[:n])),  # truncated
        st.tuples(seeds, st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=6),
                  st.none() | st.integers(0, 1 << 20)).map(_mutate),  # bit flips, maybe truncated
        st.builds(_png_header, st.integers(0, 300), st.integers(0, 300), st.sampled_from([1, 2, 4, 8, 16, 3, 0]),
                  st.sampled_from([0, 2, 3, 4, 6, 1, 7]),
                  st.one_of(st.binary(max_size=300).map(lambda b: _chunk(b"IDAT", zlib.compress(b)) + _chunk(b"IEND", b"")),
                            st.binary(max_size=300))),
        st.builds(_jpeg_header, st.integers(0, 300), st.integers(0, 300), st.binary(max_size=300)),
    )


def _mangled_dicoms() -> list[bytes]:
    """DICOM headers the long fuzzing run once crashed on (each used to raise something else than ImageError)."""
    pixels = np.arange(12 * 16, dtype="<u2").tobytes()
    good = _dicom(12, 16, pixels, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=100, WindowWidth=50)
    return [
        good.replace(b"(\x00\x10\x00US", b"(\x00\x10\x00U\x00"),  # Rows with an unknown VR (decoded lazily)
        good.replace(b"DS\x06\x00-100.0", b"DS\x06\x00-1\x0000."),  # RescaleIntercept not a number
        good.replace(b"DS\x06\x00100.0 ", b"DS\x06\x00\x0000.0 "),  # WindowCenter not a number
        good.replace(b"(\x00\x10\x00US\x02\x00\x0c\x00", b"(\x00\x10\x00IS\x02\x00  "),  # Rows blank
        good.replace(b"(\x00\x10\x00US\x02\x00\x0c\x00", b"(\x00\x10\x00IS\x02\x001\\"),  # Rows two values
    ]


@target("image_decoding", image_bytes, examples=_mangled_dicoms)
def check_image_decoding(data: bytes, _ctx: Any) -> None:
    try:
        img = read_xray_bytes(data, "<upload>")
    except ImageError as e:
        assert _message(e).startswith("<upload>: ")
        return
    assert isinstance(img, np.ndarray) and img.ndim == 2 and img.size > 0
    assert img.dtype in (np.uint8, np.uint16)


def _over_limit(width: int, height: int) -> bool:
    return width <= 0 or height <= 0 or width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS


def huge_headers() -> st.SearchStrategy:
    big = st.one_of(st.integers(MAX_SIDE + 1, 65535), st.integers(MAX_PIXELS // MAX_SIDE + 1, MAX_SIDE),
                    st.just(0), st.integers(1, 65535))
    dims16 = st.tuples(big, big).filter(lambda wh: _over_limit(*wh))
    dims32 = st.tuples(big | st.integers(0, 2 ** 32 - 1), big | st.integers(0, 2 ** 32 - 1)).filter(
        lambda wh: _over_limit(*wh))
    tail = st.binary(max_size=200)
    return st.one_of(
        st.builds(lambda wh, bd, ct, rest: ("png", wh, _png_header(wh[0], wh[1], bd, ct, rest)),
                  dims32, st.sampled_from([1, 8, 16]), st.sampled_from([0, 2, 4, 6]),
                  tail.map(lambda b: _chunk(b"IDAT", zlib.compress(b)) + _chunk(b"IEND", b""))),
        st.builds(lambda wh, rest: ("jpeg", wh, _jpeg_header(wh[0], wh[1], rest)), dims16, tail),
        st.builds(lambda wh, px: ("dicom", wh, _dicom(wh[1], wh[0], px)), dims16, st.none() | st.binary(max_size=64)),
    )


@contextlib.contextmanager
def _no_pixel_decoding() -> Iterator[None]:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("pixels decoded although the declared size is above the limits")

    with mock.patch.object(images_module, "_decode_pil", refuse), \
            mock.patch.object(images_module, "_decode_png16_color", refuse), \
            mock.patch.object(images_module, "_decode_dicom", refuse):
        yield None


@target("image_size_guard", huge_headers, context=_no_pixel_decoding)
def check_image_size_guard(example: tuple, _ctx: Any) -> None:
    kind, (width, height), data = example
    with pytest.raises(ImageError) as err:
        read_xray_bytes(data, "<upload>")
    message = _message(err.value)
    assert "declares" in message and "<upload>" in message, (kind, width, height, message)


def _enhance_chunks() -> st.SearchStrategy:
    return st.lists(st.one_of(st.binary(max_size=80), deeply_nested.map(lambda b: b[:60_000]),
                              json_values.map(lambda v: json.dumps(v).encode())), min_size=1, max_size=3)


@target("enhance_stored_params", _enhance_chunks, context=lambda: tempfile.TemporaryDirectory(prefix="ifnet-fuzz-"))
def check_enhance_stored_params(texts: list, tmp: str) -> None:
    """The parameters chunk `ifnet enhance` reads back from its own (or, in place, the input's) PNGs."""
    from ifnet.iec.enhance import PARAMS_KEYWORD, _png_chunk, encode_png, read_stored_info

    png = encode_png(np.zeros((4, 4), np.uint8), {"params": {}})
    extra = b"".join(_png_chunk(b"tEXt", PARAMS_KEYWORD + b"\x00" + t) for t in texts)
    path = Path(tmp) / "x.png"
    path.write_bytes(png[:33] + extra + png[33:])
    info = read_stored_info(path)
    assert info is None or isinstance(info, dict)


# -- checkpoint JSON files --------------------------------------------------------------------------------

@contextlib.contextmanager
def _tiny_checkpoint() -> Iterator[Path]:
    import torch

    from ifnet.models.checkpoint import save_checkpoint

    from test_reliability_support import tiny_cnn, tiny_ifnet

    with tiny_cnn(), tempfile.TemporaryDirectory(prefix="ifnet-fuzz-ckpt-") as tmp:
        model, config, tok = tiny_ifnet()
        optim = torch.optim.Adam(model.parameters())
        model(torch.zeros(1, 2, 3, 64, 64), torch.ones(1, 2, dtype=torch.bool), torch.tensor([[1, 4, 2]]),
              torch.zeros(1, NUM_OBSERVATIONS)).logits.sum().backward()
        optim.step()
        state = {"epoch": 1, "optimizer": optim.state_dict(), "rng": {"torch": torch.get_rng_state()},
                 "best": float("-inf"), "pairs": (1, "a")}
        root = Path(tmp)
        save_checkpoint(root / "pristine", model, config, tok, training_state=state, metadata={"epoch": 1})
        yield root


def _edit(doc: Any, path: list, value: Any) -> Any:
    """``doc`` with the node reached by following ``path`` (indices taken modulo sizes) set to ``value``."""
    if not path or not isinstance(doc, (dict, list)) or not doc:
        return value
    if isinstance(doc, dict):
        key = sorted(doc)[path[0] % len(doc)]
        return {**doc, key: _edit(doc[key], path[1:], value)}
    i = path[0] % len(doc)
    return doc[:i] + [_edit(doc[i], path[1:], value)] + doc[i + 1:]


small_json = st.recursive(st.none() | st.booleans() | st.integers(-2, 64) | st.floats(-2, 64)
                          | st.text(max_size=10) | st.sampled_from(["__tensor__", "__items__", "__tuple__", "0:"]),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                              st.sampled_from(["__tensor__", "__ndarray__", "__tuple__", "__items__", "__float__",
                                               "state", "format", "version", "a"]) | st.text(max_size=6),
                              inner, max_size=3), max_leaves=8)
checkpoint_edits = st.tuples(
    st.sampled_from(["config.json", "vocab.json", "training_state.json", "meta.json"]),
    st.lists(st.integers(0, 50), max_size=6),
    small_json,
    st.booleans(),  # True: also fix meta.json's sha256 so the parsers behind it are reached
)


@target("checkpoint_files", lambda: checkpoint_edits, context=_tiny_checkpoint)
def check_checkpoint_files(example: tuple, root: Path) -> None:
    import hashlib

    from ifnet.models.checkpoint import load_checkpoint, load_training_state

    name, path, value, fix_checksum = example
    work = root / "work"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(root / "pristine", work)
    doc = json.loads((work / name).read_text())
    (work / name).write_text(json.dumps(_edit(doc, path, value)))
    if fix_checksum and name != "meta.json":
        meta = json.loads((work / "meta.json").read_text())
        data = (work / name).read_bytes()
        meta["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        (work / "meta.json").write_text(json.dumps(meta))
    try:
        load_checkpoint(work)
        load_training_state(work)
    except IFNetError as e:
        _message(e)


# -- the REST API ------------------------------------------------------------------------------------------

def _serve_available() -> Optional[str]:
    try:
        import fastapi.testclient  # noqa: F401

        import ifnet.serve.app  # noqa: F401
    except ImportError as e:
        return f"the REST API cannot be imported here: {e}"
    return None


API_LIMIT = 64 * 1024  # a small upload cap, so that oversized bodies (413) are reachable


@contextlib.contextmanager
def _api_client() -> Iterator[Any]:
    """The ASGI app on a tiny untrained checkpoint (CLAHE on, beam 1, 8 tokens), via the test client."""
    from fastapi.testclient import TestClient

    from ifnet.config import resolve, to_dict
    from ifnet.inference import Predictor
    from ifnet.models.checkpoint import save_checkpoint
    from ifnet.serve import ServeLimits, create_app
    from ifnet.train.config import TrainConfig

    from test_reliability_support import TINY_TRAIN, tiny_cnn, tiny_ifnet

    with tiny_cnn(), tempfile.TemporaryDirectory(prefix="ifnet-fuzz-api-") as tmp:
        model, config, tok = tiny_ifnet()
        train_cfg = to_dict(resolve(TrainConfig, None, TINY_TRAIN + ["data.iec=clahe"]))
        ckpt = save_checkpoint(Path(tmp) / "ckpt", model, config, tok, metadata={"train_config": train_cfg})
        app = create_app(Predictor(ckpt, device="cpu"), ServeLimits(max_upload_bytes=API_LIMIT, queue_size=4))
        with TestClient(app, raise_server_exceptions=True) as client:
            yield client


FIELD_NAMES = ["frontal", "lateral", "findings", "heatmap", "Frontal", "frontal ", "", "x", 'fr"ontal',
               "frontal\r\nX-Injected: 1", "ñ", "frontal[]"]
FILE_NAMES = [None, "chest.png", "../../etc/passwd", "..\\..\\windows\\win.ini", "/abs/path.dcm", "C:\\x.jpg",
              "a\x00b.png", "\u202egnp.exe", "x" * 300, "", ".", "..", "con", "a/b/c.png", "ok\r\nX: y.png"]
FINDINGS_TEXT = ["", "Cardiomegaly", "cardiomegaly, pleural effusion", "No Finding", "Cardiomegaly,,",
                 "Support Devices, Fracture", "Bogus", "Cardiomegaly, Bogus", " , ", "\u00e9dema"]


def _oddly_shaped_pngs() -> list[bytes]:
    return [_png(np.zeros((1, 1), np.uint8), 0, 8), _png(np.full((1, 3000), 200, np.uint8), 0, 8),
            _png(np.full((3000, 1), 50, np.uint8), 0, 8), _png(np.zeros((2, 2), np.uint16), 0, 16)]


def _api_requests() -> st.SearchStrategy:
    images = st.one_of(image_bytes(), st.sampled_from(image_seeds() + _oddly_shaped_pngs()),
                       st.binary(min_size=API_LIMIT, max_size=API_LIMIT + 512).map(lambda b: PNG_MAGIC + b))
    texts = st.sampled_from(FINDINGS_TEXT) | st.sampled_from(["true", "false", "yes", "0", "maybe", ""]) \
        | st.text(max_size=40)
    part = st.tuples(st.sampled_from(FIELD_NAMES) | st.text(max_size=12),
                     st.sampled_from(FILE_NAMES) | st.text(max_size=20),
                     st.one_of(images, texts.map(lambda t: t.encode("utf-8", "replace")), st.binary(max_size=40)))
    well_formed = st.tuples(
        st.tuples(st.just("frontal"), st.sampled_from(FILE_NAMES), images),
        st.lists(st.tuples(st.sampled_from(["lateral", "findings", "heatmap"]), st.sampled_from(FILE_NAMES),
                           st.one_of(images, texts.map(lambda t: t.encode("utf-8", "replace")))), max_size=3),
    ).map(lambda fl: [fl[0], *fl[1]])
    boundary = st.sampled_from([b"fuzzboundary", b"x", b"-" * 70, b"a b"])
    content_type = st.one_of(
        boundary.map(lambda b: "multipart/form-data; boundary=" + b.decode()),
        st.sampled_from(["multipart/form-data", "application/json", "image/png", "text/plain", "",
                         "multipart/form-data; boundary=", "multipart/mixed; boundary=fuzzboundary"]),
        st.text(max_size=30),
    )
    body = st.one_of(
        st.tuples(st.lists(part, max_size=4) | well_formed, boundary, st.booleans()).map(
            lambda pbc: ("parts", pbc)),
        st.binary(max_size=600).map(lambda b: ("raw", b)),
    )
    query = st.sampled_from(["", "?include_images=true", "?include_images=false", "?include_images=maybe",
                             "?include_images=1&x=%00", "?include_images=" + "9" * 40])
    anything = st.tuples(body, content_type, query, st.booleans())
    # Requests a client would send (mostly answered 200), so that decoding, inference and rendering run too.
    good_images = st.sampled_from(image_seeds() + _oddly_shaped_pngs())
    valid = st.tuples(
        st.tuples(st.tuples(st.just("frontal"), st.sampled_from(FILE_NAMES), good_images),
                  st.lists(st.one_of(st.tuples(st.just("lateral"), st.sampled_from(FILE_NAMES), good_images),
                                     st.tuples(st.just("findings"), st.none(),
                                               st.sampled_from(FINDINGS_TEXT[:6]).map(str.encode)),
                                     st.tuples(st.just("heatmap"), st.none(), st.sampled_from([b"true", b"false"]))),
                           max_size=3, unique_by=lambda part: part[0]))
        .map(lambda fl: ("parts", ([fl[0], *fl[1]], b"fuzzboundary", True))),
        st.just(""), st.sampled_from(["", "?include_images=true"]), st.just(True))
    return st.one_of(valid, anything)


def _multipart(parts: list, boundary: bytes, close: bool) -> bytes:
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + ("" if filename is None else f'; filename="{filename}"')
        out += (b"--" + boundary + b"\r\nContent-Disposition: " + disposition.encode("utf-8", "replace")
                + b"\r\n\r\n" + data + b"\r\n")
    return out + (b"--" + boundary + b"--\r\n" if close else b"")


@target("rest_api", _api_requests, context=_api_client, available=_serve_available)
def check_rest_api(example: tuple, client: Any) -> None:
    (kind, payload), content_type, query, matching_boundary = example
    if kind == "parts":
        parts, boundary, close = payload
        body = _multipart(parts, boundary, close)
        if matching_boundary:
            content_type = "multipart/form-data; boundary=" + boundary.decode()
    else:
        body = payload
    headers = {"content-type": content_type.encode("utf-8", "replace")} if content_type else {}
    response = client.post("/v1/reports" + query, content=body, headers=headers)
    assert response.status_code in (200, 400, 413, 415, 422), (response.status_code, response.text[:500])
    doc = response.json()
    if response.status_code != 200:
        assert isinstance(doc.get("error"), str) and doc["error"].strip()
        return
    assert isinstance(doc["report"], str)
    assert set(doc["findings"]) == set(OBSERVATIONS) and all(0 <= v <= 1 for v in doc["findings"].values())
    for view in doc["views"]:  # a client's file name never keeps a path (and nothing is written to disk)
        name = view["filename"]
        assert name is None or not any(c in name for c in "/\\\x00\r\n"), name


# -- the test -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_target(name: str) -> None:
    reason = TARGETS[name].available()
    if reason:
        pytest.skip(reason)
    assert run_target(name, CI_EXAMPLES) > 0
