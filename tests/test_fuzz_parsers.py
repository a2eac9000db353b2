"""Property-based: thousands of mutated safetensors headers and checkpoint folders thrown at the parsers.

Every outcome must be a clean InputError naming the file, or a correct parse: spans contiguous
inside the file, every tensor readable with pread within the file's bounds, the same tensors as
the safetensors library itself reads (headers), the same tensors as the index lists (folders).
Never another exception, and never an open() of anything outside the file/folder we were given
(watched with an audit hook, which sees every open in the process).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys
import tempfile
import threading
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streammerge.errors import InputError
from streammerge.formats.checkpoint import INDEX_FILE, open_checkpoint
from streammerge.formats.safetensors import ITEMSIZE, TORCH_NAME, pread_exact, read_header

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), print_blob=True)
# thousands of tiny files: a RAM file system keeps this test fast on a slow or busy disk
_SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="sm-fuzz-", dir=_SCRATCH))

# ------------------------------------------------------------------ every open() the process makes

_OPENED: list[str] | None = None
_RECORDING_THREAD: int | None = None  # opens by other threads (a library's background thread) are not ours


def _audit(event: str, args: tuple) -> None:
    if (
        _OPENED is not None and event == "open" and threading.get_ident() == _RECORDING_THREAD
        and isinstance(args[0], (str, bytes, os.PathLike))
    ):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


def _recording(fn, *args):
    """Run fn(*args) and return (result or exception, paths opened meanwhile)."""
    global _OPENED, _RECORDING_THREAD
    _RECORDING_THREAD = threading.get_ident()
    _OPENED = []
    try:
        try:
            return fn(*args), list(_OPENED)
        except InputError as exc:
            return exc, list(_OPENED)
    finally:
        _OPENED = None


# ------------------------------------------------------------------------------ header mutations

_SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.sampled_from(
    ["", "F32", "U8", "f32", "F4", "x", "\x00"])
JSON_VALUES = _SCALARS | st.lists(_SCALARS, max_size=3) | st.dictionaries(st.sampled_from(["", "a", "dtype"]), _SCALARS, max_size=2)
DIMS = st.one_of(
    st.integers(-3, 9), st.sampled_from([2**31, 2**32 + 1, 2**62, 2**63 - 1, 2**63, 2**64, 2**70, 10**30]),
    st.floats(0, 10), st.text(max_size=2), st.none(),
)


@st.composite
def valid_file(draw) -> tuple[dict, bytes]:
    """A correct safetensors header (as a dict in a drawn key order) and its data."""
    specs = []
    names = draw(st.lists(st.text("ab.é_", min_size=1, max_size=4), max_size=5, unique=True))
    for name in names:
        dtype = draw(st.sampled_from(sorted(ITEMSIZE)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        specs.append((name, dtype, shape))
    header: dict = {}
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text("kv\n", max_size=3), st.text("kv\n", max_size=3), max_size=2))
    offset, entries = 0, []
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        entries.append((name, {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}))
        offset += nbytes
    for name, entry in draw(st.permutations(entries)):
        header[name] = entry
    data = bytes((i * 37 + 11) % 256 for i in range(offset))
    return header, data


def _tensor_names(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


@st.composite
def mutated_file(draw) -> bytes:
    header, data = draw(valid_file())
    names = _tensor_names(header)
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2, 3]))):  # mostly one mutation: each must be caught alone
        op = draw(st.sampled_from(["field", "dim", "offset", "shift", "keys", "metadata", "alias", "delete", "add"]))
        if op == "metadata":
            header["__metadata__"] = draw(JSON_VALUES)
            continue
        if op == "add":
            header[draw(st.sampled_from(["", "n", "__metadata__ ", "a"]))] = draw(JSON_VALUES)
            continue
        if not names:
            continue
        name = draw(st.sampled_from(names))
        entry = header.get(name)
        if not isinstance(entry, dict):
            continue
        if op == "field":
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(JSON_VALUES)
        elif op == "dim" and isinstance(entry.get("shape"), list):
            shape = entry["shape"]
            pos = draw(st.integers(0, len(shape)))
            shape[pos:pos + 1] = [draw(DIMS)]
        elif op == "offset" and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2:
            entry["data_offsets"][draw(st.integers(0, 1))] = draw(
                st.integers(-2, len(data) + 9) | st.sampled_from([2**63, 2**64 + 3]))
        elif op == "shift" and isinstance(entry.get("data_offsets"), list):
            k = draw(st.integers(-9, 9))
            entry["data_offsets"] = [o + k if isinstance(o, int) else o for o in entry["data_offsets"]]
        elif op == "keys":
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
            if draw(st.booleans()):
                entry[draw(st.sampled_from(["", "extra", "dtype"]))] = draw(JSON_VALUES)
        elif op == "alias":  # a second tensor on the same bytes
            header[name + "~"] = json.loads(json.dumps(entry))
        elif op == "delete":
            del header[name]
    text = json.dumps(header, ensure_ascii=draw(st.booleans())).encode()
    text += b" " * draw(st.integers(0, 9))
    raw = bytearray(struct.pack("<Q", len(text)) + text + data)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):  # byte-level damage, sometimes
        op = draw(st.sampled_from(["flip", "truncate", "append", "length", "dupkey", "splice"]))
        if op == "flip" and raw:
            i = draw(st.integers(0, len(raw) - 1))
            raw[i] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del raw[max(0, len(raw) - draw(st.integers(1, 16))):]
        elif op == "append":
            raw += draw(st.binary(min_size=1, max_size=16))
        elif op == "length" and len(raw) >= 8:
            n = struct.unpack("<Q", raw[:8])[0]
            raw[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1) | st.integers(max(0, n - 9), n + 9)))
        elif op == "dupkey" and names:
            dup = json.dumps(names[0]).encode() + b':{"dtype":"U8","shape":[0],"data_offsets":[0,0]},'
            raw[8:9] = b"{" + dup  # same length prefix: the header grows, its tail spills into the data
            raw[:8] = struct.pack("<Q", (struct.unpack("<Q", raw[:8])[0] + len(dup)) % 2**64)
        elif op == "splice" and len(raw) > 8:
            i = draw(st.integers(8, len(raw) - 1))
            raw[i:i + draw(st.integers(0, 6))] = draw(st.binary(max_size=6))
    return bytes(raw)


def _check_header_parse(path: Path, raw: bytes) -> None:
    result, opened = _recording(read_header, path)
    assert all(Path(p) == path for p in opened), opened  # only the file itself is ever opened
    if isinstance(result, InputError):
        assert str(path) in str(result) and "\n" not in str(result)
        return
    parsed = result
    size = len(raw)
    (length,) = struct.unpack("<Q", raw[:8])
    assert parsed.data_start == 8 + length <= size
    cursor = parsed.data_start
    for info in parsed.tensors.values():  # data-offset order, contiguous, inside the file
        assert info.dtype in ITEMSIZE and all(isinstance(d, int) and d >= 0 for d in info.shape)
        assert info.start == cursor and info.nbytes == math.prod(info.shape) * ITEMSIZE[info.dtype]
        cursor = info.end
    assert cursor == size
    fd = os.open(path, os.O_RDONLY)
    try:
        for info in parsed.tensors.values():
            buf = bytearray(info.nbytes)
            pread_exact(fd, memoryview(buf), info.start, str(path))
            assert bytes(buf) == raw[info.start:info.end]
    finally:
        os.close(fd)
    _agrees_with_safetensors(path, parsed)


def _agrees_with_safetensors(path: Path, parsed) -> None:
    """What we accept, the reference implementation accepts, with the same tensors and bytes."""
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(parsed.tensors)
        assert (f.metadata() or None) == (dict(parsed.metadata) if parsed.metadata else None)
        for name, info in parsed.tensors.items():
            t = f.get_tensor(name)
            assert t.dtype == getattr(torch, TORCH_NAME[info.dtype]) and tuple(t.shape) == info.shape
            data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            assert len(data) == info.nbytes


@settings(max_examples=2000, **SETTINGS)
@given(raw=mutated_file())
def test_mutated_headers_are_refused_cleanly_or_parsed_correctly(raw):
    tmp = _scratch()
    try:
        path = tmp / "model.safetensors"
        path.write_bytes(raw)
        _check_header_parse(path, raw)
    finally:
        shutil.rmtree(tmp)


@settings(max_examples=200, **SETTINGS)
@given(header=valid_file())
def test_valid_headers_parse(header):
    """The generator's unmutated files must parse (or the property above would prove little)."""
    obj, data = header
    text = json.dumps(obj).encode()
    raw = struct.pack("<Q", len(text)) + text + data
    tmp = _scratch()
    try:
        path = tmp / "x.safetensors"
        path.write_bytes(raw)
        parsed = read_header(path)
        assert set(parsed.tensors) == set(_tensor_names(obj))
        _check_header_parse(path, raw)
    finally:
        shutil.rmtree(tmp)


