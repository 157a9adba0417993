"""conv_selective_scan_fn: the causal conv1d (+ SiLU) fused into the selective scan.

Parity with the float64 composition of the references (tests/reference.py:
causal_conv1d_ref then selective_scan_ref), on every CPU SIMD level and on CUDA
(``target``); agreement with the unfused pair causal_conv1d_fn → selective_scan_fn on
the same device: bit for bit on the CPU (the fused kernel rounds u to x's dtype where
the unfused pair stores it), to float32 rounding of u on CUDA (the fused kernel's SiLU
is the scan's fast one; see kernels/selective_scan_fwd.cu); gradients against torch autograd
through a float64 torch composition; the custom ops (opcheck, torch.compile);
argument errors; nn.Mamba's fused path against its unfused one.
"""

import itertools

import numpy as np
import pytest

from conftest import (  # noqa: E402
    KINDS,
    _core,
    assert_close,
    assert_output,
    clone,
    convert,
    default_kind,
    is_torch,
    on_cuda,
    same_values,
    scan_inputs,
    split_kind,
    sync,
    to_kind,
)
from reference import (  # noqa: E402
    TOL,
    causal_conv1d_ref,
    rel_err,
    selective_scan_ref,
    to_f64,
)

if _core is None:
    pytest.skip("mamba_attention._core is not built", allow_module_level=True)

from mamba_attention import causal_conv1d_fn, conv_selective_scan_fn, selective_scan_fn  # noqa: E402

try:
    import torch
except ImportError:
    torch = None

CONV = ("x", "conv_weight", "conv_bias")


def fused_inputs(seed=0, w=4, conv_bias=True, **opts):
    """float64 keyword arguments of conv_selective_scan_fn (without the flags)."""
    x = scan_inputs(seed=seed, **opts)
    rng = np.random.default_rng(seed + 1000)
    d = x["u"].shape[1]
    x["x"] = x.pop("u")
    x["conv_weight"] = rng.standard_normal((d, w)) * 0.6
    x["conv_bias"] = rng.standard_normal(d) * 0.3 if conv_bias else None
    return x


def _to_kind(x64, kind, layout):
    bias = x64.pop("conv_bias")
    x = to_kind(x64, kind, layout)
    x["conv_bias"] = None if bias is None else to_kind({"conv_bias": bias}, kind, layout)["conv_bias"]
    return x


def run_fused(kind=None, layout="contiguous", softplus=True, activation="silu", last_state=True,
              w=4, conv_bias=True, unfused=True, **opts):
    """Call conv_selective_scan_fn; check kind/shape/device, parity with the float64
    reference, that no input changed, and (``unfused``) equality with the unfused pair."""
    kind = kind or default_kind()
    x = _to_kind(fused_inputs(w=w, conv_bias=conv_bias, softplus=softplus, **opts), kind, layout)
    before = {k: clone(v) for k, v in x.items()}
    ref_out, ref_h = reference(x, kind, softplus, activation)
    res = conv_selective_scan_fn(**x, delta_softplus=softplus, activation=activation,
                                 return_last_state=last_state)
    sync()
    for k, v in x.items():
        if v is not None:
            assert same_values(v, before[k]), f"input {k} was modified"
    if last_state:
        assert isinstance(res, tuple) and len(res) == 2, type(res)
        out, h = res
        assert_output(h, x["x"], ref_h.shape, dtype="float32")
        assert_close(h, ref_h, "float32", "last_state")
    else:
        assert not isinstance(res, tuple), type(res)
        out, h = res, None
    assert_output(out, x["x"], ref_out.shape)
    assert_close(out, ref_out, split_kind(kind)[1])
    if unfused:
        u = causal_conv1d_fn(x["x"], x["conv_weight"], x["conv_bias"], activation=activation)
        rest = {k: v for k, v in x.items() if k not in CONV}
        out_u, h_u = selective_scan_fn(u, **rest, delta_softplus=softplus, return_last_state=True)
        sync()
        assert_unfused(out, out_u, split_kind(kind)[1])
        if h is not None:
            assert_unfused(h, h_u, "float32", "last_state")
    return out, h


