"""Exponential moving average (EMA) of the model's weights: the model that is validated and saved.

``optim.ema_decay = d`` keeps a copy of the model whose trainable parameters are the bias-corrected
exponential average of the trained weights after each optimisation step ``w_1, w_2, ...`` (as Adam corrects
its moments): ``A_n = sum_k d^(n-k) w_k / sum_k d^(n-k)``, computed as ``A_n = b_n A_(n-1) + (1 - b_n) w_n``
with ``b_n = d (1 - d^(n-1)) / (1 - d^n)``. ``A_1 = w_1``; while ``n`` is small against ``1 / (1 - d)`` it is
close to the plain mean of the steps so far, later it averages about the last ``1 / (1 - d)`` steps (0.997:
333). Unlike an average started from the initial weights, it never holds on to them. Buffers (BatchNorm
statistics, the label thresholds) and frozen parameters are copied, not averaged.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from ifnet.errors import IFNetError


def ema_decay_at(decay: float, updates: int) -> float:
    """``b_n``: the weight the average keeps at update number ``updates`` (1-based; 0 at the first)."""
    return decay * (1.0 - decay ** (updates - 1)) / (1.0 - decay ** updates)


def decay_problem(decay: Optional[float]) -> Optional[str]:
    """What is wrong with ``decay`` as ``optim.ema_decay`` (None: nothing); the config and
    :func:`check_decay` both use it."""
    if decay is not None and not 0.0 < decay < 1.0:
        return f"must be in (0, 1) or null (no averaging), got {decay}"
    return None


def check_decay(decay: Optional[float]) -> None:
    problem = decay_problem(decay)
    if problem:
        raise IFNetError(f"optim.ema_decay {problem}")


class WeightEMA:
    """An averaged copy of ``model`` (``.module``, always in eval mode, no gradients)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        check_decay(decay)
        self.decay = float(decay)
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights of ``model`` (the module this copy was made from) into the average."""
        self.updates += 1
        d = ema_decay_at(self.decay, self.updates)
        for avg, p in zip(self.module.parameters(), model.parameters()):
            if p.requires_grad:
                avg.lerp_(p.detach().to(avg.dtype), 1.0 - d)
            else:
                avg.copy_(p.detach())
        for avg, b in zip(self.module.buffers(), model.buffers()):
            avg.copy_(b)
