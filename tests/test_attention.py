"""Attention (SPEC §3): parity of flash_attn_func / flash_attn_varlen_func /
flash_attn_with_kvcache / sliding_window_attention with the float64 reference of
tests/reference.py, over masks (causal, windows on either side, bottom-right
alignment for sq != sk, rows with no visible key), softcap, ALiBi, GQA/MQA, head
dims, lengths, dtypes, frameworks, SIMD levels and memory layouts; plus the
argument errors (each names the argument)."""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("mamba_attention._core")

from conftest import convert, is_torch, kind_of, relayout, split_kind, torch  # noqa: E402
from reference import TOL_ATTN, attention_ref, rel_err, to_f64  # noqa: E402

from mamba_attention import (  # noqa: E402
    _core,
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
    sliding_window_attention,
)


def rand(rng, *shape):
    return rng.standard_normal(shape)


def qkv64(seed, b, sq, sk, hq, hk, hd):
    rng = np.random.default_rng(seed)
    return rand(rng, b, sq, hq, hd), rand(rng, b, sk, hk, hd), rand(rng, b, sk, hk, hd)


def slopes64(seed, shape):
    return np.random.default_rng(seed + 99).uniform(0.05, 0.6, shape)


def check(out, lse, q, k, v, kind, what="", **kw):
    """Compares (out, lse) with the reference computed from the rounded inputs."""
    ro, rl = attention_ref(q, k, v, **kw)
    dt = split_kind(kind)[1]
    assert kind_of(out) == kind, (kind_of(out), kind)
    assert tuple(out.shape) == ro.shape
    err = rel_err(out, ro)
    assert err <= TOL_ATTN[dt], f"{what} out rel_err {err:.2e} ({kind}, {kw})"
    if lse is not None:
        lse = to_f64(lse)
        assert lse.shape == rl.shape
        fin = np.isfinite(rl)
        assert np.array_equal(np.isfinite(lse), fin), f"{what} lse finiteness ({kw})"
        assert (lse[~fin] == -np.inf).all(), f"{what} empty rows must have lse -inf"
        if fin.any():
            e = rel_err(lse[fin], rl[fin])
            assert e <= 1e-4, f"{what} lse rel_err {e:.2e} ({kind}, {kw})"
        if (~fin).any():  # rows with no key output exactly 0
            o = to_f64(out)
            rows = np.moveaxis(~fin, 1, 2)  # (b, sq, hq)
            assert (o[rows] == 0).all()


def lse_ok(lse, rl, what=""):
    """Finite entries within 1e-4, and -inf exactly where the reference has it."""
    lse, rl = to_f64(lse), to_f64(rl)
    fin = np.isfinite(rl)
    assert np.array_equal(np.isfinite(lse), fin) and (lse[~fin] == -np.inf).all(), what
    if fin.any():
        assert rel_err(lse[fin], rl[fin]) <= 1e-4, what


MASKS = {
    "full": dict(),
    "causal": dict(causal=True),
    "diag(0,0)": dict(window_size=(0, 0)),
    "win(2,1)": dict(window_size=(2, 1)),
    "swa(3,0)": dict(causal=True, window_size=(3, 0)),
    "left-only(-1,0)": dict(window_size=(-1, 0)),
    "right-only(0,-1)": dict(window_size=(0, -1)),
    "causal+win(5,2)": dict(causal=True, window_size=(5, 2)),
    "win(100,100)>s": dict(window_size=(100, 100)),
    "swa(1000,0)>s": dict(causal=True, window_size=(1000, 0)),
    "win(0,3)": dict(window_size=(0, 3)),
}
SHAPES = [(17, 17), (9, 33), (33, 9), (1, 40), (40, 1), (70, 150)]
FEATURES = {
    "plain": dict(),
    "softcap": dict(softcap=3.0),
    "alibi": dict(alibi="h"),
    "alibi(b,h)+softcap+scale": dict(alibi="bh", softcap=1.5, softmax_scale=0.3),
}
HEADS = [(4, 4), (4, 2), (6, 1)]


def features_kw(feat, b, hq, framework="numpy", seed=0):
    kw = dict(feat)
    a = kw.pop("alibi", None)
    if a:
        s = slopes64(seed, (hq,) if a == "h" else (b, hq))
        kw["alibi_slopes"] = convert(s, f"{framework}-float32")
    return kw


