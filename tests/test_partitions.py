"""Partitions of one plan (--partition I/N, finalize) and their runs on Ray: every output byte equal
to a one-process merge, whatever the order, kills or nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT

from streammerge.errors import OptionError
from streammerge.run.partitions import Partition, assign

SHARD = "10KB"  # the tiny llama in several shards
GGUF_OPTS = ("--method", "gguf", "--gguf-type", "q8_0")


def _weights(folder: Path) -> dict[str, bytes]:
    """Every file but streammerge.json (which records the partitioning): the model as loaders see it."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != "streammerge.json"}


@pytest.fixture(scope="module")
def case(make_base, make_adapter):
    base = make_base("llama", dtype=torch.bfloat16)
    return base, make_adapter(base).adapter_path


@pytest.fixture(scope="module")
def gguf_case(make_base, make_adapter):
    base = make_base("llama", dtype=torch.bfloat16, tokenizer="bpe-llama3")
    return base, make_adapter(base).adapter_path


def _whole(run_cli, base, adapter, out: Path, *opts) -> dict[str, bytes]:
    res = run_cli("merge", base, adapter, "--out", out, "--max-shard-size", SHARD, "--quiet", *opts)
    assert res.returncode == 0, res.stderr
    return _weights(out)


# ------------------------------------------------------------------------------- the assignment


def test_assignment_is_balanced_deterministic_and_total():
    sizes = [5, 9, 1, 7, 3, 3, 8, 2]
    owner = assign(sizes, 3)
    assert owner == assign(sizes, 3) and len(owner) == len(sizes)
    loads = [sum(s for s, o in zip(sizes, owner) if o == p) for p in range(3)]
    assert sum(loads) == sum(sizes) and max(loads) - min(loads) <= max(sizes)
    assert loads == [13, 13, 12]  # largest first to the least loaded: 9|8|7, 5->2, 3->1, 3->0, 2->1, 1->0
    assert set(assign([4, 4], 5)) == {0, 1}  # more partitions than shards: some write nothing


@pytest.mark.parametrize("text", ["3/3", "-1/2", "1", "a/b", "0/0", "1/2/3"])
def test_partition_argument_errors(text):
    with pytest.raises(OptionError, match="--partition"):
        Partition.parse(text)


def test_plan_shows_each_partition(run_cli, case):
    base, adapter = case
    res = run_cli("plan", base, adapter, "--max-shard-size", SHARD, "--partitions", "3")
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if line.strip().startswith(("0/3", "1/3", "2/3"))]
    assert len(lines) == 3 and all("shard(s)" in line and "s at" in line for line in lines)
    res = run_cli("plan", base, adapter, "--max-shard-size", SHARD, "--partitions", "3", "--json")
    parts = json.loads(res.stdout)["partitions"]
    shards = [s for p in parts for s in p["shards"]]
    assert len(shards) == len(set(shards)) == len(json.loads(res.stdout)["shards"])
    assert sum(p["bytes"] for p in parts) == sum(s["size"] for s in json.loads(res.stdout)["shards"])


# ------------------------------------------------------------------------ by hand, then finalize


@pytest.mark.parametrize("opts", [(), ("--method", "merged_4bit"), GGUF_OPTS], ids=["16bit", "4bit", "gguf"])
def test_partitions_in_any_order_then_finalize_equal_one_merge(run_cli, case, gguf_case, tmp_path, opts):
    base, adapter = gguf_case if opts == GGUF_OPTS else case
    want = _whole(run_cli, base, adapter, tmp_path / "whole", *opts)
    out = tmp_path / "parts"
    for i in (2, 0, 1):
        res = run_cli("merge", base, adapter, "--out", out, "--max-shard-size", SHARD, "--partition", f"{i}/3", *opts)
        assert res.returncode == 0, res.stderr
        assert f"partition {i}/3" in res.stdout
        if i != 1:  # not complete before finalize: no index, no record
            assert not (out / "streammerge.json").exists() and not (out / "model.safetensors.index.json").exists()
    assert "every partition is done" in res.stdout
    res = run_cli("finalize", out)
    assert res.returncode == 0, res.stderr
    assert _weights(out) == want
    record = json.loads((out / "streammerge.json").read_text())
    assert record["partitions"] == 3 and not (out / ".streammerge").exists()
    assert all(s["sha256"] and s["size"] == (out / s["filename"]).stat().st_size for s in record.get("shards", record.get("files")))
    again = run_cli("finalize", out)
    assert again.returncode == 0 and "already complete" in again.stdout


