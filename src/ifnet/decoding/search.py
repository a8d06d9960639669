"""Greedy decoding and batched beam search over any ``StepModel`` (see ``ifnet.decoding``).

Conventions shared by both searches:

* The returned ``tokens`` [B, L] hold the generated tokens only: no ``bos_id``; ``eos_id`` is kept
  where the sequence ended (so a caller can tell a finished report from one cut at ``max_len``),
  and everything after it is ``pad_id``. ``L <= max_len`` is the longest sequence in the batch.
* ``max_len`` counts generated tokens including ``eos_id``.
* Trigram blocking: a token that would repeat a trigram already in the hypothesis gets its
  log-probability lowered by ``trigram_penalty`` per earlier occurrence; the default ``inf`` bans
  it outright. R2Gen and the other captioning forks add ``2 ln(1/2)`` per occurrence
  (``trigram_penalty=math.log(4)``), a soft penalty; pass that to reproduce them.

Beam search scores a finished hypothesis of ``L`` tokens (``eos_id`` included) by GNMT's
length-normalised log-probability ``log p / ((5 + L) / 6) ** length_penalty`` (Wu et al., 2016);
``length_penalty=0`` (the default, as in R2Gen) ranks by raw log-probability, which favours
shorter reports, and larger values favour longer ones. Finished hypotheses are kept in a pool of
``beam_size`` per batch item; a batch item stops when no live beam can still beat the worst one in
the pool (an exact bound, using that log-probabilities only decrease and the penalty is monotone in
L). Beams still open at ``max_len`` compete as if they ended there. As in the usual implementation
(fairseq / Hugging Face), an ``eos_id`` candidate enters the pool only if it ranks within the top
``beam_size`` candidates of its step, which makes ``beam_size=1`` exactly greedy decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ifnet.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

if TYPE_CHECKING:
    from ifnet.decoding import StepModel

Tensor = torch.Tensor


@dataclass
class DecodingConfig:
    beam_size: int = 3  # R2Gen's setting; 1 = greedy
    max_len: int = 60  # tokens incl. <eos>: R2Gen's max_seq_length for IU-Xray; use 100 for MIMIC-CXR
    length_penalty: float = 0.0  # GNMT alpha; 0 = rank by raw log-probability, as R2Gen does
    block_trigrams: bool = True  # R2Gen decodes with trigram blocking; reports otherwise repeat sentences
    trigram_penalty: float = math.inf  # per repeat; inf bans the repeat, log(4) is R2Gen's soft penalty
    # condition guidance weight (ifnet.decoding.guidance); 0 = plain decoding. Needs a model whose decoding
    # state carries the label condition (IFNet, the ONNX runtime).
    guidance: float = 0.0
    # with guidance: let it amplify an immediate repetition of the word just written (off by default, the
    # cap that stops guided reports stuttering; ifnet.decoding.guidance). True reproduces earlier decoding.
    amplify_repeats: bool = False
    # minimum Bayes-risk decoding (ifnet.decoding.mbr): 0 = off; N > 0 draws N reports per study from the
    # unguided model and returns the candidate (beam hypotheses and samples) they agree with most under
    # sentence BLEU-4 with a two-sided length penalty; with guidance, N // 2 samples of the guided model
    # join the candidates
    mbr_samples: int = 0
    mbr_temperature: float = 0.7  # sampling temperature of the guided candidates
    mbr_seed: int = 0  # seed of the sampling (a study is worded alike in any batch: ifnet.decoding.mbr)

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")
        if not self.trigram_penalty > 0:
            raise ValueError(f"trigram_penalty must be > 0, got {self.trigram_penalty}")
        from ifnet.decoding.guidance import valid_weight

        if not valid_weight(self.guidance):
            raise ValueError(f"guidance must be a finite number >= 0, got {self.guidance}")
        if self.mbr_samples < 0:
            raise ValueError(f"mbr_samples must be >= 0 (0: off), got {self.mbr_samples}")
        if not (self.mbr_temperature > 0 and math.isfinite(self.mbr_temperature)):
            raise ValueError(f"mbr_temperature must be a finite number > 0, got {self.mbr_temperature}")


class BeamSearchOutput(NamedTuple):
    tokens: Tensor  # [B, L] best hypothesis per batch item (see module docstring for the layout)
    scores: Tensor  # [B] its length-normalised log-probability


class BeamPool(NamedTuple):
    """Every finished hypothesis beam search kept: ``beam_size`` per batch item, best first."""

    tokens: Tensor  # [B, k, L] (layout as BeamSearchOutput.tokens, per hypothesis)
    scores: Tensor  # [B, k] length-normalised log-probabilities; -inf where fewer than k ended


def generate(model: "StepModel", batch_inputs: Any, cfg: Optional[DecodingConfig] = None, *,
             bos_id: int = BOS_ID, eos_id: int = EOS_ID, pad_id: int = PAD_ID,
             findings_of: Optional[Callable[[list[list[int]]], Any]] = None) -> Tensor:
    """Decode with ``cfg`` (default ``DecodingConfig()``), condition-guided when ``cfg.guidance > 0``: greedy when ``beam_size == 1`` and there is
    no length penalty (the two are then identical, greedy is cheaper), beam search otherwise, and minimum
    Bayes-risk selection among the beam and samples when ``cfg.mbr_samples > 0``, restricted to candidates
    stating the beam's findings when ``findings_of`` is given (:func:`ifnet.decoding.mbr.mbr_decode`). -> [B, L]."""
    cfg = DecodingConfig() if cfg is None else cfg
    plain = model
    if cfg.guidance > 0:
        from ifnet.decoding.guidance import GuidedStepModel

        model = GuidedStepModel(model, cfg.guidance, amplify_repeats=cfg.amplify_repeats)
    if cfg.mbr_samples > 0:
        from ifnet.decoding.mbr import mbr_decode

        return mbr_decode(model, batch_inputs, beam_size=cfg.beam_size, num_samples=cfg.mbr_samples,
                          max_len=cfg.max_len, evidence_model=plain,
                          guided_samples=cfg.mbr_samples // 2 if cfg.guidance > 0 else 0,
                          guided_temperature=cfg.mbr_temperature, findings_of=findings_of,
                          length_penalty=cfg.length_penalty, block_trigrams=cfg.block_trigrams,
                          trigram_penalty=cfg.trigram_penalty, seed=cfg.mbr_seed, bos_id=bos_id, eos_id=eos_id,
                          pad_id=pad_id)
    if cfg.beam_size == 1 and cfg.length_penalty == 0:
        return greedy_decode(model, batch_inputs, bos_id=bos_id, eos_id=eos_id, max_len=cfg.max_len,
                             pad_id=pad_id, block_trigrams=cfg.block_trigrams,
                             trigram_penalty=cfg.trigram_penalty)
    return beam_search(model, batch_inputs, beam_size=cfg.beam_size, bos_id=bos_id, eos_id=eos_id,
                       max_len=cfg.max_len, length_penalty=cfg.length_penalty,
                       block_trigrams=cfg.block_trigrams, trigram_penalty=cfg.trigram_penalty,
                       pad_id=pad_id)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _first_tensor(obj: Any) -> Optional[Tensor]:
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for item in obj:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _batch_size_and_device(batch_inputs: Any, state: Any) -> Tuple[int, torch.device]:
    """The batch size from ``state.batch_size`` or else the first tensor in ``batch_inputs``."""
    tensor = _first_tensor(batch_inputs)
    device = tensor.device if tensor is not None else torch.device("cpu")
    size = getattr(state, "batch_size", None)
    if isinstance(size, int):
        return size, device
    if tensor is None or tensor.dim() == 0:
        raise TypeError("cannot tell the batch size: give the decoding state a `batch_size` attribute "
                        "or pass batch_inputs containing a batched tensor")
    return tensor.shape[0], device