@pytest.mark.parametrize("shape", SHAPES, ids=[f"sq{a}-sk{b}" for a, b in SHAPES])
@pytest.mark.parametrize("mask", list(MASKS))
def test_masks_features_heads(simd_level, mask, shape):
    """Every mask × (sq, sk) × feature × head layout, numpy float32, each SIMD level."""
    sq, sk = shape
    b, hd = 2, 8
    for fi, (fname, feat) in enumerate(FEATURES.items()):
        for hq, hk in HEADS:
            q, k, v = (convert(x, "numpy-float32") for x in qkv64(fi, b, sq, sk, hq, hk, hd))
            kw = dict(MASKS[mask], **features_kw(feat, b, hq))
            out, lse, none = flash_attn_func(q, k, v, return_attn_probs=True, **kw)
            assert none is None
            check(out, lse, q, k, v, "numpy-float32", f"{fname} hq{hq} hk{hk}", **kw)


KINDS = ["numpy-float32", "numpy-float16", "numpy-bfloat16", "numpy-float64",
         "torch-float32", "torch-float16", "torch-bfloat16", "torch-float64"]


@pytest.mark.parametrize("kind", KINDS)
def test_dtypes_frameworks(simd_level, kind):
    """Every dtype and framework on a GQA sliding-window case long enough for many tiles."""
    b, sq, sk, hq, hk, hd = 2, 150, 200, 4, 2, 40
    q, k, v = (convert(x, kind) for x in qkv64(1, b, sq, sk, hq, hk, hd))
    fw = split_kind(kind)[0]
    for kw in (dict(causal=True, window_size=(37, 0)),
               dict(window_size=(20, 5), softcap=2.0, alibi_slopes=convert(slopes64(1, hq), f"{fw}-float32"))):
        out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **kw)
        check(out, lse, q, k, v, kind, **kw)
        if is_torch(out):
            assert out.device.type == "cpu" and lse.dtype == torch.float32


@pytest.mark.parametrize("hd", [1, 3, 8, 64, 80, 128, 256])
def test_head_dims(simd_level, hd):
    for s in (1, 2, 17):
        q, k, v = (convert(x, "numpy-float32") for x in qkv64(hd + s, 1, s, s, 2, 1, hd))
        for kw in (dict(), dict(causal=True)):
            out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **kw)
            check(out, lse, q, k, v, "numpy-float32", f"hd{hd} s{s}", **kw)


@pytest.mark.parametrize("hd", [1, 64, 128, 256])
def test_long(hd):
    """s = 300 with every head dim class, and s = 1000 with a small window."""
    q, k, v = (convert(x, "numpy-float32") for x in qkv64(hd, 1, 300, 300, 2, 2, hd))
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    check(out, lse, q, k, v, "numpy-float32", causal=True)
    if hd == 64:
        q, k, v = (convert(x, "torch-bfloat16") for x in qkv64(3, 1, 1000, 1000, 2, 1, hd))
        out = sliding_window_attention(q, k, v, 64)
        check(out, None, q, k, v, "torch-bfloat16", causal=True, window_size=(63, 0))


def test_empty_rows_and_lse():
    """sq > sk causal: the first sq - sk queries see nothing: out 0, lse -inf."""
    q, k, v = (convert(x, "torch-float32") for x in qkv64(5, 2, 20, 6, 2, 2, 16))
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert (out[:, :14] == 0).all() and torch.isneginf(lse[:, :, :14]).all()
    assert torch.isfinite(lse[:, :, 14:]).all()
    check(out, lse, q, k, v, "torch-float32", causal=True)


@pytest.mark.parametrize("layout", ["packed_qkv", "strided", "offset", "reversed_order", "negative"])
@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_layouts(simd_level, framework, layout):
    """Non-contiguous q/k/v: slices of a packed (b, s, 3, h, hd) qkv tensor (how
    flash-attn users call it), gapped, offset, Fortran-ordered, negative strides."""
    if framework == "torch" and layout == "negative":
        pytest.skip("torch has no negative strides")
    b, s, h, hd = 2, 37, 3, 24
    kind = f"{framework}-float32"
    if layout == "packed_qkv":
        qkv = convert(np.random.default_rng(7).standard_normal((b, s, 3, h, hd)), kind)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
        q, k, v = (relayout(convert(x, kind), layout) for x in qkv64(7, b, s, s, h, h, hd))
    for kw in (dict(causal=True), dict(window_size=(4, 4), softcap=5.0)):
        out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **kw)
        check(out, lse, q, k, v, kind, layout, **kw)