def reference(x, kind, softplus, activation):
    """The float64 composition, with u rounded to x's dtype (the op's contract: u is
    what causal_conv1d_fn would return in that dtype). The kernels compute u in float32
    and round that, so the reference rounds through float32 too: a direct float64 ->
    bfloat16 rounding (ml_dtypes >= 0.7 rounds correctly; torch goes through float32)
    can differ by one ulp near ties."""
    u = causal_conv1d_ref(x["x"], x["conv_weight"], x["conv_bias"], activation=activation)
    u = to_f64(convert(u.astype(np.float32).astype(np.float64), kind))
    rest = {k: v for k, v in x.items() if k not in CONV}
    return selective_scan_ref(u, **rest, delta_softplus=softplus, return_last_state=True)


def assert_unfused(ours, unfused, dtype, what="out"):
    """CPU: the same bits; CUDA: within float32 rounding of u (a flipped 16-bit rounding
    of one u value moves the outputs by about one ulp of the dtype)."""
    if not on_cuda():
        assert same_values(ours, unfused), (
            f"{what}: fused != unfused: max |diff| "
            f"{np.abs(_f64(ours) - _f64(unfused)).max():.3e}")
        return
    t = 2e-6 if dtype == "float32" else TOL[dtype] / 4
    err = rel_err(ours, unfused)
    assert err <= t, f"{what}: fused vs unfused rel_err {err:.3e} > {t:.0e} ({dtype})"


def _f64(t):
    if is_torch(t):
        return t.detach().double().cpu().numpy()
    return np.asarray(t, dtype=np.float64)


# ------------------------------------------------------------------ forward parity


@pytest.mark.parametrize("kind", KINDS)
def test_kinds(target, kind):
    """Every dtype, NumPy and torch: l = 77 crosses the CPU's 64-step tiles and leaves a
    tail of 5 after the CUDA kernel's groups of 8; d = 37 a partial channel block."""
    run_fused(kind, b=2, d=37, l=77, n=5)


@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("w", [2, 3, 4, 5, 6, 7, 8])
def test_widths(target, w, activation):
    """Every conv width (2..8; 5..8 take the 8-tap CUDA kernel), with and without SiLU,
    with a conv bias for odd widths only."""
    run_fused(w=w, conv_bias=w % 2 == 1, activation=activation, b=2, d=19, l=100, n=4)


OPTION_NAMES = ("D", "z", "delta_bias", "softplus", "initial_state", "conv_bias", "last_state")


@pytest.mark.parametrize(
    "vals",
    [v for i, v in enumerate(itertools.product([False, True], repeat=7)) if i % 9 == 0]
    + [(True,) * 7, (False,) * 7],
    ids=lambda v: "".join("DZbsicL"[j] if on else "_" for j, on in enumerate(v)),
)
def test_options(target, vals):
    o = dict(zip(OPTION_NAMES, vals))
    last_state = o.pop("last_state")
    softplus = o.pop("softplus")
    conv_bias = o.pop("conv_bias")
    run_fused(softplus=softplus, last_state=last_state, conv_bias=conv_bias, b=2, d=9, l=41,
              n=3, **o)


BC_PAIRS = list(itertools.product(["const", "shared", "grouped"], repeat=2))


@pytest.mark.parametrize("bl,cl", BC_PAIRS, ids=["-".join(p) for p in BC_PAIRS])
def test_bc_layouts(target, bl, cl):
    run_fused(b=2, d=12, l=70, n=6, g=3, B=bl, C=cl)


@pytest.mark.parametrize("l", [1, 2, 7, 8, 9, 63, 64, 65, 129, 520])
def test_lengths(target, l):
    """Lengths around the CUDA kernel's groups of 8 and 64-step B/C chunks and the CPU's
    64-step tiles (bfloat16 on the GPU's fast kernel: n = 16, d a multiple of 64)."""
    kind = "torch-bfloat16" if on_cuda() else "numpy-float32"
    run_fused(kind, b=1, d=128, l=l, n=16, g=2, B="grouped", C="shared")


