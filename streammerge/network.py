"""No network but ours: while streammerge works, a dependency cannot open a connection of its own.

bitsandbytes asks the `kernels` package for a Hub kernel when it is imported on some CPUs, and
transformers or peft may look things up on the Hub as a convenience. A merge must make only the
Hub requests streammerge documents (io/hub.py). So while `guarded()` is active, a Python audit hook
looks at every `socket.connect` and `socket.getaddrinfo` and asks who wants it: the nearest caller
on the stack that is not part of an HTTP stack (the standard library's sockets and HTTP,
httpx/httpcore, urllib3/requests, huggingface_hub, ...). Only streammerge may ask; any other
requester gets `NetworkBlocked` (a ConnectionRefusedError, which libraries treat as "offline"),
and the attempt is logged on `streammerge.network` (shown with --debug).

Connections are checked when they open; huggingface_hub's shared client, which keeps them open
across requests, is also asked before every request once streammerge has used it (`watch_client`).
A thread whose stack holds only HTTP code (a pool huggingface_hub starts for an upload we asked
for) is served while one of streammerge's Hub calls is in progress (`ours()`), and refused otherwise.
Audit hooks cannot be removed, so the hook is installed once and does nothing outside `guarded()`.
"""

from __future__ import annotations

import logging
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

_EVENTS = frozenset({"socket.connect", "socket.getaddrinfo"})
# top-level packages that carry a request for someone else: never the requester themselves
TRANSPORT = frozenset({
    "socket", "ssl", "http", "urllib", "email", "selectors", "asyncio", "concurrent", "threading", "queue",
    "contextlib", "functools", "encodings", "importlib", "runpy", "_weakrefset", "typing", "json",
    "httpx", "httpx2", "httpcore", "httpcore2", "h11", "h2", "hpack", "anyio", "sniffio", "certifi", "idna",
    "urllib3", "requests", "huggingface_hub", "hf_xet", "tqdm", "filelock", "fsspec",
})
OURS = "streammerge"

log = logging.getLogger("streammerge.network")


class NetworkBlocked(ConnectionRefusedError):
    """A dependency tried to reach the network during a streammerge run."""


class _State:
    def __init__(self):
        self.lock = threading.Lock()
        self.guards = 0  # active guarded() scopes (nested calls, threads)
        self.our_calls = 0  # streammerge Hub calls in progress
        self.installed = False
        self.blocked: list[str] = []  # requester modules refused, for reports and tests
        self.allowed: dict[str, int] = {}  # packages the user asked to talk to (--ray: Ray), while active


_state = _State()


def _requester(frame) -> str | None:
    """Module name of the nearest frame outside the HTTP stack, or None when there is none."""
    while frame is not None:
        name = frame.f_globals.get("__name__", "") or ""
        if name.partition(".")[0] not in TRANSPORT and name != __name__:
            return name
        frame = frame.f_back
    return None


def _refuse_unless_ours(frame, target: object) -> None:
    if not _state.guards:
        return
    who = _requester(frame)
    if who is None:
        if _state.our_calls:
            return
        who = "a thread of an HTTP library"
    elif who == OURS or who.startswith(OURS + ".") or _state.allowed.get(who.partition(".")[0]):
        return
    _state.blocked.append(who)
    log.warning("blocked a network request of %s to %s: streammerge makes only its own Hub requests", who, target)
    raise NetworkBlocked(f"network access by {who} is blocked during a streammerge run")


def _hook(event: str, args: tuple) -> None:
    if event in _EVENTS and _state.guards:
        _refuse_unless_ours(sys._getframe(1), args[1] if event == "socket.connect" else args[:2])


def _request_hook(request) -> None:
    """huggingface_hub's shared client keeps connections open: a request over one opened for us
    makes no new connection, so the client asks too, before each request."""
    _refuse_unless_ours(sys._getframe(1), getattr(request, "url", "?"))


def watch_client(client) -> None:
    """Have an httpx-style client (huggingface_hub's shared session) ask before every request."""
    hooks = client.event_hooks.get("request", [])
    if _request_hook not in hooks:
        client.event_hooks = {**client.event_hooks, "request": [*hooks, _request_hook]}


@contextmanager
def guarded() -> Iterator[None]:
    """Refuse connections that streammerge did not ask for, for the duration."""
    with _state.lock:
        if not _state.installed:
            sys.addaudithook(_hook)
            _state.installed = True
        _state.guards += 1
    try:
        yield
    finally:
        with _state.lock:
            _state.guards -= 1


@contextmanager
def ours() -> Iterator[None]:
    """Mark a Hub call of streammerge's own, so the HTTP library's helper threads may serve it."""
    with _state.lock:
        _state.our_calls += 1
    try:
        yield
    finally:
        with _state.lock:
            _state.our_calls -= 1


@contextmanager
def allowing(package: str) -> Iterator[None]:
    """Let `package` open connections for the duration: the engine the user named (`--ray`
    ADDRESS), which talks to its own cluster."""
    with _state.lock:
        _state.allowed[package] = _state.allowed.get(package, 0) + 1
    try:
        yield
    finally:
        with _state.lock:
            _state.allowed[package] -= 1


def blocked() -> list[str]:
    """The requesters refused so far in this process (most recent last)."""
    return list(_state.blocked)
