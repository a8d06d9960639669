"""Attention maths: hand-checked values, the three causal forms against each other and a naive reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ifnet.layers import attention as A

F64 = torch.float64
# float32 tolerance for agreement between forms: outputs are convex combinations of v ~ N(0, 1),
# and the forms sum in different orders, so differences are a few float32 ulps of O(1) numbers.
F32_TOL = 1e-4


def qkv(b=2, h=3, n=11, d=4, dv=5, dtype=F64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g, dtype=dtype) * scale
    k = torch.randn(b, h, n, d, generator=g, dtype=dtype) * scale
    v = torch.randn(b, h, n, dv, generator=g, dtype=dtype)
    return q, k, v


def recurrent(q, k, v, eps=A.DEFAULT_EPS):
    state, outs = None, []
    for t in range(q.shape[2]):
        out, state = A.linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], state, eps=eps)
        outs.append(out)
    return torch.stack(outs, dim=2)


def naive_causal(q, k, v, eps=A.DEFAULT_EPS):
    """out_i = sum_{j<=i} phi(q_i).phi(k_j) v_j / (sum_{j<=i} phi(q_i).phi(k_j) + eps), written as loops."""
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    for i in range(q.shape[2]):
        w = (fq[:, :, i : i + 1] * fk[:, :, : i + 1]).sum(-1)  # [B, H, i+1]
        out[:, :, i] = (w.unsqueeze(-1) * v[:, :, : i + 1]).sum(2) / (w.sum(-1, keepdim=True) + eps)
    return out


# --------------------------------------------------------------------------------------------
# Feature map
# --------------------------------------------------------------------------------------------


def test_feature_map_values_match_elu_plus_one():
    x = torch.tensor([-100.0, -20.0, -1.0, 0.0, 0.5, 3.0], dtype=F64)
    expected = torch.tensor([math.exp(-100), math.exp(-20), math.exp(-1), 1.0, 1.5, 4.0], dtype=F64)
    torch.testing.assert_close(A.elu_feature_map(x), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(A.elu_feature_map(x[2:]), F.elu(x[2:]) + 1)


def test_feature_map_strictly_positive_where_elu_plus_one_underflows():
    x = torch.tensor([-30.0, -50.0, -80.0])  # float32: elu(x) + 1 rounds to exactly 0 here
    assert (A.elu_feature_map(x) > 0).all()


def test_feature_map_gradients_and_double_backward():
    x = torch.randn(3, 7, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(A.elu_feature_map, (x,))
    assert torch.autograd.gradgradcheck(A.elu_feature_map, (x,))
    (g,) = torch.autograd.grad(A.elu_feature_map(x).sum(), x)
    (g_ref,) = torch.autograd.grad((F.elu(x) + 1).sum(), x)
    torch.testing.assert_close(g, g_ref)


# --------------------------------------------------------------------------------------------
# Non-causal
# --------------------------------------------------------------------------------------------


def test_linear_attention_matches_definition():
    q, k, v = qkv(n=6)
    k, v = k[:, :, :4], v[:, :, :4]  # 6 queries, 4 keys
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    w = fq @ fk.transpose(-1, -2)
    expected = (w @ v) / (w.sum(-1, keepdim=True) + A.DEFAULT_EPS)
    torch.testing.assert_close(A.linear_attention(q, k, v), expected)


def test_linear_attention_masked_keys_change_nothing():
    q, k, v = qkv(n=7)
    mask = torch.tensor([[True] * 5 + [False] * 2, [True] * 3 + [False] * 4])
    out = A.linear_attention(q, k, v, mask)
    k2, v2 = k.clone(), v.clone()
    k2[~mask.unsqueeze(1).expand_as(k2[..., 0])] = 1e3  # garbage at padded keys
    v2[~mask.unsqueeze(1).expand_as(v2[..., 0])] = -1e3
    torch.testing.assert_close(A.linear_attention(q, k2, v2, mask), out, rtol=0, atol=1e-12)
    # and equal to simply leaving the padded keys out
    torch.testing.assert_close(out[1], A.linear_attention(q[1:], k[1:, :, :3], v[1:, :, :3])[0])


def test_linear_attention_all_keys_masked_gives_zero_not_nan():
    q, k, v = qkv(n=4)
    out = A.linear_attention(q, k, v, torch.zeros(2, 4, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(out))


def test_summary_then_single_query_readout_equals_batched_readout():
    q, k, v = qkv(n=5)
    summary = A.linear_attention_summary(k, v)
    full = A.linear_attention_readout(q, summary)
    torch.testing.assert_close(A.linear_attention_readout(q[:, :, 2], summary), full[:, :, 2])


# --------------------------------------------------------------------------------------------
# Causal: three forms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,chunk", [(1, 4), (7, 64), (12, 4), (13, 4), (17, 1), (33, 8)])
def test_three_causal_forms_agree_float64(n, chunk):
    q, k, v = qkv(n=n)
    reference = naive_causal(q, k, v)
    parallel = A.causal_linear_attention(q, k, v)
    chunked = A.causal_linear_attention_chunked(q, k, v, chunk)
    rec = recurrent(q, k, v)
    for got in (parallel, chunked, rec):
        torch.testing.assert_close(got, reference, rtol=0, atol=1e-5)
        assert (got - reference).abs().max() < 1e-12  # in float64 they are the same sum, reordered


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 2), n=st.integers(1, 40), d=st.integers(1, 6),
       dv=st.integers(1, 6), chunk=st.integers(1, 16), scale=st.sampled_from([0.1, 1.0, 5.0]),
       seed=st.integers(0, 2**16))
def test_three_causal_forms_agree_any_shape(b, h, n, d, dv, chunk, scale, seed):
    q, k, v = qkv(b, h, n, d, dv, seed=seed, scale=scale)
    parallel = A.causal_linear_attention(q, k, v)
    torch.testing.assert_close(A.causal_linear_attention_chunked(q, k, v, chunk), parallel, rtol=0, atol=1e-5)
    torch.testing.assert_close(recurrent(q, k, v), parallel, rtol=0, atol=1e-5)


def test_three_causal_forms_agree_float32():
    q, k, v = qkv(b=2, h=4, n=150, d=16, dv=16, dtype=torch.float32)
    parallel = A.causal_linear_attention(q, k, v)
    torch.testing.assert_close(A.causal_linear_attention_chunked(q, k, v, 32), parallel, rtol=0, atol=F32_TOL)
    torch.testing.assert_close(recurrent(q, k, v), parallel, rtol=0, atol=F32_TOL)
    torch.testing.assert_close(parallel.double(), naive_causal(q.double(), k.double(), v.double()),
                               rtol=0, atol=F32_TOL)


def test_parallel_and_chunked_gradients_agree():
    q, k, v = (t.requires_grad_() for t in qkv(n=19))
    upstream = torch.randn(2, 3, 19, 5, dtype=F64)
    g_par = torch.autograd.grad((A.causal_linear_attention(q, k, v) * upstream).sum(), (q, k, v))
    g_chk = torch.autograd.grad((A.causal_linear_attention_chunked(q, k, v, 4) * upstream).sum(), (q, k, v))
    for a, b in zip(g_par, g_chk):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("form", ["parallel", "chunked"])
def test_causal_gradcheck(form):
    q, k, v = (t.requires_grad_() for t in qkv(b=1, h=2, n=6, d=3, dv=2))
    fn = A.causal_linear_attention if form == "parallel" else (
        lambda q, k, v: A.causal_linear_attention_chunked(q, k, v, 4))
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("form", ["parallel", "chunked", "recurrent"])
def test_causal_no_future_leakage(form):
    fn = {"parallel": A.causal_linear_attention,
          "chunked": lambda q, k, v: A.causal_linear_attention_chunked(q, k, v, 3),
          "recurrent": recurrent}[form]
    q, k, v = qkv(n=10)
    out = fn(q, k, v)
    for t in (0, 4, 8):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for x in (q2, k2, v2):
            x[:, :, t + 1:] += 10.0 * torch.randn_like(x[:, :, t + 1:])
        out2 = fn(q2, k2, v2)
        assert torch.equal(out2[:, :, : t + 1], out[:, :, : t + 1])
        assert not torch.allclose(out2[:, :, t + 1:], out[:, :, t + 1:])


def test_causal_key_mask_excludes_keys_in_parallel_and_chunked_forms():
    q, k, v = qkv(n=9)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 3] = mask[1, 0] = False  # not only right padding
    fq, fk = F.elu(q) + 1, (F.elu(k) + 1) * mask[:, None, :, None]
    w = (fq @ fk.transpose(-1, -2)).tril()
    expected = (w @ v) / (w.sum(-1, keepdim=True) + A.DEFAULT_EPS)
    torch.testing.assert_close(A.causal_linear_attention(q, k, v, mask), expected)
    torch.testing.assert_close(A.causal_linear_attention_chunked(q, k, v, 4, mask), expected)
    assert torch.equal(A.causal_linear_attention(q, k, v, mask)[1, :, 0], torch.zeros(3, 5, dtype=F64))


def test_right_padding_cannot_leak_backwards():
    q, k, v = qkv(n=8)
    padded = [torch.cat([x, 100 * torch.randn_like(x[:, :, :5])], dim=2) for x in (q, k, v)]
    out = A.causal_linear_attention(q, k, v)
    torch.testing.assert_close(A.causal_linear_attention(*padded)[:, :, :8], out, rtol=0, atol=1e-12)
    torch.testing.assert_close(A.causal_linear_attention_chunked(*padded, chunk_size=3)[:, :, :8], out,
                               rtol=0, atol=1e-12)


def test_step_leaves_its_input_state_untouched_and_state_is_fixed_size():
    q, k, v = qkv(n=3)
    state = A.init_linear_state(2, 3, 4, 5, dtype=F64)
    out1, s1 = A.linear_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], state)
    assert torch.equal(state[0], torch.zeros_like(state[0])) and torch.equal(state[1], torch.zeros_like(state[1]))
    out2, s2 = A.linear_attention_step(q[:, :, 1], k[:, :, 1], v[:, :, 1], s1)
    assert s2[0].shape == (2, 3, 4, 5) and s2[1].shape == (2, 3, 4)
    again, _ = A.linear_attention_step(q[:, :, 1], k[:, :, 1], v[:, :, 1], s1)
    assert torch.equal(again, out2)


def test_chunk_size_must_be_positive():
    q, k, v = qkv(n=4)
    with pytest.raises(ValueError, match="chunk_size"):
        A.causal_linear_attention_chunked(q, k, v, 0)


# --------------------------------------------------------------------------------------------
# Half precision: the normaliser exceeds float16's range; computing in float32 keeps it finite
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_with_huge_normaliser_stay_finite(dtype):
    n, d = 512, 16
    q = torch.full((1, 1, n, d), 3.0)
    k = torch.full((1, 1, n, d), 3.0)  # phi = 4: phi(q).z reaches 16 * 16 * 512 = 131072 > 65504
    v = torch.randn(1, 1, n, d)
    reference = A.causal_linear_attention(q, k, v)
    for fn in (A.causal_linear_attention, lambda q, k, v: A.causal_linear_attention_chunked(q, k, v, 64),
               A.linear_attention):
        out = fn(q.to(dtype), k.to(dtype), v.to(dtype))
        assert out.dtype == dtype and torch.isfinite(out).all()
    out = A.causal_linear_attention(q.to(dtype), k.to(dtype), v.to(dtype))
    torch.testing.assert_close(out.float(), reference, rtol=0, atol=0.05)
    _, (s, z) = A.linear_attention_step(q[:, :, 0].to(dtype), k[:, :, 0].to(dtype), v[:, :, 0].to(dtype))
    assert s.dtype == z.dtype == torch.float32  # running sums stay float32
    s, z = A.linear_attention_summary(k.to(dtype), v.to(dtype))
    assert s.dtype == z.dtype == torch.float32 and torch.isfinite(s).all()


def test_autocast_region_does_not_downcast_the_sums():
    q, k, v = qkv(b=1, h=2, n=64, d=8, dv=8, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = A.causal_linear_attention(q, k, v)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, A.causal_linear_attention(q, k, v))


# --------------------------------------------------------------------------------------------
# Softmax (ablation) through scaled_dot_product_attention
# --------------------------------------------------------------------------------------------


def manual_softmax(q, k, v, mask):  # mask [N, S] or [B, 1, N, S], True = attend
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~mask, -math.inf).softmax(-1) @ v


def test_softmax_attention_uses_sdpa(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    q, k, v = qkv(n=5)
    A.softmax_attention(q, k, v, causal=True)
    A.softmax_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0])
    assert len(calls) == 2 and calls[0]["is_causal"] is True


def test_softmax_attention_masks():
    q, k, v = qkv(n=6)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    key = mask[:, None, None, :]
    torch.testing.assert_close(A.softmax_attention(q, k, v, mask), manual_softmax(q, k, v, key))
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    torch.testing.assert_close(A.softmax_attention(q, k, v, causal=True), manual_softmax(q, k, v, causal))
    got = A.softmax_attention(q, k, v, mask, causal=True)
    torch.testing.assert_close(got[0, :, :4], manual_softmax(q, k, v, causal & key)[0, :, :4])
    torch.testing.assert_close(got[1], manual_softmax(q, k, v, causal)[1])
    assert torch.isfinite(A.softmax_attention(q, k, v, torch.zeros(2, 6, dtype=torch.bool))).all()


def test_softmax_step_with_cache_equals_causal_attention():
    q, k, v = qkv(n=7)
    cache, outs = None, []
    for t in range(7):
        out, cache = A.softmax_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], cache)
        outs.append(out)
    assert cache[0].shape == (2, 3, 7, 4)
    torch.testing.assert_close(torch.stack(outs, 2), A.softmax_attention(q, k, v, causal=True))
