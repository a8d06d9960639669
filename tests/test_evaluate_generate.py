"""`ifnet evaluate`, `ifnet generate` and `ifnet reproduce` end to end with a tiny trained checkpoint."""

from __future__ import annotations

import io
import json
import shutil
import numpy as np
from pathlib import Path

import pytest

from ifnet.cli import main as cli_main
from ifnet.labels import OBSERVATIONS


def _data_of(checkpoint: Path) -> Path:
    return checkpoint.parent.parent / "data"


def test_evaluate_writes_predictions_metrics_and_page(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    assert cli_main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--no-meteor"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("BLEU_1", "BLEU_4", "ROUGE_L", "CIDEr", "CE_F1_macro", "CE_F1_macro_5"):
        assert isinstance(metrics[key], float)
    assert metrics["split"] == "test" and metrics["num_studies"] == 4
    preds = json.loads((out / "predictions.json").read_text())
    assert len(preds) == 4 and set(preds[0]["predicted_findings"]) == set(OBSERVATIONS)
    assert all(p["reference"] for p in preds)
    # each report against the condition it was decoded from (reference-free)
    for p in preds:
        assert set(p["condition"]) == set(OBSERVATIONS)
        assert set(p["consistency"]) == {"said", "unsupported", "unsaid"}
        held = {k for k, v in p["condition"].items() if v >= 0.5}
        assert set(p["consistency"]["unsaid"]) == held - set(p["consistency"]["said"]) - {"No Finding"}
        assert set(p["consistency"]["unsupported"]) == set(p["consistency"]["said"]) - held
    consistency = json.loads((out / "consistency.json").read_text())
    assert consistency["studies"] == 4 and consistency["split"] == "test"
    assert consistency["consistent_reports"] == sum(not p["consistency"]["unsupported"] and not p["consistency"]["unsaid"]
                                                    for p in preds)
    assert 0.0 <= consistency["F1_macro"] <= 1.0
    page = (out / "index.html").read_text()
    assert page.count("class='study'") == 4 and "data:image/png;base64," in page
    assert f"{consistency['consistent_reports']} of 4 reports say exactly the findings" in page
    # per study: the condition is what is highlighted, and what the report leaves unsaid is flagged
    assert "highlighted: the condition the report was decoded from" in page
    for p in preds:
        block = page.split(f"id='{p['id']}'")[1].split("class='study'")[0]
        held = {k for k, v in p["condition"].items() if v >= 0.5}
        assert {name for name in OBSERVATIONS if f"<span class='finding hi'>{name} " in block} == held
        if p["consistency"]["unsaid"]:
            assert "in the condition, not said by the report: " + ", ".join(p["consistency"]["unsaid"]) in block
    # outputs are not overwritten without --overwrite, any of them
    assert cli_main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--no-meteor"]) == 1
    other = tmp_path / "other"
    other.mkdir()
    (other / "predictions.json").write_text("mine")
    assert cli_main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--out", str(other), "--no-meteor"]) == 1
    assert (other / "predictions.json").read_text() == "mine" and not (other / "metrics.json").exists()
    assert "predictions.json: already exists" in capsys.readouterr().err


def test_evaluation_output_ignores_reference_reports(tiny_checkpoint, tmp_path):
    """Same images, different reference reports -> identical generated reports and findings."""
    data = _data_of(tiny_checkpoint)
    ann = json.loads((data / "annotation.json").read_text())
    for entry in ann["test"]:
        entry["report"] = "There is a large left pneumothorax. Cardiomegaly. Pacemaker in place."
    altered = tmp_path / "altered.json"
    altered.write_text(json.dumps(ann))
    outs = []
    for name, annotation in (("a", data / "annotation.json"), ("b", altered)):
        out = tmp_path / name
        assert cli_main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--annotation", str(annotation),
                         "--image-root", str(data / "images"), "--out", str(out), "--no-meteor"]) == 0
        outs.append(json.loads((out / "predictions.json").read_text()))
    a, b = outs
    assert [p["generated"] for p in a] == [p["generated"] for p in b]
    assert [p["predicted_findings"] for p in a] == [p["predicted_findings"] for p in b]
    assert [p["reference"] for p in a] != [p["reference"] for p in b]


