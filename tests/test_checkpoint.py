"""Checkpoints: safetensors + JSON, no pickle, checksums, atomic replacement, resumable training state."""

from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from ifnet.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from ifnet.layers.saformer import SAFormerConfig
from ifnet.models import checkpoint as ckpt
from ifnet.models.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_training_state,
    read_meta,
    save_checkpoint,
)
from ifnet.models.ifnet import IFNet, IFNetConfig

torch.set_num_threads(min(2, torch.get_num_threads()))

REPORTS = ["The heart is normal in size. No pleural effusion.", "Lungs are clear. The heart is normal."] * 3


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.build(REPORTS, threshold=1)


def tiny(tokenizer: Tokenizer, **kw) -> IFNet:
    args = dict(vocab_size=len(tokenizer), extractor="resnet18", num_memory_slots=16, memory_top_k=4, memory_heads=2,
                max_positions=24, transformer=SAFormerConfig(d_model=32, num_heads=2, num_encoder_layers=1,
                                                             num_decoder_layers=1, d_ff=32))
    args.update(kw)
    torch.manual_seed(0)
    return IFNet(IFNetConfig(**args))


def inputs(tokenizer: Tokenizer):
    torch.manual_seed(1)
    images = torch.randn(2, 2, 3, 64, 64)
    view_mask = torch.tensor([[True, True], [True, False]])
    tokens = torch.tensor([tokenizer.encode(REPORTS[0])[:8], tokenizer.encode(REPORTS[1])[:8]])
    return images, view_mask, tokens


def train_a_little(model: IFNet, tokenizer: Tokenizer) -> torch.optim.Optimizer:
    """One Adam step so weights, BatchNorm statistics and optimizer state are not at their init values."""
    images, view_mask, tokens = inputs(tokenizer)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    out = model(images, view_mask, tokens, torch.ones(2, 14))
    (out.logits.square().mean() + out.label_logits.square().mean()).backward()
    opt.step()
    return opt


@pytest.mark.parametrize("tie", [True, False])
def test_save_then_load_gives_identical_logits(tmp_path, tokenizer, tie):
    model = tiny(tokenizer, tie_word_embeddings=tie)
    train_a_little(model, tokenizer)
    model.eval()
    images, view_mask, tokens = inputs(tokenizer)
    with torch.no_grad():
        before = model(images, view_mask, tokens)
    path = save_checkpoint(tmp_path / "ckpt", model, model.config, tokenizer, metadata={"epoch": 3})
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "meta.json", "model.safetensors", "vocab.json"]
    loaded, tok, config, meta = load_checkpoint(path)
    assert not loaded.training
    assert config == model.config and tok.tokens == tokenizer.tokens
    assert meta["format"] == "ifnet-checkpoint" and meta["version"] == 1 and meta["metadata"] == {"epoch": 3}
    assert {"torch", "safetensors", "ifnet"} <= set(meta["libraries"])
    with torch.no_grad():
        after = loaded(images, view_mask, tokens)
    assert torch.equal(before.logits, after.logits) and torch.equal(before.label_logits, after.label_logits)
    if tie:
        assert loaded.lm_head.weight.data_ptr() == loaded.word_embedding.weight.data_ptr()


def test_loading_needs_no_imagenet_weights_file(tmp_path, tokenizer):
    """A model trained from a local pretrained file reloads after that file is gone."""
    import torchvision

    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    model = tiny(tokenizer, pretrained=True, weights_path=str(weights)).eval()
    path = save_checkpoint(tmp_path / "ckpt", model, model.config, tokenizer)
    weights.unlink()
    loaded, _, config, _ = load_checkpoint(path)
    assert config.pretrained and config.weights_path == str(weights)
    images, view_mask, tokens = inputs(tokenizer)
    with torch.no_grad():
        assert torch.equal(model(images, view_mask, tokens).logits, loaded(images, view_mask, tokens).logits)