def _check_args(max_len: int, trigram_penalty: float) -> None:
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if not trigram_penalty > 0:
        raise ValueError(f"trigram_penalty must be > 0, got {trigram_penalty}")


def _penalise_trigrams(logp: Tensor, history: Tensor, penalty: float) -> Tensor:
    """Lower ``logp`` [R, V] for every token c such that (h[-2], h[-1], c) already occurs in ``history`` [R, t]."""
    t = history.shape[1]
    if t < 3:
        return logp
    last_two = history[:, t - 2:]
    repeats = (history[:, : t - 2] == last_two[:, :1]) & (history[:, 1: t - 1] == last_two[:, 1:])  # [R, t-2]
    counts = torch.zeros_like(logp).scatter_add_(1, history[:, 2:], repeats.to(logp.dtype))
    if math.isinf(penalty):
        return logp.masked_fill(counts > 0, -math.inf)
    return logp - penalty * counts


def _length_norm(length: Union[int, float], alpha: float) -> float:
    return ((5.0 + length) / 6.0) ** alpha


def _trim(tokens: Tensor, pad_id: int) -> Tensor:
    """Drop trailing columns that are ``pad_id`` in every row (keeps at least one column)."""
    used = (tokens != pad_id).any(dim=0).nonzero()
    length = int(used.max()) + 1 if used.numel() else 1
    return tokens[:, :length]


