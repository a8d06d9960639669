"""IFNet: visual extractor + label head + label-conditioned memory matrix + SAFormer encoder/decoder.

Stages, each a named method::

    images [B, V, 3, H, W], view_mask [B, V]
      -> extract_features            CNN per present view        [B, V, C, h, w]
      -> encode_features             project, view + 2-D position [B, V*h*w, D] + token mask
      -> predict_labels              14 observation logits from pooled features
      -> fuse_memory                 tokens + memory response (slots weighted by the label vector)
      -> SAFormer encoder            memory for the decoder
    tokens -> embed_words -> fuse_memory -> SAFormer decoder -> vocabulary logits

**Where the label vector comes from (no leakage).** The memory is conditioned on a 14-observation vector.
In training the trainer passes the text encoder's labels of the reference report as ``condition``
(teacher forcing of labels; ``label_forcing < 1`` mixes in the model's own detached predictions to
narrow the train/test gap). At inference ``condition=None`` means "the label head's predicted
probabilities"; :meth:`IFNet.generate` may instead take findings a radiologist supplies. Nothing on the
evaluation path reads reference reports or their labels: :meth:`IFNet.generate_for_batch` reads only the
image keys of a batch.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ifnet.data.tokenizer import BOS_ID, EOS_ID, NEVER_GENERATED, PAD_ID
from ifnet.errors import IFNetError
from ifnet.labels import NUM_OBSERVATIONS
from ifnet.layers.saformer import SAFormerConfig, SAFormerDecoder, SAFormerEncoder, sinusoidal_positions
from ifnet.models.memory import MemoryMatrix, MemoryReadout, MemorySlots
from ifnet.models.visual import create_extractor, patch_positions_2d

__all__ = [
    "IFNetConfig", "IFNet", "IFNetDecoder", "IFNetOutput", "EncoderOutput", "VisualTokens",
    "IFNetDecodeState", "LabelHead", "compute_losses",
]


CONDITION_MODES = ("thresholded", "probabilities")


@dataclass
class IFNetConfig:
    """Everything needed to rebuild an IFNet; stored in every checkpoint as ``config.json``."""

    vocab_size: int = 0  # set from the tokenizer (len(tokenizer)); 0 is rejected so it is never forgotten
    extractor: str = "resnet101"  # registry name in ifnet.models.visual: resnet18/50/101/152, efficientnet_lite0
    pretrained: bool = False  # load ImageNet weights from a local file (nothing downloads at run time)
    weights_path: Optional[str] = None  # that file for ResNets; efficientnet_lite0 defaults to its shipped weights
    freeze_extractor: bool = False  # fixed trunk + eval-mode BN: lets the trainer cache features (CPU budget)
    max_views: int = 2  # views per study (frontal + lateral for IU-Xray); one learned embedding per view slot
    num_memory_slots: int = 2048  # memory matrix rows (R2GenCMN's cmm_size)
    memory_top_k: int = 32  # slots each token reads per head; the rest get zero weight
    memory_heads: int = 8  # heads of the memory query (R2GenCMN's multi-thread memory)
    max_positions: int = 256  # longest token sequence (bos + words + eos) the decoder accepts
    dropout: float = 0.1  # on visual tokens, word embeddings, memory weights and the label head input
    tie_word_embeddings: bool = True  # output projection shares the embedding matrix (fewer params, Vaswani)
    # A learned projection of the 14-label condition added to every word embedding: the direct path from
    # "what the report must say" to the decoder. Without it the labels reach the decoder only as a bias on
    # memory slot scores, which a decoder trained on templated reports learns to ignore (measured:
    # docs/RESULTS.md). False rebuilds the memory-only conditioning (ablation).
    condition_embedding: bool = True
    # A learned label -> vocabulary bias added to the next-word logits (zero at initialisation): lets "the
    # report must mention an effusion" raise the words that say so from the first steps of training, while
    # the decoder's context decides where they go. False = no bias (ablation).
    condition_logit_bias: bool = True
    # What conditions the memory at inference when no findings are supplied: "thresholded" = the label
    # head's probabilities cut at per-label thresholds the trainer chooses on validation (0/1, like the
    # labels seen in training), "probabilities" = the raw probabilities.
    condition_mode: str = "thresholded"
    transformer: SAFormerConfig = field(default_factory=SAFormerConfig)  # encoder/decoder sizes and attention

    @property
    def d_model(self) -> int:
        """Token width everywhere (one source of truth: the transformer's)."""
        return self.transformer.d_model

    def validate(self) -> "IFNetConfig":
        if self.vocab_size <= EOS_ID + 1:
            raise IFNetError(f"IFNetConfig.vocab_size must be the tokenizer's size (> {EOS_ID + 1}), got "
                             f"{self.vocab_size}")
        if self.max_views < 1:
            raise IFNetError(f"IFNetConfig.max_views must be >= 1, got {self.max_views}")
        if not 0 <= self.dropout < 1:
            raise IFNetError(f"IFNetConfig.dropout must be in [0, 1), got {self.dropout}")
        if not 1 <= self.memory_top_k <= self.num_memory_slots:
            raise IFNetError(f"IFNetConfig.memory_top_k must be in 1..num_memory_slots "
                             f"({self.num_memory_slots}), got {self.memory_top_k}")
        if self.condition_mode not in CONDITION_MODES:
            raise IFNetError(f"IFNetConfig.condition_mode must be one of {', '.join(CONDITION_MODES)}, got "
                             f"{self.condition_mode!r}")
        if self.d_model % self.memory_heads or self.d_model % 4:
            raise IFNetError(f"transformer.d_model ({self.d_model}) must be divisible by memory_heads "
                             f"({self.memory_heads}) and by 4 (2-D patch positions)")
        return self

    def to_dict(self) -> dict:
        from ifnet.config import to_dict

        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<config>") -> "IFNetConfig":
        """Strict: unknown keys and wrong types are errors naming the field."""
        from ifnet.config import from_dict

        return from_dict(cls, data, source=source)


class VisualTokens(NamedTuple):
    """Output of :meth:`IFNet.encode_features`.

    tokens ``[B, V*h*w, D]`` (view-major: all patches of view 0, then view 1, ...; zero where masked),
    token_mask ``[B, V*h*w]`` (False for a missing view's patches), pooled ``[B, C]`` (mean of the backbone
    features over present views' patches), grid ``(V, h, w)``.
    """

    tokens: Tensor
    token_mask: Tensor
    pooled: Tensor
    grid: tuple[int, int, int]


class EncoderOutput(NamedTuple):
    """What the decoder needs, plus what the label head predicted and which condition was used.

    A NamedTuple so the decoding search (which looks for the first tensor of ``batch_inputs``) finds the
    device from ``memory``.

    memory ``[B, S, D]``, memory_mask ``[B, S]`` (True = valid), label_logits ``[B, 14]``, condition
    ``[B, 14]`` (the label vector the memory was conditioned on), grid ``(V, h, w)`` of the visual tokens,
    readout: the top-k memory slots each visual token read (only when ``encode(return_readout=True)``;
    for heatmaps).
    """

    memory: Tensor
    memory_mask: Tensor
    label_logits: Tensor
    condition: Tensor
    grid: tuple[int, int, int]
    readout: Optional[MemoryReadout] = None


class IFNetOutput(NamedTuple):
    """Teacher-forcing output. ``logits[:, t]`` scores ``tokens[:, t + 1]`` (so ``[B, T-1, vocab]``)."""

    logits: Tensor
    label_logits: Tensor


@dataclass
class IFNetDecodeState:
    """Incremental decoding state; ``index_select`` reorders the batch (beam search)."""

    decoder: Any  # SAFormer DecoderState
    condition: Tensor  # [B, 14] label vector conditioning the memory
    slots: MemorySlots  # projected memory slots, computed once per generate call

    @property
    def batch_size(self) -> int:
        return self.condition.shape[0]

    @property
    def position(self) -> int:
        """Index of the next token in the sequence (bos is 0)."""
        return self.decoder.length

    def index_select(self, idx: Tensor) -> "IFNetDecodeState":
        return replace(self, decoder=self.decoder.index_select(idx),
                       condition=self.condition.index_select(0, idx))


class LabelHead(nn.Module):
    """Linear classifier over pooled backbone features -> 14 observation logits.

    Linear on a mean, so its class activation maps (:meth:`activation_maps`) average exactly to the logits
    minus the bias: they show which patches drive each predicted observation.
    """

    def __init__(self, in_channels: int, num_labels: int = NUM_OBSERVATIONS, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_channels, num_labels)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.classifier(self.dropout(pooled))

    def activation_maps(self, features: Tensor) -> Tensor:
        """``features [B, V, C, h, w]`` -> per-observation maps ``[B, 14, V, h, w]``."""
        return torch.einsum("bvchw,lc->blvhw", features, self.classifier.weight)


class IFNet(nn.Module):
    """The report generator. See the module docstring for the stages and where labels come from."""

    def __init__(self, config: IFNetConfig, *, load_pretrained: bool = True) -> None:
        """``load_pretrained=False`` skips reading ImageNet weights (checkpoint loading overwrites them anyway)."""
        super().__init__()
        self.config = config.validate()
        d = config.d_model
        pretrained = config.pretrained and load_pretrained
        # weights_path goes to create_extractor whenever weights may load, so one given without pretrained is
        # refused there rather than silently ignored (a run would train from random weights).
        self.extractor = create_extractor(config.extractor, pretrained,
                                          config.weights_path if load_pretrained else None,
                                          freeze=config.freeze_extractor)
        channels = self.extractor.out_channels
        self.visual_proj = nn.Linear(channels, d)
        self.view_embedding = nn.Embedding(config.max_views, d)
        nn.init.normal_(self.view_embedding.weight, std=0.02)
        self.label_head = LabelHead(channels, NUM_OBSERVATIONS, config.dropout)
        self.memory = MemoryMatrix(d, config.num_memory_slots, config.memory_heads, config.memory_top_k,
                                   NUM_OBSERVATIONS, config.dropout)
        self.encoder = SAFormerEncoder(config.transformer)
        self.decoder = SAFormerDecoder(config.transformer)
        self.word_embedding = nn.Embedding(config.vocab_size, d)
        self.condition_proj = nn.Linear(NUM_OBSERVATIONS, d) if config.condition_embedding else None
        self.condition_logits = None
        if config.condition_logit_bias:
            self.condition_logits = nn.Linear(NUM_OBSERVATIONS, config.vocab_size, bias=False)
            nn.init.zeros_(self.condition_logits.weight)
        # Per-label cut-offs for condition_mode="thresholded"; 0.5 until the trainer calibrates them on
        # validation (stored with the weights, so evaluate/generate/serve/export all use the same ones).
        self.register_buffer("label_thresholds", torch.full((NUM_OBSERVATIONS,), 0.5))
        nn.init.normal_(self.word_embedding.weight, std=d ** -0.5)  # times sqrt(d) below -> unit scale
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.word_embedding.weight
        self.dropout = nn.Dropout(config.dropout)
        self.register_buffer("word_positions", sinusoidal_positions(config.max_positions, d).float(),
                             persistent=False)

    # -- images -> visual tokens ---------------------------------------------------------------
    def extract_features(self, images: Tensor, view_mask: Tensor) -> Tensor:
        """CNN features of present views ``[B, V, C, h, w]``; zeros for missing views.

        Only present views go through the CNN, so a missing view's pixels cannot reach the output
        (not even through BatchNorm batch statistics in training). This is what a trainer caches when
        the extractor is frozen.
        """
        if images.dim() != 5:
            raise ValueError(f"images must be [B, V, C, H, W], got shape {tuple(images.shape)}")
        view_mask = self._check_view_mask(view_mask, images.shape[:2])
        grad = torch.is_grad_enabled() and not self.extractor.frozen
        with torch.set_grad_enabled(grad):
            present = self.extractor.forward_features(images[view_mask])  # [N_present, C, h, w]
        out = present.new_zeros((*images.shape[:2], *present.shape[1:]))
        out[view_mask] = present
        return out

    def encode_features(self, features: Tensor, view_mask: Tensor) -> VisualTokens:
        """Backbone features ``[B, V, C, h, w]`` (from :meth:`extract_features` or a cache) -> :class:`VisualTokens`."""
        if features.dim() != 5:
            raise ValueError(f"features must be [B, V, C, h, w], got shape {tuple(features.shape)}")
        b, v, c, h, w = features.shape
        view_mask = self._check_view_mask(view_mask, (b, v))
        features = features.to(self.visual_proj.weight.dtype)  # a feature cache may be stored as float16
        present = view_mask[:, :, None, None, None]
        features = torch.where(present, features, torch.zeros((), dtype=features.dtype, device=features.device))
        pooled = features.sum(dim=(1, 3, 4)) / (view_mask.sum(1, keepdim=True) * h * w).to(features.dtype)
        patches = features.flatten(3).transpose(2, 3)  # [B, V, h*w, C]
        pos = patch_positions_2d(h, w, self.config.d_model).to(features.device, features.dtype)
        views = self.view_embedding.weight[:v]
        tokens = self.visual_proj(patches) + views[None, :, None, :] + pos[None, None]
        tokens = self.dropout(tokens).reshape(b, v * h * w, -1)
        token_mask = view_mask[:, :, None].expand(b, v, h * w).reshape(b, v * h * w)
        return VisualTokens(self._zero_masked(tokens, token_mask), token_mask, pooled, (v, h, w))

    def encode_images(self, images: Tensor, view_mask: Tensor) -> VisualTokens:
        """``images [B, V, 3, H, W]`` + ``view_mask [B, V]`` -> :class:`VisualTokens`."""
        return self.encode_features(self.extract_features(images, view_mask), view_mask)

    def predict_labels(self, visual: VisualTokens) -> Tensor:
        """14 observation logits ``[B, 14]`` from the pooled image features (never from text)."""
        return self.label_head(visual.pooled)

    def label_activation_maps(self, features: Tensor, view_mask: Tensor) -> Tensor:
        """Per-observation class activation maps ``[B, 14, V, h, w]`` (zero on missing views), for heatmaps."""
        view_mask = self._check_view_mask(view_mask, features.shape[:2])
        maps = self.label_head.activation_maps(features)
        return maps * view_mask[:, None, :, None, None].to(maps.dtype)

    # -- memory ---------------------------------------------------------------------------------
    def fuse_memory(self, x: Tensor, condition: Tensor, slots: Optional[MemorySlots] = None,
                    return_readout: bool = False) -> Tensor | tuple[Tensor, MemoryReadout]:
        """``x [B, T, D]`` + the memory's response, slots weighted by ``condition [B, 14]``."""
        out = self.memory(x, self.memory.slot_bias(condition), slots, return_readout=return_readout)
        if return_readout:
            response, readout = out
            return x + response, readout
        return x + out

    def predicted_condition(self, label_logits: Tensor) -> Tensor:
        """The condition the label head's logits give on their own (detached): 0/1 at
        ``label_thresholds`` (``condition_mode="thresholded"``) or the probabilities."""
        probs = torch.sigmoid(label_logits).detach()
        if self.config.condition_mode == "thresholded":
            return (probs >= self.label_thresholds.to(probs.dtype)).to(probs.dtype)
        return probs

    def set_label_thresholds(self, thresholds: Any) -> None:
        """Install per-label thresholds ``[14]`` in (0, 1] (chosen on validation by the trainer)."""
        t = torch.as_tensor(thresholds, dtype=self.label_thresholds.dtype).to(self.label_thresholds.device)
        if t.shape != self.label_thresholds.shape or not bool(torch.isfinite(t).all()):
            raise IFNetError(f"label thresholds must be {NUM_OBSERVATIONS} finite numbers, got shape {tuple(t.shape)}")
        self.label_thresholds.copy_(t.clamp(1e-6, 1.0))

    def resolve_condition(self, label_logits: Tensor, condition: Optional[Tensor] = None,
                          label_forcing: float = 1.0) -> Tensor:
        """The label vector ``[B, 14]`` that conditions the memory.

        ``condition=None``: :meth:`predicted_condition` (inference). Otherwise ``condition`` (reference
        labels in training, user-supplied findings at inference), mixed as
        ``label_forcing * condition + (1 - label_forcing) * predicted``. Predictions are detached: the label
        head learns only from its BCE loss, so its outputs stay calibrated probabilities.
        """
        predicted = self.predicted_condition(label_logits)
        if condition is None:
            return predicted
        if condition.shape != predicted.shape:
            raise ValueError(f"condition must be [B, {NUM_OBSERVATIONS}] = {tuple(predicted.shape)}, "
                             f"got {tuple(condition.shape)}")
        if not 0.0 <= label_forcing <= 1.0:
            raise ValueError(f"label_forcing must be in [0, 1], got {label_forcing}")
        condition = condition.to(device=predicted.device, dtype=predicted.dtype)
        if label_forcing == 1.0:
            return condition
        return label_forcing * condition + (1.0 - label_forcing) * predicted

    # -- encoder --------------------------------------------------------------------------------
    def encode(self, images: Optional[Tensor], view_mask: Tensor, condition: Optional[Tensor] = None, *,
               features: Optional[Tensor] = None, label_forcing: float = 1.0,
               return_readout: bool = False) -> EncoderOutput:
        """Images (or cached ``features``) -> :class:`EncoderOutput`. ``condition=None``: use predicted labels."""
        return self._encode(images, view_mask, condition, features, label_forcing, None, return_readout)

    def _encode(self, images: Optional[Tensor], view_mask: Tensor, condition: Optional[Tensor],
                features: Optional[Tensor], label_forcing: float, slots: Optional[MemorySlots],
                return_readout: bool = False) -> EncoderOutput:
        if (images is None) == (features is None):
            raise ValueError("pass exactly one of images or features")
        visual = (self.encode_images(images, view_mask) if features is None
                  else self.encode_features(features, view_mask))
        label_logits = self.predict_labels(visual)
        used = self.resolve_condition(label_logits, condition, label_forcing)
        fused = self.fuse_memory(visual.tokens, used, slots, return_readout=return_readout)
        readout = None
        if return_readout:
            fused, readout = fused
        fused = self._zero_masked(fused, visual.token_mask)
        memory = self.encoder(fused, visual.token_mask)
        return EncoderOutput(memory, visual.token_mask, label_logits, used, visual.grid, readout)

    # -- decoder --------------------------------------------------------------------------------
    def embed_words(self, tokens: Tensor, start: int = 0) -> Tensor:
        """``tokens [B, T]`` at positions ``start..start+T-1`` -> ``[B, T, D]`` (scaled embedding + sinusoid)."""
        end = start + tokens.shape[1]
        if end > self.config.max_positions:
            raise IFNetError(f"sequence of {end} tokens exceeds max_positions={self.config.max_positions}")
        emb = self.word_embedding(tokens) * math.sqrt(self.config.d_model)
        return self.dropout(emb + self.word_positions[start:end].to(emb.dtype))

    def condition_words(self, words: Tensor, condition: Tensor) -> Tensor:
        """``words [B, T, D]`` + the projected condition ``[B, D]`` on every position (when configured)."""
        if self.condition_proj is None:
            return words
        return words + self.condition_proj(condition.to(words.dtype))[:, None, :]

    def output_logits(self, hidden: Tensor, condition: Tensor) -> Tensor:
        """Decoder states ``[B, T, D]`` or ``[B, D]`` -> vocabulary logits, plus the condition's word bias."""
        logits = self.lm_head(hidden)
        if self.condition_logits is None:
            return logits
        bias = self.condition_logits(condition.to(logits.dtype))
        return logits + (bias[:, None, :] if logits.dim() == 3 else bias)

    def forward(self, images: Optional[Tensor], view_mask: Tensor, tokens: Tensor,
                condition: Optional[Tensor] = None, *, features: Optional[Tensor] = None,
                label_forcing: float = 1.0) -> IFNetOutput:
        """Teacher forcing. ``tokens [B, T]`` = bos ... eos pad*; returns logits ``[B, T-1, vocab]`` where
        ``logits[:, t]`` predicts ``tokens[:, t+1]``, and label logits ``[B, 14]``.

        In training pass the text encoder's labels as ``condition``; ``None`` conditions on predictions.
        """
        if tokens.dim() != 2 or tokens.shape[1] < 2:
            raise ValueError(f"tokens must be [B, T] with T >= 2 (bos ... eos), got {tuple(tokens.shape)}")
        slots = self.memory.project_slots()  # once per step, shared by image and text queries
        enc = self._encode(images, view_mask, condition, features, label_forcing, slots)
        if tokens.shape[0] != enc.memory.shape[0]:
            raise ValueError(f"tokens has {tokens.shape[0]} rows but the images/features batch has {enc.memory.shape[0]}")
        inputs = tokens[:, :-1]
        words = self.fuse_memory(self.condition_words(self.embed_words(inputs), enc.condition), enc.condition, slots)
        hidden = self.decoder(words, enc.memory, enc.memory_mask, inputs != PAD_ID)
        return IFNetOutput(self.output_logits(hidden, enc.condition), enc.label_logits)

    def start_decoding(self, enc: EncoderOutput) -> IFNetDecodeState:
        """Decoding state for :meth:`decode_step`, from an :class:`EncoderOutput`."""
        return IFNetDecodeState(self.decoder.init_state(enc.memory, enc.memory_mask), enc.condition,
                                self.memory.project_slots())

    def decode_step(self, tokens: Tensor, state: IFNetDecodeState) -> tuple[Tensor, IFNetDecodeState]:
        """One token per sequence ``tokens [B]`` (the first call gets bos) -> next-token logits ``[B, vocab]``."""
        words = self.condition_words(self.embed_words(tokens[:, None], state.position), state.condition)
        words = self.fuse_memory(words, state.condition, state.slots)
        hidden, dec = self.decoder.step(words[:, 0], state.decoder)
        return self.output_logits(hidden, state.condition), replace(state, decoder=dec)

    # -- generation -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, images: Optional[Tensor], view_mask: Tensor, *, beam_size: int = 3, max_len: int = 60,
                 condition: Optional[Tensor] = None, features: Optional[Tensor] = None,
                 **decoding_options: Any) -> Tensor:
        """Report token ids ``[B, L]`` (no bos; eos kept; pad after), in eval mode, by
        :func:`ifnet.decoding.generate`: beam search, or greedy when ``beam_size=1``.

        ``condition`` is for findings a radiologist supplies (``[B, 14]``, 0/1); leave it ``None`` to condition
        on the model's own predicted labels. Never pass labels derived from the reference report here.
        ``decoding_options``: the other :class:`ifnet.decoding.DecodingConfig` fields (``length_penalty``,
        ``block_trigrams``, ``trigram_penalty``); a misspelt one is an error.
        """
        with _eval_mode(self):
            enc = self.encode(images, view_mask, condition, features=features)
            return self.decode(enc, beam_size=beam_size, max_len=max_len, **decoding_options)

    @torch.no_grad()
    def decode(self, enc: EncoderOutput, *, beam_size: int = 3, max_len: int = 60,
               findings_of: Optional[Callable[[list[list[int]]], Any]] = None, **decoding_options: Any) -> Tensor:
        """Report token ids ``[B, L]`` from an :class:`EncoderOutput` (one decoding path for generate,
        evaluation and serving: beam search, or greedy when ``beam_size=1``; minimum Bayes-risk selection
        with ``mbr_samples``, findings-preserving when ``findings_of`` reads the findings of token lists,
        see :func:`ifnet.evaluation.findings_reader`)."""
        from ifnet.decoding.search import DecodingConfig
        from ifnet.decoding.search import generate as search

        decoding = DecodingConfig(beam_size=beam_size, max_len=max_len, **decoding_options)
        if max_len > self.config.max_positions:
            raise IFNetError(f"max_len={max_len} exceeds the model's max_positions={self.config.max_positions}")
        with _eval_mode(self):
            return search(IFNetDecoder(self), enc, decoding, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
                          findings_of=findings_of)

    def generate_for_batch(self, batch: Mapping[str, Any], **kwargs: Any) -> Tensor:
        """Evaluation entry point: reads only ``images`` (or ``features``) and ``view_mask`` from a collated
        batch, so reference tokens and labels in the batch cannot influence the output."""
        if "condition" in kwargs:
            raise IFNetError("generate_for_batch conditions on predicted labels only; use generate(condition=...) "
                             "for radiologist-supplied findings")
        return self.generate(batch.get("images"), batch["view_mask"], features=batch.get("features"), **kwargs)

    # -- helpers --------------------------------------------------------------------------------
    def _check_view_mask(self, view_mask: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
        b, v = int(shape[0]), int(shape[1])
        if tuple(view_mask.shape) != (b, v):
            raise ValueError(f"view_mask must be [B, V] = {(b, v)}, got {tuple(view_mask.shape)}")
        if v > self.config.max_views:
            raise ValueError(f"{v} views per study but the model was built for max_views={self.config.max_views}")
        view_mask = view_mask.bool()
        if not bool(view_mask.any(1).all()):
            raise IFNetError("every study needs at least one present view (view_mask has an all-False row)")
        return view_mask

    @staticmethod
    def _zero_masked(x: Tensor, mask: Tensor) -> Tensor:
        return torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))


