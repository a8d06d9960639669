"""Memory matrix: top-k querying and responding, label conditioning of slot choice."""

from __future__ import annotations

import pytest
import torch

from ifnet.models.memory import MemoryMatrix

torch.set_num_threads(min(2, torch.get_num_threads()))


def _memory(**kw) -> MemoryMatrix:
    torch.manual_seed(0)
    args = dict(d_model=16, num_slots=32, num_heads=2, top_k=4, num_labels=14, dropout=0.0)
    args.update(kw)
    return MemoryMatrix(**args).eval()


def test_response_shape_and_top_k_readout():
    mem = _memory()
    x = torch.randn(3, 5, 16)
    response, readout = mem(x, return_readout=True)
    assert response.shape == (3, 5, 16)
    assert readout.indices.shape == readout.weights.shape == (3, 2, 5, 4)
    assert torch.allclose(readout.weights.sum(-1), torch.ones(3, 2, 5))
    assert (readout.weights > 0).all()
    # Each (token, head) reads k distinct slots.
    assert (readout.indices.sort(-1).values.diff(dim=-1) > 0).all()


def test_response_is_the_weighted_sum_of_the_selected_slots():
    mem = _memory()
    x = torch.randn(1, 1, 16)
    response, readout = mem(x, return_readout=True)
    slots = mem.project_slots()
    heads = []
    for h in range(mem.num_heads):
        idx, w = readout.indices[0, h, 0], readout.weights[0, h, 0]
        heads.append((w[:, None] * slots.values[h, idx]).sum(0))
    expected = mem.out(torch.cat(heads)[None, None])
    assert torch.allclose(response, expected, atol=1e-6)


def test_only_top_k_slots_matter():
    """Changing a slot no token selected leaves every response unchanged."""
    mem = _memory()
    x = torch.randn(2, 3, 16)
    response, readout = mem(x, return_readout=True)
    unused = sorted(set(range(32)) - set(readout.indices.flatten().tolist()))
    assert unused
    with torch.no_grad():
        mem.slots[unused[0]] += 0.01  # small, so the top-k selection itself stays the same
    assert torch.equal(mem(x, return_readout=True)[1].indices, readout.indices)
    assert torch.allclose(mem(x), response, atol=1e-6)


def test_label_condition_changes_slot_weights():
    mem = _memory()
    x = torch.randn(2, 4, 16)
    a = torch.zeros(2, 14)
    b = torch.zeros(2, 14)
    b[:, 1] = 1.0  # Cardiomegaly
    ra, read_a = mem(x, mem.slot_bias(a), return_readout=True)
    rb, read_b = mem(x, mem.slot_bias(b), return_readout=True)
    assert not torch.allclose(ra, rb)
    assert not torch.allclose(read_a.weights, read_b.weights)


def test_a_strong_label_preference_forces_its_slot_into_every_read():
    mem = _memory()
    with torch.no_grad():
        mem.label_to_slot.zero_()
        mem.label_to_slot[4, 7] = 100.0  # Edema -> slot 7
    x = torch.randn(2, 6, 16)
    cond = torch.zeros(2, 14)
    cond[0, 4] = 1.0
    _, readout = mem(x, mem.slot_bias(cond), return_readout=True)
    assert (readout.indices[0] == 7).any(-1).all()  # study 0 (Edema) always reads slot 7 ...
    assert torch.allclose(readout.weights[0].max(-1).values, torch.ones(2, 6))  # ... with all its weight
    assert not (readout.weights[1].max(-1).values > 0.999).all()


def test_tokens_are_answered_independently():
    """Querying one token alone (incremental decoding) gives what it gets inside a sequence."""
    mem = _memory()
    x = torch.randn(2, 5, 16)
    bias = mem.slot_bias(torch.rand(2, 14))
    full = mem(x, bias)
    slots = mem.project_slots()
    for t in range(5):
        assert torch.allclose(mem(x[:, t:t + 1], bias, slots), full[:, t:t + 1], atol=1e-6)


def test_gradients_reach_slots_projections_and_label_weights():
    mem = _memory()
    mem.train()
    x = torch.randn(2, 3, 16, requires_grad=True)
    mem(x, mem.slot_bias(torch.rand(2, 14))).pow(2).sum().backward()
    for name, p in mem.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("kw, match", [({"top_k": 33}, "top_k"), ({"top_k": 0}, "top_k"),
                                       ({"num_heads": 3}, "divisible")])
def test_bad_settings_are_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        _memory(**kw)


def test_default_size_matches_r2gencmn():
    mem = MemoryMatrix(512)
    assert mem.slots.shape == (2048, 512) and mem.top_k == 32 and mem.label_to_slot.shape == (14, 2048)


def test_gathered_and_dense_reads_agree(monkeypatch):
    """Few query rows read the k chosen values by index, many rows use one dense product: same response
    and same gradients."""
    import ifnet.models.memory as memory_module

    mem = _memory()
    x = torch.randn(3, 7, 16, requires_grad=True)
    bias = mem.slot_bias(torch.rand(3, 14))
    results = []
    for rows in (0, 10_000):  # 0: always dense; 10000: always gathered
        monkeypatch.setattr(memory_module, "GATHER_MAX_ROWS", rows)
        mem.zero_grad()
        x.grad = None
        out = mem(x, bias.detach())
        out.square().sum().backward()
        results.append((out.detach(), x.grad.clone(), mem.slots.grad.clone(), mem.value.weight.grad.clone()))
    for dense, gathered in zip(*results):
        assert torch.allclose(dense, gathered, atol=1e-5)
