"""Condition guidance: a toy conditioned model with known probabilities, and the real IFNet path."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch

from ifnet.decoding import DecodingConfig, beam_search, generate, greedy_decode
from ifnet.decoding.guidance import GuidedStepModel, normal_condition

PAD, BOS, EOS, NORMAL, ENLARGED = 0, 1, 2, 3, 4
IDS = dict(bos_id=BOS, eos_id=EOS)


@dataclass
class ToyState:
    condition: torch.Tensor  # [B, 14]

    @property
    def batch_size(self) -> int:
        return self.condition.shape[0]

    def index_select(self, idx: torch.Tensor) -> "ToyState":
        return replace(self, condition=self.condition.index_select(0, idx))


class ToyConditioned:
    """First word: P(ENLARGED) = 0.2 normally and 0.4 when the condition says Cardiomegaly (label 1):
    the condition raises the right word but not above the template word, as in an undertrained decoder.
    Then EOS. PAD and BOS are -inf (never produced)."""

    def start(self, condition: torch.Tensor) -> ToyState:
        return ToyState(condition.clone())

    def step(self, tokens: torch.Tensor, state: ToyState):
        rows = tokens.shape[0]
        logits = torch.full((rows, 5), -math.inf)
        first = tokens == BOS
        p_enlarged = 0.2 + 0.2 * state.condition[:, 1]
        logits[:, NORMAL] = torch.where(first, (1 - p_enlarged).log(), torch.tensor(-30.0))
        logits[:, ENLARGED] = torch.where(first, p_enlarged.log(), torch.tensor(-30.0))
        logits[:, EOS] = torch.where(first, torch.tensor(-30.0), torch.tensor(0.0))
        return logits, state


def _conditions(*positive: list[int]) -> torch.Tensor:
    out = torch.zeros(len(positive), 14)
    for row, labels in enumerate(positive):
        out[row, labels] = 1.0
        if not labels:
            out[row, 13] = 1.0  # No Finding
    return out


def test_guidance_amplifies_what_the_condition_adds_and_leaves_normal_studies_alone():
    cond = _conditions([1], [])  # study 0: Cardiomegaly; study 1: No Finding
    plain = greedy_decode(ToyConditioned(), cond, max_len=3, **IDS)
    assert plain[:, 0].tolist() == [NORMAL, NORMAL]  # 0.6 > 0.4: the template wins
    # log 0.4 + w (log 0.4 - log 0.2) vs log 0.6 + w (log 0.6 - log 0.8): ENLARGED wins once w >= ~0.6.
    guided = greedy_decode(GuidedStepModel(ToyConditioned(), 1.0), cond, max_len=3, **IDS)
    assert guided[:, 0].tolist() == [ENLARGED, NORMAL]
    beam = beam_search(GuidedStepModel(ToyConditioned(), 1.0), cond, beam_size=2, max_len=3, **IDS)
    assert beam[:, 0].tolist() == [ENLARGED, NORMAL]


def test_weight_zero_is_plain_decoding_and_forbidden_tokens_stay_forbidden():
    cond = _conditions([1], [], [1, 9])
    model = ToyConditioned()
    state = model.start(cond)
    tokens = torch.full((3,), BOS)
    plain, _ = model.step(tokens, state)
    guided, _ = GuidedStepModel(model, 0.0).step(tokens, GuidedStepModel(model, 0.0).start(cond))
    torch.testing.assert_close(guided, torch.log_softmax(plain, -1))
    strong, _ = GuidedStepModel(model, 5.0).step(tokens, GuidedStepModel(model, 5.0).start(cond))
    assert not torch.isnan(strong).any()
    assert torch.isneginf(strong[:, [PAD, BOS]]).all()


def test_normal_condition_and_weight_checks():
    like = torch.rand(2, 14)
    assert normal_condition(like).tolist() == [[0.0] * 13 + [1.0]] * 2
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="guidance"):
            GuidedStepModel(ToyConditioned(), bad)
        with pytest.raises(ValueError, match="guidance"):
            DecodingConfig(guidance=bad)


def test_generate_applies_the_configured_guidance():
    cond = _conditions([1])
    assert generate(ToyConditioned(), cond, DecodingConfig(beam_size=1, max_len=3), **IDS)[0, 0] == NORMAL
    assert generate(ToyConditioned(), cond, DecodingConfig(beam_size=1, max_len=3, guidance=1.0),
                    **IDS)[0, 0] == ENLARGED


def test_ifnet_guided_decoding_runs_and_matches_a_manual_contrast():
    """On IFNet the normal branch shares the encoder output and differs only in the decoder's condition."""
    from ifnet.layers.saformer import SAFormerConfig
    from ifnet.models.ifnet import IFNet, IFNetConfig, IFNetDecoder

    torch.manual_seed(0)
    cfg = IFNetConfig(vocab_size=20, extractor="resnet18", num_memory_slots=16, memory_top_k=4, memory_heads=2,
                      max_positions=30, transformer=SAFormerConfig(d_model=32, num_heads=2, num_encoder_layers=1,
                                                                   num_decoder_layers=1, d_ff=32))
    model = IFNet(cfg).eval()
    with torch.no_grad():
        model.condition_logits.weight.normal_(std=1.0)
        features = torch.randn(2, 2, model.extractor.out_channels, 2, 2)
        mask = torch.ones(2, 2, dtype=torch.bool)
        enc = model.encode(None, mask, _conditions([1, 9], [2]), features=features)
        guided = GuidedStepModel(IFNetDecoder(model), 1.5)
        logp, _ = guided.step(torch.full((2,), BOS), guided.start(enc))
        adapter = IFNetDecoder(model)
        main, _ = adapter.step(torch.full((2,), BOS), adapter.start(enc))
        state = adapter.start(enc)
        normal, _ = adapter.step(torch.full((2,), BOS), replace(state, condition=normal_condition(state.condition)))
        lm, ln = torch.log_softmax(main, -1), torch.log_softmax(normal, -1)
        finite = torch.isfinite(lm)
        torch.testing.assert_close(logp[finite], (lm + 1.5 * (lm - ln))[finite])
        tokens = model.decode(enc, beam_size=3, max_len=10, guidance=1.5)
    assert tokens.shape[0] == 2 and tokens.shape[1] <= 10


