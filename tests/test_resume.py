"""Crash safety: kill a real `python -m streammerge merge` at chosen moments, re-run, compare bytes.

The oracle is an uninterrupted run of the same command: every resumed output folder must be
byte-identical to it, file for file. Kill moments are reached without slowing the product down:
the test polls the output folder (journal lines, shard names), and when the moment is there it
SIGSTOPs the merge, checks the moment again on the frozen folder, and only then SIGKILLs it, so
what the test asserts about the interrupted folder is exactly what the kill left.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import streammerge
from streammerge import api
from streammerge.run import disk as space
from streammerge.run import journal as jr
from streammerge.errors import DiskFullError, OutputError

from conftest import REPO_ROOT

INDEX = "model.safetensors.index.json"
RECORD = "streammerge.json"
MODEL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, vocab_size=2048)
SHARDED = ("--max-shard-size", "1500KB", "--max-chunk-rows", "1")
OPTS = dict(max_shard_size="1500KB", max_chunk_rows=1)  # the in-process spelling of SHARDED
FAST = dict(max_shard_size="1500KB")  # the same output bytes, without the row-at-a-time pace kills need


# ------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def case(make_base, make_adapter):
    base = make_base("llama", **MODEL)
    return base, make_adapter(base).adapter_path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


# The index is written within milliseconds of the last shard's rename; a merge whose write_index
# first waits 0.3 s keeps that moment open long enough to be caught (the product is unchanged).
SLOW_INDEX = (
    "import sys, time; import streammerge.output_folder as folder; write = folder.write_index; "
    "folder.write_index = lambda *a, **k: (time.sleep(0.3), write(*a, **k))[1]; "
    "from streammerge.cli import entry; entry()"
)


def start(base, adapter, out, *extra, slow_index: bool = False) -> subprocess.Popen:
    program = ["-c", SLOW_INDEX] if slow_index else ["-m", "streammerge"]
    cmd = [sys.executable, *program, "merge", str(base), str(adapter), "--out", str(out), *map(str, extra)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=str(REPO_ROOT))


def merge(base, adapter, out, *extra, timeout=300) -> subprocess.CompletedProcess:
    proc = start(base, adapter, out, *extra)
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones included), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_output(out: Path, reference: dict[str, bytes]) -> None:
    """Byte-identical files; streammerge.json may differ only in the budget options the last run used
    (--max-memory, --max-chunk-rows: they do not change a bit of the output)."""
    ours, ref = files(out), dict(reference)
    record, ref_record = json.loads(ours.pop(RECORD)), json.loads(ref.pop(RECORD))
    assert ours == ref
    for key in ("max_memory", "max_chunk_rows"):
        del record["options"][key], ref_record["options"][key]
    assert record == ref_record


def journal_counts(out: Path, kind: str = "tensor") -> dict[str, int]:
    """Journaled tensors (or shard commits) per shard, as the journal file holds them right now."""
    counts: dict[str, int] = {}
    for rec in jr.read_records(out / ".streammerge" / "journal.jsonl"):
        if rec["t"] == kind:
            counts[rec["shard"]] = counts.get(rec["shard"], 0) + 1
    return counts


def snapshot(out: Path) -> dict:
    names = set(os.listdir(out)) if out.is_dir() else set()
    counts = journal_counts(out) if ".streammerge" in names else {}
    committed = set(journal_counts(out, "shard")) if ".streammerge" in names else set()
    return {"names": names, "journal": counts, "tensors": sum(counts.values()), "committed": committed}


def kill_when(proc: subprocess.Popen, out: Path, moment, *, sig=signal.SIGKILL, timeout=120) -> dict | None:
    """Poll until `moment(snapshot)` holds, freeze the process, re-check on the frozen folder, then
    send `sig`. Returns the snapshot the signal was sent on, or None if the merge ended first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if moment(snapshot(out)):
            os.kill(proc.pid, signal.SIGSTOP)
            frozen = snapshot(out)
            if moment(frozen):
                if sig == signal.SIGKILL:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.communicate(timeout=60)
                else:  # a catchable signal: it must be delivered to a running process
                    os.kill(proc.pid, sig)
                    os.kill(proc.pid, signal.SIGCONT)
                return frozen
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.001)
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=60)
    return None


