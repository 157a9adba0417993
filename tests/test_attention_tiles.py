"""CPU attention forward at its tile boundaries (src/cpu/attention.rs): key tiles
of 64, row blocks of up to 4 vectors (16 lanes AVX-512, 8 AVX2/portable), edge
tiles cut into (keys × row vectors) pieces where a window edge falls inside a
tile. Windows whose edges land at every offset inside a tile and a vector, head
dims that are not a multiple of the vector width, lengths that are not a
multiple of the tile, GQA groups that split a vector over several queries,
sq ≠ sk, softcap/ALiBi on edge tiles, every dtype, every SIMD level, and the
lse the backward pass reads. Parity with tests/reference.py's float64 formula."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mamba_attention._core")

from conftest import convert, split_kind  # noqa: E402
from reference import TOL_ATTN, attention_ref, rel_err, to_f64  # noqa: E402

from mamba_attention import flash_attn_func  # noqa: E402


def qkv(seed, b, sq, sk, hq, hk, hd, kind):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(s) for s in
               ((b, sq, hq, hd), (b, sk, hk, hd), (b, sk, hk, hd)))
    return tuple(convert(x, kind) for x in (q, k, v))


def check(kind, q, k, v, what="", **kw):
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    ro, rl = attention_ref(q, k, v, **kw)
    dt = split_kind(kind)[1]
    err = rel_err(out, ro)
    assert err <= TOL_ATTN[dt], f"{what} out rel_err {err:.2e} ({kind}, {kw})"
    lse = to_f64(lse)
    fin = np.isfinite(rl)
    assert np.array_equal(np.isfinite(lse), fin), f"{what} lse finiteness ({kw})"
    assert (lse[~fin] == -np.inf).all()
    if fin.any():
        e = rel_err(lse[fin], rl[fin])
        assert e <= 1e-4, f"{what} lse rel_err {e:.2e} ({kind}, {kw})"
    if (~fin).any():
        assert (to_f64(out)[np.moveaxis(~fin, 1, 2)] == 0).all()


# (left, right) windows: edges at offsets 0, 1, 7, 8, 15, 16, 17, 63, 64, 65 of a
# tile / vector, causal sliding windows like C5's, and two-sided ones.
WINDOWS = [(0, 0), (1, 0), (7, 0), (8, 0), (15, 0), (16, 0), (17, 0), (31, 0),
           (63, 0), (64, 0), (65, 0), (100, 0), (127, 0), (5, 9), (40, 23), (70, 70),
           (-1, 17), (33, -1)]


@pytest.mark.parametrize("win", WINDOWS, ids=[f"w{a}_{b}" for a, b in WINDOWS])
def test_window_edges_in_tiles(simd_level, win):
    """Window edges at every interesting offset; s = 200 (not a multiple of 64)."""
    kw = dict(window_size=win)
    for sq, sk, hq, hk, hd in ((200, 200, 2, 2, 24), (131, 197, 3, 1, 20), (197, 131, 4, 2, 17)):
        q, k, v = qkv(sum(win) + hd, 1, sq, sk, hq, hk, hd, "numpy-float32")
        check("numpy-float32", q, k, v, f"sq{sq} sk{sk} hq{hq} hk{hk} hd{hd}", **kw)


@pytest.mark.parametrize("hd", [5, 15, 17, 31, 33, 40, 72, 100])
def test_head_dims_not_vector_multiple(simd_level, hd):
    """hd off the vector width, with sliding windows cutting tiles (C5-like, scaled down)."""
    q, k, v = qkv(hd, 1, 257, 257, 2, 1, hd, "numpy-float32")
    for kw in (dict(causal=True, window_size=(90, 0)), dict(causal=True),
               dict(window_size=(20, 11), softcap=2.5)):
        check("numpy-float32", q, k, v, f"hd{hd}", **kw)


@pytest.mark.parametrize("grp", [1, 2, 3, 5, 8])
def test_gqa_groups_on_edge_tiles(simd_level, grp):
    """GQA: a row vector holds 16/grp (or 8/grp) queries, so its visible key range
    spans several queries; ALiBi and softcap on the edge tiles."""
    hk, hd = 2, 16
    hq = hk * grp
    q, k, v = qkv(grp, 2, 150, 180, hq, hk, hd, "numpy-float32")
    slopes = np.random.default_rng(grp).uniform(0.05, 0.6, hq).astype(np.float32)
    for kw in (dict(causal=True, window_size=(47, 0)),
               dict(window_size=(13, 6), alibi_slopes=slopes),
               dict(causal=True, window_size=(64, 0), softcap=3.0, alibi_slopes=slopes)):
        check("numpy-float32", q, k, v, f"grp{grp}", **kw)


KINDS = ["numpy-float32", "numpy-float16", "numpy-bfloat16", "torch-float32",
         "torch-float16", "torch-bfloat16", "torch-float64"]


@pytest.mark.parametrize("kind", KINDS)
def test_c5_shape_scaled_down_every_dtype(simd_level, kind):
    """C5's mask (causal window of 128 keys) on s = 700, every dtype and framework."""
    q, k, v = qkv(5, 1, 700, 700, 4, 4, 64, kind)
    check(kind, q, k, v, "c5-small", causal=True, window_size=(127, 0))


