"""Full-size run (issue #5, item 8): the paper's IU-Xray config on the synthetic-image IU set, on one GPU.

**These are synthetic-image results, not IU-Xray results** (images rendered from labels by
``shared/tools/synth_cxr.py``; real IU-Xray reports, split and train/val labels).

The GPU machine is lent through the workplace's ``device`` tool: a bare machine with its own Python and
PyTorch, no network, no ``../shared``, at most 64 MiB carried and about 10 minutes a command. So the run
is split in two:

    # here (any machine with ../shared): copy what the run needs into the git-ignored device-carry/ (~40 MB)
    .venv/bin/python benchmarks/bench_full_size.py prepare
    # there, in one command (carry: ["device-carry"]); writes $OUT/full_size.json and the run's logs/plots
    python3 benchmarks/bench_full_size.py run --out "$OUT" --budget-min 8

``prepare`` copies the annotation, the train/val CheXbert labels the renderer conditions on, the renderer and
its CT, the pre-rendered test images, and the pure-Python scorers of pycocoevalcap (BLEU, ROUGE-L, CIDEr;
the 100 MB package does not fit the carry limit, and its METEOR needs Java, which that machine lacks, so
METEOR is off there). ``run`` renders train and val with every core, trains ``configs/iu_xray.yaml``
(ResNet-101, 30 epochs, the paper's learning rates and schedule; random init unless the carry holds
``resnet101.pth`` to point ``model.weights_path`` at: nothing can be downloaded there) under a wall-clock
budget, then decodes the test split once with the ``best`` checkpoint (kept on validation BLEU-4, the
config's monitor). If the budget ends the training, the epochs done count: checkpoints are atomic, and
``best`` is still the validation choice among them. GPU memory and utilisation are sampled with
``nvidia-smi`` every second.

``run --smoke`` is the CPU check of the same path on a tiny subset (tests/test_bench_full_size.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = Path(os.environ.get("IFNET_SHARED", REPO.parent / "shared"))
DEFAULT_CARRY = REPO / "device-carry"
CONFIG = REPO / "configs" / "iu_xray.yaml"
#: what the run needs from pycocoevalcap: the pure-Python scorers (the jars and data stay behind)
#: (namespace packages: no __init__.py)
COCO_FILES = ("bleu/bleu.py", "bleu/bleu_scorer.py", "rouge/rouge.py", "cider/cider.py", "cider/cider_scorer.py",
              "meteor/meteor.py")
SMOKE_SIZES = {"train": 6, "val": 3, "test": 3}
SMOKE_OVERRIDES = ["optim.epochs=2", "model.extractor=resnet18", "data.image_size=64", "data.batch_size=3", "data.num_workers=0",
                   "model.num_memory_slots=16", "model.memory_top_k=4", "model.memory_heads=2",
                   "model.transformer={d_model: 32, num_heads: 2, num_encoder_layers: 1, num_decoder_layers: 1, "
                   "d_ff: 64}", "eval.max_len=12", "device=cpu"]


# -- prepare (here) -------------------------------------------------------------------------------------

def prepare(shared: Path, dest: Path, smoke: bool = False) -> dict:
    """Copy the run's inputs into ``dest`` (a git-ignored folder named in the device call's ``carry``)."""
    import pycocoevalcap

    need = {"annotation": shared / "data" / "iu_xray" / "annotation.json",
            "labels": shared / "data" / "iu_xray" / "labels_14.json",
            "renderer": shared / "tools" / "synth_cxr.py",
            "ct": shared / "data" / "chest_ct" / "ct_small.npz",
            "test_images": shared / "data" / "iu_xray_synth" / "images"}
    for name, path in need.items():
        if not path.exists():
            raise SystemExit(f"bench_full_size prepare: {path} ({name}) not found; set --shared")
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "tools").mkdir(parents=True)
    ann = json.loads(need["annotation"].read_text())
    if smoke:
        ann = {k: v[: SMOKE_SIZES[k]] for k, v in ann.items() if k in SMOKE_SIZES}
    (dest / "annotation.json").write_text(json.dumps(ann))
    shutil.copy2(need["labels"], dest / "labels_14.json")
    shutil.copy2(need["renderer"], dest / "tools" / "synth_cxr.py")
    shutil.copy2(need["ct"], dest / "ct_small.npz")
    for study in ann["test"]:
        shutil.copytree(need["test_images"] / study["id"], dest / "test_images" / study["id"])
    coco = Path(list(pycocoevalcap.__path__)[0])
    for rel in COCO_FILES:
        (dest / "site" / "pycocoevalcap" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(coco / rel, dest / "site" / "pycocoevalcap" / rel)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    info = {"dest": str(dest), "megabytes": round(size / 2**20, 1), "studies": {k: len(v) for k, v in ann.items()}}
    (dest / "prepared.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


# -- run (there) ----------------------------------------------------------------------------------------

class GpuSampler:
    """``nvidia-smi`` once a second in a thread: peak memory and mean utilisation (absent without a GPU)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []  # (memory MiB, utilisation %)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "GpuSampler":
        if shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,utilization.gpu",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
                mem, util = out.stdout.splitlines()[0].split(",")
                self.samples.append((float(mem), float(util)))
            except (subprocess.SubprocessError, ValueError, IndexError, OSError):
                pass

    def stop(self) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self.samples:
            return {}
        mems, utils = zip(*self.samples)
        return {"peak_memory_mib": max(mems), "mean_utilization_pct": round(sum(utils) / len(utils), 1),
                "samples": len(self.samples)}


