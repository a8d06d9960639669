"""Attention benchmark: softmax SDPA vs causal linear attention (training), and decode cost per token.

    python benchmarks/bench_attention.py [--threads 1] [--quick] [--out bench-results/attention.json]
                                          [--doc docs/BENCH_ATTENTION.md | --no-doc]

1. Training: forward + backward of causal attention alone, d_model 512 = 8 heads x 64, for
   N = 60, 256, 1024, 2048, 4096: ``scaled_dot_product_attention(is_causal=True)`` vs
   ``causal_linear_attention`` (parallel) vs ``causal_linear_attention_chunked`` (C = 64).
2. Decoding: one ``SAFormerDecoder.step`` (3 layers, d_model 512, 8 heads, d_ff 512, 98 memory
   slots = two views x 7 x 7) at positions 10, 100, 1000: recurrent linear state vs softmax KV cache.
   The state at position p is built with random contents of the right shapes (cost depends on
   shapes only), instead of stepping p times.

Timing: median of several repeats after warm-up; the methods of one size run round-robin so that
load from other processes hits them alike. Memory, measured after all timings: peak resident memory
(Linux VmHWM, reset through /proc/self/clear_refs) above the resident memory before the call, with
glibc told to serve every allocation >= 128 KiB by mmap and its free heap trimmed before each call,
so that every byte a call touches shows; it includes the output and, for training, the input
gradients. Where /proc or glibc does not allow this, memory is null.

Writes the JSON results and rewrites the table between the markers in the doc. Goals:
linear decode step at position 1000 / position 10 <= 1.2; causal linear forward+backward <= 1.5x
SDPA at N = 60; faster than SDPA at N >= 2048.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from ifnet.io_utils import atomic_write_json, atomic_write_text  # noqa: E402
from ifnet.layers import attention as A  # noqa: E402
from ifnet.layers.saformer import DecoderState, SAFormerConfig, SAFormerDecoder  # noqa: E402

HEADS, HEAD_DIM, D_MODEL = 8, 64, 512
CHUNK = 64
# (N, batch, warm-up, repeats): smaller batches for long N keep the run under a few minutes.
TRAIN_SIZES = [(60, 8, 5, 40), (256, 8, 2, 15), (1024, 2, 1, 5), (2048, 1, 1, 5), (4096, 1, 1, 3)]
QUICK_TRAIN_SIZES = [(60, 8, 2, 5), (256, 8, 1, 3), (1024, 2, 1, 2)]
DECODE_POSITIONS = [10, 100, 1000]
DECODE_BATCHES = [3, 48]  # one report x beam 3; 16 reports x beam 3
MEMORY_SLOTS = 98
DOC_START, DOC_END = "<!-- bench:attention:start -->", "<!-- bench:attention:end -->"


# --------------------------------------------------------------------------------------------
# Measurement helpers
# --------------------------------------------------------------------------------------------


def _proc_value(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


_LIBC = None


def _memory_probe_ok() -> bool:
    global _LIBC
    try:
        _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: large blocks go back to the OS when freed
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return False
    return _proc_value("VmHWM:") is not None


def peak_mib(fn: Callable[[], object], enabled: bool) -> Optional[float]:
    """Peak resident memory added while ``fn`` runs, in MiB (None where unmeasurable)."""
    if not enabled:
        return None
    gc.collect()
    _LIBC.malloc_trim(0)  # hand freed heap pages back, so that reusing them shows up as new resident memory
    base = _proc_value("VmRSS:")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    result = fn()
    peak = _proc_value("VmHWM:")
    del result
    return round(max(peak - base, 0) / 2**20, 2) if base is not None and peak is not None else None


def round_robin(fns: Dict[str, Callable[[], object]], warmup: int, repeats: int) -> Dict[str, List[float]]:
    """Per method, ``repeats`` wall times in ms, the methods interleaved."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def summary(times: Sequence[float]) -> dict:
    return {"median_ms": round(statistics.median(times), 4), "min_ms": round(min(times), 4),
            "repeats": len(times)}


# --------------------------------------------------------------------------------------------
# 1. Training: attention forward + backward
# --------------------------------------------------------------------------------------------


TRAIN_METHODS = {
    "softmax_sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    "linear_parallel": A.causal_linear_attention,
    "linear_chunked": lambda q, k, v: A.causal_linear_attention_chunked(q, k, v, CHUNK),
}


def training_cases(sizes):
    """Per size: (N, batch, warm-up, repeats, {method: forward+backward closure})."""
    for n, batch, warmup, repeats in sizes:
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(batch, HEADS, n, HEAD_DIM, generator=g).requires_grad_() for _ in range(3))
        upstream = torch.randn(batch, HEADS, n, HEAD_DIM, generator=g)

        def fwd_bwd(method, q=q, k=k, v=v, upstream=upstream):
            def run():
                q.grad = k.grad = v.grad = None
                method(q, k, v).backward(upstream)
            return run

        yield n, batch, warmup, repeats, {name: fwd_bwd(method) for name, method in TRAIN_METHODS.items()}