def test_c5_shape_full_size():
    """C5 itself (b1 s4096 h16 hd64, window 512) once at the default level, with lse."""
    q, k, v = qkv(7, 1, 4096, 4096, 16, 16, 64, "torch-float32")
    out, lse, _ = flash_attn_func(q, k, v, causal=True, window_size=(511, 0), return_attn_probs=True)
    # Reference on a few heads only (the float64 reference is O(s²) per head).
    heads = [0, 7, 15]
    ro, rl = attention_ref(q[:, :, heads], k[:, :, heads], v[:, :, heads],
                           causal=True, window_size=(511, 0))
    assert rel_err(out[:, :, heads], ro) <= TOL_ATTN["float32"]
    assert rel_err(to_f64(lse[:, heads]), rl) <= 1e-4


@pytest.mark.parametrize("kind", ["numpy-float32", "torch-float16", "torch-bfloat16"])
def test_runs_of_blocks_share_packed_kv(simd_level, kind):
    """Enough row blocks that a task is a run of several consecutive blocks sharing
    one packed K/V copy (bench/cpu_attn_notes.md): GQA groups of 3 whose blocks'
    key ranges overlap off the tile grid, sliding windows, causal, two-sided."""
    q, k, v = qkv(11, 1, 1100, 1100, 6, 2, 40, kind)
    for kw in (dict(causal=True, window_size=(300, 0)), dict(causal=True),
               dict(window_size=(77, 50), softcap=4.0)):
        check(kind, q, k, v, "runs", **kw)


def test_runs_of_blocks_over_ring_cache_segments(simd_level):
    """Long appends to a sliding-window ring cache: the keys are two or three
    segments (wrapped halves + new tokens) and each task is a run of blocks."""
    import torch

    from mamba_attention import SlidingWindowKVCache

    b, total, hq, hk, hd, w = 1, 1900, 8, 2, 16, 200
    q, k, v = (torch.from_numpy(x).float() for x in qkv(12, b, total, total, hq, hk, hd, "numpy-float32"))
    cache = SlidingWindowKVCache(b, w, hk, hd, dtype=torch.float32)
    outs, t = [], 0
    for n in (150, 700, 33, 900, 117):
        outs.append(cache.append_and_attend(q[:, t:t + n], k[:, t:t + n], v[:, t:t + n]))
        t += n
    got = torch.cat(outs, 1)
    check("torch-float32", q, k, v, "ring runs", causal=True, window_size=(w - 1, 0))
    full = flash_attn_func(q, k, v, causal=True, window_size=(w - 1, 0))
    assert rel_err(got, full) <= 1e-6
    ro, _ = attention_ref(q, k, v, causal=True, window_size=(w - 1, 0))
    assert rel_err(got, ro) <= TOL_ATTN["float32"]
