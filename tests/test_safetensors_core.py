"""The safetensors format core: our headers are save_file's bytes; bad headers are refused clearly."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from streammerge.errors import InputError
from streammerge.formats.safetensors import (
    FROM_TORCH_NAME,
    TensorSpec,
    build_header,
    pread_exact,
    read_header,
    save_order,
)

ALL_DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
    torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2,
]


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, dtype in enumerate(ALL_DTYPES):
        shape = [(i * 7 + seed) % 5 + 1, (i * 3 + seed) % 4 + 1][: 1 + (i + seed) % 2]
        out[f"t{(i * 37 + seed) % 11}.{dtype}".replace("torch.", "")] = torch.randn(*shape, generator=g).to(dtype)
    out["scalar"] = torch.tensor(3.0)
    out["empty"] = torch.zeros(0, 4)
    out["ünïcode.weight"] = torch.ones(2, dtype=torch.bfloat16)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_header_and_layout_equal_save_file_bytes(tmp_path, seed):
    tensors = _tensors(seed)
    ref = tmp_path / "ref.safetensors"
    save_file(tensors, ref, metadata={"format": "pt"})
    specs = save_order(TensorSpec(k, FROM_TORCH_NAME[str(v.dtype).removeprefix("torch.")], tuple(v.shape)) for k, v in tensors.items())
    header, offsets = build_header(specs, {"format": "pt"})
    data = ref.read_bytes()
    assert data[: len(header)] == header
    body = bytearray(header)
    for spec in specs:
        start, end = offsets[spec.name]
        assert start == len(body)
        body += tensors[spec.name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    assert bytes(body) == data


def test_read_header_matches_file(tmp_path):
    tensors = _tensors(0)
    path = tmp_path / "x.safetensors"
    save_file(tensors, path)
    parsed = read_header(path)
    assert set(parsed.tensors) == set(tensors)
    import os

    fd = os.open(path, os.O_RDONLY)
    try:
        for name, info in parsed.tensors.items():
            buf = bytearray(info.nbytes)
            pread_exact(fd, memoryview(buf), info.start)
            assert bytes(buf) == tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            assert info.shape == tuple(tensors[name].shape)
    finally:
        os.close(fd)


def _write(path, header_obj, data=b"", raw_header=None):
    text = raw_header if raw_header is not None else json.dumps(header_obj).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


@pytest.mark.parametrize(
    "header,data,message",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
        ({"a": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unsupported dtype"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "span"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "bad dimension"),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
            b"\0" * 8, "overlaps",
        ),
        (
            {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
            b"\0" * 8, "gap",
        ),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, "data ends"),
        ({"__metadata__": {"a": 1}}, b"", "__metadata__"),
        ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "exactly dtype"),
    ],
)
def test_bad_headers_are_refused(tmp_path, header, data, message):
    path = _write(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(InputError, match=message) as info:
        read_header(path)
    assert str(path) in str(info.value)


def test_bad_header_bytes(tmp_path):
    with pytest.raises(InputError, match="not valid JSON|invalid"):
        read_header(_write(tmp_path / "a.safetensors", None, raw_header=b"{not json"))
    with pytest.raises(InputError, match="UTF-8"):
        read_header(_write(tmp_path / "b.safetensors", None, raw_header=b'{"\xff":1}'))
    with pytest.raises(InputError, match="duplicate"):
        raw = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
        read_header(_write(tmp_path / "c.safetensors", None, raw_header=raw, data=b"\0"))
    big = tmp_path / "d.safetensors"
    big.write_bytes(struct.pack("<Q", 200_000_000) + b"{}")
    with pytest.raises(InputError, match="100 MB"):
        read_header(big)
    short = tmp_path / "e.safetensors"
    short.write_bytes(struct.pack("<Q", 50) + b"{}")
    with pytest.raises(InputError, match="truncated"):
        read_header(short)
    tiny = tmp_path / "f.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(InputError, match="3 bytes"):
        read_header(tiny)


def _fs_type(path) -> str:
    """The type of the filesystem holding `path`, from /proc/mounts (longest mount point wins)."""
    best, kind = "", ""
    with open("/proc/mounts") as fh:
        for line in fh:
            _, mount, fstype = line.split()[:3]
            if str(path).startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
                best, kind = mount, fstype
    return kind


def _resident_pages(path, length: int) -> list[bool]:
    """Which pages of the file are in the page cache (mincore on a private mapping; touches nothing)."""
    import ctypes
    import mmap
    import os

    page = os.sysconf("SC_PAGE_SIZE")
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), length, access=mmap.ACCESS_COPY)
    try:
        pages = -(-length // page)
        vec = (ctypes.c_ubyte * pages)()
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(length), vec) == 0, ctypes.get_errno()
        return [bool(v & 1) for v in vec]
    finally:
        del addr
        mm.close()


def _failing_sync_file_range(code: int):
    import ctypes

    def fake(fd, offset, nbytes, flags):
        ctypes.set_errno(code)
        return -1

    return fake


@pytest.mark.parametrize("sync_file_range", ["linux", "absent", "unsupported"])
def test_writer_drops_written_pages_and_keeps_the_bytes(tmp_path, monkeypatch, sync_file_range):
    """The written page cache stays bounded: all but the last two flush windows of a shard are on
    disk and dropped from the cache while it is written (sync_file_range on Linux, else fdatasync);
    the file's bytes and sha256 are those written."""
    import hashlib
    import os
    import sys

    from streammerge.formats import safetensors as S

    if not sys.platform.startswith("linux"):
        pytest.skip("page-cache residency is checked with Linux's mincore")
    if _fs_type(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is in memory: its pages cannot be dropped")
    window = 1 << 20
    monkeypatch.setattr(S, "_SYNC_EVERY", window)
    if sync_file_range == "absent":
        monkeypatch.setattr(S, "_sync_file_range", None)
    elif sync_file_range == "unsupported":  # a filesystem without it: fdatasync per window
        import errno

        monkeypatch.setattr(S, "_sync_file_range", _failing_sync_file_range(errno.EINVAL))
    header = b"\x08" + b"\x00" * 7 + b"{}      "
    chunks = [os.urandom(window // 4) for _ in range(64)]  # 16 windows
    total = len(header) + sum(map(len, chunks))
    writer = S.ShardWriter(tmp_path / "x.safetensors", header, total)
    for chunk in chunks:
        writer.write(chunk)
    resident = _resident_pages(writer.partial_path, total)
    page = os.sysconf("SC_PAGE_SIZE")
    settled = (total - 3 * window) // page  # everything before the last two windows (+ the unflushed tail)
    kept = sum(resident[:settled])  # fadvise drops whole pages: at most the one around each window edge
    assert settled > 0 and kept <= total // window, f"{kept} of {settled} pages still cached"
    digest = writer.commit()
    data = (tmp_path / "x.safetensors").read_bytes()
    assert data == header + b"".join(chunks)
    assert digest == hashlib.sha256(data).hexdigest()


def test_writer_raises_a_writeback_error(tmp_path, monkeypatch):
    """An I/O error reported by sync_file_range (the disk failed to take a window) is raised like
    fdatasync's, not swallowed by the fallback."""
    import errno

    from streammerge.formats import safetensors as S

    monkeypatch.setattr(S, "_SYNC_EVERY", 1 << 16)
    monkeypatch.setattr(S, "_sync_file_range", _failing_sync_file_range(errno.EIO))
    writer = S.ShardWriter(tmp_path / "x.safetensors", b"\x08" + b"\x00" * 7 + b"{}      ", 16 + (1 << 17))
    with pytest.raises(OSError) as info:
        writer.write(b"\x00" * (1 << 17))
    assert info.value.errno == errno.EIO
    writer.close()