def test_destination_passing_poisoned():
    """out / softmax_lse given to the core are fully overwritten (NaN-poisoned first)."""
    for kind in ("numpy-float32", "torch-bfloat16"):
        q, k, v = (convert(x, kind) for x in qkv64(2, 2, 33, 47, 4, 2, 16))
        out = convert(np.full(q.shape, np.nan), kind)
        lse = convert(np.full((2, 4, 33), np.nan), f"{split_kind(kind)[0]}-float32")
        o2, l2 = _core.attention_fwd(q, k, v, None, True, (5, 0), None, None, out, lse)
        assert o2 is out and l2 is lse
        check(out, lse, q, k, v, kind, causal=True, window_size=(5, 0))


def _cu(lens, framework):
    c = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    return torch.from_numpy(c) if framework == "torch" else c


@pytest.mark.parametrize("kind", ["numpy-float32", "torch-float16", "torch-bfloat16"])
def test_varlen_vs_per_sequence(simd_level, kind):
    """Packed sequences (one with no queries, one with no keys) against the reference run
    on each sequence alone; rows after the last sequence are 0; lse is (hq, total_q)."""
    fw = split_kind(kind)[0]
    lq, lk = [5, 0, 17, 9, 30], [7, 4, 17, 0, 12]
    hq, hk, hd = 4, 2, 16
    rng = np.random.default_rng(11)
    tq, tk = sum(lq) + 3, sum(lk)  # 3 padding rows at the end of q
    q, k, v = (convert(rand(rng, *s), kind) for s in ((tq, hq, hd), (tk, hk, hd), (tk, hk, hd)))
    slopes = convert(slopes64(3, (len(lq), hq)), f"{fw}-float32")
    for kw in (dict(causal=True), dict(window_size=(3, 2), alibi_slopes=slopes, softcap=4.0)):
        out, lse, _ = flash_attn_varlen_func(q, k, v, _cu(lq, fw), _cu(lk, fw), max(lq), max(lk),
                                             return_attn_probs=True, **kw)
        assert tuple(lse.shape) == (hq, tq)
        cq, ck = np.cumsum([0] + lq), np.cumsum([0] + lk)
        for i in range(len(lq)):
            sl_q, sl_k = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
            if lq[i] == 0:
                continue
            kwi = dict(kw)
            if "alibi_slopes" in kw:
                kwi["alibi_slopes"] = to_f64(slopes)[i]
            if lk[i] == 0:
                assert (to_f64(out[sl_q]) == 0).all() and np.isneginf(to_f64(lse[:, sl_q])).all()
                continue
            ro, rl = attention_ref(q[None, sl_q], k[None, sl_k], v[None, sl_k], **kwi)
            assert rel_err(out[sl_q], ro[0]) <= TOL_ATTN[split_kind(kind)[1]], (i, kw)
            lse_ok(lse[:, sl_q], rl[0], (i, kw))
        assert (to_f64(out[tq - 3:]) == 0).all() and np.isneginf(to_f64(lse[:, tq - 3:])).all()


