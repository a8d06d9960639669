"""`ifnet convert-openi`: hand-written OpenI XMLs and Kaggle CSVs, and the check against R2Gen's file."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Optional, Sequence

import pytest

from ifnet.cli import main
from ifnet.data.openi import (ConvertOptions, assign_splits, convert, detect_layout, kaggle_filename,
                              parse_openi_xml, read_kaggle_reports, read_openi_reports, read_projections,
                              study_id_from_image_id)
from ifnet.errors import DataError, UsageError


def make_xml(uid: int, findings: Optional[str] = "Heart normal.", impression: Optional[str] = "No disease.",
             images: Sequence[str] = ("1001", "2001"), prefix: str = "") -> bytes:
    """An OpenI report XML in the real file's shape; images are suffixes of CXR<uid>_IM-<uid:04d>-."""
    def section(label: str, text: Optional[str]) -> str:
        return f'<AbstractText Label="{label}">{text}</AbstractText>' if text is not None else \
            f'<AbstractText Label="{label}"/>'
    parents = "".join(f'<parentImage id="CXR{uid}_{prefix}IM-{uid:04d}-{s}"><figureId>F1</figureId>'
                      "</parentImage>" for s in images)
    return (f'<?xml version="1.0" encoding="utf-8"?>\n<eCitation><uId id="CXR{uid}"/>'
            f"<MedlineCitation><Article><Abstract>{section('COMPARISON', 'None.')}"
            f"{section('FINDINGS', findings)}{section('IMPRESSION', impression)}</Abstract></Article>"
            f"</MedlineCitation>{parents}</eCitation>").encode()


