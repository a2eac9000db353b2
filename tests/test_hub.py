"""Hub in and out (issue 6), against a fake Hub on 127.0.0.1 that this module starts.

Every process that talks to the "Hub" is a subprocess whose environment points huggingface_hub at
the fake server (HF_ENDPOINT), a fresh HF_HOME, a fake token, and dead proxies for any other host,
so nothing can reach a real network address. The oracle for merged bytes is streammerge's merge of
the same base as a local folder (itself held to PEFT by test_merge_oracle.py) plus PEFT's own
merge_and_unload for the live-model API.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, load_safetensors_dir, max_ulp_diff
from fakehub import FakeHub

FAKE_TOKEN = "hf_streammergeFakeToken0123456789"
SHARD_LIMIT = "40KB"  # the tiny llama base is saved in 4 shards


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def hub_case(make_base, make_adapter):
    base = make_base("llama", max_shard_size=SHARD_LIMIT)
    case = make_adapter(base)
    shards = sorted(p.name for p in base.glob("model-*.safetensors"))
    assert len(shards) == 4, shards
    return case


@pytest.fixture(scope="module")
def fake_hub(hub_case):
    hub = FakeHub().start()
    hub.add_folder("org/base", hub_case.base_path)
    hub.add_folder("org/lora", hub_case.adapter_path)
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def local_merge(hub_case, tmp_path_factory):
    """The same merge from the local folders: what every Hub merge must reproduce byte for byte."""
    import streammerge

    out = tmp_path_factory.mktemp("local") / "merged"
    streammerge.merge(str(hub_case.base_path), [str(hub_case.adapter_path)], str(out), device="cpu")
    return out


def hub_env(hub: FakeHub, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING")) and "proxy" not in k.lower()}
    dead = "http://127.0.0.1:9"  # any request not for the fake Hub goes to a closed port, never out
    env.update({f"{k}_proxy": dead for k in ("http", "https", "all")} | {"no_proxy": "127.0.0.1,localhost"})
    env.update(
        HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0",
        HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="10",
        HF_HUB_DISABLE_PROGRESS_BARS="1", HF_TOKEN=FAKE_TOKEN,
        HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", ALL_PROXY="http://127.0.0.1:9",
        NO_PROXY="127.0.0.1,localhost", PYTHONPATH=str(REPO_ROOT), TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    return env


def cli(env: dict, *args, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streammerge", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=str(REPO_ROOT))


def worker(env: dict, scenario: str, **args) -> dict:
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "hub_worker.py"), scenario, json.dumps(args)],
                          env=env, capture_output=True, text=True, timeout=240, cwd=str(REPO_ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shard_gets(hub: FakeHub, repo: str = "org/base") -> list[dict]:
    return [r for r in hub.requests("GET", f"/{repo}/resolve/") if Path(r["path"]).name.startswith("model-")]


def no_token_in(paths, texts, token=FAKE_TOKEN) -> None:
    for text in texts:
        assert token not in text
    for root in paths:
        for p in Path(root).rglob("*"):
            if p.is_file():
                assert token.encode() not in p.read_bytes(), p


# ------------------------------------------------------------------------------- unit level


def test_hub_ids_and_local_paths(tmp_path, monkeypatch):
    from streammerge.hub.client import HubRef, hub_origin, parse_hub_id

    monkeypatch.chdir(tmp_path)
    assert parse_hub_id("org/name") == HubRef("org/name", None)
    assert parse_hub_id("meta-llama/Llama-3.1-8B@v1.0") == HubRef("meta-llama/Llama-3.1-8B", "v1.0")
    assert parse_hub_id("org/name@" + "a" * 40) == HubRef("org/name", "a" * 40)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert parse_hub_id("org/name") is None  # an existing local folder always wins
    assert parse_hub_id("org/other") == HubRef("org/other", None)
    assert parse_hub_id("./org/other") is None
    for local in ("./a/b", "/abs/path", "~/x/y", "single", "a/b/c", "a--b/c", "a/b@", "x\\y/z"):
        assert parse_hub_id(local) is None, local
    cache_snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / ("c" * 40)
    assert hub_origin(cache_snapshot) == {"repo_id": "org/name", "commit": "c" * 40}
    assert hub_origin(tmp_path) is None


def test_prefetcher_one_ahead_evicts_after_last_read(tmp_path):
    """The reader's order of files, the fetches and the evictions, with the disk checked at every fetch."""
    from streammerge.hub.fetch import Prefetcher

    files = [str(tmp_path / f"s{i}") for i in range(5)]
    (tmp_path / "s2").write_bytes(b"cached")  # already present: used in place, never fetched or evicted
    held_at_fetch = []

    def fetch(path: Path) -> None:
        held_at_fetch.append(sorted(p.name for p in tmp_path.iterdir() if p.name != "s2"))
        path.write_bytes(b"x")

    def evict(path: Path) -> None:
        path.unlink()

    reads = [files[0], files[0], files[1], files[0], files[2], files[3], files[3], files[4]]  # s0 is read again late
    pf = Prefetcher(fetch, evict, low_disk=True)
    pf.begin(reads)
    last = {f: i for i, f in enumerate(reads)}
    cancelled = threading.Event()
    for i, f in enumerate(reads):
        pf.acquire(f, cancelled)
        assert Path(f).exists()
        if last[f] == i:
            pf.release(f)
    pf.end()
    assert [Path(f).name for f in pf.fetched] == ["s0", "s1", "s3", "s4"]
    assert [Path(f).name for f in pf.evicted] == ["s1", "s0", "s3", "s4"]
    assert (tmp_path / "s2").exists() and not any((tmp_path / n).exists() for n in ("s0", "s1", "s3", "s4"))
    assert max(len(h) for h in held_at_fetch) == 1  # a fetch starts with at most one other downloaded file on disk


