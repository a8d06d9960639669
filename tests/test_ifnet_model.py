"""IFNet assembly: view masking, no label leakage at inference, cached == incremental decoding."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ifnet.data.tokenizer import BOS_ID, EOS_ID, NEVER_GENERATED, PAD_ID, UNK_ID
from ifnet.errors import DataError, IFNetError
from ifnet.layers.saformer import SAFormerConfig
from ifnet.models.ifnet import IFNet, IFNetConfig, compute_losses

torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 24


def tiny_config(**kw) -> IFNetConfig:
    transformer = SAFormerConfig(d_model=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=2, d_ff=32,
                                 dropout=kw.pop("transformer_dropout", 0.1), attention=kw.pop("attention", "linear"))
    args = dict(vocab_size=VOCAB, extractor="resnet18", num_memory_slots=16, memory_top_k=4, memory_heads=2,
                max_positions=40, transformer=transformer)
    args.update(kw)
    return IFNetConfig(**args)


def make_model(seed: int = 0, **kw) -> IFNet:
    torch.manual_seed(seed)
    return IFNet(tiny_config(**kw))


def make_batch(seed: int = 0, batch: int = 3):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 2, 3, 64, 64, generator=g)
    view_mask = torch.ones(batch, 2, dtype=torch.bool)
    view_mask[1, 1] = False  # study 1 has only a frontal view
    tokens = torch.full((batch, 7), PAD_ID)
    for i, length in enumerate([7, 4, 6][:batch]):
        tokens[i, 0] = BOS_ID
        tokens[i, 1:length - 1] = torch.randint(4, VOCAB, (length - 2,), generator=g)
        tokens[i, length - 1] = EOS_ID
    labels = torch.randint(0, 2, (batch, 14), generator=g).float()
    return {"images": images, "view_mask": view_mask, "tokens": tokens, "labels": labels}


@pytest.fixture(scope="module")
def model() -> IFNet:
    return make_model().eval()


def test_teacher_forcing_shapes_losses_and_backward():
    m = make_model()
    b = make_batch()
    out = m(b["images"], b["view_mask"], b["tokens"], b["labels"])
    assert out.logits.shape == (3, 6, VOCAB)
    assert out.label_logits.shape == (3, 14)
    losses = compute_losses(out, b["tokens"], b["labels"])
    assert set(losses) == {"caption", "labels", "total"}
    assert all(torch.isfinite(v) for v in losses.values())
    losses["total"].backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_caption_loss_ignores_padding():
    m = make_model()
    b = make_batch()
    out = m(b["images"], b["view_mask"], b["tokens"], b["labels"])
    logits = out.logits.detach().clone()
    logits[1, 3:] = torch.randn_like(logits[1, 3:]) * 10  # study 1's targets there are pad
    changed = out._replace(logits=logits)
    assert torch.equal(compute_losses(out, b["tokens"])["caption"], compute_losses(changed, b["tokens"])["caption"])


def test_study_weights_make_the_label_loss_a_weighted_mean_over_studies():
    m = make_model()
    b = make_batch()
    with torch.no_grad():
        out = m(b["images"], b["view_mask"], b["tokens"], b["labels"])
    plain = compute_losses(out, b["tokens"], b["labels"])
    ones = compute_losses(out, b["tokens"], b["labels"], study_weights=torch.ones(3))
    assert torch.allclose(plain["labels"], ones["labels"]) and torch.equal(plain["caption"], ones["caption"])
    per_study = torch.nn.functional.binary_cross_entropy_with_logits(out.label_logits, b["labels"],
                                                                     reduction="none").mean(1)
    w = torch.tensor([1.0, 0.25, 0.5])
    weighted = compute_losses(out, b["tokens"], b["labels"], study_weights=w)
    assert torch.allclose(weighted["labels"], (per_study * w).sum() / w.sum())
    # a study repeated r times with weight 1/r counts as much as it did once with weight 1
    idx = [0, 1, 1, 1, 1, 2]
    repeated = out._replace(logits=out.logits[idx], label_logits=out.label_logits[idx])
    doubled = compute_losses(repeated, b["tokens"][idx], b["labels"][idx],
                             study_weights=torch.tensor([1.0, 0.25, 0.25, 0.25, 0.25, 1.0]))
    assert torch.allclose(doubled["labels"], plain["labels"])


def test_label_smoothing_mixes_the_target_word_with_the_uniform_vocabulary():
    m = make_model()
    b = make_batch()
    with torch.no_grad():
        out = m(b["images"], b["view_mask"], b["tokens"], b["labels"])
    logp = torch.log_softmax(out.logits.float(), dim=-1)
    targets = b["tokens"][:, 1:]
    keep = targets != PAD_ID
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)[keep].mean()
    uniform = -logp.mean(-1)[keep].mean()
    smoothed = compute_losses(out, b["tokens"], b["labels"], label_smoothing=0.1)
    assert torch.allclose(smoothed["caption"], 0.9 * nll + 0.1 * uniform, atol=1e-5)
    assert torch.allclose(compute_losses(out, b["tokens"])["caption"], nll, atol=1e-5)
    assert torch.equal(smoothed["labels"], compute_losses(out, b["tokens"], b["labels"])["labels"])


@pytest.mark.parametrize("training", [False, True])
def test_a_missing_views_pixels_cannot_change_anything(training):
    """Even in training mode (BatchNorm batch statistics), a masked view never reaches the outputs."""
    m = make_model(dropout=0.0, transformer_dropout=0.0).train(training)
    b = make_batch()
    other = b["images"].clone()
    other[1, 1] = float("nan")  # the masked view of study 1
    with torch.no_grad():
        a = m(b["images"], b["view_mask"], b["tokens"], b["labels"])
        c = m(other, b["view_mask"], b["tokens"], b["labels"])
        enc_a, enc_c = m.encode(b["images"], b["view_mask"]), m.encode(other, b["view_mask"])
    assert torch.equal(a.logits, c.logits) and torch.equal(a.label_logits, c.label_logits)
    assert torch.equal(enc_a.memory[enc_a.memory_mask], enc_c.memory[enc_c.memory_mask])
    assert enc_a.memory_mask[1].sum() == enc_a.memory_mask[0].sum() // 2  # 2x2 patches of one view, of two


def test_view_tokens_follow_the_grid_and_mask(model):
    b = make_batch()
    visual = model.encode_images(b["images"], b["view_mask"])
    assert visual.grid == (2, 2, 2)
    assert visual.tokens.shape == (3, 8, 32)
    assert visual.token_mask[1].tolist() == [True] * 4 + [False] * 4
    assert (visual.tokens[1, 4:] == 0).all()
    assert visual.pooled.shape == (3, 512)


def test_cached_features_path_equals_the_image_path(model):
    b = make_batch()
    with torch.no_grad():
        features = model.extract_features(b["images"], b["view_mask"])
        assert features.shape == (3, 2, 512, 2, 2)
        assert (features[1, 1] == 0).all()
        from_images = model(b["images"], b["view_mask"], b["tokens"], b["labels"])
        from_features = model(None, b["view_mask"], b["tokens"], b["labels"], features=features)
    assert torch.equal(from_images.logits, from_features.logits)


@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_incremental_decoding_equals_teacher_forcing(attention):
    """Step-by-step logits (memory response fused into each word as it comes) equal the full forward."""
    m = make_model(attention=attention).eval()
    b = make_batch()
    with torch.no_grad():
        full = m(b["images"], b["view_mask"], b["tokens"]).logits
        state = m.start_decoding(m.encode(b["images"], b["view_mask"]))
        steps = []
        for t in range(b["tokens"].shape[1] - 1):
            logits, state = m.decode_step(b["tokens"][:, t], state)
            steps.append(logits)
    steps = torch.stack(steps, 1)
    valid = b["tokens"][:, :-1] != PAD_ID
    assert torch.allclose(steps[valid], full[valid], atol=1e-5)


def test_condition_none_means_predicted_probabilities():
    m = make_model(condition_mode="probabilities").eval()
    b = make_batch()
    with torch.no_grad():
        enc = m.encode(b["images"], b["view_mask"])
    assert torch.equal(enc.condition, torch.sigmoid(enc.label_logits))


def test_condition_none_thresholded_uses_the_installed_thresholds(model):
    """Default mode: the label head's probabilities cut at per-label thresholds stored with the weights."""
    b = make_batch()
    with torch.no_grad():
        probs = torch.sigmoid(model.encode(b["images"], b["view_mask"]).label_logits)
        assert torch.equal(model.encode(b["images"], b["view_mask"]).condition, (probs >= 0.5).float())
        cut = probs[0].clone()  # study 0 sits exactly on every threshold -> all its labels positive
        try:
            model.set_label_thresholds(cut)
            enc = model.encode(b["images"], b["view_mask"])
        finally:
            model.set_label_thresholds(torch.full((14,), 0.5))
    assert torch.equal(enc.condition, (probs >= cut).float())
    assert torch.equal(enc.condition[0], torch.ones(14))
    assert "label_thresholds" in model.state_dict()  # saved and loaded with the checkpoint


