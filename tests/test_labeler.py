"""Rule labeler: hand-written reports for each negation / uncertainty pattern, the API contract,
the No Finding rule, non-ASCII input and explanations."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ifnet.labeler import Labeler, ObservationPhrases, label_reports
from ifnet.labeler.text import normalize, split_sentences
from ifnet.labels import BLANK, NEGATIVE, NO_FINDING_INDEX, OBSERVATIONS, POSITIVE, UNCERTAIN

LAB = Labeler()


def code(text: str, observation: str) -> int:
    return int(LAB.label(text)[OBSERVATIONS.index(observation)])


@pytest.mark.parametrize("text, observation, expected", [
    # pre-negation, including a list that the cue reaches across commas and "or"
    ("No pleural effusion.", "Pleural Effusion", NEGATIVE),
    ("No pneumonia, effusions, edema, pneumothorax, adenopathy, nodules or masses.", "Lung Lesion", NEGATIVE),
    ("No pneumonia, effusions, edema, pneumothorax, adenopathy, nodules or masses.", "Pneumothorax", NEGATIVE),
    ("Lungs are clear without focal consolidation, pneumothorax or large pleural effusion.", "Pleural Effusion", NEGATIVE),
    ("Negative for pneumothorax.", "Pneumothorax", NEGATIVE),
    ("Free of focal consolidation.", "Consolidation", NEGATIVE),
    ("There is no evidence of pulmonary edema.", "Edema", NEGATIVE),
    ("Interval removal of the right IJ catheter.", "Support Devices", NEGATIVE),
    # post-negation
    ("Pneumothorax is not seen.", "Pneumothorax", NEGATIVE),
    ("The left pleural effusion has resolved.", "Pleural Effusion", NEGATIVE),
    ("The previously seen effusion is no longer visualized.", "Pleural Effusion", NEGATIVE),
    ("Pneumonia is ruled out.", "Pneumonia", NEGATIVE),
    # pseudo-negation: "no change" says nothing against the finding
    ("No change in the mild cardiomegaly.", "Cardiomegaly", POSITIVE),
    ("No interval change in left basilar atelectasis.", "Atelectasis", POSITIVE),
    ("Atelectasis, not significantly changed.", "Atelectasis", POSITIVE),
    # uncertainty before and after, and negated uncertainty that must not read as negation
    ("Possible small left effusion.", "Pleural Effusion", UNCERTAIN),
    ("Findings suspicious for pneumonia.", "Pneumonia", UNCERTAIN),
    ("Cannot exclude pneumonia.", "Pneumonia", UNCERTAIN),
    ("Pneumonia cannot be excluded.", "Pneumonia", UNCERTAIN),
    ("Pneumonia is not excluded.", "Pneumonia", UNCERTAIN),
    ("Rule out pneumonia.", "Pneumonia", UNCERTAIN),
    ("Atelectasis versus pneumonia in the left base.", "Atelectasis", UNCERTAIN),
    ("Atelectasis versus pneumonia in the left base.", "Pneumonia", UNCERTAIN),
    ("Left basilar pneumonia?", "Pneumonia", UNCERTAIN),
    # negation beats uncertainty for the same mention
    ("No findings to suggest pneumonia.", "Pneumonia", NEGATIVE),
    # plain positives
    ("Stable cardiomegaly with pulmonary edema.", "Edema", POSITIVE),
    ("Right IJ catheter tip in the SVC.", "Support Devices", POSITIVE),
    ("Healing fracture of the right 7th rib.", "Fracture", POSITIVE),
    # statements of normality are negative mentions
    ("Heart size is normal.", "Cardiomegaly", NEGATIVE),
    ("The heart is not enlarged.", "Cardiomegaly", NEGATIVE),
    ("Cardiomediastinal silhouette is within normal limits.", "Enlarged Cardiomediastinum", NEGATIVE),
    ("Heart size upper limits of normal.", "Cardiomegaly", NEGATIVE),
    # exclusions: a calcified granuloma is not a lung lesion; pleural thickening is not an effusion
    ("Calcified granuloma in the right upper lobe.", "Lung Lesion", BLANK),
    ("Right apical pleural thickening.", "Pleural Other", POSITIVE),
    ("Right apical pleural thickening.", "Pleural Effusion", BLANK),
])
def test_single_pattern(text, observation, expected):
    assert code(text, observation) == expected


@pytest.mark.parametrize("text, negated, kept", [
    # scope ends at an adversative conjunction, a semicolon, a new "there is" clause, a sentence end
    ("No effusion but there is left basilar atelectasis.", "Pleural Effusion", "Atelectasis"),
    ("No effusion, however mild edema is present.", "Pleural Effusion", "Edema"),
    ("No evidence of consolidation; small right pleural effusion.", "Consolidation", "Pleural Effusion"),
    ("There is no pneumothorax, and there is a small left effusion.", "Pneumothorax", "Pleural Effusion"),
    ("No pneumothorax. Small right effusion.", "Pneumothorax", "Pleural Effusion"),
    ("No consolidation, although atelectasis is present at the left base.", "Consolidation", "Atelectasis"),
])
def test_scope_terminators(text, negated, kept):
    assert code(text, negated) == NEGATIVE
    assert code(text, kept) == POSITIVE


@pytest.mark.parametrize("text, expected", [
    # a negated list after a finding: its "or" joins the list and does not make the finding uncertain
    ("Left lower lobe pneumonia without effusion or pneumothorax.",
     {"Pneumonia": POSITIVE, "Pleural Effusion": NEGATIVE, "Pneumothorax": NEGATIVE}),
    ("Cardiomegaly with no edema or effusion.", {"Cardiomegaly": POSITIVE, "Edema": NEGATIVE}),
    ("Small left pleural effusion, no pneumothorax or consolidation.",
     {"Pleural Effusion": POSITIVE, "Consolidation": NEGATIVE}),
    ("Pneumonia or effusion.", {"Pneumonia": UNCERTAIN, "Pleural Effusion": UNCERTAIN}),
    # a negated list, then a new item that starts with a size or course word
    ("No pneumothorax, small left effusion.", {"Pneumothorax": NEGATIVE, "Pleural Effusion": POSITIVE}),
    ("No pneumothorax and mild cardiomegaly.", {"Pneumothorax": NEGATIVE, "Cardiomegaly": POSITIVE}),
    ("No pneumothorax and effusion.", {"Pneumothorax": NEGATIVE, "Pleural Effusion": NEGATIVE}),
    ("Lungs are clear, no pneumothorax, small right effusion.",
     {"Pneumothorax": NEGATIVE, "Pleural Effusion": POSITIVE, "No Finding": BLANK}),
    ("No focal consolidation, large pleural effusion, or pneumothorax.",  # "large" inside a list stays negated
     {"Consolidation": NEGATIVE, "Pleural Effusion": NEGATIVE, "Pneumothorax": NEGATIVE}),
    ("No evidence of pneumothorax, new consolidation or effusion.",  # so does "new"
     {"Consolidation": NEGATIVE, "Pleural Effusion": NEGATIVE}),
    # the list break ends negations only: uncertainty keeps its list
    ("Findings may represent atelectasis and mild pulmonary edema.", {"Atelectasis": UNCERTAIN, "Edema": UNCERTAIN}),
    ("Possible atelectasis and minimal pleural effusion.", {"Pleural Effusion": UNCERTAIN}),
    # "resolution of" / "removed" speak of the finding right after them, not of a new one later on
    ("Interval resolution of the left effusion with new right lower lobe pneumonia.",
     {"Pleural Effusion": NEGATIVE, "Pneumonia": POSITIVE}),
    ("Resolved left effusion, persistent right lower lobe consolidation.",
     {"Pleural Effusion": NEGATIVE, "Consolidation": POSITIVE}),
    ("Right chest tube has been removed with a small residual pneumothorax.",
     {"Support Devices": NEGATIVE, "Pneumothorax": POSITIVE}),
    ("There has been removal of the right-sided PICC line.", {"Support Devices": NEGATIVE}),
    ("Interval resolution of the previously seen right lower lobe consolidation.", {"Consolidation": NEGATIVE}),
    ("Interval removal of the left internal jugular central venous catheter.", {"Support Devices": NEGATIVE}),
    # a short-reach cue stopped by "new" hands the mention to the negation before it
    ("No pneumothorax following removal of the chest tube or new effusion.", {"Pleural Effusion": NEGATIVE}),
    # low probability and clinical questions
    ("Pleural effusion is unlikely.", {"Pleural Effusion": NEGATIVE}),
    ("Pneumonia is less likely.", {"Pneumonia": NEGATIVE}),
    ("Unlikely pneumonia.", {"Pneumonia": UNCERTAIN}),  # a doubt about what follows, not a denial
    ("Edema unlikely.", {"Edema": NEGATIVE}),
    ("Unlikely pneumonia, more likely atelectasis.", {"Pneumonia": UNCERTAIN, "Atelectasis": UNCERTAIN}),
    ("Consolidation is unlikely and the opacity likely reflects atelectasis.",
     {"Consolidation": NEGATIVE, "Atelectasis": UNCERTAIN}),
    ("Atelectasis, less likely pneumonia.", {"Atelectasis": POSITIVE, "Pneumonia": UNCERTAIN}),
    ("Evaluate for pneumonia.", {"Pneumonia": UNCERTAIN}),
    ("Clinical correlation recommended to exclude pneumonia.", {"Pneumonia": UNCERTAIN}),
    # template answers
    ("Pleural effusions: none.", {"Pleural Effusion": NEGATIVE}),
    ("Pneumothorax - none.", {"Pneumothorax": NEGATIVE}),
    ("Pneumothorax: no. Effusion: small.", {"Pneumothorax": NEGATIVE, "Pleural Effusion": POSITIVE}),
    ("Pneumothorax - no change.", {"Pneumothorax": POSITIVE}),
    # a dash or colon that opens a new negated phrase is not a template answer
    ("Moderate cardiomegaly - no pleural effusion.", {"Cardiomegaly": POSITIVE, "Pleural Effusion": NEGATIVE}),
    ("Stable cardiomegaly: no acute disease.", {"Cardiomegaly": POSITIVE}),
    ("Right PICC - no pneumothorax.", {"Support Devices": POSITIVE, "Pneumothorax": NEGATIVE}),
    ("Heart is not significantly enlarged.", {"Cardiomegaly": NEGATIVE}),
    # abbreviations do not end a sentence; hard-wrapped lines are one sentence
    ("Possible pneumonia vs. atelectasis.", {"Pneumonia": UNCERTAIN, "Atelectasis": UNCERTAIN}),
    ("Atelectasis vs. pneumonia in the left base.", {"Pneumonia": UNCERTAIN, "Atelectasis": UNCERTAIN}),
    ("There is no focal consolidation, pleural\n effusion or pneumothorax.",
     {"Pleural Effusion": NEGATIVE, "Pneumothorax": NEGATIVE}),
    ("There is no pneumothorax, focal consolidation or pleural\r\neffusion.", {"Pleural Effusion": NEGATIVE}),
    # ... but short lines are a list of their own sentences, in lower case too
    ("no pneumothorax\nmoderate right effusion\nmild cardiomegaly",
     {"Pneumothorax": NEGATIVE, "Pleural Effusion": POSITIVE, "Cardiomegaly": POSITIVE}),
    ("no acute cardiopulmonary process\npersistent left basilar atelectasis", {"Atelectasis": POSITIVE}),
    ("Heart size is normal\nSmall left effusion", {"Cardiomegaly": NEGATIVE, "Pleural Effusion": POSITIVE}),
])
def test_scope_of_lists_courses_and_templates(text, expected):
    labels = LAB.label(text)
    assert {name: int(labels[OBSERVATIONS.index(name)]) for name in expected} == expected


def test_long_sentences_are_labelled_in_near_linear_time():
    # each mention bisects for its nearest cue; a 100 KB one-sentence report used to take seconds. Counted,
    # not timed: the cue search visits O(log n) cues per mention, so doubling the text doubles the work.
    import ifnet.labeler.context as context

    calls = {"n": 0}
    real = context._words_between

    def counting(*args):
        calls["n"] += 1
        return real(*args)

    unit = "no effusion or pneumothorax, possible atelectasis, "
    counts = []
    for repeat in (200, 400):
        calls["n"] = 0
        context._words_between = counting
        try:
            Labeler().label(unit * repeat)
        finally:
            context._words_between = real
        counts.append(calls["n"])
    assert counts[1] <= 2.2 * counts[0]


def test_aggregation_prefers_positive_then_uncertain_then_negative():
    # one negative and one positive mention of the same finding: positive wins
    assert code("No right effusion. Small left pleural effusion.", "Pleural Effusion") == POSITIVE
    assert code("No right effusion. Possible small left effusion.", "Pleural Effusion") == UNCERTAIN


def test_no_finding_rule():
    nf = NO_FINDING_INDEX
    assert LAB.label("Heart size normal. Lungs clear. No effusion.")[nf] == POSITIVE
    assert LAB.label("Mild cardiomegaly.")[nf] == BLANK
    assert LAB.label("Possible pneumonia.")[nf] == BLANK  # uncertain findings block it too
    # Support Devices do not: a line in a normal chest is still "No Finding" (CheXpert convention)
    devices = LAB.label("Right PICC line tip in the SVC. Lungs are clear.")
    assert devices[OBSERVATIONS.index("Support Devices")] == POSITIVE and devices[nf] == POSITIVE
    # CheXpert never writes a negative No Finding
    assert NEGATIVE not in {int(LAB.label(t)[nf]) for t in ["", "Cardiomegaly.", "No effusion."]}


def test_empty_and_whitespace_reports():
    for text in ["", "   ", "\n\n", "..", "?"]:
        codes = LAB.label(text)
        assert codes[NO_FINDING_INDEX] == POSITIVE
        assert (np.delete(codes, NO_FINDING_INDEX) == BLANK).all()


def test_r2gen_cleaned_text():
    # model output after R2Gen cleaning: lowercase, " . " separators, no commas
    text = "the heart is mildly enlarged . there is a small left pleural effusion . no pneumothorax ."
    codes = LAB.label(text)
    assert codes[OBSERVATIONS.index("Cardiomegaly")] == POSITIVE
    assert codes[OBSERVATIONS.index("Pleural Effusion")] == POSITIVE
    assert codes[OBSERVATIONS.index("Pneumothorax")] == NEGATIVE


def test_xxxx_anonymisation_tokens_do_not_break_matching():
    assert code("XXXX right lower lobe pneumonia.", "Pneumonia") == POSITIVE
    assert code("No XXXX pneumothorax.", "Pneumothorax") == NEGATIVE


@pytest.mark.parametrize("text, observation, expected", [
    ("Pleural effusion\u2026 heart size normal \u2014 no pneumothorax.", "Pneumothorax", NEGATIVE),
    ("Pleural effusion\u2026 heart size normal \u2014 no pneumothorax.", "Pleural Effusion", POSITIVE),
    ("Pleural\u00a0effusion\u3000present.", "Pleural Effusion", POSITIVE),  # NBSP and ideographic space
    ("\uff30\uff2e\uff25\uff35\uff2d\uff2f\uff34\uff28\uff2f\uff32\uff21\uff38.", "Pneumothorax", POSITIVE),  # full width
    ("\u201cNo\u201d pleural effusion.", "Pleural Effusion", NEGATIVE),  # curly quotes
    ("\u00c9panchement pleural: pleural effusion, na\u00efve caf\u00e9.", "Pleural Effusion", POSITIVE),
    ("No \u00e9vidence of pneumothorax \U0001F600.", "Pneumothorax", NEGATIVE),
])
def test_non_ascii_text(text, observation, expected):
    assert code(text, observation) == expected


def test_sentence_splitting_keeps_decimals_and_question_marks():
    assert split_sentences("A 2.1 cm nodule. No effusion? Clear.. Done!") == [
        "A 2.1 cm nodule", "No effusion?", "Clear", "Done"]
    assert split_sentences("Atelectasis vs. pneumonia, e.g. at the base, i.e. left. Approx. 2 cm.") == [
        "Atelectasis vs. pneumonia, e.g. at the base, i.e. left", "Approx. 2 cm"]
    assert normalize("a\u2013b \u2018c\u2019") == "a-b 'c'"


def test_label_reports_contract():
    texts = ["Mild cardiomegaly. No pleural effusion.", "", "Possible pneumonia."]
    out = label_reports(texts)
    assert out.dtype == np.int8 and out.shape == (3, len(OBSERVATIONS))
    assert set(np.unique(out)) <= {POSITIVE, NEGATIVE, UNCERTAIN, BLANK}
    np.testing.assert_array_equal(out[0], LAB.label(texts[0]))
    assert label_reports([]).shape == (0, len(OBSERVATIONS))
    with pytest.raises(TypeError):
        label_reports("one string, not a list")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        LAB.label(None)  # type: ignore[arg-type]


def test_deterministic_and_thread_safe():
    texts = ["No pneumothorax. Small right effusion.", "Cardiomegaly with edema.", "Normal chest."] * 30
    expected = LAB.label_batch(texts)
    results = [None] * 4

    def work(i: int) -> None:
        results[i] = LAB.label_batch(texts)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        np.testing.assert_array_equal(r, expected)


def test_explain_names_phrase_sentence_and_cue():
    ex = LAB.explain("Mild cardiomegaly. No pleural effusion. Possible left basilar pneumonia.")
    np.testing.assert_array_equal(ex.codes, LAB.label("Mild cardiomegaly. No pleural effusion. "
                                                      "Possible left basilar pneumonia."))
    eff = ex["Pleural Effusion"]
    assert eff.code == NEGATIVE and eff.deciding is not None
    assert eff.deciding.phrase == "effusion" and eff.deciding.cue == "no"
    assert eff.deciding.cue_kind == "pre-negation" and eff.deciding.sentence == "No pleural effusion"
    pna = ex["Pneumonia"]
    assert pna.code == UNCERTAIN and pna.deciding.cue == "possible" and pna.deciding.cue_kind == "pre-uncertainty"
    assert ex["Cardiomegaly"].deciding.cue is None
    assert "blocked by Cardiomegaly" in ex["No Finding"].reason
    assert ex["Fracture"].reason == "no mention"
    table = ex.format(only_mentioned=True)
    assert "Pleural Effusion" in table and "Fracture" not in table


def test_custom_phrase_table():
    lab = Labeler({"Fracture": ObservationPhrases(mentions=(r"broken bone",))})
    codes = lab.label("No broken bone. Cardiomegaly.")
    assert codes[OBSERVATIONS.index("Fracture")] == NEGATIVE
    assert codes[OBSERVATIONS.index("Cardiomegaly")] == BLANK  # not in this table
    with pytest.raises(ValueError, match="unknown observation"):
        Labeler({"Broken Bone": ObservationPhrases(mentions=("x",))})


def test_import_does_not_pull_in_torch():
    code = "import sys, ifnet.labeler, ifnet.cli.label; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_docstring_example():
    assert label_reports(["Mild cardiomegaly. No pleural effusion."])[0][[1, 9, 13]].tolist() == [1, 0, -2]


_WORDS = st.sampled_from(["no", "possible", "effusion", "pneumothorax", "cardiomegaly", "but", "not", "seen",
                          "heart", "normal", "?", ".", ",", ";", "xxxx", "\u00e9", "\u2014", "2.1", "cm", "nodule"])


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(max_size=200), st.lists(_WORDS, max_size=40).map(" ".join)))
def test_any_text_gives_valid_codes(text):
    codes = LAB.label(text)
    assert codes.shape == (len(OBSERVATIONS),) and codes.dtype == np.int8
    assert set(codes.tolist()) <= {POSITIVE, NEGATIVE, UNCERTAIN, BLANK}
    assert codes[NO_FINDING_INDEX] in (POSITIVE, BLANK)
    findings = np.delete(codes, [NO_FINDING_INDEX, OBSERVATIONS.index("Support Devices")])
    assert (codes[NO_FINDING_INDEX] == POSITIVE) == (not np.isin(findings, [POSITIVE, UNCERTAIN]).any())
    # a separate sentence about another finding never changes the others
    extra = LAB.label(text + ". No pneumothorax.")
    keep = [j for j in range(len(OBSERVATIONS)) if OBSERVATIONS[j] not in ("Pneumothorax", "No Finding")]
    np.testing.assert_array_equal(extra[keep], codes[keep])