def assert_interrupted_folder_is_not_a_model(out: Path, frozen: dict, reference: dict[str, bytes]) -> None:
    """Nothing in an interrupted folder looks finished unless it is: no index; every shard under
    its final name is complete (byte-identical to the reference); the state folder is there."""
    assert INDEX not in frozen["names"], "an interrupted folder has an index"
    assert ".streammerge" in frozen["names"]
    for name in frozen["names"]:
        if name.endswith(".safetensors"):
            assert name != "model.safetensors" or INDEX in reference, "a single-shard output was renamed before its end"
            assert (out / name).read_bytes() == reference[name], f"{name} has its final name but is not complete"


# --------------------------------------------------------------------------------- the fixtures


@pytest.fixture(scope="module")
def plan_shards(case):
    base, adapter = case
    plan = streammerge.plan(base, [adapter], max_shard_size="1500KB", max_chunk_rows=1)
    return [(s.filename, len(s.tensors)) for s in plan.shards]


@pytest.fixture(scope="module")
def reference(case, tmp_path_factory):
    base, adapter = case
    out = tmp_path_factory.mktemp("ref") / "out"
    res = merge(base, adapter, out, *SHARDED, "--quiet")
    assert res.returncode == 0, res.stderr
    ref = files(out)
    # completing a merge leaves the model files and streammerge.json, nothing temporary
    assert not [n for n in ref if n.startswith(".") or n.endswith((".partial", ".tmp"))], sorted(ref)
    assert INDEX in ref and RECORD in ref and "config.json" in ref and "tokenizer.json" in ref
    return ref


# ------------------------------------------------------------------------------------ SIGKILL


def _moments(shards):
    names = [n for n, _ in shards]
    sizes = dict(shards)

    def first_record(s):
        return s["tensors"] >= 1

    def mid_shard(s):  # the 3rd shard or later, some but not all of its tensors done
        return any(0 < s["journal"].get(n, 0) < sizes[n] and n + ".partial" in s["names"] for n in names[2:])

    def between_shards(s):  # a shard renamed, the next one has no tensor yet
        return any(a in s["names"] and s["journal"].get(b, 0) == 0 for a, b in zip(names[1:-1], names[2:]))

    def finishing(s):  # every shard written, streammerge.json there, the index not yet
        return RECORD in s["names"] and names[-1] in s["names"] and INDEX not in s["names"]

    return {"first_record": first_record, "mid_shard": mid_shard, "between_shards": between_shards,
            "during_index_writing": finishing}


@pytest.mark.parametrize("moment", ["first_record", "mid_shard", "between_shards", "during_index_writing"])
def test_sigkill_at_any_moment_resumes_byte_identical(case, plan_shards, reference, tmp_path, moment):
    base, adapter = case
    assert len(plan_shards) >= 5, plan_shards
    out = tmp_path / "out"
    total = sum(n for _, n in plan_shards)
    for attempt in range(6):  # a short window can be missed on a busy machine; try again
        shutil.rmtree(out, ignore_errors=True)
        proc = start(base, adapter, out, *SHARDED, "--quiet", slow_index=moment == "during_index_writing")
        frozen = kill_when(proc, out, _moments(plan_shards)[moment])
        if frozen is not None:
            break
    assert frozen is not None, f"never caught the moment {moment!r}"
    assert_interrupted_folder_is_not_a_model(out, frozen, reference)
    if moment != "during_index_writing":
        assert RECORD not in frozen["names"]

    res = merge(base, adapter, out, *SHARDED)
    assert res.returncode == 0, res.stderr
    done = int(res.stdout.split("resumed: ")[1].split("/")[0])
    assert f"/{total} tensors already done" in res.stdout
    assert done >= frozen["tensors"]  # everything journaled before the kill was kept, not redone
    if moment == "during_index_writing":
        assert done == total
    assert files(out) == reference