def test_a_tampered_weights_file_fails_the_checksum(tmp_path, tokenizer):
    model = tiny(tokenizer)
    path = save_checkpoint(tmp_path / "ckpt", model, model.config, tokenizer)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the last tensor's data: still a valid safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 checksum mismatch"):
        load_checkpoint(path)


@pytest.mark.parametrize("name", ["model.safetensors", "vocab.json", "meta.json"])
def test_a_missing_file_is_a_one_line_error(tmp_path, tokenizer, name):
    model = tiny(tokenizer)
    path = save_checkpoint(tmp_path / "ckpt", model, model.config, tokenizer)
    (path / name).unlink()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)
    assert (name in str(info.value)) or "not a complete ifnet checkpoint" in str(info.value)


def test_a_newer_format_version_is_refused(tmp_path, tokenizer):
    model = tiny(tokenizer)
    path = save_checkpoint(tmp_path / "ckpt", model, model.config, tokenizer)
    meta = json.loads((path / "meta.json").read_text())
    meta["version"] = 99
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="version 99 is not supported"):
        read_meta(path)


def test_missing_checkpoint_is_a_clear_error(tmp_path, tokenizer):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope")
    # a training run's folder given where its checkpoint is meant: the error names the checkpoints in it
    model = tiny(tokenizer)
    save_checkpoint(tmp_path / "run" / "best", model, model.config, tokenizer)
    with pytest.raises(CheckpointError, match="is a training run folder: its checkpoints are .*best and .*last"):
        load_checkpoint(tmp_path / "run")


class _Payload:
    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_foreign_or_malicious_pth_is_refused_without_unpickling(tmp_path, tokenizer):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pth"
    with open(evil, "wb") as fh:
        pickle.dump({"state_dict": _Payload(marker)}, fh, protocol=2)
    with pytest.raises(CheckpointError, match="never loaded"):
        load_checkpoint(evil)
    # The same payload dropped into a checkpoint folder in place of the weights fails the checksum first.
    model = tiny(tokenizer)
    path = save_checkpoint(tmp_path / "ckpt", model, model.config, tokenizer)
    (path / "model.safetensors").write_bytes(evil.read_bytes())
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path)
    assert not marker.exists()


def test_no_pickle_based_loading_anywhere_in_the_model_package():
    import re
    from pathlib import Path

    for path in Path(ckpt.__file__).parent.glob("*.py"):
        source = path.read_text(encoding="utf-8")
        assert "import pickle" not in source, path
        for call in re.findall(r"torch\.load\([^)]*\)", source):
            assert "weights_only=True" in call, (path, call)
    assert "torch.load" not in Path(ckpt.__file__).read_text(encoding="utf-8")


# -- training state for --resume -------------------------------------------------------------------

def test_training_state_round_trips_without_pickle(tmp_path, tokenizer):
    model = tiny(tokenizer)
    opt = train_a_little(model, tokenizer)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    opt.step()
    sched.step()
    random.seed(7)
    np.random.seed(7)
    state = {
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "epoch": 4, "best_val": float("-inf"), "history": [0.5, 0.25], "note": None,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
    }
    path = save_checkpoint(tmp_path / "ckpt", model, model.config, tokenizer, training_state=state)
    assert {"training_state.safetensors", "training_state.json"} <= {p.name for p in path.iterdir()}
    back = load_training_state(path)
    assert back["epoch"] == 4 and back["best_val"] == float("-inf") and back["note"] is None
    assert back["scheduler"] == sched.state_dict()
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    random.setstate(back["rng"]["python"])
    assert random.random() == (random.seed(7), random.random())[1]
    np.random.set_state(back["rng"]["numpy"])
    a = np.random.rand()
    np.random.seed(7)
    assert a == np.random.rand()
    # The optimizer resumes exactly: one more step from the restored state equals one from the original.
    fresh = torch.optim.Adam(model.parameters(), lr=1e-3)
    fresh.load_state_dict(back["optimizer"])
    orig_sd, new_sd = opt.state_dict(), fresh.state_dict()
    assert orig_sd["param_groups"] == new_sd["param_groups"]
    for key, value in orig_sd["state"].items():
        for name, tensor in value.items():
            assert torch.equal(tensor, new_sd["state"][key][name])