# ------------------------------------------------------------------------- index/folder mutations

SHARDS = {"a.safetensors": ["x0", "x1"], "b.safetensors": ["x2"], "c.safetensors": ["x3", "x4"]}


def _st_bytes(tensors: dict[str, bytes]) -> bytes:
    header, offset = {}, 0
    for name, payload in tensors.items():
        header[name] = {"dtype": "U8", "shape": [len(payload)], "data_offsets": [offset, offset + len(payload)]}
        offset += len(payload)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + b"".join(tensors.values())


def _payload(name: str) -> bytes:
    return (name.encode() * 7)[: 3 + len(name)]


NAME_CHOICES = [
    "../outside/evil.safetensors", "../outside/a.safetensors", "sub/../a.safetensors", "./a.safetensors", "",
    "a.safetensors\x00", "x" * 300, INDEX_FILE, ".", "sub", "nope.safetensors", "config.json", "sub/d.safetensors",
    "link_in.safetensors", "link_out.safetensors", "link_rel_out.safetensors", "loop.safetensors",
    "dangling.safetensors", "evil.safetensors",
]


@st.composite
def folder_mutations(draw) -> list[tuple]:
    ops = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["rename", "value", "drop_key", "add_key", "dup_tensor", "rm_shard", "dir_shard",
                                     "link_shard", "index_json", "config", "abs_name"]))
        tensor = draw(st.sampled_from([t for ts in SHARDS.values() for t in ts] + ["x9"]))
        shard = draw(st.sampled_from(sorted(SHARDS)))
        if kind == "rename":
            ops.append((kind, tensor, draw(st.sampled_from(NAME_CHOICES + sorted(SHARDS)))))
        elif kind == "value":
            ops.append((kind, tensor, draw(JSON_VALUES)))
        elif kind == "index_json":
            ops.append((kind, draw(st.sampled_from(["list", "no_map", "map_list", "garbage", "dupkey", "empty"]))))
        elif kind == "config":
            ops.append((kind, draw(st.sampled_from(["link_out", "garbage", "list", "loop"]))))
        elif kind == "link_shard":
            ops.append((kind, shard, draw(st.sampled_from(["out_abs", "out_rel", "in", "loop", "dangling"]))))
        else:
            ops.append((kind, tensor, shard))
    return ops