def test_single_shard_output_is_never_named_before_it_is_finished(case, tmp_path):
    """With one shard there is no index: the shard's final name is what makes the folder a model,
    so it appears last. Killed once the shard is written and committed in the journal but before
    streammerge.json, the folder holds only `model.safetensors.partial`."""
    base, adapter = case
    ref_out, out = tmp_path / "ref", tmp_path / "out"
    streammerge.merge(base, [adapter], ref_out)  # row chunking does not change a bit of the output
    reference = files(ref_out)
    assert set(reference) >= {"model.safetensors", RECORD} and INDEX not in reference
    total = len(streammerge.plan(base, [adapter]).tensors)

    def written_not_recorded(s):
        return "model.safetensors" in s["committed"] and RECORD not in s["names"]

    for attempt in range(6):
        shutil.rmtree(out, ignore_errors=True)
        frozen = kill_when(start(base, adapter, out, "--max-chunk-rows", "1", "--quiet"), out, written_not_recorded)
        if frozen is not None:
            break
    assert frozen is not None, "never caught the moment between the shard's commit and streammerge.json"
    assert frozen["tensors"] == total
    assert "model.safetensors" not in frozen["names"] and "model.safetensors.partial" in frozen["names"]
    result = streammerge.merge(base, [adapter], out)
    assert result.resumed_tensors == total
    assert_same_output(out, reference)


def test_resume_verifies_what_the_journal_claims(case, plan_shards, reference, tmp_path):
    """The journal is checked against the bytes: a damaged tensor in the partial shard, a damaged
    finished shard and a torn last journal line are all redone, and the result is still identical."""
    base, adapter = case
    out = tmp_path / "out"
    names = [n for n, _ in plan_shards]
    sizes = dict(plan_shards)

    def moment(s):  # two shards finished, the partial one has at least two tensors journaled
        return names[1] in s["names"] and any(2 <= s["journal"].get(n, 0) < sizes[n] for n in names[2:])

    frozen = kill_when(start(base, adapter, out, *SHARDED, "--quiet"), out, moment)
    assert frozen is not None
    partial_name = next(n for n in names[2:] if 2 <= frozen["journal"].get(n, 0) < sizes[n])
    records = jr.read_records(out / ".streammerge" / "journal.jsonl")
    second = [r for r in records if r["t"] == "tensor" and r["shard"] == partial_name][1]
    with open(out / (partial_name + ".partial"), "r+b") as fh:  # flip a byte of its 2nd tensor
        fh.seek(second["start"] + 5)
        byte = fh.read(1)
        fh.seek(second["start"] + 5)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with open(out / names[0], "r+b") as fh:  # and one of the first, finished shard
        fh.seek(-3, os.SEEK_END)
        fh.write(b"\x00\x01\x02")
    with open(out / ".streammerge" / "journal.jsonl", "ab") as fh:  # a record torn by the kill
        fh.write(b'{"t":"tensor","shard":"')

    plan = streammerge.plan(base, [adapter], **OPTS)  # `plan --out` counts committed shards as done
    checkpoint = api.open_base(base)
    left = api.disk_need(plan, checkpoint, [api.load_adapter(adapter, 1.0)], out)
    committed = sum(s.size for s in plan.shards if s.filename in frozen["names"])
    assert committed > 0
    assert left.to_write <= plan.file_bytes - committed + api.small_files_bytes(checkpoint, checkpoint.other_files())

    lines: list[str] = []
    result = streammerge.merge(base, [adapter], out, report=lines.append, **OPTS)
    kept_in_partial = 1  # the first tensor of the partial shard verifies, the damaged second does not
    expected = sum(frozen["journal"].get(n, 0) for n in names[1:names.index(partial_name)]) + kept_in_partial
    assert result.resumed_tensors == expected, (result.resumed_tensors, expected, frozen["journal"])
    assert lines and lines[0].startswith(f"resumed: {expected}/{sum(sizes.values())} tensors already done")
    assert files(out) == reference


