"""End-to-end latency of one two-view study: PyTorch fp32 vs ONNX Runtime fp32 vs ONNX Runtime int8.

    python benchmarks/bench_latency.py [--quick] [--runs 20] [--threads 2] [--out bench-results/latency.json]
                                       [--doc docs/DEPLOY.md | --no-doc] [--quality-checkpoint CKPT | --no-quality]

What is timed: ``Predictor.predict`` / ``OnnxPredictor.predict`` on one study of two 512 x 512 8-bit views
(the first synthetic IU-Xray test study, upsampled), i.e. CLAHE enhancement (IEC) + resize/normalise +
backbone + memory/encoder + beam-3 decode of 60 tokens, with per-stage times from the predictors' own
``timings_ms``. Models: full-size IFNet (d_model 512, 3+3 layers, 2048 memory slots, 224 px input) with a
ResNet-101 or an EfficientNet-Lite0 (shipped ImageNet weights) extractor, linear or softmax attention,
untrained: latency depends on shapes, not on weights. The vocabulary is IU-Xray's (train split, threshold 3).

Fixed decode length: an untrained model ends its reports at arbitrary points, so every variant decodes with
the eos logit at -inf, i.e. exactly 60 tokens x 3 beams (IU-Xray's max_len; real reports average ~35 tokens,
so this is the worst case for the decode stage). Each run also decodes the *typical* length: the median
length of the IU-Xray train reports in tokens (eos included, cut at 60), so a table column gives the time of
a report of ordinary length; the goals are judged at both lengths.

Each variant runs in its own worker process (``torch.set_num_threads(threads)``; ONNX Runtime
``intra_op_num_threads=threads``), all workers of one extractor loaded at once and timed round-robin, so load
from other processes hits them alike; the load average before and after is recorded. Results: median and
p90 over ``--runs`` runs after warm-up. Goals: ResNet-101 PyTorch fp32 median <= 300 ms; the best deployed
variant <= 150 ms.

Quality of int8 (``--quality-checkpoint``, default ``demo-out/run/best`` when present): that trained
checkpoint is exported with int8 and its test split decoded by fp32 and int8 graphs and by PyTorch; BLEU-4,
ROUGE-L, CIDEr and CE-F1 per variant and the change int8 - fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

SHARED = Path(os.environ.get("IFNET_SHARED", REPO.parent / "shared"))
EXTRACTORS = ("resnet101", "efficientnet_lite0")
ATTENTIONS = ("linear", "softmax")
RUNTIMES = ("pytorch-fp32", "onnxruntime-fp32", "onnxruntime-int8")
STAGES = ("enhance", "preprocess", "backbone", "memory_encoder", "decode", "total")
MAX_LEN = 60  # IU-Xray's max_len: the worst case every variant decodes
TYPICAL_FALLBACK = 36
GOAL_RESNET_FP32_MS = 300.0
GOAL_BEST_MS = 150.0
DOC_START, DOC_END = "<!-- bench:latency:start -->", "<!-- bench:latency:end -->"


# -- worker (one variant, in its own process) -----------------------------------------------------

def worker(spec: dict) -> None:
    """Load one variant, then answer each "run" line on stdin with one JSON line of timings."""
    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    views = [np.load(p) for p in spec["views"]]
    if spec["runtime"] == "pytorch-fp32":
        import ifnet.models.ifnet as ifnet_model
        from ifnet.inference import Predictor

        ifnet_model.IFNetDecoder = _no_eos(ifnet_model.IFNetDecoder)  # what IFNet.decode searches with
        predictor = Predictor(spec["path"], device="cpu", beam_size=spec["beam"], max_len=spec["max_len"])
    else:
        import ifnet.export.runtime as runtime

        runtime.OnnxDecoder = _no_eos(runtime.OnnxDecoder)  # what OnnxModel.decode searches with
        predictor = runtime.OnnxPredictor(spec["path"], variant=spec["runtime"].split("-")[1],
                                          beam_size=spec["beam"], max_len=spec["max_len"], threads=spec["threads"])
    for _ in range(spec["warmup"]):
        predictor.predict(views)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] != "run":
            break
        predictor.max_len = int(command[1])  # decode exactly this many tokens (eos is never chosen)
        pred = predictor.predict(views)
        tokens = len(predictor.tokenizer.encode(pred.report)) - 2  # bos/eos added by encode
        print(json.dumps({"timings_ms": pred.timings_ms, "words": tokens}), flush=True)


def _no_eos(decoder_cls):
    """The step model with the eos logit at -inf: every hypothesis runs to max_len (fixed decode length)."""
    import math

    from ifnet.data.tokenizer import EOS_ID

    class NoEos(decoder_cls):
        def step(self, tokens, state):
            logits, state = super().step(tokens, state)
            logits[:, EOS_ID] = -math.inf
            return logits, state

    return NoEos


# -- models ---------------------------------------------------------------------------------------

def iu_tokenizer():
    """-> (tokenizer, where its words came from, typical report length in tokens incl. eos, its source)."""
    from ifnet.data.tokenizer import Tokenizer

    ann = SHARED / "data" / "iu_xray" / "annotation.json"
    if ann.is_file():
        reports = [e["report"] for e in json.loads(ann.read_text())["train"]]
        tokenizer = Tokenizer.build(reports, threshold=3)
        lengths = [min(MAX_LEN, len(tokenizer.encode(r)) - 1) for r in reports]  # no bos; eos counts
        return (tokenizer, f"IU-Xray train split ({ann})", int(statistics.median(lengths)),
                f"median of the {len(reports)} IU-Xray train reports (eos included, cut at {MAX_LEN})")
    words = [f"word{i}" for i in range(760)]
    return (Tokenizer.build([" ".join(words)], threshold=1), "760 placeholder words (IU-Xray annotation not found)",
            TYPICAL_FALLBACK, "IU-Xray annotation not found: the published median of its findings (~35 words)")


def build_checkpoint(path: Path, extractor: str, attention: str, tokenizer, guidance: float = 0.0) -> Path:
    """A full-size untrained IFNet saved as a checkpoint with a training config (224 px, CLAHE, beam 3)."""
    import torch

    from ifnet.config import resolve, to_dict
    from ifnet.models.checkpoint import save_checkpoint
    from ifnet.models.ifnet import IFNet
    from ifnet.train.config import TrainConfig

    cfg = resolve(TrainConfig, None, [
        f"model.extractor={extractor}", f"model.pretrained={str(extractor == 'efficientnet_lite0').lower()}",
        f"model.transformer.attention={attention}", f"model.vocab_size={len(tokenizer)}",
        "data.image_size=224", "data.iec=clahe", "data.annotation=none", "data.image_root=none",
        "eval.beam_size=3", "eval.max_len=60", f"eval.guidance={guidance}"])
    torch.manual_seed(0)
    model = IFNet(cfg.model).eval()
    return save_checkpoint(path, model, model.config, tokenizer, metadata={"train_config": to_dict(cfg)})


def study_views(work: Path) -> list[str]:
    """Two 512 x 512 uint8 views saved as .npy (the first synthetic IU-Xray test study, upsampled)."""
    import cv2
    import numpy as np

    from ifnet.data.images import read_xray, to_uint8

    root = SHARED / "data" / "iu_xray_synth" / "images"
    paths = []
    if root.is_dir():
        study = sorted(p for p in root.iterdir() if p.is_dir())[0]
        views = [to_uint8(read_xray(study / f"{i}.png")) for i in (0, 1)]
    else:  # without ../shared: a smooth gradient (CLAHE and the CNN cost the same on any content)
        ramp = np.linspace(0, 255, 512, dtype=np.float32)
        views = [np.add.outer(ramp, ramp[::-1] if i else ramp).__truediv__(2).astype(np.uint8) for i in (0, 1)]
    for i, v in enumerate(views):
        p = work / f"view{i}.npy"
        np.save(p, cv2.resize(v, (512, 512), interpolation=cv2.INTER_LINEAR).astype(np.uint8), allow_pickle=False)
        paths.append(str(p))
    return paths


# -- timing ---------------------------------------------------------------------------------------

class Worker:
    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=REPO)

    def wait_ready(self) -> None:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.spec['name']} died while loading (exit {self.proc.wait()})")

    def run(self, tokens: int) -> dict:
        self.proc.stdin.write(f"run {tokens}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.spec['name']} died (exit {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def time_group(specs: list[dict], runs: int, lengths: tuple[int, ...]) -> dict[tuple[str, int], list[dict]]:
    """Round-robin timing: ``runs`` samples per (variant, decode length)."""
    workers = [Worker(s) for s in specs]
    try:
        for w in workers:
            w.wait_ready()
        samples: dict[tuple[str, int], list[dict]] = {(w.spec["name"], n): [] for w in workers for n in lengths}
        for r in range(runs):
            order = workers if r % 2 == 0 else workers[::-1]
            for w in order:
                for n in lengths:
                    samples[(w.spec["name"], n)].append(w.run(n))
        return samples
    finally:
        for w in workers:
            w.close()


def summarise(samples: list[dict]) -> dict:
    def pct(values: list[float], q: float) -> float:
        s = sorted(values)
        return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]

    out = {"runs": len(samples), "words": samples[-1]["words"]}
    for stage in STAGES:
        values = [s["timings_ms"][stage] for s in samples]
        out[stage] = {"median_ms": round(statistics.median(values), 1), "p90_ms": round(pct(values, 0.9), 1)}
    return out


def load_average() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# -- quality of int8 ------------------------------------------------------------------------------

def quality(checkpoint: Path, work: Path, limit: int, threads: int) -> dict:
    from ifnet.export.compare import compare_variants
    from ifnet.export.onnx_export import export_checkpoint

    out = work / "quality-onnx"
    manifest = export_checkpoint(checkpoint, out, int8=True, overwrite=True)
    report = compare_variants(out, limit=limit, checkpoint=checkpoint, threads=threads)
    model = manifest["model"]
    report["checkpoint"] = {"path": str(checkpoint), "extractor": model["extractor"], "d_model": model["d_model"],
                            "attention": model["attention"], "epoch": manifest["source_checkpoint"]["epoch"],
                            "data": manifest["data_config"]["annotation"]}
    return report


# -- report ---------------------------------------------------------------------------------------

def table(results: list[dict]) -> str:
    typical = results[0]["typical"]["tokens"] if results else 0
    head = ("| extractor | attention | runtime | total median (ms) | total p90 (ms) | enhance | preprocess | "
            f"backbone | memory+encoder | decode ({MAX_LEN} tok x beam 3) | total median, {typical} tok (ms) | "
            f"decode, {typical} tok |")
    rows = [head, "|" + "---|" * 12]
    for r in results:
        s, t = r["stages"], r["typical"]
        rows.append(f"| {r['extractor']} | {r['attention']} | {r['runtime']} | **{s['total']['median_ms']:.0f}** | "
                    f"{s['total']['p90_ms']:.0f} | " + " | ".join(f"{s[k]['median_ms']:.1f}" for k in STAGES[:-1])
                    + f" | **{t['total']['median_ms']:.0f}** | {t['decode']['median_ms']:.1f} |")
    return "\n".join(rows)


def goals(results: list[dict]) -> list[dict]:
    """Each goal judged at the worst-case length (60 tokens) and at the typical one."""
    if not results:
        return []
    resnet = [r for r in results if r["extractor"] == "resnet101" and r["runtime"] == "pytorch-fp32"
              and r["attention"] == "linear"]
    out = []
    for key, length in (("stages", f"{MAX_LEN} tokens"),
                        ("typical", f"{results[0]['typical']['tokens']} tokens (typical)")):
        def total(r, key=key):
            return r[key]["total"]["median_ms"]

        best = min(results, key=total)
        if resnet:
            out.append({"goal": f"ResNet-101 PyTorch fp32 (linear) median <= {GOAL_RESNET_FP32_MS:.0f} ms, {length}",
                        "measured_ms": total(resnet[0]), "pass": total(resnet[0]) <= GOAL_RESNET_FP32_MS})
        out.append({"goal": f"best deployed variant median <= {GOAL_BEST_MS:.0f} ms, {length}",
                    "variant": f"{best['extractor']} / {best['attention']} / {best['runtime']}",
                    "measured_ms": total(best), "pass": total(best) <= GOAL_BEST_MS})
    return out


def write_doc(doc: Path, result: dict) -> None:
    from ifnet.io_utils import atomic_write_text

    lines = [f"Measured {result['date']} on {result['machine']['cpu']} ({result['machine']['cores']} cores visible), "
             f"{result['settings']['threads']} threads, {result['settings']['runs']} runs per variant after "
             f"{result['settings']['warmup']} warm-up; load average {result['machine']['load_before']} before, "
             f"{result['machine']['load_after']} after. Decode lengths: {MAX_LEN} tokens (worst case) and "
             f"{result['settings']['typical_tokens']} tokens ({result['settings']['typical_tokens_source']}); "
             f"condition guidance weight {result['settings']['guidance']:g}.", "", table(result["results"]), ""]
    for g in result["goals"]:
        extra = f" ({g['variant']})" if "variant" in g else ""
        lines.append(f"- {g['goal']}: **{g['measured_ms']:.0f} ms{extra} -> {'PASS' if g['pass'] else 'FAIL'}**")
    q = result.get("quality")
    if q and "variants" in q:
        c = q["checkpoint"]
        lines += ["", f"int8 vs fp32 on {q['studies']} {q['split']} studies of `{c['data']}` with the trained "
                  f"checkpoint `{c['path']}` ({c['extractor']}, d_model {c['d_model']}, {c['attention']}, epoch {c['epoch']}), "
                  f"beam {q['beam_size']}, condition guidance {q.get('guidance', 0.0):g} (the checkpoint's, for every "
                  "variant):", "",
                  "| variant | BLEU-4 | ROUGE-L | CIDEr | CE-F1 micro | CE-F1 macro | same tokens as ORT fp32 |",
                  "|---|---|---|---|---|---|---|"]
        labels = {"fp32": "onnxruntime-fp32", "int8": "onnxruntime-int8", "pytorch": "pytorch-fp32"}
        for name, row in q["variants"].items():
            lines.append(f"| {labels.get(name, name)} | " + " | ".join(f"{row.get(k, float('nan')):.4f}" for k in
                                                     ("BLEU_4", "ROUGE_L", "CIDEr", "CE_F1_micro", "CE_F1_macro"))
                         + f" | {row['same_tokens_as_fp32']:.0%} |")
    elif q:
        lines += ["", f"int8 quality: {q.get('skipped')}"]
    block = "\n".join(lines)
    text = doc.read_text(encoding="utf-8") if doc.exists() else f"# Deployment\n\n{DOC_START}\n{DOC_END}\n"
    if DOC_START not in text or DOC_END not in text:
        text += f"\n{DOC_START}\n{DOC_END}\n"
    head, rest = text.split(DOC_START, 1)
    tail = rest.split(DOC_END, 1)[1]
    atomic_write_text(doc, f"{head}{DOC_START}\n{block}\n{DOC_END}{tail}")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="5 runs, linear attention and ResNet-101 + Lite0 only")
    parser.add_argument("--runs", type=int, help="timed runs per variant (default 20; --quick 5)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--guidance", type=float, default=0.0,
                        help="condition guidance weight of every variant (a second decoder pass per token)")
    parser.add_argument("--extractors", nargs="+", default=list(EXTRACTORS), choices=EXTRACTORS)
    parser.add_argument("--attentions", nargs="+", default=None, choices=ATTENTIONS)
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "latency.json")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "DEPLOY.md")
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--work", type=Path, help="folder for checkpoints and exports (default: a temporary one)")
    parser.add_argument("--quality-checkpoint", type=Path, help="trained checkpoint for the int8 quality check "
                        "(default: demo-out/run/best if present)")
    parser.add_argument("--quality-studies", type=int, default=30)
    parser.add_argument("--no-quality", action="store_true")
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0

    import onnxruntime
    import torch

    from ifnet.export.onnx_export import export_checkpoint
    from ifnet.io_utils import atomic_write_json

    runs = args.runs or (5 if args.quick else 20)
    attentions = args.attentions or (["linear"] if args.quick else list(ATTENTIONS))
    work = args.work or Path(tempfile.mkdtemp(prefix="ifnet-bench-latency-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    load_before = load_average()
    tokenizer, vocab_source, typical, typical_source = iu_tokenizer()
    views = study_views(work)
    results = []
    try:
        for extractor in args.extractors:
            specs = []
            for attention in attentions:
                name = f"{extractor}-{attention}"
                ckpt = build_checkpoint(work / name / "ckpt", extractor, attention, tokenizer, args.guidance)
                t0 = time.time()
                export_checkpoint(ckpt, work / name / "onnx", int8=True, overwrite=True)
                print(f"[{time.time() - started:5.0f}s] built and exported {name} ({time.time() - t0:.0f} s export)",
                      flush=True)
                for runtime in RUNTIMES:
                    path = ckpt if runtime == "pytorch-fp32" else work / name / "onnx"
                    specs.append({"name": f"{name}-{runtime}", "extractor": extractor, "attention": attention,
                                  "runtime": runtime, "path": str(path), "views": views, "threads": args.threads,
                                  "beam": 3, "max_len": MAX_LEN, "warmup": args.warmup})
            samples = time_group(specs, runs, (MAX_LEN, typical))
            for spec in specs:
                stats = summarise(samples[(spec["name"], MAX_LEN)])
                short = summarise(samples[(spec["name"], typical)])
                results.append({"extractor": spec["extractor"], "attention": spec["attention"],
                                "runtime": spec["runtime"], "words": stats.pop("words"), "runs": stats.pop("runs"),
                                "stages": stats,
                                "typical": {"tokens": typical, "words": short["words"], "total": short["total"],
                                            "decode": short["decode"]}})
                print(f"[{time.time() - started:5.0f}s] {spec['name']:<44} total median "
                      f"{stats['total']['median_ms']:7.1f} ms  p90 {stats['total']['p90_ms']:7.1f} ms  "
                      + " ".join(f"{k} {stats[k]['median_ms']:.1f}" for k in STAGES[:-1])
                      + f"  | {typical} tok: total {short['total']['median_ms']:.1f}", flush=True)
        quality_result: Optional[dict] = None
        if not args.no_quality:
            qc = args.quality_checkpoint or (REPO / "demo-out" / "run" / "best")
            if (qc / "meta.json").is_file():
                print(f"[{time.time() - started:5.0f}s] int8 quality on {qc} ...", flush=True)
                quality_result = quality(qc, work, args.quality_studies, args.threads)
            else:
                quality_result = {"skipped": f"no trained checkpoint at {qc}: run `make demo` first or pass "
                                             "--quality-checkpoint"}
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "load_before": load_before,
                    "load_after": load_average(), "python": platform.python_version(), "torch": torch.__version__,
                    "onnxruntime": onnxruntime.__version__},
        "settings": {"threads": args.threads, "runs": runs, "warmup": args.warmup, "beam_size": 3, "max_len": MAX_LEN,
                     "guidance": args.guidance,
                     "fixed_decode_length": f"eos logit at -inf: every variant decodes {MAX_LEN} tokens x 3 beams, "
                                            f"and, in the same runs, {typical} tokens x 3 beams",
                     "typical_tokens": typical, "typical_tokens_source": typical_source,
                     "study": "two views, 512 x 512 uint8 (first synthetic IU-Xray test study, upsampled); "
                              "CLAHE IEC; 224 px model input", "vocabulary": vocab_source,
                     "models": "untrained, full size: d_model 512, 3+3 layers, 8 heads, d_ff 512, 2048 memory "
                               "slots, top-k 32; EfficientNet-Lite0 with its shipped ImageNet weights",
                     "wall_seconds": round(time.time() - started, 1)},
        "results": results,
        "goals": goals(results),
        "quality": quality_result,
    }
    atomic_write_json(args.out, result)
    print(table(results))
    for g in result["goals"]:
        print(f"{g['goal']}: {g['measured_ms']:.0f} ms -> {'PASS' if g['pass'] else 'FAIL'}")
    if quality_result:
        print(json.dumps(quality_result.get("variants", quality_result), indent=1))
    if not args.no_doc:
        write_doc(args.doc, result)
    print(f"wrote {args.out}" + ("" if args.no_doc else f" and {args.doc}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
