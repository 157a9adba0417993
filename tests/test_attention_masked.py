"""Attention (SPEC §3): what a query cannot see changes nothing it outputs, and
extreme option values neither overflow nor lose accuracy (issue 15, items 2, 5, 6, 9).

- Masked keys contribute nothing, whatever their bits: a NaN/±inf in K or V at a
  key that a query cannot see (causal, windows, sq ≠ sk bottom-right alignment,
  GQA, varlen padding and other sequences, kv-cache slots past cache_seqlens, ring
  slots of an earlier stream) leaves that query's output, lse and gradients
  bitwise unchanged, and a key no query sees gets exactly zero gradients. One
  regression test per function, then Hypothesis property tests that place the
  poison at random and check that exactly the entries SPEC lets depend on it
  may change (the forward on every SIMD level and on CUDA through ``target``).
- Window bounds, ring positions and cache_seqlens near 2⁶³ saturate (a bound past
  every key is unbounded) or are rejected with a ValueError naming the argument.
- softcap is float32-exact for every softcap > 0 (1e4 … 1e38 and beyond).
- cache_seqlens must have shape (b,) (a (1,) tensor is not broadcast).

On CUDA the kernels take float16/bfloat16 (as tests/test_attention_cuda*.py); the
kv-cache function is CPU only there; the ring cache runs its CUDA paths.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("mamba_attention._core")
torch = pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from conftest import on_cuda, sync, target_device  # noqa: E402
from reference import attention_mask, attention_ref, rel_err  # noqa: E402

from mamba_attention import (  # noqa: E402
    SlidingWindowKVCache,
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
    sliding_window_attention,
)

NAN, INF = float("nan"), float("inf")
POISONS = [NAN, INF, -INF]
PROP = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def dev():
    return target_device()


def dtypes():
    """The dtypes the attention kernels take on the target."""
    return [torch.bfloat16, torch.float16] if on_cuda() else [torch.float32]


def hd_of(hd):
    """A head dim the target's kernels take (CUDA: a multiple of 8)."""
    return max(8, (hd + 7) // 8 * 8) if on_cuda() else hd


def randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype).to(dev())


def cpu_only_fn(name):
    if on_cuda():
        pytest.skip(f"{name} has no CUDA kernel (CPU only)")


def outside_equal(a, b, allowed, what, rtol=None):
    """a and b (same shape) are bitwise equal outside the ``allowed`` mask (or, with
    ``rtol``, finite there and within rtol in relative L2 norm)."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    keep = ~torch.as_tensor(allowed)
    if rtol is not None:
        assert torch.isfinite(a[keep]).all(), f"{what}: non-finite outside the poison's reach"
        assert rel_err(a[keep], b[keep]) <= rtol, f"{what}: {rel_err(a[keep], b[keep]):.2e}"
        return
    assert torch.equal(a[keep], b[keep]), (
        f"{what}: {int((a[keep] != b[keep]).sum())} entries outside the poisoned key's "
        f"reach changed (non-finite: {int((~torch.isfinite(a[keep])).sum())})")


# --------------------------------------------------------------- the reproducers

def test_issue_reproducer_causal_nan_value(target):
    """Issue 15 item 2, verbatim on the CPU: key 7 is masked for rows 0..6."""
    g = torch.Generator().manual_seed(0)
    hd = hd_of(8)
    for dt in dtypes():
        q, k, v = (randn(g, 1, 8, 2, hd, dtype=dt) for _ in range(3))
        ref = flash_attn_func(q, k, v, causal=True)
        v[0, 7] = NAN
        out = flash_attn_func(q, k, v, causal=True)
        sync()
        assert torch.equal(out[0, :7], ref[0, :7]), "rows 0..6 cannot see key 7"
        assert torch.isnan(out[0, 7]).all()


def _tiled_case(dt, seed=1, hd=24):
    """Shapes that cut tiles on every backend: 150 queries / 150 keys, GQA 4:2.
    (CUDA: head dim 128 in float16/bfloat16 runs the wgmma forward on sm_90.)"""
    g = torch.Generator().manual_seed(seed)
    hd = hd_of(hd)
    q, k, v = (randn(g, 2, 150, h, hd, dtype=dt) for h in (4, 2, 2))
    return q, k, v


@pytest.mark.parametrize("hd", [24, 128])
@pytest.mark.parametrize("which", ["k", "v"])
@pytest.mark.parametrize("mask", [dict(causal=True), dict(window_size=(5, 3)),
                                  dict(causal=True, window_size=(20, 0))])
def test_masked_poison_forward_tiles(target, which, mask, hd):
    """A NaN/inf at keys each masked for some rows of edge tiles (the diagonal, the
    window's lower edge): the rows that cannot see them are bitwise unchanged."""
    for dt in dtypes():
        q, k, v = _tiled_case(dt, hd=hd)
        ref, rlse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **mask)
        t = {"k": k, "v": v}[which]
        keys = [3, 64, 70, 100, 149]
        for j, p in zip(keys, [NAN, INF, -INF, NAN, INF]):
            t[1, j, 1, 5] = p
        out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **mask)
        sync()
        vis = torch.from_numpy(attention_mask(150, 150, mask.get("causal", False),
                                              mask.get("window_size", (-1, -1))))
        seen = vis[:, keys].any(-1)  # rows that see a poisoned key
        allowed = torch.zeros(out.shape, dtype=torch.bool)
        allowed[1, seen, 2:4] = True  # query heads 2, 3 read kv head 1
        outside_equal(out, ref, allowed, "out")
        allowed_lse = torch.zeros(lse.shape, dtype=torch.bool)
        allowed_lse[1, 2:4, seen] = which == "k"
        outside_equal(lse, rlse, allowed_lse, "lse")


