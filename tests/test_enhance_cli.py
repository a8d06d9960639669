"""`ifnet enhance`: mirrored tree, lossless outputs, idempotent re-runs, IN_DIR safety, failures."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from ifnet.cli import main
from ifnet.data.images import read_xray
from ifnet.iec import CLAHE, build_enhancer
from ifnet.iec.enhance import EnhanceSettings, enhance_tree, read_stored_info


def _image(seed: int, dtype=np.uint8, shape=(40, 48)) -> np.ndarray:
    """A smooth ramp plus noise: something CLAHE visibly changes."""
    rng = np.random.default_rng(seed)
    r, c = np.mgrid[0:shape[0], 0:shape[1]]
    x = 60 + 2 * r + c + rng.integers(0, 20, size=shape)
    return (x * 257).astype(np.uint16) if dtype == np.uint16 else x.astype(np.uint8)


def _write_dicom(path: Path, pixels: np.ndarray) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "DX", 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(str(path), enforce_file_format=True)


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """IN_DIR with an 8-bit PNG, a 16-bit PNG in a subfolder, a JPEG, a DICOM and a text file."""
    root = tmp_path / "in"
    (root / "a" / "b").mkdir(parents=True)
    cv2.imwrite(str(root / "a" / "x.png"), _image(0))
    cv2.imwrite(str(root / "a" / "b" / "y.png"), _image(1, np.uint16))
    cv2.imwrite(str(root / "z.jpg"), _image(2), [cv2.IMWRITE_JPEG_QUALITY, 90])
    _write_dicom(root / "d.dcm", _image(3, shape=(32, 32)).astype(np.uint16) * 10)
    (root / "notes.txt").write_text("not an image\n")
    return root


EXPECTED = {"a/x.png": np.uint8, "a/b/y.png": np.uint16, "z.png": np.uint8, "d.png": np.uint16}
SOURCES = {"a/x.png": "a/x.png", "a/b/y.png": "a/b/y.png", "z.png": "z.jpg", "d.png": "d.dcm"}


def snapshot(root: Path) -> dict:
    """relative path -> (sha256, mtime_ns) of every file under root."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def enhance(*args: object) -> int:
    return main(["enhance", *map(str, args)])


