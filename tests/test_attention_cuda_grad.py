"""CUDA flash-attention backward (SPEC §3): gradients of ``flash_attn_func`` /
``flash_attn_varlen_func`` on float16/bfloat16 CUDA tensors, which run our
forward and backward kernels through the ``mamba_attention::flash_attn_*``
custom ops, against a float64 autograd reference built from SPEC's mask
formula (tests/reference.py's ``attention_mask``).

Covers causal / window (bottom-right aligned, sq ≠ sk both ways) / softcap /
ALiBi / GQA / MQA, odd sizes, every head dim, rows with no visible key (zero
gradients), the gradient of softmax_lse, varlen (trailing rows get zero
gradients), deterministic bit-identity, opcheck and torch.compile. Tolerances
(DESIGN.md): rel L2 error ≤ 1e-2 (bf16), 3e-3 (f16) per gradient.

Every test is marked ``cuda`` and skipped without a usable GPU.
"""

import math

import pytest

torch = pytest.importorskip("torch")
_core = pytest.importorskip("mamba_attention._core")

from mamba_attention import flash_attn_func, flash_attn_varlen_func  # noqa: E402

from reference import attention_mask  # noqa: E402

HAVE_CUDA = torch.cuda.is_available() and hasattr(_core, "_flash_attn_bwd_cuda")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA GPU and torch with CUDA")]

TOL = {torch.bfloat16: 1e-2, torch.float16: 3e-3}
DTYPES = [torch.bfloat16, torch.float16]
DT_IDS = ["bf16", "f16"]


# ------------------------------------------------------------------ reference

def ref_attn(q, k, v, scale, causal, window, softcap, alibi):
    """float64 SPEC §3 on (b, s, h, d) tensors, differentiable; returns (out, lse)
    with lse = -inf and zero output (and zero gradients) for rows with no key."""
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    kk = k.repeat_interleave(hq // hk, 2)
    vv = v.repeat_interleave(hq // hk, 2)
    s = torch.einsum("bihd,bjhd->bhij", q, kk) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi is not None:
        sl = alibi.double().reshape(-1, hq)[:, :, None, None]
        dist = (torch.arange(sq, device=q.device)[:, None] + sk - sq
                - torch.arange(sk, device=q.device)[None, :]).abs()
        s = s - sl * dist
    ok = torch.from_numpy(attention_mask(sq, sk, causal, window)).to(q.device)
    anyk = ok.any(-1)[:, None]
    s = s.masked_fill(~ok, -math.inf).masked_fill(~anyk, 0.0)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]) * anyk
    lse = lse.masked_fill(~anyk[:, 0], -math.inf)
    out = torch.einsum("bhij,bjhd->bihd", p, vv)
    return out, lse


def rel_err(a, b):
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