def bench_training(sizes) -> List[dict]:
    rows = []
    for n, batch, warmup, repeats, fns in training_cases(sizes):
        times = round_robin(fns, warmup, repeats)
        row = {"N": n, "batch": batch, "heads": HEADS, "head_dim": HEAD_DIM}
        for name in fns:
            row[name] = {**summary(times[name]), "peak_mib": None}
        for name in ("linear_parallel", "linear_chunked"):
            row[name]["vs_sdpa"] = round(row[name]["median_ms"] / row["softmax_sdpa"]["median_ms"], 3)
        rows.append(row)
        print(f"  N={n:5d} B={batch}: " + "  ".join(
            f"{name} {row[name]['median_ms']:9.2f} ms" for name in TRAIN_METHODS), flush=True)
    return rows


def training_memory(sizes, rows: List[dict]) -> None:
    for row, (_, _, _, _, fns) in zip(rows, training_cases(sizes)):
        for name, fn in fns.items():
            fn()  # first call pays one-off allocations (thread pools, kernels)
            row[name]["peak_mib"] = peak_mib(fn, True)


# --------------------------------------------------------------------------------------------
# 2. Decoding: one SAFormerDecoder.step at a given position
# --------------------------------------------------------------------------------------------


def state_at(decoder: SAFormerDecoder, base: DecoderState, position: int, attention: str) -> DecoderState:
    """``base`` with self-attention states as they are after ``position`` tokens (random contents)."""
    batch = base.batch_size
    caches = []
    for _ in decoder.layers:
        if attention == "linear":  # sums of `position` positive outer products / vectors
            caches.append((torch.rand(batch, HEADS, HEAD_DIM, HEAD_DIM) * position,
                           torch.rand(batch, HEADS, HEAD_DIM) * position + position))
        else:
            caches.append((torch.randn(batch, HEADS, position, HEAD_DIM), torch.randn(batch, HEADS, position, HEAD_DIM)))
    return DecoderState(tuple(caches), base.cross_attention, position)


def state_mib(state: DecoderState) -> float:
    tensors = [t for entry in state.self_attention for t in entry]
    return round(sum(t.numel() * t.element_size() for t in tensors) / 2**20, 3)


def decoding_cases(positions, batches):
    """Per batch size: (batch, {(attention, position): one-step closure}, states)."""
    decoders = {}
    for attention in ("linear", "softmax"):
        torch.manual_seed(0)
        cfg = SAFormerConfig(d_model=D_MODEL, num_heads=HEADS, num_encoder_layers=3, num_decoder_layers=3,
                             d_ff=512, dropout=0.0, attention=attention)
        decoders[attention] = SAFormerDecoder(cfg).eval()
    for batch in batches:
        memory = torch.randn(batch, MEMORY_SLOTS, D_MODEL)
        memory_mask = torch.ones(batch, MEMORY_SLOTS, dtype=torch.bool)
        y_t = torch.randn(batch, D_MODEL)
        states = {}
        for attention, decoder in decoders.items():
            base = decoder.init_state(memory, memory_mask)
            for p in positions:
                states[attention, p] = state_at(decoder, base, p, attention)

        def step(attention, p, y_t=y_t, states=states):
            def run():
                with torch.no_grad():
                    return decoders[attention].step(y_t, states[attention, p])
            return run

        yield batch, {key: step(*key) for key in states}, states


def bench_decoding(positions, batches, repeats: int) -> List[dict]:
    """Both attention kinds and all positions of one batch size run round-robin, so they share the load."""
    rows = []
    for batch, fns, states in decoding_cases(positions, batches):
        times = round_robin(fns, warmup=3, repeats=repeats)
        for (attention, p), t in times.items():
            rows.append({"attention": attention, "batch": batch, "position": p, **summary(t),
                         "state_mib": state_mib(states[attention, p]), "step_peak_mib": None})
        for attention in ("linear", "softmax"):
            print(f"  {attention:7s} B={batch:2d}: " + "  ".join(
                f"pos {p}: {statistics.median(times[attention, p]):7.3f} ms" for p in positions), flush=True)
    return rows


def decoding_memory(positions, batches, rows: List[dict]) -> None:
    by_key = {(r["attention"], r["batch"], r["position"]): r for r in rows}
    for batch, fns, _ in decoding_cases(positions, batches):
        for (attention, p), fn in fns.items():
            fn()
            by_key[attention, batch, p]["step_peak_mib"] = peak_mib(fn, True)


# --------------------------------------------------------------------------------------------
# Goals, JSON, doc table
# --------------------------------------------------------------------------------------------


