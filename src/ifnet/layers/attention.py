"""Attention maths as pure functions on ``[B, H, N, d]`` tensors (no parameters, no modules).

Linear attention (Katharopoulos et al., 2020) replaces ``softmax(q k^T)`` with
``phi(q) phi(k)^T`` for a positive feature map ``phi`` (here ``elu(x) + 1``), so that

    out_i = phi(q_i)^T S / (phi(q_i)^T z + eps),   S = sum_j phi(k_j) v_j^T,  z = sum_j phi(k_j)

where the sums run over all valid keys (non-causal) or over ``j <= i`` (causal). The causal form
comes in three equivalent shapes that the tests hold to each other:

* ``causal_linear_attention`` (parallel, for training on report-length sequences): the masked
  quadratic "linear attention as a matrix", ``tril(phi(Q) phi(K)^T) V``. It is O(N^2 d) like
  softmax, but for N <= a few hundred (reports are 60-100 tokens) it is a handful of large batched
  matmuls, which beats both a cumulative sum over the ``[N, d, d]`` outer products (O(N d^2)
  memory) and a Python loop. See docs/BENCH_ATTENTION.md.
* ``causal_linear_attention_chunked`` (for long sequences): quadratic inside chunks of ``C``
  tokens plus a running ``d x d`` state carried between chunks: O(N C d + N d^2) time and
  O(N C + (N / C) d^2) memory.
* ``linear_attention_step`` (recurrent, for decoding): a fixed-size state ``(S, z)`` per layer
  and head, so each new token costs the same however long the prefix is.

Numerical scale: the normaliser ``phi(q)^T z`` grows linearly with the number of keys (in the
thousands for N = 4096, d = 64) and the state ``S`` accumulates sums, which half precision cannot
hold (float16 overflows at 65504; bfloat16 keeps 8 bits of mantissa over thousands of terms).
Every linear-attention function therefore computes in float32 when given float16/bfloat16 inputs
(with autocast switched off inside) and casts the output back. ``eps`` keeps a row whose keys are
all masked finite (its output is 0) and never matters otherwise, because ``phi > 0``.

Softmax attention goes through ``torch.nn.functional.scaled_dot_product_attention`` so that it
uses the fused kernels (flash / memory-efficient on GPU, the fused CPU kernel on CPU).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional, Tuple, TypeVar

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
LinearState = Tuple[Tensor, Tensor]  # (S [B, H, d, dv], z [B, H, d])
KVCache = Tuple[Tensor, Tensor]  # (K [B, H, t, d], V [B, H, t, dv])

DEFAULT_EPS = 1e-6
_HALF_TYPES = (torch.float16, torch.bfloat16)
_F = TypeVar("_F", bound=Callable[..., object])


class _EluPlusOne(torch.autograd.Function):
    """``elu(x) + 1`` computed as ``exp(min(x, 0)) + max(x, 0)``, with a one-tensor backward.

    Same function as ``F.elu(x) + 1``, but (a) ``exp(x)`` for x < 0 stays strictly positive down to
    x = -87 in float32, where ``expm1(x) + 1`` rounds to exactly 0 below x = -17, and (b) on CPU
    ATen's ``elu`` and the autograd graph of the composite are 5-10x slower than this (measured in
    benchmarks/bench_attention.py's environment). The derivative is ``min(y, 1)`` of the output y,
    so only y is saved; the backward is itself differentiable (double backward works).
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        y = _elu_plus_one(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return grad * y.clamp(max=1.0)


def _elu_plus_one(x: Tensor) -> Tensor:
    y = x.clamp(max=0.0).exp_()  # in place: one allocation fewer on the hot path
    return y.add_(x.relu())


def elu_feature_map(x: Tensor) -> Tensor:
    """``elu(x) + 1``: positive everywhere (so normalisers are > 0) and ``x + 1`` for x > 0."""
    if x.requires_grad and torch.is_grad_enabled():
        return _EluPlusOne.apply(x)
    return _elu_plus_one(x)  # decoding: skip the autograd.Function call overhead


def _full_precision(returns: str) -> Callable[[_F], _F]:
    """Run the function in float32 when its first argument is half precision (or autocast is on).

    ``returns`` says what goes back to the input dtype: ``"tensor"`` (the output), ``"out_state"``
    (the output of an ``(out, state)`` pair) or ``"state"`` (nothing). States -- ``S`` and ``z`` --
    stay float32 because they are running sums.
    """

    def decorate(fn: _F) -> _F:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            first = args[0]
            if first.dtype not in _HALF_TYPES and not _autocast_on(first.device.type):
                return fn(*args, **kwargs)
            out_dtype = first.dtype
            args = tuple(_to_float32(a) for a in args)
            kwargs = {k: _to_float32(v) for k, v in kwargs.items()}
            with _autocast_off(first.device.type):
                result = fn(*args, **kwargs)
            if returns == "tensor":
                return result.to(out_dtype)
            if returns == "out_state":
                return result[0].to(out_dtype), result[1]
            return result

        return wrapper  # type: ignore[return-value]

    return decorate


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


def _autocast_off(device_type: str):
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return contextlib.nullcontext()


def _to_float32(x):
    if isinstance(x, Tensor) and x.dtype in _HALF_TYPES:
        return x.float()
    if isinstance(x, tuple):
        return tuple(_to_float32(t) for t in x)
    return x


def _masked_keys(k: Tensor, key_mask: Optional[Tensor]) -> Tensor:
    """``phi(k)`` with masked keys set to exactly zero, so they add nothing to ``S`` or ``z``."""
    fk = elu_feature_map(k)
    if key_mask is not None:
        fk = fk * key_mask[:, None, :, None].to(fk.dtype)
    return fk


# --------------------------------------------------------------------------------------------
# Non-causal linear attention (encoder self-attention, decoder cross-attention)
# --------------------------------------------------------------------------------------------


@_full_precision(returns="state")
def linear_attention_summary(k: Tensor, v: Tensor, key_mask: Optional[Tensor] = None) -> LinearState:
    """Summarise keys and values once: ``S = phi(K)^T V`` [B, H, d, dv], ``z = sum phi(K)`` [B, H, d].

    ``key_mask`` [B, N] bool, True = valid. A decoder computes this once per report for its
    cross-attention, after which every query costs O(d dv) regardless of the memory size.
    """
    fk = _masked_keys(k, key_mask)
    return fk.transpose(-1, -2) @ v, fk.sum(dim=-2)


@_full_precision(returns="tensor")
def linear_attention_readout(q: Tensor, state: LinearState, *, eps: float = DEFAULT_EPS) -> Tensor:
    """Read a summary ``(S, z)`` with queries ``q`` [B, H, N, d] (or one query [B, H, d])."""
    s, z = state
    single = q.dim() == 3
    fq = elu_feature_map(q.unsqueeze(-2) if single else q)
    num = fq @ s  # [B, H, N, dv]
    den = fq @ z.unsqueeze(-1)  # [B, H, N, 1]
    out = num * (den + eps).reciprocal()
    return out.squeeze(-2) if single else out


def linear_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor] = None, *,
                     eps: float = DEFAULT_EPS) -> Tensor:
    """Non-causal linear attention. q [B, H, N, d], k [B, H, S, d], v [B, H, S, dv] -> [B, H, N, dv].

    ``key_mask`` [B, S] bool, True = valid; masked keys are zeroed after the feature map, so extra
    padding leaves the valid outputs unchanged. A row with no valid key outputs 0.
    """
    return linear_attention_readout(q, linear_attention_summary(k, v, key_mask), eps=eps)


