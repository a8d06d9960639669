"""Faults while writing: disk full and permission denied while saving a checkpoint, enhanced images,
predictions or labels -> one clear line naming the file, the previous files byte-for-byte intact, and
no temporary file left behind.

Two kinds of fault:

* injected in this process at the system call the writer makes: ``os.fsync`` fails with ENOSPC (a full
  disk often shows up only when the data are flushed), creating the temporary file fails with EACCES
  (a read-only folder; chmod cannot simulate it, these tests run as root), and the final rename fails
  with EACCES;
* real, from the kernel: the command runs in a child process whose file-size limit (RLIMIT_FSIZE) is
  below the output's size, so the write() system call itself fails (EFBIG), whichever library writes
  (Python, OpenCV, the Rust safetensors writer).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import pytest

from ifnet.cli import main as cli_main
from ifnet.config import resolve
from ifnet.demo.dataset import DemoSplit, write_demo_dataset
from ifnet.io_utils import WriteError, atomic_write_text
from ifnet.models.checkpoint import (CheckpointError, interrupted_save, load_checkpoint, load_training_state,
                                     recover_checkpoint, save_checkpoint)
from ifnet.train.config import TrainConfig
from ifnet.train.trainer import Trainer

from test_reliability_support import (cli_train_args, fast_training_logs, one_cpu_thread, snapshot, temp_leftovers,
                                      tiny_cnn, train_args)

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="fault injection reads /proc/self/fd")

Match = Callable[[str], bool]


# -- fault injectors ------------------------------------------------------------------------------

def disk_full_at_flush(m: pytest.MonkeyPatch, match: Match) -> None:
    real = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode) and match(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    m.setattr(os, "fsync", fsync)


def permission_denied_at_create(m: pytest.MonkeyPatch, match: Match) -> None:
    for name in ("mkstemp", "mkdtemp"):
        real = getattr(tempfile, name)

        def create(*args, _real=real, **kwargs):
            folder = str(kwargs.get("dir") or "")
            if match(os.path.join(folder, kwargs.get("prefix") or "")):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), folder)
            return _real(*args, **kwargs)

        m.setattr(tempfile, name, create)


def permission_denied_at_rename(m: pytest.MonkeyPatch, match: Match) -> None:
    for name in ("replace", "rename"):
        real = getattr(os, name)

        def move(src, dst, *args, _real=real, **kwargs):
            if match(str(dst)):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(src), None, str(dst))
            return _real(src, dst, *args, **kwargs)

        m.setattr(os, name, move)


FAULTS = {"disk full at flush": (disk_full_at_flush, "No space left on device"),
          "permission denied creating the file": (permission_denied_at_create, "Permission denied"),
          "permission denied at the final rename": (permission_denied_at_rename, "Permission denied")}


def under(folder: Path) -> Match:
    prefix = str(folder.resolve())
    return lambda path: os.path.realpath(path).startswith(prefix)


def one_error_line(stderr: str, command: str) -> str:
    """The CLI's single error line (progress bars may precede it on stderr); no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("decoding")]
    assert len(lines) == 1 and lines[0].startswith(f"ifnet {command}: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_quick_curves():
    with fast_training_logs():
        yield from one_cpu_thread()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Phantom data, a 1-epoch tiny run (its `last` checkpoint), evaluate outputs and a labels file."""
    root = tmp_path_factory.mktemp("faults")
    data = write_demo_dataset(root / "data", DemoSplit(8, 2, 2), seed=7, size=64)
    with tiny_cnn():
        run = root / "run"
        Trainer(resolve(TrainConfig, None, train_args(data, "optim.epochs=1")), run).fit()
        evaluated = root / "evaluated"
        assert cli_main(["evaluate", "--checkpoint", str(run / "last"), "--split", "test", "--out", str(evaluated),
                         "--no-meteor", "--device", "cpu", "--examples", "1"]) == 0
        labels = root / "labels" / "labels.json"
        assert cli_main(["label", "--annotation", data["annotation"], "--out", str(labels)]) == 0
        enhanced = root / "enhanced"
        # Made with another clip limit, so a default run finds every output stale and rewrites it.
        assert cli_main(["enhance", data["image_root"], str(enhanced), "--clip-limit", "3", "-q"]) == 0
        yield {"root": root, "data": data, "run": run, "evaluated": evaluated, "labels": labels,
               "enhanced": enhanced}


# -- injected faults ------------------------------------------------------------------------------

@pytest.mark.parametrize("fault", FAULTS)
def test_checkpoint_save_fault_keeps_previous_checkpoint(world, tmp_path, fault):
    inject, reason = FAULTS[fault]
    ckpt = tmp_path / "last"
    shutil.copytree(world["run"] / "last", ckpt)
    before = snapshot(tmp_path)
    with tiny_cnn():
        model, tokenizer, config, _ = load_checkpoint(ckpt)
        with pytest.MonkeyPatch.context() as m:
            inject(m, under(tmp_path))
            with pytest.raises(CheckpointError) as err:
                save_checkpoint(ckpt, model, config, tokenizer, training_state={"epoch": 99})
        load_checkpoint(ckpt)  # still loads, every sha256 verified
    message = str(err.value)
    assert "\n" not in message and str(ckpt) in message and reason in message and "unchanged" in message
    assert snapshot(tmp_path) == before
    assert temp_leftovers(tmp_path) == []
    assert load_training_state(ckpt)["epoch"] == 1


def test_checkpoint_swap_fault_moves_the_previous_checkpoint_back(world, tmp_path):
    """The new folder cannot take the old one's place after the old one was moved aside."""
    ckpt = tmp_path / "last"
    shutil.copytree(world["run"] / "last", ckpt)
    before = snapshot(tmp_path)
    failures = []

    def new_into_place(dst: str) -> bool:  # fails once: the move of the new folder, not the move back
        failures.append(dst)
        return Path(dst) == ckpt and len(failures) == 2

    with tiny_cnn():
        model, tokenizer, config, _ = load_checkpoint(ckpt)
        with pytest.MonkeyPatch.context() as m:
            permission_denied_at_rename(m, new_into_place)
            with pytest.raises(CheckpointError, match="Permission denied"):
                save_checkpoint(ckpt, model, config, tokenizer)
    assert snapshot(tmp_path) == before and temp_leftovers(tmp_path) == []


def test_checkpoint_left_aside_by_a_persistent_swap_fault_is_recovered(world, tmp_path):
    """If even the move back fails, the previous checkpoint waits in `.last.*.old`; the next save or
    `--resume` puts it back, and loaders say where it is."""
    ckpt = tmp_path / "last"
    shutil.copytree(world["run"] / "last", ckpt)
    before = snapshot(ckpt)
    with tiny_cnn():
        model, tokenizer, config, _ = load_checkpoint(ckpt)
        with pytest.MonkeyPatch.context() as m:
            permission_denied_at_rename(m, lambda dst: Path(dst) == ckpt)
            with pytest.raises(CheckpointError, match="Permission denied"):
                save_checkpoint(ckpt, model, config, tokenizer)
        assert not ckpt.exists() and interrupted_save(ckpt)
        with pytest.raises(CheckpointError, match="a save was interrupted"):
            load_checkpoint(ckpt)
        assert recover_checkpoint(ckpt)
    assert snapshot(ckpt) == before and temp_leftovers(tmp_path) == []


def test_training_stops_cleanly_when_a_checkpoint_cannot_be_written(world, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(world["run"], out)
    last_before = snapshot(out / "last")
    argv = cli_train_args(world["data"], out, "optim.epochs=2", flags=("--resume",))
    with tiny_cnn(), pytest.MonkeyPatch.context() as m:
        disk_full_at_flush(m, lambda path: "/.best." in path or "/.last." in path)  # the checkpoint folders only
        capsys.readouterr()
        assert cli_main(argv) == 1
    line = one_error_line(capsys.readouterr().err, "train")
    assert "cannot write checkpoint (No space left on device)" in line
    assert snapshot(out / "last") == last_before and temp_leftovers(out) == []
    # Space again: the same command resumes from the intact checkpoint and finishes.
    with tiny_cnn():
        assert cli_main(argv) == 0
    assert load_training_state(out / "last")["epoch"] == 2


@pytest.mark.parametrize("fault", FAULTS)
def test_enhance_fault_keeps_previous_images(world, tmp_path, capsys, fault):
    inject, reason = FAULTS[fault]
    out = tmp_path / "enhanced"
    shutil.copytree(world["enhanced"], out)
    before = snapshot(out)
    with pytest.MonkeyPatch.context() as m:
        inject(m, under(out))
        capsys.readouterr()
        assert cli_main(["enhance", world["data"]["image_root"], str(out), "--workers", "1", "-q"]) == 1
    captured = capsys.readouterr()
    failures = [line for line in captured.err.splitlines() if "cannot write" in line]
    assert len(failures) == len(before), captured.err  # one line per image, each naming its output file
    for line in failures:
        assert str(out) in line and reason in line
    assert "Traceback" not in captured.err
    assert snapshot(out) == before and temp_leftovers(out) == []


def _evaluate_case(world: dict, tmp_path: Path) -> tuple[list[str], Path, Path]:
    out = tmp_path / "evaluated"
    shutil.copytree(world["evaluated"], out)
    argv = ["evaluate", "--checkpoint", str(world["run"] / "last"), "--split", "test", "--out", str(out),
            "--no-meteor", "--device", "cpu", "--examples", "1", "--overwrite"]
    return argv, out, out / "predictions.json"


def _label_case(world: dict, tmp_path: Path) -> tuple[list[str], Path, Path]:
    labels = tmp_path / "labels.json"
    shutil.copy(world["labels"], labels)
    return ["label", "--annotation", world["data"]["annotation"], "--out", str(labels), "--overwrite"], tmp_path, labels


@pytest.mark.parametrize("case", [_evaluate_case, _label_case], ids=["evaluate", "label"])
@pytest.mark.parametrize("fault", FAULTS)
def test_command_fault_keeps_previous_outputs(world, tmp_path, capsys, fault, case):
    """`evaluate` and `label` asked to overwrite their outputs: one error line naming the file, nothing changed."""
    inject, reason = FAULTS[fault]
    argv, folder, named = case(world, tmp_path)
    before = snapshot(folder)
    with tiny_cnn(), pytest.MonkeyPatch.context() as m:
        inject(m, under(folder))
        capsys.readouterr()
        assert cli_main(argv) == 1
    line = one_error_line(capsys.readouterr().err, argv[0])
    assert str(named) in line and reason in line
    assert snapshot(folder) == before and temp_leftovers(folder) == []


def test_write_error_is_one_line_and_still_an_oserror(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("old")
    with pytest.MonkeyPatch.context() as m:
        disk_full_at_flush(m, under(tmp_path))
        with pytest.raises(WriteError) as err:
            atomic_write_text(target, "new")
    assert isinstance(err.value, OSError) and err.value.errno == errno.ENOSPC
    assert str(err.value) == f"{target}: cannot write: No space left on device; the previous file, if any, is unchanged"
    assert target.read_text() == "old" and temp_leftovers(tmp_path) == []


# -- real faults from the kernel: a file-size limit below the output's size ------------------------

LIMITED = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
sys.argv = {argv!r}
{body}
"""
RUN_CLI = "runpy.run_module('ifnet', run_name='__main__')"
SAVE_CHECKPOINT = f"""
sys.path.insert(0, {str(REPO / 'tests')!r})
from test_reliability_support import one_cpu_thread, tiny_cnn
from ifnet.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
with tiny_cnn():
    model, tokenizer, config, _ = load_checkpoint(sys.argv[1])
    try:
        save_checkpoint(sys.argv[1], model, config, tokenizer, training_state={{"epoch": 99}})
    except CheckpointError as e:  # what the trainer's CLI prints
        sys.exit(f"ifnet train: error: {{e}}")
"""


def run_limited(argv: list[str], body: str, limit: int, cwd: Path) -> subprocess.CompletedProcess:
    code = LIMITED.format(limit=limit, argv=argv, body=body)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=cwd)


@pytest.mark.parametrize("target", ["labels", "enhanced images", "checkpoint"])
def test_real_write_failure_from_the_kernel(world, tmp_path, target):
    if target == "labels":
        folder = tmp_path
        shutil.copy(world["labels"], folder / "labels.json")
        argv = ["ifnet", "label", "--annotation", world["data"]["annotation"], "--out",
                str(folder / "labels.json"), "--overwrite"]
        body, limit = RUN_CLI, 64
    elif target == "enhanced images":
        folder = tmp_path / "enhanced"
        shutil.copytree(world["enhanced"], folder)
        argv = ["ifnet", "enhance", world["data"]["image_root"], str(folder), "--workers", "1", "-q"]
        body, limit = RUN_CLI, 64
    else:
        folder = tmp_path / "last"
        shutil.copytree(world["run"] / "last", folder)
        argv = ["save", str(folder)]
        body, limit = SAVE_CHECKPOINT, 1024
    before = snapshot(tmp_path)
    proc = run_limited(argv, body, limit, tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "File too large" in proc.stderr and f"{folder}" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert snapshot(tmp_path) == before and temp_leftovers(tmp_path) == []
    if target == "labels":
        json.loads((folder / "labels.json").read_text())