# ---------------------------------------------------------------------------- SIGINT / SIGTERM


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_promptly_and_resumes(case, plan_shards, reference, tmp_path, sig):
    base, adapter = case
    out = tmp_path / "out"
    total = sum(n for _, n in plan_shards)
    proc = start(base, adapter, out, *SHARDED, "--quiet")
    frozen = kill_when(proc, out, lambda s: s["tensors"] >= 3, sig=sig)
    assert frozen is not None
    sent = time.monotonic()
    _, stderr = proc.communicate(timeout=300)
    elapsed = time.monotonic() - sent
    assert elapsed < 5, f"took {elapsed:.1f} s to stop"
    assert proc.returncode == 128 + sig, (proc.returncode, stderr)
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: interrupted by {sig.name}"), stderr
    assert "re-run the same command to resume" in lines[0] and "Traceback" not in stderr
    # it stopped: not every tensor was written, nothing looks finished, the journal is readable
    names = set(os.listdir(out))
    assert INDEX not in names and RECORD not in names and ".streammerge" in names
    left = journal_counts(out)
    assert frozen["tensors"] <= sum(left.values()) < total
    # the budget may change on resume (chunking does not change a bit of the output)
    res = merge(base, adapter, out, "--max-shard-size", "1500KB", "--max-chunk-rows", "7", "--max-memory", "64MB")
    assert res.returncode == 0, res.stderr
    assert f"resumed: {sum(left.values())}/{total} tensors already done" in res.stdout
    assert_same_output(out, reference)


# ------------------------------------------------------------------------ refusing and starting over




def test_changed_inputs_refuse_and_overwrite_starts_over(case, make_adapter, make_base, tmp_path):
    base, adapter = case
    other = make_adapter(make_base("llama", **MODEL), seed=7).adapter_path
    lora = tmp_path / "lora"
    shutil.copytree(adapter, lora)
    out = tmp_path / "out"
    assert kill_when(start(base, lora, out, *SHARDED, "--quiet"), out, lambda s: s["tensors"] >= 3) is not None
    state_before = files(out / ".streammerge")

    with pytest.raises(OutputError, match=r"--dtype \(default\) -> bfloat16.*--overwrite"):
        streammerge.merge(base, [lora], out, dtype="bfloat16", **FAST)

    shutil.copyfile(other / "adapter_model.safetensors", lora / "adapter_model.safetensors")
    res = merge(base, lora, out, *SHARDED)
    assert res.returncode != 0 and res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.stderr
    assert "adapter 1" in res.stderr and "adapter_model.safetensors differs" in res.stderr and "--overwrite" in res.stderr
    assert files(out / ".streammerge") == state_before  # a refused resume touches nothing

    result = streammerge.merge(base, [lora], out, overwrite=True, **FAST)
    assert result.resumed_tensors == 0 and not result.already_complete
    fresh = tmp_path / "fresh"
    streammerge.merge(base, [lora], fresh, **FAST)
    assert files(out) == files(fresh)
    digest = json.loads((out / RECORD).read_text())["fingerprint"]["adapters"][0]["files"]["adapter_model.safetensors"]
    assert digest == hashlib.sha256((other / "adapter_model.safetensors").read_bytes()).hexdigest()


def test_finished_output_rerun_is_already_complete(case, tmp_path):
    base, adapter = case
    out = tmp_path / "out"
    streammerge.merge(base, [adapter], out, max_shard_size="3MB")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    res = merge(base, adapter, out, "--max-shard-size", "3MB")
    assert res.returncode == 0 and "already complete" in res.stdout, res.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing rewritten
    sorted(out.glob("model-*.safetensors"))[0].unlink()
    with pytest.raises(OutputError, match="--overwrite"):
        streammerge.merge(base, [adapter], out, max_shard_size="3MB")


# ------------------------------------------------------------------------------------------- lock


def test_second_merge_on_the_same_folder_is_refused(case, reference, tmp_path):
    base, adapter = case
    out = tmp_path / "out"
    first = start(base, adapter, out, *SHARDED, "--quiet")
    deadline = time.monotonic() + 120
    while snapshot(out)["tensors"] < 2 and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.001)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = merge(base, adapter, out, *SHARDED)
        assert second.returncode != 0
        assert f"another streammerge merge (pid {first.pid}) is writing --out" in second.stderr, second.stderr
        with pytest.raises(OutputError, match=f"pid {first.pid}"):  # not even with --overwrite
            streammerge.merge(base, [adapter], out, overwrite=True, **FAST)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    first.communicate(timeout=300)
    assert first.returncode == 0
    assert files(out) == reference


# ------------------------------------------------------------------------------------------- disk


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return res.returncode == 0