def write_tgz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_xml_dir(folder: Path, xmls: dict[int, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for uid, data in xmls.items():
        (folder / f"{uid}.xml").write_bytes(data)
    return folder


def entries(annotation: dict) -> dict[str, dict]:
    return {e["id"]: e for split in ("train", "val", "test") for e in annotation[split]}


def reasons(result) -> dict[str, str]:
    return {s.study_id: s.reason for s in result.skipped}


# -- ids, names and parsing ---------------------------------------------------------------------
@pytest.mark.parametrize("image_id, study_id", [
    ("CXR2384_IM-0942-1001", "CXR2384_IM-0942"),
    ("CXR2056_IM-0694-1001-0001", "CXR2056_IM-0694-1001"),  # R2Gen keeps the extra group
    ("CXR1_1_IM-0001-3001", "CXR1_1_IM-0001"),
])
def test_study_id_is_first_image_without_last_group(image_id, study_id):
    assert study_id_from_image_id(image_id) == study_id


def test_kaggle_filename_matches_on_the_im_part():
    assert kaggle_filename("1", "CXR1_1_IM-0001-4001") == "1_IM-0001-4001.dcm.png"
    assert kaggle_filename("2384", "CXR2384_IM-0942-1001") == "2384_IM-0942-1001.dcm.png"


def test_parse_xml_sorts_images_and_strips_text():
    study = parse_openi_xml(make_xml(7, findings="  Lungs clear.  ", images=("3001", "1001")), "r.xml")
    assert study.uid == "7"
    assert study.image_ids == ("CXR7_IM-0007-1001", "CXR7_IM-0007-3001")
    assert (study.findings, study.impression) == ("Lungs clear.", "No disease.")
    assert study.study_id == "CXR7_IM-0007"


# -- kept studies, reasons, sections, views ------------------------------------------------------
def test_convert_keeps_r2gen_rule_and_lists_the_rest(tmp_path):
    folder = write_xml_dir(tmp_path / "xml", {
        1: make_xml(1, findings="A  b.", images=("2001", "1001")),   # kept; inner spacing kept verbatim
        2: make_xml(2, images=("1001",)),                          # one image
        3: make_xml(3, findings=None),                             # empty FINDINGS
        4: make_xml(4, images=("4001", "1001", "3001")),           # kept, first two ids in order
        5: make_xml(5, images=()),                                 # no image at all
    })
    result = convert(read_openi_reports(folder), ConvertOptions(fractions=(1.0, 0.0, 0.0)))
    kept = entries(result.annotation)
    assert sorted(kept) == ["CXR1_IM-0001", "CXR4_IM-0004"]
    assert kept["CXR1_IM-0001"] == {"id": "CXR1_IM-0001", "report": "A  b.", "split": "train",
                                    "image_path": ["CXR1_IM-0001/0.png", "CXR1_IM-0001/1.png"]}
    assert reasons(result) == {"CXR2_IM-0002": "fewer than 2 images", "CXR3_IM-0003": "empty FINDINGS",
                               "CXR5": "fewer than 2 images"}
    openi = convert(read_openi_reports(folder), ConvertOptions(layout="openi"))
    assert entries(openi.annotation)["CXR4_IM-0004"]["image_path"] == ["CXR4_IM-0004-1001.png",
                                                                       "CXR4_IM-0004-3001.png"]


@pytest.mark.parametrize("section, report, skipped", [
    ("findings", "F.", {"CXR2_IM-0002": "empty FINDINGS"}),
    ("impression", "I.", {"CXR3_IM-0003": "empty IMPRESSION"}),
    ("both", "F. I.", {}),
])
def test_section_choice(tmp_path, section, report, skipped):
    folder = write_xml_dir(tmp_path, {1: make_xml(1, "F.", "I."), 2: make_xml(2, None, "I2."),
                                      3: make_xml(3, "F3.", "")})
    result = convert(read_openi_reports(folder), ConvertOptions(section=section))
    assert entries(result.annotation)["CXR1_IM-0001"]["report"] == report
    assert reasons(result) == skipped
    if section == "both":  # whichever section is present stands alone
        assert entries(result.annotation)["CXR2_IM-0002"]["report"] == "I2."


def test_projection_rule_puts_frontal_first_and_needs_both_views(tmp_path):
    folder = write_xml_dir(tmp_path / "xml", {1: make_xml(1, images=("1001", "2001")),
                                              2: make_xml(2, images=("1001", "2001")),
                                              3: make_xml(3, images=("1001", "2001", "3001"))})
    projections = {"1_IM-0001-1001.dcm.png": "Lateral", "1_IM-0001-2001.dcm.png": "Frontal",
                   "2_IM-0002-1001.dcm.png": "Lateral", "2_IM-0002-2001.dcm.png": "Lateral",
                   "3_IM-0003-1001.dcm.png": "Frontal", "3_IM-0003-3001.dcm.png": "Lateral"}
    result = convert(read_openi_reports(folder),
                     ConvertOptions(layout="kaggle", views="projection", projections=projections))
    kept = entries(result.annotation)
    assert kept["CXR1_IM-0001"]["image_path"] == ["1_IM-0001-2001.dcm.png", "1_IM-0001-1001.dcm.png"]
    assert kept["CXR3_IM-0003"]["image_path"] == ["3_IM-0003-1001.dcm.png", "3_IM-0003-3001.dcm.png"]
    assert reasons(result) == {"CXR2_IM-0002": "no frontal image"}
    with pytest.raises(UsageError, match="projections"):
        ConvertOptions(views="projection")


# -- images ---------------------------------------------------------------------------------------
def test_detect_layout(tmp_path):
    (tmp_path / "openi").mkdir()
    (tmp_path / "openi" / "CXR1_1_IM-0001-4001.png").write_bytes(b"")
    (tmp_path / "kaggle").mkdir()
    (tmp_path / "kaggle" / "1_IM-0001-4001.dcm.png").write_bytes(b"")
    (tmp_path / "r2gen" / "CXR1_1_IM-0001").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    assert [detect_layout(tmp_path / n) for n in ("openi", "kaggle", "r2gen")] == ["openi", "kaggle", "r2gen"]
    with pytest.raises(DataError, match="no IU-Xray images found"):
        detect_layout(tmp_path / "empty")
    with pytest.raises(DataError, match="not found"):
        detect_layout(tmp_path / "nowhere")


@pytest.mark.parametrize("layout", ["openi", "r2gen"])
def test_studies_with_missing_images_are_skipped(tmp_path, layout):
    folder = write_xml_dir(tmp_path / "xml", {1: make_xml(1), 2: make_xml(2)})
    images = tmp_path / "images"
    images.mkdir()
    if layout == "openi":
        for name in ("CXR1_IM-0001-1001.png", "CXR1_IM-0001-2001.png", "CXR2_IM-0002-1001.png"):
            (images / name).write_bytes(b"png")
    else:
        for name in ("CXR1_IM-0001/0.png", "CXR1_IM-0001/1.png", "CXR2_IM-0002/0.png"):
            (images / name).parent.mkdir(exist_ok=True)
            (images / name).write_bytes(b"png")
    result = convert(read_openi_reports(folder), ConvertOptions(layout=layout, images_dir=images))
    assert list(entries(result.annotation)) == ["CXR1_IM-0001"]
    [skip] = result.skipped
    assert skip.reason == "image file missing"
    assert skip.detail == ("CXR2_IM-0002-2001.png" if layout == "openi" else "CXR2_IM-0002/1.png")


# -- split ----------------------------------------------------------------------------------------
def test_split_is_deterministic_with_exact_fractions():
    ids = [f"CXR{i}_IM-{i:04d}" for i in range(1000)]
    split = assign_splits(ids, seed=3)
    assert split == assign_splits(list(reversed(ids)), seed=3)  # input order does not matter
    assert sorted(split.values()).count("train") == 700
    assert list(split.values()).count("val") == 100 and list(split.values()).count("test") == 200
    other = assign_splits(ids, seed=4)
    assert sum(split[i] != other[i] for i in ids) > 300  # another seed is another split
    halves = assign_splits(ids, seed=3, fractions=(0.5, 0.5, 0.0))
    assert list(halves.values()).count("train") == 500 and "test" not in halves.values()


def test_adding_a_study_moves_only_boundary_studies():
    ids = [f"CXR{i}_IM-{i:04d}" for i in range(500)]
    before, after = assign_splits(ids, seed=0), assign_splits(ids + ["CXR9999_IM-9999"], seed=0)
    assert sum(before[i] != after[i] for i in ids) <= 2


@pytest.mark.parametrize("fractions", [(0.7, 0.1, 0.1), (0.7, 0.4, -0.1), (1.0, 0.0)])
def test_bad_fractions_are_refused(fractions):
    with pytest.raises(UsageError):
        assign_splits(["a"], seed=0, fractions=fractions)


# -- bad and hostile input -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../evil.xml", "/etc/evil.xml"])
def test_archive_with_escaping_member_is_refused(tmp_path, name):
    tgz = write_tgz(tmp_path / "r.tgz", {"ecgen-radiology/1.xml": make_xml(1), name: make_xml(2)})
    with pytest.raises(DataError, match="absolute or '..' path"):
        read_openi_reports(tgz)


def test_doctype_and_entities_are_refused(tmp_path):
    bomb = (b'<?xml version="1.0"?><!DOCTYPE e [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]>'
            b'<eCitation><uId id="CXR1"/>&b;</eCitation>')
    with pytest.raises(DataError, match="DOCTYPE"):
        parse_openi_xml(bomb, "bomb.xml")
    with pytest.raises(DataError, match="DOCTYPE"):  # the same in UTF-16, where a byte search would miss it
        parse_openi_xml(bomb.decode().replace('version="1.0"', 'version="1.0" encoding="utf-16"')
                        .encode("utf-16"), "bomb16.xml")


def test_missing_uid_names_file_and_field():
    with pytest.raises(DataError) as info:
        parse_openi_xml(b"<eCitation><uId/></eCitation>", "x.xml")
    assert str(info.value).startswith("x.xml: field 'uId':")


def test_malformed_xml_is_one_line_error_naming_the_member(tmp_path, capsys):
    tgz = write_tgz(tmp_path / "r.tgz", {"ecgen-radiology/1.xml": make_xml(1),
                                         "ecgen-radiology/2.xml": b"<eCitation><uId id='CXR2'></eCitation>"})
    out = tmp_path / "a.json"
    assert main(["convert-openi", "--reports", str(tgz), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "ecgen-radiology/2.xml" in err and "malformed XML" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [tgz]  # nothing half-written


def test_not_an_archive_and_missing_path(tmp_path):
    junk = tmp_path / "junk.tgz"
    junk.write_bytes(b"not a tar at all")
    with pytest.raises(DataError, match="not a tar archive"):
        read_openi_reports(junk)
    with pytest.raises(DataError, match="not found"):
        read_openi_reports(tmp_path / "missing.tgz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no OpenI report XMLs"):
        read_openi_reports(tmp_path / "empty")


# -- Kaggle CSV form -------------------------------------------------------------------------------
def write_kaggle(folder: Path) -> tuple[Path, Path]:
    reports, projections = folder / "indiana_reports.csv", folder / "indiana_projections.csv"
    reports.write_text("uid,MeSH,Problems,image,indication,comparison,findings,impression\n"
                       '1,normal,normal,Xray,TB,None.,"Heart normal, lungs clear.",Normal.\n'
                       "2,normal,normal,Xray,TB,None.,,Normal.\n"
                       "3,normal,normal,Xray,TB,None.,One view only.,Normal.\n", encoding="utf-8")
    projections.write_text("uid,filename,projection\n1,1_IM-0001-4001.dcm.png,Frontal\n"
                           "1,1_IM-0001-3001.dcm.png,Lateral\n2,2_IM-0652-1001.dcm.png,Frontal\n"
                           "2,2_IM-0652-2001.dcm.png,Lateral\n3,3_IM-1384-1001.dcm.png,Frontal\n",
                           encoding="utf-8")
    return reports, projections


def test_kaggle_csv_form(tmp_path):
    reports, projections = write_kaggle(tmp_path)
    studies = read_kaggle_reports(reports, projections)
    # study 1's OpenI (and R2Gen) ids carry an extra "_1" that Kaggle's file names drop
    assert [s.image_ids for s in studies][0] == ("CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001")
    assert studies[1].image_ids == ("CXR2_IM-0652-1001", "CXR2_IM-0652-2001")
    result = convert(studies, ConvertOptions(layout="kaggle", views="projection",
                                             projections=read_projections(projections)))
    assert entries(result.annotation)["CXR1_1_IM-0001"]["image_path"] == ["1_IM-0001-4001.dcm.png",
                                                                          "1_IM-0001-3001.dcm.png"]
    assert entries(result.annotation)["CXR1_1_IM-0001"]["report"] == "Heart normal, lungs clear."
    assert reasons(result) == {"CXR2_IM-0652": "empty FINDINGS", "CXR3_IM-1384": "fewer than 2 images"}


def test_kaggle_csv_missing_column_names_file_and_field(tmp_path):
    reports, _ = write_kaggle(tmp_path)
    bad = tmp_path / "proj.csv"
    bad.write_text("uid,filename,view\n1,1_IM-0001-4001.dcm.png,Frontal\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"proj\.csv: field 'projection': missing column"):
        read_kaggle_reports(reports, bad)
    bad.write_text("uid,filename,projection\n1,1_IM-0001-4001.dcm.png,Oblique\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 2: 'Oblique' is not Frontal or Lateral"):
        read_projections(bad)


# -- the command end to end ------------------------------------------------------------------------
def test_cli_end_to_end_with_skipped_list_and_overwrite(tmp_path, capsys):
    tgz = write_tgz(tmp_path / "r.tgz", {f"ecgen-radiology/{i}.xml": make_xml(
        i, findings=None if i == 9 else f"Report {i}.") for i in range(1, 11)})
    out, skipped = tmp_path / "a.json", tmp_path / "skipped.tsv"
    argv = ["convert-openi", "--reports", str(tgz), "--out", str(out), "--skipped", str(skipped),
            "--seed", "1", "--fractions", "0.6,0.2,0.2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "9 studies (train 5, val 2, test 2)" in printed and "1 empty FINDINGS" in printed
    annotation = json.loads(out.read_text())
    assert sorted(annotation) == ["test", "train", "val"]
    assert all(e["split"] == split for split in annotation for e in annotation[split])
    header, row = skipped.read_text().splitlines()
    assert header.split("\t") == ["id", "source", "reason", "detail"]
    assert row.split("\t") == ["CXR9_IM-0009", f"{tgz}[ecgen-radiology/9.xml]", "empty FINDINGS", ""]

    before = out.read_bytes()
    assert main(argv) == 1  # refuses to overwrite, says how, and touches nothing
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert main(argv + ["--overwrite", "--seed", "2"]) == 0
    assert json.loads(out.read_text()) != annotation

    as_json = tmp_path / "skipped.json"
    assert main(argv[:5] + ["--out", str(tmp_path / "b.json"), "--skipped", str(as_json)]) == 0
    assert json.loads(as_json.read_text())[0]["reason"] == "empty FINDINGS"


def test_unterminated_quote_in_a_csv_is_an_error(tmp_path):
    reports, projections = write_kaggle(tmp_path)
    reports.write_text('uid,findings,impression\n1,"unterminated\n2,a,b\n', encoding="utf-8")
    with pytest.raises(DataError, match="malformed CSV: unexpected end of data"):
        read_kaggle_reports(reports, projections)


def test_cli_kaggle_form_finds_projections_beside_and_checks_images(tmp_path, capsys):
    reports, projections = write_kaggle(tmp_path)
    images = tmp_path / "images_normalized"
    images.mkdir()
    for name in ("1_IM-0001-4001.dcm.png", "1_IM-0001-3001.dcm.png", "3_IM-1384-1001.dcm.png"):
        (images / name).write_bytes(b"png")
    out = tmp_path / "a.json"
    assert main(["convert-openi", "--kaggle-csv", str(reports), "--images", str(images), "--out", str(out),
                 "--fractions", "0,0,1"]) == 0
    assert "layout kaggle, views by projection" in capsys.readouterr().out
    assert json.loads(out.read_text())["test"] == [{
        "id": "CXR1_1_IM-0001", "report": "Heart normal, lungs clear.", "split": "test",
        "image_path": ["1_IM-0001-4001.dcm.png", "1_IM-0001-3001.dcm.png"]}]
    projections.unlink()
    assert main(["convert-openi", "--kaggle-csv", str(reports), "--out", str(tmp_path / "b.json")]) == 2
    assert "pass --projections" in capsys.readouterr().err


def test_cli_missing_images_folder_is_a_data_error(tmp_path, capsys):
    folder = write_xml_dir(tmp_path / "xml", {1: make_xml(1)})
    assert main(["convert-openi", "--reports", str(folder), "--images", str(tmp_path / "nope"),
                 "--layout", "openi", "--out", str(tmp_path / "a.json")]) == 1
    assert "nope: images folder not found" in capsys.readouterr().err


def test_duplicate_study_and_unpacked_archive_folder(tmp_path):
    # The folder the archive unpacks into is found from its parent; the second copy of a study is listed.
    write_xml_dir(tmp_path / "ecgen-radiology", {1: make_xml(1, findings="First."), 2: make_xml(2)})
    (tmp_path / "ecgen-radiology" / "1b.xml").write_bytes(make_xml(1, findings="Second."))
    result = convert(read_openi_reports(tmp_path), ConvertOptions())
    assert entries(result.annotation)["CXR1_IM-0001"]["report"] == "First."
    [dup] = result.skipped
    assert (dup.study_id, dup.reason) == ("CXR1_IM-0001", "duplicate study id")
    assert dup.source.endswith("1b.xml") and dup.detail.endswith("1.xml")


def test_cli_nothing_kept_writes_nothing(tmp_path, capsys):
    folder = write_xml_dir(tmp_path / "xml", {1: make_xml(1, images=("1001",))})
    out = tmp_path / "a.json"
    assert main(["convert-openi", "--reports", str(folder), "--out", str(out)]) == 1
    assert "no study could be kept (1 fewer than 2 images)" in capsys.readouterr().err
    assert not out.exists()


def test_cli_bad_fractions_is_usage_error(tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["convert-openi", "--reports", str(tmp_path), "--out", str(tmp_path / "a.json"),
              "--fractions", "0.7,0.2,0.2"])
    assert info.value.code == 2


# -- the real thing --------------------------------------------------------------------------------
def test_real_openi_archive_reproduces_r2gen_reports(shared_dir, iu_annotation_path, tmp_path, capsys):
    raw = shared_dir / "data" / "iu_xray" / "raw" / "NLMCXR_reports.tgz"
    out = tmp_path / "annotation.json"
    assert main(["convert-openi", "--reports", str(raw), "--out", str(out),
                 "--split-from", str(iu_annotation_path)]) == 0
    reference = entries(json.loads(iu_annotation_path.read_text()))
    ours = entries(json.loads(out.read_text()))
    same = [i for i, e in reference.items() if i in ours and ours[i]["report"] == e["report"]]
    rate = len(same) / len(reference)
    with capsys.disabled():
        print(f"\nconvert-openi vs R2Gen annotation.json: {len(same)}/{len(reference)} ids with identical "
              f"report text ({rate:.2%}); {len(ours)} studies written")
    assert len(reference) == 2955 and rate >= 0.95
    # With --split-from the whole file matches, entry for entry.
    assert all(ours[i] == reference[i] for i in same)


def test_real_kaggle_csv_agrees_with_r2gen(shared_dir, iu_annotation_path):
    iu = shared_dir / "data" / "iu_xray"
    studies = read_kaggle_reports(iu / "indiana_reports.csv", iu / "indiana_projections.csv")
    reference_data = json.loads(iu_annotation_path.read_text())
    ours = entries(convert(studies, ConvertOptions()).annotation)
    reference = entries(reference_data)
    assert set(ours) == set(reference)  # CXR1_1_IM-0001 too, whose Kaggle file names lack OpenI's "_1"
    assert all(ours[i]["report"] == e["report"] for i, e in reference.items())
    split_from = {e["id"]: split for split, rows in reference_data.items() for e in rows}
    same_split = convert(studies, ConvertOptions(split_from=split_from)).annotation
    assert {k: sorted(e["id"] for e in v) for k, v in same_split.items()} == \
        {k: sorted(e["id"] for e in v) for k, v in reference_data.items()}
