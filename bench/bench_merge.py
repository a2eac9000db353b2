#!/usr/bin/env python
"""streammerge vs the PEFT path vs `cp`, measured in one run.

    python bench/bench_merge.py                          # 1b and a 1-layer 70b-slice
    python bench/bench_merge.py --models 1b --skip-peft
    python bench/bench_merge.py --models 70b-slice --layers 2 --max-memory 4GB

Inputs are synthetic Llama-shaped bf16 checkpoints written directly as safetensors
(no model is instantiated) plus a random, non-zero LoRA adapter (r=16, alpha=32, all of
q,k,v,o,gate,up,down). They are cached under bench/work/inputs/ and rebuilt with --rebuild.

Each contender runs in its own child process (bench/measure_child.py) which reports the
kernel's ru_maxrss for what it ran; the parent also samples the RSS of the whole child
tree at ~20 Hz. Policy, identical for all contenders: inputs are read once right before
each contender (warm page cache), pending writeback is flushed (sync) before it starts,
and its wall time includes fsync of every output file. See bench/README.md.

Results: a Markdown table on stdout and bench/results/<date>-<tag>.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
BUILDER_VERSION = 1  # bump when the synthetic inputs change, to invalidate the cache

GB = 1e9
GiB = 1024**3

MODELS = {
    # TinyLlama-1.1B shape
    "1b": dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000,
               max_pos=2048, rope_theta=10000.0, eps=1e-5),
    # Llama-3-70B shape, --layers layers
    "70b-slice": dict(hidden=8192, intermediate=28672, layers=None, heads=64, kv_heads=8, vocab=128256,
                      max_pos=8192, rope_theta=500000.0, eps=1e-5),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R, LORA_ALPHA = 16, 32
SHARD_BYTES = 2 * 10**9  # "2GB" as transformers counts it
CONTENDERS = ["cp", "peft", "sm16", "sm4"]
LABELS = {"cp": "cp (I/O bound)", "peft": "PEFT merge_and_unload", "sm16": "streammerge merged_16bit",
          "sm4": "streammerge merged_4bit"}

POLICY = ("warm page cache: base + adapter files are read once immediately before each contender; "
          "`sync` before each contender so earlier writeback does not overlap; "
          "wall time = command + fsync of every output file and directory (done by the wrapper for all "
          "contenders alike, also for tools that fsync themselves); "
          "each contender is a separate child process; peak RSS = kernel ru_maxrss of the child "
          "(largest single process), tree RSS/anon sampled at ~20 Hz; bytes/s = base checkpoint bytes / wall.")


# ----------------------------------------------------------------------------- helpers

def parse_size(s: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?i?B?)\s*", s, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r}")
    num, unit = float(m.group(1)), m.group(2).upper().rstrip("B")
    mult = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(num * mult)


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def fmt_gb(b):
    return "—" if b is None else f"{b / GB:.2f}"


def log(msg: str):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def warm(paths) -> dict:
    """Read every file once so all contenders start with the same (warm) page cache."""
    t0 = time.perf_counter()
    n = 0
    buf = bytearray(16 << 20)
    for root in paths:
        for f in sorted(Path(root).rglob("*")):
            if f.is_file():
                with open(f, "rb", buffering=0) as fh:
                    while True:
                        k = fh.readinto(buf)
                        if not k:
                            break
                        n += k
    dt = time.perf_counter() - t0
    return {"bytes": n, "s": dt, "GBps": n / dt / GB if dt > 0 else None}


def rmtree(p: Path):
    if p.exists():
        shutil.rmtree(p)


# ----------------------------------------------------------------------------- input building

def model_spec(name: str, layers: int) -> dict:
    spec = dict(MODELS[name])
    if spec["layers"] is None:
        spec["layers"] = layers
    spec.update(name=name, dtype="bfloat16", lora_r=LORA_R, lora_alpha=LORA_ALPHA, targets=TARGETS,
                shard_bytes=SHARD_BYTES, builder=BUILDER_VERSION, seed=0)
    return spec


def input_dir(work: Path, name: str, spec: dict) -> Path:
    tag = name if name == "1b" else f"{name}-L{spec['layers']}"
    return work / "inputs" / tag


def tensor_shapes(spec: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = spec["hidden"], spec["intermediate"], spec["vocab"]
    hd = h // spec["heads"]
    kv = spec["kv_heads"] * hd
    out = [("model.embed_tokens.weight", (v, h))]
    for l in range(spec["layers"]):
        p = f"model.layers.{l}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def write_safetensors_streaming(path: Path, tensors: list[tuple[str, tuple[int, ...]]], fill, metadata=None):
    """Header first, then each tensor's bytes generated in row chunks (bounded memory).

    Same layout rules as safetensors: 8-byte LE header length, JSON header padded with
    spaces to a multiple of 8, tensors in header order, sorted by name (all bf16)."""
    import torch  # noqa: F401

    tensors = sorted(tensors, key=lambda t: t[0])
    header = {"__metadata__": metadata or {"format": "pt"}}
    off = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for name, shape in tensors:
            fill(f, name, shape)
    os.replace(tmp, path)
    return off


def build_inputs(d: Path, spec: dict):
    import torch
    from safetensors.torch import save_file

    rmtree(d)
    base, adapter = d / "base", d / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir(parents=True)
    g = torch.Generator().manual_seed(spec["seed"])
    chunk_elems = 32 << 20

    def fill(f, name, shape):
        if len(shape) == 1:  # RMSNorm weights
            t = torch.ones(shape, dtype=torch.bfloat16) + torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
            f.write(t.view(torch.int16).numpy().data)
            return
        rows, cols = shape
        step = max(1, chunk_elems // cols)
        buf = torch.empty(step * cols, dtype=torch.bfloat16)
        for r0 in range(0, rows, step):
            n = min(step, rows - r0) * cols
            b = buf[:n]
            b.normal_(0, 0.02, generator=g)
            f.write(b.view(torch.int16).numpy().data)

    # shard greedily in model order, like transformers' save_pretrained
    shapes = tensor_shapes(spec)
    shards, cur, cur_bytes = [], [], 0
    for name, shape in shapes:
        nb = math.prod(shape) * 2
        if cur and cur_bytes + nb > spec["shard_bytes"]:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape))
        cur_bytes += nb
    shards.append(cur)
    n = len(shards)
    weight_map, total = {}, 0
    for k, sh in enumerate(shards, 1):
        fname = "model.safetensors" if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
        total += write_safetensors_streaming(base / fname, sh, fill)
        for name, _ in sh:
            weight_map[name] = fname
    if n > 1:
        idx = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (base / "model.safetensors.index.json").write_text(json.dumps(idx, indent=2) + "\n")

    from transformers import LlamaConfig
    cfg = LlamaConfig(
        architectures=["LlamaForCausalLM"], hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
        vocab_size=spec["vocab"], max_position_embeddings=spec["max_pos"], rms_norm_eps=spec["eps"],
        rope_theta=spec["rope_theta"], tie_word_embeddings=False, dtype="bfloat16",
    )
    cfg.save_pretrained(base)
    (base / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "_from_model_config": True}, indent=2) + "\n")

    # adapter: PEFT key names, fp32 like a trained adapter, A kaiming-uniform-like, B non-zero
    lora = {}
    for name, shape in shapes:
        mod = name.rsplit(".", 2)[-2] if name.endswith(".weight") else None
        if mod not in TARGETS:
            continue
        out_f, in_f = shape
        prefix = "base_model.model." + name[: -len(".weight")]
        bound = 1.0 / math.sqrt(in_f)
        lora[prefix + ".lora_A.weight"] = torch.empty(LORA_R, in_f).uniform_(-bound, bound, generator=g)
        lora[prefix + ".lora_B.weight"] = torch.empty(out_f, LORA_R).normal_(0, 0.02, generator=g)
    save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    from peft import LoraConfig
    LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=TARGETS, lora_dropout=0.0, bias="none",
               task_type="CAUSAL_LM", base_model_name_or_path=str(base)).save_pretrained(str(adapter))
    (d / "spec.json").write_text(json.dumps(spec, indent=1, sort_keys=True) + "\n")


def ensure_inputs(work: Path, name: str, spec: dict, rebuild: bool) -> tuple[Path, dict]:
    d = input_dir(work, name, spec)
    stamp = d / "spec.json"
    info = {"dir": str(d)}
    cached = stamp.exists() and json.loads(stamp.read_text()) == json.loads(json.dumps(spec, sort_keys=True))
    if cached and not rebuild:
        info["built"] = False
        log(f"{name}: using cached inputs in {d}")
    else:
        n_params = sum(math.prod(s) for _, s in tensor_shapes(spec))
        need = n_params * 2 * 1.1 + 1e9
        free = shutil.disk_usage(work).free
        if free < need:
            raise RuntimeError(f"not enough disk for inputs: need ~{need / GB:.1f} GB, free {free / GB:.1f} GB")
        log(f"{name}: building inputs ({n_params / 1e9:.2f}B params) in {d} ...")
        t0 = time.perf_counter()
        build_inputs(d, spec)
        info["built"] = True
        info["build_s"] = round(time.perf_counter() - t0, 2)
        log(f"{name}: built in {info['build_s']} s")
    info["base_bytes"] = dir_bytes(d / "base")
    info["base_tensor_bytes"] = sum(math.prod(s) * 2 for _, s in tensor_shapes(spec))
    info["adapter_bytes"] = dir_bytes(d / "adapter")
    info["n_params"] = sum(math.prod(s) for _, s in tensor_shapes(spec))
    info["n_shards"] = len(list((d / "base").glob("*.safetensors")))
    return d, info


# ----------------------------------------------------------------------------- measurement

class TreeSampler(threading.Thread):
    """Polls VmRSS / RssAnon of every descendant of `pid` (not pid itself) at ~hz."""

    def __init__(self, pid: int, hz: float = 20.0):
        super().__init__(daemon=True)
        self.pid, self.dt = pid, 1.0 / hz
        self.peak_rss = self.peak_anon = 0
        self.series = []  # (t, rss_bytes)
        self._halt = threading.Event()
        self.t0 = time.perf_counter()

    @staticmethod
    def _status(pid):
        rss = anon = 0
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1]) * 1024
                    elif line.startswith("RssAnon:"):
                        anon = int(line.split()[1]) * 1024
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
        return rss, anon

    def run(self):
        import psutil
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._halt.is_set():
            try:
                kids = root.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            rss = anon = 0
            for k in kids:
                r, a = self._status(k.pid)
                rss += r
                anon += a
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_anon = max(self.peak_anon, anon)
            self.series.append((round(time.perf_counter() - self.t0, 3), rss))
            self._halt.wait(self.dt)

    def stop(self):
        self._halt.set()
        self.join()


def downsample(series, n=300):
    if len(series) <= n:
        return series
    step = len(series) / n
    out = []
    for k in range(n):
        chunk = series[int(k * step): int((k + 1) * step)] or [series[-1]]
        out.append(max(chunk, key=lambda p: p[1]))
    return out


def wait_idle(max_wait: float, busy_max: float = 25.0) -> dict:
    """Wait (up to max_wait s) until the machine is quiet: CPU busy < busy_max % over 1 s."""
    import psutil
    t0 = time.perf_counter()
    busy = psutil.cpu_percent(interval=1.0)
    while busy >= busy_max and time.perf_counter() - t0 < max_wait:
        busy = psutil.cpu_percent(interval=1.0)
    return {"waited_s": round(time.perf_counter() - t0, 1), "cpu_busy_pct": busy, "idle": busy < busy_max}


def measure(label: str, cmd: list[str], run_dir: Path, out_dir: Path, warm_paths, timeout: float,
            max_wait_idle: float = 0.0) -> dict:
    rmtree(run_dir)
    run_dir.mkdir(parents=True)
    w = warm(warm_paths)
    subprocess.run(["sync"], check=False)
    idle = wait_idle(max_wait_idle) if max_wait_idle > 0 else None
    if idle and not idle["idle"]:
        log(f"  {label}: machine still busy ({idle['cpu_busy_pct']:.0f} % CPU) after {idle['waited_s']} s; measuring anyway")
    res_file = run_dir / "result.json"
    wrapper = [PY, str(HERE / "measure_child.py"), "--result", str(res_file), "--fsync-dir", str(out_dir),
               "--stdout", str(run_dir / "stdout.txt"), "--stderr", str(run_dir / "stderr.txt"),
               "--timeout", str(timeout), "--", *cmd]
    log(f"  {label}: {' '.join(cmd)}")
    import psutil
    load_before = os.getloadavg()
    ct0 = psutil.cpu_times()
    p = subprocess.Popen(wrapper, cwd=REPO)
    s = TreeSampler(p.pid)
    s.start()
    p.wait()
    s.stop()
    ct1 = psutil.cpu_times()
    r = json.loads(res_file.read_text())
    busy = lambda c: c.user + c.nice + c.system + getattr(c, "irq", 0) + getattr(c, "softirq", 0)
    # CPU seconds burnt by anything other than this contender while it ran (interference indicator)
    r["other_cpu_s"] = max(0.0, busy(ct1) - busy(ct0) - r["user_s"] - r["sys_s"])
    r["loadavg_before"] = load_before
    r["idle_wait"] = idle
    r.update(warm=w, sampled_peak_tree_rss_bytes=s.peak_rss, sampled_peak_tree_anon_bytes=s.peak_anon,
             rss_series=downsample(s.series))
    err = (run_dir / "stderr.txt").read_text(errors="replace").strip().splitlines()
    r["stderr_tail"] = err[-15:]
    r["out_bytes"] = dir_bytes(out_dir) if out_dir.exists() else 0
    if r["rc"] == 0:
        r["status"] = "ok"
    else:
        r["status"] = "timeout" if r.get("timed_out") else "failed"
        errl = [l for l in err if l.strip()]
        r["error"] = errl[-1] if errl else f"exit {r['rc']}"
        if re.search(r"not (yet )?(supported|implemented)", "\n".join(err), re.I):
            r["status"] = "n/a"
    log(f"  {label}: {r['status']} wall {r['wall_s']:.1f} s (fsync {r['fsync_s']:.1f} s), "
        f"peak RSS {fmt_gb(r['ru_maxrss_bytes'])} GB, tree anon {fmt_gb(s.peak_anon)} GB"
        + f", other CPU {r['other_cpu_s']:.1f} s"
        + (f" — {r['error']}" if r["status"] != "ok" else ""))
    return r


def streammerge_cli_ok() -> tuple[bool, str]:
    try:
        p = subprocess.run([PY, "-m", "streammerge", "merge", "--help"], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return False, "`python -m streammerge merge --help` timed out"
    if p.returncode == 0:
        return True, ""
    tail = (p.stderr or p.stdout).strip().splitlines()
    return False, tail[-1] if tail else f"exit {p.returncode}"


# ----------------------------------------------------------------------------- correctness spot check

def _open_tensor(folder: Path, name: str):
    from safetensors import safe_open
    idx = folder / "model.safetensors.index.json"
    if idx.exists():
        fname = json.loads(idx.read_text())["weight_map"].get(name)
        if fname is None:
            return None
    else:
        cands = list(folder.glob("*.safetensors"))
        if len(cands) != 1:
            return None
        fname = cands[0].name
    with safe_open(str(folder / fname), framework="pt") as f:
        if name not in f.keys():
            return None
        return f.get_tensor(name)


def spot_check(base: Path, adapter: Path, outs: dict, spec: dict) -> list[dict]:
    """Compare a few merged tensors with W' = bf16(f32(W) + s * f32(B) @ f32(A)) (rounded once)."""
    import torch
    from safetensors import safe_open

    s = LORA_ALPHA / LORA_R
    L = spec["layers"] - 1
    names = ["model.layers.0.self_attn.q_proj.weight", f"model.layers.{L}.mlp.down_proj.weight",
             "model.embed_tokens.weight", "lm_head.weight"]
    rows = []
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as fa:
        for name in names:
            W = _open_tensor(base, name)
            pre = "base_model.model." + name[: -len(".weight")]
            if pre + ".lora_A.weight" in fa.keys():
                A = fa.get_tensor(pre + ".lora_A.weight").float()
                B = fa.get_tensor(pre + ".lora_B.weight").float()
                ref = (W.float() + s * (B @ A)).to(torch.bfloat16)
                kind = "merged"
                changed = (ref != W).float().mean().item()
            else:
                ref, kind, changed = W, "copied", 0.0
            for who, folder in outs.items():
                t = _open_tensor(folder, name)
                row = {"tensor": name, "kind": kind, "contender": who, "frac_changed_by_lora": changed}
                if t is None:
                    row.update(present=False)
                elif t.shape != ref.shape or t.dtype != ref.dtype:
                    row.update(present=True, shape=list(t.shape), dtype=str(t.dtype), comparable=False)
                elif torch.equal(t, ref):
                    row.update(present=True, comparable=True, frac_bit_equal=1.0, max_abs_diff=0.0,
                               bitwise_identical=True)
                else:
                    eq = (t == ref)
                    diff = (t.float() - ref.float()).abs()
                    row.update(present=True, comparable=True, frac_bit_equal=eq.float().mean().item(),
                               max_abs_diff=diff.max().item(), bitwise_identical=False)
                    del eq, diff
                rows.append(row)
                del t
            del W, ref
    return rows