@pytest.mark.parametrize("kind", ["numpy-float32", "torch-float32", "torch-bfloat16"])
def test_kvcache_vs_full(simd_level, kind):
    """Append s_new tokens at per-batch cache_seqlens in place, then attend over
    cache[:seqlen + s_new]; equals the reference on the concatenated keys."""
    fw = split_kind(kind)[0]
    b, sc, hq, hk, hd, sn = 3, 64, 4, 2, 16, 3
    rng = np.random.default_rng(5)
    kc0, vc0 = rand(rng, b, sc, hk, hd), rand(rng, b, sc, hk, hd)
    kn, vn, q = rand(rng, b, sn, hk, hd), rand(rng, b, sn, hk, hd), rand(rng, b, sn, hq, hd)
    lens = np.array([5, 0, 40], np.int32)
    kc, vc = convert(kc0, kind), convert(vc0, kind)
    kn, vn, q = convert(kn, kind), convert(vn, kind), convert(q, kind)
    before_k = to_f64(kc).copy()
    cs = torch.from_numpy(lens) if fw == "torch" else lens
    for kw in (dict(causal=True), dict(causal=True, window_size=(6, 0), softcap=3.0,
                                       alibi_slopes=convert(slopes64(0, hq), f"{fw}-float32"))):
        kcc = kc.clone() if fw == "torch" else kc.copy()
        vcc = vc.clone() if fw == "torch" else vc.copy()
        out, lse = flash_attn_with_kvcache(q, kcc, vcc, kn, vn, cache_seqlens=cs,
                                           return_softmax_lse=True, **kw)
        K = to_f64(kcc)
        for i in range(b):
            n = lens[i]
            assert np.array_equal(K[i, n:n + sn], to_f64(kn)[i]), "new keys written in place"
            assert np.array_equal(K[i, :n], before_k[i, :n]) and np.array_equal(K[i, n + sn:], before_k[i, n + sn:])
            ro, rl = attention_ref(q[i:i + 1], kcc[i:i + 1, :n + sn], vcc[i:i + 1, :n + sn], **kw)
            assert rel_err(out[i], ro[0]) <= TOL_ATTN[split_kind(kind)[1]], (i, kw)
            lse_ok(lse[i], rl[0], (i, kw))
    # an int cache_seqlens, and attending without appending
    kcc = kc.clone() if fw == "torch" else kc.copy()
    out = flash_attn_with_kvcache(q, kcc, vc, cache_seqlens=20)
    check(out, None, q, kc[:, :20], vc[:, :20], kind)
    out = flash_attn_with_kvcache(q, kc, vc)
    check(out, None, q, kc, vc, kind)


def test_decode_stream_kvcache():
    """Token-by-token decoding with flash_attn_with_kvcache equals full causal attention."""
    b, s, hq, hk, hd = 2, 40, 4, 1, 32
    q, k, v = (convert(x, "torch-float32") for x in qkv64(9, b, s, s, hq, hk, hd))
    kc, vc = torch.zeros(b, s, hk, hd), torch.zeros(b, s, hk, hd)
    outs = []
    for t in range(s):
        outs.append(flash_attn_with_kvcache(q[:, t:t + 1], kc, vc, k[:, t:t + 1], v[:, t:t + 1],
                                            cache_seqlens=t, causal=True))
    full = flash_attn_func(q, k, v, causal=True)
    assert rel_err(torch.cat(outs, 1), full) <= 1e-5


def test_sliding_window_attention():
    q, k, v = (convert(x, "numpy-float32") for x in qkv64(4, 1, 90, 90, 2, 2, 8))
    out = sliding_window_attention(q, k, v, 10)
    check(out, None, q, k, v, "numpy-float32", causal=True, window_size=(9, 0))
    assert np.array_equal(out, flash_attn_func(q, k, v, causal=True, window_size=(9, 0)))


def test_cuda_float32_and_kvcache_errors():
    """CUDA: float32 q is a TypeError naming q (the CUDA kernel takes float16/bfloat16);
    functions without a CUDA kernel yet raise RuntimeError."""
    if torch is None or not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    q = torch.randn(1, 4, 2, 8, device="cuda")
    with pytest.raises(TypeError, match="q"):
        flash_attn_func(q, q, q)
    qh = q.half()
    with pytest.raises(RuntimeError, match="CUDA"):
        flash_attn_with_kvcache(qh, qh, qh)


# ----------------------------------------------------------------------- errors

def _arr(*shape, dtype=np.float32):
    return (np.random.default_rng(0).standard_normal(shape) + 1).astype(dtype)


B, SQ, SK, HQ, HK, HD = 2, 5, 7, 4, 2, 8
V, T = ValueError, TypeError

