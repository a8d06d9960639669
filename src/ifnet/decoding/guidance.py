"""Condition guidance: decode with the label condition's effect on the next word amplified.

A report generator trained on templated reports (IU-Xray: most sentences say "normal") learns that its
label condition changes only a few words, by a little: the beam then keeps writing the normal template
even when the condition says "Cardiomegaly". Guidance contrasts each step's next-word distribution under
the study's condition with the distribution under the *normal* condition (No Finding only, a vector the
model saw thousands of times in training) and moves further in the direction the condition points:

    log p_guided = log p(w | condition) + weight * (log p(w | condition) - log p(w | normal))

(the classifier-free guidance of diffusion models, applied to text by Sanchez et al., 2023, "Stay on
topic with classifier-free guidance", with the normal report as the unconditional side). ``weight = 0``
is plain decoding. For a study whose condition *is* the normal one both sides agree and nothing changes;
so guidance only ever amplifies what the predicted findings add. The weight is a decoding setting chosen
on validation (``eval.guidance``); it costs one more decoder step per token.

Guidance never makes an immediate repetition more likely: for the word just written, the guided score is
at most its conditional log-probability, ``min(log p_guided, log p(w | condition))``. Without this cap a
finding word that the condition favours everywhere (IFNet's label-to-vocabulary bias is independent of the
context) is amplified again right after it was written, and reports stutter ("interstitial interstitial
interstitial"; 24 of 296 validation reports of the synthetic-image benchmark at weight 1, docs/RESULTS.md).
A repetition the model itself predicts (IU-Xray's anonymiser writes "xxxx xxxx") keeps its probability; the
cap only removes what guidance adds. ``amplify_repeats=True`` turns it off (the behaviour before it existed).

The wrapper works on any step model whose state is a dataclass with a ``condition [B, 14]`` field that the
step reads (:class:`ifnet.models.ifnet.IFNetDecodeState`, :class:`ifnet.export.runtime.OnnxDecodeState`):
the second branch shares the encoder output and differs only in that field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Tuple

import torch
import torch.nn.functional as F

from ifnet.labels import NUM_OBSERVATIONS

Tensor = torch.Tensor


def valid_weight(weight: float) -> bool:
    """Whether ``weight`` is a usable guidance weight: a finite number >= 0 (0: no guidance). The one rule
    behind every check of it (the config, ``DecodingConfig``, this module, ``--guidance``)."""
    return weight >= 0 and math.isfinite(weight)


def normal_condition(like: Tensor) -> Tensor:
    """The No-Finding-only label vector, shaped and typed like ``like [B, 14]``."""
    out = torch.zeros_like(like)
    out[:, NUM_OBSERVATIONS - 1] = 1.0
    return out


@dataclass
class GuidedState:
    main: Any  # the study's condition
    normal: Any  # the same state with the normal condition

    @property
    def batch_size(self) -> int:
        return self.main.batch_size

    def index_select(self, idx: Tensor) -> "GuidedState":
        return GuidedState(self.main.index_select(idx), self.normal.index_select(idx))


class GuidedStepModel:
    """``StepModel`` wrapper returning guided log-probabilities (see the module docstring)."""

    def __init__(self, inner: Any, weight: float, *, amplify_repeats: bool = False) -> None:
        if not valid_weight(weight):
            raise ValueError(f"guidance weight must be a finite number >= 0, got {weight}")
        self.inner = inner
        self.weight = float(weight)
        self.amplify_repeats = bool(amplify_repeats)

    def start(self, batch_inputs: Any) -> GuidedState:
        main = self.inner.start(batch_inputs)
        return GuidedState(main, replace(main, condition=normal_condition(main.condition)))

    def step(self, tokens: Tensor, state: GuidedState) -> Tuple[Tensor, GuidedState]:
        logits, main = self.inner.step(tokens, state.main)
        logits_normal, normal = self.inner.step(tokens, state.normal)
        logp = F.log_softmax(logits.float(), dim=-1)
        logp_normal = F.log_softmax(logits_normal.float(), dim=-1)
        guided = logp + self.weight * (logp - logp_normal)
        # Tokens the model forbids (-inf, e.g. pad and bos) stay forbidden; -inf - -inf would be nan.
        guided = torch.where(torch.isfinite(logp) & torch.isfinite(logp_normal), guided,
                             torch.full_like(guided, -math.inf))
        if not self.amplify_repeats:  # the word just written: no more likely than the condition alone makes it
            prev = tokens.reshape(-1, 1).to(torch.long)
            guided = guided.scatter(1, prev, torch.minimum(guided.gather(1, prev), logp.gather(1, prev)))
        return guided, GuidedState(main, normal)
