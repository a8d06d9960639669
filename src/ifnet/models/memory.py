"""Label-conditioned memory matrix: querying and responding (R2GenCMN's mechanism, IFNet's conditioning).

A matrix of learned slots ``[num_slots, d_model]`` is shared by the image and the text side. Each token
(a visual patch token or an embedded word) *queries* it: multi-head similarity between the projected
token and the projected slots, keeping only the ``top_k`` best slots per head, softmax over those. The
*response* is the softmax-weighted sum of the selected (projected) slots; the caller adds it to the
token (``x + response``), which is how R2GenCMN aligns both modalities through one memory.

IFNet feeds the memory with the text encoder's labels. Here a label vector ``c [B, 14]`` (0/1 labels, or
probabilities) becomes a per-slot bias ``c @ W [B, num_slots]`` added to every similarity logit before
the top-k, so the labels decide which slots are reachable and how much each weighs. Where ``c`` comes
from is the caller's business (see :class:`ifnet.models.ifnet.IFNet`): reference labels only in
training, the model's predicted probabilities or user-supplied findings at inference.

Every token is processed independently, so querying a word alone (incremental decoding) gives exactly
what it gets inside a full sequence.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MemoryMatrix", "MemorySlots", "MemoryReadout"]

# Up to this many query rows (batch x tokens) the memory read gathers the top-k value rows instead of a
# dense product over all slots: the same numbers, far fewer bytes for a decoding step.
GATHER_MAX_ROWS = 64


class MemorySlots(NamedTuple):
    """Slots after the key/value projections, per head: each ``[num_heads, num_slots, head_dim]``.

    Computed once per forward (or once per generated report) and reused by every query.
    """

    keys: Tensor
    values: Tensor


class MemoryReadout(NamedTuple):
    """Which slots each token read, for inspection and heatmaps: each ``[B, num_heads, T, top_k]``."""

    indices: Tensor
    weights: Tensor


class MemoryMatrix(nn.Module):
    """Learned slots queried with top-k multi-head attention; responses conditioned on a label vector."""

    def __init__(self, d_model: int, num_slots: int = 2048, num_heads: int = 8, top_k: int = 32,
                 num_labels: int = 14, dropout: float = 0.1) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} must be divisible by memory heads {num_heads}")
        if not 1 <= top_k <= num_slots:
            raise ValueError(f"memory top_k must be in 1..num_slots ({num_slots}), got {top_k}")
        self.num_slots, self.num_heads, self.top_k = num_slots, num_heads, top_k
        self.head_dim = d_model // num_heads
        self.slots = nn.Parameter(torch.randn(num_slots, d_model) * d_model ** -0.5)
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        # Label -> slot preference. Small random init so the labels already steer slot choice at step 0.
        self.label_to_slot = nn.Parameter(torch.randn(num_labels, num_slots) * 0.02)
        self.dropout = nn.Dropout(dropout)

    def slot_bias(self, condition: Tensor) -> Tensor:
        """``condition [B, num_labels]`` (0/1 or probabilities) -> similarity bias ``[B, num_slots]``."""
        return condition.to(self.label_to_slot.dtype) @ self.label_to_slot

    def project_slots(self) -> MemorySlots:
        """Key/value projections of the slots, split into heads."""
        def split(t: Tensor) -> Tensor:
            return t.view(self.num_slots, self.num_heads, self.head_dim).transpose(0, 1)

        return MemorySlots(split(self.key(self.slots)), split(self.value(self.slots)))

    def forward(self, x: Tensor, slot_bias: Optional[Tensor] = None, slots: Optional[MemorySlots] = None,
                return_readout: bool = False) -> Tensor | tuple[Tensor, MemoryReadout]:
        """Respond to every token of ``x [B, T, D]``; returns the response ``[B, T, D]`` (not ``x + response``).

        ``slot_bias [B, num_slots]`` comes from :meth:`slot_bias`; ``slots`` may be passed to reuse one
        :meth:`project_slots` across calls (decoding). ``return_readout`` also returns the top-k slots read.
        """
        b, t, d = x.shape
        if slots is None:
            slots = self.project_slots()
        # Heads lead and (batch, token) are flattened so both matmuls are plain [H]-batched products:
        # broadcasting the slots over the batch instead would copy them once per study.
        q = self.query(x).view(b * t, self.num_heads, self.head_dim).transpose(0, 1)  # [H, B*T, hd]
        scores = (q @ slots.keys.transpose(-1, -2) / math.sqrt(self.head_dim)).view(self.num_heads, b, t, -1)
        if slot_bias is not None:
            scores = scores + slot_bias[None, :, None, :]
        top_scores, top_idx = scores.topk(self.top_k, dim=-1)  # [H, B, T, k]
        top_weights = F.softmax(top_scores, dim=-1)
        weights = self.dropout(top_weights)
        if b * t <= GATHER_MAX_ROWS:
            # Few queries (a decoding step): read only the k chosen value rows per head. The dense product
            # below would read every slot's value (num_slots x d_model floats) for each step.
            flat = slots.values.reshape(-1, self.head_dim)  # [H*S, hd]
            offsets = torch.arange(self.num_heads, device=x.device).view(-1, 1, 1, 1) * self.num_slots
            picked = flat[top_idx + offsets]  # [H, B, T, k, hd]
            response = (weights.unsqueeze(-1) * picked).sum(dim=-2).view(self.num_heads, b * t, -1)
        else:
            # Many queries (training, the encoder): scatter the k weights back to a dense row over all slots
            # so the read is one matmul with the values.
            dense = scores.new_zeros(scores.shape, dtype=weights.dtype).scatter(-1, top_idx, weights)
            response = dense.view(self.num_heads, b * t, -1) @ slots.values  # [H, B*T, hd]
        response = response.transpose(0, 1).reshape(b, t, d)
        response = self.out(response)
        if return_readout:
            return response, MemoryReadout(top_idx.transpose(0, 1), top_weights.transpose(0, 1))
        return response
