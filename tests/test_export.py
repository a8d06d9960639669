"""ONNX export: ONNX Runtime decodes the same reports as PyTorch; the folder describes itself; clear errors.

Tolerances: fp32 ONNX Runtime vs PyTorch logits agree to ``atol=1e-4`` (measured ~1e-6: the graphs are the
PyTorch maths, only kernel summation order differs); tokens must be identical for greedy and beam 3.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from ifnet.cli import main as cli_main  # noqa: E402
from ifnet.data.images import read_xray  # noqa: E402
from ifnet.data.tokenizer import BOS_ID, Tokenizer  # noqa: E402
from ifnet.export.onnx_export import ExportError, export_checkpoint  # noqa: E402
from ifnet.export.runtime import OnnxDecoder, OnnxModel, OnnxPredictor, read_manifest  # noqa: E402
from ifnet.inference import Predictor  # noqa: E402
from ifnet.io_utils import OutputExistsError  # noqa: E402
from ifnet.models.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from ifnet.models.ifnet import IFNetDecoder  # noqa: E402

LOGIT_ATOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These tests compare outputs, not speed; one thread avoids OpenMP waits on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def exported(tiny_checkpoint: Path, tmp_path_factory) -> Path:
    """The session's tiny trained checkpoint, exported with the int8 variant."""
    out = tmp_path_factory.mktemp("export") / "onnx"
    export_checkpoint(tiny_checkpoint, out, int8=True)
    return out


def _untrained_checkpoint(path: Path, attention: str) -> Path:
    """A 2-decoder-layer model saved without training (export does not care), with a training config."""
    from ifnet.config import resolve, to_dict
    from ifnet.models.checkpoint import save_checkpoint
    from ifnet.models.ifnet import IFNet
    from ifnet.train.config import TrainConfig

    tokenizer = Tokenizer.build(["the heart is normal in size.", "no pleural effusion or pneumothorax."],
                                threshold=1)
    cfg = resolve(TrainConfig, None, [
        "model.extractor=resnet18", "model.num_memory_slots=16", "model.memory_top_k=4", "model.memory_heads=2",
        f"model.transformer={{d_model: 32, num_heads: 2, num_encoder_layers: 1, num_decoder_layers: 2, "
        f"d_ff: 32, attention: {attention}}}", f"model.vocab_size={len(tokenizer)}", "data.image_size=64",
        "data.iec=clahe", "data.annotation=none.json", "data.image_root=none"])
    torch.manual_seed(1)
    model = IFNet(cfg.model).eval()
    with torch.no_grad():  # trained models have a non-zero label -> word bias and calibrated thresholds
        model.condition_logits.weight.normal_(std=0.5)
        model.set_label_thresholds(torch.linspace(0.3, 0.7, 14))
    return save_checkpoint(path, model, model.config, tokenizer, metadata={"train_config": to_dict(cfg)})


def _synthetic_studies(shared_images: Path, count: int = 3) -> list[list[np.ndarray]]:
    ids = sorted(p for p in shared_images.iterdir() if p.is_dir())[:count]
    return [[read_xray(d / "0.png"), read_xray(d / "1.png")] for d in ids]


def _phantom_studies(checkpoint: Path, count: int = 2) -> list[list[np.ndarray]]:
    ann = json.loads((checkpoint.parents[1] / "data" / "annotation.json").read_text())
    root = checkpoint.parents[1] / "data" / "images"
    return [[read_xray(root / rel) for rel in entry["image_path"]] for entry in ann["test"][:count]]


def _to_tensor(model: OnnxModel, view: np.ndarray) -> torch.Tensor:
    from ifnet.data.transforms import ImageTransform

    return ImageTransform(model.image_config)(view)


# -- the folder ------------------------------------------------------------------------------------