def test_sliding_window_attention_masked_nan(target):
    for dt in dtypes():
        q, k, v = _tiled_case(dt, seed=2)
        ref = sliding_window_attention(q, k, v, 16)
        # Keys off the lane-vector boundaries: query 43 sees key 43, query 42 does not.
        v[0, 43, 0] = NAN
        v[1, 91, 1, 2] = -INF
        k[0, 90, 1] = INF
        out = sliding_window_attention(q, k, v, 16)
        sync()
        allowed = torch.zeros(out.shape, dtype=torch.bool)
        allowed[0, 43:59, 0:2] = True
        allowed[1, 91:107, 2:4, 2] = True
        allowed[0, 90:106, 2:4] = True
        outside_equal(out, ref, allowed, "out")


def test_varlen_padding_and_other_sequences(target):
    """NaN in the padding rows after the last sequence and in one sequence's keys:
    the other sequences, and the rows of that sequence that cannot see them, are
    unchanged (causal, bottom-right aligned per sequence)."""
    g = torch.Generator().manual_seed(3)
    hd = hd_of(16)
    cu_q = torch.tensor([0, 40, 41, 100], dtype=torch.int32)
    cu_k = torch.tensor([0, 70, 75, 130], dtype=torch.int32)
    for dt in dtypes():
        q = randn(g, 110, 4, hd, dtype=dt)
        k, v = randn(g, 140, 2, hd, dtype=dt), randn(g, 140, 2, hd, dtype=dt)
        args = (cu_q.to(dev()), cu_k.to(dev()), 59, 70)
        ref = flash_attn_varlen_func(q, k, v, *args, causal=True)
        k[130:], v[130:] = NAN, INF  # padding after the last sequence
        v[51, 0] = NAN  # sequence 0, key 51: rows i with i + 30 >= 51
        k[106, 1] = -INF  # sequence 2 (keys 75..129, rows 41..99, offset -4): rows ≥ 35
        out = flash_attn_varlen_func(q, k, v, *args, causal=True)
        sync()
        allowed = torch.zeros(out.shape, dtype=torch.bool)
        allowed[21:40, 0:2] = True
        allowed[41 + 35:100, 2:4] = True
        outside_equal(out, ref, allowed, "out")


def test_kvcache_slots_past_seqlens_and_new_tokens():
    """flash_attn_with_kvcache: cache slots past cache_seqlens + s_new (torch.empty's
    garbage) and a new key that earlier new queries cannot see (causal)."""
    g = torch.Generator().manual_seed(4)
    b, sc, hk, hd = 2, 40, 2, 16
    kc, vc = randn(g, b, sc, hk, hd), randn(g, b, sc, hk, hd)
    q, kn, vn = randn(g, b, 3, 4, hd), randn(g, b, 3, hk, hd), randn(g, b, 3, hk, hd)
    lens = torch.tensor([5, 30], dtype=torch.int32)
    ref, rlse = flash_attn_with_kvcache(q, kc.clone(), vc.clone(), kn, vn, lens, causal=True,
                                        return_softmax_lse=True)
    kc[0, 8:], vc[0, 8:], kc[1, 33:], vc[1, 33:] = NAN, NAN, INF, NAN
    vn[0, 2, 1] = NAN  # new token 2 of entry 0: only query 2 sees it
    out, lse = flash_attn_with_kvcache(q, kc, vc, kn, vn, lens, causal=True,
                                       return_softmax_lse=True)
    allowed = torch.zeros(out.shape, dtype=torch.bool)
    allowed[0, 2, 2:4] = True
    outside_equal(out, ref, allowed, "out")
    outside_equal(lse, rlse, torch.zeros(lse.shape, dtype=torch.bool), "lse")


def test_ring_cache_slots_of_an_earlier_stream(target):
    """SlidingWindowKVCache: a stream of NaN tokens, reset(), then a new stream (one
    token per step and several at once): the slots the new stream has not written
    hold the old NaNs no longer, and no step sees them."""
    g = torch.Generator().manual_seed(5)
    b, w, hk, hd = 1, 8, 2, hd_of(8)
    for dt in dtypes() + ([torch.float32] if on_cuda() else []):
        cache = SlidingWindowKVCache(b, w, hk, hd, dtype=dt, device=dev())
        clean = SlidingWindowKVCache(b, w, hk, hd, dtype=dt, device=dev())
        nan = torch.full((b, 5, hk, hd), NAN, dtype=dt, device=dev())
        cache.append_and_attend(randn(g, b, 5, 4, hd, dtype=dt), nan, nan)
        cache.reset()
        for n in (1, 1, 3, 1):
            q, k, v = (randn(g, b, n, h, hd, dtype=dt) for h in (4, hk, hk))
            got = cache.append_and_attend(q, k, v)
            want = clean.append_and_attend(q, k, v)
            sync()
            assert torch.isfinite(got).all(), (dt, n)
            assert torch.equal(got, want), (dt, n)


