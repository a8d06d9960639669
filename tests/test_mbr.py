"""Minimum Bayes-risk decoding: sentence BLEU, the selection rule, sampling and the decode path."""

from __future__ import annotations

import math

import pytest
import torch

from ifnet.decoding import DecodingConfig, beam_search, generate
from ifnet.decoding.mbr import mbr_decode, sample, select, sentence_bleu, utility
from test_decoding import BOS, EOS, PAD, A, B, C, MarkovModel, table

IDS = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD)


def test_sentence_bleu_known_values():
    assert sentence_bleu([3, 4, 5, 6, 7], [3, 4, 5, 6, 7]) == pytest.approx(1.0)
    assert sentence_bleu([3, 4, 5], [6, 7, 8]) == 0.0  # no unigram in common
    assert sentence_bleu([], [3, 4]) == 0.0
    # hyp a b c d vs ref a b c e: p1 3/4, p2 (2+1)/(3+1), p3 (1+1)/(2+1), p4 (0+1)/(1+1); equal lengths
    expected = (3 / 4 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert sentence_bleu([3, 4, 5, 6], [3, 4, 5, 7]) == pytest.approx(expected)
    # a hypothesis shorter than the reference pays the brevity penalty exp(1 - 6/3)
    assert sentence_bleu([3, 4, 5], [3, 4, 5, 6, 7, 8]) == pytest.approx(math.exp(1 - 2) * (1 * 1 * 1 * 1) ** 0.25)


def test_utility_penalises_length_both_ways():
    ref = [3, 4, 5, 6]
    # no longer than the reference: the utility is sentence BLEU
    assert utility([3, 4, 5], ref) == pytest.approx(sentence_bleu([3, 4, 5], ref))
    assert utility(ref, ref) == pytest.approx(1.0)
    # longer: BLEU charges only the lower precisions; the utility adds exp(1 - c/r)
    long = [3, 4, 5, 6, 9, 9, 9, 9]
    assert utility(long, ref) == pytest.approx(sentence_bleu(long, ref) * math.exp(1 - 8 / 4))
    assert utility(long, ref) < sentence_bleu(long, ref)
    assert utility([], ref) == 0.0


def test_two_sided_selection_does_not_favour_longer_candidates():
    # samples of 5-8 words sharing a prefix: plain BLEU charges the longer candidate nothing against the
    # shorter samples and picks it; the two-sided utility charges either mismatch and picks the shorter
    a = [3, 4, 5, 6, 7]
    samples = [a + [EOS], a + [8, EOS], a + [8, 9, EOS], a + [8, 9, 10, EOS], a + [8, 9, 10, EOS]]
    shorter, longer = a + [8, EOS], a + [8, 9, EOS]
    assert select([shorter, longer], samples, two_sided=False) == 1
    assert select([shorter, longer], samples) == 0


def test_select_returns_the_candidate_the_samples_agree_with_most():
    central = [3, 4, 5, 6, 7, EOS]
    samples = [[3, 4, 5, 6, 7, 8, EOS], [9, 3, 4, 5, 6, 7, EOS, PAD], [3, 4, 5, 6, 10, EOS], [11, 12, EOS]]
    odd = [11, 12, EOS]
    assert select([odd, central], samples) == 1
    # a candidate that is a sample is not compared with itself: alone, the odd sample would score 1.0 on itself
    assert select([odd], [odd]) == 0
    cands = [odd] + samples
    own = [None] + list(range(len(samples)))
    best = select(cands, samples, candidate_is_sample=own)
    assert cands[best] != odd and cands[best] != samples[3]
    # ties go to the earlier candidate (the beam's best comes first)
    assert select([central, list(central)], samples) == 0
    with pytest.raises(ValueError):
        select([], samples)
    with pytest.raises(ValueError):
        select([central], [])


def _model():
    # item 0: after bos, A / B / C with 0.4 / 0.35 / 0.25; each then ends with probability 1
    probs = table(6, {BOS: {A: 0.4, B: 0.35, C: 0.25}, A: {EOS: 1.0}, B: {EOS: 1.0}, C: {EOS: 1.0}})
    return MarkovModel(probs)


def test_sampling_is_seeded_follows_the_distribution_and_keeps_the_token_layout():
    model = _model()
    items = torch.zeros(2, dtype=torch.long)
    out = sample(model, items, num_samples=2000, max_len=5, seed=7, **IDS)
    assert out.shape[:2] == (2, 2000) and out.shape[2] == 2
    assert torch.equal(out, sample(model, items, num_samples=2000, max_len=5, seed=7, **IDS))
    assert not torch.equal(out, sample(model, items, num_samples=2000, max_len=5, seed=8, **IDS))
    assert bool((out[..., 1] == EOS).all())
    first = out[..., 0].flatten()
    freq = torch.stack([(first == t).float().mean() for t in (A, B, C)])
    assert torch.allclose(freq, torch.tensor([0.4, 0.35, 0.25]), atol=0.03)
    cold = sample(model, items, num_samples=500, max_len=5, seed=7, temperature=0.01, **IDS)
    assert bool((cold[..., 0] == A).all())  # near-greedy at a low temperature
    with pytest.raises(ValueError):
        sample(model, items, num_samples=0, max_len=5, **IDS)
    with pytest.raises(ValueError):
        sample(model, items, num_samples=2, max_len=5, temperature=0.0, **IDS)


def test_a_studys_samples_do_not_depend_on_the_rest_of_its_batch():
    # two items with different distributions and varied lengths; item 1 sampled alone, after item 0, and
    # twice beside it: its samples are the same each time (ifnet generate on one study = evaluate on a split)
    probs = torch.stack([table(6, {BOS: {A: 0.5, B: 0.5}, A: {A: 0.6, EOS: 0.4}, B: {EOS: 1.0}}),
                         table(6, {BOS: {A: 0.2, B: 0.3, C: 0.5}, A: {EOS: 1.0}, B: {B: 0.5, EOS: 0.5},
                                   C: {A: 0.3, EOS: 0.7}})])
    model = MarkovModel(probs)

    def item1_samples(items):
        out = sample(model, torch.tensor(items), num_samples=40, max_len=8, seed=3, block_trigrams=False, **IDS)
        return [[out[i, j].tolist() for j in range(40)] for i, item in enumerate(items) if item == 1]

    def trimmed(rows):
        return [[t for t in row if t != PAD] for row in rows]

    alone = trimmed(item1_samples([1])[0])
    assert len({tuple(r) for r in alone}) > 3  # really random
    for items in ([0, 1], [1, 0, 1], [0, 0, 1]):
        for rows in item1_samples(items):
            assert trimmed(rows) == alone


def test_sampled_reports_stop_at_eos_and_pad_after_it():
    # A repeats with 0.5 or ends: reports of varied length in one batch
    model = MarkovModel(table(6, {BOS: {A: 1.0}, A: {A: 0.5, EOS: 0.5}}))
    out = sample(model, torch.zeros(1, dtype=torch.long), num_samples=64, max_len=6, seed=0,
                 block_trigrams=False, **IDS)[0]
    for row in out.tolist():
        if EOS in row:
            end = row.index(EOS)
            assert all(t == A for t in row[:end]) and all(t == PAD for t in row[end + 1:])
        else:
            assert row == [A] * len(row)  # cut at max_len


def test_mbr_decode_returns_a_candidate_and_generate_routes_to_it():
    model = _model()
    items = torch.zeros(3, dtype=torch.long)
    pool = beam_search(model, items, beam_size=2, max_len=5, return_pool=True, **IDS)
    drawn = sample(model, items, num_samples=8, max_len=5, seed=3, **IDS)
    out = mbr_decode(model, items, beam_size=2, num_samples=8, max_len=5, seed=3, **IDS)
    assert out.shape[0] == 3
    for b in range(3):
        row = out[b].tolist()
        cands = [r[: len(row)] for r in pool.tokens[b].tolist() + drawn[b].tolist()]
        assert row in cands
    cfg = DecodingConfig(beam_size=2, max_len=5, mbr_samples=8, mbr_seed=3)
    assert torch.equal(generate(model, items, cfg, **IDS), out)
    with pytest.raises(ValueError, match="mbr_samples"):
        DecodingConfig(mbr_samples=-1)
    with pytest.raises(ValueError, match="mbr_temperature"):
        DecodingConfig(mbr_samples=2, mbr_temperature=0.0)


def test_mbr_prefers_the_consensus_over_the_mode():
    # The mode is the short report A <eos> (0.3); the other reports all share the prefix "B C D" and then
    # differ in their last word (0.23 each): the samples agree on B C D ..., so MBR returns one of those, not A.
    probs = table(10, {BOS: {A: 0.3, B: 0.7}, A: {EOS: 1.0}, B: {C: 1.0}, C: {6: 1.0},
                       6: {7: 0.34, 8: 0.33, 9: 0.33}, 7: {EOS: 1.0}, 8: {EOS: 1.0}, 9: {EOS: 1.0}})
    model = MarkovModel(probs)
    items = torch.zeros(1, dtype=torch.long)
    assert beam_search(model, items, beam_size=3, max_len=7, **IDS)[0].tolist()[:2] == [A, EOS]
    out = mbr_decode(model, items, beam_size=3, num_samples=64, max_len=7, seed=0, **IDS)[0].tolist()
    assert out[:3] == [B, C, 6]


def test_findings_filter_keeps_only_candidates_stating_the_beams_findings():
    probs = table(9, {BOS: {A: 0.4, B: 0.6}, A: {EOS: 1.0}, B: {C: 1.0},
                      C: {6: 0.34, 7: 0.33, 8: 0.33}, 6: {EOS: 1.0}, 7: {EOS: 1.0}, 8: {EOS: 1.0}})
    model = MarkovModel(probs)
    items = torch.zeros(1, dtype=torch.long)
    seen = []

    def says_a(seqs):  # "finding" = the report contains A; the first candidate is the beam's best
        seen.append(len(seqs))
        return [[int(A in s)] for s in seqs]

    out = mbr_decode(model, items, beam_size=3, num_samples=32, max_len=6, seed=0, findings_of=says_a, **IDS)
    assert out[0].tolist()[:2] == [A, EOS]  # the beam's best (A) states the finding; no B C report does
    assert seen == [3 + 32]  # one call per study, over every candidate: beam pool and samples
    # extra samples of the beam's model join the candidates; generate() passes findings_of through
    calls = []
    count = lambda seqs: calls.append(len(seqs)) or [[0]] * len(seqs)  # noqa: E731
    mbr_decode(model, items, beam_size=3, num_samples=8, max_len=6, evidence_model=model, guided_samples=4,
               findings_of=count, **IDS)
    generate(model, items, DecodingConfig(beam_size=3, max_len=6, mbr_samples=8), findings_of=count, **IDS)
    assert calls == [3 + 4 + 8, 3 + 8]
