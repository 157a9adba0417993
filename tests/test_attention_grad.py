"""Attention gradients (SPEC §3: differentiable in q, k, v): the CPU backward
against autograd through a float64 torch reference written from SPEC's formulas,
gradcheck on tiny sizes, torch.library.opcheck of the custom ops, and
torch.compile(fullgraph=True)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mamba_attention._core")

from reference import attention_mask, rel_err  # noqa: E402

import mamba_attention._autograd  # noqa: E402,F401  (registers the custom ops)
from mamba_attention import flash_attn_func, flash_attn_varlen_func  # noqa: E402

TOL_GRAD = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def torch_ref(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
              alibi_slopes=None):
    """Differentiable float64 attention from SPEC §3 (same formulas as reference.py)."""
    q, k, v = q.double(), k.double(), v.double()
    b, sq, hq, hd = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = hd ** -0.5 if softmax_scale is None else softmax_scale
    kk, vv = k.repeat_interleave(hq // hk, 2), v.repeat_interleave(hq // hk, 2)
    s = torch.einsum("bihd,bjhd->bhij", q, kk) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        sl = alibi_slopes.double().expand(b, hq)
        dist = (torch.arange(sq)[:, None] + sk - sq - torch.arange(sk)[None, :]).abs().double()
        s = s - sl[:, :, None, None] * dist
    ok = torch.from_numpy(attention_mask(sq, sk, causal, window_size))
    s = s.masked_fill(~ok, -float("inf"))
    m = s.amax(-1, keepdim=True)
    empty = ~torch.isfinite(m)
    m = torch.where(empty, 0.0, m)
    p = torch.exp(s - m)
    den = torch.where(empty, 1.0, p.sum(-1, keepdim=True))
    out = torch.einsum("bhij,bjhd->bihd", p / den, vv)
    lse = torch.where(empty, -float("inf"), m + torch.log(den))[..., 0]
    return out, lse


def leaves(*shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to(dtype).requires_grad_(True) for s in shapes]


def grads_both(q, k, v, use_lse=True, **kw):
    """Gradients of Σ out·dO (+ Σ lse·dL over finite lse) by ours and by the reference."""
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    g = torch.Generator().manual_seed(1)
    do = torch.randn(out.shape, generator=g, dtype=torch.float64)
    dl = torch.randn(lse.shape, generator=g, dtype=torch.float64)

    def loss(o, l):
        fin = torch.isfinite(l)
        val = (o.double() * do).sum()
        if use_lse:
            val = val + (torch.where(fin, l.double(), 0.0) * dl).sum()
        return val

    ours = torch.autograd.grad(loss(out, lse), (q, k, v))
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    kw64 = dict(kw)
    if kw64.get("alibi_slopes") is not None:
        kw64["alibi_slopes"] = kw64["alibi_slopes"].double()
    ro, rl = torch_ref(q64, k64, v64, **kw64)
    ref = torch.autograd.grad(loss(ro, rl), (q64, k64, v64))
    return ours, ref


CASES = {
    "full": dict(),
    "causal": dict(causal=True),
    "swa": dict(causal=True, window_size=(4, 0)),
    "win(3,2)+softcap": dict(window_size=(3, 2), softcap=2.0),
    "alibi+scale": dict(alibi="h", softmax_scale=0.2),
    "alibi(b,h)+softcap+causal": dict(alibi="bh", softcap=3.0, causal=True),
    "right-only": dict(window_size=(-1, 1)),
}
SHAPES = [(2, 9, 9, 4, 4, 8), (2, 13, 30, 4, 2, 16), (1, 30, 11, 3, 1, 20), (1, 70, 80, 2, 2, 64)]


def case_kw(name, b, hq):
    kw = dict(CASES[name])
    a = kw.pop("alibi", None)
    if a:
        g = torch.Generator().manual_seed(5)
        kw["alibi_slopes"] = torch.rand((hq,) if a == "h" else (b, hq), generator=g) * 0.5 + 0.05
    return kw


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b%d-sq%d-sk%d-hq%d-hk%d-hd%d" % s)
@pytest.mark.parametrize("case", list(CASES))
def test_grads_vs_reference(simd_level, case, shape):
    b, sq, sk, hq, hk, hd = shape
    q, k, v = leaves((b, sq, hq, hd), (b, sk, hk, hd), (b, sk, hk, hd), dtype=torch.float32)
    ours, ref = grads_both(q, k, v, **case_kw(case, b, hq))
    for name, a, r in zip("qkv", ours, ref):
        assert a.dtype == torch.float32 and a.shape == r.shape
        e = rel_err(a, r)
        assert e <= TOL_GRAD[torch.float32], f"d{name}: {e:.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_grads_dtypes(dtype):
    q, k, v = leaves((2, 40, 4, 32), (2, 50, 2, 32), (2, 50, 2, 32), dtype=dtype)
    ours, ref = grads_both(q, k, v, causal=True, window_size=(9, 0), softcap=4.0)
    for name, a, r in zip("qkv", ours, ref):
        assert a.dtype == dtype
        e = rel_err(a, r)
        assert e <= TOL_GRAD[dtype], f"d{name} {dtype}: {e:.2e}"


def test_grads_packed_qkv():
    """q, k, v sliced from one packed qkv leaf: the gradient lands in qkv."""
    (qkv,) = leaves((2, 21, 3, 4, 16), dtype=torch.float32)
    q, k, v = qkv.unbind(2)
    out = flash_attn_func(q, k, v, causal=True)
    do = torch.randn_like(out)
    (g,) = torch.autograd.grad((out * do).sum(), qkv)
    q64 = qkv.detach().double().requires_grad_(True)
    ro, _ = torch_ref(*q64.unbind(2), causal=True)
    (r,) = torch.autograd.grad((ro * do.double()).sum(), q64)
    assert rel_err(g, r) <= 1e-4


def test_varlen_grads():
    lq, lk = [5, 0, 17, 9], [7, 4, 17, 12]
    hq, hk, hd = 4, 2, 16
    q, k, v = leaves((sum(lq) + 2, hq, hd), (sum(lk), hk, hd), (sum(lk), hk, hd), dtype=torch.float32)
    cq = torch.tensor(np.concatenate([[0], np.cumsum(lq)]), dtype=torch.int32)
    ck = torch.tensor(np.concatenate([[0], np.cumsum(lk)]), dtype=torch.int32)
    for kw in (dict(causal=True), dict(window_size=(3, 1), softcap=2.0)):
        out, lse, _ = flash_attn_varlen_func(q, k, v, cq, ck, max(lq), max(lk), return_attn_probs=True, **kw)
        do = torch.randn_like(out)
        ours = torch.autograd.grad((out * do).sum(), (q, k, v))
        q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
        loss = 0
        for i in range(len(lq)):
            if lq[i] == 0:
                continue
            sq_, sk_ = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
            ro, _ = torch_ref(q64[None, sq_], k64[None, sk_], v64[None, sk_], **kw)
            loss = loss + (ro[0] * do[sq_].double()).sum()
        ref = torch.autograd.grad(loss, (q64, k64, v64))
        for name, a, r in zip("qkv", ours, ref):
            assert rel_err(a, r) <= 1e-4, (name, kw)
        assert (ours[0][-2:] == 0).all()


@pytest.mark.parametrize("kw", [dict(causal=True), dict(window_size=(1, 1), softcap=1.5),
                                dict(alibi_slopes=torch.tensor([0.3, 0.1]))])
def test_gradcheck_tiny(kw):
    """gradcheck in float64 (the kernels compute in float32, so eps and tolerances are
    float32-sized)."""
    q, k, v = leaves((1, 4, 2, 3), (1, 5, 1, 3), (1, 5, 1, 3), dtype=torch.float64)

    def fn(q, k, v):
        out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **kw)
        return out, lse

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-3, atol=2e-3, rtol=2e-3)


def test_opcheck():
    q, k, v = leaves((2, 7, 4, 8), (2, 9, 2, 8), (2, 9, 2, 8), dtype=torch.float32)
    slopes = torch.tensor([0.1, 0.2, 0.3, 0.4])
    torch.library.opcheck(torch.ops.mamba_attention.flash_attn_fwd.default,
                          (q, k, v, None, True, 3, 0, 0.0, None))
    torch.library.opcheck(torch.ops.mamba_attention.flash_attn_fwd.default,
                          (q, k, v, 0.5, False, -1, 2, 2.0, slopes))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    cuk = torch.tensor([0, 4, 9], dtype=torch.int32)
    torch.library.opcheck(torch.ops.mamba_attention.flash_attn_varlen_fwd.default,
                          (q[0], k[0], v[0], cu, cuk, 4, 5, None, True, -1, -1, 0.0, None))


def test_torch_compile_fullgraph():
    q, k, v = leaves((1, 33, 4, 16), (1, 33, 2, 16), (1, 33, 2, 16), dtype=torch.float32)

    def f(q, k, v):
        return flash_attn_func(q, k, v, causal=True, window_size=(7, 0), softcap=3.0).square().sum()

    cf = torch.compile(f, fullgraph=True)
    val = cf(q, k, v)
    g = torch.autograd.grad(val, (q, k, v))
    val_e = f(q, k, v)
    ge = torch.autograd.grad(val_e, (q, k, v))
    assert torch.allclose(val, val_e)
    for a, b in zip(g, ge):
        assert torch.allclose(a, b)


def test_no_grad_path_unchanged():
    """Without requires_grad the call goes straight to the kernel (no custom op)."""
    q = torch.randn(1, 5, 2, 8)
    with torch.no_grad():
        a = flash_attn_func(q, q, q, causal=True)
    b = torch.ops.mamba_attention.flash_attn_fwd(q, q, q, None, True, -1, -1, 0.0, None)[0]
    assert torch.equal(a, b)