def _fill(path: Path) -> None:
    """Write zeros until the filesystem is full."""
    block = b"\0" * (64 << 10)
    with open(path, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    with open(path.with_name(path.name + "2"), "wb", buffering=0) as fh:  # the last partial block
        try:
            while True:
                fh.write(b"\0" * 512)
        except OSError:
            pass


def test_disk_full_on_a_small_filesystem_then_resume(case, reference, tmp_path):
    base, adapter = case
    mnt = tmp_path / "mnt"
    if not _mount_tmpfs(mnt, "32m"):
        pytest.skip("cannot mount a tmpfs here (needs root); the injected-ENOSPC test covers this path")
    try:
        out = mnt / "out"
        proc = start(base, adapter, out, *SHARDED, "--quiet")
        deadline = time.monotonic() + 120
        while snapshot(out)["tensors"] < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.0005)
        os.kill(proc.pid, signal.SIGSTOP)
        _fill(mnt / "filler")  # another program fills the disk while the merge runs
        os.kill(proc.pid, signal.SIGCONT)
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode != 0
        lines = [l for l in stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: no space left on the device of --out"), stderr
        assert "re-run the same command to resume" in lines[0]
        assert INDEX not in os.listdir(out)
        kept = sum(journal_counts(out).values())
        assert kept >= 3

        with pytest.raises(OutputError, match=r"not enough disk space .*to write.* free [0-9.]+ (B|KB)"):
            streammerge.merge(base, [adapter], out, **FAST)  # still full: refused up front, with the figures

        (mnt / "filler").unlink()
        (mnt / "filler2").unlink()
        res = merge(base, adapter, out, *SHARDED)
        assert res.returncode == 0, res.stderr
        assert int(res.stdout.split("resumed: ")[1].split("/")[0]) >= kept
        assert files(out) == reference
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_injected_enospc_is_a_clean_error_and_resumes(case, reference, tmp_path, monkeypatch):
    """The same path without a small filesystem: `os.pwrite` fails with ENOSPC after a while."""
    base, adapter = case
    out = tmp_path / "out"
    real_pwrite = os.pwrite
    calls = {"n": 0}

    def full_disk(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 6000:  # of ~13k row writes: a few shards in
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_disk)
    with pytest.raises(DiskFullError, match="re-run the same command to resume") as info:
        streammerge.merge(base, [adapter], out, **OPTS)
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    assert "No space left on device" in str(info.value)
    assert INDEX not in os.listdir(out) and RECORD not in os.listdir(out)
    kept = sum(journal_counts(out).values())
    assert kept > 0

    lines = []
    result = streammerge.merge(base, [adapter], out, report=lines.append, **OPTS)
    assert result.resumed_tensors >= kept and result.resumed_line() in lines[0]
    assert files(out) == reference


def test_disk_check_counts_what_remains(case, tmp_path, monkeypatch):
    base, adapter = case
    plan = streammerge.plan(base, [adapter], max_shard_size="1500KB")
    total, largest = plan.file_bytes, max(s.size for s in plan.shards)
    need = space.disk_need(plan, tmp_path / "nowhere" / "out")
    assert need.to_write == total and need.headroom == largest and need.where == tmp_path

    class Usage:
        free = total  # enough for the shards, not for the headroom on top
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(OutputError, match="not enough disk space") as info:
        streammerge.merge(base, [adapter], tmp_path / "out", max_shard_size="1500KB")
    assert "to write" in str(info.value) and "headroom" in str(info.value)
    assert not (tmp_path / "out" / ".streammerge").exists()  # refused before anything was written

    half = {s.filename for s in plan.shards[: len(plan.shards) // 2]}
    assert space.disk_need(plan, tmp_path / "out", finished=half).to_write == total - sum(
        s.size for s in plan.shards if s.filename in half)


def test_verify_names_an_interrupted_folder(case, tmp_path):
    """verify on a folder whose merge was killed says so (and how to finish it), rather than listing
    every tensor as missing."""
    from streammerge.errors import InputError

    base, adapter = case
    out = tmp_path / "out"
    assert kill_when(start(base, adapter, out, *SHARDED, "--quiet"), out, lambda s: s["tensors"] >= 2) is not None
    with pytest.raises(InputError, match="interrupted merge.*run the same merge command again"):
        streammerge.verify(out, base, [adapter], **FAST)


# ------------------------------------------------------------------------- GGUF, the same machinery


GGUF_SPLIT = ("--method", "gguf", "--gguf-type", "q8_0", "--max-shard-size", "600KB", "--max-chunk-rows", "1")


@pytest.fixture(scope="module")
def gguf_case(make_base, make_adapter):
    base = make_base("llama", tokenizer="bpe-llama3", **MODEL)
    return base, make_adapter(base).adapter_path


@pytest.fixture(scope="module")
def gguf_reference(gguf_case, tmp_path_factory):
    pytest.importorskip("gguf")
    base, adapter = gguf_case
    out = tmp_path_factory.mktemp("gguf-ref") / "out"
    res = merge(base, adapter, out, *GGUF_SPLIT, "--quiet")
    assert res.returncode == 0, res.stderr
    ref = files(out)
    names = sorted(n for n in ref if n.endswith(".gguf"))
    assert len(names) >= 4, names  # split as llama.cpp splits: NAME-0000i-of-0000N.gguf
    assert not [n for n in ref if n.startswith(".") or n.endswith((".partial", ".tmp"))], sorted(ref)
    return ref, names


@pytest.mark.parametrize("moment", ["first_record", "mid_file", "between_files", "last_file"])
def test_gguf_sigkill_at_any_moment_resumes_byte_identical(gguf_case, gguf_reference, tmp_path, moment):
    """A GGUF merge is journaled and resumed exactly as a safetensors one: killed at several moments,
    re-run, the folder equals the uninterrupted run's, file for file."""
    reference, names = gguf_reference
    base, adapter = gguf_case
    moments = {
        "first_record": lambda s: s["tensors"] >= 1,
        "mid_file": lambda s: any(0 < s["journal"].get(n, 0) and n + ".partial" in s["names"] for n in names[1:-1]),
        "between_files": lambda s: any(a in s["names"] and s["journal"].get(b, 0) == 0 for a, b in zip(names[:-1], names[1:])),
        "last_file": lambda s: s["journal"].get(names[-1], 0) > 0,
    }
    out = tmp_path / "out"
    for attempt in range(6):
        shutil.rmtree(out, ignore_errors=True)
        frozen = kill_when(start(base, adapter, out, *GGUF_SPLIT, "--quiet"), out, moments[moment])
        if frozen is not None:
            break
    assert frozen is not None, f"never caught the moment {moment!r}"
    assert ".streammerge" in frozen["names"] and RECORD not in frozen["names"]
    for name in frozen["names"]:  # a file under its final name is complete
        if name.endswith(".gguf"):
            assert (out / name).read_bytes() == reference[name], f"{name} has its final name but is not complete"
    res = merge(base, adapter, out, *GGUF_SPLIT)
    assert res.returncode == 0, res.stderr
    done = int(res.stdout.split("resumed: ")[1].split("/")[0])
    assert done >= frozen["tensors"]  # everything journaled before the kill was kept, not redone
    ours, ref = files(out), dict(reference)
    record, ref_record = json.loads(ours.pop(RECORD)), json.loads(ref.pop(RECORD))
    assert ours == ref
    assert record["files"] == ref_record["files"]


def test_k_quant_gguf_killed_mid_file_resumes_byte_identical(gguf_case, tmp_path):
    """A Q4_K_M file (the K-quant codecs, llama-quantize's tensor order) resumes like every other."""
    base, adapter = gguf_case
    opts = ("--method", "gguf", "--gguf-type", "q4_k_m", "--max-chunk-rows", "8")
    reference = tmp_path / "ref"
    res = merge(base, adapter, reference, *opts, "--quiet")
    assert res.returncode == 0, res.stderr
    (name,) = [n for n in files(reference) if n.endswith(".gguf")]
    out = tmp_path / "out"
    for attempt in range(6):
        shutil.rmtree(out, ignore_errors=True)
        frozen = kill_when(start(base, adapter, out, *opts, "--quiet"), out, lambda s: s["tensors"] >= 3)
        if frozen is not None:
            break
    assert frozen is not None and name not in frozen["names"]
    res = merge(base, adapter, out, *opts)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.split("resumed: ")[1].split("/")[0]) >= frozen["tensors"]
    assert (out / name).read_bytes() == (reference / name).read_bytes()