@pytest.mark.parametrize("layout", ["strided", "offset", "swap_last2", "reversed_order"])
def test_layouts(target, layout):
    """Non-contiguous x/delta/z (channel-last x is the CUDA kernel's scalar path)."""
    kind = "torch-float16" if on_cuda() else "torch-float32"
    run_fused(kind, layout=layout, b=2, d=70, l=45, n=16)


def test_long_outer_chunks(target):
    """Long l where the CPU scan cuts time into several outer chunks (b·g·n large):
    the conv's history and the state carry across them. (CUDA: the general kernel.)"""
    run_fused("torch-float32", b=2, d=8, l=4200, n=64, g=8, B="grouped", C="grouped",
              unfused=True)


def test_long_bf16(target):
    run_fused("torch-bfloat16", b=1, d=64, l=3001, n=16)


def test_default_activation_is_silu():
    x = _to_kind(fused_inputs(b=1, d=4, l=10, n=2), "numpy-float32", "contiguous")
    a = conv_selective_scan_fn(**x)
    b = conv_selective_scan_fn(**x, activation="swish")
    c = conv_selective_scan_fn(**x, activation=None)
    assert same_values(a, b) and not same_values(a, c)


# ------------------------------------------------------------------ errors


def _np_inputs(**kw):
    return _to_kind(fused_inputs(b=2, d=4, l=10, n=3, **kw), "numpy-float32", "contiguous")


@pytest.mark.parametrize(
    "change,exc,words",
    [
        (dict(conv_weight=np.zeros((4, 9), np.float32)), ValueError, ["weight", "8"]),
        (dict(conv_weight=np.zeros((4, 1), np.float32)), ValueError, ["weight", "2"]),
        (dict(conv_weight=np.zeros((5, 4), np.float32)), ValueError, ["weight", "(d, w)"]),
        (dict(conv_bias=np.zeros(5, np.float32)), ValueError, ["bias", "(4,)"]),
        (dict(x=np.zeros((2, 4), np.float32)), ValueError, ["x"]),
        (dict(delta=np.zeros((2, 4, 11), np.float32)), ValueError, ["delta"]),
        (dict(delta=np.zeros((2, 4, 10), np.float16)), TypeError, ["delta"]),
        (dict(conv_weight=np.zeros((4, 4), np.int32)), TypeError, ["weight"]),
        (dict(activation="relu"), ValueError, ["activation", "relu"]),
        (dict(activation=3), TypeError, ["activation"]),
    ],
)
def test_errors(change, exc, words):
    x = _np_inputs()
    x.update(change)
    with pytest.raises(exc) as e:
        conv_selective_scan_fn(**x)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


# ------------------------------------------------------------------ gradients

NAMES = ("x", "conv_weight", "conv_bias", "delta", "A", "B", "C", "D", "z", "delta_bias",
         "initial_state")
LOW = {"x", "delta", "z", "B", "C"}


def _ref_torch(x, conv_weight, conv_bias, delta, A, B, C, D=None, z=None, delta_bias=None,
               initial_state=None, softplus=True, activation="silu"):
    """The composition in torch (float64 autograd): conv by F.conv1d, the scan by the
    step-by-step reference of test_grad.py."""
    import torch.nn.functional as F
    from test_grad import ref_scan

    d, w = conv_weight.shape
    u = F.conv1d(F.pad(x, (w - 1, 0)), conv_weight[:, None, :], conv_bias, groups=d)
    if activation:
        u = u * torch.sigmoid(u)
    return ref_scan(u, delta, A, B, C, D, z, delta_bias, softplus, initial_state)


