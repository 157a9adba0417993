"""The on-disk CUDA kernel cache (src/cuda/cache.rs), exercised without a GPU.

``compile-kernels`` goes through the same cache as a kernel's first use on a GPU
(NVRTC from pip is enough): an entry is a 24-byte header (magic, cubin length,
FNV-1a 64 checksum) and the cubin. A truncated, empty or damaged entry, or a raw
cubin of the older format, must be compiled again and rewritten, never handed to
the driver; processes compiling the same kernel at once must all succeed and leave
one whole entry. ``MAMBA_ATTENTION_CACHE`` points the cache at a fresh directory.
"""

import os
import struct
import subprocess
import sys

import pytest

_core = pytest.importorskip("mamba_attention._core")

pytestmark = pytest.mark.skipif(
    not _core.cuda_info()["nvrtc"], reason="NVRTC is not installed (pip install nvidia-cuda-nvrtc)"
)

MAGIC = b"MACUBIN\x01"
HEADER = 24
#: Small modules, so each compile takes well under a second.
MODULES = ["rotary", "norm"]


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for x in data:
        h = ((h ^ x) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def entries(cache):
    return sorted(p for p in os.listdir(cache) if p.endswith(".cubin"))


def check_entry(path):
    """The entry's cubin, after checking the header against it."""
    data = open(path, "rb").read()
    assert data[:8] == MAGIC, data[:8]
    length, checksum = struct.unpack("<QQ", data[8:HEADER])
    payload = data[HEADER:]
    assert len(payload) == length > 0
    assert payload[:4] == b"\x7fELF", "the payload is not a cubin"
    assert fnv1a64(payload) == checksum
    return payload


def compile_(module, arch="sm_80"):
    [(name, size, log, cached)] = _core.compile_kernels(arch, [module])
    assert name == module
    return size, cached


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "kernels"
    monkeypatch.setenv("MAMBA_ATTENTION_CACHE", str(d))
    return d


def test_entries_are_written_with_a_checked_header(cache):
    size, cached = compile_("rotary")
    assert not cached
    [name] = entries(cache)
    assert name.startswith("rotary-") and "-sm80-nvrtc" in name
    assert len(check_entry(cache / name)) == size
    assert compile_("rotary") == (size, True), "a valid entry was not read back"
    assert not [p for p in os.listdir(cache) if p.endswith(".tmp")]


def _damage(kind, data):
    if kind == "truncated":
        return data[: len(data) // 2]
    if kind == "truncated_by_one":
        return data[:-1]
    if kind == "header_only":
        return data[:HEADER]
    if kind == "empty":
        return b""
    if kind == "flipped_payload_byte":
        i = HEADER + (len(data) - HEADER) // 3
        return data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1:]
    if kind == "wrong_length":
        return data[:8] + struct.pack("<Q", len(data)) + data[16:]
    if kind == "raw_cubin":  # what the cache held before entries had a header
        return data[HEADER:]
    if kind == "garbage":
        return os.urandom(len(data))
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["truncated", "truncated_by_one", "header_only", "empty",
                                  "flipped_payload_byte", "wrong_length", "raw_cubin", "garbage"])
def test_a_damaged_entry_is_rebuilt_not_loaded(cache, kind):
    size, _ = compile_("rotary")
    [name] = entries(cache)
    whole = (cache / name).read_bytes()
    (cache / name).write_bytes(_damage(kind, whole))
    size2, cached = compile_("rotary")
    assert not cached, f"{kind}: the damaged entry was loaded"
    assert size2 == size
    assert (cache / name).read_bytes() == whole, f"{kind}: the entry was not rewritten whole"
    assert compile_("rotary") == (size, True)


def test_no_cache_leaves_the_cache_alone(cache):
    [(name, size, log, cached)] = _core.compile_kernels("sm_80", ["rotary"], False)
    assert not cached and size > 0
    assert not cache.exists() or not os.listdir(cache)


def test_unknown_module_is_a_value_error(cache):
    with pytest.raises(ValueError, match="unknown kernel module"):
        _core.compile_kernels("sm_80", ["no_such_module"])


def test_concurrent_processes_compile_the_same_kernels(tmp_path):
    """Processes compiling the same kernels into one fresh cache at once all succeed
    (each writes a temporary file and renames it into place) and leave one whole,
    valid entry per kernel and no temporary files."""
    cache = tmp_path / "shared"
    env = dict(os.environ, MAMBA_ATTENTION_CACHE=str(cache))
    cmd = [sys.executable, "-m", "mamba_attention", "compile-kernels", "--arch", "sm_80",
           "--module", ",".join(MODULES)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, (out, err)
        assert out.count("bytes cubin") == len(MODULES), out
    names = entries(cache)
    assert sorted(n.split("-")[0] for n in names) == sorted(MODULES), names
    for n in names:
        check_entry(cache / n)
    assert sorted(os.listdir(cache)) == names, "temporary files left behind"
    # A later process reads every entry back.
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    assert out.count("from the cache") == len(MODULES), out