def test_prefetcher_hands_fetch_errors_to_the_reader(tmp_path):
    from streammerge.errors import ExecutionError
    from streammerge.hub.fetch import Prefetcher

    def fetch(path: Path) -> None:
        if path.name == "b":
            raise ExecutionError("downloading b failed: network down")
        path.write_bytes(b"x")

    pf = Prefetcher(fetch, lambda p: p.unlink(), low_disk=True)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    pf.begin([a, b])
    cancelled = threading.Event()
    pf.acquire(a, cancelled)
    with pytest.raises(ExecutionError, match="network down"):
        pf.acquire(b, cancelled)
    pf.end()
    assert not (tmp_path / "a").exists()  # --low-disk: a failed run leaves no downloaded shard behind


def test_disk_estimate_matches_its_definition():
    from streammerge.hub.fetch import estimate_disk

    files = ["a", "a", "b", "c", "c", "d"]
    sizes = {"a": 100, "b": 120, "c": 90, "d": 110}
    kept = estimate_disk(files, [0, 0, 0, 1, 1, 1], [300, 200], sizes, set(sizes), low_disk=False)
    assert kept.peak == 500 + 420 and kept.downloads == 420 and kept.peak_output == 500  # nothing evicted: output + all
    low = estimate_disk(files, [0, 0, 0, 1, 1, 1], [300, 200], sizes, set(sizes), low_disk=True)
    assert low.peak_input <= 2 * max(sizes.values()) and low.peak <= 500 + 2 * 120
    streamed = estimate_disk(files, [0, 0, 0, 1, 1, 1], [300, 200], sizes, {"b"}, low_disk=True, streaming_push=True)
    assert streamed.downloads == 120 and streamed.cached == 300 and streamed.output == 0


# ------------------------------------------------------------------------------- with the fake Hub


