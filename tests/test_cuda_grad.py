"""Gradients of selective_scan_fn on CUDA (the backward kernel in
kernels/selective_scan_bwd.cu) against autograd through the float64 reference of
test_grad.py, plus the custom ops' opcheck and torch.compile on CUDA tensors.

The inputs are those of test_grad.py (rounded to the tested dtype, then moved to the
GPU); the reference runs on the CPU in float64 on the same rounded values. The
warp-scan kernel (n > 16, constant B/C, straddling groups) has 256-step chunks and
8-channel blocks, so sizes straddle both; the fast kernel's cases are at the end.
Every test is marked ``cuda`` and skipped without a usable GPU.
"""

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mamba_attention._core")

from conftest import _core, cuda_only, scan_inputs, selective_scan_fn  # noqa: E402
from reference import TOL, rel_err  # noqa: E402
from test_grad import (BC_PAIRS, OPTION_NAMES, OPTS, ALL_ON, loss_weights,  # noqa: E402
                       make_inputs, ref_scan, reference_grads)

import mamba_attention._autograd  # noqa: E402,F401  (registers the ops)

pytestmark = [pytest.mark.usefixtures("target"), cuda_only]


def cuda_leaves(x):
    return {k: v.detach().cuda().requires_grad_() for k, v in x.items()}


def check_grads(dtype="float32", softplus=True, last_state=True, seed=0, **opts):
    x = cuda_leaves(make_inputs(dtype, seed, softplus, **opts))
    w, v = loss_weights(x, seed, dtype)
    res = selective_scan_fn(**x, delta_softplus=softplus, return_last_state=last_state)
    out, h = res if last_state else (res, None)
    assert out.is_cuda and out.dtype == x["u"].dtype and out.grad_fn is not None
    loss = (out.double() * w.cuda()).sum() + ((h.double() * v.cuda()).sum() if last_state else 0.0)
    loss.backward()
    torch.cuda.synchronize()
    ref = reference_grads(dtype, seed, softplus, last_state, tuple(sorted(opts.items())))
    low = {"u", "delta", "z", "B", "C"}
    for k, t in x.items():
        assert t.grad is not None, f"no gradient for {k}"
        assert t.grad.is_cuda and t.grad.dtype == t.dtype and t.grad.shape == t.shape, k
        tol = TOL[dtype] if k in low else TOL["float32"]
        err = rel_err(t.grad.cpu(), ref[k])
        assert err <= tol, f"d{k}: rel_err {err:.3e} > {tol:.0e} ({dtype})"


OPTION_CASES = [
    pytest.param(dict(zip(OPTION_NAMES, vals)), *BC_PAIRS[i % len(BC_PAIRS)],
                 id="-".join(["".join("DZbsiL"[j] if on else "_" for j, on in enumerate(vals)),
                              *BC_PAIRS[i % len(BC_PAIRS)]]))
    for i, vals in enumerate(itertools.product([False, True], repeat=6))
]


@pytest.mark.parametrize("opts,bl,cl", OPTION_CASES)
def test_options(opts, bl, cl):
    check_grads(b=2, d=6, l=20, n=4, g=3, B=bl, C=cl, **opts)


@pytest.mark.parametrize("bl,cl", BC_PAIRS, ids=["-".join(p) for p in BC_PAIRS])
def test_bc_layouts(bl, cl):
    check_grads(b=2, d=12, l=270, n=8, g=3, B=bl, C=cl, **ALL_ON)


@pytest.mark.parametrize("l", [1, 7, 256, 300, 513])
@pytest.mark.parametrize("n", [1, 5, 16, 40])
@pytest.mark.parametrize("d", [3, 17])
def test_sizes(d, n, l):
    """Partial blocks of 8 channels, n below / above the 8 warps of a block, lengths
    around the 256-step chunks."""
    check_grads(b=2, d=d, l=l, n=n, B="shared", C="grouped", g=1, **ALL_ON)


def test_n256():
    check_grads(b=1, d=9, l=40, n=256, B="grouped", C="const", g=3, **ALL_ON)


@pytest.mark.parametrize("d,g", [(16, 2), (34, 2), (48, 3), (5, 5), (24, 12)])
def test_groups(d, g):
    """Groups that straddle the blocks of 8 channels."""
    check_grads(b=2, d=d, l=40, n=4, g=g, B="grouped", C="grouped", **ALL_ON)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtypes(dtype):
    check_grads(dtype, b=2, d=17, l=300, n=16, g=1, B="grouped", C="shared", **ALL_ON)


