"""Training end to end on a tiny phantom dataset: outputs, exact resume, no test-split access, DDP."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ifnet.cli import main as cli_main
from ifnet.config import resolve
from ifnet.demo.dataset import DemoSplit, write_demo_dataset
from ifnet.evaluation import label_probabilities
from ifnet.train.config import TrainConfig
from ifnet.train.data import RepeatFactorSampler, make_dataset, repeat_factors
from ifnet.train.trainer import Trainer

TINY = [
    "model.extractor=resnet18", "model.num_memory_slots=16", "model.memory_top_k=4", "model.memory_heads=2",
    "model.transformer={d_model: 32, num_heads: 2, num_encoder_layers: 1, num_decoder_layers: 1, d_ff: 64}",
    "data.image_size=64", "data.num_workers=0", "data.batch_size=8", "data.iec=clahe",
    "optim.epochs=2", "eval.beam_size=1", "eval.max_len=20", "eval.meteor=false", "deterministic=true",
]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> dict:
    return write_demo_dataset(tmp_path_factory.mktemp("phantoms"), DemoSplit(16, 4, 4), seed=3)


def tiny_sets(data: dict, *extra: str) -> list[str]:
    """Overrides of the tiny config on the phantom data ``data``."""
    return TINY + [f"data.annotation={data['annotation']}", f"data.image_root={data['image_root']}", *extra]


def tiny_config(data: dict, *extra: str) -> TrainConfig:
    return resolve(TrainConfig, None, tiny_sets(data, *extra))


def tiny_argv(data: dict, out: Path, *extra: str) -> list[str]:
    """``ifnet train`` argv for the tiny config."""
    return ["train", "--out", str(out)] + [a for s in tiny_sets(data, *extra) for a in ("--set", s)]


def test_training_writes_checkpoints_logs_and_provenance(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = Trainer(tiny_config(tiny_data), out).fit()
    assert result.epochs_run == 2 and result.best_epoch in (1, 2)
    for name in ("best", "last"):
        assert (out / name / "model.safetensors").is_file() and (out / name / "meta.json").is_file()
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and "val_BLEU_4" in rows[0] and "val_CE_F1_macro" in rows[0]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((out / "tensorboard").iterdir())
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["model"]["vocab_size"] > 4 and resolved["optim"]["epochs"] == 2
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["seed"] == 9223 and prov["versions"]["torch"] == torch.__version__.split("+")[0] or \
        prov["versions"]["torch"].startswith(torch.__version__.split("+")[0])
    first_loss = float(rows[1].split(",")[1])
    assert first_loss > 0
    # The thresholded condition: thresholds chosen on validation, stored with the weights and in the metadata.
    meta = json.loads((out / "last" / "meta.json").read_text())
    chosen = meta["metadata"]["val_metrics"]["label_thresholds"]
    stored = load_file(out / "last" / "model.safetensors")["label_thresholds"]
    # the weights hold them as float32: equal to the JSON float64 values to float32 precision
    np.testing.assert_allclose([chosen[name]["threshold"] for name in chosen], stored.double().numpy(),
                               rtol=1e-6, atol=1e-7)
    assert {row["method"] for row in chosen.values()} <= {"f1", "prevalence"}


def test_monitor_sums_metrics_and_names_unknown_ones():
    from ifnet.errors import IFNetError
    from ifnet.train.trainer import monitor_score

    assert monitor_score({"BLEU_4": 0.25, "CE_F1_macro": 0.5}, "BLEU_4+CE_F1_macro") == 0.75
    assert monitor_score({}, "BLEU_4") == float("-inf")  # non-main DDP ranks
    with pytest.raises(IFNetError, match="CE_F1_macr'.*available: BLEU_4"):
        monitor_score({"BLEU_4": 0.25}, "BLEU_4+CE_F1_macr")


@pytest.mark.parametrize("extra", [(), ("data.repeat_threshold=0.5", "data.repeat_reweight_labels=true"),
                                   ("optim.ema_decay=0.9",)],
                         ids=["shuffle", "repeat-factor", "weight-average"])
def test_resume_continues_exactly(tiny_data, tmp_path, extra):
    straight = tmp_path / "straight"
    Trainer(tiny_config(tiny_data, *extra), straight).fit()
    split = tmp_path / "split"
    Trainer(tiny_config(tiny_data, "optim.epochs=1", *extra), split).fit()
    Trainer(tiny_config(tiny_data, *extra), split, resume=True).fit()
    a = load_file(str(straight / "last" / "model.safetensors"))
    b = load_file(str(split / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the epoch log holds each epoch once, as in the uninterrupted run
    assert (split / "metrics.csv").read_text().count("\n") == 3


def _write_labels(path: Path, labels: dict) -> str:
    path.write_text(json.dumps({"labels": {k: [int(v) for v in row] for k, row in labels.items()}}))
    return str(path)


def test_head_labels_train_the_label_head_alone(tiny_data, tmp_path):
    base = Trainer(tiny_config(tiny_data, "optim.epochs=1"), tmp_path / "base")
    # The same labels given as head_labels: the run is unchanged, bit for bit.
    same = _write_labels(tmp_path / "same.json", base.labels)
    base.fit()
    again = Trainer(tiny_config(tiny_data, "optim.epochs=1", f"data.head_labels={same}"), tmp_path / "again")
    again.fit()
    a, b = (load_file(str(tmp_path / r / "last" / "model.safetensors")) for r in ("base", "again"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Every finding positive for the head only: the head learns it, the condition labels stay the labeler's.
    ones = _write_labels(tmp_path / "ones.json", {k: np.ones(14) for k in base.labels})
    run = Trainer(tiny_config(tiny_data, "optim.epochs=2", "optim.label_loss_weight=20", f"data.head_labels={ones}"),
                  tmp_path / "ones")
    assert run.labels.keys() == base.labels.keys()
    assert all(np.array_equal(run.labels[k], base.labels[k]) for k in base.labels)
    run.fit()
    # Validation AUC against the head's own targets is logged beside the one against the condition labels;
    # with identical labels they agree, and an all-positive target (no AUC defined) is left out, not NaN.
    logged = {r: list(csv.DictReader((tmp_path / r / "metrics.csv").open())) for r in ("base", "again", "ones")}
    assert "val_head_label_auc" not in logged["base"][0] and "val_head_label_auc" not in logged["ones"][0]
    assert logged["again"][0]["val_head_label_auc"] == logged["again"][0]["val_label_auc"] != ""

    def val_probs(trainer: Trainer) -> np.ndarray:
        ds = make_dataset(trainer.val_studies, trainer.cfg.data, trainer.tokenizer, trainer.labels, train=False)
        return label_probabilities(trainer.model, ds, trainer.cfg.data, device=trainer.device)[1]

    assert val_probs(run).min() > 0.5 > val_probs(base).min()


@pytest.mark.parametrize("content, message", [
    ({"labels": {"s1": [1] * 13}}, "expected a list of 14 labels"),
    ({"labels": {"not-a-study": [1] * 14}}, "holds labels for none of the 16 training studies"),
], ids=["malformed", "no-training-study"])
def test_bad_head_labels_file_is_a_one_line_error(tiny_data, tmp_path, capsys, content, message):
    bad = tmp_path / "head.json"
    bad.write_text(json.dumps(content))
    args = tiny_argv(tiny_data, tmp_path / "r", f"data.head_labels={bad}")
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert "head.json" in err and message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_test_split_is_never_read_during_training(tiny_data, tmp_path):
    # Corrupt every test image: training must not notice, because it never opens the test split.
    data = tmp_path / "data"
    shutil.copytree(Path(tiny_data["root"]), data)
    ann = json.loads((data / "annotation.json").read_text())
    for entry in ann["test"]:
        for rel in entry["image_path"]:
            (data / "images" / rel).write_bytes(b"not an image")
    cfg = tiny_config({"annotation": data / "annotation.json", "image_root": data / "images"}, "optim.epochs=1")
    assert Trainer(cfg, tmp_path / "run").fit().epochs_run == 1


def test_cli_refuses_to_clobber_a_run(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_argv(tiny_data, out, "optim.epochs=1")
    assert cli_main(args) == 0
    assert cli_main(args) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert cli_main(["train", "--out", str(tmp_path / "none"), "--resume"]) == 2
    # --overwrite starts afresh: the old run's files go (no TensorBoard events of the old epochs left to mix in),
    # the user's own files in the folder stay
    (out / "notes.txt").write_text("mine")
    old_events = sorted((out / "tensorboard").iterdir())
    assert cli_main(args + ["--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert not set(old_events) & set((out / "tensorboard").iterdir())
    # --overwrite with a config that cannot start (a typo in the data path): the old run is still there
    kept = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert cli_main(args + ["--overwrite", "--set", f"data.annotation={tmp_path / 'typo.json'}"]) == 1
    assert "typo.json" in capsys.readouterr().err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == kept
    # a folder of the user's that holds files a run writes (but no run) is refused too
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "metrics.csv").write_text("my own metrics")
    assert cli_main(tiny_argv(tiny_data, theirs, "optim.epochs=1")) == 1
    assert "holds metrics.csv, which a run would overwrite" in capsys.readouterr().err
    assert (theirs / "metrics.csv").read_text() == "my own metrics"


def test_cli_resume_takes_the_runs_config_and_refuses_another_model(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(tiny_argv(tiny_data, out, "optim.epochs=1")) == 0
    config_before = (out / "config.json").read_bytes()
    files_before = sorted(p.relative_to(out) for p in out.rglob("*"))
    # Another model size: refused in one line before anything in the run is touched.
    code = cli_main(["train", "--out", str(out), "--resume", "--set", "model.transformer.d_model=64"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "model.transformer.d_model is 32 in the run, 64 here" in err[0] and "config.json" in err[0]
    assert (out / "config.json").read_bytes() == config_before
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == files_before
    assert cli_main(["train", "--out", str(out), "--resume", "--set", "eval.monitor=CIDEr"]) == 2
    assert "eval.monitor is 'BLEU_4' in the run, 'CIDEr' here" in capsys.readouterr().err
    # A finished run: said at once, nothing written
    assert cli_main(["train", "--out", str(out), "--resume"]) == 0
    assert "the run is complete (1/1 epochs); nothing to resume" in capsys.readouterr().out
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == files_before
    # No --config, no other --set: the run's own config.json, with more epochs.
    assert cli_main(["train", "--out", str(out), "--resume", "--set", "optim.epochs=2"]) == 0
    assert (out / "metrics.csv").read_text().count("\n") == 3
    assert json.loads((out / "config.json").read_text())["optim"]["epochs"] == 2
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["seed"] == 9223 and len(prov["resumed"]) == 1 and prov["resumed"][0]["seed"] == 9223


def test_cli_failed_fresh_run_leaves_nothing_behind(tiny_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(Path(tiny_data["root"]), data)
    ann = json.loads((data / "annotation.json").read_text())
    image = data / "images" / ann["train"][0]["image_path"][0]
    good = image.read_bytes()
    image.write_bytes(good[:120])  # a PNG header, then truncated: found only when the first epoch reads it
    sets = {"annotation": data / "annotation.json", "image_root": data / "images"}
    for out, existed in ((tmp_path / "new", False), (tmp_path / "empty", True)):
        if existed:
            out.mkdir()
        assert cli_main(tiny_argv(sets, out, "optim.epochs=1")) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and image.name in err[0] and "Traceback" not in err[0], err
        assert out.exists() == existed and (not existed or not any(out.iterdir()))
    image.write_bytes(good)  # fixed: the same command now simply runs
    assert cli_main(tiny_argv(sets, tmp_path / "new", "optim.epochs=1")) == 0
    assert (tmp_path / "new" / "last" / "model.safetensors").is_file()
    # --out naming a file is a usage error, and the file is left alone
    assert cli_main(tiny_argv(sets, data / "annotation.json", "optim.epochs=1")) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert json.loads((data / "annotation.json").read_text()) == ann


def test_train_limit_trains_on_the_first_studies_only(tiny_data, tmp_path):
    full = Trainer(tiny_config(tiny_data, "optim.epochs=1"), tmp_path / "full")
    five = Trainer(tiny_config(tiny_data, "optim.epochs=1", "data.train_limit=5"), tmp_path / "five")
    assert [s.id for s in five.train_studies] == [s.id for s in full.train_studies[:5]]
    assert five.val_studies == full.val_studies and five.fit().epochs_run == 1
    with pytest.raises(Exception, match="field 'data.train_limit': must be >= 1 or null"):
        tiny_config(tiny_data, "data.train_limit=0")


def test_relative_data_paths_are_stored_absolute_and_evaluate_works_from_elsewhere(tiny_data, tmp_path, monkeypatch,
                                                                                    capsys):
    data = tmp_path / "work" / "data"
    shutil.copytree(Path(tiny_data["root"]), data)
    monkeypatch.chdir(tmp_path / "work")
    rel = {"annotation": Path("data/annotation.json"), "image_root": Path("data/images")}
    assert cli_main(tiny_argv(rel, Path("run"), "optim.epochs=1", "data.val_limit=2", "data.iec=none")) == 0
    saved = json.loads((tmp_path / "work" / "run" / "config.json").read_text())["data"]
    assert saved["annotation"] == str(data / "annotation.json") and saved["image_root"] == str(data / "images")
    # resuming with the same relative --set paths is the same config, not a conflict
    assert cli_main(["train", "--out", "run", "--resume", "--set", "optim.epochs=1",
                     "--set", "data.annotation=data/annotation.json"]) == 0
    # a run saved before paths were stored absolute (a relative data.labels, which may not change on resume)
    # resumes from the directory it was started in
    labels = json.loads((data / "labels.json").read_text())
    assert cli_main(tiny_argv(rel, Path("old"), "optim.epochs=1", "data.val_limit=2", "data.iec=none",
                              "data.labels=data/labels.json")) == 0
    config = json.loads((tmp_path / "work" / "old" / "config.json").read_text())
    assert config["data"]["labels"] == str(data / "labels.json") and labels
    config["data"]["labels"] = "data/labels.json"
    (tmp_path / "work" / "old" / "config.json").write_text(json.dumps(config))
    assert cli_main(["train", "--out", "old", "--resume", "--set", "optim.epochs=2"]) == 0
    monkeypatch.chdir(tmp_path)
    assert cli_main(["evaluate", "--checkpoint", "work/run/best", "--out", "ev", "--limit", "2", "--no-meteor",
                     "--split", "val"]) == 0
    page = (tmp_path / "ev" / "index.html").read_text()  # trained without IEC: no enhanced panels it never saw
    assert "enhanced (IEC)" not in page and "data.iec none" in page
    # a moved dataset: the error names the config field and the flag that overrides it
    shutil.move(str(data), str(tmp_path / "moved"))
    assert cli_main(["evaluate", "--checkpoint", "work/run/best", "--out", "ev2", "--limit", "2"]) == 1
    err = capsys.readouterr().err
    assert "(data.annotation of the checkpoint's training config); pass --annotation" in err


def test_a_slice_run_needs_only_the_images_of_its_slice(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(Path(tiny_data["root"]), data)
    ann = json.loads((data / "annotation.json").read_text())
    for split, keep in (("train", 5), ("val", 2)):
        for entry in ann[split][keep:]:
            for rel in entry["image_path"]:
                (data / "images" / rel).unlink()
    sets = {"annotation": data / "annotation.json", "image_root": data / "images"}
    trainer = Trainer(tiny_config(sets, "optim.epochs=1", "data.train_limit=5", "data.val_limit=2"), tmp_path / "run")
    assert [s.id for s in trainer.val_studies] == [e["id"] for e in ann["val"][:2]]
    assert trainer.fit().epochs_run == 1
    with pytest.raises(Exception, match="image not found"):  # without the limits the missing images are errors
        Trainer(tiny_config(sets, "optim.epochs=1"), tmp_path / "all")


def test_misspelled_config_key_is_an_error(tiny_data, tmp_path, capsys):
    assert cli_main(["train", "--out", str(tmp_path / "r"), "--set", "optim.epoch=3"]) == 1
    assert "unknown key(s) optim.epoch" in capsys.readouterr().err


@pytest.mark.parametrize("setting, message", [
    (("data.repeat_threshold=0",), "field 'data.repeat_threshold': must be > 0 or null (plain shuffle), got 0.0"),
    (("data.repeat_reweight_labels=true",), "field 'data.repeat_reweight_labels': needs data.repeat_threshold"),
])
def test_bad_repeat_factor_settings_are_one_line_errors_before_anything_is_written(tiny_data, tmp_path, capsys,
                                                                                    setting, message):
    out = tmp_path / "r"
    args = tiny_argv(tiny_data, out, *setting)
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_ddp_two_cpu_processes_hold_identical_weights(tiny_data, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "IFNET_DDP_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ifnet", *tiny_argv(tiny_data, out, "optim.epochs=1", "data.batch_size=4")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2
    sums = result["weights_checksum_per_rank"]
    assert len(sums) == 2 and sums[0] == sums[1]
    # the weights actually moved away from initialisation (several optimiser steps ran on each rank)
    assert (out / "last" / "model.safetensors").is_file()


# -- repeat-factor sampling ---------------------------------------------------------------------------

def test_repeat_factors_hand_computed():
    # finding 0 in 1 of 8 studies (f = 0.125), finding 1 in 4 of 8 (f = 0.5), finding 2 never
    labels = np.zeros((8, 3))
    labels[0, 0] = 1
    labels[[0, 1, 2, 3], 1] = 1
    r = repeat_factors(labels, threshold=0.5)
    assert r[0] == pytest.approx(2.0)  # sqrt(0.5 / 0.125), the larger of its two findings' factors
    assert r[1:].tolist() == [1.0] * 7  # f = threshold -> 1; no findings -> 1
    with pytest.raises(ValueError, match="threshold"):
        repeat_factors(labels, threshold=0.0)


def test_repeat_factor_sampler_draws_each_study_factor_times_on_average():
    factors = np.array([1.0, 1.0, 2.5, 4.0, 1.3])
    sampler = RepeatFactorSampler(factors, seed=7)
    counts = np.zeros(len(factors))
    epochs = 2000
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert len(order) == len(sampler)
        counts += np.bincount(order, minlength=len(factors))
        whole = np.bincount(order, minlength=len(factors))
        assert (whole >= np.floor(factors)).all() and (whole <= np.ceil(factors)).all()
    np.testing.assert_allclose(counts / epochs, factors, atol=0.05)


def test_repeat_factor_sampler_is_a_function_of_seed_and_epoch_and_splits_across_ranks():
    factors = np.array([1.0, 3.2, 1.0, 1.7, 2.0, 1.0, 1.0])
    a, b = RepeatFactorSampler(factors, seed=1), RepeatFactorSampler(factors, seed=1)
    a.set_epoch(3)
    b.set_epoch(5)
    b.set_epoch(3)
    assert list(a) == list(b)
    a.set_epoch(4)
    assert list(a) != list(b)
    ranks = [RepeatFactorSampler(factors, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(3)
    assert len(ranks[0]) == len(ranks[1])
    whole = list(b)
    merged = [i for pair in zip(list(ranks[0]), list(ranks[1])) for i in pair]
    assert merged[: len(whole)] == whole  # the ranks split one shuffled list, padded by wrapping around


def test_weight_average_is_the_bias_corrected_exponential_mean_of_the_steps():
    from ifnet.train.ema import WeightEMA

    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)  # frozen: copied, not averaged
    ema = WeightEMA(model, 0.8)
    steps = []
    for k in range(6):
        with torch.no_grad():
            model.weight.copy_(torch.full((2, 3), float(k * k)))
            model.bias.copy_(torch.full((2,), float(k)))
        ema.update(model)
        steps.append(float(k * k))
    weights = 0.8 ** np.arange(5, -1, -1)  # d^(n-k) for the steps k = 1..6
    expected = float((weights * np.array(steps)).sum() / weights.sum())
    np.testing.assert_allclose(ema.module.weight.detach().numpy(), expected, rtol=1e-6)
    assert torch.equal(ema.module.bias, model.bias) and not ema.module.weight.requires_grad
    # the first update is the weights themselves (nothing of the initialisation is kept)
    first = WeightEMA(model, 0.999)
    first.update(model)
    assert torch.equal(first.module.weight, model.weight)


def test_weight_average_is_what_is_validated_and_saved(tiny_data, tmp_path):
    from ifnet.models.checkpoint import load_training_state

    out = tmp_path / "run"
    trainer = Trainer(tiny_config(tiny_data, "optim.ema_decay=0.9"), out)
    trainer.fit()
    saved = load_file(str(out / "last" / "model.safetensors"))
    averaged, trained = trainer.ema.module.state_dict(), trainer.model.state_dict()
    assert all(torch.equal(saved[k], averaged[k]) for k in saved)
    differ = [k for k in saved if not torch.equal(saved[k], trained[k])]
    assert differ and all(trained[k].dtype.is_floating_point for k in differ)
    state = load_training_state(out / "last")
    assert state["ema"]["updates"] == 4  # 16 studies / batch 8, 2 epochs
    assert all(torch.equal(state["ema"]["trained_weights"][k], trained[k]) for k in trained)
    # the thresholds the validation decode used are the saved model's
    assert torch.equal(saved["label_thresholds"], trained["label_thresholds"])


def test_weight_average_and_smoothing_settings_are_checked(tiny_data, tmp_path, capsys):
    from ifnet.errors import IFNetError

    for setting, message in (("optim.ema_decay=1.0", "field 'optim.ema_decay': must be in (0, 1)"),
                             ("optim.report_label_smoothing=-0.1",
                              "field 'optim.report_label_smoothing': must be in [0, 1)")):
        code = cli_main(tiny_argv(tiny_data, tmp_path / "bad", setting))
        err = capsys.readouterr().err.strip().splitlines()
        assert code != 0 and len(err) == 1 and message in err[0], err
        assert not (tmp_path / "bad").exists()
    plain = tmp_path / "plain"
    Trainer(tiny_config(tiny_data, "optim.epochs=1"), plain).fit()
    with pytest.raises(IFNetError, match="without a weight average; resume it with the same optim.ema_decay"):
        Trainer(tiny_config(tiny_data, "optim.ema_decay=0.9"), plain, resume=True).fit()


def test_cross_fitted_validation_decodes_each_half_with_the_other_halfs_thresholds(tiny_data, tmp_path):
    from ifnet.baselines import cross_fitted_thresholds

    out = tmp_path / "run"
    trainer = Trainer(tiny_config(tiny_data, "optim.epochs=1", "eval.crossfit_thresholds=true"), out)
    trainer.fit()
    whole = load_file(str(out / "last" / "model.safetensors"))["label_thresholds"]
    assert torch.equal(trainer.model.label_thresholds, whole)  # the whole split's choice is what is kept
    ds = make_dataset(trainer.val_studies, trainer.cfg.data, trainer.tokenizer, trainer.labels, train=False,
                      feature_cache=trainer.feature_cache)
    calibration = trainer.calibrate_thresholds(ds)  # the final model's choice again: the same thresholds
    assert torch.equal(trainer.model.label_thresholds, whole)
    ids, truth, probs = calibration.ids, calibration.truth, calibration.probs
    half, chosen = cross_fitted_thresholds(truth, probs, calibration.prevalence, seed=0)
    decode = dict(device=trainer.device, beam_size=1, max_len=5, guidance=0.0, with_loss=False)
    preds = trainer._decode_cross_fitted(trainer.val_studies, decode, calibration)
    assert [p["id"] for p in preds] == [s.id for s in trainer.val_studies]
    by_id = dict(zip(ids, range(len(ids))))
    for p in preds:
        i = by_id[p["id"]]
        expected = (probs[i] >= np.float32(chosen[half[i]])).astype(np.float32)
        np.testing.assert_array_equal(p["condition"], expected)
    assert torch.equal(trainer.model.label_thresholds, whole)