def test_mirrors_tree_with_lossless_outputs(tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert enhance(tree, out) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == "enhanced 4, skipped 0 (up to date), failed 0"
    assert "ignored 1 non-image file" in captured.err
    assert sorted(snapshot(out)) == sorted(EXPECTED)  # notes.txt is not copied; no temp files left
    for rel, dtype in EXPECTED.items():
        written = read_xray(out / rel)
        assert written.dtype == dtype
        # The on-the-fly transform on the same input gives exactly the written pixels.
        np.testing.assert_array_equal(written, CLAHE()(read_xray(tree / SOURCES[rel])))
        assert read_stored_info(out / rel)["params"]["clip_limit"] == 1.7


def test_rerun_changes_nothing_and_in_dir_untouched(tree, tmp_path, capsys):
    out = tmp_path / "out"
    (tree / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # corrupt input in IN_DIR too
    before_in = snapshot(tree)
    assert enhance(tree, out) == 1
    after_first = snapshot(out)
    capsys.readouterr()
    assert enhance(tree, out, "--workers", "2") == 1
    assert capsys.readouterr().out.strip() == "enhanced 0, skipped 4 (up to date), failed 1"
    assert snapshot(out) == after_first  # same bytes, same mtimes
    assert snapshot(tree) == before_in


def test_corrupt_files_reported_others_written(tree, tmp_path, capsys):
    good = (tree / "a" / "x.png").read_bytes()
    (tree / "truncated.png").write_bytes(good[: len(good) // 2])
    (tree / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    out = tmp_path / "out"
    assert enhance(tree, out) == 1
    captured = capsys.readouterr()
    assert captured.out.strip() == "enhanced 4, skipped 0 (up to date), failed 2"
    failures = [line for line in captured.err.splitlines() if not line.startswith("ignored")]
    assert len(failures) == 2  # one line per bad file, each naming it
    assert any(str(tree / "truncated.png") in line for line in failures)
    assert any(str(tree / "garbage.jpg") in line for line in failures)
    assert all((out / rel).is_file() for rel in EXPECTED)
    assert not (out / "truncated.png").exists() and not (out / "garbage.png").exists()


@pytest.mark.parametrize("out_rel", [".", "enhanced", "a/deeper"])
def test_refuses_out_dir_equal_to_or_inside_in_dir(tree, out_rel, capsys):
    before = snapshot(tree)
    assert enhance(tree, tree / out_rel) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--in-place" in err and "IN_DIR" in err
    assert snapshot(tree) == before
    if out_rel != ".":
        assert not (tree / out_rel).exists()  # not even created


def test_refuses_output_folder_resolving_into_in_dir(tmp_path, capsys):
    # IN_DIR inside OUT_DIR, with a subfolder named like IN_DIR: OUT/raw/x.png would be IN/x.png.
    out = tmp_path / "data"
    in_dir = out / "raw"
    (in_dir / "raw").mkdir(parents=True)
    cv2.imwrite(str(in_dir / "raw" / "x.png"), _image(0))
    cv2.imwrite(str(in_dir / "x.png"), _image(1))
    before = snapshot(in_dir)
    assert enhance(in_dir, out) == 2
    assert "inside IN_DIR" in capsys.readouterr().err
    assert snapshot(in_dir) == before


def test_missing_in_dir_and_bad_options(tmp_path, capsys):
    assert enhance(tmp_path / "nope", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err == f"ifnet enhance: error: IN_DIR {tmp_path / 'nope'}: no such folder"
    for bad in (["--workers", "0"], ["--clip-limit", "0"], ["--clip-limit", "nan"], ["--tile-grid", "x"],
                ["--tile-grid", "100000"]):
        with pytest.raises(SystemExit) as info:
            enhance(tmp_path, tmp_path / "out", *bad)
        assert info.value.code == 2


def test_empty_in_dir_warns(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    assert enhance(tmp_path / "in", tmp_path / "out") == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == "enhanced 0, skipped 0 (up to date), failed 0"
    assert "warning: no .dcm/.dicom/.jpeg/.jpg/.png files found under" in captured.err


def test_changed_parameters_reprocess(tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert enhance(tree, out) == 0
    assert enhance(tree, out, "--clip-limit", "2.5") == 0
    assert enhance(tree, out, "--clip-limit", "2.5", "--tile-grid", "4") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["enhanced 4, skipped 0 (up to date), failed 0"] * 3
    np.testing.assert_array_equal(read_xray(out / "a/x.png"), CLAHE(2.5, 4)(read_xray(tree / "a/x.png")))


def test_newer_input_is_reprocessed(tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert enhance(tree, out) == 0
    cv2.imwrite(str(tree / "a" / "x.png"), _image(9))
    later = (out / "a" / "x.png").stat().st_mtime_ns + 10**9  # clearly newer than its output
    os.utime(tree / "a" / "x.png", ns=(later, later))
    capsys.readouterr()
    assert enhance(tree, out) == 0
    assert capsys.readouterr().out.strip() == "enhanced 1, skipped 3 (up to date), failed 0"
    np.testing.assert_array_equal(read_xray(out / "a/x.png"), CLAHE()(_image(9)))


def test_input_replaced_by_an_older_file_is_reprocessed(tree, tmp_path, capsys):
    # cp -p / rsync -a / a restore from backup: the new input is dated before the output, yet it changed
    out = tmp_path / "out"
    assert enhance(tree, out) == 0
    cv2.imwrite(str(tree / "a" / "x.png"), _image(9))
    os.utime(tree / "a" / "x.png", ns=(10**18, 10**18))  # 2001: older than everything
    capsys.readouterr()
    assert enhance(tree, out) == 0
    assert capsys.readouterr().out.strip() == "enhanced 1, skipped 3 (up to date), failed 0"
    np.testing.assert_array_equal(read_xray(out / "a/x.png"), CLAHE()(_image(9)))
    assert read_stored_info(out / "a/x.png")["source"]["mtime_ns"] == 10**18


def test_enhanced_outputs_are_not_enhanced_again(tree, tmp_path, capsys):
    out, again = tmp_path / "out", tmp_path / "again"
    assert enhance(tree, out) == 0
    capsys.readouterr()
    assert enhance(out, again) == 1
    captured = capsys.readouterr()
    assert captured.out.strip() == "enhanced 0, skipped 0 (up to date), failed 4"
    assert "is itself an output of ifnet enhance (CLAHE applied" in captured.err
    assert not again.exists() or not any(again.rglob("*.png"))
    # a lossless copy (mode none) did not apply CLAHE: enhancing it is the first CLAHE
    copy = tmp_path / "copy"
    assert enhance_tree(tree, copy, EnhanceSettings(mode="none")).failed == 0
    assert enhance(copy, tmp_path / "from_copy") == 0
    np.testing.assert_array_equal(read_xray(tmp_path / "from_copy" / "a/x.png"), read_xray(out / "a/x.png"))


def test_unreadable_subfolder_is_a_failure(tree, tmp_path, capsys, monkeypatch):
    # (root ignores permission bits, so the listing error is injected where os.walk lists folders)
    real = os.scandir
    locked = tree / "a" / "b"

    def scandir(path="."):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "out"
    assert enhance(tree, out) == 1
    captured = capsys.readouterr()
    assert captured.out.strip() == "enhanced 3, skipped 0 (up to date), failed 1"
    assert f"{locked}: cannot list this folder (Permission denied); its images were not enhanced" in captured.err


def test_foreign_file_in_out_dir_is_kept_unless_overwrite(tree, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    theirs = out / "a" / "x.png"
    cv2.imwrite(str(theirs), _image(7))  # the user's own image where an output would go
    later = (tree / "a" / "x.png").stat().st_mtime_ns + 10**9  # newer than the input: still not ours
    os.utime(theirs, ns=(later, later))
    before = snapshot(out)
    assert enhance(tree, out) == 1
    captured = capsys.readouterr()
    assert captured.out.strip() == "enhanced 3, skipped 0 (up to date), failed 1"
    [line] = [l for l in captured.err.splitlines() if str(theirs) in l]
    assert "not written by ifnet enhance" in line and "--overwrite" in line
    assert snapshot(out)["a/x.png"] == before["a/x.png"]  # same bytes, same mtime
    assert enhance(tree, out) == 1  # a re-run still refuses
    capsys.readouterr()
    assert enhance(tree, out, "--overwrite") == 0
    assert capsys.readouterr().out.strip() == "enhanced 1, skipped 3 (up to date), failed 0"
    np.testing.assert_array_equal(read_xray(theirs), CLAHE()(read_xray(tree / "a" / "x.png")))
    assert enhance(tree, out) == 0  # now ours: up to date


def test_name_collision_fails_both(tree, tmp_path, capsys):
    cv2.imwrite(str(tree / "z.png"), _image(5))  # z.jpg and z.png both map to z.png
    out = tmp_path / "out"
    assert enhance(tree, out) == 1
    captured = capsys.readouterr()
    assert captured.out.strip() == "enhanced 3, skipped 0 (up to date), failed 2"
    assert captured.err.count("rename one") == 2 and not (out / "z.png").exists()


def test_in_place_same_folder(tree, capsys):
    original = read_xray(tree / "a" / "x.png")
    jpeg = read_xray(tree / "z.jpg")
    assert enhance(tree, tree, "--in-place") == 0
    np.testing.assert_array_equal(read_xray(tree / "a" / "x.png"), CLAHE()(original))  # overwritten
    np.testing.assert_array_equal(read_xray(tree / "z.png"), CLAHE()(jpeg))  # written beside z.jpg
    state = snapshot(tree)
    capsys.readouterr()
    # Re-run: the outputs are recognised, not enhanced a second time (z.png is z.jpg's output).
    assert enhance(tree, tree, "--in-place") == 0
    assert capsys.readouterr().out.strip() == "enhanced 0, skipped 4 (up to date), failed 0"
    assert snapshot(tree) == state
    # Other parameters would apply CLAHE on top of CLAHE: refused per file, nothing rewritten.
    assert enhance(tree, tree, "--in-place", "--clip-limit", "3") == 1
    assert "apply CLAHE twice" in capsys.readouterr().err
    assert snapshot(tree)["a/x.png"] == state["a/x.png"]


def test_in_place_subfolder_outputs_are_not_inputs(tree, capsys):
    out = tree / "enhanced"
    assert enhance(tree, out, "--in-place") == 0
    assert enhance(tree, out, "--in-place") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["enhanced 4, skipped 0 (up to date), failed 0",
                     "enhanced 0, skipped 4 (up to date), failed 0"]
    assert sorted(snapshot(out)) == sorted(EXPECTED)


def test_adaptive_mode(tree, tmp_path, capsys):
    low = (100 + _image(7) % 41).astype(np.uint8)  # 100..140: judged low quality
    normal = np.tile(np.arange(256, dtype=np.uint8), (8, 1))  # full range: judged normal
    cv2.imwrite(str(tree / "low.png"), low)
    cv2.imwrite(str(tree / "normal.png"), normal)
    out = tmp_path / "out"
    assert enhance(tree, out, "--adaptive") == 0
    line = capsys.readouterr().out.strip()
    # The 4 ramps of the tree fixture (60..200) are low quality too; only normal.png is copied.
    assert line == ("enhanced 6, skipped 0 (up to date), failed 0; "
                    "adaptive: 5 judged low quality and enhanced, 1 written unchanged")
    adaptive = build_enhancer("adaptive")
    np.testing.assert_array_equal(read_xray(out / "low.png"), CLAHE()(low))
    np.testing.assert_array_equal(read_xray(out / "normal.png"), normal)
    assert read_stored_info(out / "normal.png")["clahe_applied"] is False
    for rel in EXPECTED:
        src = read_xray(tree / SOURCES[rel])
        np.testing.assert_array_equal(read_xray(out / rel), adaptive(src))
    assert read_stored_info(out / "low.png")["clahe_applied"] is True
    assert enhance(tree, out, "--mode", "clahe") == 0  # another mode: everything redone
    assert capsys.readouterr().out.strip() == "enhanced 6, skipped 0 (up to date), failed 0"


def test_workers_give_identical_bytes(tree, tmp_path, capsys):
    assert enhance(tree, tmp_path / "one", "--workers", "1", "--quiet") == 0
    assert enhance(tree, tmp_path / "two", "--workers", "2") == 0
    one, two = snapshot(tmp_path / "one"), snapshot(tmp_path / "two")
    assert {k: v[0] for k, v in one.items()} == {k: v[0] for k, v in two.items()}
    assert "img/s" not in capsys.readouterr().err  # stderr is not a TTY here: no progress bar


def test_library_progress_bar_goes_to_stderr(tree, tmp_path, capsys):
    summary = enhance_tree(tree, tmp_path / "out", EnhanceSettings(), progress=True)
    assert (summary.enhanced, summary.skipped, summary.failed, summary.ignored) == (4, 0, 0, 1)
    captured = capsys.readouterr()
    assert "4/4" in captured.err and captured.out == ""


def test_on_the_fly_equals_cli_on_real_images(iu_synth_images, tmp_path):
    """CLAHE(read_xray(p)) == read_xray(CLI output of p) on rendered IU-Xray stand-ins.

    IN_DIR holds symlinks to the shared files (read in place, never copied).
    """
    studies = sorted(p.name for p in iu_synth_images.iterdir())[:3]
    in_dir = tmp_path / "in"
    for sid in studies:
        (in_dir / sid).mkdir(parents=True)
        for view in ("0.png", "1.png"):
            (in_dir / sid / view).symlink_to(iu_synth_images / sid / view)
    for mode in ("clahe", "adaptive"):
        out = tmp_path / mode
        assert enhance(in_dir, out, "--mode", mode, "--workers", "2") == 0
        transform = build_enhancer(mode)
        applied = set()
        for sid in studies:
            for view in ("0.png", "1.png"):
                expected = transform(read_xray(iu_synth_images / sid / view))
                np.testing.assert_array_equal(read_xray(out / sid / view), expected)
                applied.add(read_stored_info(out / sid / view)["clahe_applied"])
        # The first studies mix a low-contrast one with normal ones, so adaptive takes both paths.
        assert applied == ({True, False} if mode == "adaptive" else {True})