def test_generate_text_json_heatmap_and_supplied_findings(tiny_checkpoint, tmp_path, capsys):
    images = _data_of(tiny_checkpoint) / "images" / "PHTE0000"
    heat = tmp_path / "heat.png"
    assert cli_main(["generate", "--checkpoint", str(tiny_checkpoint), str(images / "0.png"), str(images / "1.png"),
                     "--json", "--heatmap", str(heat)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert isinstance(doc["report"], str) and set(doc["findings"]) == set(OBSERVATIONS)
    assert doc["conditioned_on"] == "predicted" and doc["timings_ms"]["total"] > 0
    assert set(doc["consistency"]) == {"said", "unsupported", "unsaid"}
    held = {k for k, v in doc["condition"].items() if v >= 0.5} - {"No Finding"}
    assert set(doc["consistency"]["unsaid"]) == held - set(doc["consistency"]["said"])
    assert heat.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the map is of the most probable finding other than No Finding, and the image carries a caption band
    from PIL import Image

    findings = {k: v for k, v in doc["findings"].items() if k != "No Finding"}
    assert doc["heatmap_label"] == max(findings, key=findings.get)
    from ifnet.inference import HEATMAP_MIN_SIDE

    with Image.open(heat) as im, Image.open(images / "0.png") as xray:
        # drawn at a display size: a small phantom is scaled up to HEATMAP_MIN_SIDE on its longer side
        scale = max(1.0, HEATMAP_MIN_SIDE / max(xray.size))
        shown = round(xray.height * scale)
        assert im.width == round(xray.width * scale) and im.height > shown
        band = np.asarray(im.convert("L"))[shown:]
        assert band.max() > 200 and np.median(band) == 0  # light text on black
    assert doc["warnings"] == []
    # a radiologist's findings replace the predicted condition
    assert cli_main(["generate", "--checkpoint", str(tiny_checkpoint), str(images / "0.png"), "--json",
                     "--findings", "cardiomegaly, Pleural Effusion"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["conditioned_on"] == "supplied"
    assert doc["condition"]["Cardiomegaly"] == 1.0 and doc["condition"]["Pleural Effusion"] == 1.0
    assert doc["condition"]["Edema"] == 0.0
    # whatever the report leaves out of the supplied findings is flagged, in JSON and in the text output
    assert set(doc["consistency"]["unsaid"]) == {"Cardiomegaly", "Pleural Effusion"} - set(doc["consistency"]["said"])
    assert cli_main(["generate", "--checkpoint", str(tiny_checkpoint), str(images / "0.png"),
                     "--findings", "cardiomegaly, Pleural Effusion"]) == 0
    text = capsys.readouterr().out
    line = "in the condition but not said by the report: " + ", ".join(doc["consistency"]["unsaid"])
    assert (line in text) == bool(doc["consistency"]["unsaid"])
    assert ("said by the report but not in the condition" in text) == bool(doc["consistency"]["unsupported"])
    # the heatmap is not overwritten without --overwrite; unknown findings and bad images are one-line errors
    assert cli_main(["generate", "--checkpoint", str(tiny_checkpoint), str(images / "0.png"), "--heatmap", str(heat)]) == 1
    assert cli_main(["generate", "--checkpoint", str(tiny_checkpoint), str(images / "0.png"), "--findings", "gout"]) == 1
    bad = tmp_path / "x.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    assert cli_main(["generate", "--checkpoint", str(tiny_checkpoint), str(bad)]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "unknown observation 'gout'" in err and str(bad) in err
    # a heatmap name that is not .png, or a folder that cannot take it, is refused before the model runs
    assert cli_main(["generate", "--checkpoint", str(tiny_checkpoint), str(images / "0.png"),
                     "--heatmap", str(tmp_path / "h.jpg")]) == 2
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli_main(["generate", "--checkpoint", str(tiny_checkpoint), str(images / "0.png"),
                     "--heatmap", str(blocker / "h.png")]) == 1
    err = capsys.readouterr().err
    assert "give a file name ending in .png" in err and f"{blocker}: is a file" in err


def test_heatmap_overlay_is_drawn_at_a_display_size():
    from PIL import Image

    from ifnet.inference import HEATMAP_MAX_SIDE, HEATMAP_MIN_SIDE, heatmap_overlay_png

    for shape, expected in (((3000, 2400), (HEATMAP_MAX_SIDE * 2400 // 3000, HEATMAP_MAX_SIDE)),
                            ((100, 50), (HEATMAP_MIN_SIDE // 2, HEATMAP_MIN_SIDE)),
                            ((700, 600), (600, 700))):
        img = np.linspace(0, 65535, shape[0] * shape[1]).reshape(shape).astype(np.uint16)
        heat = np.zeros(shape, np.float32)
        heat[: shape[0] // 2] = 1.0  # upper half hot
        with Image.open(io.BytesIO(heatmap_overlay_png(img, heat))) as im:
            assert im.size == expected
            arr = np.asarray(im.convert("RGB")).astype(int)
        upper, lower = arr[: expected[1] // 4], arr[-expected[1] // 4:]
        assert (upper[..., 0] - upper[..., 2]).mean() > 40  # jet's red over the hot half
        assert np.abs(lower[..., 0] - lower[..., 2]).max() <= 1  # gray where the map is cold


def test_reproduce_reports_mean_and_std_over_seeds(tiny_checkpoint, tmp_path, capsys):
    from ifnet.serve.tiny_checkpoint import TINY_OVERRIDES

    data = _data_of(tiny_checkpoint)
    sets = [a for s in (*TINY_OVERRIDES, f"data.annotation={data / 'annotation.json'}",
                        f"data.image_root={data / 'images'}") for a in ("--set", s)]
    out = tmp_path / "repro"
    # a split the annotation lacks is found before any training
    assert cli_main(["reproduce", "--seeds", "2", "--no-meteor", "--out", str(out), "--split", "bogus", *sets]) == 1
    assert "bogus" in capsys.readouterr().err and not out.exists()
    assert cli_main(["reproduce", "--seeds", "2", "--no-meteor", "--out", str(out), *sets]) == 0
    # --resume with another config would mix two configs in one mean +- std: refused, summary untouched
    before = (out / "summary.json").read_bytes()
    assert cli_main(["reproduce", "--seeds", "3", "--no-meteor", "--out", str(out), "--resume", *sets,
                     "--set", "data.image_size=48"]) == 2
    assert "data.image_size is 64 in the run, 48 here" in capsys.readouterr().err
    assert (out / "summary.json").read_bytes() == before and not (out / "seed9225").exists()
    assert "guidance" not in (out / "summary.md").read_text()  # settings are not averaged as metrics
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["seeds"]) == 2 and len(summary["per_seed"]) == 2
    bleu = [m["BLEU_4"] for m in summary["per_seed"].values()]
    mean = sum(bleu) / 2
    assert summary["metrics"]["BLEU_4"]["mean"] == pytest.approx(mean)
    assert summary["metrics"]["BLEU_4"]["std"] == pytest.approx(abs(bleu[0] - bleu[1]) / 2 ** 0.5)
    assert "| BLEU_4 |" in (out / "summary.md").read_text()
    # the report-vs-condition F1 of each seed's consistency.json is summarised too
    macro = [json.loads((out / f"seed{seed}" / "eval-test" / "consistency.json").read_text())["F1_macro"]
             for seed in summary["seeds"]]
    assert summary["metrics"]["consistency_F1_macro"]["mean"] == pytest.approx(sum(macro) / 2)


def test_findings_preserving_mbr_says_what_the_beam_says(tiny_checkpoint, tmp_path, capsys):
    """--mbr-samples changes how reports are worded, never which findings they state: per study, the labeler
    reads the same findings in the MBR report as in the beam's, so every CE number is unchanged."""
    from ifnet.evaluation import findings_reader
    from ifnet.models.checkpoint import load_checkpoint

    outs = {}
    for name, extra in (("beam", ["--mbr-samples", "0"]), ("mbr", ["--mbr-samples", "6"])):
        out = tmp_path / name
        assert cli_main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--no-meteor",
                         "--guidance", "1", *extra]) == 0
        outs[name] = (json.loads((out / "metrics.json").read_text()), json.loads((out / "predictions.json").read_text()))
    (m_beam, p_beam), (m_mbr, p_mbr) = outs["beam"], outs["mbr"]
    assert m_beam["mbr_samples"] == 0 and m_mbr["mbr_samples"] == 6
    assert {k: v for k, v in m_beam.items() if k.startswith("CE_")} == {k: v for k, v in m_mbr.items() if k.startswith("CE_")}
    _, tokenizer, _, _ = load_checkpoint(tiny_checkpoint, map_location="cpu")
    read = findings_reader(tokenizer, "iu_xray")
    for a, b in zip(p_beam, p_mbr):
        assert (read([tokenizer.encode(a["generated"])]) == read([tokenizer.encode(b["generated"])])).all()
    # generate: the same option; a negative count is a one-line error
    image = _data_of(tiny_checkpoint) / "images" / "PHTE0000" / "0.png"
    capsys.readouterr()
    assert cli_main(["generate", "--checkpoint", str(tiny_checkpoint), str(image), "--json", "--mbr-samples", "4"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out)["report"], str)
    assert cli_main(["generate", "--checkpoint", str(tiny_checkpoint), str(image), "--mbr-samples", "-1"]) == 1
    assert "--mbr-samples must be >= 0" in capsys.readouterr().err
    assert cli_main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "neg"), "--no-meteor",
                     "--mbr-samples", "-1"]) == 1
    assert "--mbr-samples must be >= 0" in capsys.readouterr().err and not (tmp_path / "neg").exists()
    # and a negative guidance weight: the same one-line error as generate's, before anything is written
    assert cli_main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "neg"), "--no-meteor",
                     "--guidance", "-1"]) == 1
    assert "--guidance must be a finite number >= 0" in capsys.readouterr().err and not (tmp_path / "neg").exists()


@pytest.mark.parametrize("option, value, message", [
    ("--beam-size", "0", "--beam-size must be >= 1, got 0"),
    ("--beam-size", "-1", "--beam-size must be >= 1, got -1"),
    ("--max-len", "0", "--max-len must be >= 1, got 0"),
    ("--limit", "0", "--limit must be >= 1, got 0"),
    ("--device", "foo", "device 'foo' is not a torch device"),
])
def test_bad_decoding_options_are_one_line_errors_and_zero_is_not_the_default(tiny_checkpoint, tmp_path, capsys,
                                                                              option, value, message):
    """0 used to mean "the checkpoint's value" (``x or default``) and -1 was a traceback from beam search."""
    out = tmp_path / "eval"
    assert cli_main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--no-meteor",
                     option, value]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not out.exists(), err
    if option == "--limit":
        return
    image = _data_of(tiny_checkpoint) / "images" / "PHTE0000" / "0.png"
    assert cli_main(["generate", "--checkpoint", str(tiny_checkpoint), str(image), option, value]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_generate_warns_about_an_image_too_small_to_read(tiny_checkpoint, tmp_path, capsys):
    from PIL import Image

    dot = tmp_path / "dot.png"
    Image.fromarray(np.full((2, 2), 100, np.uint8)).save(dot)
    assert cli_main(["generate", "--checkpoint", str(tiny_checkpoint), str(dot)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {dot} is 2x2 px, far below the model's" in err


def test_generate_and_the_server_warn_alike_about_a_lateral_the_checkpoint_does_not_read():
    from types import SimpleNamespace

    from ifnet.inference import study_warnings

    one_view = SimpleNamespace(max_views=1, describe=lambda: {"image_size": 224})
    views = [np.zeros((512, 512), np.uint8), np.zeros((512, 512), np.uint8)]
    assert study_warnings(["f.png", "l.png"], views, one_view) == [
        "this checkpoint reads 1 view(s); the lateral image was not used"]
    two_views = SimpleNamespace(max_views=2, describe=lambda: {"image_size": 224})
    assert study_warnings(["f.png", "l.png"], views, two_views) == []
    tiny = study_warnings(["f.png"], [np.zeros((20, 20), np.uint8)], two_views)
    assert len(tiny) == 1 and tiny[0].startswith("f.png is 20x20 px")