def test_long_sequence():
    """l = 3000: 12 chunks, states carried forward and adjoints backward."""
    check_grads(b=1, d=3, l=3000, n=4, B="shared", C="const", **ALL_ON)


def test_large_delta():
    x = make_inputs("float32", 4, True, b=2, d=5, l=300, n=4, **OPTS)
    with torch.no_grad():
        x["delta"][0, :, ::3] = 25.0
        x["delta"][1, 2, :5] = torch.tensor([-100.0, -30.0, -20.5, 19.9, 20.1])
    ref = {k: t.detach().double().requires_grad_() for k, t in x.items()}
    xc = cuda_leaves(x)
    out, h = selective_scan_fn(**xc, delta_softplus=True, return_last_state=True)
    (out.sum() + h.sum()).backward()
    ro, rh = ref_scan(**ref, delta_softplus=True)
    (ro.sum() + rh.sum()).backward()
    for k in xc:
        assert rel_err(xc[k].grad.cpu(), ref[k].grad) <= TOL["float32"], k


def test_noncontiguous_and_mixed_dtypes():
    """Channel-last u/delta/z, time-major B, A in float64-free mixes (bf16 B)."""
    x = make_inputs("float32", 3, True, b=2, d=16, l=300, n=4, B="shared", C="grouped", g=2,
                    **OPTS)
    v = {k: t.detach().cuda() for k, t in x.items()}
    for k in ("u", "delta", "z"):
        v[k] = v[k].transpose(1, 2).contiguous().transpose(1, 2)
    v["B"] = v["B"].transpose(1, 2).contiguous().transpose(1, 2)
    v["C"] = v["C"].bfloat16()
    v = {k: t.requires_grad_() for k, t in v.items()}
    out, h = selective_scan_fn(**v, delta_softplus=True, return_last_state=True)
    (out.square().sum() + h.sum()).backward()
    ref = {k: t.detach().cpu().double().requires_grad_() for k, t in v.items()}
    ro, rh = ref_scan(**ref, delta_softplus=True)
    (ro.square().sum() + rh.sum()).backward()
    for k in v:
        tol = TOL["bfloat16"] if k == "C" else TOL["float32"]
        assert v[k].grad.dtype == v[k].dtype
        assert rel_err(v[k].grad.cpu(), ref[k].grad) <= tol, k


def test_outputs_written_and_deterministic_shapes():
    """Poisoned caching-allocator blocks: every element of every gradient is written."""
    for _ in range(3):
        torch.full((2, 17, 300), float("nan"), device="cuda")
    x = {k: t.detach().cuda() for k, t in make_inputs("float32", 5, True, b=2, d=17, l=300,
                                                      n=4, **OPTS).items()}
    dout = torch.randn(2, 17, 300, device="cuda")
    g1 = _core.selective_scan_bwd(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                  x["delta_bias"], True, x["initial_state"], dout, None)
    g2 = _core.selective_scan_bwd(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                  x["delta_bias"], True, x["initial_state"], dout, None)
    torch.cuda.synchronize()
    for a, b in zip(g1, g2):
        assert bool(torch.isfinite(a).all())
        # atomics may reorder float32 sums: equal to rounding, not bit-exact
        assert rel_err(a.cpu(), b.cpu()) <= 1e-6