def make(b, sq, sk, hq, hk, d, dtype, seed=0, qscale=1.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = (torch.randn(b, sq, hq, d, device="cuda", generator=g) * qscale).to(dtype)
    k = torch.randn(b, sk, hk, d, device="cuda", generator=g).to(dtype)
    v = torch.randn(b, sk, hk, d, device="cuda", generator=g).to(dtype)
    do = torch.randn(b, sq, hq, d, device="cuda", generator=g).to(dtype)
    return q, k, v, do


def grads_ours(q, k, v, do, dlse=None, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    outs, gs = [out], [do]
    if dlse is not None:
        outs.append(lse)
        gs.append(dlse)
    dq, dk, dv = torch.autograd.grad(outs, (q, k, v), gs)
    return out, lse, dq, dk, dv


def grads_ref(q, k, v, do, dlse=None, softmax_scale=None, causal=False, window_size=(-1, -1),
              softcap=0.0, alibi_slopes=None, deterministic=False):
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out, lse = ref_attn(qd, kd, vd, scale, causal, window_size, softcap, alibi_slopes)
    loss = (out * do.double()).sum()
    if dlse is not None:
        loss = loss + (lse.masked_fill(torch.isinf(lse), 0.0) * dlse.double()).sum()
    return (out, lse) + torch.autograd.grad(loss, (qd, kd, vd))


def check(q, k, v, do, dlse=None, **kw):
    ours = grads_ours(q, k, v, do, dlse, **kw)
    ref = grads_ref(q, k, v, do, dlse, **kw)
    tol = TOL[q.dtype]
    for name, a, r in zip(("out", "dq", "dk", "dv"), (ours[0],) + ours[2:], (ref[0],) + ref[2:]):
        assert a.dtype == q.dtype and a.shape == r.shape, name
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        err = rel_err(a, r)
        assert err <= tol, f"{name}: rel L2 error {err:.2e} > {tol:.0e}"
    # Rows with no visible key: exactly zero dq.
    empty = torch.isinf(ref[1])  # (b, hq, sq)
    if empty.any():
        dq_bhq = ours[2].permute(0, 2, 1, 3)
        assert (dq_bhq[empty] == 0).all(), "rows with no visible key must get dq = 0"
    return ours


# ------------------------------------------------------------------ sweeps

# (b, sq, sk, hq, hk, d, causal, window, softcap, alibi ("h" (hq,), "bh" (b, hq) or None))
CASES = [
    (2, 129, 129, 4, 4, 64, False, (-1, -1), 0.0, None),
    (2, 129, 129, 4, 4, 64, True, (-1, -1), 0.0, None),
    (1, 1000, 1000, 4, 2, 128, True, (-1, -1), 0.0, None),
    (1, 1000, 1000, 2, 2, 64, False, (-1, -1), 0.0, None),
    (2, 17, 129, 4, 1, 64, True, (-1, -1), 0.0, None),
    (2, 129, 17, 4, 2, 64, True, (-1, -1), 0.0, None),
    (2, 200, 333, 3, 1, 64, False, (5, 7), 0.0, None),
    (1, 300, 300, 2, 2, 64, False, (37, 5), 0.0, None),
    (1, 300, 260, 2, 2, 64, True, (50, -1), 0.0, None),
    (1, 260, 300, 2, 1, 64, True, (50, -1), 0.0, None),
    (2, 129, 67, 4, 2, 64, False, (-1, 4), 0.0, None),
    (2, 67, 129, 4, 2, 64, False, (16, -1), 0.0, None),
    (2, 130, 170, 4, 2, 64, False, (-1, -1), 30.0, None),
    (2, 130, 170, 4, 2, 64, True, (40, -1), 5.0, None),
    (2, 120, 90, 4, 2, 64, False, (-1, -1), 0.0, "h"),
    (2, 120, 90, 4, 2, 64, True, (30, -1), 0.0, "bh"),
    (2, 90, 120, 6, 2, 64, False, (30, 3), 10.0, "bh"),
    (1, 1000, 700, 8, 1, 128, True, (255, -1), 20.0, "h"),
    (3, 1, 1, 2, 2, 32, False, (-1, -1), 0.0, None),
    (2, 1, 77, 2, 1, 64, True, (-1, -1), 0.0, None),
    (2, 77, 1, 2, 1, 64, True, (-1, -1), 0.0, None),
    (1, 200, 70, 2, 2, 64, False, (0, 0), 0.0, None),
    (1, 64, 10, 2, 1, 64, False, (0, 0), 0.0, None),
    (1, 1100, 1300, 4, 2, 64, False, (300, 77), 0.0, None),
]


def _run_case(case, dtype, deterministic=False, seed=0):
    b, sq, sk, hq, hk, d, causal, window, softcap, alibi = case
    qscale = 4.0 if softcap == 5.0 else 1.0  # large logits so the cap matters
    q, k, v, do = make(b, sq, sk, hq, hk, d, dtype, seed=seed, qscale=qscale)
    slopes = None
    if alibi is not None:
        g = torch.Generator(device="cuda").manual_seed(seed + 1)
        shape = (b, hq) if alibi == "bh" else (hq,)
        slopes = torch.rand(shape, device="cuda", generator=g, dtype=torch.float32) * 0.5
    return check(q, k, v, do, causal=causal, window_size=window, softcap=softcap,
                 alibi_slopes=slopes, deterministic=deterministic)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", CASES, ids=[
    f"b{c[0]}_sq{c[1]}_sk{c[2]}_h{c[3]}-{c[4]}_d{c[5]}_{'c' if c[6] else 'n'}_w{c[7][0]}.{c[7][1]}"
    f"_cap{c[8]:g}_alibi{c[9]}" for c in CASES])