def test_plan_reads_only_header_ranges(fake_hub, hub_case, tmp_path):
    fake_hub.log.clear()
    shards = sorted(p for p in hub_case.base_path.glob("model-*.safetensors"))
    fake_hub.cut_range_once[shards[0].name] = 100  # a connection dropped during a header read is retried
    env = hub_env(fake_hub, tmp_path / "hf")
    proc = cli(env, "plan", "org/base", "org/lora", "--low-disk")
    assert proc.returncode == 0, proc.stderr
    sizes = [p.stat().st_size for p in shards]
    gets = shard_gets(fake_hub)
    dropped = [r for r in gets if "cut_at" in r]
    assert len(dropped) == 1 and Path(dropped[0]["path"]).name == shards[0].name and dropped[0]["cut_at"] == 100
    gets = [r for r in gets if "cut_at" not in r]
    assert sorted(Path(r["path"]).name for r in gets) == [p.name for p in shards]  # one request per shard ...
    assert all(r["range"] == "bytes=0-99999" and r["status"] == 206 for r in gets)  # ... a header range, never the file
    assert not fake_hub.requests("HEAD", "/model-")
    assert not list((tmp_path / "hf").rglob("model-*.safetensors"))  # no shard in the cache
    assert all(r["authorization"] == f"Bearer {FAKE_TOKEN}" for r in gets)  # the token from HF_TOKEN is used ...
    no_token_in([tmp_path / "hf"], [proc.stdout, proc.stderr])  # ... and never shown or stored

    out_line = next(line for line in proc.stdout.splitlines() if line.startswith("  model.safetensors"))
    assert "base:       org/base@" in proc.stdout and "peak disk:" in proc.stdout
    # The same plan as from the local folder: every tensor, op, dtype and output offset.
    import streammerge

    local = streammerge.plan(str(hub_case.base_path), [str(hub_case.adapter_path)], device="cpu")
    json_proc = cli(env, "plan", "org/base", "org/lora", "--json")
    remote = json.loads(json_proc.stdout)
    flatten = lambda shards: [(t["name"], t["op"], t["dtype"], t["start"], t["end"], Path(t["source"]["file"]).name,
                               t["source"]["start"]) for s in shards for t in s["tensors"]]
    assert flatten(remote["shards"]) == flatten(local.to_dict()["shards"])
    assert out_line.startswith(f"  model.safetensors: {len(local.tensors)} tensors")
    # peak disk with --low-disk: the output plus at most two input shards
    from streammerge.options import format_size

    peak_line = next(line for line in proc.stdout.splitlines() if line.startswith("peak disk:"))
    peak_text = peak_line.split("peak disk:")[1].split("(")[0].strip()
    assert peak_text in {format_size(n) for n in range(local.file_bytes, local.file_bytes + 2 * max(sizes) + 1)}


def test_low_disk_merge_keeps_two_shards_and_survives_a_dropped_connection(fake_hub, hub_case, local_merge, tmp_path):
    """Executor with a fake-Hub base: cache checked after every tensor; one download cut halfway."""
    fake_hub.log.clear()
    shards = sorted(hub_case.base_path.glob("model-*.safetensors"))
    cut_file = shards[1].name
    cut_at = shards[1].stat().st_size // 2
    fake_hub.cut_once[cut_file] = cut_at
    env = hub_env(fake_hub, tmp_path / "hf")
    res = worker(env, "low_disk_executor", out=str(tmp_path / "out"), max_shard_size="5GB", precache=[shards[2].name],
                 chunk_size=4096)

    sizes = res["shard_sizes"]
    biggest = max(sizes.values())
    # disk: never more than two downloaded input shards at once, and within the plan's estimate
    growth = [s["cache_growth"] for s in res["samples"]]
    assert len(growth) == len(json.loads((hub_case.base_path / "model.safetensors.index.json").read_text())["weight_map"])
    assert max(growth) <= 2 * biggest, growth
    assert max(s["cache_growth"] + s["out"] for s in res["samples"]) <= res["estimate"]["peak"]
    assert res["estimate"]["peak_input"] <= 2 * biggest
    assert all(len(set(s["present"]) - {shards[2].name}) <= 2 for s in res["samples"])
    # every shard downloaded once (the pre-cached one by the "earlier run" only): it is used in place
    # and kept, the others are evicted
    full_gets = [Path(r["path"]).name for r in shard_gets(fake_hub) if r["range"] is None]
    assert sorted(full_gets) == [p.name for p in shards]
    assert res["cached_at_plan"] == [shards[2].name]
    assert sorted(res["fetched"]) == sorted(res["evicted"]) == sorted(p.name for p in shards if p != shards[2])
    assert res["present_after"] == [shards[2].name]
    assert res["blobs_after"] <= res["baseline"]  # nothing downloaded stays behind
    # the dropped connection was resumed with a Range request from the last whole chunk written
    cut = [r for r in shard_gets(fake_hub) if Path(r["path"]).name == cut_file]
    assert cut[1]["range"] is None and cut[1].get("cut_at") == cut_at  # cut[0] is the plan's header read
    resumed_from = cut_at // 4096 * 4096
    assert [(r["range"], r["status"]) for r in cut[2:]] == [(f"bytes={resumed_from}-", 206)], cut
    # the bytes: identical to the merge from the local folder, and PEFT's merge within float32 rounding
    out = tmp_path / "out"
    assert res["outputs"] == ["model.safetensors"]
    assert sha256(out / "model.safetensors") == sha256(local_merge / "model.safetensors")
    ours = load_safetensors_dir(out)
    for name, ref in hub_case.merged_state_dict.items():
        if name in ours:
            torch.testing.assert_close(ours[name].float(), ref, rtol=0, atol=1e-5)


