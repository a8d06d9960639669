"""Greedy and beam search: toy models with known probabilities, exhaustive optimum, and SAFormer caches."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ifnet.decoding import (
    DEFAULT_MAX_LEN,
    BeamPool,
    BeamSearchOutput,
    DecodeState,
    DecodingConfig,
    StepModel,
    beam_search,
    generate,
    greedy_decode,
)
from ifnet.decoding.search import _penalise_trigrams
from ifnet.layers import SAFormerConfig, SAFormerDecoder, sinusoidal_positions

PAD, BOS, EOS, A, B, C = 0, 1, 2, 3, 4, 5
IDS = dict(bos_id=BOS, eos_id=EOS)


# --------------------------------------------------------------------------------------------
# A Markov "model": next-token log-probabilities depend on the batch item and the last token
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MarkovState:
    item: torch.Tensor  # [R] which batch item each row belongs to

    def index_select(self, idx: torch.Tensor) -> "MarkovState":
        return MarkovState(self.item.index_select(0, idx))


class MarkovModel:
    """``tables[b, last, next]`` = log P(next | last) for batch item b; pad and bos are never produced."""

    def __init__(self, probs: torch.Tensor) -> None:
        if probs.dim() == 2:
            probs = probs.unsqueeze(0)
        self.tables = probs.double().log()
        self.steps = 0

    def start(self, batch_inputs: torch.Tensor) -> MarkovState:  # batch_inputs: item ids [B]
        return MarkovState(batch_inputs.clone())

    def step(self, tokens, state):
        self.steps += 1
        return self.tables[state.item, tokens].float(), state

    def log_prob(self, item: int, seq) -> float:
        prev, total = BOS, 0.0
        for tok in seq:
            total += float(self.tables[item, prev, tok])
            prev = tok
        return total


def table(vocab: int, rows: dict) -> torch.Tensor:
    """Transition probabilities [V, V]: ``rows[last] = {next: p}``; unspecified rows go uniformly to A."""
    probs = torch.zeros(vocab, vocab)
    for last in range(vocab):
        for nxt, p in rows.get(last, {A: 1.0}).items():
            probs[last, nxt] = p
    return probs


# Greedy takes A (0.55) and then keeps choosing A (0.4 > 0.35 > 0.25); the best report is B <eos>.
GREEDY_TRAP = table(5, {BOS: {A: 0.55, B: 0.45}, A: {A: 0.4, EOS: 0.35, B: 0.25}, B: {EOS: 0.9, A: 0.05, B: 0.05}})


def one_item():
    return torch.zeros(1, dtype=torch.long)


def test_toy_model_satisfies_the_protocol():
    model = MarkovModel(GREEDY_TRAP)
    assert isinstance(model, StepModel) and isinstance(model.start(one_item()), DecodeState)


def test_beam_three_finds_the_known_best_sequence_where_greedy_does_not():
    model = MarkovModel(GREEDY_TRAP)
    assert greedy_decode(model, one_item(), max_len=4, **IDS).tolist() == [[A, A, A, A]]
    out = beam_search(model, one_item(), beam_size=3, max_len=4, return_scores=True, **IDS)
    assert isinstance(out, BeamSearchOutput)
    assert out.tokens.tolist() == [[B, EOS]]
    assert out.scores.item() == pytest.approx(math.log(0.45 * 0.9), abs=1e-6)


def test_length_penalty_can_prefer_the_longer_report():
    # B <eos> has p = 0.405 (length 2); A <eos> ... compare B <eos> with A A <eos> under a strong alpha
    model = MarkovModel(table(5, {BOS: {A: 0.5, B: 0.5}, A: {A: 0.9, EOS: 0.1},
                                  B: {EOS: 0.3, A: 0.7}}))
    short = beam_search(model, one_item(), beam_size=3, max_len=8, length_penalty=0.0, **IDS)
    assert short.tolist() == [[B, EOS]]  # raw log p: 0.15 beats everything longer
    long = beam_search(model, one_item(), beam_size=3, max_len=8, length_penalty=3.0,
                       block_trigrams=False, return_scores=True, **IDS)
    tokens = long.tokens[0].tolist()
    assert len(tokens) > 2
    lp = ((5 + len(tokens)) / 6) ** 3.0
    assert long.scores.item() == pytest.approx(model.log_prob(0, tokens) / lp, abs=1e-5)
    assert long.scores.item() > math.log(0.15) / ((5 + 2) / 6) ** 3.0


# --------------------------------------------------------------------------------------------
# Beam search with a wide enough beam is exhaustive search
# --------------------------------------------------------------------------------------------


def brute_force_best(model: MarkovModel, item: int, max_len: int, alpha: float) -> float:
    best = -math.inf
    for length in range(1, max_len + 1):
        for body in itertools.product([A, B], repeat=length - 1):
            best = max(best, model.log_prob(item, list(body) + [EOS]) / ((5 + length) / 6) ** alpha)
    for body in itertools.product([A, B], repeat=max_len):  # open at max_len: scored as ending there
        best = max(best, model.log_prob(item, list(body)) / ((5 + max_len) / 6) ** alpha)
    return best


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), alpha=st.sampled_from([0.0, 0.6, 1.0, 2.5]), max_len=st.integers(1, 3))
def test_wide_beam_equals_exhaustive_search(seed, alpha, max_len):
    g = torch.Generator().manual_seed(seed)
    probs = torch.zeros(2, 5, 5)
    probs[:, :, [A, B, EOS]] = torch.rand(2, 5, 3, generator=g) + 0.05
    probs /= probs.sum(-1, keepdim=True)
    model = MarkovModel(probs)
    out = beam_search(model, torch.tensor([0, 1]), beam_size=16, max_len=max_len, length_penalty=alpha,
                      block_trigrams=False, return_scores=True, **IDS)
    for item in range(2):
        expected = brute_force_best(model, item, max_len, alpha)
        assert out.scores[item].item() == pytest.approx(expected, abs=1e-5)
        tokens = [t for t in out.tokens[item].tolist() if t != PAD]
        recomputed = model.log_prob(item, tokens) / ((5 + len(tokens)) / 6) ** alpha
        assert recomputed == pytest.approx(expected, abs=1e-5)


# --------------------------------------------------------------------------------------------
# Beam 1 = greedy; batching changes nothing
# --------------------------------------------------------------------------------------------


def random_markov(items=4, vocab=7, seed=0, eos_boost=0.0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(items, vocab, vocab, generator=g) + 0.01
    probs[:, :, [PAD, BOS]] = 0.0
    probs[:, :, EOS] += eos_boost
    return MarkovModel(probs / probs.sum(-1, keepdim=True))


@pytest.mark.parametrize("block", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_one_equals_greedy(seed, block):
    model = random_markov(seed=seed, eos_boost=0.3)
    items = torch.arange(4)
    greedy = greedy_decode(model, items, max_len=15, block_trigrams=block, **IDS)
    beam = beam_search(model, items, beam_size=1, max_len=15, block_trigrams=block, **IDS)
    assert torch.equal(beam, greedy)


@pytest.mark.parametrize("beam_size", [1, 3, 5])
def test_batched_beam_search_equals_one_item_at_a_time(beam_size):
    model = random_markov(items=5, seed=3, eos_boost=0.2)
    batched = beam_search(model, torch.arange(5), beam_size=beam_size, max_len=12, return_scores=True, **IDS)
    for item in range(5):
        single = beam_search(model, torch.tensor([item]), beam_size=beam_size, max_len=12,
                             return_scores=True, **IDS)
        row = batched.tokens[item, : single.tokens.shape[1]]
        assert torch.equal(row, single.tokens[0])
        assert (batched.tokens[item, single.tokens.shape[1]:] == PAD).all()
        assert batched.scores[item].item() == pytest.approx(single.scores.item(), abs=1e-6)


def test_beam_pool_holds_every_kept_hypothesis_best_first():
    model = random_markov(items=3, seed=5, eos_boost=0.3)
    items = torch.arange(3)
    best = beam_search(model, items, beam_size=4, max_len=10, return_scores=True, **IDS)
    pool = beam_search(model, items, beam_size=4, max_len=10, return_pool=True, **IDS)
    assert isinstance(pool, BeamPool) and pool.tokens.shape[:2] == (3, 4) and pool.scores.shape == (3, 4)
    for item in range(3):
        first = pool.tokens[item, 0, : best.tokens.shape[1]]
        assert torch.equal(first, best.tokens[item]) and pool.scores[item, 0] == best.scores[item]
        scores = pool.scores[item].tolist()
        assert scores == sorted(scores, reverse=True)
        seen = set()
        for r in range(4):
            tokens = [t for t in pool.tokens[item, r].tolist() if t != PAD]
            assert tuple(tokens) not in seen  # distinct hypotheses
            seen.add(tuple(tokens))
            assert model.log_prob(item, tokens) == pytest.approx(scores[r], abs=1e-5)  # length_penalty 0


def test_output_layout_no_bos_eos_kept_pad_after():
    # item 0 ends at once; item 1 says A A then ends
    probs = torch.stack([table(5, {BOS: {EOS: 1.0}}),
                         table(5, {BOS: {A: 1.0}, A: {A: 0.6, EOS: 0.4}})])
    probs = probs.clamp_min(1e-9)
    model = MarkovModel(probs / probs.sum(-1, keepdim=True))
    greedy = greedy_decode(model, torch.arange(2), max_len=10, **IDS)
    assert greedy.tolist()[0][:1] == [EOS] and all(t == PAD for t in greedy.tolist()[0][1:])
    assert BOS not in greedy.tolist()[1]
    beam = beam_search(model, torch.arange(2), beam_size=2, max_len=10, block_trigrams=False, **IDS)
    assert beam.tolist()[0] == [EOS] + [PAD] * (beam.shape[1] - 1)


# --------------------------------------------------------------------------------------------
# Stopping and max length
# --------------------------------------------------------------------------------------------


def test_greedy_stops_when_every_row_has_ended():
    model = MarkovModel(torch.stack([table(5, {BOS: {EOS: 1.0}}), table(5, {BOS: {A: 1.0}, A: {EOS: 1.0}})]))
    out = greedy_decode(model, torch.arange(2), max_len=60, **IDS)
    assert out.tolist() == [[EOS, PAD], [A, EOS]]
    assert model.steps == 2


@pytest.mark.parametrize("search", ["greedy", "beam"])
@pytest.mark.parametrize("max_len", [1, 5, DEFAULT_MAX_LEN["iu_xray"]])
def test_max_length_is_respected_when_eos_never_comes(search, max_len):
    model = MarkovModel(table(6, {BOS: {A: 0.5, B: 0.5}, A: {A: 0.3, B: 0.3, C: 0.4},
                                  B: {A: 0.4, B: 0.3, C: 0.3}, C: {A: 0.5, B: 0.5}}))
    items = torch.zeros(3, dtype=torch.long)
    if search == "greedy":
        out = greedy_decode(model, items, max_len=max_len, **IDS)
    else:
        out = beam_search(model, items, beam_size=3, max_len=max_len, block_trigrams=False, **IDS)
    assert out.shape == (3, max_len) and not (out == EOS).any() and not (out == PAD).any()
    assert model.steps == max_len


def test_default_max_lengths():
    assert DEFAULT_MAX_LEN == {"iu_xray": 60, "mimic_cxr": 100}
    assert DecodingConfig().max_len == 60 and DecodingConfig().beam_size == 3


# --------------------------------------------------------------------------------------------
# Trigram blocking
# --------------------------------------------------------------------------------------------


def test_penalise_trigrams_hand_computed():
    logp = torch.zeros(2, 6)
    history = torch.tensor([[A, B, A, B, C, A, B], [A, B, C, A, C, B, A]])
    hard = _penalise_trigrams(logp, history, math.inf)
    # row 0 ends (A, B): earlier A B -> A, A B -> C  => ban A and C; row 1 ends (B, A): no earlier "B A"
    assert torch.isinf(hard[0, [A, C]]).all() and torch.isfinite(hard[0, [PAD, BOS, EOS, B]]).all()
    assert torch.isfinite(hard[1]).all()
    soft = _penalise_trigrams(logp, history, math.log(4))
    assert soft[0, A].item() == pytest.approx(-math.log(4)) and soft[0, C].item() == pytest.approx(-math.log(4))
    history = torch.tensor([[A, B, A, B, A, B]])  # "A B A" twice: penalty counted twice
    assert _penalise_trigrams(torch.zeros(1, 6), history, 1.0)[0, A].item() == -2.0
    assert torch.equal(_penalise_trigrams(logp, history[:, :2].expand(2, 2), math.inf), logp)  # too short


def repeats_a_trigram(seq) -> bool:
    grams = [tuple(seq[i : i + 3]) for i in range(len(seq) - 2)]
    return len(grams) != len(set(grams))


def test_trigram_blocking_prevents_a_repeating_loop():
    # the model loves "A B A B ..." and rarely ends
    model = MarkovModel(table(6, {BOS: {A: 0.9, C: 0.1}, A: {B: 0.9, C: 0.05, EOS: 0.05},
                                  B: {A: 0.9, C: 0.05, EOS: 0.05}, C: {A: 0.4, B: 0.4, EOS: 0.2}}))
    unblocked = beam_search(model, one_item(), beam_size=3, max_len=12, block_trigrams=False, **IDS)[0].tolist()
    assert repeats_a_trigram([t for t in unblocked if t != PAD])
    for search in ("beam", "greedy"):
        if search == "beam":
            out = beam_search(model, one_item(), beam_size=3, max_len=12, block_trigrams=True, **IDS)
        else:
            out = greedy_decode(model, one_item(), max_len=12, block_trigrams=True, **IDS)
        seq = [t for t in out[0].tolist() if t != PAD]
        assert not repeats_a_trigram(seq), seq


# --------------------------------------------------------------------------------------------
# Argument checks, config dispatch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [dict(max_len=0), dict(max_len=5, beam_size=0),
                                    dict(max_len=5, trigram_penalty=0.0)])
def test_bad_arguments_are_rejected(kwargs):
    with pytest.raises(ValueError):
        beam_search(MarkovModel(GREEDY_TRAP), one_item(), **IDS, **kwargs)


def test_generate_dispatches_on_the_config():
    model = MarkovModel(GREEDY_TRAP)
    greedy = DecodingConfig(beam_size=1, max_len=4)  # trigram blocking is on: a 4th A would repeat "A A A"
    assert generate(model, one_item(), greedy, bos_id=BOS, eos_id=EOS, pad_id=PAD).tolist() == [[A, A, A, EOS]]
    assert generate(model, one_item(), DecodingConfig(beam_size=3, max_len=4), bos_id=BOS, eos_id=EOS,
                    pad_id=PAD).tolist() == [[B, EOS]]
    with pytest.raises(ValueError):
        DecodingConfig(beam_size=0)


# --------------------------------------------------------------------------------------------
# SAFormer through the protocol: cached state (recurrent / KV cache) equals recomputing everything
# --------------------------------------------------------------------------------------------


class TinyCaptioner(nn.Module):
    """Embedding + sinusoidal positions + SAFormerDecoder + output layer, as a StepModel."""

    def __init__(self, attention: str, vocab: int = 9, d: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, d)
        self.decoder = SAFormerDecoder(SAFormerConfig(d_model=d, num_heads=2, num_decoder_layers=2, d_ff=32,
                                                      dropout=0.0, attention=attention))
        self.head = nn.Linear(d, vocab)
        self.register_buffer("positions", sinusoidal_positions(64, d))
        self.eval()

    def start(self, batch_inputs):
        memory, mask = batch_inputs
        return self.decoder.init_state(memory, mask)

    def step(self, tokens, state):
        y_t = self.embed(tokens) + self.positions[state.length]
        out, state = self.decoder.step(y_t, state)
        return self.head(out), state


@dataclass(frozen=True)
class HistoryState:
    memory: torch.Tensor
    mask: torch.Tensor
    tokens: torch.Tensor  # [R, t]

    def index_select(self, idx):
        return HistoryState(self.memory[idx], self.mask[idx], self.tokens[idx])


class RecomputeEveryStep:
    """The same network decoded without any cache: a full forward pass over the prefix at each step."""

    def __init__(self, net: TinyCaptioner) -> None:
        self.net = net

    def start(self, batch_inputs):
        memory, mask = batch_inputs
        return HistoryState(memory, mask, torch.zeros(memory.shape[0], 0, dtype=torch.long))

    def step(self, tokens, state):
        history = torch.cat([state.tokens, tokens.unsqueeze(1)], dim=1)
        y = self.net.embed(history) + self.net.positions[: history.shape[1]]
        out = self.net.decoder(y, state.memory, state.mask)
        return self.net.head(out[:, -1]), HistoryState(state.memory, state.mask, history)


@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_saformer_cached_decoding_equals_recomputation(attention):
    net = TinyCaptioner(attention)
    g = torch.Generator().manual_seed(5)
    memory = torch.randn(3, 6, 16, generator=g)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    inputs = (memory, mask)
    kw = dict(bos_id=BOS, eos_id=EOS, max_len=10)
    assert torch.equal(greedy_decode(net, inputs, **kw), greedy_decode(RecomputeEveryStep(net), inputs, **kw))
    cached = beam_search(net, inputs, beam_size=3, return_scores=True, **kw)
    plain = beam_search(RecomputeEveryStep(net), inputs, beam_size=3, return_scores=True, **kw)
    assert torch.equal(cached.tokens, plain.tokens)
    torch.testing.assert_close(cached.scores, plain.scores, rtol=0, atol=1e-4)
    assert torch.equal(beam_search(net, inputs, beam_size=1, block_trigrams=False, **kw),
                       greedy_decode(net, inputs, **kw))