FUNC_ERRORS = {
    "q-rank3": (dict(q=_arr(SQ, HQ, HD)), V, ["q"]),
    "q-int": (dict(q=_arr(B, SQ, HQ, HD, dtype=np.int32)), T, ["q"]),
    "q-list": (dict(q=[[1.0]]), T, ["q"]),
    "q-None": (dict(q=None), T, ["q"]),
    "q-empty": (dict(q=_arr(B, 0, HQ, HD)), V, ["q"]),
    "k-rank5": (dict(k=_arr(B, SK, HK, HD, 1)), V, ["k"]),
    "k-batch": (dict(k=_arr(B + 1, SK, HK, HD), v=_arr(B + 1, SK, HK, HD)), V, ["k"]),
    "k-hd": (dict(k=_arr(B, SK, HK, HD + 1), v=_arr(B, SK, HK, HD + 1)), V, ["k"]),
    "k-heads-indivisible": (dict(k=_arr(B, SK, 3, HD), v=_arr(B, SK, 3, HD)), V, ["k"]),
    "k-dtype": (dict(k=_arr(B, SK, HK, HD, dtype=np.float16)), T, ["k"]),
    "k-empty": (dict(k=_arr(B, 0, HK, HD), v=_arr(B, 0, HK, HD)), V, ["k"]),
    "v-shape": (dict(v=_arr(B, SK + 1, HK, HD)), V, ["v"]),
    "v-dtype": (dict(v=_arr(B, SK, HK, HD, dtype=np.float64)), T, ["v"]),
    "v-str": (dict(v="v"), T, ["v"]),
    "alibi-shape": (dict(alibi_slopes=_arr(HQ + 1)), V, ["alibi_slopes"]),
    "alibi-shape2": (dict(alibi_slopes=_arr(B + 1, HQ)), V, ["alibi_slopes"]),
    "alibi-int": (dict(alibi_slopes=_arr(HQ, dtype=np.int64)), T, ["alibi_slopes"]),
    "window-neg": (dict(window_size=(-2, 0)), V, ["window_size"]),
    "window-neg-right": (dict(window_size=(3, -5)), V, ["window_size"]),
    "window-str": (dict(window_size="ab"), T, ["window_size"]),
    "window-3": (dict(window_size=(1, 2, 3)), T, ["window_size"]),
    "softcap-neg": (dict(softcap=-1.0), V, ["softcap"]),
    "softcap-nan": (dict(softcap=float("nan")), V, ["softcap"]),
    "softcap-str": (dict(softcap="x"), T, ["softcap"]),
    "scale-inf": (dict(softmax_scale=float("inf")), V, ["softmax_scale"]),
    "scale-str": (dict(softmax_scale="x"), T, ["softmax_scale"]),
    "dropout": (dict(dropout_p=0.1), V, ["dropout_p"]),
    "dropout-str": (dict(dropout_p="0"), T, ["dropout_p"]),
}


def _convert(x, framework):
    if framework == "torch" and isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    return x


def _check(fn, kwargs, exc, names):
    with pytest.raises(BaseException) as info:
        fn(**kwargs)
    e = info.value
    assert type(e) is exc, f"expected {exc.__name__}, got {type(e).__name__}: {e}"
    msg = str(e)
    assert any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", msg) for n in names), \
        f"message does not name any of {names}: {msg!r}"


@pytest.mark.parametrize("case", list(FUNC_ERRORS))
@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_flash_attn_func_errors(framework, case):
    over, exc, names = FUNC_ERRORS[case]
    kw = dict(q=_arr(B, SQ, HQ, HD), k=_arr(B, SK, HK, HD), v=_arr(B, SK, HK, HD))
    kw.update(over)
    kw = {n: _convert(x, framework) for n, x in kw.items()}
    _check(flash_attn_func, kw, exc, names)


def _varlen_base():
    return dict(q=_arr(12, HQ, HD), k=_arr(15, HK, HD), v=_arr(15, HK, HD),
                cu_seqlens_q=np.array([0, 5, 12], np.int32), cu_seqlens_k=np.array([0, 7, 15], np.int32),
                max_seqlen_q=7, max_seqlen_k=8)