def test_cli_merge_low_disk_streams_shards_to_the_hub(fake_hub, hub_case, local_merge, tmp_path):
    """merge --low-disk --push-to-hub: each output shard uploaded and deleted as done, index last."""
    fake_hub.log.clear()
    cache_at_get: list[int] = []
    storage = tmp_path / "hf" / "hub" / "models--org--base" / "blobs"
    fake_hub.on_get = lambda name: cache_at_get.append(
        sum(p.stat().st_size for p in storage.glob("*") if len(p.name) == 64) if name.startswith("model-") else -1)
    env = hub_env(fake_hub, tmp_path / "hf")
    local_sharded = tmp_path / "local-sharded"
    import streammerge

    streammerge.merge(str(hub_case.base_path), [str(hub_case.adapter_path)], str(local_sharded), device="cpu",
                      max_shard_size="60KB")
    try:
        proc = cli(env, "merge", "org/base", "org/lora", "--out", tmp_path / "out", "--low-disk",
                   "--max-shard-size", "60KB", "--push-to-hub", "me/merged", "--private")
    finally:
        fake_hub.on_get = None
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    names = sorted(p.name for p in local_sharded.glob("model-*.safetensors"))
    assert len(names) >= 2
    pushed = fake_hub.files("me/merged")
    for name in names:  # the pushed shards are the local merge's bytes; none is left in OUT
        assert hashlib.sha256(pushed[name]).hexdigest() == sha256(local_sharded / name)
        assert not (out / name).exists()
    assert json.loads(pushed["model.safetensors.index.json"]) == json.loads((local_sharded / "model.safetensors.index.json").read_text())
    assert pushed["config.json"] == (local_sharded / "config.json").read_bytes()
    # one commit per shard, then the rest with the index: the repo is complete only at the end
    commits = [r for r in fake_hub.requests("POST", "/api/models/me/merged/commit/")]
    assert [c["committed"] for c in commits[:-1]] == [[n] for n in names]
    assert "model.safetensors.index.json" in commits[-1]["committed"] and "README.md" in commits[-1]["committed"]
    assert fake_hub.repos["me/merged"].private
    # model card: base_model metadata the Hub reads
    from huggingface_hub import ModelCard

    card = ModelCard(pushed["README.md"].decode())
    assert card.data.base_model == ["org/base", "org/lora"]
    assert card.data.base_model_relation == "merge"
    record = json.loads(pushed["streammerge.json"])
    assert record["base"]["hub"]["repo_id"] == "org/base" and len(record["base"]["hub"]["commit"]) == 40
    assert record["push"] == {"repo_id": "me/merged", "revision": "main", "shards_removed_locally": True}
    assert [s["sha256"] for s in record["shards"]] == [sha256(local_sharded / n) for n in names]
    # input disk when each base shard download started: at most one other downloaded shard present
    biggest = max(p.stat().st_size for p in hub_case.base_path.glob("model-*.safetensors"))
    small = sum(p.stat().st_size for p in hub_case.base_path.iterdir() if not p.name.startswith("model-"))
    at_get = [c - small for c in cache_at_get if c >= 0]
    assert len(at_get) == 4 and min(at_get) == 0 and max(at_get) <= biggest, at_get
    assert sum(p.stat().st_size for p in storage.iterdir()) == small  # only config/tokenizer/index remain
    # the token authenticated every request and appears nowhere else
    assert all(r["authorization"] == f"Bearer {FAKE_TOKEN}" for r in fake_hub.requests())
    no_token_in([out], [proc.stdout, proc.stderr] + [v.decode(errors="replace") for v in pushed.values()])


def test_push_folder_to_a_branch_from_a_local_base(fake_hub, hub_case, local_merge, tmp_path):
    fake_hub.log.clear()
    env = hub_env(fake_hub, tmp_path / "hf")
    proc = cli(env, "merge", hub_case.base_path, hub_case.adapter_path, "--out", tmp_path / "out",
               "--push-to-hub", "me/branchy", "--revision", "dev", "--quiet")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    dev, main = fake_hub.files("me/branchy", "dev"), fake_hub.files("me/branchy", "main")
    local_files = sorted(p.name for p in out.iterdir())
    assert sorted(set(dev) - {".gitattributes"}) == local_files  # everything in OUT, README included
    for name in local_files:
        assert dev[name] == (out / name).read_bytes()
    assert dev["model.safetensors"] == (local_merge / "model.safetensors").read_bytes()
    assert set(main) == {".gitattributes"}  # main untouched
    from huggingface_hub import ModelCard

    card = ModelCard(dev["README.md"].decode())
    assert card.data.base_model is None  # a local base has no Hub id to point to
    assert "(local)" in card.text