# --------------------------------------------------------------------------------------------
# Causal linear attention: parallel, chunked and recurrent forms
# --------------------------------------------------------------------------------------------


@_full_precision(returns="tensor")
def causal_linear_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor] = None, *,
                            eps: float = DEFAULT_EPS) -> Tensor:
    """Causal linear attention, parallel form: ``tril(phi(Q) phi(K)^T) V`` normalised row-wise.

    q, k [B, H, N, d], v [B, H, N, dv] -> [B, H, N, dv]. O(N^2) time and memory: meant for
    report-length N; use ``causal_linear_attention_chunked`` for long sequences.
    ``key_mask`` [B, N] (True = valid) is optional: with right padding causality alone keeps
    padded keys away from valid queries; a mask makes any padding pattern safe.
    """
    fq = elu_feature_map(q)
    fk = _masked_keys(k, key_mask)
    # tril_ in place is safe: matmul's backward needs fq and fk, not its own output.
    scores = torch.matmul(fq, fk.transpose(-1, -2)).tril_()  # [B, H, N, N]
    num = scores @ v
    den = scores.sum(dim=-1, keepdim=True)
    return num * (den + eps).reciprocal()


@_full_precision(returns="tensor")
def causal_linear_attention_chunked(q: Tensor, k: Tensor, v: Tensor, chunk_size: int = 64,
                                    key_mask: Optional[Tensor] = None, *,
                                    eps: float = DEFAULT_EPS) -> Tensor:
    """Causal linear attention, chunked form: exact, O(N C) + O((N / C) d dv) memory.

    Inside each chunk of ``chunk_size`` tokens the quadratic form is used; across chunks an
    exclusive prefix sum of per-chunk summaries ``(phi(K_c)^T V_c, sum phi(K_c))`` carries the
    state. Same inputs and output as ``causal_linear_attention``, which it simply calls when
    ``N <= chunk_size``. A last, partial chunk is zero-padded (zero keys add nothing).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    b, h, n, d = q.shape
    if n <= chunk_size:  # one chunk: the parallel form, without padding to the chunk size
        return causal_linear_attention(q, k, v, key_mask, eps=eps)
    dv = v.shape[-1]
    fq = elu_feature_map(q)
    fk = _masked_keys(k, key_mask)
    num_chunks = -(-n // chunk_size)
    pad = num_chunks * chunk_size - n
    if pad:  # zero keys add nothing; outputs at padded queries are dropped below
        fq, fk, v = (F.pad(t, (0, 0, 0, pad)) for t in (fq, fk, v))
    fq = fq.reshape(b, h, num_chunks, chunk_size, d)
    fk = fk.reshape(b, h, num_chunks, chunk_size, d)
    vc = v.reshape(b, h, num_chunks, chunk_size, dv)

    scores = torch.matmul(fq, fk.transpose(-1, -2)).tril_()  # [B, H, n, C, C]
    num = scores @ vc
    den = scores.sum(dim=-1, keepdim=True)
    if num_chunks > 1:
        kv = fk.transpose(-1, -2) @ vc  # [B, H, n, d, dv]
        kz = fk.sum(dim=-2)  # [B, H, n, d]
        # Exclusive prefix over chunks: chunk c sees the sum of chunks 0..c-1.
        s_prev = F.pad(kv[:, :, :-1].cumsum(dim=2), (0, 0, 0, 0, 1, 0))
        z_prev = F.pad(kz[:, :, :-1].cumsum(dim=2), (0, 0, 1, 0))
        num = num + fq @ s_prev
        den = den + fq @ z_prev.unsqueeze(-1)
    out = (num * (den + eps).reciprocal()).reshape(b, h, num_chunks * chunk_size, dv)
    return out[:, :, :n] if pad else out


def init_linear_state(batch: int, heads: int, dim: int, value_dim: int, *, dtype: torch.dtype = torch.float32,
                      device: Optional[torch.device] = None) -> LinearState:
    """The empty recurrent state ``(S = 0 [B, H, d, dv], z = 0 [B, H, d])``; half types are kept float32."""
    if dtype in _HALF_TYPES:
        dtype = torch.float32
    return (torch.zeros(batch, heads, dim, value_dim, dtype=dtype, device=device),
            torch.zeros(batch, heads, dim, dtype=dtype, device=device))


@_full_precision(returns="out_state")
def linear_attention_step(q_t: Tensor, k_t: Tensor, v_t: Tensor, state: Optional[LinearState] = None, *,
                          eps: float = DEFAULT_EPS) -> Tuple[Tensor, LinearState]:
    """Causal linear attention, recurrent form: one token, constant cost.

    q_t, k_t [B, H, d], v_t [B, H, dv], state ``(S [B, H, d, dv], z [B, H, d])`` or None (empty).
    Returns ``(out_t [B, H, dv], new_state)``; the input state is not modified, so a beam search
    may keep or reorder old states freely.
    """
    if state is None:
        state = init_linear_state(*q_t.shape, v_t.shape[-1], dtype=q_t.dtype, device=q_t.device)
    s, z = state
    fk = elu_feature_map(k_t)
    s = torch.addcmul(s, fk.unsqueeze(-1), v_t.unsqueeze(-2))  # S + phi(k) v^T in one pass
    z = z + fk
    return linear_attention_readout(q_t, (s, z), eps=eps), (s, z)


# --------------------------------------------------------------------------------------------
# Softmax attention (ablation baseline) through scaled_dot_product_attention
# --------------------------------------------------------------------------------------------


def softmax_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor] = None, *,
                      causal: bool = False) -> Tensor:
    """Scaled dot-product softmax attention via ``F.scaled_dot_product_attention``.

    q [B, H, N, d], k [B, H, S, d], v [B, H, S, dv], key_mask [B, S] bool (True = valid).
    With ``causal`` and no mask the fused ``is_causal`` kernel is used. A query with no valid key
    (possible only in padding) would make softmax divide 0 by 0; such rows are let attend to
    themselves (causal) or to every key (non-causal) so their -- discarded -- outputs stay finite.
    """
    if key_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    n, s = q.shape[-2], k.shape[-2]
    mask = key_mask[:, None, None, :]  # [B, 1, 1, S]
    if causal:
        allowed = torch.ones(n, s, dtype=torch.bool, device=q.device).tril_(s - n)  # queries end-aligned
        diagonal = allowed & ~allowed.tril(s - n - 1)  # each query's own key: valid queries see it anyway
        mask = (mask & allowed) | diagonal
    else:
        mask = mask | ~key_mask.any(dim=-1)[:, None, None, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def softmax_attention_step(q_t: Tensor, k_t: Tensor, v_t: Tensor,
                           cache: Optional[KVCache] = None) -> Tuple[Tensor, KVCache]:
    """Causal softmax attention for one new token with a growing key/value cache.

    q_t, k_t [B, H, d], v_t [B, H, dv], cache ``(K [B, H, t, d], V [B, H, t, dv])`` or None.
    Returns ``(out_t [B, H, dv], cache with t + 1 entries)``: cost and memory grow with t.
    """
    k_new, v_new = k_t.unsqueeze(-2), v_t.unsqueeze(-2)
    if cache is not None:
        k_new = torch.cat([cache[0], k_new], dim=-2)
        v_new = torch.cat([cache[1], v_new], dim=-2)
    out = F.scaled_dot_product_attention(q_t.unsqueeze(-2), k_new, v_new)
    return out.squeeze(-2), (k_new, v_new)