VARLEN_ERRORS = {
    "q-rank4": (dict(q=_arr(1, 12, HQ, HD)), V, ["q"]),
    "k-hd": (dict(k=_arr(15, HK, HD + 1), v=_arr(15, HK, HD + 1)), V, ["k"]),
    "cu_q-float": (dict(cu_seqlens_q=np.array([0.0, 5, 12], np.float32)), T, ["cu_seqlens_q"]),
    "cu_q-rank2": (dict(cu_seqlens_q=np.array([[0, 5, 12]], np.int32)), V, ["cu_seqlens_q"]),
    "cu_k-len": (dict(cu_seqlens_k=np.array([0, 15], np.int32)), V, ["cu_seqlens_k"]),
    "cu_q-decreasing": (dict(cu_seqlens_q=np.array([0, 6, 5], np.int32)), V, ["cu_seqlens_q"]),
    "cu_q-negative": (dict(cu_seqlens_q=np.array([-1, 5, 12], np.int32)), V, ["cu_seqlens_q"]),
    "cu_k-beyond-total": (dict(cu_seqlens_k=np.array([0, 7, 16], np.int32)), V, ["cu_seqlens_k"]),
    "max_seqlen_q-small": (dict(max_seqlen_q=6), V, ["max_seqlen_q"]),
    "max_seqlen_k-str": (dict(max_seqlen_k="8"), T, ["max_seqlen_k"]),
    "alibi-batch": (dict(alibi_slopes=_arr(3, HQ)), V, ["alibi_slopes"]),
}


@pytest.mark.parametrize("case", list(VARLEN_ERRORS))
@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_varlen_errors(framework, case):
    over, exc, names = VARLEN_ERRORS[case]
    kw = _varlen_base()
    kw.update(over)
    kw = {n: _convert(x, framework) for n, x in kw.items()}
    _check(flash_attn_varlen_func, kw, exc, names)


KVC_ERRORS = {
    "k_cache-batch": (dict(k_cache=_arr(B + 1, 16, HK, HD), v_cache=_arr(B + 1, 16, HK, HD)), V, ["k_cache"]),
    "v_cache-shape": (dict(v_cache=_arr(B, 15, HK, HD)), V, ["v_cache"]),
    "k-without-v": (dict(v=None), V, ["v"]),
    "v-without-k": (dict(k=None), V, ["k"]),
    "k-shape": (dict(k=_arr(B, 2, HK + 1, HD)), V, ["k"]),
    "k-dtype": (dict(k=_arr(B, 2, HK, HD, dtype=np.float16)), T, ["k"]),
    "seqlens-none-with-k": (dict(cache_seqlens=None), V, ["cache_seqlens"]),
    "seqlens-overflow": (dict(cache_seqlens=15), V, ["cache_seqlens"]),
    "seqlens-negative": (dict(cache_seqlens=np.array([-1, 0], np.int32)), V, ["cache_seqlens"]),
    "seqlens-shape": (dict(cache_seqlens=np.array([1, 2, 3], np.int32)), V, ["cache_seqlens"]),
    "seqlens-float": (dict(cache_seqlens=np.array([1.0, 2.0], np.float32)), T, ["cache_seqlens"]),
}


@pytest.mark.parametrize("case", list(KVC_ERRORS))
@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_kvcache_errors(framework, case):
    over, exc, names = KVC_ERRORS[case]
    kw = dict(q=_arr(B, 2, HQ, HD), k_cache=_arr(B, 16, HK, HD), v_cache=_arr(B, 16, HK, HD),
              k=_arr(B, 2, HK, HD), v=_arr(B, 2, HK, HD), cache_seqlens=np.array([3, 4], np.int32))
    kw.update(over)
    kw = {n: _convert(x, framework) for n, x in kw.items()}
    kc = kw["k_cache"]
    saved = to_f64(kc).copy()
    _check(flash_attn_with_kvcache, kw, exc, names)
    assert np.array_equal(to_f64(kc), saved), "cache modified by a call that raised"


def test_sliding_window_errors():
    q = _arr(1, 4, 2, 8)
    _check(sliding_window_attention, dict(q=q, k=q, v=q, window=0), V, ["window"])
    _check(sliding_window_attention, dict(q=q, k=q, v=q, window=2.5), T, ["window"])


# ------------------------------------------------------- sliding-window ring cache

from mamba_attention import SlidingWindowKVCache  # noqa: E402


