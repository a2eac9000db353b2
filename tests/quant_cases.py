"""Steps the quantized-format tests (block FP8, compressed-tensors FP8, MXFP4) share: a broken copy of
a base, an adapter with a NaN, the one-error-line check, a merge killed midway and resumed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from conftest import run_cli


def broken_copy(base: Path, tmp_path: Path, edit) -> Path:
    """A copy of single-file `base` after `edit(tensors, config)`."""
    out = tmp_path / "broken"
    shutil.copytree(base, out)
    tensors = load_file(str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    edit(tensors, config)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    return out


def merge_fails_with_one_line(base, adapter, out: Path, method: str, words: str):
    """`streammerge merge` refuses: a non-zero exit, one `error:` line holding `words`, no model written."""
    r = run_cli("merge", base, adapter, "--out", out, "--method", method)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (out / "model.safetensors").exists()
    return r


def nan_adapter(adapter: Path, tmp_path: Path, fragment: str):
    """A copy of `adapter` whose first tensor named with `fragment` holds a NaN; (path, tensors, key)."""
    out = tmp_path / "nan-adapter"
    shutil.copytree(adapter, out)
    f = out / "adapter_model.safetensors"
    tensors = load_file(str(f))
    key = next(k for k in tensors if fragment in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(f))
    return out, tensors, key


def kill_and_resume(base, adapter, out: Path, opts: tuple[str, ...]):
    """Start a merge, kill it midway (a shard open, 4 tensors done), resume it: (frozen state, result)."""
    from test_resume import kill_when, merge, start

    for _ in range(6):
        shutil.rmtree(out, ignore_errors=True)
        frozen = kill_when(start(base, adapter, out, *opts, "--quiet"), out,
                           lambda s: any(n.endswith(".partial") for n in s["names"]) and s["tensors"] >= 4)
        if frozen is not None:
            break
    assert frozen is not None, "never caught the merge midway"
    res = merge(base, adapter, out, *opts)
    assert res.returncode == 0, res.stderr
    return frozen, res