def evaluate_goals(train: List[dict], decode: List[dict]) -> List[dict]:
    goals = []
    by_n = {row["N"]: row for row in train}
    if 60 in by_n:
        ratio = by_n[60]["linear_parallel"]["vs_sdpa"]
        goals.append({"goal": "causal linear (parallel) fwd+bwd <= 1.5x SDPA at N=60", "value": ratio,
                      "passed": ratio <= 1.5})
    for n in sorted(x for x in by_n if x >= 2048):
        for name in ("linear_chunked", "linear_parallel"):
            ratio = by_n[n][name]["vs_sdpa"]
            goals.append({"goal": f"causal linear ({name.split('_')[1]}) fwd+bwd faster than SDPA at N={n}",
                          "value": ratio, "passed": ratio < 1.0})
    lin = {(r["batch"], r["position"]): r["median_ms"] for r in decode if r["attention"] == "linear"}
    for batch in sorted({b for b, _ in lin}):
        if (batch, 1000) in lin and (batch, 10) in lin:
            ratio = round(lin[(batch, 1000)] / lin[(batch, 10)], 3)
            goals.append({"goal": f"linear decode step, position 1000 / position 10 <= 1.2 (batch {batch})",
                          "value": ratio, "passed": ratio <= 1.2})
    return goals


def environment(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"torch": torch.__version__, "python": platform.python_version(), "threads": threads, "cpu": cpu,
            "cpu_count": os.cpu_count(), "load_average_start": [round(x, 2) for x in os.getloadavg()]}


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"Run: torch {env['torch']}, {env['threads']} thread(s) on {env['cpu']} "
             f"({env['cpu_count']} cores), load average {env['load_average_start']} at start, "
             f"{env['load_average_end']} at end; total {results['wall_seconds']:.0f} s.", "",
             "**Training: causal attention forward + backward** (8 heads x 64, median ms; "
             "peak = extra resident MiB)", "",
             "| N | batch | SDPA ms | linear parallel ms (x SDPA) | linear chunked C=64 ms (x SDPA) "
             "| SDPA peak | parallel peak | chunked peak |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["training"]:
        s, p, c = r["softmax_sdpa"], r["linear_parallel"], r["linear_chunked"]
        lines.append(f"| {r['N']} | {r['batch']} | {s['median_ms']:.2f} | {p['median_ms']:.2f} ({p['vs_sdpa']:.2f}x) "
                     f"| {c['median_ms']:.2f} ({c['vs_sdpa']:.2f}x) | {s['peak_mib']} | {p['peak_mib']} "
                     f"| {c['peak_mib']} |")
    lines += ["", "**Decoding: one 3-layer SAFormerDecoder step** (median ms per token; state = "
              "self-attention state MiB, all layers)", "",
              "| attention | batch | position | ms / token | state MiB | step peak MiB |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in results["decoding"]:
        lines.append(f"| {r['attention']} | {r['batch']} | {r['position']} | {r['median_ms']:.3f} "
                     f"| {r['state_mib']} | {r['step_peak_mib']} |")
    lines += ["", "**Goals**", "", "| goal | measured | result |", "|---|---:|---|"]
    for g in results["goals"]:
        lines.append(f"| {g['goal']} | {g['value']:.3f} | {'pass' if g['passed'] else 'FAIL'} |")
    return "\n".join(lines)


def update_doc(doc: Path, table: str) -> None:
    text = doc.read_text(encoding="utf-8") if doc.exists() else f"# Attention benchmark\n\n{DOC_START}\n{DOC_END}\n"
    if DOC_START not in text or DOC_END not in text:
        text += f"\n{DOC_START}\n{DOC_END}\n"
    head, rest = text.split(DOC_START, 1)
    _, tail = rest.split(DOC_END, 1)
    atomic_write_text(doc, f"{head}{DOC_START}\n{table}\n{DOC_END}{tail}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: stable under load from other processes; ratios are what count)")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "attention.json")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "BENCH_ATTENTION.md")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite the table in --doc")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = {"benchmark": "attention", "environment": environment(args.threads)}
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    sizes = QUICK_TRAIN_SIZES if args.quick else TRAIN_SIZES
    repeats = 5 if args.quick else 20
    print("training (causal attention forward + backward):")
    results["training"] = bench_training(sizes)
    print("decoding (3-layer SAFormerDecoder step):")
    results["decoding"] = bench_decoding(DECODE_POSITIONS, DECODE_BATCHES, repeats)
    # Memory last: the probe makes glibc mmap every block >= 128 KiB, which would slow the timings.
    memory_ok = _memory_probe_ok()
    results["memory_measured"] = "peak VmHWM - VmRSS before the call, MiB" if memory_ok else None
    if memory_ok:
        print("memory ...", flush=True)
        training_memory(sizes, results["training"])
        decoding_memory(DECODE_POSITIONS, DECODE_BATCHES, results["decoding"])
    results["goals"] = evaluate_goals(results["training"], results["decoding"])
    results["environment"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_json(args.out, results)
    table = markdown(results)
    if not args.no_doc:
        update_doc(args.doc, table)
    print(table)
    print(f"wrote {args.out}" + ("" if args.no_doc else f" and the table in {args.doc}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
