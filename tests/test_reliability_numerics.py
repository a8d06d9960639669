"""Numerical faults: a NaN/inf loss or gradient skips the step with a warning; repeated faults stop
training with a clear message, and the last good checkpoint is kept.

Faults are injected by wrapping the trainer's ``compute_losses``: chosen training steps get a NaN loss,
an infinite loss, or a finite loss whose backward pass yields infinite gradients.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch
from safetensors.torch import load_file

from ifnet.cli import main as cli_main
from ifnet.config import resolve
from ifnet.demo.dataset import DemoSplit, write_demo_dataset
from ifnet.models.checkpoint import load_checkpoint, load_training_state
from ifnet.models.ifnet import compute_losses
from ifnet.train import trainer as trainer_module
from ifnet.train.config import TrainConfig
from ifnet.train.trainer import Trainer, TrainingDiverged

from test_reliability_support import (cli_train_args, fast_training_logs, one_cpu_thread, snapshot, tiny_cnn,
                                      train_args)

STEPS_PER_EPOCH = 2  # 8 training studies, batch 4


class _InfiniteGradient(torch.autograd.Function):
    """Adds 0 to the loss; sends an infinite gradient back through it."""

    @staticmethod
    def forward(ctx, x):
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return torch.full((), math.inf)


class FaultyLosses:
    """``compute_losses`` whose result is spoiled on the chosen (1-based) training steps."""

    def __init__(self, kind: str, bad_steps) -> None:
        self.kind, self.bad_steps, self.calls = kind, bad_steps, 0

    def __call__(self, output, tokens, labels=None, **kwargs):
        self.calls += 1
        losses = compute_losses(output, tokens, labels, **kwargs)
        if self.calls in self.bad_steps:
            total = losses["total"]
            if self.kind == "nan loss":
                losses["total"] = total * math.nan
            elif self.kind == "inf loss":
                losses["total"] = total + math.inf
            else:  # "inf gradient": the loss stays finite
                losses["total"] = total + _InfiniteGradient.apply(total)
                assert torch.isfinite(losses["total"])
        return losses


class Every:
    def __init__(self, start: int = 1, step: int = 1) -> None:
        self.start, self.step = start, step

    def __contains__(self, n: int) -> bool:
        return n >= self.start and (n - self.start) % self.step == 0


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_quick_curves():
    with fast_training_logs():
        yield from one_cpu_thread()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    with tiny_cnn():
        yield write_demo_dataset(tmp_path_factory.mktemp("numerics") / "data", DemoSplit(8, 2, 2), seed=11, size=64)


def metrics(out) -> list[dict]:
    with open(out / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # no step ran
@pytest.mark.parametrize("kind", ["nan loss", "inf loss", "inf gradient"])
def test_non_finite_steps_are_skipped_logged_and_change_nothing(data, tmp_path, capsys, monkeypatch, kind):
    trainer = Trainer(resolve(TrainConfig, None, train_args(data, "optim.epochs=1", "optim.max_bad_steps=5")),
                      tmp_path / "run")
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    monkeypatch.setattr(trainer_module, "compute_losses", FaultyLosses(kind, Every()))
    result = trainer.fit()
    assert result.epochs_run == 1
    out = capsys.readouterr().out
    assert out.count("non-finite loss or gradient; step skipped") == STEPS_PER_EPOCH
    assert "warning: epoch 1 step 0: non-finite loss or gradient; step skipped" in out
    row = metrics(tmp_path / "run")[0]
    assert float(row["train_skipped_steps"]) == STEPS_PER_EPOCH
    assert math.isnan(float(row["train_loss"]))  # not 0.0: no step was trained on
    saved = load_file(str(tmp_path / "run" / "last" / "model.safetensors"))
    # every step skipped: not one trained weight moved. label_thresholds is no weight: the trainer
    # chooses it on validation after each epoch, whatever the steps did, and stores it with the model.
    for key, value in initial.items():
        if key in saved and key != "label_thresholds":
            assert torch.equal(saved[key], value), key
    assert torch.equal(saved["label_thresholds"], trainer.model.label_thresholds.cpu())


def test_an_isolated_fault_skips_one_step_and_training_goes_on(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(trainer_module, "compute_losses", FaultyLosses("nan loss", {2}))
    trainer = Trainer(resolve(TrainConfig, None, train_args(data, "optim.epochs=2", "optim.max_bad_steps=2")),
                      tmp_path / "run")
    assert trainer.fit().epochs_run == 2
    rows = metrics(tmp_path / "run")
    assert [float(r["train_skipped_steps"]) for r in rows] == [1.0, 0.0]
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)
    assert "warning: epoch 1 step 1: non-finite loss or gradient; step skipped" in capsys.readouterr().out
    assert all(torch.isfinite(v).all() for v in load_file(str(tmp_path / "run" / "last" / "model.safetensors")).values())


def test_faults_that_are_not_consecutive_never_stop_training(data, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "compute_losses", FaultyLosses("nan loss", Every(1, 2)))
    cfg = resolve(TrainConfig, None, train_args(data, "optim.epochs=2", "optim.max_bad_steps=2"))
    assert Trainer(cfg, tmp_path / "run").fit().epochs_run == 2
    assert [float(r["train_skipped_steps"]) for r in metrics(tmp_path / "run")] == [1.0, 1.0]


@pytest.mark.parametrize("max_bad_steps", [2, 3])
def test_repeated_faults_stop_training_with_a_clear_message_and_the_last_good_checkpoint(
        data, tmp_path, capsys, monkeypatch, max_bad_steps):
    """One good epoch, then every step fails. With 3 allowed faults and 2 steps per epoch the streak
    crosses an epoch boundary: it must still stop (and not run on forever, training nothing)."""
    out = tmp_path / "run"
    with tiny_cnn():
        assert cli_main(cli_train_args(data, out, "optim.epochs=1")) == 0
        good = load_file(str(out / "last" / "model.safetensors"))
        before = snapshot(out / "last")
        monkeypatch.setattr(trainer_module, "compute_losses", FaultyLosses("nan loss", Every()))
        capsys.readouterr()
        rc = cli_main(cli_train_args(data, out, "optim.epochs=4", f"optim.max_bad_steps={max_bad_steps}",
                                     flags=("--resume",)))
        captured = capsys.readouterr()
        assert rc == 1
        errors = [line for line in captured.err.splitlines() if line.strip()]
        assert errors == [f"ifnet train: error: {max_bad_steps} consecutive non-finite steps; stopped. "
                          f"The last good checkpoint is kept in {out / 'last'}"]
        assert captured.out.count("step skipped") == max_bad_steps
        model, _, _, _ = load_checkpoint(out / "last")  # loads, every sha256 verified
    if max_bad_steps == 2:  # stopped inside epoch 2: `last` is byte-for-byte epoch 1's
        assert snapshot(out / "last") == before
    else:  # epoch 2 (every step skipped) was saved: the same good weights, nothing learned from NaN
        assert load_training_state(out / "last")["epoch"] == 2
    saved = load_file(str(out / "last" / "model.safetensors"))
    assert saved.keys() == good.keys() and all(torch.equal(saved[k], good[k]) for k in good)
    assert all(torch.isfinite(p).all() for p in model.state_dict().values())


def test_training_diverged_is_a_user_facing_error():
    from ifnet.errors import IFNetError

    assert issubclass(TrainingDiverged, IFNetError)
