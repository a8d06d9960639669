"""Crash and resume: `ifnet train` killed with SIGKILL, then `--resume`d, ends exactly where an
uninterrupted run with the same seed ends.

Each run is a separate process killed with a real ``kill -9``. To keep this affordable on two CPU
cores, the processes are forked from a *zygote*: one Python process that imports torch and ifnet
once and forks a fresh child per run (the child runs ``ifnet.cli.main``, exactly what ``python -m
ifnet train`` runs). The zygote has never run a torch kernel, so forking it is safe.

Kill points:

* deterministic, from inside the child (``os.kill(getpid(), SIGKILL)`` at a hooked point): while the
  epoch log is being replaced, while a checkpoint is half written, between the two renames that swap a
  checkpoint folder, right after a checkpoint was saved, right before one is saved;
* random, from outside: seeded random delays after training began.

After every kill: every checkpoint present verifies (sha256 of each file) and loads; after the last
resume: weights, optimiser state, RNG state and the per-epoch log equal the uninterrupted run's, and
no temporary folder is left. The run uses a tiny CNN registered only inside the children (so the
registry of this test process is untouched) and ``deterministic=true`` on one CPU thread; the PNG of
the training curves is replaced by a cheap atomic write of the same rows (matplotlib would triple the
time).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import torch
from safetensors.torch import load_file

from ifnet.demo.dataset import DemoSplit, write_demo_dataset
from ifnet.models.checkpoint import interrupted_save, load_training_state, read_meta

from test_reliability_support import cli_train_args, fast_training_logs, one_cpu_thread, snapshot, tiny_cnn

EPOCHS = 3

ZYGOTE = r'''
import json, os, signal, sys
from pathlib import Path

import torch

# Everything a run imports, imported once: each forked run then starts in a fraction of a second.
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: F401
import safetensors.torch
import torch.utils.tensorboard  # noqa: F401
import ifnet.cli
import ifnet.cli.train  # noqa: F401
import ifnet.evaluation  # noqa: F401
import ifnet.labeler  # noqa: F401
import ifnet.metrics.scoring  # noqa: F401
import ifnet.decoding.search  # noqa: F401
from ifnet.models import visual
from ifnet.train import trainer

# The first call imports torch's compiler stack (seconds); seed_everything() makes it in every run.
torch.use_deterministic_algorithms(False)

from test_reliability_support import TINY_CNN, TinyCNN, quick_curves  # tests/ is on PYTHONPATH

visual.register_extractor(TINY_CNN)(lambda pretrained, weights_path: TinyCNN())


def install_hooks(crash_at, ready_file):
    point, _, nth = (crash_at or "").partition(":")
    nth = int(nth or 1)
    seen = {}

    def reached(name):
        if name == point:
            seen[name] = seen.get(name, 0) + 1
            if seen[name] == nth:
                print(f"KILL at {name}:{nth}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    real_save_model = safetensors.torch.save_model

    def save_model(model, filename, *args, **kwargs):
        real_save_model(model, filename, *args, **kwargs)
        if Path(filename).parent.name.startswith(".last."):
            reached("ckpt_partial")  # weights in the temporary folder; config, vocab, state, meta not yet

    safetensors.torch.save_model = save_model
    real_rename = os.rename

    def rename(src, dst, *args, **kwargs):
        real_rename(src, dst, *args, **kwargs)
        if Path(src).name == "last" and str(dst).endswith(".old"):
            reached("ckpt_swap")  # the old `last` moved aside, the new one not yet in its place

    os.rename = rename
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == "metrics.csv":
            reached("log_write")  # the new epoch log written to its temporary file, not yet renamed
        real_replace(src, dst, *args, **kwargs)

    os.replace = replace
    real_save = trainer.save_checkpoint

    def save_checkpoint(path, *args, **kwargs):
        if Path(path).name == "last":
            reached("before_last")
        result = real_save(path, *args, **kwargs)
        if Path(path).name == "last":
            reached("after_last")
        return result

    trainer.save_checkpoint = save_checkpoint
    real_fit = trainer.Trainer.fit

    def fit(self):
        if ready_file:
            Path(ready_file).touch()
        return real_fit(self)

    trainer.Trainer.fit = fit
    # matplotlib takes about a second per epoch here: the curves become the same rows as JSON, written
    # atomically at the same moment (so a kill can still land inside that write).
    trainer.plot_curves = quick_curves


def child(job):
    fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    torch.set_num_threads(1)
    install_hooks(job.get("crash_at"), job.get("ready"))
    try:
        rc = ifnet.cli.main(job["argv"])
    except BaseException:
        import traceback
        traceback.print_exc()
        rc = 99
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


for line in sys.stdin:
    msg = json.loads(line)
    if msg["cmd"] == "start":
        pid = os.fork()
        if pid == 0:
            child(msg)
        print(json.dumps({"pid": pid}), flush=True)
    elif msg["cmd"] == "wait":
        _, status = os.waitpid(msg["pid"], 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
'''


class Zygote:
    """Talks to the zygote process: start a run (a forked child), wait for it, SIGKILL it."""

    def __init__(self, workdir: Path) -> None:
        script = workdir / "zygote.py"
        script.write_text(ZYGOTE)
        tests = str(Path(__file__).resolve().parent)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=workdir)
        self.workdir = workdir
        self.runs = 0

    def _ask(self, msg: dict) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"zygote died (exit {self.proc.poll()})"
        return json.loads(line)

    def start(self, argv: list[str], *, crash_at: Optional[str] = None) -> tuple[int, Path, Path]:
        self.runs += 1
        log = self.workdir / f"run{self.runs}.log"
        ready = self.workdir / f"run{self.runs}.ready"
        pid = self._ask({"cmd": "start", "argv": argv, "log": str(log), "crash_at": crash_at,
                         "ready": str(ready)})["pid"]
        return pid, log, ready

    def wait(self, pid: int) -> int:
        return self._ask({"cmd": "wait", "pid": pid})["rc"]

    def run(self, argv: list[str], *, crash_at: Optional[str] = None) -> tuple[int, str]:
        pid, log, _ = self.start(argv, crash_at=crash_at)
        rc = self.wait(pid)
        return rc, log.read_text()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.kill()  # every run was waited for; skip the interpreter's slow teardown
        self.proc.wait(timeout=30)


def train_argv(data: dict, out: Path, *flags: str) -> list[str]:
    return cli_train_args(data, out, f"optim.epochs={EPOCHS}", flags=flags)


def next_attempt(data: dict, out: Path) -> list[str]:
    """What a user runs after a crash: --resume if a checkpoint exists, else start afresh."""
    if (out / "last").exists() or interrupted_save(out / "last"):
        return train_argv(data, out, "--resume")
    return train_argv(data, out, "--overwrite") if out.exists() else train_argv(data, out)


def assert_checkpoints_sound(out: Path) -> None:
    """Every checkpoint folder present is complete and verifies; nothing half-written under a real name."""
    for name in ("last", "best"):
        ckpt = out / name
        if ckpt.exists():
            meta = read_meta(ckpt)  # format + sha256 and size of every file
            assert set(meta["files"]) >= {"model.safetensors", "config.json", "vocab.json"}
            load_file(str(ckpt / "model.safetensors"))
            if name == "last":  # the resumable one
                assert load_training_state(ckpt)["epoch"] >= 1
            else:
                assert load_training_state(ckpt) is None and meta["metadata"]["epoch"] >= 1


def metrics_rows(out: Path) -> list[dict]:
    with open(out / "metrics.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in csv.DictReader(fh)]


def assert_same_as_reference(out: Path, ref: Path) -> None:
    for name in ("last", "best"):
        state = name == "last"  # only `last` carries the training state (--resume reads it)
        assert (out / name / "training_state.json").exists() == state
        for file in ("model.safetensors", "training_state.safetensors")[: 2 if state else 1]:
            a, b = load_file(str(ref / name / file)), load_file(str(out / name / file))
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]), f"{name}/{file}: {key} differs from the uninterrupted run"
        if state:
            assert (json.loads((ref / name / "training_state.json").read_text())
                    == json.loads((out / name / "training_state.json").read_text()))
    assert metrics_rows(out) == metrics_rows(ref)  # each epoch logged once, with the same numbers
    assert json.loads((out / "result.json").read_text())["epochs_run"] == EPOCHS
    leftovers = [p.name for p in out.iterdir() if p.name.startswith((".last.", ".best."))]
    assert leftovers == [], leftovers


@pytest.fixture(scope="module")
def crash_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    data = write_demo_dataset(root / "data", DemoSplit(8, 2, 2), seed=5, size=64)
    zygote = Zygote(root)
    ref = root / "reference"
    pid, log, ready = zygote.start(train_argv(data, ref))
    rc = zygote.wait(pid)
    assert rc == 0, log.read_text()[-3000:]
    fit_seconds = time.time() - ready.stat().st_mtime
    yield {"root": root, "data": data, "zygote": zygote, "ref": ref, "fit_seconds": fit_seconds}
    zygote.close()


def test_kill_inside_checkpoint_writes_then_resume_is_exact(crash_env):
    z, data, ref = crash_env["zygote"], crash_env["data"], crash_env["ref"]
    out = crash_env["root"] / "hooked"
    # (kill point, what must hold right after the kill)
    plan = [
        ("log_write:2", "epoch 2's metrics.csv written to its temporary file, not yet renamed into place"),
        ("ckpt_partial:1", "epoch 2's `last` half written in its temporary folder: epoch 1's `last` intact"),
        ("ckpt_swap:1", "killed between the two renames: `last` missing, its previous version set aside"),
        ("after_last:1", "killed right after epoch 2's `last` was saved, before anything else"),
        ("before_last:1", "killed as epoch 3's `last` save began (after `best`, if it improved)"),
    ]
    for crash_at, _what in plan:
        argv = next_attempt(data, out)
        rc, log = z.run(argv, crash_at=crash_at)
        assert rc == -signal.SIGKILL, f"{crash_at}: run was not killed (exit {rc})\n{log[-3000:]}"
        assert f"KILL at {crash_at}" in log
        if crash_at.startswith("ckpt_partial"):
            assert any(p.name.startswith(".last.") and p.name.endswith(".tmp") for p in out.iterdir())
        if crash_at.startswith("ckpt_swap"):
            assert not (out / "last").exists() and interrupted_save(out / "last")
        assert_checkpoints_sound(out)
    rc, log = z.run(next_attempt(data, out))
    assert rc == 0, log[-3000:]
    assert_same_as_reference(out, ref)
    # What a kill inside an atomic file write leaves: the file intact, its hidden temporary beside it.
    assert [p.name.split(".")[1] for p in out.glob(".*.tmp")] == ["metrics"]


def test_kill_at_random_times_then_resume_is_exact(crash_env):
    """Three SIGKILLs at seeded random moments after training began (epochs, validation, checkpoint and
    log writes alike); each time the user's next command (--resume, or --overwrite before the first
    checkpoint) is run, until the run finishes."""
    z, data, ref = crash_env["zygote"], crash_env["data"], crash_env["ref"]
    rng = random.Random(20240611)
    epoch_seconds = crash_env["fit_seconds"] / EPOCHS
    kills, trials = 0, 0
    while kills < 3:
        trials += 1
        # A kill drawn after the run already finished is a miss, not a failure: the epoch-time estimate
        # comes from the reference run, and a later run can be faster on a machine whose load changed.
        assert trials <= 6, f"only {kills} random kills landed in {trials - 1} runs"
        out = crash_env["root"] / f"random{trials}"
        for _attempt in range(10):
            done = load_training_state(out / "last")["epoch"] if (out / "last").exists() else 0  # before the child runs
            pid, log, ready = z.start(next_attempt(data, out))
            if kills < 3:
                deadline = time.time() + 300
                while not ready.exists() and time.time() < deadline:
                    time.sleep(0.01)
                # A random moment while this attempt still has work left.
                time.sleep(rng.uniform(0.05, 0.6) * epoch_seconds * (EPOCHS - done))
                os.kill(pid, signal.SIGKILL)  # a no-op on a run that already finished (not yet reaped)
            rc = z.wait(pid)
            if rc == -signal.SIGKILL:
                kills += 1
                assert_checkpoints_sound(out)
                continue
            assert rc == 0, log.read_text()[-3000:]
            break
        assert_same_as_reference(out, ref)


def test_resume_restores_a_best_checkpoint_left_aside_by_a_kill(tmp_path):
    """The state a kill between the two renames of a `best` save leaves (and a half-written `last`
    temporary folder): `--resume` puts `best` back and removes the temporary folder."""
    from ifnet.cli import main as cli_main

    data = write_demo_dataset(tmp_path / "data", DemoSplit(8, 2, 2), seed=5, size=64)
    out = tmp_path / "run"
    with contextlib.contextmanager(one_cpu_thread)(), tiny_cnn(), fast_training_logs():
        assert cli_main(cli_train_args(data, out, "optim.epochs=1")) == 0
        best = snapshot(out / "best")
        os.rename(out / "best", out / ".best.abcd1234.old")
        (out / ".last.wxyz9876.tmp").mkdir()
        (out / ".last.wxyz9876.tmp" / "model.safetensors").write_bytes(b"half")
        assert cli_main(cli_train_args(data, out, "optim.epochs=1", flags=("--resume",))) == 0
    assert snapshot(out / "best") == best
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