def _run(cmd: Sequence[str], env: dict, log: Path, timeout: Optional[float] = None) -> tuple[int, float]:
    """Run ``cmd`` with its output in ``log``; returns (exit status, seconds). A timeout ends it (status -9)."""
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen(list(cmd), stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = -9
    return rc, round(time.time() - t0, 1)


def run(carry: Path, out: Path, work: Path, budget_min: float, smoke: bool, extra: Sequence[str]) -> dict:
    import torch

    t_start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    cuda = torch.cuda.is_available()
    if not cuda and not smoke:
        raise SystemExit("bench_full_size run: no CUDA device (use --smoke for the CPU check)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(carry / "site"),
                                                       os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1")
    cores = os.cpu_count() or 1
    result: dict[str, Any] = {
        "note": "Synthetic-image results, not IU-Xray results: real IU-Xray reports and split, images rendered "
                "from labels by shared/tools/synth_cxr.py.",
        "smoke": smoke, "config": str(CONFIG.relative_to(REPO)), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": cores,
                    "gpu": torch.cuda.get_device_name(0) if cuda else None},
        "seconds": {}}

    # 1. images: train and val rendered here, test carried (its labels are withheld)
    images = work / "images"
    ann = carry / "annotation.json"
    render = [sys.executable, str(carry / "tools" / "synth_cxr.py"), "--ann", str(ann), "--labels",
              str(carry / "labels_14.json"), "--ct", str(carry / "ct_small.npz"), "--out", str(images),
              "--workers", str(cores)]
    t0 = time.time()
    for split in ("train", "val"):
        rc, _ = _run(render + ["--split", split, "--meta", f"synth_meta_{split}.jsonl"], env, work / f"render_{split}.log")
        if rc != 0:
            raise SystemExit(f"bench_full_size run: rendering {split} failed (exit {rc}); see {work}/render_{split}.log")
    for study in (carry / "test_images").iterdir():
        (images / study.name).symlink_to(study.resolve(), target_is_directory=True)
    result["seconds"]["render"] = round(time.time() - t0, 1)

    # 2. train under the wall-clock budget
    weights = carry / "resnet101.pth"
    overrides = [f"data.annotation={ann}", f"data.image_root={images}", "eval.meteor=false",
                 f"data.num_workers={min(12, max(cores - 2, 0))}"]
    if weights.exists():
        overrides += ["model.pretrained=true", f"model.weights_path={weights}"]
    overrides += (SMOKE_OVERRIDES if smoke else []) + list(extra)
    result["overrides"] = overrides
    run_dir = work / "run"
    train = [sys.executable, "-m", "ifnet", "train", "--config", str(CONFIG), "--out", str(run_dir)]
    for o in overrides:
        train += ["--set", o]
    sampler = GpuSampler().start()
    budget = max(budget_min * 60 - (time.time() - t_start), 30)
    rc, secs = _run(train, env, out / "train.log", timeout=budget)
    result["gpu"] = sampler.stop()
    result["seconds"]["train"] = secs
    result["train_exit"] = rc
    result["budget_ended_training"] = rc == -9
    if not (run_dir / "best").exists():
        raise SystemExit(f"bench_full_size run: training left no best checkpoint (exit {rc}); see {out}/train.log")
    rows = _metrics_rows(run_dir / "metrics.csv")
    result["epochs_done"] = len(rows)
    result["epoch_seconds"] = [r["epoch_seconds"] for r in rows if "epoch_seconds" in r]
    result["validation"] = rows
    best = json.loads((run_dir / "best" / "meta.json").read_text())["metadata"]
    result["best"] = {"epoch": best["epoch"], "val_metrics": best["val_metrics"]}

    # 3. test, decoded once with the validation-chosen checkpoint
    eval_dir = work / "eval"
    rc, secs = _run([sys.executable, "-m", "ifnet", "evaluate", "--checkpoint", str(run_dir / "best"),
                     "--split", "test", "--out", str(eval_dir), "--no-meteor"], env, out / "evaluate.log")
    result["seconds"]["evaluate"] = secs
    if rc != 0:
        raise SystemExit(f"bench_full_size run: evaluate failed (exit {rc}); see {out}/evaluate.log")
    result["test"] = json.loads((eval_dir / "metrics.json").read_text())
    result["seconds"]["total"] = round(time.time() - t_start, 1)
    for src in (run_dir / "metrics.csv", run_dir / "curves.png", eval_dir / "predictions.json"):
        if src.exists():
            shutil.copy2(src, out / src.name)
    (out / "full_size.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _metrics_rows(path: Path) -> list[dict]:
    """The run's metrics.csv as numbers, read by the trainer's own :class:`ifnet.train.logs.MetricsLog`
    (empty cells, NaN there, left out: full_size.json is strict JSON)."""
    sys.path.insert(0, str(REPO / "src"))  # this script runs without ifnet installed (the GPU machine)
    from ifnet.train.logs import MetricsLog

    log = MetricsLog(path)
    log.load(upto_epoch=math.inf)
    return [{k: v for k, v in row.items() if math.isfinite(v)} for row in log.rows]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="copy the run's inputs into --dest (here)")
    pp.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    pp.add_argument("--dest", type=Path, default=DEFAULT_CARRY)
    pp.add_argument("--smoke", action="store_true", help="a tiny subset (for the CPU check)")
    pr = sub.add_parser("run", help="render, train, evaluate (on the GPU machine)")
    pr.add_argument("--carry", type=Path, default=DEFAULT_CARRY)
    pr.add_argument("--out", type=Path, required=True, help="results folder ($OUT on the device)")
    pr.add_argument("--work", type=Path, default=Path("/tmp/ifnet-full-size"), help="images, run, evaluation")
    pr.add_argument("--budget-min", type=float, default=8.0,
                    help="wall-clock minutes for render + train; training stops when they are spent")
    pr.add_argument("--smoke", action="store_true", help="CPU, tiny model, 2 epochs (prepare --smoke first)")
    pr.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for training (repeatable)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.cmd == "prepare":
        print(json.dumps(prepare(args.shared, args.dest, args.smoke)))
        return 0
    res = run(args.carry, args.out, args.work, args.budget_min, args.smoke, args.extra)
    keys = ("BLEU_1", "BLEU_4", "ROUGE_L", "CIDEr", "CE_F1_macro", "CE_F1_micro")
    print(json.dumps({"seconds": res["seconds"], "epochs_done": res["epochs_done"], "gpu": res["gpu"],
                      "best_epoch": res["best"]["epoch"], "test": {k: res["test"].get(k) for k in keys}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
