"""CheXbert adapter: clear errors for every missing piece, and the real loading code on a tiny
randomly initialised BERT (no real checkpoint exists here, and nothing is downloaded)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from ifnet.errors import IFNetError
from ifnet.labels import BLANK, NEGATIVE, NUM_OBSERVATIONS, POSITIVE, UNCERTAIN

chexbert = pytest.importorskip("ifnet.labeler.chexbert")

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "no", "pleural", "effusion", ".", "heart",
         "is", "normal", "cardio", "##megaly"]


def make_bert_dir(root: Path) -> Path:
    """A BERT folder as a user would have it (config + vocab), but tiny."""
    bert = root / "bert"
    bert.mkdir()
    config = {"model_type": "bert", "vocab_size": len(VOCAB), "hidden_size": 8, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 64,
              "type_vocab_size": 2}
    (bert / "config.json").write_text(json.dumps(config))
    (bert / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return bert


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    bert = make_bert_dir(tmp_path)
    with pytest.raises(IFNetError, match="CheXbert checkpoint not found: .*chexbert.pth"):
        chexbert.load_chexbert(tmp_path / "chexbert.pth", bert)


def test_missing_bert_dir_and_files_are_clear_errors(tmp_path):
    ckpt = tmp_path / "chexbert.pth"
    ckpt.write_bytes(b"not used")
    with pytest.raises(IFNetError, match="BERT directory not found"):
        chexbert.load_chexbert(ckpt, tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(IFNetError, match="lacks config.json, vocab.txt"):
        chexbert.load_chexbert(ckpt, empty)


def test_missing_transformers_is_a_clear_error(tmp_path, monkeypatch):
    bert = make_bert_dir(tmp_path)
    ckpt = tmp_path / "chexbert.pth"
    ckpt.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(IFNetError, match=r"optional package 'transformers'.*pip install 'ifnet\[chexbert\]'"):
        chexbert.load_chexbert(ckpt, bert)


def test_not_a_checkpoint_is_one_line(tmp_path):
    pytest.importorskip("transformers")
    bert = make_bert_dir(tmp_path)
    ckpt = tmp_path / "chexbert.pth"
    ckpt.write_text("this is text, not a checkpoint")
    with pytest.raises(IFNetError, match="cannot be read as a weights-only PyTorch checkpoint") as info:
        chexbert.load_chexbert(ckpt, bert)
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A CheXbert-format checkpoint: DataParallel prefix, old position_ids buffer, optimizer state."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("chexbert")
    bert = make_bert_dir(root)
    torch.manual_seed(0)
    model = chexbert._build_model(transformers, bert)
    # Make every head's decision independent of the text: zero weights, a bias that picks a class.
    wanted = [1, 2, 3, 0] * 3 + [1, 1]  # 13 four-class heads, then the No Finding head
    with torch.no_grad():
        for head, cls in zip(model.linear_heads, wanted):
            head.weight.zero_()
            head.bias.zero_()
            head.bias[cls] = 5.0
    state = {"module." + k: v for k, v in model.state_dict().items()}
    state["module.bert.embeddings.position_ids"] = torch.arange(64)[None]
    ckpt = root / "chexbert.pth"
    torch.save({"epoch": 7, "model_state_dict": state, "optimizer_state_dict": {}}, ckpt)
    return ckpt, bert, wanted


def test_load_and_label_maps_classes_to_codes(tiny_checkpoint):
    ckpt, bert, wanted = tiny_checkpoint
    labeler = chexbert.load_chexbert(ckpt, bert)
    out = labeler.label_batch(["No pleural effusion.", "Cardiomegaly", "", "heart is normal " * 400])
    assert out.dtype == np.int8 and out.shape == (4, NUM_OBSERVATIONS)
    # CheXbert classes: 0 blank, 1 positive, 2 negative, 3 uncertain (No Finding: 0 blank, 1 positive)
    class_to_code = {0: BLANK, 1: POSITIVE, 2: NEGATIVE, 3: UNCERTAIN}
    expected = [class_to_code[c] for c in wanted[:13]] + [POSITIVE]
    for row in out:  # the long report is truncated to 512 tokens instead of failing
        assert row.tolist() == expected
    np.testing.assert_array_equal(labeler.label("No pleural effusion."), out[0])


def test_checkpoint_that_does_not_fit_names_the_keys(tiny_checkpoint, tmp_path):
    torch = pytest.importorskip("torch")
    ckpt, bert, _ = tiny_checkpoint
    state = torch.load(ckpt, weights_only=True)["model_state_dict"]
    del state["module.linear_heads.13.weight"]
    broken = tmp_path / "broken.pth"
    torch.save({"model_state_dict": state}, broken)
    with pytest.raises(IFNetError, match=r"does not match a CheXbert model.*linear_heads\.13\.weight"):
        chexbert.load_chexbert(broken, bert)
    torch.save({"something": "else"}, broken)
    with pytest.raises(IFNetError, match="not a CheXbert checkpoint"):
        chexbert.load_chexbert(broken, bert)


def test_cli_writes_chexbert_labels(tiny_checkpoint, tmp_path):
    from ifnet.cli import main

    ckpt, bert, wanted = tiny_checkpoint
    annotation = tmp_path / "annotation.json"
    annotation.write_text(json.dumps({"test": [{"id": "a", "report": "No pleural effusion."},
                                               {"id": "b", "report": "Cardiomegaly"}]}))
    out = tmp_path / "labels.json"
    argv = ["label", "--annotation", str(annotation), "--out", str(out), "--labeler", "chexbert",
            "--chexbert-ckpt", str(ckpt), "--bert-dir", str(bert)]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["labeler"] == "chexbert" and list(doc["labels"]) == ["a", "b"]
    assert doc["labels"]["a"][1] == NEGATIVE and doc["labels"]["a"][-1] == POSITIVE
