"""Minimum Bayes-risk (MBR) decoding: the candidate report the model's own samples agree with most.

Beam search returns (close to) the *most probable* report. When the references of similar studies are
written in many styles, the most probable report is often a short one that shares few n-grams with any
of them, and BLEU rewards the report that is *central* among the plausible ones instead. MBR decoding
(Kumar & Byrne, 2004; Eikema & Aziz, 2020) estimates that centre from the model itself:

1. draw ``num_samples`` reports per study by ancestral sampling (temperature 1, trigram blocking as in
   beam search) from the model without condition guidance: the model's own distribution of reports;
2. the candidates are the beam's finished hypotheses (guided, when guidance is on), some samples from
   the guided model at a lower temperature, and the samples of step 1;
3. with ``findings_of`` (the decoders in :mod:`ifnet.evaluation` and :mod:`ifnet.inference` pass the
   project's labeler), only the candidates that state exactly the findings of the beam's best report
   are eligible: MBR then changes how the report is worded, never what it says (*findings-preserving*);
4. each eligible candidate's expected utility is its mean :func:`utility` against the samples of step 1
   (a sample is never compared with itself), and the best one is returned (ties: the earlier one, so the
   beam's best wins a tie). The utility is smoothed sentence BLEU-4 with a *two-sided* length penalty:
   BLEU's brevity penalty ``exp(1 - r/c)`` punishes only a candidate shorter than the sample, so against
   samples of many lengths the longest plausible candidate pays least and plain BLEU picks reports longer
   than the model's typical one; ``exp(1 - max(r/c, c/r))`` punishes a length mismatch either way.
   (``select(..., two_sided=False)`` restores plain sentence BLEU-4.)

Nothing outside the study's own inputs enters: no reference text, no other study. Sampling uses a
``torch.Generator`` seeded with ``seed``, and every study of a batch draws with the *same* random numbers
(Gumbel-max sampling, one noise draw per step shared across the batch): a study's samples depend on its own
inputs, the seed and the device, not on which other studies share its batch, so ``ifnet generate`` on one
study and ``ifnet evaluate`` on a split word a report alike (up to floating-point differences of batched
arithmetic).

Token conventions are those of :mod:`ifnet.decoding.search` (no bos; eos kept; pad after it).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ifnet.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

if TYPE_CHECKING:
    from ifnet.decoding import StepModel

Tensor = torch.Tensor

#: n-gram orders of the utility (BLEU-4)
ORDERS = 4

#: token lists of candidate reports -> their findings, an ``[n, k]`` array (e.g. 0/1 labels of the decoded text)
FindingsOf = Callable[[list[list[int]]], Any]


@torch.no_grad()
def sample(model: "StepModel", batch_inputs: Any, *, num_samples: int, max_len: int, temperature: float = 1.0,
           bos_id: int = BOS_ID, eos_id: int = EOS_ID, pad_id: int = PAD_ID, block_trigrams: bool = True,
           trigram_penalty: float = math.inf, seed: int = 0) -> Tensor:
    """``num_samples`` ancestral samples per batch item -> tokens ``[B, num_samples, L]``.

    Each step samples from ``softmax(log_softmax(logits) / temperature)`` after the same trigram rule as
    beam search, by the Gumbel-max trick: the arg-max of ``logp / temperature + G`` with standard Gumbel noise
    ``G [num_samples, V]`` drawn once per step and shared by every batch item (module docstring); rows that
    have ended get ``pad_id``."""
    from ifnet.decoding.search import _batch_size_and_device, _check_args, run_steps

    _check_args(max_len, trigram_penalty)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    state = model.start(batch_inputs)
    batch, device = _batch_size_and_device(batch_inputs, state)
    state = state.index_select(torch.arange(batch, device=device).repeat_interleave(num_samples))
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    tiny = torch.finfo(torch.float32).tiny

    def draw(logits: Tensor, _: Tensor) -> Tensor:
        logp = logits.float() if block_trigrams else F.log_softmax(logits.float(), dim=-1)
        uniform = torch.rand((num_samples, logp.shape[-1]), generator=generator, device=device)
        gumbel = -torch.log(-torch.log(uniform.clamp_min(tiny)))  # the same noise for every batch item
        scores = logp / temperature + gumbel.repeat(batch, 1)
        tokens = scores.argmax(dim=-1)
        dead = ~torch.isfinite(logp).any(dim=-1)  # every token forbidden (cannot happen with eos allowed)
        return tokens.masked_fill(dead, eos_id)

    out = run_steps(model, state, batch * num_samples, device, draw, bos_id=bos_id, eos_id=eos_id,
                    max_len=max_len, pad_id=pad_id, block_trigrams=block_trigrams, trigram_penalty=trigram_penalty)
    return out.reshape(batch, num_samples, -1)


def _content(tokens: Sequence[int], eos_id: int, pad_id: int) -> tuple[int, ...]:
    """The report's words: up to (not including) eos, pad dropped."""
    words = []
    for tok in tokens:
        if tok == eos_id:
            break
        if tok != pad_id:
            words.append(int(tok))
    return tuple(words)