def test_label_thresholds_are_checked(model):
    with pytest.raises(IFNetError, match="14 finite"):
        model.set_label_thresholds([0.5] * 13)
    with pytest.raises(IFNetError, match="14 finite"):
        model.set_label_thresholds([float("nan")] * 14)
    with pytest.raises(IFNetError, match="condition_mode"):
        tiny_config(condition_mode="soft").validate()


def test_weights_path_without_pretrained_is_refused_not_ignored(tmp_path):
    # The model used to pass weights_path only when pretrained, so the file was silently unused.
    with pytest.raises(IFNetError, match=r"weights_path='.*w\.pth' given but pretrained is False, so it would be "
                                         r"ignored.*model\.pretrained=true"):
        IFNet(tiny_config(weights_path=str(tmp_path / "w.pth")))
    # A checkpoint's config is rebuilt without reading ImageNet weights: its weights_path is not consulted.
    IFNet(tiny_config(weights_path=str(tmp_path / "w.pth")), load_pretrained=False)


def test_condition_reaches_every_word_directly(model):
    """The condition embedding: changing only the label vector changes the next-word logits at every step,
    even with the memory read switched off (so it is not only the memory's slot bias)."""
    b = make_batch()
    m = make_model(seed=3).eval()
    with torch.no_grad():
        m.memory.out.weight.zero_()
        m.memory.out.bias.zero_()  # memory responses are now exactly zero
        feats = m.extract_features(b["images"], b["view_mask"])
        a = m(None, b["view_mask"], b["tokens"], torch.zeros(3, 14), features=feats).logits
        c = m(None, b["view_mask"], b["tokens"], torch.ones(3, 14), features=feats).logits
        assert (a - c).abs().amax(-1).min() > 1e-4  # every (study, position) moved
        plain = make_model(seed=3, condition_embedding=False).eval()
        plain.memory.out.weight.zero_()
        plain.memory.out.bias.zero_()
        a0 = plain(None, b["view_mask"], b["tokens"], torch.zeros(3, 14), features=feats).logits
        c0 = plain(None, b["view_mask"], b["tokens"], torch.ones(3, 14), features=feats).logits
    # Without the embedding (and with a silent memory) the decoder sees the condition only through the
    # encoder's memory fusion of the visual tokens, which the silenced memory also removes.
    assert torch.allclose(a0, c0)