# --------------------------------------------------------------------------------------------
# Greedy
# --------------------------------------------------------------------------------------------


#: chooses each row's next token: ``(log-probabilities [rows, V] after the trigram rule, or raw logits when
#: trigram blocking is off; tokens so far [rows, t]) -> tokens [rows]``
TokenChooser = Callable[[Tensor, Tensor], Tensor]


def run_steps(model: "StepModel", state: Any, rows: int, device: torch.device, choose: TokenChooser, *,
              bos_id: int, eos_id: int, max_len: int, pad_id: int = PAD_ID, block_trigrams: bool = False,
              trigram_penalty: float = math.inf) -> Tensor:
    """The one-token-per-step loop of greedy decoding and sampling, from a decoding ``state`` of ``rows``
    rows: ``choose`` picks each step's tokens; rows that have ended get ``pad_id``; stops when every row
    has ended. Returns tokens [rows, L] (no bos; eos kept; pad after it)."""
    tokens = torch.full((rows,), bos_id, dtype=torch.long, device=device)
    out = torch.full((rows, max_len), pad_id, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    for t in range(max_len):
        logits, state = model.step(tokens, state)
        if block_trigrams:
            logits = _penalise_trigrams(F.log_softmax(logits.float(), dim=-1), out[:, :t], trigram_penalty)
        tokens = choose(logits, out[:, :t]).masked_fill(finished, pad_id)
        out[:, t] = tokens
        finished |= tokens == eos_id
        if bool(finished.all()):
            return out[:, : t + 1]
    return out


@torch.no_grad()
def greedy_decode(model: "StepModel", batch_inputs: Any, *, bos_id: int, eos_id: int, max_len: int,
                  pad_id: int = PAD_ID, block_trigrams: bool = False,
                  trigram_penalty: float = math.inf) -> Tensor:
    """Batched greedy decoding: the arg-max token at each step; stops when every row has ended.

    Returns tokens [B, L] (no bos; eos kept; pad after it). ``block_trigrams`` is off by default
    (plain greedy); with it on, this equals ``beam_search(beam_size=1, block_trigrams=True)``.
    """
    _check_args(max_len, trigram_penalty)
    state = model.start(batch_inputs)
    batch, device = _batch_size_and_device(batch_inputs, state)
    return run_steps(model, state, batch, device, lambda logits, _: logits.argmax(dim=-1), bos_id=bos_id,
                     eos_id=eos_id, max_len=max_len, pad_id=pad_id, block_trigrams=block_trigrams,
                     trigram_penalty=trigram_penalty)


# --------------------------------------------------------------------------------------------
# Beam search
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def beam_search(model: "StepModel", batch_inputs: Any, *, beam_size: int = 3, bos_id: int, eos_id: int,
                max_len: int, length_penalty: float = 0.0, block_trigrams: bool = True,
                trigram_penalty: float = math.inf, pad_id: int = PAD_ID,
                return_scores: bool = False, return_pool: bool = False
                ) -> Union[Tensor, BeamSearchOutput, BeamPool]:
    """Batched beam search over ``B x beam_size`` rows; returns the best hypothesis per batch item.

    Returns tokens [B, L] (no bos; eos kept; pad after it), or ``BeamSearchOutput(tokens, scores)``
    with ``return_scores=True``, or with ``return_pool=True`` all ``beam_size`` finished hypotheses per
    item as a :class:`BeamPool` (for reranking). Scoring, stopping and ``length_penalty``: see the module
    docstring.
    """
    _check_args(max_len, trigram_penalty)
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    k = beam_size
    state = model.start(batch_inputs)
    batch, device = _batch_size_and_device(batch_inputs, state)
    state = state.index_select(torch.arange(batch, device=device).repeat_interleave(k))
    row_offset = (torch.arange(batch, device=device) * k).unsqueeze(1)  # [B, 1]
    neg_inf = torch.tensor(-math.inf, device=device)

    # Live beams: raw log-probability sums. Only beam 0 starts live, so step 1 picks k distinct tokens.
    alive_scores = torch.full((batch, k), -math.inf, device=device)
    alive_scores[:, 0] = 0.0
    alive_tokens = torch.zeros(batch, k, 0, dtype=torch.long, device=device)
    # Pool of finished hypotheses: length-normalised scores, sorted best first.
    pool_scores = torch.full((batch, k), -math.inf, device=device)
    pool_tokens = torch.full((batch, k, max_len), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    last = torch.full((batch * k,), bos_id, dtype=torch.long, device=device)

    for t in range(max_len):
        length = t + 1  # tokens in a hypothesis after this step
        logits, state = model.step(last, state)
        logp = F.log_softmax(logits.float(), dim=-1)  # [B*k, V]
        if block_trigrams:
            logp = _penalise_trigrams(logp, alive_tokens.reshape(batch * k, t), trigram_penalty)
        vocab = logp.shape[-1]
        candidates = (alive_scores.reshape(-1, 1) + logp).reshape(batch, k * vocab)
        # 2k candidates always hold >= k that do not end (each beam has one eos candidate).
        top_scores, top_idx = candidates.topk(min(2 * k, k * vocab), dim=1)
        top_beam, top_token = top_idx // vocab, top_idx % vocab
        is_eos = top_token == eos_id
        histories = torch.cat([alive_tokens.gather(1, top_beam.unsqueeze(-1).expand(-1, -1, t)),
                               top_token.unsqueeze(-1)], dim=2)  # [B, 2k, t+1]

        # Finished: eos candidates ranked within the top k, for items still searching.
        rank_ok = torch.arange(top_scores.shape[1], device=device) < k
        ended = is_eos & rank_ok & ~done.unsqueeze(1)
        ended_scores = torch.where(ended, top_scores / _length_norm(length, length_penalty), neg_inf)
        pool_scores, pool_tokens = _merge_pool(pool_scores, pool_tokens, ended_scores, histories, pad_id)

        # Live: the best k candidates that did not end.
        live_scores = torch.where(is_eos, neg_inf, top_scores)
        alive_scores, pick = live_scores.topk(k, dim=1)
        keep_beam = top_beam.gather(1, pick)
        alive_tokens = histories.gather(1, pick.unsqueeze(-1).expand(-1, -1, t + 1))
        last = alive_tokens[:, :, -1].reshape(-1)
        state = state.index_select((row_offset + keep_beam).reshape(-1))

        if length == max_len:
            break
        # Stop an item once no live beam can beat the worst pooled hypothesis at any future length.
        best_alive = alive_scores.max(dim=1).values
        bound = torch.maximum(best_alive / _length_norm(length + 1, length_penalty),
                              best_alive / _length_norm(max_len, length_penalty))
        done |= (pool_scores[:, -1] > -math.inf) & (bound <= pool_scores[:, -1])
        done |= best_alive == -math.inf
        if bool(done.all()):
            break

    if not bool(done.all()):  # open beams compete as if they ended at the current length
        open_scores = torch.where(done.unsqueeze(1), neg_inf, alive_scores / _length_norm(length, length_penalty))
        pool_scores, pool_tokens = _merge_pool(pool_scores, pool_tokens, open_scores, alive_tokens, pad_id)

    if return_pool:
        flat = _trim(pool_tokens.reshape(batch * k, max_len), pad_id)
        return BeamPool(flat.reshape(batch, k, -1), pool_scores)
    tokens = _trim(pool_tokens[:, 0], pad_id)
    return BeamSearchOutput(tokens, pool_scores[:, 0]) if return_scores else tokens


def _merge_pool(pool_scores: Tensor, pool_tokens: Tensor, new_scores: Tensor, new_tokens: Tensor,
                pad_id: int) -> Tuple[Tensor, Tensor]:
    """Keep the best ``k`` of the pool [B, k] and the new hypotheses [B, m] (-inf = not a hypothesis)."""
    k, max_len = pool_tokens.shape[1], pool_tokens.shape[2]
    new_tokens = F.pad(new_tokens, (0, max_len - new_tokens.shape[2]), value=pad_id)
    scores = torch.cat([pool_scores, new_scores], dim=1)
    tokens = torch.cat([pool_tokens, new_tokens], dim=1)
    best, idx = scores.topk(k, dim=1)
    return best, tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, max_len))
