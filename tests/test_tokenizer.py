"""R2Gen-compatible cleaning (hand-computed) and the vocabulary file."""

import json

import pytest

from ifnet.data.tokenizer import (BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, clean_report_iu_xray,
                                  clean_report_mimic_cxr)
from ifnet.errors import DataError


@pytest.mark.parametrize("raw, clean", [
    ("The heart is normal. The lungs are clear.", "the heart is normal . the lungs are clear ."),
    # numbered lists, doubled periods, the ':'..'[' character range and parentheses
    ("1. No acute disease.. 2. Stable (mild) cardiomegaly; T-spine: ok",
     "no acute disease . stable mild cardiomegaly t-spine ok ."),
    ("Heart size 1/2 normal, 'xxxx' \"quoted\"", "heart size 12 normal xxxx quoted ."),
    # R2Gen keeps empty sentences (its `!= []` filter never drops a string)
    ("Clear. . Normal.", "clear .  . normal ."),
])
def test_clean_iu_xray(raw, clean):
    assert clean_report_iu_xray(raw) == clean


def test_clean_mimic_folds_newlines_and_underscores():
    raw = "FINDINGS:\nNo  pneumothorax___ seen.. Heart normal."
    assert clean_report_mimic_cxr(raw) == "findings no pneumothorax seen . heart normal ."


def test_build_threshold_and_special_ids():
    reports = ["a b c.", "a b.", "a d."]
    tok = Tokenizer.build(reports, threshold=2)
    # c and d are seen once; the rest sorted after the four specials
    assert tok.tokens == ["<pad>", "<bos>", "<eos>", "<unk>", ".", "a", "b"]
    assert len({PAD_ID, BOS_ID, EOS_ID, UNK_ID}) == 4
    ids = tok.encode("a c.")
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert ids[2] == UNK_ID
    assert tok.decode(ids) == "a <unk> ."
    assert tok.decode([BOS_ID, tok.token_to_id["a"], EOS_ID, tok.token_to_id["b"]]) == "a"


def test_encode_truncates_words_but_keeps_eos():
    tok = Tokenizer.build(["w1 w2 w3 w4."], threshold=1)
    ids = tok.encode("w1 w2 w3 w4.", max_tokens=2)
    assert len(ids) == 4 and ids[-1] == EOS_ID


def test_save_load_roundtrip(tmp_path):
    tok = Tokenizer.build(["the heart is normal.", "the lungs are clear."], threshold=1)
    path = tmp_path / "vocab.json"
    tok.save(path)
    again = Tokenizer.load(path)
    assert again.tokens == tok.tokens and again.cleaner == "iu_xray" and again.threshold == 1


def test_load_rejects_foreign_json(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps({"token2idx": {}}))
    with pytest.raises(DataError, match=r"vocab.json.*format"):
        Tokenizer.load(path)


def test_vocabulary_of_real_iu_train_split(iu_annotation_path):
    ann = json.loads(iu_annotation_path.read_text())
    tok = Tokenizer.build([e["report"] for e in ann["train"]], threshold=3)
    # R2Gen's IU-Xray vocabulary (threshold 3) has 760 words incl. its <unk>; we add pad/bos/eos.
    assert len(tok) == 763
    assert "cardiomegaly" in tok.token_to_id