def test_condition_steers_the_memory(model):
    """The label vector matters (so the no-leakage test below has teeth)."""
    b = make_batch()
    with torch.no_grad():
        a = model.encode(b["images"], b["view_mask"], torch.zeros(3, 14))
        c = model.encode(b["images"], b["view_mask"], torch.ones(3, 14))
    assert not torch.allclose(a.memory[a.memory_mask], c.memory[c.memory_mask])


def test_label_forcing_mixes_reference_and_predicted_labels(model):
    logits = torch.randn(2, 14)
    ref = torch.randint(0, 2, (2, 14)).float()
    mixed = model.resolve_condition(logits, ref, label_forcing=0.25)
    assert torch.allclose(mixed, 0.25 * ref + 0.75 * (torch.sigmoid(logits) >= 0.5).float())  # thresholded mode
    soft = make_model(condition_mode="probabilities")
    assert torch.allclose(soft.resolve_condition(logits, ref, label_forcing=0.25),
                          0.25 * ref + 0.75 * torch.sigmoid(logits))
    assert torch.equal(model.resolve_condition(logits, ref), ref)
    with pytest.raises(ValueError, match="label_forcing"):
        model.resolve_condition(logits, ref, label_forcing=1.5)
    with pytest.raises(ValueError, match="condition must be"):
        model.resolve_condition(logits, ref[:, :5])