class ToyStutter:
    """After FINDING (token 3) the conditional model still gives FINDING 0.1 (EOS 0.9); the normal
    condition gives it 0.01. Guidance alone would amplify the repeat: log 0.1 + 2 (log 0.1 - log 0.01)
    = log 10 > log 0.9 + 2 (log 0.9 - log 0.99). After NORMAL-token 4 the model itself repeats it (p 0.6
    under both conditions: a repetition the data contain, like IU-Xray's "xxxx xxxx")."""

    def start(self, condition: torch.Tensor) -> ToyState:
        return ToyState(condition.clone())

    def step(self, tokens: torch.Tensor, state: ToyState):
        rows = tokens.shape[0]
        finding = state.condition[:, 1] > 0
        logits = torch.full((rows, 5), -math.inf)
        first, after_finding, after_mask = tokens == BOS, tokens == NORMAL, tokens == ENLARGED
        p_rep = torch.where(finding, torch.tensor(0.1), torch.tensor(0.01))
        # first word: FINDING (3) under the finding condition, the mask word (4) otherwise
        logits[:, NORMAL] = torch.where(first, torch.where(finding, 0.0, -30.0),
                                        torch.where(after_finding, p_rep.log(), torch.tensor(-30.0)))
        logits[:, ENLARGED] = torch.where(first, torch.where(finding, -30.0, 0.0),
                                          torch.where(after_mask, torch.tensor(0.6).log(), torch.tensor(-30.0)))
        logits[:, EOS] = torch.where(after_finding, (1 - p_rep).log(),
                                     torch.where(after_mask, torch.tensor(0.4).log(), torch.tensor(-30.0)))
        return logits, state


def test_guidance_never_amplifies_an_immediate_repeat():
    cond = _conditions([1])
    stutter = greedy_decode(GuidedStepModel(ToyStutter(), 2.0, amplify_repeats=True), cond, max_len=4, **IDS)
    assert stutter[0].tolist()[:3] == [NORMAL, NORMAL, NORMAL]  # the artefact the cap removes
    capped = greedy_decode(GuidedStepModel(ToyStutter(), 2.0), cond, max_len=4, **IDS)
    assert capped[0].tolist()[:2] == [NORMAL, EOS]
    # the cap equals the conditional log-probability of the previous token; other tokens keep guidance
    model = GuidedStepModel(ToyStutter(), 2.0)
    state = model.start(cond)
    _, state = model.step(torch.tensor([BOS]), state)
    logp, _ = model.step(torch.tensor([NORMAL]), state)
    assert logp[0, NORMAL].item() == pytest.approx(math.log(0.1), abs=1e-6)
    assert logp[0, EOS].item() == pytest.approx(math.log(0.9) + 2 * (math.log(0.9) - math.log(0.99)), abs=1e-5)
    # through generate / DecodingConfig, greedy and beam alike (trigram blocking off: it would cut the
    # uncapped stutter at three words, as in the reports it was seen in)
    for beam in (1, 3):
        cfg = DecodingConfig(beam_size=beam, max_len=4, guidance=2.0, block_trigrams=False)
        assert generate(ToyStutter(), cond, cfg, **IDS)[0].tolist()[:2] == [NORMAL, EOS]
        old = DecodingConfig(beam_size=beam, max_len=4, guidance=2.0, block_trigrams=False, amplify_repeats=True)
        assert generate(ToyStutter(), cond, old, **IDS)[0].tolist()[:3] == [NORMAL, NORMAL, NORMAL]


def test_a_repeat_the_model_itself_predicts_survives_the_cap():
    cond = _conditions([])  # normal study: first word is the mask word, which the model repeats (p 0.6)
    for amplify in (False, True):
        out = greedy_decode(GuidedStepModel(ToyStutter(), 2.0, amplify_repeats=amplify), cond, max_len=3, **IDS)
        assert out[0].tolist() == [ENLARGED, ENLARGED, ENLARGED]