def test_export_folder_describes_itself(exported: Path, tiny_checkpoint: Path):
    manifest = read_manifest(exported)
    meta = json.loads((tiny_checkpoint / "meta.json").read_text())
    assert manifest["source_checkpoint"]["weights_sha256"] == meta["files"]["model.safetensors"]["sha256"]
    assert manifest["opset"] == 17 and manifest["variants"].keys() == {"fp32", "int8"}
    train_data = meta["metadata"]["train_config"]["data"]
    assert manifest["preprocessing"]["image_size"] == train_data["image_size"]
    assert manifest["preprocessing"]["iec"] == train_data["iec"] == "clahe"
    step = manifest["graphs"]["decoder_step"]
    names = [i["name"] for i in step["inputs"]]
    assert names[:3] == ["token", "position", "condition"]
    assert names[3:] == manifest["state"]["self_attention"] + manifest["state"]["cross_attention"]
    assert manifest["state"]["self_attention"][:2] == ["self_S_0", "self_z_0"]  # linear: explicit (S, z)
    assert [o["name"] for o in step["outputs"]] == ["logits"] + manifest["state"]["self_attention_outputs"]
    assert step["inputs"][0]["shape"] == ["batch"] and step["inputs"][1]["shape"] == []
    encoder_in = [i["name"] for i in manifest["graphs"]["encoder"]["inputs"]]
    assert encoder_in == ["features", "view_mask", "condition", "condition_weight"]
    for check in manifest["verification"]["fp32"].values():
        assert check < LOGIT_ATOL
    assert (exported / "vocab.json").is_file() and (exported / "label_head.npy").is_file()
    assert Tokenizer.load(exported / "vocab.json").tokens == Tokenizer.load(tiny_checkpoint / "vocab.json").tokens


# -- same reports as PyTorch ------------------------------------------------------------------------

@pytest.mark.parametrize("beam_size", [1, 3])
def test_onnx_runtime_generates_the_pytorch_reports(exported: Path, tiny_checkpoint: Path,
                                                    iu_synth_images: Path, beam_size: int):
    """Whole pipeline (preprocessing from the manifest included) on synthetic IU-Xray and phantom studies."""
    torch_pred = Predictor(tiny_checkpoint, device="cpu", beam_size=beam_size, max_len=20)
    onnx_pred = OnnxPredictor(exported, variant="fp32", beam_size=beam_size, max_len=20)
    studies = _synthetic_studies(iu_synth_images) + _phantom_studies(tiny_checkpoint, 1)
    for views in studies:
        a, b = torch_pred.predict(views), onnx_pred.predict(views)
        assert b.report == a.report
        assert b.findings == pytest.approx(a.findings, abs=1e-3)
        assert b.timings_ms.keys() == a.timings_ms.keys()


@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_tokens_and_step_logits_match_pytorch(tmp_path: Path, iu_synth_images: Path, attention: str):
    """Two decoder layers (state order), both attention kinds (softmax: the growing key/value cache)."""
    ckpt = _untrained_checkpoint(tmp_path / "ckpt", attention)
    export_checkpoint(ckpt, tmp_path / "onnx")
    model = load_checkpoint(ckpt)[0]
    onnx_model = OnnxModel(tmp_path / "onnx")
    views = _synthetic_studies(iu_synth_images, 2)
    images = torch.stack([torch.stack([_to_tensor(onnx_model, v) for v in s]) for s in views])
    view_mask = torch.tensor([[True, True], [True, False]])  # the second study has only a frontal view
    with torch.no_grad():
        enc = model.encode(images, view_mask)
        onnx_enc = onnx_model.encode(images, view_mask)
        torch.testing.assert_close(onnx_enc.label_logits, enc.label_logits, atol=LOGIT_ATOL, rtol=0)
        torch.testing.assert_close(onnx_enc.condition, enc.condition, atol=LOGIT_ATOL, rtol=0)
        for beam, guidance in ((1, 0.0), (3, 0.0), (3, 2.0)):
            want = model.decode(enc, beam_size=beam, max_len=12, block_trigrams=False, guidance=guidance)
            got = onnx_model.decode(onnx_enc, beam_size=beam, max_len=12, block_trigrams=False, guidance=guidance)
            assert torch.equal(got, want), (beam, guidance, got, want)
        # Step by step on the same tokens: logits close, masked (pad, bos) entries identical.
        ref, ort = IFNetDecoder(model), OnnxDecoder(onnx_model)
        ref_state, ort_state = ref.start(enc), ort.start(onnx_enc)
        tokens = torch.full((2,), BOS_ID)
        for _ in range(8):
            want_logits, ref_state = ref.step(tokens, ref_state)
            got_logits, ort_state = ort.step(tokens, ort_state)
            assert torch.equal(torch.isinf(got_logits), torch.isinf(want_logits))
            finite = torch.isfinite(want_logits)
            torch.testing.assert_close(got_logits[finite], want_logits[finite], atol=LOGIT_ATOL, rtol=0)
            tokens = want_logits.argmax(-1)


