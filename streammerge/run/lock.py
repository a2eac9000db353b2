"""One merge per output folder at a time: a `flock` on OUT, and the pid of its holder for the message."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ..errors import OutputError
from .journal import PID_FILE, state_dir

try:
    import fcntl
except ImportError:  # not POSIX: no folder lock
    fcntl = None


class OutputLock:
    """Exclusive use of an output folder: a non-blocking `flock` on the folder itself.

    The lock lives on the directory (not on a file inside it) so that clearing the folder for
    --overwrite or removing the state folder at the end never lets a second merge in.
    """

    def __init__(self, out: Path):
        self.out = Path(out)
        self._fd = -1
        if fcntl is None:
            return
        self._fd = os.open(self.out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            self._fd = -1
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return  # a filesystem without locks (some network mounts): run unprotected, as before
            pid = self.holder()
            who = f"another streammerge merge (pid {pid})" if pid else "another streammerge merge"
            raise OutputError(
                f"{who} is writing --out {self.out}; wait for it to finish or stop it "
                "(one merge per output folder at a time)"
            ) from None

    def holder(self) -> int | None:
        try:
            return int((state_dir(self.out) / PID_FILE).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def note_pid(self) -> None:
        """Record our pid (for the other merge's error message); the state folder must exist."""
        path = state_dir(self.out) / PID_FILE
        path.write_text(f"{os.getpid()}\n")

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = -1

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