def test_no_training_state_reads_as_none(tmp_path, tokenizer):
    model = tiny(tokenizer)
    assert load_training_state(save_checkpoint(tmp_path / "c", model, model.config, tokenizer)) is None


def test_unstorable_training_state_fails_before_anything_is_written(tmp_path, tokenizer):
    model = tiny(tokenizer)
    with pytest.raises(TypeError, match="not storable without pickle"):
        save_checkpoint(tmp_path / "ckpt", model, model.config, tokenizer, training_state={"fn": print})
    assert not (tmp_path / "ckpt").exists()
    assert list(tmp_path.iterdir()) == []


# -- atomic replacement ----------------------------------------------------------------------------

def test_a_failed_save_keeps_the_old_checkpoint_intact(tmp_path, tokenizer, monkeypatch):
    model = tiny(tokenizer)
    path = save_checkpoint(tmp_path / "ckpt", model, model.config, tokenizer, metadata={"epoch": 1})
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    import safetensors.torch

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, model.config, tokenizer, training_state={"step": torch.zeros(1)},
                        metadata={"epoch": 2})
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left behind
    assert read_meta(path)["metadata"] == {"epoch": 1}


def test_saving_again_replaces_the_checkpoint(tmp_path, tokenizer):
    model = tiny(tokenizer)
    path = save_checkpoint(tmp_path / "ckpt", model, model.config, tokenizer, metadata={"epoch": 1},
                           training_state={"step": 1})
    save_checkpoint(path, model, model.config, tokenizer, metadata={"epoch": 2})
    assert read_meta(path)["metadata"] == {"epoch": 2}
    assert not (path / "training_state.json").exists()  # nothing stale from the old checkpoint
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_refuses_to_replace_a_folder_that_is_not_a_checkpoint(tmp_path, tokenizer):
    model = tiny(tokenizer)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "precious.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not an ifnet checkpoint; refusing"):
        save_checkpoint(tmp_path / "results", model, model.config, tokenizer)
    assert (tmp_path / "results" / "precious.txt").read_text() == "keep me"


def test_config_must_describe_the_model(tokenizer, tmp_path):
    model = tiny(tokenizer)
    other = IFNetConfig(**{**model.config.__dict__, "memory_top_k": 2})
    with pytest.raises(ValueError, match="config differs"):
        save_checkpoint(tmp_path / "c", model, other, tokenizer)


def test_generated_reports_survive_the_round_trip(tmp_path, tokenizer):
    model = tiny(tokenizer).eval()
    images, view_mask, _ = inputs(tokenizer)
    loaded = load_checkpoint(save_checkpoint(tmp_path / "c", model, model.config, tokenizer))[0]
    a = model.generate(images, view_mask, beam_size=2, max_len=6)
    assert torch.equal(a, loaded.generate(images, view_mask, beam_size=2, max_len=6))
    assert not (a == BOS_ID).any()
    assert not (a == PAD_ID)[(a == EOS_ID).cumsum(1) == 0].any()  # pad only after eos


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoints_and_results_get_the_users_umask_modes_not_private_ones(tmp_path, tokenizer, umask):
    """mkstemp/mkdtemp temporaries are 0600/0700; what is moved into place from them must not stay private."""
    from ifnet.io_utils import atomic_write_json, current_umask

    old = os.umask(umask)
    try:
        assert current_umask() == umask
        model = tiny(tokenizer)
        path = save_checkpoint(tmp_path / "ckpt", model, model.config, tokenizer)
        atomic_write_json(tmp_path / "metrics.json", {"BLEU_4": 0.1})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o777 & ~umask
    for p in path.iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p.name
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o666 & ~umask