def _build_folder(tmp: Path, ops: list[tuple], hf_layout: bool) -> tuple[Path, list[Path]]:
    """A sharded checkpoint with `ops` applied; returns (root, folders that may legitimately be read)."""
    outside = tmp / "outside"
    outside.mkdir(parents=True)
    (outside / "evil.safetensors").write_bytes(_st_bytes({"x9": _payload("x9"), "x0": _payload("x0")}))
    (outside / "a.safetensors").write_bytes(_st_bytes({t: _payload(t) for t in SHARDS["a.safetensors"]}))
    (outside / "config.json").write_text('{"secret": 1}')
    if hf_layout:
        repo = tmp / "models--org--name"
        root = repo / "snapshots" / "0123abcd"
        blobs = repo / "blobs"
        blobs.mkdir(parents=True)
        allowed = [root, blobs]
    else:
        root = tmp / "model"
        allowed = [root]
    root.mkdir(parents=True)
    (root / "sub").mkdir()
    files = {name: _st_bytes({t: _payload(t) for t in ts}) for name, ts in SHARDS.items()}
    files["sub/d.safetensors"] = _st_bytes({"x5": _payload("x5")})
    weight_map = {t: name for name, ts in SHARDS.items() for t in ts}
    index: object = {"metadata": {"total_size": 1}, "weight_map": weight_map}
    config: bytes | None = b'{"model_type": "llama"}'
    index_raw: bytes | None = None
    config_link = None
    links: dict[str, str] = {"link_in.safetensors": "a.safetensors", "link_out.safetensors": str(outside / "a.safetensors"),
                             "link_rel_out.safetensors": "../" * (4 if hf_layout else 1) + "outside/a.safetensors",
                             "loop.safetensors": "loop2.safetensors", "loop2.safetensors": "loop.safetensors",
                             "dangling.safetensors": "gone.safetensors"}
    for op in ops:
        kind = op[0]
        if kind == "rename":
            weight_map[op[1]] = op[2]
        elif kind == "abs_name":
            weight_map[op[1]] = str(outside / "evil.safetensors")
        elif kind == "value":
            weight_map[op[1]] = op[2]
        elif kind == "drop_key":
            weight_map.pop(op[1], None)
        elif kind == "add_key":
            weight_map[op[1]] = op[2]
        elif kind == "dup_tensor" and op[2] in files:
            files[op[2]] = _st_bytes({**{t: _payload(t) for t in SHARDS.get(op[2], [])}, op[1]: _payload(op[1])})
        elif kind == "rm_shard":
            files.pop(op[2], None)
        elif kind == "dir_shard":
            files[op[2]] = None
        elif kind == "link_shard":
            target = {"out_abs": str(outside / "a.safetensors"), "out_rel": "../" * (4 if hf_layout else 1) + "outside/a.safetensors",
                      "in": "c.safetensors", "loop": op[1], "dangling": "gone"}[op[2]]
            files[op[1]] = ("link", target)
        elif kind == "index_json":
            v = op[1]
            if v == "list":
                index = [weight_map]
            elif v == "no_map":
                index = {"metadata": {}}
            elif v == "map_list":
                index = {"weight_map": list(weight_map)}
            elif v == "empty":
                index = {"weight_map": {}}
            elif v == "garbage":
                index_raw = b"{\xff not json"
            elif v == "dupkey":
                index_raw = b'{"weight_map": {"x0": "a.safetensors", "x0": "b.safetensors"}}'
        elif kind == "config":
            if op[1] == "link_out":
                config_link = str(outside / "config.json")
            elif op[1] == "loop":
                config_link = "config.json"
            elif op[1] == "garbage":
                config = b"{nope"
            elif op[1] == "list":
                config = b"[1, 2]"

    def place(rel: str, content) -> None:
        path = root / rel
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
        elif isinstance(content, tuple):
            os.symlink(content[1], path)
        elif hf_layout:  # content in the blob store, a relative link in the snapshot (as huggingface_hub does)
            blob = allowed[1] / f"{abs(hash((rel, content))):x}"
            blob.write_bytes(content)
            os.symlink(os.path.relpath(blob, path.parent), path)
        else:
            path.write_bytes(content)

    for rel, content in files.items():
        place(rel, content)
    for rel, target in links.items():
        os.symlink(target, root / rel)
    place(INDEX_FILE, index_raw if index_raw is not None else json.dumps(index).encode())
    if config_link is not None:
        os.symlink(config_link, root / "config.json")
    elif config is not None:
        place("config.json", config)
    return root, allowed


