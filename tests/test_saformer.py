"""SAFormer modules: incremental decoding equals the full pass, no future leakage, padding invariance."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ifnet.errors import IFNetError
from ifnet.layers import DecoderState, SAFormerConfig, SAFormerDecoder, SAFormerEncoder, sinusoidal_positions

D = 16
KINDS = [("linear", None), ("linear", 3), ("softmax", None)]
KIND_IDS = ["linear", "linear-chunked", "softmax"]


def tiny_config(attention="linear", chunk_size=None, **kw) -> SAFormerConfig:
    base = dict(d_model=D, num_heads=2, num_encoder_layers=2, num_decoder_layers=2, d_ff=32, dropout=0.0,
                attention=attention, chunk_size=chunk_size)
    base.update(kw)
    return SAFormerConfig(**base)


def make_decoder(attention="linear", chunk_size=None, dtype=torch.float64) -> SAFormerDecoder:
    torch.manual_seed(0)
    return SAFormerDecoder(tiny_config(attention, chunk_size)).to(dtype).eval()


def inputs(b=2, t=7, s=5, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(b, t, D, generator=g, dtype=dtype)
    memory = torch.randn(b, s, D, generator=g, dtype=dtype)
    memory_mask = torch.ones(b, s, dtype=torch.bool)
    memory_mask[0, s - 2:] = False  # first report has two padded memory slots
    return y, memory, memory_mask


def run_steps(decoder, y, memory, memory_mask):
    state = decoder.init_state(memory, memory_mask)
    outs = []
    for t in range(y.shape[1]):
        assert state.length == t
        out, state = decoder.step(y[:, t], state)
        outs.append(out)
    return torch.stack(outs, dim=1), state


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def test_config_defaults_match_the_issue():
    cfg = SAFormerConfig()
    assert (cfg.d_model, cfg.num_heads, cfg.num_encoder_layers, cfg.num_decoder_layers) == (512, 8, 3, 3)
    assert cfg.attention == "linear" and cfg.chunk_size is None


@pytest.mark.parametrize("bad", [dict(attention="performer"), dict(d_model=10, num_heads=3),
                                 dict(chunk_size=0), dict(dropout=1.0), dict(num_decoder_layers=0)])
def test_config_rejects_impossible_settings(bad):
    with pytest.raises(IFNetError):
        SAFormerConfig(**bad)


# --------------------------------------------------------------------------------------------
# Shapes, gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention,chunk", KINDS, ids=KIND_IDS)
def test_forward_shapes_finite_and_backward(attention, chunk):
    torch.manual_seed(0)
    cfg = tiny_config(attention, chunk, dropout=0.1)
    enc, dec = SAFormerEncoder(cfg), SAFormerDecoder(cfg)
    y, memory, memory_mask = inputs(dtype=torch.float32)
    tgt_mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    mem = enc(memory, memory_mask)
    out = dec(y, mem, memory_mask, tgt_mask)
    assert mem.shape == memory.shape and out.shape == y.shape
    assert torch.isfinite(out).all()
    out.sum().backward()
    grads = [p.grad for p in list(enc.parameters()) + list(dec.parameters())]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# --------------------------------------------------------------------------------------------
# Incremental decoding equals the full pass
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention,chunk", KINDS, ids=KIND_IDS)
def test_incremental_decoding_equals_full_forward(attention, chunk):
    decoder = make_decoder(attention, chunk)
    y, memory, memory_mask = inputs(t=8)
    with torch.no_grad():
        full = decoder(y, memory, memory_mask)
        stepped, _ = run_steps(decoder, y, memory, memory_mask)
    torch.testing.assert_close(stepped, full, rtol=0, atol=1e-5)
    assert (stepped - full).abs().max() < 1e-10  # float64: same maths, different summation order


@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_incremental_decoding_equals_full_forward_float32(attention):
    decoder = make_decoder(attention, dtype=torch.float32)
    y, memory, memory_mask = inputs(t=20, dtype=torch.float32)
    with torch.no_grad():
        full = decoder(y, memory, memory_mask)
        stepped, _ = run_steps(decoder, y, memory, memory_mask)
    torch.testing.assert_close(stepped, full, rtol=0, atol=1e-4)  # outputs are LayerNorm-ed, O(1)


def test_chunked_training_form_equals_parallel_form():
    parallel, chunked = make_decoder("linear"), make_decoder("linear", chunk_size=3)
    chunked.load_state_dict(parallel.state_dict())
    y, memory, memory_mask = inputs(t=11)
    torch.testing.assert_close(chunked(y, memory, memory_mask), parallel(y, memory, memory_mask),
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_state_size_is_fixed_for_linear_and_grows_for_softmax(attention):
    decoder = make_decoder(attention)
    y, memory, memory_mask = inputs(t=6)

    def numel(state):
        return sum(t.numel() for entry in state.self_attention for t in entry)

    with torch.no_grad():
        _, after_1 = run_steps(decoder, y[:, :1], memory, memory_mask)
        _, after_6 = run_steps(decoder, y, memory, memory_mask)
    if attention == "linear":
        assert numel(after_6) == numel(after_1)
    else:
        assert numel(after_6) == 6 * numel(after_1)


@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_state_index_select_commutes_with_step(attention):
    decoder = make_decoder(attention)
    y, memory, memory_mask = inputs(t=4, b=3, s=5)
    idx = torch.tensor([2, 0, 0, 1, 2])
    with torch.no_grad():
        state = decoder.init_state(memory, memory_mask)
        for t in range(3):
            _, state = decoder.step(y[:, t], state)
        out_then_select, _ = decoder.step(y[:, 3], state)
        picked = state.index_select(idx)
        select_then_out, new = decoder.step(y[idx, 3], picked)
        again, _ = decoder.step(y[idx, 3], picked)  # step leaves its input state untouched
    assert isinstance(picked, DecoderState) and picked.batch_size == 5 and picked.length == 3
    torch.testing.assert_close(select_then_out, out_then_select[idx], rtol=0, atol=1e-12)
    assert torch.equal(again, select_then_out) and new.length == 4


# --------------------------------------------------------------------------------------------
# No future leakage
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention,chunk", KINDS, ids=KIND_IDS)
def test_decoder_no_future_leakage(attention, chunk):
    decoder = make_decoder(attention, chunk)
    y, memory, memory_mask = inputs(t=9)
    out = decoder(y, memory, memory_mask)
    for t in (0, 3, 7):
        y2 = y.clone()
        y2[:, t + 1] += 5.0 * torch.randn(2, D, dtype=y.dtype)
        out2 = decoder(y2, memory, memory_mask)
        torch.testing.assert_close(out2[:, : t + 1], out[:, : t + 1], rtol=0, atol=1e-12)
        assert not torch.allclose(out2[:, t + 1], out[:, t + 1])


def test_decoder_gradient_of_early_output_ignores_later_tokens():
    decoder = make_decoder("linear")
    y, memory, memory_mask = inputs(t=6)
    y.requires_grad_()
    # a random projection: the plain sum of a LayerNorm output is constant, so its gradient is 0
    (decoder(y, memory, memory_mask)[:, 2] * torch.randn(2, D, dtype=y.dtype)).sum().backward()
    assert torch.count_nonzero(y.grad[:, 3:]) == 0 and torch.count_nonzero(y.grad[:, :3]) > 0


# --------------------------------------------------------------------------------------------
# Padding invariance
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention,chunk", KINDS, ids=KIND_IDS)
def test_extra_target_padding_leaves_valid_outputs_unchanged(attention, chunk):
    decoder = make_decoder(attention, chunk)
    y, memory, memory_mask = inputs(t=6)
    reference = decoder(y, memory, memory_mask)
    padded = torch.cat([y, 50 * torch.randn(2, 4, D, dtype=y.dtype)], dim=1)
    tgt_mask = torch.tensor([[True] * 6 + [False] * 4] * 2)
    for mask in (tgt_mask, None):  # right padding: causality alone already protects valid positions
        out = decoder(padded, memory, memory_mask, mask)
        torch.testing.assert_close(out[:, :6], reference, rtol=0, atol=1e-10)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("attention,chunk", KINDS, ids=KIND_IDS)
def test_extra_masked_memory_leaves_outputs_unchanged(attention, chunk):
    decoder = make_decoder(attention, chunk)
    y, memory, memory_mask = inputs(t=5)
    reference = decoder(y, memory, memory_mask)
    more_memory = torch.cat([memory, 50 * torch.randn(2, 3, D, dtype=memory.dtype)], dim=1)
    more_mask = torch.cat([memory_mask, torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(decoder(y, more_memory, more_mask), reference, rtol=0, atol=1e-10)
    stepped, _ = run_steps(decoder, y, more_memory, more_mask)
    torch.testing.assert_close(stepped, reference, rtol=0, atol=1e-10)


@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_encoder_padding_leaves_valid_outputs_unchanged(attention):
    torch.manual_seed(0)
    encoder = SAFormerEncoder(tiny_config(attention)).double().eval()
    _, x, mask = inputs(s=6)
    reference = encoder(x, mask)
    x2 = torch.cat([x, 50 * torch.randn(2, 4, D, dtype=x.dtype)], dim=1)
    mask2 = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], dim=1)
    x2[0, 4:6] = -x2[0, 4:6]  # the already-padded slots of report 0 change too
    out = encoder(x2, mask2)
    torch.testing.assert_close(out[0, :4], reference[0, :4], rtol=0, atol=1e-10)
    torch.testing.assert_close(out[1, :6], reference[1], rtol=0, atol=1e-10)


# --------------------------------------------------------------------------------------------
# Softmax path goes through SDPA; linear never does
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_only_the_softmax_path_calls_sdpa(monkeypatch, attention):
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    decoder = make_decoder(attention)
    y, memory, memory_mask = inputs(t=3)
    decoder(y, memory, memory_mask)
    run_steps(decoder, y, memory, memory_mask)
    layers = 2
    assert len(calls) == (2 * layers + 3 * 2 * layers if attention == "softmax" else 0)


# --------------------------------------------------------------------------------------------
# Half precision and positions
# --------------------------------------------------------------------------------------------


def test_bfloat16_autocast_forward_is_finite():
    torch.manual_seed(0)
    decoder = SAFormerDecoder(tiny_config("linear", chunk_size=4)).eval()
    y, memory, memory_mask = inputs(t=40, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = decoder(y, memory, memory_mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), decoder(y, memory, memory_mask), rtol=0, atol=0.1)


def test_sinusoidal_positions_values():
    table = sinusoidal_positions(50, 8)
    assert table.shape == (50, 8) and table.dtype == torch.float32
    assert torch.equal(table[0], torch.tensor([0.0, 1.0] * 4))
    p, i = 7, 2  # dims 2i, 2i+1 use frequency 10000^(-2i/d)
    freq = 10000 ** (-2 * i / 8)
    torch.testing.assert_close(table[p, 2 * i], torch.tensor(math.sin(p * freq)))
    torch.testing.assert_close(table[p, 2 * i + 1], torch.tensor(math.cos(p * freq)))
    assert sinusoidal_positions(3, 5).shape == (3, 5)  # odd widths work too
