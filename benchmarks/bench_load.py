"""Load test of ``ifnet serve`` on loopback: every request answered, latency percentiles, server memory.

    python benchmarks/bench_load.py [--checkpoint CKPT] [--requests 200] [--concurrency 8] [--lean]
                                    [--workers 1] [--time-limit 900] [--out bench-results/load.json]
                                    [--doc docs/SERVE.md | --no-doc]

1. Starts ``ifnet serve --port 0`` (loopback, a free port) in a subprocess, with ``--checkpoint`` or, by
   default, the tiny checkpoint of :mod:`ifnet.serve.tiny_checkpoint` trained into a temporary folder.
2. Sends a few warm-up requests, then ``--requests`` POST /v1/reports, ``--concurrency`` at a time, each
   with the frontal and lateral image of the first synthetic IU-Xray study in ../shared (read in place)
   or, without ../shared, a generated phantom. Each request is the page's (heatmap and images
   included) unless ``--lean`` asks for the bare report. The queue is sized so that no request
   should get 503.
3. Samples the server's resident memory (Linux ``VmRSS``) every 0.2 s and reports it after the warm-up,
   at the middle and at the end of the run.

Bounded: a fixed number of requests, a per-request timeout and an overall time limit; it stops by
itself and stops the server. Only 127.0.0.1 is contacted. Exit status 1 if any request failed or the
memory grew by more than ``--max-rss-growth-mb``. Writes the JSON results and rewrites the table
between the markers in the doc.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import queue
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from ifnet.io_utils import atomic_write_json, atomic_write_text  # noqa: E402

SHARED_IMAGES = Path(os.environ.get("IFNET_SHARED", REPO.parent / "shared")) / "data" / "iu_xray_synth" / "images"
DOC_START, DOC_END = "<!-- bench:load:start -->", "<!-- bench:load:end -->"
WARM_UP_REQUESTS = 4
REQUEST_TIMEOUT_S = 120
BOUNDARY = "ifnet-bench-load-boundary"


# -- the server ---------------------------------------------------------------------------------------

class Server:
    """``ifnet serve`` in a subprocess on 127.0.0.1, its URL read from what it prints."""

    def __init__(self, checkpoint: Path, *, workers: int, queue_size: int, start_timeout_s: float = 180) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, "-m", "ifnet", "serve", "--checkpoint", str(checkpoint), "--host", "127.0.0.1",
               "--port", "0", "--workers", str(workers), "--queue-size", str(queue_size), "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.output: list[str] = []
        lines: "queue.Queue[str]" = queue.Queue()

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.output.append(line)
                lines.put(line)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + start_timeout_s
        self.port = None
        while self.port is None and time.monotonic() < deadline and self.proc.poll() is None:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if "open http://127.0.0.1:" in line:
                self.port = int(line.split("open http://127.0.0.1:", 1)[1].split("/", 1)[0])
        if self.port is None:
            self.stop()
            raise SystemExit("ifnet serve did not start:\n" + "".join(self.output))

    def rss_bytes(self) -> Optional[int]:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None  # not Linux, or the process is gone

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- the client -------------------------------------------------------------------------------------------

def multipart(files: dict[str, tuple[str, bytes]], fields: dict[str, str]) -> bytes:
    out = io.BytesIO()
    for name, (filename, data) in files.items():
        out.write(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                  "Content-Type: application/octet-stream\r\n\r\n".encode())
        out.write(data + b"\r\n")
    for name, value in fields.items():
        out.write(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    out.write(f"--{BOUNDARY}--\r\n".encode())
    return out.getvalue()


def study_images() -> tuple[dict[str, tuple[str, bytes]], str]:
    """Frontal and lateral of the first synthetic IU-Xray study (read in place), else a phantom pair."""
    if SHARED_IMAGES.is_dir():
        folder = sorted(p for p in SHARED_IMAGES.iterdir() if p.is_dir())[0]
        return ({"frontal": ("0.png", (folder / "0.png").read_bytes()),
                 "lateral": ("1.png", (folder / "1.png").read_bytes())}, f"iu_xray_synth/{folder.name}")
    from PIL import Image

    from ifnet.demo.phantom import make_study

    study = make_study("BENCH0001", size=256)
    files = {}
    for field, img in (("frontal", study.frontal), ("lateral", study.lateral)):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        files[field] = (f"{field}.png", buf.getvalue())
    return files, "phantom BENCH0001"


class Client:
    """One keep-alive connection per thread."""

    def __init__(self, port: int, body: bytes, path: str) -> None:
        self.port, self.body, self.path = port, body, path
        self.local = threading.local()

    def post(self) -> tuple[int, float, Optional[dict]]:
        """(status, seconds, JSON body or None); status 0 for a connection error."""
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT_S)
        t0 = time.perf_counter()
        try:
            conn.request("POST", self.path, body=self.body,
                         headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
            response = conn.getresponse()
            raw = response.read()
            elapsed = time.perf_counter() - t0
            try:
                doc = json.loads(raw)
            except ValueError:
                doc = None
            return response.status, elapsed, doc
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            self.local.conn = None
            return 0, time.perf_counter() - t0, {"error": f"{type(e).__name__}: {e}"}


# -- the run ----------------------------------------------------------------------------------------------

def run(args: argparse.Namespace, checkpoint: Path) -> dict:
    files, image_source = study_images()
    fields = {} if args.lean else {"heatmap": "true"}
    body = multipart(files, fields)
    path = "/v1/reports" if args.lean else "/v1/reports?include_images=true"
    queue_size = max(args.concurrency, 8)  # room for every client: a 503 here would be a failure
    server = Server(checkpoint, workers=args.workers, queue_size=queue_size)
    samples: list[tuple[float, int, int]] = []  # (seconds since start, requests done, rss bytes)
    done = [0]
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.is_set():
            rss = server.rss_bytes()
            if rss is not None:
                samples.append((time.monotonic() - t_start, done[0], rss))
            stop_sampling.wait(0.2)

    try:
        client = Client(server.port, body, path)
        for _ in range(WARM_UP_REQUESTS):
            status, _, doc = client.post()
            if status != 200:
                raise SystemExit(f"warm-up request failed: {status} {doc}")
        rss_after_warm_up = server.rss_bytes()
        results: list[tuple[int, float, Optional[dict]]] = []
        lock = threading.Lock()
        deadline = time.monotonic() + args.time_limit

        def one(_i: int) -> None:
            if time.monotonic() > deadline:
                outcome: tuple[int, float, Optional[dict]] = (-1, 0.0, {"error": "not sent: time limit reached"})
            else:
                outcome = client.post()
            with lock:
                results.append(outcome)
                done[0] += 1

        t_start = time.monotonic()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one, range(args.requests)))
        wall = time.monotonic() - t_start
        stop_sampling.set()
        sampler.join()
        rss_end = server.rss_bytes()
    finally:
        stop_sampling.set()
        server.stop()

    ok = [r for r in results if r[0] == 200]
    statuses: dict[str, int] = {}
    for status, _, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    errors = [f"{s}: {(d or {}).get('error', '')}"[:200] for s, _, d in results if s != 200]
    latency = np.array([r[1] for r in ok]) * 1000
    model_ms = np.array([r[2]["timings_ms"]["total"] for r in ok])
    queue_ms = np.array([r[2]["timings_ms"]["queue_wait"] for r in ok])
    mid = min(samples, key=lambda s: abs(s[1] - args.requests / 2)) if samples else None
    mib = 2 ** 20
    rss = {
        "after_warm_up_mib": round(rss_after_warm_up / mib, 1) if rss_after_warm_up else None,
        "middle_mib": round(mid[2] / mib, 1) if mid else None,
        "end_mib": round(rss_end / mib, 1) if rss_end else None,
        "max_mib": round(max(s[2] for s in samples) / mib, 1) if samples else None,
        "samples": len(samples),
    }
    growth = (rss["end_mib"] - rss["after_warm_up_mib"]) if rss["end_mib"] and rss["after_warm_up_mib"] else None
    rss["growth_mib"] = None if growth is None else round(growth, 1)

    def pct(a: np.ndarray, q: float) -> Optional[float]:
        return round(float(np.percentile(a, q)), 1) if len(a) else None

    return {
        "config": {"requests": args.requests, "concurrency": args.concurrency, "workers": args.workers,
                   "queue_size": queue_size, "request": "lean" if args.lean else "page", "views": 2,
                   "images": image_source,
                   "request_bytes": len(body), "checkpoint": "tiny (ifnet.serve.tiny_checkpoint)"
                   if args.checkpoint is None else str(args.checkpoint)},
        "answered": len(results), "ok": len(ok), "errors": len(errors), "statuses": statuses,
        "error_examples": errors[:5], "wall_s": round(wall, 2),
        "throughput_rps": round(len(ok) / wall, 2) if wall > 0 else None,
        "latency_ms": {"p50": pct(latency, 50), "p95": pct(latency, 95), "p99": pct(latency, 99),
                       "max": round(float(latency.max()), 1) if len(latency) else None,
                       "mean": round(float(latency.mean()), 1) if len(latency) else None},
        "server_model_ms_p50": pct(model_ms, 50), "server_queue_wait_ms_p50": pct(queue_ms, 50),
        "rss": rss,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_1m_at_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None},
    }


def doc_table(res: dict) -> str:
    c, lat, rss = res["config"], res["latency_ms"], res["rss"]
    lines = [
        f"{c['requests']} requests, {c['concurrency']} at a time, to `ifnet serve` on 127.0.0.1 "
        f"({c['workers']} worker, queue {c['queue_size']}); each request: frontal + lateral PNG "
        f"({c['request_bytes'] / 1024:.0f} KB, {c['images']}), "
        + ("report only" if c["request"] == "lean" else "as the page asks: with heatmap and images (include_images)")
        + "; "
        f"checkpoint: {c['checkpoint']}; {res['machine']['cpus']} CPU cores shared with other work "
        f"(1-min load average at the end: {res['machine']['load_average_1m_at_end']}).",
        "",
        "| answered | errors | p50 latency | p95 latency | p99 latency | max | throughput | model time p50 | queue wait p50 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {res['answered']}/{c['requests']} | {res['errors']} | {lat['p50']} ms | {lat['p95']} ms | {lat['p99']} ms "
        f"| {lat['max']} ms | {res['throughput_rps']} req/s | {res['server_model_ms_p50']} ms "
        f"| {res['server_queue_wait_ms_p50']} ms |",
        "",
        "| server RSS after warm-up | middle of the run | end | max | growth |",
        "|---:|---:|---:|---:|---:|",
        f"| {rss['after_warm_up_mib']} MiB | {rss['middle_mib']} MiB | {rss['end_mib']} MiB | {rss['max_mib']} MiB "
        f"| {rss['growth_mib']} MiB |",
    ]
    return "\n".join(lines)


def update_doc(path: Path, table: str) -> None:
    text = path.read_text()
    if DOC_START not in text or DOC_END not in text:
        raise SystemExit(f"{path}: markers {DOC_START} ... {DOC_END} not found")
    head, rest = text.split(DOC_START, 1)
    _, tail = rest.split(DOC_END, 1)
    atomic_write_text(path, f"{head}{DOC_START}\n{table}\n{DOC_END}{tail}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="checkpoint to serve (default: train the tiny one, ~30 s)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1, help="server inference workers")
    parser.add_argument("--lean", action="store_true",
                        help="request the bare report (default: what the page asks for, heatmap and images included)")
    parser.add_argument("--time-limit", type=float, default=900, help="seconds; requests not sent by then fail")
    parser.add_argument("--max-rss-growth-mb", type=float, default=50,
                        help="largest acceptable growth of the server's RSS from after warm-up to the end")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "load.json")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "SERVE.md")
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be at least 1")

    with tempfile.TemporaryDirectory(prefix="ifnet-bench-load-") as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            from ifnet.serve.tiny_checkpoint import train_tiny_checkpoint

            print("training the tiny checkpoint ...", flush=True)
            checkpoint = train_tiny_checkpoint(Path(tmp) / "tiny")
        res = run(args, checkpoint)
    growth = res["rss"]["growth_mib"]
    res["memory_stable"] = growth is None or growth <= args.max_rss_growth_mb
    res["passed"] = res["errors"] == 0 and res["memory_stable"]
    atomic_write_json(args.out, res)
    table = doc_table(res)
    print(table)
    print(json.dumps({k: res[k] for k in ("answered", "errors", "latency_ms", "rss", "passed")}, indent=1))
    if not args.no_doc:
        update_doc(args.doc, table)
    if res["errors"]:
        print(f"FAILED: {res['errors']} request(s) not answered with 200, e.g. {res['error_examples'][:2]}")
    if not res["memory_stable"]:
        print(f"FAILED: server RSS grew by {growth} MiB (limit {args.max_rss_growth_mb})")
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