def test_supplied_findings_single_view_and_heatmap_match_pytorch(exported: Path, tiny_checkpoint: Path,
                                                                  iu_synth_images: Path):
    from ifnet.inference import parse_findings

    views = _synthetic_studies(iu_synth_images, 1)[0][:1]
    findings = parse_findings("Cardiomegaly, Pleural Effusion")
    a = Predictor(tiny_checkpoint, device="cpu").predict(views, findings=findings, heatmap=True)
    b = OnnxPredictor(exported, variant="fp32").predict(views, findings=findings, heatmap=True)
    assert b.report == a.report and b.conditioned_on == "supplied"
    assert b.condition == a.condition
    assert b.heatmap_label == a.heatmap_label
    np.testing.assert_allclose(b.heatmap, a.heatmap, atol=1e-4)


def test_int8_variant_runs_and_writes_a_report(exported: Path, iu_synth_images: Path):
    manifest = read_manifest(exported)
    assert manifest["variants"]["int8"]["decoder_step"] == "decoder_step.int8.onnx"
    assert manifest["variants"]["int8"]["backbone"] == "backbone.onnx"  # dynamic int8 convs are slower
    assert manifest["default_variant"] == "int8"
    pred = OnnxPredictor(exported, beam_size=3).predict(_synthetic_studies(iu_synth_images, 1)[0])
    assert pred.report and len(pred.findings) == 14
    assert all(0.0 <= p <= 1.0 for p in pred.findings.values())
    # int8 moves the logits a little, not arbitrarily
    assert manifest["verification"]["int8"]["step_logits_max_abs_diff"] < 0.5


