"""The terminal is ours: while the CLI runs, whatever a dependency writes to stderr goes elsewhere.

transformers, peft, bitsandbytes, kernels and huggingface_hub speak through three channels:
logging records, `warnings.warn` and progress bars (tqdm) written to `sys.stderr`. Their wording
changes with every release, so no filter for particular messages can keep an error to one line.
Instead `dependency_output()` routes all three, whatever they say:

* `sys.stderr` becomes a stream that hands every line to the *sink*; streammerge's own lines
  (errors, warnings, progress bars, summaries) go to `terminal()`, the real stderr.
* logging: one handler on the root logger sends every record to the sink, and handlers that a
  library attached to the real stderr before the switch are pointed at the routed stream.
* warnings: ours (`StreamMergeWarning`) become one `warning: ...` line on the terminal; any other
  goes to the sink.

The sink is the terminal itself with `--debug` (everything shown, as the libraries wrote it) and a
small in-memory tail otherwise (`DependencyOutput.tail`, for a report or a test).
"""

from __future__ import annotations

import collections
import io
import logging
import sys
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator, TextIO

_terminal: TextIO | None = None  # the real stderr while dependency_output() is active
TAIL_LINES = 200


def terminal() -> TextIO:
    """Where streammerge's own stderr lines go: the real stderr, even while it is routed."""
    return _terminal if _terminal is not None else sys.stderr


def say_warning(message: str) -> None:
    print(f"warning: {message.removeprefix('WARNING: ')}", file=terminal(), flush=True)


class _RoutedStream(io.TextIOBase):
    """A text stream that hands what is written to a function, whole lines at a time."""

    def __init__(self, sink: "DependencyOutput"):
        self._sink = sink
        self._pending = ""

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:  # progress bars of libraries draw as into a file
        return False

    def write(self, text: str) -> int:
        if self._sink.debug:  # shown as the library wrote it, bars redrawn in place
            terminal().write(text)
            return len(text)
        self._pending += text
        *lines, self._pending = self._pending.replace("\r", "\n").split("\n")
        for line in lines:
            if line.strip():
                self._sink(line)
        return len(text)

    def flush(self) -> None:
        if self._sink.debug:
            terminal().flush()
        if self._pending.strip():
            self._sink(self._pending)
        self._pending = ""


class _RecordHandler(logging.Handler):
    def __init__(self, sink: Callable[[str], None]):
        super().__init__(logging.NOTSET)
        self._sink = sink
        self.setFormatter(logging.Formatter("[%(name)s] %(levelname)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            for line in self.format(record).splitlines():
                self._sink(line)
        except Exception:  # a record that cannot be formatted is not worth a traceback
            pass


class DependencyOutput:
    """What dependencies wrote while routed: shown on the terminal (`debug`) or kept as a tail."""

    def __init__(self, debug: bool):
        self.debug = debug
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

    def __call__(self, line: str) -> None:
        self.tail.append(line)
        if self.debug:
            print(line, file=terminal(), flush=True)


@contextmanager
def dependency_output(debug: bool = False) -> Iterator[DependencyOutput]:
    """Route dependencies' stderr, logging and warnings away from the terminal (see the module doc)."""
    global _terminal
    from .errors import StreamMergeWarning

    sink = DependencyOutput(debug)
    real = sys.stderr
    routed = _RoutedStream(sink)
    root = logging.getLogger()
    handler = _RecordHandler(sink)
    old_level = root.level
    repointed = _repoint_handlers(real, routed)
    _terminal, sys.stderr = real, routed
    root.addHandler(handler)
    root.setLevel(logging.INFO if debug else logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("always", StreamMergeWarning)

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, StreamMergeWarning):
                say_warning(str(message))
            else:
                sink(f"[{filename}:{lineno}] {category.__name__}: {message}")

        warnings.showwarning = show
        try:
            yield sink
        finally:
            routed.flush()
            root.removeHandler(handler)
            root.setLevel(old_level)
            for h in repointed:
                h.setStream(real)
            sys.stderr, _terminal = real, None


def _repoint_handlers(real: TextIO, routed: TextIO) -> list[logging.StreamHandler]:
    """Stream handlers already writing to the real stderr (a library configured its logger before
    the switch): point them at the routed stream for the duration."""
    loggers = [logging.getLogger()] + [v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger)]
    found = []
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) and h.stream is real:
                h.setStream(routed)
                found.append(h)
    return found