# ----------------------------------------------------------------------------- machine

def machine_info(work: Path) -> dict:
    from importlib.metadata import version, PackageNotFoundError
    import psutil
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    vers = {}
    for pkg in ["torch", "transformers", "peft", "safetensors", "bitsandbytes", "accelerate", "psutil", "streammerge"]:
        try:
            vers[pkg] = version(pkg)
        except PackageNotFoundError:
            vers[pkg] = None
    import torch
    du = shutil.disk_usage(work)
    fs = None
    try:
        best = ""
        wp = str(work.resolve())
        for line in open("/proc/mounts"):
            dev, mnt, typ = line.split()[:3]
            if wp.startswith(mnt) and len(mnt) > len(best):
                best, fs = mnt, f"{typ} on {mnt} ({dev})"
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "streammerge"],
                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = None, None
    return {
        "hostname": socket.gethostname(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "ram_total_bytes": psutil.virtual_memory().total,
        "ram_available_bytes_at_start": psutil.virtual_memory().available,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cuda": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": vers,
        "work_dir": str(work),
        "disk_free_bytes_at_start": du.free,
        "disk_total_bytes": du.total,
        "filesystem": fs,
        "git_commit": commit,
        "streammerge_tree_dirty": dirty,
    }


# ----------------------------------------------------------------------------- report

def ratio(a, b):
    return None if (a is None or b is None or b == 0) else a / b


def render_md(report: dict) -> str:
    m = report["machine"]
    L = []
    L.append(f"# streammerge benchmark — {report['date']} ({report['tag']})\n")
    L.append(f"- machine: {m['cpu_model']}, {m['cpu_count']} cores ({m['cpu_affinity']} usable), "
             f"{m['ram_total_bytes'] / GiB:.1f} GiB RAM, CUDA: {m['cuda_device'] or 'no'}")
    L.append(f"- disk: {m['filesystem']}, {m['disk_free_bytes_at_start'] / GB:.0f} GB free at start")
    v = m["versions"]
    L.append(f"- python {m['python']}, torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, "
             f"safetensors {v['safetensors']}, bitsandbytes {v['bitsandbytes']}, streammerge {v['streammerge']} "
             f"(git {m['git_commit']}{', streammerge/ has uncommitted changes' if m['streammerge_tree_dirty'] else ''})")
    L.append(f"- options: `--max-memory {report['options']['max_memory']}`, models {report['options']['models']}, "
             f"70b-slice layers {report['options']['layers']}")
    L.append(f"- policy: {report['policy']}\n")
    L.append("| model | base GB | contender | status | wall s | of which fsync s | CPU s | peak RSS GB | tree anon peak GB | MB/s | out GB |")
    L.append("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for mod in report["models"]:
        bb = mod["inputs"].get("base_bytes")
        for c in CONTENDERS:
            r = mod["results"].get(c)
            if r is None:
                continue
            if r["status"] in ("skipped",):
                L.append(f"| {mod['name']} | {fmt_gb(bb)} | {LABELS[c]} | skipped: {r['reason']} | | | | | | | |")
                continue
            ok = r["status"] == "ok"
            st = r["status"] if ok else f"{r['status']}: {r.get('error', '')[:80]}"
            L.append(
                f"| {mod['name']} | {fmt_gb(bb)} | {LABELS[c]} | {st} | "
                + (f"{r['wall_s']:.1f} | {r['fsync_s']:.1f} | {r['user_s'] + r['sys_s']:.1f} | "
                   f"{fmt_gb(r['ru_maxrss_bytes'])} | {fmt_gb(r['sampled_peak_tree_anon_bytes'])} | "
                   f"{bb / r['wall_s'] / 1e6:.0f} | {fmt_gb(r['out_bytes'])} |" if ok else " | | | | | | |"))
    noisy = [(mod["name"], c, r["other_cpu_s"], r["wall_s"]) for mod in report["models"]
             for c, r in mod["results"].items() if r.get("status") == "ok" and r.get("other_cpu_s", 0) > max(2.0, 0.2 * r["wall_s"])]
    if noisy:
        L.append("\n**Interference:** other processes used CPU during " + ", ".join(
            f"{n}/{c} ({o:.0f} CPU-s over {w:.0f} s wall)" for n, c, o, w in noisy)
            + f" — on {m['cpu_count']} cores these figures are pessimistic.")
    L.append("")
    L.append("| model | streammerge-16/cp wall | streammerge-4bit/cp wall | PEFT/streammerge-16 wall | PEFT/streammerge-16 peak RSS |")
    L.append("|---|---:|---:|---:|---:|")
    f = lambda x: "—" if x is None else f"{x:.2f}×"
    for mod in report["models"]:
        q = mod["ratios"]
        L.append(f"| {mod['name']} | {f(q['sm16_over_cp_wall'])} | {f(q['sm4_over_cp_wall'])} | "
                 f"{f(q['peft_over_sm16_wall'])} | {f(q['peft_over_sm16_rss'])} |")
    L.append("")
    peft_rows = [(m_["name"], m_["results"]["peft"].get("stages")) for m_ in report["models"]
                 if m_["results"].get("peft", {}).get("stages")]
    if peft_rows:
        L.append("PEFT path, in-process stage times (s):\n")
        L.append("| model | import | load base | load adapter | merge | save |")
        L.append("|---|---:|---:|---:|---:|---:|")
        for n, st in peft_rows:
            L.append(f"| {n} | {st['import_s']:.1f} | {st['load_base_s']:.1f} | {st['load_adapter_s']:.1f} | "
                     f"{st['merge_s']:.1f} | {st['save_s']:.1f} |")
        L.append("")
    chk = [(m_["name"], r) for m_ in report["models"] for r in m_.get("spot_check", [])]
    if chk:
        L.append("Spot check against `bf16(f32(W) + s·f32(B)@f32(A))` (rounded once):\n")
        L.append("| model | tensor | contender | bit-equal fraction | max abs diff |")
        L.append("|---|---|---|---:|---:|")
        for n, r in chk:
            if not r.get("present"):
                L.append(f"| {n} | {r['tensor']} | {r['contender']} | missing | |")
            elif not r.get("comparable"):
                L.append(f"| {n} | {r['tensor']} | {r['contender']} | {r['dtype']} {r['shape']} | |")
            else:
                L.append(f"| {n} | {r['tensor']} ({r['kind']}) | {r['contender']} | {r['frac_bit_equal']:.6f} | "
                         f"{r['max_abs_diff']:.3g} |")
        L.append("")
    L.append("Commands (BASE/ADAPTER/OUT under bench/work/):\n")
    for mod in report["models"]:
        for c in CONTENDERS:
            r = mod["results"].get(c)
            if r and r.get("cmd"):
                L.append(f"- {mod['name']} {c}: `{' '.join(r['cmd'])}`")
    L.append("")
    return "\n".join(L)


# ----------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="1b,70b-slice", help="comma list of: " + ",".join(MODELS))
    ap.add_argument("--layers", type=int, default=1, help="layers of the 70b-slice (default 1)")
    ap.add_argument("--max-memory", default="2GB", help="streammerge --max-memory (default 2GB)")
    ap.add_argument("--skip-peft", action="store_true", help="do not run the PEFT path")
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help="subset of " + ",".join(CONTENDERS))
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached inputs")
    ap.add_argument("--work", default=str(HERE / "work"), help="work folder (default bench/work)")
    ap.add_argument("--results", default=str(HERE / "results"), help="results folder (default bench/results)")
    ap.add_argument("--tag", default=None, help="results file tag (default: 'cpu' without CUDA, else hostname)")
    ap.add_argument("--keep-outputs", action="store_true", help="keep merged outputs in bench/work/runs")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness spot check")
    ap.add_argument("--wait-idle", type=float, default=60,
                    help="before each contender wait up to this many s for CPU < 25%% busy (default 60; 0 = never)")
    ap.add_argument("--timeout", type=float, default=1800, help="per-contender timeout, s")
    ap.add_argument("--peft-ram-factor", type=float, default=1.5,
                    help="PEFT is skipped when factor*base_bytes + 1.5 GB > available RAM (default 1.5; measured peak is ~1.1x)")
    ap.add_argument("--render", metavar="JSON", default=None,
                    help="only re-render the Markdown of an existing results JSON (writes the .md next to it)")
    a = ap.parse_args()

    if a.render:
        rep = json.loads(Path(a.render).read_text())
        md = render_md(rep)
        Path(a.render).with_suffix(".md").write_text(md)
        print(md)
        return 0

    models = [m.strip() for m in a.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {','.join(MODELS)}")
    contenders = [c.strip() for c in a.contenders.split(",") if c.strip()]
    if a.skip_peft and "peft" in contenders:
        contenders.remove("peft")
    parse_size(a.max_memory)  # validate
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results_dir = Path(a.results).resolve()
    results_dir.mkdir(parents=True, exist_ok=True)

    import psutil
    import torch
    machine = machine_info(work)
    tag = a.tag or (socket.gethostname() if torch.cuda.is_available() else "cpu")
    tag = re.sub(r"[^A-Za-z0-9._-]+", "_", tag)
    date = _dt.date.today().isoformat()
    t_start = time.perf_counter()

    sm_ok, sm_why = (False, "not requested")
    if any(c.startswith("sm") for c in contenders):
        sm_ok, sm_why = streammerge_cli_ok()
        if not sm_ok:
            log(f"streammerge CLI not usable: {sm_why}")

    report = {"date": date, "tag": tag, "started": _dt.datetime.now().isoformat(timespec="seconds"),
              "options": {"models": models, "layers": a.layers, "max_memory": a.max_memory,
                          "contenders": contenders, "rebuild": a.rebuild},
              "policy": POLICY, "machine": machine, "models": []}

    for name in models:
        spec = model_spec(name, a.layers)
        entry = {"name": name, "spec": spec, "results": {}, "ratios": {}}
        report["models"].append(entry)
        try:
            d, info = ensure_inputs(work, name, spec, a.rebuild)
        except Exception as e:  # noqa: BLE001
            entry["inputs"] = {"error": str(e)}
            log(f"{name}: inputs failed: {e}")
            for c in contenders:
                entry["results"][c] = {"status": "skipped", "reason": "no inputs"}
            continue
        entry["inputs"] = info
        base, adapter = d / "base", d / "adapter"
        bb = info["base_bytes"]
        runs = work / "runs" / d.name
        rmtree(runs)
        keep = {}  # contender -> out dir, for the spot check
        for c in contenders:
            out = runs / c / "out"
            free = shutil.disk_usage(work).free
            if free < bb * 1.2 + 1e9:
                entry["results"][c] = {"status": "skipped", "reason": f"disk: {free / GB:.1f} GB free"}
                continue
            if c == "cp":
                files = sorted(str(p) for p in base.iterdir() if p.is_file())
                cmd = ["bash", "-c", 'mkdir -p "$0" && cp -- "$@" "$0"/', str(out), *files]
            elif c == "peft":
                need = a.peft_ram_factor * bb + 1.5e9
                avail = psutil.virtual_memory().available
                if need > avail:
                    entry["results"][c] = {"status": "skipped", "reason": f"would not fit in RAM "
                                           f"(~{need / GB:.0f} GB needed, {avail / GB:.0f} GB available)"}
                    log(f"  peft: skipped ({entry['results'][c]['reason']})")
                    continue
                cmd = [PY, str(HERE / "peft_merge.py"), str(base), str(adapter), str(out),
                       "--timings", str(runs / "peft-stages.json")]
            else:
                if not sm_ok:
                    entry["results"][c] = {"status": "skipped", "reason": f"streammerge CLI unavailable ({sm_why})"}
                    continue
                cmd = [PY, "-m", "streammerge", "merge", str(base), str(adapter), "--out", str(out),
                       "--max-memory", a.max_memory, "--quiet"]
                if c == "sm4":
                    cmd += ["--method", "merged_4bit"]
            r = measure(c, cmd, runs / c, out, [base, adapter], a.timeout, a.wait_idle)
            if c == "peft" and (runs / "peft-stages.json").exists():
                r["stages"] = json.loads((runs / "peft-stages.json").read_text())
            entry["results"][c] = r
            if r["status"] == "ok" and c in ("peft", "sm16") and not a.no_check:
                keep[c] = out
            elif not a.keep_outputs:
                rmtree(out)
        if keep:
            log(f"{name}: spot-checking {', '.join(keep)} ...")
            try:
                entry["spot_check"] = spot_check(base, adapter, keep, spec)
            except Exception as e:  # noqa: BLE001
                entry["spot_check_error"] = repr(e)
                log(f"{name}: spot check failed: {e!r}")
        if not a.keep_outputs:
            rmtree(runs)
        R = entry["results"]
        wall = lambda c: R[c]["wall_s"] if R.get(c, {}).get("status") == "ok" else None
        rss = lambda c: R[c]["ru_maxrss_bytes"] if R.get(c, {}).get("status") == "ok" else None
        entry["ratios"] = {
            "sm16_over_cp_wall": ratio(wall("sm16"), wall("cp")),
            "sm4_over_cp_wall": ratio(wall("sm4"), wall("cp")),
            "peft_over_sm16_wall": ratio(wall("peft"), wall("sm16")),
            "peft_over_sm16_rss": ratio(rss("peft"), rss("sm16")),
        }

    report["total_s"] = round(time.perf_counter() - t_start, 1)
    md = render_md(report)
    stem = results_dir / f"{date}-{tag}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(md)
    print()
    print(md)
    log(f"total {report['total_s']} s; wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