def _grad_inputs(dtype, seed, softplus, conv_bias, **opts):
    x64 = fused_inputs(seed=seed, softplus=softplus, conv_bias=conv_bias, **opts)
    tdt = getattr(torch, dtype)
    dev = "cuda" if on_cuda() else "cpu"
    x = {k: torch.from_numpy(v).to(tdt if k in LOW else torch.float32).to(dev)
         .requires_grad_() for k, v in x64.items() if v is not None}
    x.setdefault("conv_bias", None)
    return x


def check_grads(dtype="float32", softplus=True, activation="silu", last_state=True,
                conv_bias=True, seed=0, **opts):
    pytest.importorskip("torch")
    if on_cuda() and dtype == "float64":
        pytest.skip("CUDA: float64 is CPU-only")
    x = _grad_inputs(dtype, seed, softplus, conv_bias, **opts)
    rng = np.random.default_rng(seed + 7)
    b, d, length = x["x"].shape
    n = x["A"].shape[1]
    wo = torch.from_numpy(rng.standard_normal((b, d, length))).to(getattr(torch, dtype)).double()
    wh = torch.from_numpy(rng.standard_normal((b, d, n))).double()
    res = conv_selective_scan_fn(**x, delta_softplus=softplus, activation=activation,
                                 return_last_state=last_state)
    out, h = res if last_state else (res, None)
    assert out.grad_fn is not None and out.dtype == x["x"].dtype
    loss = (out.double() * wo.to(out.device)).sum()
    if last_state:
        loss = loss + (h.double() * wh.to(h.device)).sum()
    loss.backward()
    x64 = {k: None if v is None else v.detach().cpu().double().requires_grad_()
           for k, v in x.items()}
    ro, rh = _ref_torch(**x64, softplus=softplus, activation=activation)
    rloss = (ro * wo).sum() + ((rh * wh).sum() if last_state else 0.0)
    rloss.backward()
    for k, t in x.items():
        if t is None:
            continue
        assert t.grad is not None, f"no gradient for {k}"
        assert t.grad.dtype == t.dtype and t.grad.shape == t.shape, (k, t.grad.dtype)
        tl = TOL[dtype] if k in LOW else TOL["float32"]
        if on_cuda():
            tl = max(tl, 2e-5)
        if dtype in ("float16", "bfloat16") and k not in LOW:
            tl = TOL[dtype]  # parameter gradients sum low-precision terms
        err = rel_err(t.grad.detach().cpu(), x64[k].grad)
        assert err <= tl, f"d{k}: rel_err {err:.3e} > {tl:.0e} ({dtype})"


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_grad_dtypes(target, dtype):
    check_grads(dtype, b=2, d=6, l=33, n=4)


@pytest.mark.parametrize("w", [2, 4, 7])
@pytest.mark.parametrize("activation", ["silu", None])
def test_grad_widths(target, w, activation):
    check_grads(w=w, activation=activation, conv_bias=w != 4, b=1, d=5, l=40, n=3)


@pytest.mark.parametrize(
    "opts",
    [
        dict(D=False, z=False, delta_bias=False, initial_state=False, softplus=False,
             last_state=False),
        dict(B="const", C="grouped", g=3, last_state=False),
        dict(B="grouped", C="const", g=2, initial_state=False),
    ],
    ids=["none", "const-grouped", "grouped-const"],
)
def test_grad_options(target, opts):
    check_grads(b=2, d=6, l=20, n=4, **opts)


def test_grad_only_last_state(target):
    """Only last_state feeds the loss: dout is None in the backward."""
    pytest.importorskip("torch")
    x = _grad_inputs("float32", 0, True, True, b=1, d=4, l=12, n=3)
    _, h = conv_selective_scan_fn(**x, delta_softplus=True, return_last_state=True)
    h.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all()
               for t in x.values() if t is not None)


# ------------------------------------------------------------------ custom ops


def _op_args(x, softplus=True, silu=True):
    return (x["x"], x["conv_weight"], x.get("conv_bias"), x["delta"], x["A"], x["B"], x["C"],
            x.get("D"), x.get("z"), x.get("delta_bias"), softplus, silu, x.get("initial_state"))


