"""Top tuning (ifnet.models.tuning) and the extractor split / trunk saving it relies on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ifnet.baselines import roc_auc
from ifnet.models.tuning import TopTuningConfig, apply_per_study, pool_views, tune_top
from ifnet.models.visual import create_extractor


def _perturbed(name: str, seed: int = 0):
    """An extractor whose weights and BatchNorm statistics differ from any default initialisation."""
    torch.manual_seed(seed)
    net = create_extractor(name, pretrained=False).eval()
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.mul_(1 + 0.1 * torch.rand_like(t))
    return net


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_stages_and_split_compose_to_forward_features(name):
    net = _perturbed(name)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        want = net.forward_features(x)
        staged = x
        for stage in net.stages():
            staged = stage(staged)
        bottom, top = net.split()
        mid = bottom(x)
        split = top(mid)
    torch.testing.assert_close(staged, want)
    torch.testing.assert_close(split, want)
    assert mid.shape[-1] == 2 * want.shape[-1]  # the default split is the last stride-16 -> 32 step
    with pytest.raises(ValueError, match="split point"):
        net.split(0)
    with pytest.raises(ValueError, match="split point"):
        net.split(len(net.stages()))


@pytest.mark.parametrize("name,suffix", [("efficientnet_lite0", ".safetensors"), ("resnet18", ".pth")])
def test_trunk_state_dict_reloads_through_weights_path(tmp_path, name, suffix):
    net = _perturbed(name, seed=3)
    path = tmp_path / f"trunk{suffix}"
    state = net.trunk_state_dict()
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    again = create_extractor(name, pretrained=True, weights_path=str(path)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again.forward_features(x), net.forward_features(x))


def test_pool_views_zeroes_absent_views():
    f = torch.arange(2 * 2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 2, 3, 2, 2)
    mask = torch.tensor([[True, True], [True, False]])
    out = pool_views(f, mask)
    assert out.shape == (2, 6)
    torch.testing.assert_close(out[0, :3], f[0, 0].mean(dim=(1, 2)))
    assert torch.all(out[1, 3:] == 0)


def test_apply_per_study_batches_views_and_splits_them_back():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, stride=2).eval()
    studies = [(f"s{i}", torch.randn(1 + i % 2, 3, 8, 8)) for i in range(5)]  # 1 or 2 views each
    for batch_size, channels_last in ((2, False), (16, True)):
        out = apply_per_study(conv, iter(studies), batch_size=batch_size, channels_last=channels_last)
        assert list(out) == [sid for sid, _ in studies]
        for sid, views in studies:
            with torch.no_grad():
                want = conv(views).to(torch.float16)
            assert out[sid].dtype == torch.float16 and out[sid].shape == want.shape
            torch.testing.assert_close(out[sid], want)


def _toy_problem(n: int, seed: int):
    """Bottom activations of random images; label 0 = a bright blob in the top-left quadrant of view 0,
    label 1 = noise. Only a tuned top can read the blob well from a randomly initialised trunk."""
    torch.manual_seed(seed)
    net = create_extractor("efficientnet_lite0", pretrained=False, freeze=True)
    bottom, _ = net.split()
    y = np.zeros((n, 2), dtype=np.int64)
    rng = np.random.default_rng(seed)
    y[:, 0] = rng.random(n) < 0.5
    y[:, 1] = rng.random(n) < 0.5
    images = torch.randn(n, 2, 3, 64, 64) * 0.1
    images[torch.from_numpy(y[:, 0].astype(bool)), 0, :, :24, :24] += 2.0
    with torch.no_grad():
        mids = [bottom(images[i]) for i in range(n)]
    return mids, y


def test_tune_top_learns_a_label_and_keeps_the_best_validation_epoch():
    mids, y = _toy_problem(96, seed=0)
    torch.manual_seed(1)
    net = create_extractor("efficientnet_lite0", pretrained=False, freeze=True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = TopTuningConfig(epochs=4, lr=1e-3, head_lr=1e-2, batch_size=16, seed=5)
    res = tune_top(net, mids[:64], y[:64], mids[64:], y[64:, :1], select=[0], config=cfg)
    assert [h["epoch"] for h in res.history] == [1, 2, 3, 4]
    assert res.best_val_mean_auc == max(h["val_mean_auc"] for h in res.history)
    assert res.history[res.best_epoch - 1]["val_mean_auc"] == res.best_val_mean_auc
    # The kept top reads the blob: a fresh linear read-out of its pooled features separates the label.
    _, top = net.split()
    with torch.no_grad():
        feats = torch.stack([top(m).mean(dim=(2, 3))[0] for m in mids])
    w = feats[:64][y[:64, 0] == 1].mean(0) - feats[:64][y[:64, 0] == 0].mean(0)
    assert roc_auc(y[64:, 0], (feats[64:] @ w).numpy()) > 0.9
    assert res.best_val_mean_auc > 0.8
    # Only the top changed; the extractor is frozen again.
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("net.blocks.5", "net.blocks.6", "net.conv_head", "net.bn2")) for k in changed)
    assert not any(k.endswith(("running_mean", "running_var")) for k in changed)  # BatchNorm statistics kept
    assert net.frozen and not any(p.requires_grad for p in net.parameters())


def test_tune_top_is_deterministic_for_a_seed():
    mids, y = _toy_problem(32, seed=2)
    states = []
    for _ in range(2):
        torch.manual_seed(7)
        net = create_extractor("efficientnet_lite0", pretrained=False, freeze=True)
        tune_top(net, mids[:24], y[:24], mids[24:], y[24:], select=[0, 1],
                 config=TopTuningConfig(epochs=1, batch_size=8, seed=11))
        states.append(net.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_tune_top_refuses_mismatched_inputs():
    mids, y = _toy_problem(8, seed=4)
    net = create_extractor("efficientnet_lite0", pretrained=False, freeze=True)
    with pytest.raises(ValueError, match="one target row per study"):
        tune_top(net, mids[:4], y[:3], mids[4:], y[4:], select=[0, 1])
    with pytest.raises(ValueError, match="select names"):
        tune_top(net, mids[:4], y[:4], mids[4:], y[4:], select=[0])
    with pytest.raises(ValueError, match="epochs must be >= 1, got 0"):
        tune_top(net, mids[:4], y[:4], mids[4:], y[4:], select=[0, 1], config=TopTuningConfig(epochs=0))
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got -1"):
        TopTuningConfig(lr=-1.0)


# -- `ifnet tune-top` on the demo phantoms -------------------------------------------------------------

@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> dict:
    from ifnet.demo.dataset import DemoSplit, write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("phantoms"), DemoSplit(16, 6, 2), seed=5)


def _sets(data: dict) -> list[str]:
    sets = ["model.extractor=efficientnet_lite0", "model.pretrained=true", "model.freeze_extractor=true",
            "data.image_size=64", f"data.annotation={data['annotation']}", f"data.image_root={data['image_root']}"]
    return [a for s in sets for a in ("--set", s)]


def test_tune_top_cli_writes_a_trunk_that_training_loads(phantoms, tmp_path, capsys):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    from ifnet.cli import main

    out = tmp_path / "trunk.safetensors"
    assert main(["tune-top", *_sets(phantoms), "--epochs", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"--set model.weights_path={out}" in printed
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "ifnet-tuned-trunk-1" and meta["extractor"] == "efficientnet_lite0"
    assert meta["labels"] == "labeler" and int(meta["best_epoch"]) in (1, 2)
    assert len(json.loads(meta["history"])) == 2
    trunk = load_file(str(out))
    pretrained = create_extractor("efficientnet_lite0", pretrained=True).trunk_state_dict()
    changed = {k for k in trunk if not torch.equal(trunk[k], pretrained[k])}
    assert changed and all(k.startswith(("blocks.5", "blocks.6", "conv_head", "bn2")) for k in changed)

    # A run given the trunk trains on its features: its checkpoint carries the tuned weights.
    run = tmp_path / "run"
    argv = ["train", "--out", str(run), *_sets(phantoms), "--set", f"model.weights_path={out}",
            "--set", "optim.epochs=1", "--set", "eval.beam_size=1", "--set", "eval.max_len=10",
            "--set", "eval.meteor=false", "--set", "model.num_memory_slots=8", "--set", "model.memory_top_k=2",
            "--set", "model.memory_heads=2", "--set", "data.num_workers=0",
            "--set", "model.transformer={d_model: 32, num_heads: 2, num_encoder_layers: 1, num_decoder_layers: 1, "
                     "d_ff: 64}"]
    assert main(argv) == 0
    saved = load_file(str(run / "best" / "model.safetensors"))
    for k in changed:
        assert torch.equal(saved[f"extractor.net.{k}"], trunk[k]), k

    # Never overwrites without asking; a wrong suffix or a label file missing training studies is one line.
    capsys.readouterr()
    before = out.read_bytes()
    assert main(["tune-top", *_sets(phantoms), "--epochs", "1", "--out", str(out)]) != 0
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(["tune-top", *_sets(phantoms), "--out", str(tmp_path / "trunk.pth")]) != 0
    assert "must be a .safetensors file" in capsys.readouterr().err
    partial = tmp_path / "extra.json"
    partial.write_text(json.dumps({"nobody": [0] * 14}))
    assert main(["tune-top", *_sets(phantoms), "--extra-labels", str(partial),
                 "--out", str(tmp_path / "t2.safetensors")]) != 0
    err = capsys.readouterr().err
    assert "no labels for 16 of 16 training studies" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "t2.safetensors").exists()


def test_tune_top_refuses_a_weights_path_it_would_ignore(phantoms, tmp_path, capsys):
    from ifnet.cli import main

    out = tmp_path / "trunk.safetensors"
    argv = ["tune-top", *_sets(phantoms), "--set", "model.pretrained=false",
            "--set", f"model.weights_path={tmp_path / 'w.pth'}", "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "given but pretrained is False, so it would be ignored" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("option, value, message", [
    ("--epochs", "0", "--epochs must be >= 1, got 0"),
    ("--lr", "-1", "--lr must be a finite number > 0, got -1.0"),
    ("--lr", "0", "--lr must be a finite number > 0, got 0.0"),
])
def test_tune_top_refuses_bad_options_before_any_work(phantoms, tmp_path, capsys, option, value, message):
    from ifnet.cli import main

    out = tmp_path / "trunk.safetensors"
    assert main(["tune-top", *_sets(phantoms), "--out", str(out), option, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not out.exists(), err