def _inside(path: str | Path, allowed: list[Path]) -> bool:
    real = Path(os.path.realpath(path))
    return any(real == a.resolve() or a.resolve() in real.parents for a in allowed)


@settings(max_examples=1000, **SETTINGS)
@given(ops=folder_mutations(), hf_layout=st.booleans())
def test_mutated_checkpoint_folders_are_refused_cleanly_or_opened_correctly(ops, hf_layout):
    tmp = _scratch()
    try:
        root, allowed = _build_folder(tmp, ops, hf_layout)
        result, opened = _recording(open_checkpoint, root)
        outside_reads = [p for p in opened if not _inside(p, allowed)]
        assert not outside_reads, (ops, outside_reads)
        if isinstance(result, InputError):
            assert "\n" not in str(result)
            return
        index = json.loads((root / INDEX_FILE).read_text())
        assert set(result.tensors) == set(index["weight_map"])
        for name, ref in result.tensors.items():
            assert _inside(ref.file, allowed)
            size = os.path.getsize(ref.file)
            assert 0 < ref.info.start <= ref.info.end <= size
            with open(ref.file, "rb") as fh:
                fh.seek(ref.info.start)
                assert fh.read(ref.info.nbytes) == _payload(name)
    finally:
        shutil.rmtree(tmp)


def test_folder_generator_builds_valid_checkpoints(tmp_path):
    """Unmutated folders open, in both layouts (so the property above is not vacuous)."""
    for hf in (False, True):
        root, allowed = _build_folder(tmp_path / str(hf), [], hf)
        ckpt = open_checkpoint(root)
        assert sorted(ckpt.tensors) == ["x0", "x1", "x2", "x3", "x4"]
        assert all(_inside(r.file, allowed) for r in ckpt.tensors.values())
