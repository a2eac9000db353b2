"""One merge per output folder at a time: a `flock` on OUT, and the pid of its holder for the message.

Partitions of one merge (run/partitions.py) share OUT: each holds OUT's lock shared (so a whole
merge or `finalize` cannot start meanwhile) and its own partition's lock exclusively (so the same
partition never runs twice at once, and since partitions own disjoint shards, no shard is ever
written by two processes)."""

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

    def __init__(self, out: Path, *, shared: bool = False):
        self.out = Path(out)
        self._fd = -1
        if fcntl is None:
            return
        self._fd = os.open(self.out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(self._fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            self._fd = -1
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return  # a filesystem without locks (some network mounts): run unprotected, as before
            pid = self.holder()
            if shared:
                who = f"a whole merge or finalize (pid {pid})" if pid else "a whole merge or finalize"
                raise OutputError(f"{who} is using --out {self.out}; a partition cannot run beside it") from None
            who = f"another streammerge merge (pid {pid})" if pid else "another streammerge merge"
            raise OutputError(
                f"{who} is writing --out {self.out}; wait for it to finish or stop it "
                "(one merge per output folder at a time; partitions of one merge may run together)"
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


class PartitionLock:
    """Exclusive use of one partition of OUT: a `flock` on its lock file in the state folder, which
    names the holder (host and pid) for the message."""

    def __init__(self, out: Path, partition):
        self.path = state_dir(out) / (partition.stem + ".lock")
        self._fd = -1
        self.path.parent.mkdir(exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return
            holder = os.pread(self._fd, 200, 0).decode(errors="replace").strip()
            os.close(self._fd)
            self._fd = -1
            raise OutputError(
                f"partition {partition.label} of --out {out} is already running ({holder or 'another process'}); "
                "each partition runs once at a time"
            ) from None
        import socket

        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "PartitionLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
