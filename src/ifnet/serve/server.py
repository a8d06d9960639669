"""Binding the listening socket and running uvicorn: shared by ``ifnet serve``, the tests and the load test."""

from __future__ import annotations

import errno
import ipaddress
import socket
from typing import Any

from ifnet.errors import IFNetError

#: Host header values accepted when the server listens on loopback (DNS-rebinding guard).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost: could resolve anywhere
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free port chosen by the OS).

    Listening starts here, before the model is loaded, so a busy port is reported at once and the
    first browser connections wait in the backlog instead of being refused.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise IFNetError(f"--host {host!r}: cannot resolve ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        hint = ("another server on that port? choose another --port, or --port 0 for any free one"
                if e.errno in (errno.EADDRINUSE, errno.EACCES) else
                "is --host an address of this machine? 127.0.0.1 for this machine only, 0.0.0.0 for every interface")
        raise IFNetError(f"cannot listen on {host}:{port}: {e.strerror} ({hint})") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_for(sock: socket.socket) -> str:
    """The address to open in a browser; an all-interfaces bind is shown as loopback."""
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


#: Seconds the requests in flight get to finish after SIGINT/SIGTERM (a slow upload is cut off then).
GRACEFUL_SHUTDOWN_S = 30


def run_server(app: Any, sock: socket.socket, *, limit_concurrency: int, log_level: str = "info") -> None:
    """Serve ``app`` on ``sock`` until SIGINT/SIGTERM (uvicorn, one process, one event loop)."""
    import uvicorn

    # On SIGINT/SIGTERM, requests in flight get GRACEFUL_SHUTDOWN_S to finish; then the server exits anyway.
    config = uvicorn.Config(app, log_level=log_level, limit_concurrency=limit_concurrency,
                            timeout_keep_alive=5, server_header=False, lifespan="on",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    uvicorn.Server(config).run(sockets=[sock])