def test_finalize_names_the_partitions_left_and_refuses_mismatches(run_cli, case, tmp_path):
    base, adapter = case
    out = tmp_path / "parts"
    ok = run_cli("merge", base, adapter, "--out", out, "--max-shard-size", SHARD, "--partition", "1/3")
    assert ok.returncode == 0 and "still to run: 0/3, 2/3" in ok.stdout
    res = run_cli("finalize", out)
    assert res.returncode != 0 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert "partition(s) 0/3, 2/3" in res.stderr and "not finished" in res.stderr
    # another N, other options, or a whole merge into the same OUT: refused, nothing touched
    before = _weights(out)
    for extra, words in ((("--partition", "0/2"), "partitions 3 -> 2"),
                         (("--partition", "0/3", "--dtype", "float16"), "--dtype"),
                         ((), "split in 3 partitions")):
        res = run_cli("merge", base, adapter, "--out", out, "--max-shard-size", SHARD, *extra)
        assert res.returncode != 0 and words in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert _weights(out) == before
    # the merge line given to finalize must be the partitions' own
    res = run_cli("finalize", base, adapter, "--out", out, "--max-shard-size", "20KB")
    assert res.returncode != 0 and "max-shard-size" in res.stderr
    for i in (0, 2):
        assert run_cli("merge", base, adapter, "--out", out, "--max-shard-size", SHARD, "--partition", f"{i}/3").returncode == 0
    res = run_cli("finalize", base, adapter, "--out", out, "--max-shard-size", SHARD)
    assert res.returncode == 0, res.stderr