def test_caption_loss_never_trains_the_label_head_through_predicted_labels():
    m = make_model()
    b = make_batch()
    out = m(b["images"], b["view_mask"], b["tokens"], None)  # conditioned on its own predictions
    compute_losses(out, b["tokens"])["caption"].backward()
    grad = m.label_head.classifier.weight.grad
    assert grad is None or (grad == 0).all()


# -- no leakage ------------------------------------------------------------------------------------

@pytest.mark.parametrize("beam_size", [1, 3])
def test_evaluation_output_is_identical_whatever_the_reference_reports_say(model, beam_size):
    """Same images, different reference tokens and labels -> the same generated reports."""
    batch = make_batch(seed=0)
    other = dict(batch)
    other["tokens"] = torch.flip(make_batch(seed=5)["tokens"], dims=[0])
    other["labels"] = 1.0 - batch["labels"]
    assert not torch.equal(batch["tokens"], other["tokens"])
    out_a = model.generate_for_batch(batch, beam_size=beam_size, max_len=8)
    out_b = model.generate_for_batch(other, beam_size=beam_size, max_len=8)
    assert torch.equal(out_a, out_b)
    assert torch.equal(out_a, model.generate(batch["images"], batch["view_mask"], beam_size=beam_size, max_len=8))


def test_evaluation_entry_point_refuses_labels(model):
    b = make_batch()
    with pytest.raises(IFNetError, match="predicted labels only"):
        model.generate_for_batch(b, condition=b["labels"])


def test_generate_takes_radiologist_findings_and_restores_training_mode():
    m = make_model().train()
    b = make_batch()
    findings = torch.zeros(3, 14)
    findings[:, 9] = 1.0  # Pleural Effusion
    ids = m.generate(b["images"], b["view_mask"], beam_size=2, max_len=6, condition=findings)
    assert ids.dtype == torch.long and ids.shape[0] == 3 and ids.shape[1] <= 6
    assert ((ids >= 0) & (ids < VOCAB)).all()
    assert m.training


def test_greedy_generation_from_cached_features_equals_from_images(model):
    b = make_batch()
    with torch.no_grad():
        features = model.extract_features(b["images"], b["view_mask"])
    a = model.generate(b["images"], b["view_mask"], beam_size=1, max_len=6)
    c = model.generate(None, b["view_mask"], beam_size=1, max_len=6, features=features)
    assert torch.equal(a, c)


# -- heatmaps, validation, config ------------------------------------------------------------------

def test_label_activation_maps_average_to_the_label_logits(model):
    b = make_batch()
    with torch.no_grad():
        features = model.extract_features(b["images"], b["view_mask"])
        maps = model.label_activation_maps(features, b["view_mask"])
        logits = model.encode(None, b["view_mask"], features=features).label_logits
    assert maps.shape == (3, 14, 2, 2, 2)
    per_study = maps.sum(dim=(2, 3, 4)) / (b["view_mask"].sum(1, keepdim=True) * 4)
    assert torch.allclose(per_study + model.label_head.classifier.bias, logits, atol=1e-5)


def test_a_study_without_any_view_is_a_clear_error(model):
    b = make_batch()
    b["view_mask"][0] = False
    with pytest.raises(IFNetError, match="at least one present view"):
        model.encode(b["images"], b["view_mask"])


def test_more_views_than_configured_is_an_error(model):
    with pytest.raises(ValueError, match="max_views=2"):
        model.encode(torch.randn(1, 3, 3, 64, 64), torch.ones(1, 3, dtype=torch.bool))


def test_frozen_extractor_gets_no_gradient_but_the_rest_trains():
    m = make_model(freeze_extractor=True).train()
    b = make_batch()
    compute_losses(m(b["images"], b["view_mask"], b["tokens"], b["labels"]), b["tokens"], b["labels"])["total"].backward()
    assert all(p.grad is None for p in m.extractor.parameters())
    assert not m.extractor.training
    assert m.visual_proj.weight.grad is not None and m.memory.slots.grad is not None