class IFNetDecoder:
    """Adapter from :class:`IFNet` to the ``StepModel`` protocol of :mod:`ifnet.decoding`.

    ``batch_inputs`` is an :class:`EncoderOutput` (from :meth:`IFNet.encode`). ``step`` returns
    :meth:`IFNet.decode_step`'s logits with pad, bos and <unk> set to -inf (``NEVER_GENERATED``): neither pad nor
    bos can follow a token in a report (pad is never a training target, so its logit is untrained noise), and a
    report must say a word rather than "<unk>". The training logits stay unmasked,
    so a loss with label smoothing remains finite.
    """

    def __init__(self, model: IFNet) -> None:
        self.model = model

    def start(self, batch_inputs: EncoderOutput) -> IFNetDecodeState:
        return self.model.start_decoding(batch_inputs)

    def step(self, tokens: Tensor, state: IFNetDecodeState) -> tuple[Tensor, IFNetDecodeState]:
        logits, state = self.model.decode_step(tokens, state)
        logits = logits.index_fill(-1, torch.tensor(NEVER_GENERATED, device=logits.device), -math.inf)
        return logits, state


def compute_losses(output: IFNetOutput, tokens: Tensor, labels: Optional[Tensor] = None, *,
                   label_loss_weight: float = 1.0, study_weights: Optional[Tensor] = None,
                   label_smoothing: float = 0.0) -> dict[str, Tensor]:
    """Caption cross-entropy (mean over non-pad target tokens) + ``label_loss_weight`` x label BCE.

    ``label_smoothing`` > 0 spreads that much of each target word's probability uniformly over the
    vocabulary in the caption loss (Szegedy et al.; 0 = plain cross-entropy, what validation reports).
    ``labels [B, 14]`` are the text encoder's 0/1 labels; without them only the caption loss counts.
    ``study_weights [B]`` (> 0) make the label BCE a weighted mean over studies (e.g. 1 / repeat factor,
    so that a label head trained on resampled epochs still learns the original prevalence).
    Returns ``{"caption", "labels", "total"}``.
    """
    targets = tokens[:, 1:]
    caption = F.cross_entropy(output.logits.reshape(-1, output.logits.shape[-1]).float(), targets.reshape(-1),
                              ignore_index=PAD_ID, label_smoothing=label_smoothing)
    if labels is None:
        label_loss = caption.new_zeros(())
    elif study_weights is None:
        label_loss = F.binary_cross_entropy_with_logits(output.label_logits.float(), labels.float())
    else:
        per_study = F.binary_cross_entropy_with_logits(output.label_logits.float(), labels.float(),
                                                       reduction="none").mean(dim=1)
        w = study_weights.to(per_study)
        label_loss = (per_study * w).sum() / w.sum()
    return {"caption": caption, "labels": label_loss, "total": caption + label_loss_weight * label_loss}


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