def test_finalize_catches_a_damaged_shard(run_cli, case, tmp_path):
    base, adapter = case
    out = tmp_path / "parts"
    for i in range(2):
        assert run_cli("merge", base, adapter, "--out", out, "--max-shard-size", SHARD, "--partition", f"{i}/2").returncode == 0
    victim = sorted(out.glob("model-*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:-1])
    res = run_cli("finalize", out)
    assert res.returncode != 0 and victim.name in res.stderr and "re-run partition" in res.stderr
    assert not (out / "model.safetensors.index.json").exists()


def test_one_partition_runs_once_at_a_time(run_cli, case, tmp_path):
    from streammerge.run.lock import OutputLock, PartitionLock

    base, adapter = case
    out = tmp_path / "parts"
    out.mkdir()
    with OutputLock(out, shared=True), PartitionLock(out, Partition(1, 2)):
        res = run_cli("merge", base, adapter, "--out", out, "--max-shard-size", SHARD, "--partition", "1/2")
        assert res.returncode != 0 and "partition 1/2" in res.stderr and "already running" in res.stderr
        other = run_cli("merge", base, adapter, "--out", out, "--max-shard-size", SHARD, "--partition", "0/2")
        assert other.returncode == 0, other.stderr  # the other partition runs beside it
        whole = run_cli("finalize", out)
        assert whole.returncode != 0 and "another streammerge merge" in whole.stderr
    with pytest.raises(OptionError, match="--overwrite"):
        from streammerge import merge

        merge(base, adapter, out, partition="0/2", overwrite=True)


def test_one_writer_per_shard(tmp_path):
    from streammerge.errors import OutputError
    from streammerge.formats.safetensors import ShardWriter

    first = ShardWriter(tmp_path / "model-00001-of-00002.safetensors", b"x" * 8, 16)
    with pytest.raises(OutputError, match="one writer per shard"):
        ShardWriter(tmp_path / "model-00001-of-00002.safetensors", b"x" * 8, 16)
    first.close()
    ShardWriter(tmp_path / "model-00001-of-00002.safetensors", b"x" * 8, 16).close()


_KILLER = textwrap.dedent("""
    import os, sys
    from streammerge import merge
    done = [0]
    def on_tensor(name):
        done[0] += 1
        if done[0] == 3:
            os.kill(os.getpid(), 9)
    merge(sys.argv[1], sys.argv[2], sys.argv[3], partition=sys.argv[4], max_shard_size=sys.argv[5],
          on_tensor=on_tensor, **dict(a.split("=", 1) for a in sys.argv[6:]))
""")


def test_a_killed_partition_resumes(run_cli, case, tmp_path):
    base, adapter = case
    want = _whole(run_cli, base, adapter, tmp_path / "whole", "--method", "merged_4bit")
    out = tmp_path / "parts"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    killed = subprocess.run([sys.executable, "-c", _KILLER, base, adapter, out, "0/2", SHARD, "method=merged_4bit"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    journal = out / ".streammerge" / "partition-00000-of-00002.jsonl"
    assert sum(1 for line in journal.read_text().splitlines() if '"tensor"' in line) >= 3
    for i in (1, 0):
        res = run_cli("merge", base, adapter, "--out", out, "--max-shard-size", SHARD, "--partition", f"{i}/2",
                      "--method", "merged_4bit")
        assert res.returncode == 0, res.stderr
    assert "resumed: 3/" in res.stdout
    assert run_cli("finalize", out).returncode == 0
    assert _weights(out) == want


# ----------------------------------------------------------------------------------------- Ray


try:
    import ray
except ImportError:  # the test extra installs it; without it only the Ray tests are skipped
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="the Ray tests need the test extra (ray)")


def _ray_init(**kw):
    import logging

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(logging_level=logging.ERROR, log_to_driver=False, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}}, **kw)


@needs_ray
def test_ray_local_two_partitions_with_a_killed_worker(run_cli, case, tmp_path):
    from streammerge.cluster import merge_on_ray
    from streammerge.errors import ExecutionError

    base, adapter = case
    want = _whole(run_cli, base, adapter, tmp_path / "whole")
    want4 = _whole(run_cli, base, adapter, tmp_path / "whole4", "--method", "merged_4bit")
    marker = tmp_path / "killed.txt"
    _ray_init(num_cpus=2)
    try:
        result = merge_on_ray(base, adapter, tmp_path / "ray", partitions=2, max_shard_size=SHARD,
                              _fault={"partition": "1/2", "after": 2, "marker": str(marker)})
        assert marker.exists(), "the fault was never injected"  # the worker died mid-shard...
        killed = [t for t in result.tasks if t["partition"] == "1/2"][0]
        assert killed["resumed_tensors"] >= 2  # ...and Ray's retry resumed from its journal
        assert _weights(tmp_path / "ray") == want
        # no retries left: the run fails naming the partition; the same call then resumes and finishes
        marker4 = tmp_path / "killed4.txt"
        with pytest.raises(ExecutionError, match=r"partition 0/2 failed after 0 retries"):
            merge_on_ray(base, adapter, tmp_path / "ray4", partitions=2, max_shard_size=SHARD, method="merged_4bit",
                         retries=0, _fault={"partition": "0/2", "after": 3, "marker": str(marker4)})
        assert not (tmp_path / "ray4" / "streammerge.json").exists()
        again = merge_on_ray(base, adapter, tmp_path / "ray4", partitions=2, max_shard_size=SHARD, method="merged_4bit")
        assert sum(t["resumed_tensors"] for t in again.tasks) >= 3
    finally:
        ray.shutdown()
    assert _weights(tmp_path / "ray4") == want4


@needs_ray
def test_ray_two_node_cluster_gguf(run_cli, gguf_case, tmp_path):
    import logging

    from ray.cluster_utils import Cluster

    from streammerge.cluster import merge_on_ray

    base, adapter = gguf_case
    want = _whole(run_cli, base, adapter, tmp_path / "whole", *GGUF_OPTS)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address=cluster.address, logging_level=logging.ERROR, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        merge_on_ray(base, adapter, tmp_path / "ray", max_shard_size=SHARD, method="gguf", gguf_type="q8_0")
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert _weights(tmp_path / "ray") == want
    record = json.loads((tmp_path / "ray" / "streammerge.json").read_text())
    assert record["partitions"] == 2  # one per node


def test_ray_missing_says_how_to_install(monkeypatch, case, tmp_path):
    import builtins

    from streammerge.cluster import merge_on_ray

    real = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray":
            raise ImportError("no ray")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(OptionError, match=r"pip install 'streammerge\[ray\]'"):
        merge_on_ray(*case, tmp_path / "out")
