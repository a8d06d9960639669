"""Decoding outside the model: greedy and batched beam search against a small step protocol.

Any model can be decoded that offers ``start(batch_inputs) -> state`` and
``step(tokens [B] long, state) -> (logits [B, V], state)``, where the state can be reordered with
``state.index_select(idx)``. The search code never looks inside the state, so the same functions
serve linear attention (a fixed-size recurrent state) and softmax attention (a key/value cache).
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Tuple, TypeVar, runtime_checkable

import torch

_S = TypeVar("_S", bound="DecodeState")


@runtime_checkable
class DecodeState(Protocol):
    """A model's decoding state for B rows (one per hypothesis)."""

    def index_select(self: _S, idx: torch.Tensor) -> _S:
        """Rows ``idx`` [B'] of the state (repeat for beam expansion, permute for reordering)."""
        ...


@runtime_checkable
class StepModel(Protocol):
    """What greedy and beam search need of a model.

    ``start`` encodes the inputs once (images -> memory, cross-attention summaries). ``step`` takes
    the previous token of every row (``bos_id`` on the first call) and returns next-token logits.
    ``step`` must not modify the state it is given: beam search may reuse it.
    """

    def start(self, batch_inputs: Any) -> DecodeState:
        ...

    def step(self, tokens: torch.Tensor, state: Any) -> Tuple[torch.Tensor, Any]:
        ...


# Longest report to generate, in tokens including <eos>: R2Gen's max_seq_length per data set.
DEFAULT_MAX_LEN: Mapping[str, int] = {"iu_xray": 60, "mimic_cxr": 100}

from ifnet.decoding.search import (  # noqa: E402  (the protocol above is what search.py type-checks against)
    BeamPool,
    BeamSearchOutput,
    DecodingConfig,
    beam_search,
    generate,
    greedy_decode,
)

__all__ = [
    "DEFAULT_MAX_LEN",
    "BeamPool",
    "BeamSearchOutput",
    "DecodeState",
    "DecodingConfig",
    "StepModel",
    "beam_search",
    "generate",
    "greedy_decode",
]
