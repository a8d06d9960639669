"""The three exportable graphs of an IFNet, as plain-tensor ``nn.Module`` wrappers around its parts.

ONNX graphs take and return flat tensors, so the model's named stages are regrouped here:

``BackboneGraph``      images ``[N, 3, S, S]`` (present views only) -> features ``[N, C, h, w]``
``EncoderGraph``       features ``[B, V, C, h, w]`` + view mask + condition -> label logits, the condition used,
                       the encoder memory, and every decoder layer's cross-attention state (computed once)
``DecoderStepGraph``   one token per row + position + condition + the recurrent self-attention state and the
                       cross-attention state of every layer -> next-token logits + the new self-attention state

The backbone is a graph of its own so that a missing view costs nothing (it only sees present views) and so
that its time can be reported apart from the memory and encoder. Every wrapper calls the model's own methods
(``encode_features``, ``predict_labels``, ``fuse_memory``, ``DecoderLayer.step``, ...), so the exported
maths is the PyTorch maths; the one rewrite is the decoder step's memory read, which gathers the top-k slots
instead of multiplying a dense weight row (:meth:`DecoderStepGraph._memory_response`).
``tests/test_export.py`` holds ONNX Runtime and PyTorch to equal tokens and close logits.

The decoder state is flattened in a fixed order, named by :func:`state_names`:
linear attention keeps ``(S [B, H, d, d], z [B, H, d])`` per layer for self-attention (the recurrent state)
and for cross-attention (the memory summary); softmax attention keeps a growing ``(K, V) [B, H, t, d]`` cache
for self-attention and ``(K, V [B, H, S, d], mask [B, S])`` of the memory for cross-attention.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import torch
from torch import Tensor, nn

from ifnet.data.tokenizer import NEVER_GENERATED
from ifnet.models.ifnet import IFNet

__all__ = ["BackboneGraph", "EncoderGraph", "DecoderStepGraph", "state_names"]

#: Tensors per layer in the decoder state, per attention kind: (self-attention names, cross-attention names).
_STATE_PARTS = {
    "linear": (("S", "z"), ("S", "z")),
    "softmax": (("K", "V"), ("K", "V", "mask")),
}


def state_names(attention: str, num_layers: int) -> Tuple[List[str], List[str]]:
    """Input names of the decoder state: ``(["self_S_0", "self_z_0", ...], ["cross_S_0", ...])``."""
    self_parts, cross_parts = _STATE_PARTS[attention]
    return ([f"self_{p}_{i}" for i in range(num_layers) for p in self_parts],
            [f"cross_{p}_{i}" for i in range(num_layers) for p in cross_parts])


class BackboneGraph(nn.Module):
    """``images [N, 3, S, S]`` (ImageNet-normalised, present views only) -> ``features [N, C, h, w]``."""

    def __init__(self, model: IFNet) -> None:
        super().__init__()
        self.extractor = model.extractor

    def forward(self, images: Tensor) -> Tensor:
        return self.extractor.forward_features(images)


class EncoderGraph(nn.Module):
    """Visual tokens, label head, memory fusion, SAFormer encoder and the decoder's cross-attention states.

    ``condition_weight [B]`` mixes the supplied ``condition [B, 14]`` with the label head's own condition
    (``w * condition + (1 - w) * predicted``, ``predicted`` = ``IFNet.predicted_condition``: thresholded
    or raw probabilities, as the model is configured): 0 conditions on predictions (the default at
    inference), 1 on radiologist-supplied findings; both ends give exactly ``IFNet.resolve_condition``'s vector.
    """

    def __init__(self, model: IFNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: Tensor, view_mask: Tensor, condition: Tensor,
                condition_weight: Tensor) -> Tuple[Tensor, ...]:
        model = self.model
        visual = model.encode_features(features, view_mask)
        label_logits = model.predict_labels(visual)
        predicted = model.predicted_condition(label_logits)
        w = condition_weight.to(predicted.dtype)[:, None]
        used = w * condition.to(predicted.dtype) + (1.0 - w) * predicted
        fused = model._zero_masked(model.fuse_memory(visual.tokens, used), visual.token_mask)
        memory = model.encoder(fused, visual.token_mask)
        cross = []
        for layer in model.decoder.layers:
            cross.extend(layer.cross_attn.summarize(memory, visual.token_mask))
        return (label_logits, used, memory, visual.token_mask, *cross)


class DecoderStepGraph(nn.Module):
    """One decoding step with the whole state as explicit tensors (see the module docstring for its order).

    Returns the logits ``[B, vocab]`` with pad and bos at -inf (as :class:`ifnet.models.ifnet.IFNetDecoder`
    gives them to the search) and the new self-attention state. The memory slots' key/value projections do
    not depend on the input, so they are computed once here and stored as constants of the graph; the memory
    read is :meth:`_memory_response`.
    """

    def __init__(self, model: IFNet) -> None:
        super().__init__()
        self.model = model
        self.kind = model.config.transformer.attention
        self.num_layers = len(model.decoder.layers)
        self_parts, cross_parts = _STATE_PARTS[self.kind]
        self.num_self, self.num_cross = len(self_parts), len(cross_parts)
        with torch.no_grad():
            slots = model.memory.project_slots()
        self.register_buffer("slot_keys", slots.keys.detach().contiguous(), persistent=False)  # [H, S, hd]
        self.register_buffer("slot_values", slots.values.detach().contiguous(), persistent=False)  # [H, S, hd]
        memory = model.memory
        self.register_buffer("head_offsets", torch.arange(memory.num_heads).view(-1, 1, 1) * memory.num_slots,
                             persistent=False)
        mask = torch.zeros(model.config.vocab_size)
        mask[list(NEVER_GENERATED)] = -math.inf
        self.register_buffer("logit_mask", mask, persistent=False)

    def forward(self, token: Tensor, position: Tensor, condition: Tensor, *state: Tensor) -> Tuple[Tensor, ...]:
        model = self.model
        n_self = self.num_layers * self.num_self
        self_state, cross_state = state[:n_self], state[n_self:]
        # IFNet.embed_words at a position given as a tensor (a graph input, not a Python int).
        x = model.word_embedding(token) * math.sqrt(model.config.d_model) + model.word_positions[position]
        if model.condition_proj is not None:  # IFNet.condition_words
            x = x + model.condition_proj(condition.to(x.dtype))
        x = x + self._memory_response(x, condition)
        new_state: List[Tensor] = []
        for i, layer in enumerate(model.decoder.layers):
            cache = tuple(self_state[i * self.num_self:(i + 1) * self.num_self])
            summary = tuple(cross_state[i * self.num_cross:(i + 1) * self.num_cross])
            x, cache = layer.step(x, cache, summary)
            new_state.extend(cache)
        logits = model.output_logits(model.decoder.norm(x), condition) + self.logit_mask
        return (logits, *new_state)

    def _memory_response(self, x: Tensor, condition: Tensor) -> Tensor:
        """``MemoryMatrix.forward`` for one token per row ``x [B, D]`` -> response ``[B, D]``.

        Same scores, top-k and softmax; but the ``top_k`` chosen slots' values are read by index (ONNX
        ``Gather``) instead of scattering the weights into a dense row over all slots and multiplying by every
        value: a decode step is bound by the bytes it reads, and this reads ``top_k`` of ``num_slots`` value
        rows (32 of 2048). The tests hold the step logits to PyTorch's ``decode_step``.
        """
        memory = self.model.memory
        b = x.shape[0]
        q = memory.query(x).view(b, memory.num_heads, memory.head_dim).transpose(0, 1)  # [H, B, hd]
        scores = q @ self.slot_keys.transpose(-1, -2) / math.sqrt(memory.head_dim)  # [H, B, S]
        scores = scores + memory.slot_bias(condition)[None]
        top_scores, top_idx = scores.topk(memory.top_k, dim=-1)  # [H, B, k]
        weights = torch.softmax(top_scores, dim=-1)
        values = self.slot_values.reshape(-1, memory.head_dim)[top_idx + self.head_offsets]  # [H, B, k, hd]
        response = (weights.unsqueeze(-1) * values).sum(dim=-2)  # [H, B, hd]
        return memory.out(response.transpose(0, 1).reshape(b, -1))