def _ngrams(words: tuple[int, ...]) -> list[Counter]:
    return [Counter(words[i:i + n] for i in range(len(words) - n + 1)) for n in range(1, ORDERS + 1)]


def sentence_bleu(hyp: Sequence[int], ref: Sequence[int]) -> float:
    """Smoothed sentence BLEU-4 of one word sequence against one reference (add-one smoothing of the 2- to
    4-gram precisions, Lin & Och 2004; brevity penalty as in BLEU). 0 for an empty hypothesis."""
    return _bleu(tuple(hyp), _ngrams(tuple(hyp)), len(ref), _ngrams(tuple(ref)))


def utility(hyp: Sequence[int], ref: Sequence[int]) -> float:
    """MBR's utility: :func:`sentence_bleu` with the length penalty applied both ways, ``exp(1 - max(r/c,
    c/r))`` for hypothesis length ``c`` and reference length ``r`` (equal to BLEU's when ``c <= r``)."""
    return _bleu(tuple(hyp), _ngrams(tuple(hyp)), len(ref), _ngrams(tuple(ref)), two_sided=True)


def _bleu(hyp: tuple[int, ...], hyp_ngrams: list[Counter], ref_len: int, ref_ngrams: list[Counter],
          two_sided: bool = False) -> float:
    if not hyp:
        return 0.0
    log_p = 0.0
    for n in range(ORDERS):
        total = max(len(hyp) - n, 0)
        match = sum(min(c, ref_ngrams[n][g]) for g, c in hyp_ngrams[n].items())
        if n == 0:
            if match == 0:
                return 0.0
            log_p += math.log(match / total)
        else:
            log_p += math.log((match + 1) / (total + 1))
    brevity = min(0.0, 1.0 - ref_len / len(hyp))
    if two_sided and ref_len > 0:
        brevity = min(brevity, 1.0 - len(hyp) / ref_len)
    return math.exp(brevity + log_p / ORDERS)


def select(candidates: Sequence[Sequence[int]], samples: Sequence[Sequence[int]], *,
           candidate_is_sample: Sequence[int | None] = (), two_sided: bool = True, eos_id: int = EOS_ID,
           pad_id: int = PAD_ID) -> int:
    """Index of the candidate with the highest mean :func:`utility` against ``samples`` (ties: lowest index);
    ``two_sided=False``: mean :func:`sentence_bleu` (BLEU's one-sided brevity penalty) instead.

    ``candidate_is_sample[i] = j`` says candidate ``i`` *is* sample ``j``; that pair is left out of its mean.
    Token sequences may carry eos and pad (see the module docstring)."""
    if not candidates:
        raise ValueError("no candidates")
    if not samples:
        raise ValueError("no samples to estimate the expected utility with")
    own = list(candidate_is_sample) + [None] * (len(candidates) - len(candidate_is_sample))
    refs = []
    for s in samples:
        words = _content(s, eos_id, pad_id)
        refs.append((len(words), _ngrams(words)))
    best, best_score = 0, -math.inf
    seen: dict[tuple[int, ...], float] = {}
    for i, cand in enumerate(candidates):
        words = _content(cand, eos_id, pad_id)
        if words in seen and own[i] is None:
            score = seen[words]
        else:
            grams = _ngrams(words)
            scores = [_bleu(words, grams, rl, rg, two_sided) for j, (rl, rg) in enumerate(refs) if j != own[i]]
            score = sum(scores) / len(scores) if scores else 0.0
            if own[i] is None:
                seen[words] = score
        if score > best_score:
            best, best_score = i, score
    return best