def test_grad_cases(dtype, case):
    _run_case(case, dtype, seed=len(CASES) + case[1] + case[2])


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("d", [8, 32, 40, 64, 96, 128, 200, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims(dtype, d, causal):
    q, k, v, do = make(2, 150, 170, 4, 2, d, dtype, seed=d)
    check(q, k, v, do, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_deterministic(dtype, d):
    """deterministic=True: bit-identical gradients over repeated runs, and correct."""
    q, k, v, do = make(2, 300, 300, 8, 2, d, dtype, seed=3)
    kw = dict(causal=True, window_size=(100, -1), softcap=15.0, deterministic=True)
    first = check(q, k, v, do, **kw)
    for _ in range(3):
        again = grads_ours(q, k, v, do, **kw)
        for a, b in zip(first[2:], again[2:]):
            assert torch.equal(a, b)
    # The default (atomic) dQ agrees with the deterministic one to rounding.
    nondet = grads_ours(q, k, v, do, **dict(kw, deterministic=False))
    assert rel_err(nondet[2], first[2]) <= TOL[dtype]
    assert torch.equal(nondet[3], first[3]) and torch.equal(nondet[4], first[4])


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_deterministic_cases(dtype):
    for case in (CASES[2], CASES[5], CASES[16], CASES[20], CASES[21]):
        _run_case(case, dtype, deterministic=True, seed=5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("causal", [False, True])
def test_lse_gradient(dtype, causal):
    """The gradient reaching softmax_lse flows back (also on rows with no key)."""
    q, k, v, do = make(2, 150, 100, 4, 2, 64, dtype, seed=9)
    g = torch.Generator(device="cuda").manual_seed(4)
    dlse = torch.randn(2, 4, 150, device="cuda", generator=g)
    check(q, k, v, do, dlse=dlse, causal=causal, alibi_slopes=torch.full((4,), 0.1, device="cuda"))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_strided_inputs(dtype):
    """q/k/v slices of a packed qkv tensor, a non-contiguous dout, odd strides."""
    b, s, h, d = 2, 133, 4, 64
    g = torch.Generator(device="cuda").manual_seed(2)
    qkv = torch.randn(b, s, 3, h, d, device="cuda", generator=g).to(dtype)
    q, k, v = qkv.unbind(2)
    do = torch.randn(b, h, s, d, device="cuda", generator=g).to(dtype).transpose(1, 2)
    check(q, k, v, do, causal=True)
    # Rows not 16-byte aligned (scalar-load path): head dim 40 inside a 41-wide buffer.
    buf = torch.randn(b, s, h, 41 * 3, device="cuda", generator=g).to(dtype)
    q2, k2, v2 = buf[..., 1:41], buf[..., 42:82], buf[..., 83:123]
    check(q2, k2, v2, do[..., :40], causal=True, window_size=(20, -1))


# ------------------------------------------------------------------ varlen

@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("opts", [
    dict(causal=True),
    dict(causal=False, window_size=(20, 5)),
    dict(causal=True, softcap=10.0, alibi="bh"),
])
def test_varlen(dtype, deterministic, opts):
    lens_q = [5, 130, 1, 0, 77]
    lens_k = [9, 100, 33, 4, 77]
    hq, hk, d = 4, 2, 64
    tail = 3  # rows past the last sequence: zero gradients
    tq, tk = sum(lens_q) + tail, sum(lens_k) + tail
    g = torch.Generator(device="cuda").manual_seed(21)
    q = torch.randn(tq, hq, d, device="cuda", generator=g).to(dtype)
    k = torch.randn(tk, hk, d, device="cuda", generator=g).to(dtype)
    v = torch.randn(tk, hk, d, device="cuda", generator=g).to(dtype)
    do = torch.randn(tq, hq, d, device="cuda", generator=g).to(dtype)
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32,
                        device="cuda")
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32,
                        device="cuda")
    opts = dict(opts)
    slopes = None
    if opts.pop("alibi", None):
        slopes = torch.rand(len(lens_q), hq, device="cuda", generator=g) * 0.5
    qv, kv, vv = (t.clone().requires_grad_() for t in (q, k, v))
    out = flash_attn_varlen_func(qv, kv, vv, cu_q, cu_k, max(lens_q), max(lens_k),
                                 alibi_slopes=slopes, deterministic=deterministic, **opts)
    dq, dk, dv = torch.autograd.grad(out, (qv, kv, vv), do)
    ref = [torch.zeros_like(t, dtype=torch.float64) for t in (q, k, v)]
    oq = ok = 0
    for i, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        if lq and lk:
            sl = None if slopes is None else slopes[i]
            r = grads_ref(q[None, oq:oq + lq], k[None, ok:ok + lk], v[None, ok:ok + lk],
                          do[None, oq:oq + lq], alibi_slopes=sl, **opts)
            ref[0][oq:oq + lq] = r[2][0]
            ref[1][ok:ok + lk] = r[3][0]
            ref[2][ok:ok + lk] = r[4][0]
        oq += lq
        ok += lk
    for name, a, r in zip(("dq", "dk", "dv"), (dq, dk, dv), ref):
        assert torch.isfinite(a).all(), name
        err = rel_err(a, r)
        assert err <= TOL[dtype], f"{name}: rel L2 error {err:.2e}"
    assert (dq[-tail:] == 0).all() and (dk[-tail:] == 0).all() and (dv[-tail:] == 0).all()
    if deterministic:
        again = torch.autograd.grad(
            flash_attn_varlen_func(qv, kv, vv, cu_q, cu_k, max(lens_q), max(lens_k),
                                   alibi_slopes=slopes, deterministic=True, **opts),
            (qv, kv, vv), do)
        for a, b in zip((dq, dk, dv), again):
            assert torch.equal(a, b)


# ------------------------------------------------------------------ torch integration

def test_opcheck_cuda():
    q, k, v, do = make(2, 37, 45, 4, 2, 64, torch.bfloat16, seed=1)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    slopes = torch.tensor([0.1, 0.2, 0.3, 0.4], device="cuda")
    ops = torch.ops.mamba_attention
    torch.library.opcheck(ops.flash_attn_fwd.default, (q, k, v, None, True, 3, 0, 0.0, None))
    torch.library.opcheck(ops.flash_attn_fwd.default, (q, k, v, 0.5, False, -1, 2, 2.0, slopes))
    torch.library.opcheck(ops.flash_attn_fwd.default,
                          (q, k, v, None, True, -1, 0, 0.0, None, True))
    out, lse = ops.flash_attn_fwd(q, k, v, None, True, -1, 0, 0.0, None)
    torch.library.opcheck(ops.flash_attn_bwd.default,
                          (do, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(),
                           None, None, True, -1, 0, 0.0, None))
    cu = torch.tensor([0, 30, 74], dtype=torch.int32, device="cuda")
    cuk = torch.tensor([0, 40, 90], dtype=torch.int32, device="cuda")
    torch.library.opcheck(ops.flash_attn_varlen_fwd.default,
                          (q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cuk, 44, 50,
                           None, True, -1, -1, 0.0, None))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_torch_compile_fullgraph(dtype):
    q, k, v, do = make(2, 97, 97, 4, 2, 64, dtype, seed=4)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def f(q, k, v):
        o = flash_attn_func(q, k, v, causal=True, window_size=(31, 0), softcap=8.0)
        return (o.float() * do.float()).sum()

    cf = torch.compile(f, fullgraph=True)
    val = cf(q, k, v)
    g = torch.autograd.grad(val, (q, k, v))
    val_e = f(q, k, v)
    ge = torch.autograd.grad(val_e, (q, k, v))
    assert torch.allclose(val, val_e)
    for a, b in zip(g, ge):
        assert rel_err(a, b) <= TOL[dtype]


def test_float32_falls_back_to_torch():
    """float32 on CUDA still trains (the differentiable torch formula)."""
    q, k, v, do = make(1, 33, 40, 2, 1, 32, torch.float32, seed=8)
    ours = grads_ours(q, k, v, do, causal=True)
    ref = grads_ref(q, k, v, do, causal=True)
    for a, r in zip(ours[2:], ref[2:]):
        assert rel_err(a, r) <= 1e-4