OP_SAMPLES = [
    dict(b=2, d=6, l=11, n=4, B="shared", C="grouped", g=3),
    dict(b=1, d=4, l=9, n=3, B="const", C="const", D=False, z=False, delta_bias=False,
         initial_state=False, conv_bias=False),
]


@pytest.mark.parametrize("opts", OP_SAMPLES, ids=["all", "none"])
def test_opcheck(opts):
    pytest.importorskip("torch")
    import mamba_attention._autograd  # noqa: F401

    x = _grad_inputs("float32", 0, True, opts.pop("conv_bias", True), **opts)
    fwd = torch.ops.mamba_attention.conv_selective_scan_fwd.default
    bwd = torch.ops.mamba_attention.conv_selective_scan_bwd.default
    torch.library.opcheck(fwd, _op_args(x))
    xd = {k: None if v is None else v.detach() for k, v in x.items()}
    b, d, length = xd["x"].shape
    dout = torch.randn(b, d, length)
    dl = torch.randn(b, d, xd["A"].shape[1])
    torch.library.opcheck(bwd, _op_args(xd) + (dout, dl))
    torch.library.opcheck(bwd, _op_args(xd, silu=False) + (dout, None))


def test_torch_compile_fullgraph():
    """Forward and backward through torch.compile(fullgraph=True) equal eager."""
    pytest.importorskip("torch")
    x = _grad_inputs("float32", 0, True, True, b=2, d=6, l=12, n=4, B="shared", C="grouped",
                     g=3)
    keys = list(x)

    def loss_fn(*args):
        kw = dict(zip(keys, args))
        out, h = conv_selective_scan_fn(**kw, delta_softplus=True, return_last_state=True)
        return (out * out).sum() + (h * torch.cos(h)).sum()

    args = [x[k] for k in keys]
    compiled = torch.compile(loss_fn, fullgraph=True)
    loss_c = compiled(*args)
    grads_c = torch.autograd.grad(loss_c, args)
    loss_e = loss_fn(*args)
    grads_e = torch.autograd.grad(loss_e, args)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
    for k, gc, ge in zip(keys, grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6, msg=k)


def test_inference_path_no_graph():
    """No gradient needed: the direct kernel call, same values as the custom op."""
    pytest.importorskip("torch")
    x = _grad_inputs("bfloat16", 0, True, True, b=2, d=5, l=9, n=4)
    out_g = conv_selective_scan_fn(**x, delta_softplus=True)
    with torch.no_grad():
        out_n = conv_selective_scan_fn(**x, delta_softplus=True)
    assert out_n.grad_fn is None and out_g.grad_fn is not None
    assert torch.equal(out_g, out_n)


# ------------------------------------------------------------------ nn.Mamba


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mamba_fused_equals_unfused(target, dtype):
    """nn.Mamba's fused conv→scan path gives the unfused path's outputs (same bits on the
    CPU) and its gradients (to rounding: the x gradient sums two terms in another order)."""
    pytest.importorskip("torch")
    from mamba_attention.nn import Mamba

    dev = "cuda" if on_cuda() else "cpu"
    tdt = getattr(torch, dtype)
    torch.manual_seed(0)
    layer = Mamba(d_model=32, d_state=16, d_conv=4, expand=2, layer_idx=0).to(dev, tdt)
    hs = torch.randn(2, 70, 32, device=dev, dtype=tdt, requires_grad=True)
    outs, grads = [], []
    for fused in (True, False):
        layer.fused_conv_scan = fused
        layer.zero_grad()
        hs.grad = None
        out = layer(hs)
        out.float().square().sum().backward()
        outs.append(out.detach())
        grads.append([hs.grad.clone()] + [p.grad.clone() for p in layer.parameters()])
    assert_unfused(outs[0], outs[1], dtype)
    tl = TOL[dtype] if dtype != "float32" else 1e-5
    for a, b in zip(*grads):
        assert rel_err(a.float().cpu(), b.float().cpu()) <= tl