def test_offline_mode_uses_the_cache_and_names_what_is_missing(fake_hub, hub_case, local_merge, tmp_path):
    home = tmp_path / "hf"
    online = hub_env(fake_hub, home)
    offline = hub_env(fake_hub, home, HF_HUB_OFFLINE="1")
    # nothing cached yet
    proc = cli(offline, "plan", "org/base", "org/lora")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "org/base" in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr and "Traceback" not in proc.stderr
    # an online merge without --low-disk leaves the shards in the cache ...
    proc = cli(online, "merge", "org/base", "org/lora", "--out", tmp_path / "online")
    assert proc.returncode == 0, proc.stderr
    assert len(list(home.rglob("snapshots/*/model-*.safetensors"))) == 4
    # ... so an offline merge needs no request at all and writes the same bytes
    fake_hub.log.clear()
    proc = cli(offline, "merge", "org/base", "org/lora", "--out", tmp_path / "offline")
    assert proc.returncode == 0, proc.stderr
    assert fake_hub.log == []
    assert sha256(tmp_path / "offline" / "model.safetensors") == sha256(local_merge / "model.safetensors")
    # one shard gone from the cache: offline mode names it
    victim = sorted(home.rglob("snapshots/*/model-00003-of-00004.safetensors"))[0]
    victim.resolve().unlink()
    victim.unlink()
    proc = cli(offline, "plan", "org/base", "org/lora")
    assert proc.returncode == 2 and "model-00003-of-00004.safetensors" in proc.stderr and "offline" in proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


def test_hub_errors_are_one_line(fake_hub, hub_case, tmp_path):
    env = hub_env(fake_hub, tmp_path / "hf")
    cases = [
        (("plan", "org/missing", "org/lora"), "no local folder of that name, and no such repository"),
        (("plan", "org/base@nope", "org/lora"), "revision does not exist"),
        (("plan", "org/lora", "org/lora"), "has no model.safetensors"),
        (("plan", "org/base", "org/base"), "no adapter_config.json"),
        (("merge", "org/base", "org/lora", "--out", tmp_path / "x", "--private"), "--push-to-hub"),
        (("merge", "org/base", "org/lora", "--out", tmp_path / "x", "--push-to-hub", "not a repo"), "not a valid repo id"),
    ]
    for args, needle in cases:
        proc = cli(env, *args)
        assert proc.returncode != 0, args
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert needle in proc.stderr, (args, proc.stderr)
        assert FAKE_TOKEN not in proc.stderr
    assert not (tmp_path / "x").exists()