@torch.no_grad()
def mbr_decode(model: "StepModel", batch_inputs: Any, *, beam_size: int, num_samples: int, max_len: int,
               evidence_model: Optional["StepModel"] = None, guided_samples: int = 0,
               guided_temperature: float = 0.7, findings_of: Optional[FindingsOf] = None,
               length_penalty: float = 0.0, block_trigrams: bool = True, trigram_penalty: float = math.inf,
               seed: int = 0, bos_id: int = BOS_ID, eos_id: int = EOS_ID, pad_id: int = PAD_ID) -> Tensor:
    """MBR among the beam's finished hypotheses and samples -> ``[B, L]``.

    * ``model``: the step model of the beam (e.g. condition-guided); its ``guided_samples`` samples at
      ``guided_temperature`` join the candidates.
    * ``evidence_model`` (default ``model``): ``num_samples`` samples from it at temperature 1 are the
      pseudo-references the expected BLEU is taken over, and candidates too. With guidance, this is the
      unguided model: its samples are the model's own distribution of reports for the study.
    * ``findings_of``: when given, only the candidates whose findings (``findings_of(token lists) -> [n, k]``
      0/1 array, e.g. the labeler on the decoded text) equal those of the beam's best report are eligible,
      so the report says exactly what the beam's report says and MBR chooses only how it is worded.
    """
    from ifnet.decoding.search import _trim, beam_search

    evidence_model = model if evidence_model is None else evidence_model
    pool = beam_search(model, batch_inputs, beam_size=beam_size, bos_id=bos_id, eos_id=eos_id, max_len=max_len,
                       length_penalty=length_penalty, block_trigrams=block_trigrams,
                       trigram_penalty=trigram_penalty, pad_id=pad_id, return_pool=True)
    common = dict(max_len=max_len, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, block_trigrams=block_trigrams,
                  trigram_penalty=trigram_penalty)
    evidence = sample(evidence_model, batch_inputs, num_samples=num_samples, seed=seed, **common)
    extra = (sample(model, batch_inputs, num_samples=guided_samples, temperature=guided_temperature,
                    seed=seed + 1, **common) if guided_samples > 0 else None)
    batch = pool.tokens.shape[0]
    out = torch.full((batch, max_len), pad_id, dtype=torch.long, device=pool.tokens.device)
    for b in range(batch):
        beams = [h for h, score in zip(pool.tokens[b].tolist(), pool.scores[b].tolist()) if score > -math.inf]
        refs = evidence[b].tolist()
        cands = beams + (extra[b].tolist() if extra is not None else []) + refs
        own: list[Optional[int]] = [None] * (len(cands) - len(refs)) + list(range(len(refs)))
        eligible = list(range(len(cands)))
        if findings_of is not None:
            found = np.asarray(findings_of(cands))
            eligible = [i for i in eligible if np.array_equal(found[i], found[0])]
        pick = eligible[select([cands[i] for i in eligible], refs, candidate_is_sample=[own[i] for i in eligible],
                               eos_id=eos_id, pad_id=pad_id)]
        chosen = torch.tensor(cands[pick], dtype=torch.long, device=out.device)
        out[b, : chosen.numel()] = chosen
    return _trim(out, pad_id)