def _np_backward(x, w, v):
    """float64 NumPy backward of SPEC §1 for shared B/C, no softplus/bias/z/D, written
    from the adjoint recurrence (fast enough for long sequences)."""
    u, dl, A, B, C, h0 = (x[k] for k in ("u", "delta", "A", "B", "C", "initial_state"))
    b, d, length = u.shape
    hs = np.empty((length + 1, b, d, A.shape[1]))
    hs[0] = h0
    for t in range(length):
        hs[t + 1] = np.exp(dl[:, :, t, None] * A) * hs[t] + (dl[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
    g = v.copy()
    du, ddl, dA = np.zeros_like(u), np.zeros_like(dl), np.zeros_like(A)
    for t in range(length - 1, -1, -1):
        g = g + C[:, None, :, t] * w[:, :, t, None]
        a = np.exp(dl[:, :, t, None] * A)
        du[:, :, t] = (g * dl[:, :, t, None] * B[:, None, :, t]).sum(-1)
        ddl[:, :, t] = (g * (B[:, None, :, t] * u[:, :, t, None] + A * a * hs[t])).sum(-1)
        dA += (g * dl[:, :, t, None] * a * hs[t]).sum(0)
        g = g * a
    return dict(u=du, delta=ddl, A=dA, initial_state=g)


def test_long_sequence_numpy_reference():
    """l = 2^16 (256 chunks) against a float64 NumPy adjoint."""
    x = scan_inputs(seed=9, b=1, d=3, l=1 << 16, n=4, D=False, z=False, delta_bias=False,
                    softplus=False, initial_state=True)
    rng = np.random.default_rng(1)
    w = rng.standard_normal(x["u"].shape)
    v = rng.standard_normal(x["initial_state"].shape)
    xc = {k: torch.from_numpy(a).float().cuda().requires_grad_() for k, a in x.items()}
    out, h = selective_scan_fn(**xc, return_last_state=True)
    ((out.double() * torch.from_numpy(w).cuda()).sum() + (h.double() * torch.from_numpy(v).cuda()).sum()).backward()
    xr = {k: torch.from_numpy(a).float().double().numpy() for k, a in x.items()}
    ref = _np_backward(xr, torch.from_numpy(w).float().double().numpy(), v)
    for k, r in ref.items():
        assert rel_err(xc[k].grad.cpu(), r) <= 1e-4, k


def test_l_2_20_matches_cpu_backward():
    """l = 2^20 runs (4096 chunks) and agrees with the CPU backward (itself checked
    against the float64 reference in test_grad.py)."""
    x = {k: torch.from_numpy(a).float() for k, a in
         scan_inputs(seed=11, b=1, d=2, l=1 << 20, n=4, B="shared", C="shared").items()}
    dout = torch.randn(1, 2, 1 << 20)
    args = lambda dev: [x[k].to(dev) for k in ("u", "delta", "A", "B", "C", "D", "z",
                                                 "delta_bias")]
    gc = _core.selective_scan_bwd(*args("cuda"), True, x["initial_state"].cuda(), dout.cuda(), None)
    gh = _core.selective_scan_bwd(*args("cpu"), True, x["initial_state"], dout, None)
    for a, b in zip(gc, gh):
        assert rel_err(a.cpu(), b) <= 1e-4


# ------------------------------------------------------------ custom ops on CUDA

FWD = torch.ops.mamba_attention.selective_scan_fwd.default
BWD = torch.ops.mamba_attention.selective_scan_bwd.default
ORDER = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _tensors(dtype=torch.float32, grad=False, seed=0, **opts):
    low = {"u", "delta", "z", "B", "C"}
    x = scan_inputs(seed=seed, **opts)
    return {k: torch.from_numpy(v).to(dtype if k in low else torch.float32).cuda()
            .requires_grad_(grad) for k, v in x.items()}


def _fwd_args(x, softplus=True):
    return (x["u"], x["delta"], x["A"], x["B"], x["C"], x.get("D"), x.get("z"),
            x.get("delta_bias"), softplus, x.get("initial_state"))


@pytest.mark.parametrize("dlast", [False, True])
def test_opcheck_cuda(dlast):
    x = _tensors(grad=True, b=2, d=5, l=9, n=4, B="shared", C="grouped", g=5)
    torch.library.opcheck(FWD, _fwd_args(x))
    y = {k: t.detach() for k, t in x.items()}
    dout = torch.randn(2, 5, 9, device="cuda")
    dl = torch.randn(2, 5, 4, device="cuda") if dlast else None
    torch.library.opcheck(BWD, _fwd_args(y) + (dout, dl))


def _loss_fn(u, delta, A, B, C, D, z, delta_bias, initial_state):
    out, h = selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True,
                               return_last_state=True, initial_state=initial_state)
    return (out * out).sum() + (h * torch.cos(h)).sum()


def test_torch_compile_fullgraph_cuda():
    x = _tensors(grad=True, b=2, d=6, l=300, n=4, B="shared", C="grouped", g=3)
    args = [x[k] for k in ORDER]
    compiled = torch.compile(_loss_fn, fullgraph=True)
    loss_c = compiled(*args)
    grads_c = torch.autograd.grad(loss_c, args)
    loss_e = _loss_fn(*args)
    grads_e = torch.autograd.grad(loss_e, args)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for k, gc, ge in zip(ORDER, grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-5, msg=k)


# ------------------------------------------- the channel-parallel kernel (fast path)
# selective_scan_bwd_fast runs when n <= 16, B and C are time-varying and no block
# of 32 channels straddles two groups: 32-step chunks of 8 sub-chunks of 4 steps,
# so the sizes below straddle channel blocks, chunks and sub-chunks.

FAST_OPTION_CASES = [
    pytest.param(dict(zip(OPTION_NAMES, vals)),
                 id="".join("DZbsiL"[j] if on else "_" for j, on in enumerate(vals)))
    for vals in itertools.product([False, True], repeat=6)
]


@pytest.mark.parametrize("opts", FAST_OPTION_CASES)
def test_fast_options(opts):
    check_grads(b=2, d=33, l=37, n=5, g=1, B="shared", C="grouped", **opts)


@pytest.mark.parametrize("l", [1, 3, 4, 5, 31, 32, 33, 64, 97, 300])
@pytest.mark.parametrize("d,n", [(33, 16), (40, 7)])
def test_fast_sizes(d, n, l):
    check_grads(b=2, d=d, l=l, n=n, B="grouped", C="shared", g=1, **ALL_ON)


@pytest.mark.parametrize("d,g,bl,cl", [(64, 2, "grouped", "grouped"), (96, 3, "grouped", "shared"),
                                       (64, 2, "shared", "grouped"), (128, 4, "grouped", "grouped")])
def test_fast_groups(d, g, bl, cl):
    """Groups of 32, 64 channels: one group per block of 32 channels."""
    check_grads(b=2, d=d, l=70, n=16, g=g, B=bl, C=cl, **ALL_ON)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fast_dtypes_long(dtype):
    check_grads(dtype, b=2, d=64, l=1000, n=16, g=1, B="grouped", C="grouped", **ALL_ON)


def test_fast_noncontiguous_and_mixed_dtypes():
    """The fast path with channel-last u/delta/z, time-major B, bf16 C, f64 D."""
    x = make_inputs("float32", 3, True, b=2, d=40, l=75, n=16, B="shared", C="grouped", g=1,
                    **OPTS)
    v = {k: t.detach().cuda() for k, t in x.items()}
    for k in ("u", "delta", "z"):
        v[k] = v[k].transpose(1, 2).contiguous().transpose(1, 2)
    v["B"] = v["B"].transpose(1, 2).contiguous().transpose(1, 2)
    v["C"] = v["C"].bfloat16()
    v["D"] = v["D"].double()
    v = {k: t.requires_grad_() for k, t in v.items()}
    out, h = selective_scan_fn(**v, delta_softplus=True, return_last_state=True)
    (out.square().sum() + h.sum()).backward()
    ref = {k: t.detach().cpu().double().requires_grad_() for k, t in v.items()}
    ro, rh = ref_scan(**ref, delta_softplus=True)
    (ro.square().sum() + rh.sum()).backward()
    for k in v:
        tol = TOL["bfloat16"] if k == "C" else TOL["float32"]
        assert v[k].grad.dtype == v[k].dtype
        assert rel_err(v[k].grad.cpu(), ref[k].grad) <= tol, k


def test_fast_matches_general_kernel():
    """The fast kernel (g = 1) against the general one (the same B, C given as
    groups of 16 channels, which the fast path does not take) at bf16."""
    x = {k: t.detach().cuda() for k, t in make_inputs("bfloat16", 7, True, b=2, d=64, l=600,
                                                       n=16, B="grouped", C="grouped", g=1,
                                                       **OPTS).items()}
    dout = torch.randn(2, 64, 600, device="cuda").bfloat16()
    dlast = torch.randn(2, 64, 16, device="cuda")
    args = lambda B, C: (x["u"], x["delta"], x["A"], B, C, x["D"], x["z"], x["delta_bias"],  # noqa: E731
                         True, x["initial_state"], dout, dlast)
    gf = _core.selective_scan_bwd(*args(x["B"], x["C"]))
    Bg, Cg = (t.expand(2, 4, 16, 600).contiguous() for t in (x["B"], x["C"]))
    gg = _core.selective_scan_bwd(*args(Bg, Cg))
    gg = list(gg)
    gg[3], gg[4] = gg[3].sum(1, keepdim=True), gg[4].sum(1, keepdim=True)
    for a, b in zip(gf, gg):
        if a is None:
            continue
        assert rel_err(a.float().cpu(), b.float().cpu()) <= 1e-2