# ----------------------------------------------------------------- the backward

def _grads(q, k, v, do, deterministic=True, **kw):
    """(out, dq, dk, dv); deterministic (CUDA: dQ without atomics) so that runs
    compare bit for bit."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = flash_attn_func(q, k, v, deterministic=deterministic, **kw)
    return (out,) + torch.autograd.grad(out, (q, k, v), do)


@pytest.mark.parametrize("which", ["k", "v"])
def test_masked_poison_backward(target, which):
    """dQ/dK/dV of everything that cannot see a poisoned key are bitwise unchanged,
    and a key that no query sees gets exactly zero gradients (whatever its bits)."""
    mask = dict(causal=True, window_size=(30, 0))
    for dt in dtypes():
        q, k, v = _tiled_case(dt, seed=6)
        do = randn(torch.Generator().manual_seed(7), *q.shape, dtype=dt)
        # 150 queries see keys i - 30 .. i: every key is seen; with sq < sk the first
        # keys are seen by nobody.
        base = _grads(q, k, v, do, **mask)
        t = {"k": k, "v": v}[which]
        t[0, 70, 1, 3] = NAN
        t[0, 140, 0] = INF
        got = _grads(q, k, v, do, **mask)
        sync()
        vis = torch.from_numpy(attention_mask(150, 150, True, (30, 0)))
        r1, r0 = vis[:, 70], vis[:, 140]  # rows that see each poisoned key
        aq = torch.zeros(q.shape, dtype=torch.bool)
        aq[0, r1, 2:4], aq[0, r0, 0:2] = True, True
        akv = torch.zeros(k.shape, dtype=torch.bool)
        akv[0, vis[r1].any(0), 1], akv[0, vis[r0].any(0), 0] = True, True
        akv[0, 70, 1], akv[0, 140, 0] = True, True
        for name, a, r, allowed in zip(("out", "dq", "dk", "dv"), got, base,
                                       (aq, aq, akv, akv)):
            outside_equal(a, r, allowed, name)
        if on_cuda():  # dQ by atomics (order varies run to run): finite and close
            fast = _grads(q, k, v, do, deterministic=False, **mask)
            sync()
            for name, a, r, allowed in zip(("out", "dq", "dk", "dv"), fast, base,
                                           (aq, aq, akv, akv)):
                outside_equal(a, r, allowed, name, rtol=1e-2)
        # Keys no query sees (sq < sk): exactly zero gradients, even when poisoned.
        q, k2, v2 = _tiled_case(dt, seed=6)
        qs, do2 = q[:, 100:], do[:, 100:]
        k2[1, :60], v2[1, :60] = NAN, INF  # 50 queries, window 30: keys < 70 unseen
        _, dq, dk, dv = _grads(qs, k2, v2, do2, **mask)
        sync()
        assert torch.isfinite(dq).all()
        assert (dk[1, :60] == 0).all() and (dv[1, :60] == 0).all()


# ------------------------------------------------------- item 5: huge bounds

def test_window_bound_near_2_63(target):
    """window_size=(-1, 2**63 - 1) is unbounded (was: all zeros, integer overflow)."""
    for dt in dtypes():
        q, k, v = _tiled_case(dt, seed=8)
        ref = flash_attn_func(q, k, v)
        for w in [(-1, 2**63 - 1), (2**63 - 1, -1), (2**63 - 1, 2**63 - 1), (2**62, 2**31),
                  (2**31 - 1, 2**31 - 1)]:
            out = flash_attn_func(q, k, v, window_size=w)
            sync()
            assert torch.equal(out, ref), w
        causal = flash_attn_func(q, k, v, causal=True)
        assert torch.equal(flash_attn_func(q, k, v, causal=True, window_size=(2**63 - 1, 5)),
                           causal)
        do = torch.ones_like(q)
        got = _grads(q, k, v, do, window_size=(2**63 - 1, 2**63 - 1))
        want = _grads(q, k, v, do)
        for a, r in zip(got, want):
            assert torch.equal(a, r)


def test_window_bound_beyond_int64(target):
    """Python ints past int64 saturate too (no-grad path); a hugely negative bound is
    still a ValueError naming window_size."""
    q, k, v = _tiled_case(dtypes()[0], seed=9)
    ref = flash_attn_func(q, k, v)
    assert torch.equal(flash_attn_func(q, k, v, window_size=(2**70, 2**64)), ref)
    with pytest.raises(ValueError, match="window_size"):
        flash_attn_func(q, k, v, window_size=(-2**70, 0))


def test_window_bound_varlen_and_kvcache():
    g = torch.Generator().manual_seed(10)
    q, k, v = randn(g, 30, 2, 8), randn(g, 50, 1, 8), randn(g, 50, 1, 8)
    cu_q = torch.tensor([0, 10, 30], dtype=torch.int32)
    cu_k = torch.tensor([0, 25, 50], dtype=torch.int32)
    ref = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 20, 25)
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 20, 25, window_size=(2**63 - 1, 2**63 - 1))
    assert torch.equal(out, ref)
    kc, vc, qd = randn(g, 2, 16, 1, 8), randn(g, 2, 16, 1, 8), randn(g, 2, 2, 2, 8)
    ref = flash_attn_with_kvcache(qd, kc, vc, cache_seqlens=12)
    out = flash_attn_with_kvcache(qd, kc, vc, cache_seqlens=12, window_size=(-1, 2**63 - 1))
    assert torch.equal(out, ref)


def test_ring_pos_near_2_63(target):
    """SlidingWindowKVCache.pos = 2**63 - 1 equals the same ring at an equivalent small
    position (only pos mod W and distances matter); positions past int64 are refused."""
    g = torch.Generator().manual_seed(11)
    b, w, hk, hd = 2, 5, 1, hd_of(8)
    for dt in dtypes():
        big = SlidingWindowKVCache(b, w, hk, hd, dtype=dt, device=dev())
        small = SlidingWindowKVCache(b, w, hk, hd, dtype=dt, device=dev())
        p = 2**63 - 1
        big.pos, small.pos = p - 4, w + (p - 4) % w
        ring = randn(g, b, w, hk, hd, dtype=dt)
        for c in (big, small):
            c.k.copy_(ring)
            c.v.copy_(ring.flip(1))
        for n in (3, 1):  # positions p-4 .. p-2, then p-1
            q, k, v = (randn(g, b, n, h, hd, dtype=dt) for h in (2, hk, hk))
            got, want = big.append_and_attend(q, k, v), small.append_and_attend(q, k, v)
            sync()
            assert torch.equal(got, want), n
        q, k, v = (randn(g, b, 1, h, hd, dtype=dt) for h in (2, hk, hk))
        got, want = big.append_and_attend(q, k, v), small.append_and_attend(q, k, v)  # pos p
        assert torch.equal(got, want)
        with pytest.raises(ValueError, match="pos"):
            big.append_and_attend(q, k, v)  # the next position, 2**63, is not an int64
        with pytest.raises(ValueError, match="pos"):
            big.pos = 2**63


def test_cache_seqlens_huge_values():
    g = torch.Generator().manual_seed(12)
    kc, vc, q = randn(g, 2, 16, 1, 8), randn(g, 2, 16, 1, 8), randn(g, 2, 1, 2, 8)
    kn, vn = randn(g, 2, 2, 1, 8), randn(g, 2, 2, 1, 8)
    for lens in [2**63 - 2, 2**63 - 1, 2**64, 2**80, torch.tensor([2**63 - 2, 3]),
                 torch.tensor([3, 2**63 - 1]),
                 torch.tensor([2**63, 1], dtype=torch.uint64),
                 np.array([1, 2**64 - 1], dtype=np.uint64)]:
        with pytest.raises(ValueError, match="cache_seqlens") as e:
            flash_attn_with_kvcache(q, kc, vc, kn, vn, lens)
        assert "-9223372036854775808" not in str(e.value) and "-1 " not in str(e.value)


def test_cache_seqlens_shape_not_broadcast():
    """Issue 15 item 9: a (1,) tensor with b = 2 is rejected, not broadcast."""
    g = torch.Generator().manual_seed(13)
    kc, vc, q = randn(g, 2, 16, 1, 8), randn(g, 2, 16, 1, 8), randn(g, 2, 1, 2, 8)
    for bad in [torch.tensor([5], dtype=torch.int32), torch.tensor(5, dtype=torch.int32),
                np.array([5], dtype=np.int32), torch.tensor([5, 5, 5], dtype=torch.int32)]:
        with pytest.raises(ValueError, match=r"cache_seqlens.*\(b,\)"):
            flash_attn_with_kvcache(q, kc, vc, cache_seqlens=bad)
    ok = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([5, 5], dtype=torch.int32))
    assert torch.equal(ok, flash_attn_with_kvcache(q, kc, vc, cache_seqlens=5))


# ---------------------------------------------------------- item 6: softcap

@pytest.mark.parametrize("softcap", [30.0, 1e4, 1e6, 1e30, 1e38, 1e300])
def test_softcap_exact_for_any_cap(target, softcap):
    """softcap·tanh(s/softcap) to float32 rounding for every softcap (was: off by
    9e-4 / 0.037 / 1.15 at 1e4 / 1e6 / 1e30 on the CPU; 1e38 overflowed on CUDA)."""
    g = torch.Generator().manual_seed(14)
    hd = hd_of(24)
    for dt in dtypes():
        q = randn(g, 2, 37, 4, hd, dtype=dt) * 3
        k, v = randn(g, 2, 45, 2, hd, dtype=dt), randn(g, 2, 45, 2, hd, dtype=dt)
        out, lse, _ = flash_attn_func(q, k, v, causal=True, softcap=softcap,
                                      return_attn_probs=True)
        sync()
        ro, rl = attention_ref(q.cpu(), k.cpu(), v.cpu(), causal=True, softcap=softcap)
        tol = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 8e-3}[dt]
        assert rel_err(out, ro) <= tol, (dt, rel_err(out, ro))
        fin = np.isfinite(rl)
        assert rel_err(lse.cpu().numpy()[fin], rl[fin]) <= (1e-4 if on_cuda() else 2e-6)
        if softcap >= 1e6:  # equal to no softcap at all, to the rounding
            plain = flash_attn_func(q, k, v, causal=True)
            assert rel_err(out, plain.double()) <= (1e-6 if dt == torch.float32 else tol)


@pytest.mark.parametrize("softcap", [30.0, 1e4, 1e30, 1e38])
def test_softcap_exact_backward(target, softcap):
    g = torch.Generator().manual_seed(15)
    hd = hd_of(16)
    for dt in dtypes():
        q, k, v, do = (randn(g, 1, 29, 2, hd, dtype=dt) * 2 for _ in range(4))
        got = _grads(q, k, v, do, causal=True, softcap=softcap, deterministic=False)
        qd, kd, vd = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
        s = torch.einsum("bihd,bjhd->bhij", qd, kd) / math.sqrt(hd)
        s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(~torch.from_numpy(attention_mask(29, 29, True)), -INF)
        out = torch.einsum("bhij,bjhd->bihd", torch.softmax(s, -1), vd)
        want = (out,) + torch.autograd.grad(out, (qd, kd, vd), do.cpu().double())
        tol = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}[dt]
        for name, a, r in zip(("out", "dq", "dk", "dv"), got, want):
            assert rel_err(a, r) <= tol, (name, dt, softcap, rel_err(a, r))


# ------------------------------------------------- NaN isolation, property tests

@st.composite
def problem(draw, varlen=False):
    """A small attention problem: shapes, mask and where to put the poison."""
    grp, hk = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    hd = draw(st.integers(1, 20))
    causal = draw(st.booleans())
    left = draw(st.sampled_from([-1, 0, 1, 3, 9, 40]))
    right = 0 if causal else draw(st.sampled_from([-1, 0, 2, 7, 40]))
    if varlen:
        nseq = draw(st.integers(1, 3))
        lq = [draw(st.integers(0, 20)) for _ in range(nseq)]
        lk = [draw(st.integers(0, 24)) for _ in range(nseq)]
        pad_q, pad_k = draw(st.integers(0, 3)), draw(st.integers(0, 3))
        shape = dict(lq=lq, lk=lk, pad_q=pad_q, pad_k=pad_k)
        total_k = sum(lk) + pad_k
        if total_k == 0 or sum(lq) + pad_q == 0:
            hypothesis.assume(False)
        b = 1
    else:
        b = draw(st.integers(1, 2))
        sq, sk = draw(st.integers(1, 40)), draw(st.integers(1, 40))
        shape = dict(sq=sq, sk=sk)
        total_k = sk
    npois = draw(st.integers(1, 3))
    poison = [dict(bz=draw(st.integers(0, b - 1)), j=draw(st.integers(0, total_k - 1)),
                   g=draw(st.integers(0, hk - 1)), which=draw(st.sampled_from("kv")),
                   col=draw(st.one_of(st.none(), st.integers(0, 63))),
                   val=draw(st.sampled_from(POISONS))) for _ in range(npois)]
    return dict(b=b, grp=grp, hk=hk, hd=hd, causal=causal, window=(left, right),
                poison=poison, seed=draw(st.integers(0, 2**31)), **shape)


def _apply(k, v, poison, hd, kv_index=lambda p: (p["bz"], p["j"])):
    """Writes the poison into k/v (clones); returns them."""
    k, v = k.clone(), v.clone()
    for p in poison:
        t = k if p["which"] == "k" else v
        idx = kv_index(p) + (p["g"],)
        if p["col"] is None:
            t[idx] = p["val"]
        else:
            t[idx + (p["col"] % hd,)] = p["val"]
    return k, v


def _allowed(vis_of, qshape, kshape, lse_shape, poison, grp, hd, row_index, key_index,
             lse_index):
    """Masks of the entries that may depend on the poison: out (column-wise for a V
    element), lse (K only), dq, dk/dv. vis_of(p) -> (rows seeing p's key: list of query
    rows, keys seen by those rows: list of key rows)."""
    a_out = torch.zeros(qshape, dtype=torch.bool)
    a_lse = torch.zeros(lse_shape, dtype=torch.bool)
    a_dq = torch.zeros(qshape, dtype=torch.bool)
    a_kv = torch.zeros(kshape, dtype=torch.bool)
    for p in poison:
        rows, keys = vis_of(p)
        heads = slice(p["g"] * grp, (p["g"] + 1) * grp)
        cols = slice(None) if p["which"] == "k" or p["col"] is None else p["col"] % hd
        for i in rows:
            a_out[row_index(p, i) + (heads, cols)] = True
            a_dq[row_index(p, i) + (heads,)] = True
            if p["which"] == "k":
                a_lse[lse_index(p, i, heads)] = True
        for j in keys:
            a_kv[key_index(p, j) + (p["g"],)] = True
        a_kv[key_index(p, p["j"]) + (p["g"],)] = True
    return a_out, a_lse, a_dq, a_kv


def _check_isolation(run, q, k, v, kp, vp, allowed, grads):
    """Runs `run` on the clean and the poisoned inputs and compares."""
    names = ("out", "lse", "dq", "dk", "dv")
    base = run(q, k, v, grads)
    got = run(q, kp, vp, grads)
    sync()
    for name, a, r, m in zip(names, got, base, allowed):
        outside_equal(a, r, m, name)


@PROP
@given(pb=problem(), grads=st.booleans())
def test_nan_isolation_batched(target, pb, grads):
    """flash_attn_func: poison at random keys of random batch entries / kv heads:
    nothing outside the rows that see a poisoned key changes (forward and backward)."""
    b, sq, sk, grp, hk = pb["b"], pb["sq"], pb["sk"], pb["grp"], pb["hk"]
    hd = hd_of(pb["hd"])
    dt = dtypes()[pb["seed"] % len(dtypes())]
    g = torch.Generator().manual_seed(pb["seed"])
    q, k, v = randn(g, b, sq, hk * grp, hd, dtype=dt), randn(g, b, sk, hk, hd, dtype=dt), \
        randn(g, b, sk, hk, hd, dtype=dt)
    do = randn(g, b, sq, hk * grp, hd, dtype=dt)
    kw = dict(causal=pb["causal"], window_size=pb["window"])
    vis = torch.from_numpy(attention_mask(sq, sk, **kw))

    def run(q, k, v, grads):
        if not grads:
            out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **kw)
            z = torch.zeros(0)
            return out, lse, z, z, z
        q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, deterministic=True,
                                      **kw)
        return (out, lse) + torch.autograd.grad(out, (q, k, v), do)

    def vis_of(p):
        rows = vis[:, p["j"]].nonzero().flatten().tolist()
        keys = vis[rows].any(0).nonzero().flatten().tolist() if rows else []
        return rows, keys

    allowed = _allowed(vis_of, q.shape, k.shape, (b, hk * grp, sq), pb["poison"], grp, hd,
                       row_index=lambda p, i: (p["bz"], i), key_index=lambda p, j: (p["bz"], j),
                       lse_index=lambda p, i, h: (p["bz"], h, i))
    if not grads:
        allowed = allowed[:2] + (torch.zeros(0, dtype=torch.bool),) * 3
    kp, vp = _apply(k, v, pb["poison"], hd)
    _check_isolation(run, q, k, v, kp, vp, allowed, grads)
    if grads:  # keys no query sees: exactly zero gradients, poisoned or not
        got = run(q, kp, vp, True)
        unseen = ~vis.any(0)
        dk, dv = got[3].cpu(), got[4].cpu()
        assert (dk[:, unseen] == 0).all() and (dv[:, unseen] == 0).all()


@PROP
@given(pb=problem(varlen=True), grads=st.booleans())
def test_nan_isolation_varlen(target, pb, grads):
    """flash_attn_varlen_func: poison anywhere in the packed keys (other sequences,
    masked keys of the same sequence, padding after the last one)."""
    grp, hk, lq, lk = pb["grp"], pb["hk"], pb["lq"], pb["lk"]
    hd = hd_of(pb["hd"])
    dt = dtypes()[pb["seed"] % len(dtypes())]
    g = torch.Generator().manual_seed(pb["seed"])
    cq, ck = np.cumsum([0] + lq), np.cumsum([0] + lk)
    tq, tk = int(cq[-1]) + pb["pad_q"], int(ck[-1]) + pb["pad_k"]
    q = randn(g, tq, hk * grp, hd, dtype=dt)
    k, v = randn(g, tk, hk, hd, dtype=dt), randn(g, tk, hk, hd, dtype=dt)
    do = randn(g, tq, hk * grp, hd, dtype=dt)
    kw = dict(causal=pb["causal"], window_size=pb["window"])
    cu = (torch.tensor(cq, dtype=torch.int32, device=dev()),
          torch.tensor(ck, dtype=torch.int32, device=dev()), max(lq), max(lk))
    for p in pb["poison"]:
        p["bz"] = 0

    def run(q, k, v, grads):
        if not grads:
            out, lse, _ = flash_attn_varlen_func(q, k, v, *cu, return_attn_probs=True, **kw)
            z = torch.zeros(0)
            return out, lse, z, z, z
        q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out, lse, _ = flash_attn_varlen_func(q, k, v, *cu, return_attn_probs=True,
                                             deterministic=True, **kw)
        return (out, lse) + torch.autograd.grad(out, (q, k, v), do)

    def vis_of(p):
        j = p["j"]
        z = int(np.searchsorted(ck, j, side="right")) - 1
        if z >= len(lk):  # padding after the last sequence
            return [], []
        vis = attention_mask(lq[z], lk[z], **kw)
        rows = np.nonzero(vis[:, j - ck[z]])[0]
        keys = np.nonzero(vis[rows].any(0))[0] if len(rows) else []
        return [int(cq[z] + i) for i in rows], [int(ck[z] + jj) for jj in keys]

    allowed = _allowed(vis_of, q.shape, k.shape, (hk * grp, tq), pb["poison"], grp, hd,
                       row_index=lambda p, i: (i,), key_index=lambda p, j: (j,),
                       lse_index=lambda p, i, h: (h, i))
    if not grads:
        allowed = allowed[:2] + (torch.zeros(0, dtype=torch.bool),) * 3
    kp, vp = _apply(k, v, pb["poison"], hd, kv_index=lambda p: (p["j"],))
    _check_isolation(run, q, k, v, kp, vp, allowed, grads)


@PROP
@given(data=st.data(), b=st.integers(1, 3), hk=st.integers(1, 2), grp=st.integers(1, 3),
       hd=st.integers(1, 20), sq=st.integers(1, 4), causal=st.booleans(),
       left=st.sampled_from([-1, 0, 2, 9]), seed=st.integers(0, 2**31))
def test_nan_isolation_kvcache(target, data, b, hk, grp, hd, sq, causal, left, seed):
    """flash_attn_with_kvcache: slots past cache_seqlens + s_new hold NaN/inf, and
    poison in the cache or the new keys reaches only the rows that see it."""
    cpu_only_fn("flash_attn_with_kvcache")
    sc = data.draw(st.integers(sq, 30), label="s_cache")
    snew = data.draw(st.integers(0, min(3, sc)), label="s_new")
    lens = [data.draw(st.integers(0, sc - snew), label="len") for _ in range(b)]
    g = torch.Generator().manual_seed(seed)
    q = randn(g, b, sq, hk * grp, hd)
    kc, vc = randn(g, b, sc, hk, hd), randn(g, b, sc, hk, hd)
    kn, vn = (randn(g, b, snew, hk, hd) for _ in range(2)) if snew else (None, None)
    kw = dict(causal=causal, window_size=(left, -1))
    npois = data.draw(st.integers(1, 3), label="n poison")
    poison = []
    for _ in range(npois):
        p = dict(bz=data.draw(st.integers(0, b - 1)), g=data.draw(st.integers(0, hk - 1)),
                 which=data.draw(st.sampled_from("kv")),
                 col=data.draw(st.one_of(st.none(), st.integers(0, 63))),
                 val=data.draw(st.sampled_from(POISONS)))
        if snew and data.draw(st.booleans(), label="in new"):
            p["t"] = data.draw(st.integers(0, snew - 1))
            p["j"] = lens[p["bz"]] + p["t"]
        else:
            p["j"] = data.draw(st.integers(0, sc - 1))
        poison.append(p)

    def run(kc, vc, kn, vn):
        out, lse = flash_attn_with_kvcache(q, kc.clone(), vc.clone(), kn, vn,
                                           torch.tensor(lens, dtype=torch.int32), causal=causal,
                                           window_size=kw["window_size"],
                                           return_softmax_lse=True)
        return out, lse

    kcp, vcp = kc.clone(), vc.clone()
    knp, vnp = (kn.clone(), vn.clone()) if snew else (None, None)
    a_out = torch.zeros(q.shape, dtype=torch.bool)
    a_lse = torch.zeros((b, hk * grp, sq), dtype=torch.bool)
    for p in poison:
        if "t" in p:
            t = knp if p["which"] == "k" else vnp
            idx = (p["bz"], p["t"], p["g"])
        else:
            t = kcp if p["which"] == "k" else vcp
            idx = (p["bz"], p["j"], p["g"])
        t[idx if p["col"] is None else idx + (p["col"] % hd,)] = p["val"]
        skb = lens[p["bz"]] + snew
        if p["j"] < skb and ("t" in p or p["j"] < lens[p["bz"]]):
            rows = attention_mask(sq, skb, causal, kw["window_size"])[:, p["j"]]
            heads = slice(p["g"] * grp, (p["g"] + 1) * grp)
            cols = slice(None) if p["which"] == "k" or p["col"] is None else p["col"] % hd
            for i in np.nonzero(rows)[0]:
                a_out[p["bz"], i, heads, cols] = True
                a_lse[p["bz"], heads, i] |= p["which"] == "k"
    base = run(kc, vc, kn, vn)
    got = run(kcp, vcp, knp, vnp)
    outside_equal(got[0], base[0], a_out, "out")
    outside_equal(got[1], base[1], a_lse, "lse")


@PROP
@given(data=st.data(), b=st.integers(1, 2), hk=st.integers(1, 2), grp=st.integers(1, 2),
       hd=st.integers(1, 16), w=st.integers(1, 9), seed=st.integers(0, 2**31))
def test_nan_isolation_ring_cache(target, data, b, hk, grp, hd, w, seed):
    """SlidingWindowKVCache: a NaN stream, reset(), then steps of 1..4 tokens, one of
    whose keys/values is poisoned: only the queries within the window after it may
    change (the slots the new stream never wrote are invisible)."""
    hd = hd_of(hd)
    dt = dtypes()[seed % len(dtypes())]
    steps = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=5), label="steps")
    total = sum(steps)
    pos_p = data.draw(st.integers(0, total - 1), label="poisoned position")
    which = data.draw(st.sampled_from("kv"), label="which")
    val = data.draw(st.sampled_from(POISONS), label="value")
    g = torch.Generator().manual_seed(seed)
    q, k, v = (randn(g, b, total, h, hd, dtype=dt) for h in (hk * grp, hk, hk))
    kp, vp = k.clone(), v.clone()
    (kp if which == "k" else vp)[0, pos_p, hk - 1] = val
    cache = SlidingWindowKVCache(b, w, hk, hd, dtype=dt, device=dev())
    clean = SlidingWindowKVCache(b, w, hk, hd, dtype=dt, device=dev())
    junk = torch.full((b, w + 1, hk, hd), NAN, dtype=dt, device=dev())
    cache.append_and_attend(randn(g, b, w + 1, hk * grp, hd, dtype=dt), junk, junk)
    cache.reset()
    s = 0
    for n in steps:
        got = cache.append_and_attend(q[:, s:s + n], kp[:, s:s + n], vp[:, s:s + n])
        want = clean.append_and_attend(q[:, s:s + n], k[:, s:s + n], v[:, s:s + n])
        sync()
        allowed = torch.zeros(got.shape, dtype=torch.bool)
        for t in range(n):
            if 0 <= s + t - pos_p < w:
                allowed[0, t, (hk - 1) * grp:] = True
        outside_equal(got, want, allowed, f"step at {s}")
        s += n


# --------------------------------- the torch formulas behind the CUDA fallbacks

def test_torch_formula_matches_reference_and_isolates():
    """ops._torch_attention (CUDA: float32 training, odd head dims; the ring's
    multi-token steps) run here on the CPU: equal to the reference; a poisoned key
    changes only the rows that see it (values, lse and gradients); a visible ±inf
    V gives ±inf (the IEEE sum), a NaN gives NaN."""
    from mamba_attention.ops import _torch_attention

    g = torch.Generator().manual_seed(16)
    q, k, v, do = randn(g, 2, 37, 4, 12), randn(g, 2, 45, 2, 12), randn(g, 2, 45, 2, 12), \
        randn(g, 2, 37, 4, 12)
    kw = dict(softmax_scale=None, causal=True, left=9, right=0, softcap=0.0,
              alibi_slopes=None)
    out, lse = _torch_attention(q, k, v, **kw)
    ro, rl = attention_ref(q, k, v, causal=True, window_size=(9, 0))
    assert rel_err(out, ro) <= 1e-5
    fin = np.isfinite(rl)
    assert rel_err(lse.numpy()[fin], rl[fin]) <= 1e-5

    def run(k, v):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        o, l = _torch_attention(qq, kk, vv, **kw)
        return (o, l) + torch.autograd.grad(o, (qq, kk, vv), do)

    vis = torch.from_numpy(attention_mask(37, 45, True, (9, 0)))
    base = run(k, v)
    kp, vp = k.clone(), v.clone()
    vp[0, 20, 1, 3], vp[0, 21, 1, 3], vp[0, 30, 1, 4], vp[0, 31, 1, 4] = INF, INF, INF, -INF
    vp[0, 40, 1, 5] = NAN
    kp[1, 25, 0, 0] = -INF
    got = run(kp, vp)
    rows_v = vis[:, [20, 21, 30, 31, 40]].any(-1)
    rows_k = vis[:, 25]
    a_out = torch.zeros(q.shape, dtype=torch.bool)
    a_out[0, rows_v, 2:4, 3:6] = True
    a_out[1, rows_k, 0:2] = True
    a_lse = torch.zeros(lse.shape, dtype=torch.bool)
    a_lse[1, 0:2, rows_k] = True
    a_dq = torch.zeros(q.shape, dtype=torch.bool)
    a_dq[0, rows_v, 2:4], a_dq[1, rows_k, 0:2] = True, True
    a_kv = torch.zeros(k.shape, dtype=torch.bool)
    a_kv[0, vis[rows_v].any(0), 1], a_kv[1, vis[rows_k].any(0), 0] = True, True
    for name, a, r, m in zip(("out", "lse", "dq", "dk", "dv"), got, base,
                             (a_out, a_lse, a_dq, a_kv, a_kv)):
        outside_equal(a, r, m, name)
    o = got[0][0, :, 2:4]
    only20 = vis[:, 20] & vis[:, 21] & ~vis[:, 30] & ~vis[:, 31] & ~vis[:, 40]
    assert (o[only20, :, 3] == INF).all()
    both = vis[:, 30] & vis[:, 31]
    assert o[both, :, 4].isnan().all()
    assert o[vis[:, 40], :, 5].isnan().all()


def test_ring_torch_formula_matches_kernel():
    """SlidingWindowKVCache._attend_torch (the CUDA path for several tokens at once),
    run on the CPU, equals the CPU ring kernel step for step (GQA, ALiBi, softcap),
    from pos 0 and from a position near 2**63."""
    g = torch.Generator().manual_seed(17)
    b, w, hk, hd = 2, 6, 2, 8
    slopes = torch.tensor([0.3, 0.1, 0.5, 0.2])
    for start in (0, 2**63 - 40):
        kern = SlidingWindowKVCache(b, w, hk, hd, dtype=torch.float32)
        torch_ = SlidingWindowKVCache(b, w, hk, hd, dtype=torch.float32)
        kern.pos = torch_.pos = start
        for n in (1, 3, 7, 2, 5, 1):
            q, k, v = (randn(g, b, n, h, hd) for h in (4, hk, hk))
            for kw in (dict(), dict(softcap=2.0, alibi_slopes=slopes)):
                want = kern.append_and_attend(q, k, v, **kw)
                got = torch_._attend_torch(q, k, v, None, kw.get("softcap", 0.0),
                                           kw.get("alibi_slopes"))
                torch_._pos += n
                assert rel_err(got, want) <= 1e-5, (start, n, kw)
                assert torch.equal(torch_.k, kern.k) and torch.equal(torch_.v, kern.v)