def test_save_merged_live_peft_model_local_base(hub_case, tmp_path):
    """Two active adapters on a live PeftModel: the output equals PEFT's merge; the model is untouched."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    import streammerge

    model = AutoModelForCausalLM.from_pretrained(str(hub_case.base_path), dtype=torch.float32)
    torch.manual_seed(3)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], init_lora_weights=False))
    peft_model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, use_rslora=True, target_modules=["up_proj", "q_proj"],
                                                init_lora_weights=False))
    peft_model.base_model.set_adapter(["default", "second"])
    assert peft_model.active_adapters == ["default", "second"]
    before = {k: v.detach().clone() for k, v in peft_model.state_dict().items()}

    result = streammerge.save_merged(peft_model, tmp_path / "out", device="cpu")

    after = peft_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    lora_layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    assert lora_layers and not any(m.merged for m in lora_layers)  # nothing merged into the live model
    oracle = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    ours = load_safetensors_dir(tmp_path / "out")
    assert set(ours) == set(oracle)
    changed = 0
    for name, ref in oracle.items():
        assert max_ulp_diff(ours[name], ref.contiguous()) <= 1, name
        changed += not torch.equal(ref, before["base_model.model." + name] if "base_model.model." + name in before
                                   else before["base_model.model." + name.replace(".weight", ".base_layer.weight")])
    assert changed == 3 * 2  # q_proj (both adapters), o_proj and up_proj, in each of the 2 layers
    assert result.plan.counts()["merge"] == 6 and sum(len(t.loras) for t in result.plan.tensors) == 8
    record = json.loads((tmp_path / "out" / "streammerge.json").read_text())
    assert record["base"]["path"] == str(hub_case.base_path) and len(record["adapters"]) == 2
    assert not Path(record["adapters"][0]["path"]).exists()  # the temporary adapter folder is gone


def test_save_merged_resolves_a_hub_base(fake_hub, hub_case, tmp_path):
    env = hub_env(fake_hub, tmp_path / "hf")
    res = worker(env, "save_merged_hub", local_base=str(hub_case.base_path), out=str(tmp_path / "out"),
                 oracle=str(tmp_path / "oracle.safetensors"))
    assert res["unchanged"]
    assert res["base"]["hub"]["repo_id"] == "org/base"
    from safetensors.torch import load_file

    oracle = load_file(str(tmp_path / "oracle.safetensors"))
    ours = load_safetensors_dir(tmp_path / "out")
    assert set(ours) == set(oracle)
    for name, ref in oracle.items():
        assert max_ulp_diff(ours[name], ref) <= 1, name
    assert not list((tmp_path / "hf").rglob("model-*.safetensors"))  # low_disk: the downloaded base is gone again


def test_resumed_hub_merge_fetches_only_what_remains(fake_hub, hub_case, tmp_path):
    """SIGKILL a --low-disk merge of a Hub base once every tensor of the first base shard is merged
    (so that shard is evicted); the re-run verifies the journaled tensors, downloads only the base
    shards the remaining tensors read and are not on disk, and writes the bytes of an uninterrupted
    merge of the local folder."""
    import signal

    import streammerge
    from streammerge.run import journal as jr
    from test_resume import kill_when

    options = ("--max-shard-size", "60KB", "--max-chunk-rows", "1")
    reference = tmp_path / "reference"
    streammerge.merge(str(hub_case.base_path), [str(hub_case.adapter_path)], str(reference), device="cpu",
                      max_shard_size="60KB")
    plan = streammerge.plan(str(hub_case.base_path), [str(hub_case.adapter_path)], max_shard_size="60KB")
    source = {t.name: Path(t.source.file).name for t in plan.tensors}
    first = sorted(p.name for p in hub_case.base_path.glob("model-*.safetensors"))[0]
    env = hub_env(fake_hub, tmp_path / "hf")
    out = tmp_path / "out"

    def journaled() -> set[str]:
        return {r["name"] for r in jr.read_records(out / ".streammerge" / "journal.jsonl") if r["t"] == "tensor"}

    def moment(snap) -> bool:
        return ".streammerge" in snap["names"] and {n for n, f in source.items() if f == first} <= journaled()

    cmd = [sys.executable, "-m", "streammerge", "merge", "org/base", "org/lora", "--out", str(out), "--low-disk", *options]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO_ROOT))
    assert kill_when(proc, out, moment, sig=signal.SIGKILL) is not None, "the merge ended before the kill"
    assert not (out / "model.safetensors.index.json").exists()
    done = journaled()
    assert 0 < len(done) < len(plan.tensors)
    snapshot = next((tmp_path / "hf" / "hub" / "models--org--base" / "snapshots").iterdir())
    on_disk = {p.name for p in snapshot.glob("model-*.safetensors") if p.exists()}
    needed = {source[n] for n in source if n not in done}
    assert first not in needed and first not in on_disk, "fixture error: the first base shard is still needed or kept"

    fake_hub.log.clear()
    proc = cli(env, "merge", "org/base", "org/lora", "--out", out, "--low-disk", *options)
    assert proc.returncode == 0, proc.stderr
    assert f"resumed: {len(done)}/{len(plan.tensors)} tensors already done" in proc.stdout
    downloaded = sorted(Path(r["path"]).name for r in shard_gets(fake_hub) if r["range"] is None)
    assert downloaded == sorted(needed - on_disk)
    ours = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "streammerge.json"}
    assert ours == {p.name: p.read_bytes() for p in reference.iterdir() if p.name != "streammerge.json"}
    assert not (out / ".streammerge").exists()
    assert [s["sha256"] for s in json.loads((out / "streammerge.json").read_text())["shards"]] == [
        s["sha256"] for s in json.loads((reference / "streammerge.json").read_text())["shards"]]


def test_resumed_streaming_push_keeps_the_shards_already_on_the_hub(fake_hub, hub_case, tmp_path):
    """--low-disk --push-to-hub killed after its first output shard was uploaded (and deleted here):
    the re-run trusts the journal's record of the upload, neither recomputes nor re-uploads that
    shard, and the repo ends up with every shard's bytes and the index."""
    import signal

    import streammerge
    from streammerge.run import journal as jr
    from test_resume import kill_when

    options = ("--max-shard-size", "30KB", "--max-chunk-rows", "1")
    reference = tmp_path / "reference"
    streammerge.merge(str(hub_case.base_path), [str(hub_case.adapter_path)], str(reference), device="cpu",
                      max_shard_size="30KB")
    names = sorted(p.name for p in reference.glob("model-*.safetensors"))
    assert len(names) >= 3
    env = hub_env(fake_hub, tmp_path / "hf")
    out = tmp_path / "out"

    def pushed(snap) -> set[str]:
        if ".streammerge" not in snap["names"]:
            return set()
        return {r["shard"] for r in jr.read_records(out / ".streammerge" / "journal.jsonl") if r["t"] == "pushed"}

    cmd = [sys.executable, "-m", "streammerge", "merge", "org/base", "org/lora", "--out", str(out), "--low-disk",
           "--push-to-hub", "me/resumed", *options]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO_ROOT))
    frozen = kill_when(proc, out, lambda snap: names[0] in pushed(snap) and names[0] not in snap["names"], sig=signal.SIGKILL)
    assert frozen is not None, "the merge ended before the first shard was pushed"
    on_hub = pushed(frozen)
    asked_before = len(fake_hub.requests("POST", "/api/models/me/resumed/preupload/"))

    proc = cli(env, *cmd[3:])
    assert proc.returncode == 0, proc.stderr
    asked = [f for r in fake_hub.requests("POST", "/api/models/me/resumed/preupload/")[asked_before:] for f in r["asked"]]
    assert names[0] in on_hub and not on_hub & set(asked), "a shard already on the Hub was made and offered again"
    assert set(names) - on_hub <= set(asked)
    files = fake_hub.files("me/resumed")
    for name in names:
        assert files[name] == (reference / name).read_bytes(), name
    assert json.loads(files["model.safetensors.index.json"]) == json.loads((reference / "model.safetensors.index.json").read_text())
    record = json.loads((out / "streammerge.json").read_text())
    assert [s["sha256"] for s in record["shards"]] == [sha256(reference / n) for n in names]
    assert not (out / ".streammerge").exists() and not list(out.glob("model-*"))


