"""Shared fixtures and helpers: tiny real checkpoints (tests/models.py) and comparison tools.

Fixtures (session scoped, builds cached and reused across tests):
    make_base(arch, **build_base_kwargs) -> Path
    make_adapter(base_path, **lora_kwargs) -> AdapterCase      (seed=... accepted too)
    llama_case / qwen2_case / gpt2_case -> AdapterCase          (default f32 base + adapter)
Helpers (import from conftest or use the fixtures of the same name):
    bitwise_fraction(ours, ref) -> float
    max_ulp_diff(ours, ref) -> int            (bf16 / f16 / f32)
    load_safetensors_dir(path) -> dict[str, Tensor]
    run_cli(*args, timeout=...) -> subprocess.CompletedProcess
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import models  # noqa: E402  (tests/models.py)

REPO_ROOT = Path(__file__).resolve().parents[1]

try:  # keep test logs readable
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
except Exception:  # pragma: no cover
    pass


# --------------------------------------------------------------------------- helpers

_INT_VIEW = {
    torch.float32: (torch.int32, 0x7FFFFFFF),
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float16: (torch.int16, 0x7FFF),
}


def _ordered_ints(t: torch.Tensor) -> torch.Tensor:
    """Map floats to integers whose difference counts representable values (ulps) between them."""
    if t.dtype not in _INT_VIEW:
        raise TypeError(f"max_ulp_diff: unsupported dtype {t.dtype}")
    idt, mask = _INT_VIEW[t.dtype]
    i = t.contiguous().view(idt).to(torch.int64)
    mag = i & mask
    return torch.where(i < 0, -mag, mag)  # +0 and -0 both map to 0


def max_ulp_diff(ours: torch.Tensor, ref: torch.Tensor) -> int:
    """Largest distance in units-in-the-last-place between same-dtype float tensors (0 = identical)."""
    if ours.dtype != ref.dtype:
        raise TypeError(f"dtype mismatch {ours.dtype} vs {ref.dtype}")
    if ours.shape != ref.shape:
        raise ValueError(f"shape mismatch {tuple(ours.shape)} vs {tuple(ref.shape)}")
    if ours.numel() == 0:
        return 0
    if torch.isnan(ours).any() or torch.isnan(ref).any():
        raise ValueError("NaN in compared tensors")
    return int((_ordered_ints(ours) - _ordered_ints(ref)).abs().max().item())


def bitwise_fraction(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Fraction of elements whose bit patterns are identical (dtype and shape must match)."""
    if ours.dtype != ref.dtype:
        raise TypeError(f"dtype mismatch {ours.dtype} vs {ref.dtype}")
    if ours.shape != ref.shape:
        raise ValueError(f"shape mismatch {tuple(ours.shape)} vs {tuple(ref.shape)}")
    n = ours.numel()
    if n == 0:
        return 1.0
    if ours.dtype.is_floating_point and ours.dtype in _INT_VIEW:
        idt = _INT_VIEW[ours.dtype][0]
        a, b = ours.contiguous().view(idt), ref.contiguous().view(idt)
    else:
        a, b = ours, ref
    return float((a == b).sum().item()) / n


def shard_files(path) -> list[Path]:
    """The safetensors files of a checkpoint folder, in index order (or the single file)."""
    path = Path(path)
    idx = path / "model.safetensors.index.json"
    if idx.exists():
        wm = json.loads(idx.read_text())["weight_map"]
        names = sorted(set(wm.values()))
        return [path / n for n in names]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    return sorted(path.glob("*.safetensors"))


def load_safetensors_dir(path) -> dict[str, torch.Tensor]:
    """All tensors of a folder (every shard); duplicate names across shards are an error."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    files = shard_files(path)
    if not files:
        raise FileNotFoundError(f"no safetensors files in {path}")
    for f in files:
        for k, v in load_file(str(f)).items():
            if k in out:
                raise AssertionError(f"tensor {k} appears in more than one shard")
            out[k] = v
    return out


def safetensors_header(file) -> dict:
    """The parsed JSON header of one safetensors file (dict order = file order)."""
    import struct

    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def tensor_order(path) -> list[str]:
    """Names of a checkpoint's tensors: shard by shard (index order), by data offset in each shard."""
    names: list[str] = []
    for f in shard_files(path):
        h = safetensors_header(f)
        h.pop("__metadata__", None)
        names.extend(sorted(h, key=lambda k: h[k]["data_offsets"][0]))
    return names


def run_cli(*args, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m streammerge ARGS...`` in a subprocess (text mode, output captured)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return subprocess.run(
        [sys.executable, "-m", "streammerge", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=kwargs.pop("cwd", str(REPO_ROOT)),
        **kwargs,
    )


# --------------------------------------------------------------------------- fixtures


def _key(args: tuple, kwargs: dict) -> str:
    def norm(v):
        if isinstance(v, dict):
            return tuple(sorted((k, norm(x)) for k, x in v.items()))
        if isinstance(v, (list, tuple)):
            return tuple(norm(x) for x in v)
        return repr(v)

    return repr((norm(args), norm(kwargs)))


class _Builder:
    def __init__(self, tmp_path_factory):
        self.tmp = tmp_path_factory
        self.bases: dict[str, Path] = {}
        self.adapters: dict[str, models.AdapterCase] = {}

    def base(self, arch: str, **kw) -> Path:
        key = _key((arch,), kw)
        if key not in self.bases:
            path = self.tmp.mktemp(f"base-{arch}")
            self.bases[key] = models.build_base(path, arch, **kw)
        return self.bases[key]

    def adapter(self, base_path, **lora_kwargs) -> models.AdapterCase:
        key = _key((str(base_path),), lora_kwargs)
        if key not in self.adapters:
            out = self.tmp.mktemp("adapter")
            self.adapters[key] = models.build_adapter(base_path, out, **lora_kwargs)
        return self.adapters[key]


@pytest.fixture(scope="session")
def _builder(tmp_path_factory) -> _Builder:
    return _Builder(tmp_path_factory)


@pytest.fixture(scope="session")
def make_base(_builder):
    """make_base(arch, **build_base_kwargs) -> Path (cached per arguments for the session)."""
    return _builder.base


@pytest.fixture(scope="session")
def make_adapter(_builder):
    """make_adapter(base_path, seed=1, **lora_kwargs) -> AdapterCase (cached per arguments)."""
    return _builder.adapter


@pytest.fixture(scope="session")
def llama_case(make_base, make_adapter) -> models.AdapterCase:
    return make_adapter(make_base("llama"))


@pytest.fixture(scope="session")
def qwen2_case(make_base, make_adapter) -> models.AdapterCase:
    return make_adapter(make_base("qwen2"))


@pytest.fixture(scope="session")
def gpt2_case(make_base, make_adapter) -> models.AdapterCase:
    return make_adapter(make_base("gpt2"))


@pytest.fixture(scope="session", name="run_cli")
def _run_cli_fixture():
    return run_cli


@pytest.fixture(scope="session", name="load_safetensors_dir")
def _load_dir_fixture():
    return load_safetensors_dir


@pytest.fixture(scope="session", name="max_ulp_diff")
def _ulp_fixture():
    return max_ulp_diff


@pytest.fixture(scope="session", name="bitwise_fraction")
def _bitwise_fixture():
    return bitwise_fraction