def test_config_round_trips_through_json_data_and_rejects_unknown_keys():
    cfg = tiny_config(extractor="efficientnet_lite0", tie_word_embeddings=False)
    data = cfg.to_dict()
    assert data["transformer"]["d_model"] == 32
    assert IFNetConfig.from_dict(data) == cfg
    with pytest.raises(DataError, match="memory_topk"):
        IFNetConfig.from_dict({**data, "memory_topk": 3})


@pytest.mark.parametrize("change, match", [({"vocab_size": 0}, "vocab_size"),
                                           ({"memory_top_k": 17}, "memory_top_k"),
                                           ({"memory_heads": 3}, "memory_heads")])
def test_impossible_configs_are_rejected(change, match):
    with pytest.raises(IFNetError, match=match):
        IFNet(dataclasses.replace(tiny_config(), **change))


def test_greedy_generation_is_the_argmax_of_the_teacher_forcing_model(model):
    """Generated ids re-fed with teacher forcing are each the arg-max of the previous position's logits."""
    b = make_batch()
    ids = model.generate(b["images"], b["view_mask"], beam_size=1, max_len=8, block_trigrams=False)
    tokens = torch.cat([torch.full((3, 1), BOS_ID), ids], dim=1)
    with torch.no_grad():
        logits = model(b["images"], b["view_mask"], tokens).logits
    logits[..., list(NEVER_GENERATED)] = float("-inf")  # never proposed while decoding
    generated = ids != PAD_ID
    assert torch.equal(logits.argmax(-1)[generated], ids[generated])


def test_unk_is_never_generated_even_when_the_model_prefers_it(model, monkeypatch):
    b = make_batch()
    real = model.decode_step

    def prefers_unk(tokens, state):  # a model whose every step ranks <unk> far above any word
        logits, state = real(tokens, state)
        return logits.index_add(-1, torch.tensor([UNK_ID]), torch.full((*logits.shape[:-1], 1), 1e4)), state

    monkeypatch.setattr(model, "decode_step", prefers_unk)
    for beam in (1, 3):
        ids = model.generate(b["images"], b["view_mask"], beam_size=beam, max_len=8)
        assert not (ids == UNK_ID).any() and ids.numel() > 0


def test_memory_readout_of_visual_tokens_is_available_for_heatmaps(model):
    b = make_batch()
    with torch.no_grad():
        enc = model.encode(b["images"], b["view_mask"], return_readout=True)
    assert enc.readout.indices.shape == enc.readout.weights.shape == (3, 2, 8, 4)  # [B, heads, V*h*w, top_k]
    assert model.encode(b["images"], b["view_mask"]).readout is None


def test_unknown_decoding_option_is_an_error(model):
    b = make_batch()
    with pytest.raises(TypeError, match="lenght_penalty"):
        model.generate(b["images"], b["view_mask"], lenght_penalty=1.0)


def test_condition_logit_bias_is_exactly_added_and_starts_at_zero():
    m = make_model(seed=4).eval()
    assert torch.count_nonzero(m.condition_logits.weight) == 0  # no effect before training
    b = make_batch()
    cond = torch.zeros(3, 14)
    cond[0, 1] = 1.0  # study 0: Cardiomegaly
    with torch.no_grad():
        feats = m.extract_features(b["images"], b["view_mask"])
        before = m(None, b["view_mask"], b["tokens"], cond, features=feats).logits
        m.condition_logits.weight[5, 1] = 2.5  # Cardiomegaly raises word 5
        after = m(None, b["view_mask"], b["tokens"], cond, features=feats).logits
        enc = m.encode(None, b["view_mask"], cond, features=feats)
        step, _ = m.decode_step(b["tokens"][:, 0], m.start_decoding(enc))
    diff = after - before
    assert torch.allclose(diff[0, :, 5], torch.full_like(diff[0, :, 5], 2.5))
    diff[0, :, 5] = 0
    assert torch.count_nonzero(diff) == 0  # nothing else moved, other studies untouched
    assert torch.allclose(step[0], after[0, 0], atol=1e-5)  # the decode step adds the same bias
    assert make_model(condition_logit_bias=False).condition_logits is None
