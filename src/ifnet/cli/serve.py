"""`ifnet serve --checkpoint CKPT [--host 127.0.0.1] [--port 8000]`: the web page and REST API.

The model is loaded once, before the server accepts a request. Binds loopback unless told otherwise:
the server has no authentication, so listening on other interfaces is a deliberate choice.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ifnet.errors import UsageError

HELP = "web page and REST API for a checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="checkpoint folder (e.g. runs/iu/best), or an `ifnet export` folder, served with ONNX "
                             "Runtime (its default variant: int8 if exported with --int8)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (default 127.0.0.1, this machine only; 0.0.0.0: every "
                             "interface, with no authentication)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    parser.add_argument("--variant", choices=("fp32", "int8"),
                        help="for an `ifnet export` folder: the fp32 or int8 model (default: the folder's default)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--workers", type=int, default=1,
                        help="reports generated at the same time, sharing the one loaded model (default 1)")
    parser.add_argument("--queue-size", type=int, default=8,
                        help="requests that may wait for a worker; more get 503 with Retry-After (default 8)")
    parser.add_argument("--max-upload-mb", type=float, default=64,
                        help="largest upload, both images together, in MB; larger gets 413 (default 64)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads per worker, torch's or ONNX Runtime's (default: CPU cores / workers)")
    parser.add_argument("--beam-size", type=int, help="beam width (default: the training config's)")
    parser.add_argument("--max-len", type=int, help="maximum report length in tokens")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="server log level (info logs one line per request)")


def _check(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be 0..65535, got {args.port}")
    if args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    if args.queue_size < 0:
        raise UsageError(f"--queue-size must be 0 or more, got {args.queue_size}")
    if not args.max_upload_mb > 0:
        raise UsageError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    for flag in ("beam_size", "max_len"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")


def run(args: argparse.Namespace) -> int:
    _check(args)
    import torch

    from ifnet.inference import open_predictor
    from ifnet.serve.app import create_app, warm_up
    from ifnet.serve.limits import ServeLimits
    from ifnet.serve.server import LOOPBACK_HOSTS, bind, is_loopback, run_server, url_for

    limits = ServeLimits(max_upload_bytes=max(1024, int(args.max_upload_mb * 2 ** 20)), workers=args.workers,
                         queue_size=args.queue_size)
    loopback = is_loopback(args.host)
    if not loopback:
        print(f"ifnet serve: warning: listening on {args.host}, reachable from other machines. The server has no "
              "authentication and no TLS: do not expose it to a network you do not trust, and do not send "
              "identifiable patient images over one.", file=sys.stderr)
    sock = bind(args.host, args.port)  # a busy port fails now, not after loading the model
    # Workers share the CPU: each gets its slice of the cores instead of all of them fighting.
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    torch.set_num_threads(threads)
    predictor = open_predictor(args.checkpoint, device=args.device, beam_size=args.beam_size, max_len=args.max_len,
                               threads=threads, variant=args.variant)
    warm_up(predictor, limits)
    app = create_app(predictor, limits, allowed_hosts=LOOPBACK_HOSTS if loopback else None)
    url = url_for(sock)
    print(f"ifnet serve: {args.checkpoint} loaded ({predictor.describe()['runtime']}) on {predictor.device}; "
          f"{args.workers} worker(s), "
          f"queue {args.queue_size}, uploads up to {args.max_upload_mb:g} MB", flush=True)
    print(f"ifnet serve: open {url}  (API: POST {url}v1/reports, schema: {url}openapi.json; Ctrl+C stops)",
          flush=True)
    # Connections beyond the queue and a margin for the page and /healthz get uvicorn's 503.
    run_server(app, sock, limit_concurrency=limits.workers + limits.queue_size + 32, log_level=args.log_level)
    return 0