def test_gguf_from_a_hub_base_low_disk_and_push(fake_hub, make_base, make_adapter, tmp_path):
    """merge --method gguf of a sharded Hub base with --low-disk --push-to-hub: shards fetched one
    ahead and evicted after their last read (never more than two on disk), the GGUF byte for byte
    the one from the same local folder, and OUT pushed with a model card."""
    pytest.importorskip("gguf")
    import shutil

    import streammerge

    base = make_base("llama", dtype=torch.bfloat16, tokenizer="bpe-llama3", tie_word_embeddings=False,
                     max_shard_size="20KB")
    adapter = make_adapter(base).adapter_path
    shards = sorted(p.name for p in base.glob("model-*.safetensors"))
    assert len(shards) >= 3, shards
    repo = "org/gbase"
    fake_hub.add_folder(repo, base)
    fake_hub.add_folder("org/glora", adapter)
    local = tmp_path / "gbase"  # the repo's name: the GGUF's file name and general.name come from it
    shutil.copytree(base, local)
    reference = tmp_path / "reference"
    streammerge.merge(str(local), [str(adapter)], str(reference), method="gguf", gguf_type="q8_0", device="cpu")

    env = hub_env(fake_hub, tmp_path / "hf")
    proc = cli(env, "plan", repo, "org/glora", "--method", "gguf", "--gguf-type", "q8_0", "--low-disk")
    assert proc.returncode == 0, proc.stderr
    assert "download:" in proc.stdout and "evicted once merged (--low-disk)" in proc.stdout and "peak disk:" in proc.stdout

    fake_hub.log.clear()
    storage = tmp_path / "hf" / "hub" / "models--org--gbase" / "blobs"
    cache_at_get: list[int] = []
    fake_hub.on_get = lambda name: cache_at_get.append(
        sum(p.stat().st_size for p in storage.glob("*") if len(p.name) == 64) if name.startswith("model-") else -1)
    try:
        proc = cli(env, "merge", repo, "org/glora", "--out", tmp_path / "out", "--method", "gguf",
                   "--gguf-type", "q8_0", "--low-disk", "--push-to-hub", "me/gguf", "--max-chunk-rows", "3")
    finally:
        fake_hub.on_get = None
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    name = "gbase-Q8_0.gguf"
    # --low-disk --push-to-hub: the GGUF was uploaded as soon as it was finished, then deleted here
    assert not (out / name).exists() and not (out / (name + ".partial")).exists()
    record = json.loads((out / "streammerge.json").read_text())
    assert record["push"]["shards_removed_locally"] is True
    assert record["downloads"]["low_disk"] is True
    assert sorted(record["downloads"]["fetched"]) == sorted(record["downloads"]["evicted"]) == shards
    assert record["base"]["hub"]["repo_id"] == repo and len(record["base"]["hub"]["commit"]) == 40
    assert record["files"] == json.loads((reference / "streammerge.json").read_text())["files"]
    # each base shard download started with at most one other downloaded shard on disk: two at most
    biggest = max(p.stat().st_size for p in base.glob("model-*.safetensors"))
    small = sum(p.stat().st_size for p in base.iterdir() if not p.name.startswith("model-"))
    at_get = [c - small for c in cache_at_get if c >= 0]
    assert len(at_get) == len(shards) and min(at_get) == 0 and max(at_get) <= biggest, at_get
    assert sum(p.stat().st_size for p in storage.iterdir()) == small  # only config/tokenizer/index remain
    # pushed: the GGUF, config, tokenizer, record and a model card naming base and adapter
    pushed = fake_hub.files("me/gguf")
    assert hashlib.sha256(pushed[name]).hexdigest() == sha256(reference / name)
    assert sorted(set(pushed) - {".gitattributes"}) == sorted([name, *(p.name for p in out.iterdir())])
    from huggingface_hub import ModelCard

    card = ModelCard(pushed["README.md"].decode())
    assert card.data.base_model == [repo, "org/glora"] and card.data.base_model_relation == "merge"
    assert "pushed: " in proc.stdout
    no_token_in([out], [proc.stdout, proc.stderr] + [v.decode(errors="replace") for v in pushed.values() if not v.startswith(b"GGUF")])