@pytest.mark.parametrize("kind", ["torch-float32", "numpy-float32", "torch-bfloat16"])
def test_ring_cache_long_stream(simd_level, kind):
    """A stream of 150 tokens through a window-16 ring (steps of 1..20 tokens, some
    larger than the window) equals full sliding-window attention over the stream,
    ALiBi at true positions included; the cache never grows."""
    fw, dt = split_kind(kind)
    b, total, hq, hk, hd, w = 2, 150, 4, 2, 16, 16
    q, k, v = (convert(x, kind) for x in qkv64(21, b, total, total, hq, hk, hd))
    slopes = convert(slopes64(2, hq), f"{fw}-float32")
    for kw in (dict(), dict(alibi_slopes=slopes, softcap=5.0, softmax_scale=0.4)):
        dtype = getattr(torch, dt) if fw == "torch" else dt
        cache = SlidingWindowKVCache(b, w, hk, hd, dtype=dtype)
        outs, t = [], 0
        for n in [1, 1, 3, 20, 1, 7, 16, 2] * 10:
            if t >= total:
                break
            n = min(n, total - t)
            outs.append(cache.append_and_attend(q[:, t:t + n], k[:, t:t + n], v[:, t:t + n], **kw))
            t += n
            assert cache.pos == t and tuple(cache.k.shape) == (b, w, hk, hd)
        got = torch.cat(outs, 1) if fw == "torch" else np.concatenate(outs, 1)
        check(got, None, q, k, v, kind, "ring", causal=True, window_size=(w - 1, 0), **kw)
        full = flash_attn_func(q, k, v, causal=True, window_size=(w - 1, 0), **kw)
        # Same arithmetic up to summation order: float32 agrees to ~1e-7; bfloat16
        # outputs may round a few elements to the neighbouring value.
        assert rel_err(got, full) <= (1e-6 if dt == "float32" else 4e-3)


def test_ring_cache_errors():
    cache = SlidingWindowKVCache(2, 8, 2, 16, dtype=torch.float32)
    q, k = torch.randn(2, 1, 4, 16), torch.randn(2, 1, 2, 16)
    _check(cache.append_and_attend, dict(q=q, k=k[:, :, :1], v=k), V, ["k"])
    _check(cache.append_and_attend, dict(q=q, k=k, v=k.double()), T, ["v"])
    _check(cache.append_and_attend, dict(q=q[:1], k=k, v=k), V, ["k_ring", "k"])
    _check(cache.append_and_attend, dict(q=q, k=k, v=k, softcap=-1.0), V, ["softcap"])
    assert cache.pos == 0
    _check(SlidingWindowKVCache, dict(batch=1, window=0, n_kv_heads=1, head_dim=8), V, ["window"])
    _check(SlidingWindowKVCache, dict(batch=1, window=4.0, n_kv_heads=1, head_dim=8), T, ["window"])


@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(causal=True, window_size=(1500, 0)),
                                dict(softcap=2.0, alibi="h"), dict(window_size=(700, 300))])
def test_split_kv_long_context(simd_level, kw):
    """Few rows over a long context (decoding): the keys are split into chunks run in
    parallel and merged by lse (split-KV); equals the reference, rows with no key included."""
    b, sq, sk, hq, hk, hd = 1, 3, 3000, 4, 1, 32
    q, k, v = (convert(x, "torch-float32") for x in qkv64(13, b, sq, sk, hq, hk, hd))
    kw = dict(kw, **features_kw(dict(alibi=kw.pop("alibi")) if "alibi" in kw else {}, b, hq, "torch"))
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    check(out, lse, q, k, v, "torch-float32", "split-kv", **kw)
    kc, vc = torch.zeros(b, 4000, hk, hd), torch.zeros(b, 4000, hk, hd)
    kc[:, :sk - sq], vc[:, :sk - sq] = k[:, :sk - sq], v[:, :sk - sq]
    out2, lse2 = flash_attn_with_kvcache(q, kc, vc, k[:, sk - sq:], v[:, sk - sq:], cache_seqlens=sk - sq,
                                         return_softmax_lse=True, **kw)
    check(out2, lse2, q, k, v, "torch-float32", "split-kv kvcache", **kw)
    # queries that see no key (window entirely before the first key) stay 0 / -inf
    out3, lse3, _ = flash_attn_func(q, k[:, :5], v[:, :5], window_size=(0, 0), return_attn_probs=True)
    check(out3, lse3, q, k[:, :5], v[:, :5], "torch-float32", window_size=(0, 0))