@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_compare_reports_metric_change(exported: Path, tiny_checkpoint: Path, tmp_path: Path, guidance: float):
    """Every variant, PyTorch included, decodes with the export's guidance weight: same tokens as ORT fp32."""
    from ifnet.export.compare import compare_variants

    folder = tmp_path / "onnx"
    shutil.copytree(exported, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["decoding"]["guidance"] = guidance
    (folder / "manifest.json").write_text(json.dumps(manifest))
    data = tiny_checkpoint.parents[1] / "data"
    report = compare_variants(folder, annotation=data / "annotation.json", image_root=data / "images",
                              limit=2, checkpoint=tiny_checkpoint, beam_size=3, max_len=10)
    assert report["studies"] == 2 and set(report["variants"]) == {"fp32", "int8", "pytorch"}
    assert report["guidance"] == guidance
    assert report["variants"]["pytorch"]["same_tokens_as_fp32"] == 1.0
    assert set(report["variants"]["int8"]["change_vs_fp32"]) >= {"BLEU_4", "CE_F1_macro"}


# -- errors ----------------------------------------------------------------------------------------

def test_existing_output_needs_overwrite_and_must_be_an_export(exported: Path, tiny_checkpoint: Path,
                                                               tmp_path: Path):
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export_checkpoint(tiny_checkpoint, exported)
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="not an ifnet ONNX export"):
        export_checkpoint(tiny_checkpoint, other, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"


def test_missing_or_corrupt_checkpoint_is_a_checkpoint_error(tiny_checkpoint: Path, tmp_path: Path):
    with pytest.raises(CheckpointError, match="not found"):
        export_checkpoint(tmp_path / "nothing", tmp_path / "out")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    with open(broken / "model.safetensors", "r+b") as fh:
        fh.seek(-8, 2)
        fh.write(b"\x00" * 8)
    with pytest.raises(CheckpointError, match="sha256"):
        export_checkpoint(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tampered_export_and_missing_variant_are_clear_errors(exported: Path, tmp_path: Path):
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    fp32_only = tmp_path / "fp32"
    shutil.copytree(exported, fp32_only)
    manifest = json.loads((fp32_only / "manifest.json").read_text())
    del manifest["variants"]["int8"]
    (fp32_only / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="no 'int8' variant"):
        OnnxModel(fp32_only, variant="int8")
    with open(copy / "decoder_step.onnx", "ab") as fh:
        fh.write(b"junk")
    with pytest.raises(ExportError, match="sha256"):
        OnnxModel(copy)
    with pytest.raises(ExportError, match="not found"):
        OnnxModel(tmp_path / "nowhere")


def test_cli_export_and_one_line_errors(tiny_checkpoint: Path, tmp_path: Path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["export", "--checkpoint", str(tiny_checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    assert "decoder_step.onnx" in capsys.readouterr().out
    assert read_manifest(out)["variants"].keys() == {"fp32"}
    assert cli_main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--overwrite" in err
    assert cli_main(["export", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    # --int8 measures the metric change on the checkpoint's own test split and keeps it beside the graphs
    assert cli_main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--overwrite", "--int8",
                     "--compare", "1"]) == 0
    assert "same tokens as fp32" in capsys.readouterr().out
    report = json.loads((out / "int8_report.json").read_text())
    assert report["studies"] == 1 and "change_vs_fp32" in report["variants"]["int8"]


def test_cli_generate_reads_an_export_folder(exported: Path, tiny_checkpoint: Path, iu_synth_images: Path, capsys):
    """`ifnet generate --checkpoint EXPORT`: ONNX Runtime writes the report PyTorch writes (fp32 variant here,
    since the fixture's default variant is int8), with the same --guidance override."""
    study = sorted(p for p in iu_synth_images.iterdir() if p.is_dir())[0]
    images = [str(study / "0.png"), str(study / "1.png")]
    fp32 = OnnxPredictor(exported, variant="fp32", guidance=2.0)
    want = Predictor(tiny_checkpoint, device="cpu", guidance=2.0).predict([read_xray(p) for p in images])
    assert fp32.predict([read_xray(p) for p in images]).report == want.report
    assert cli_main(["generate", "--checkpoint", str(exported), *images, "--json", "--guidance", "2"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["report"] and set(doc["findings"]) == set(want.findings)
    assert cli_main(["generate", "--checkpoint", str(exported), images[0], "--guidance", "-1"]) == 1
    assert "--guidance must be a finite number >= 0" in capsys.readouterr().err
    # --variant fp32 picks the export's fp32 model: PyTorch's report; on a checkpoint --variant is an error
    assert cli_main(["generate", "--checkpoint", str(exported), *images, "--json", "--guidance", "2",
                     "--variant", "fp32"]) == 0
    assert json.loads(capsys.readouterr().out)["report"] == want.report
    assert cli_main(["generate", "--checkpoint", str(tiny_checkpoint), images[0], "--variant", "int8"]) == 1
    assert "--variant chooses between an export folder's fp32 and int8 models" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--opset", "5"], "--opset 5: these graphs export with opsets 11-20"),
    (["--opset", "99"], "--opset 99: these graphs export with opsets 11-20"),
    (["--int8", "--compare", "2", "--compare-split", "bogus"], "bogus"),
    (["--int8", "--compare", "2", "--compare-annotation", "/nonexistent/annotation.json"],
     "--compare: annotation /nonexistent/annotation.json not found"),
])
def test_bad_export_options_are_refused_before_exporting(tiny_checkpoint: Path, tmp_path: Path, capsys, extra, message):
    out = tmp_path / "x"
    assert cli_main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out), *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    # (an annotation problem is the loader's summary line plus the problem, as everywhere)
    assert len(err) <= 2 and message in err[-1] and "pass --compare-annotation" not in err[-1], err
    assert not out.exists()


def test_an_export_folder_given_as_a_checkpoint_says_what_it_is(exported: Path, tmp_path: Path, capsys):
    assert cli_main(["export", "--checkpoint", str(exported), "--out", str(tmp_path / "again")]) == 1
    err = capsys.readouterr().err.strip()
    assert "is an `ifnet export` (ONNX) folder" in err and "\n" not in err