def test_bitsandbytes_base_on_the_hub_is_planned_from_ranges(fake_hub, make_base, make_adapter, tmp_path):
    """A 4-bit base on the Hub: its quant states (small JSON tensors) are read by range requests, so
    `plan` downloads no shard, and merged_16bit / gguf merges with --low-disk equal the merges of the
    same folder on disk."""
    pytest.importorskip("gguf")
    pytest.importorskip("bitsandbytes")
    import shutil

    import streammerge
    from test_gguf import save_quantized

    base = make_base("llama", dtype=torch.bfloat16, tokenizer="bpe-llama3", tie_word_embeddings=False)
    adapter = make_adapter(base).adapter_path
    local = tmp_path / "qbase"  # the repo's name: the GGUF's file name comes from it
    save_quantized(base, "nf4", local, max_shard_size="12KB")
    shards = sorted(p.name for p in local.glob("model-*.safetensors"))
    assert len(shards) >= 3, shards
    fake_hub.add_folder("org/qbase", local)
    fake_hub.add_folder("org/qlora", adapter)
    env = hub_env(fake_hub, tmp_path / "hf")

    fake_hub.log.clear()
    proc = cli(env, "plan", "org/qbase", "org/qlora", "--json")
    assert proc.returncode == 0, proc.stderr
    assert not [r for r in shard_gets(fake_hub, "org/qbase") if r["range"] is None], "plan downloaded a shard"
    planned = [t for shard in json.loads(proc.stdout)["shards"] for t in shard["tensors"]]
    assert sum(1 for t in planned if t.get("quant_in")) == 14, "the 4-bit weights were not recognized"

    for method, extra, produced in (("merged_16bit", [], "model.safetensors"), ("gguf", ["--gguf-type", "bf16"], "qbase-BF16.gguf")):
        reference = tmp_path / f"ref-{method}"
        streammerge.merge(str(local), [str(adapter)], str(reference), method=method, device="cpu",
                          **({"gguf_type": "bf16"} if method == "gguf" else {}))
        out = tmp_path / f"out-{method}"
        proc = cli(env, "merge", "org/qbase", "org/qlora", "--out", out, "--method", method, *extra, "--low-disk")
        assert proc.returncode == 0, proc.stderr
        names = sorted(p.name for p in reference.iterdir() if p.name.endswith((".safetensors", ".gguf")))
        assert produced in names or any(n.startswith("model-") for n in names), names
        for name in names:
            assert sha256(out / name) == sha256(reference / name), (method, name)
        record = json.loads((out / "streammerge.json").read_text())
        assert sorted(record["downloads"]["evicted"]) == shards
    shutil.rmtree(tmp_path / "hf", ignore_errors=True)
