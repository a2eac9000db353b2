"""Run one benchmark contender as a child process and report its own resources.

    python bench/measure_child.py --result R.json --fsync-dir OUT [--stdout F --stderr F] -- CMD ...

Runs CMD, waits for it, then fsyncs every file below OUT (and the directories), so the
timed span is "command + its output durably on disk" for every contender alike.
Writes a JSON object to R.json:

    rc, wall_s (command + fsync), cmd_s (command only), fsync_s,
    ru_maxrss_bytes (kernel high-water mark of the largest waited-for descendant),
    user_s, sys_s (CPU time of the command's process tree)

This wrapper is itself a small Python process; RUSAGE_CHILDREN covers only what it
waited for, so its own interpreter is never counted.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def fsync_tree(root: str) -> int:
    n = 0
    if not os.path.isdir(root):
        return 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                n += 1
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return n


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--result", required=True)
    ap.add_argument("--fsync-dir", default=None)
    ap.add_argument("--stdout", default=None)
    ap.add_argument("--stderr", default=None)
    ap.add_argument("--timeout", type=float, default=None)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    out = open(a.stdout, "wb") if a.stdout else subprocess.DEVNULL
    err = open(a.stderr, "wb") if a.stderr else subprocess.DEVNULL
    timed_out = False
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=out, stderr=err)
    try:
        rc = p.wait(timeout=a.timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        p.kill()
        rc = p.wait()
    t1 = time.perf_counter()
    nfiles = fsync_tree(a.fsync_dir) if (a.fsync_dir and rc == 0) else 0
    t2 = time.perf_counter()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = {
        "cmd": cmd,
        "rc": rc,
        "timed_out": timed_out,
        "wall_s": t2 - t0,
        "cmd_s": t1 - t0,
        "fsync_s": t2 - t1,
        "fsynced_files": nfiles,
        "ru_maxrss_bytes": ru.ru_maxrss * 1024,  # Linux reports KiB
        "user_s": ru.ru_utime,
        "sys_s": ru.ru_stime,
    }
    with open(a.result, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
