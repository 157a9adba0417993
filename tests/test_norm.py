"""rms_norm_fn (fused residual add) and swiglu against float64 references, forward
and backward, on every SIMD level and on CUDA (the ``target`` fixture), plus the
custom ops' opcheck, torch.compile and argument errors."""

import numpy as np
import pytest

pytest.importorskip("mamba_attention._core")

from conftest import (assert_close, convert, cpu_only, is_torch, require, split_kind,  # noqa: E402
                      sync, target_device, to_f64)
from reference import rms_norm_ref, swiglu_ref  # noqa: E402

from mamba_attention import rms_norm_fn, swiglu  # noqa: E402

pytestmark = pytest.mark.usefixtures("target")

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None


def _kinds():
    return ["numpy-float32", "numpy-bfloat16", "torch-float32", "torch-float16",
            "torch-bfloat16"]


def _poison_check(out, shape):
    assert tuple(out.shape) == tuple(shape)
    assert np.isfinite(to_f64(out)).all()


def _norm_inputs(seed, shape, bias, residual):
    rng = np.random.default_rng(seed)
    h = shape[-1]
    x = dict(x=rng.standard_normal(shape) * 2.0 + 0.3,
             weight=rng.standard_normal(h) * 0.5 + 1.0)
    if bias:
        x["bias"] = rng.standard_normal(h)
    if residual:
        x["residual"] = rng.standard_normal(shape)
    return x


@pytest.mark.parametrize("kind", _kinds())
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 16), (257, 33), (4, 1000), (3, 4100)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias,residual,prenorm", [(False, False, False), (True, True, True),
                                                   (False, True, False), (True, False, True)],
                         ids=["plain", "bias-res-prenorm", "res", "bias-prenorm"])
def test_rms_norm_forward(kind, shape, bias, residual, prenorm):
    require(kind)
    ins = _norm_inputs(1, shape, bias, residual)
    # Parameters stay float32 as in mixed-precision models; x and residual in kind.
    x = {k: convert(v, kind if k in ("x", "residual") else
                    split_kind(kind)[0] + "-float32") for k, v in ins.items()}
    res = rms_norm_fn(**x, prenorm=prenorm, eps=1e-5)
    sync()
    ref_y, ref_s = rms_norm_ref(**x, eps=1e-5)
    dtype = split_kind(kind)[1]
    if prenorm:
        out, s = res
        _poison_check(s, shape)
        assert_close(s, ref_s, dtype, "residual_out")
        assert type(s) is type(x["x"])
    else:
        out = res
    _poison_check(out, shape)
    assert type(out) is type(x["x"]) and str(out.dtype) == str(x["x"].dtype)
    assert_close(out, ref_y, dtype)


@pytest.mark.parametrize("residual_in_fp32", [False, True])
def test_rms_norm_residual_dtype(residual_in_fp32):
    """The returned residual: residual's dtype if given, else float32 with
    residual_in_fp32, else x's (mamba_ssm's rule)."""
    pytest.importorskip("torch")
    ins = _norm_inputs(2, (4, 24), False, False)
    x = convert(ins["x"], "torch-bfloat16")
    w = convert(ins["weight"], "torch-float32")
    _, s = rms_norm_fn(x, w, None, prenorm=True, residual_in_fp32=residual_in_fp32)
    assert s.dtype == (torch.float32 if residual_in_fp32 else torch.bfloat16)
    r = convert(ins["x"] * 0.5, "torch-float16")
    _, s = rms_norm_fn(x, w, None, residual=r, prenorm=True, residual_in_fp32=residual_in_fp32)
    assert s.dtype == torch.float16


@cpu_only
def test_rms_norm_noncontiguous():
    """x as a transposed view and residual with a stride in the last axis."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal((40, 9))
    x = base.T.astype(np.float32)  # (9, 40), not contiguous
    r = rng.standard_normal((9, 80))[:, ::2].astype(np.float32)
    w = rng.standard_normal(40).astype(np.float32)
    out, s = rms_norm_fn(x, w, None, residual=r, prenorm=True)
    ref_y, ref_s = rms_norm_ref(x, w, residual=r)
    assert_close(out, ref_y, "float32")
    assert_close(s, ref_s, "float32", "residual_out")


@pytest.mark.parametrize("kind", ["numpy-float32", "torch-float32", "torch-bfloat16"])
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (3, 4, 130), (64, 4099)],
                         ids=lambda s: "x".join(map(str, s)))
def test_swiglu_forward(kind, shape):
    require(kind)
    rng = np.random.default_rng(4)
    g = rng.standard_normal(shape) * 3.0
    if g.size > 1:
        g.flat[0] = -120.0  # exp overflow side: silu → -0
    u = rng.standard_normal(shape)
    gk, uk = convert(g, kind), convert(u, kind)
    out = swiglu(gk, uk)
    sync()
    _poison_check(out, shape)
    assert type(out) is type(gk) and str(out.dtype) == str(gk.dtype)
    assert_close(out, swiglu_ref(gk, uk), split_kind(kind)[1])


# ---------------------------------------------------------------- gradients


def _t64(a, requires_grad=True):
    return torch.tensor(to_f64(a), dtype=torch.float64, requires_grad=requires_grad)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("bias,residual,prenorm", [(False, False, False), (True, True, True),
                                                   (False, True, False), (True, False, False)],
                         ids=["plain", "bias-res-prenorm", "res", "bias"])
@pytest.mark.parametrize("shape", [(3, 7), (2, 9, 300), (5, 4100)],
                         ids=lambda s: "x".join(map(str, s)))
def test_rms_norm_grad(dtype, bias, residual, prenorm, shape):
    """Gradients of every input against autograd through the float64 formula."""
    pytest.importorskip("torch")
    dev = target_device()
    ins = _norm_inputs(5, shape, bias, residual)
    ours = {k: torch.tensor(v, dtype=getattr(torch, dtype) if k in ("x", "residual")
                            else torch.float32, device=dev, requires_grad=True)
            for k, v in ins.items()}
    ref = {k: _t64(v.detach().cpu()) for k, v in ours.items()}
    rng = np.random.default_rng(6)
    dy = rng.standard_normal(shape)
    ds = rng.standard_normal(shape)

    def run(args, eps, f64):
        if f64:
            s = args["x"] + (args["residual"] if residual else 0.0)
            y = s / torch.sqrt((s * s).mean(-1, keepdim=True) + eps) * args["weight"]
            if bias:
                y = y + args["bias"]
            outs = (y, s) if prenorm else (y,)
        else:
            r = rms_norm_fn(**args, prenorm=prenorm, eps=eps)
            outs = r if prenorm else (r,)
        loss = (outs[0].double() * torch.tensor(dy, device=outs[0].device)).sum()
        if prenorm:
            loss = loss + (outs[1].double() * torch.tensor(ds, device=outs[1].device)).sum()
        loss.backward()

    run(ours, 1e-5, False)
    run(ref, 1e-5, True)
    sync()
    tol_dtype = dtype
    for k in ours:
        g = ours[k].grad
        assert g is not None, k
        assert g.dtype == ours[k].dtype and g.device == ours[k].device, k
        assert_close(g, ref[k].grad, tol_dtype if k in ("x", "residual") else
                     ("float32" if dtype == "float32" else "bfloat16"), f"d{k}")


def test_rms_norm_issue_nan_row_reproducer():
    """Issue 15 item 4, as reported: with a residual and h = 8 on AVX-512, a NaN in row
    0 made all 64 rows NaN (the padding lanes of a row buffer, NaN after the NaN row,
    were summed into the next rows' mean square)."""
    pytest.importorskip("torch")
    dev = target_device()
    torch.manual_seed(0)
    x, r = torch.randn(64, 8, device=dev), torch.randn(64, 8, device=dev)
    x[0, 0] = float("nan")
    out = rms_norm_fn(x, torch.ones(8, device=dev), residual=r)
    sync()
    assert out.isnan().any(dim=1).tolist() == [True] + [False] * 63


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("h", [1, 5, 8, 13, 20, 33])
def test_rms_norm_bad_row_stays_in_its_row(h, residual, value):
    """A NaN / inf in one row of x (h not a multiple of the vector width, all rows in
    one task): every other row's output, residual_out, dx and dresidual equal the
    float64 formula (SPEC: rows are independent; only dweight/dbias sum over rows)."""
    pytest.importorskip("torch")
    dev = target_device()
    rows, bad = 40, 3
    ins = _norm_inputs(9, (rows, h), True, residual)
    ins["x"][bad, h // 2] = value
    ours = {k: torch.tensor(v, dtype=torch.float32, device=dev, requires_grad=True)
            for k, v in ins.items()}
    rng = np.random.default_rng(10)
    dy, ds = rng.standard_normal((rows, h)), rng.standard_normal((rows, h))
    y, s = rms_norm_fn(**ours, prenorm=True)
    ((y.double() * torch.tensor(dy, device=dev)).sum()
     + (s.double() * torch.tensor(ds, device=dev)).sum()).backward()
    sync()
    keep = np.arange(rows) != bad
    ref = {k: _t64(v.detach().cpu()[keep] if v.dim() == 2 else v.detach().cpu())
           for k, v in ours.items()}
    s64 = ref["x"] + (ref["residual"] if residual else 0.0)
    y64 = s64 / torch.sqrt((s64 * s64).mean(-1, keepdim=True) + 1e-6) * ref["weight"] + ref["bias"]
    ((y64 * torch.tensor(dy[keep])).sum() + (s64 * torch.tensor(ds[keep])).sum()).backward()
    assert_close(y.detach().cpu()[keep], y64.detach(), "float32", "out")
    assert_close(s.detach().cpu()[keep], s64.detach(), "float32", "residual_out")
    for k in ("x", "residual") if residual else ("x",):
        assert_close(ours[k].grad.cpu()[keep], ref[k].grad, "float32", f"d{k}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_swiglu_grad(dtype):
    pytest.importorskip("torch")
    dev = target_device()
    rng = np.random.default_rng(7)
    shape = (3, 5, 67)
    g, u, dy = (rng.standard_normal(shape) * 2 for _ in range(3))
    gt = torch.tensor(g, dtype=getattr(torch, dtype), device=dev, requires_grad=True)
    ut = torch.tensor(u, dtype=getattr(torch, dtype), device=dev, requires_grad=True)
    (swiglu(gt, ut).double() * torch.tensor(dy, device=dev)).sum().backward()
    g64, u64 = _t64(gt.detach().cpu()), _t64(ut.detach().cpu())
    (torch.nn.functional.silu(g64) * u64 * torch.tensor(dy)).sum().backward()
    sync()
    assert_close(gt.grad, g64.grad, dtype, "dgate")
    assert_close(ut.grad, u64.grad, dtype, "dup")


@cpu_only
def test_rms_norm_gradcheck_tiny():
    """Finite differences in float64 on a tiny problem (the kernels compute in float32,
    so the tolerances are float32's)."""
    pytest.importorskip("torch")
    torch.manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def f(x, r, w, b):
        out, s = rms_norm_fn(x, w, b, residual=r, prenorm=True, eps=1e-5)
        return out, s

    assert torch.autograd.gradcheck(f, (x, r, w, b), eps=1e-3, atol=2e-3, rtol=2e-3)


@cpu_only
def test_opcheck_and_compile():
    pytest.importorskip("torch")
    from torch.library import opcheck

    import mamba_attention._autograd  # noqa: F401  (registers the ops)

    torch.manual_seed(1)
    x = torch.randn(6, 40, requires_grad=True)
    r = torch.randn(6, 40, requires_grad=True)
    w = torch.randn(40, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    ops = torch.ops.mamba_attention
    opcheck(ops.rms_norm_fwd, (x, w, b, r, 1e-5, True, False))
    opcheck(ops.rms_norm_fwd, (x, w, None, None, 1e-5, False, True))
    g = torch.randn(6, 40, requires_grad=True)
    opcheck(ops.swiglu_fwd, (g, x))
    # The backward ops have no autograd formula (no double backward): detached inputs.
    xd, rd, wd, bd, gd = (t.detach() for t in (x, r, w, b, g))
    _, _, rstd = ops.rms_norm_fwd(xd, wd, bd, rd, 1e-5, True, False)
    opcheck(ops.rms_norm_bwd, (torch.randn(6, 40), xd, wd, rstd, bd, rd, torch.randn(6, 40)))
    opcheck(ops.rms_norm_bwd, (torch.randn(6, 40), xd, wd, rstd, None, None, None))
    opcheck(ops.swiglu_bwd, (gd, xd, torch.randn(6, 40)))

    def block(x, r, w, g):
        y, s = rms_norm_fn(x, w, None, residual=r, prenorm=True, eps=1e-5)
        return swiglu(g, y).sum() + s.sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got = compiled(x, r, w, g)
    want = block(x, r, w, g)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4)
    got.backward()


# ---------------------------------------------------------------- errors


@cpu_only
@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_errors(framework):
    if framework == "torch":
        pytest.importorskip("torch")
    conv = (lambda a: torch.from_numpy(np.asarray(a))) if framework == "torch" else np.asarray
    x = conv(np.ones((4, 8), np.float32) * 0.5)
    w = conv(np.ones(8, np.float32))
    with pytest.raises(ValueError, match="x: expected last dimension h = 8"):
        rms_norm_fn(conv(np.ones((4, 9), np.float32)), w, None)
    with pytest.raises(ValueError, match="bias"):
        rms_norm_fn(x, w, conv(np.ones(7, np.float32)))
    with pytest.raises(ValueError, match="residual"):
        rms_norm_fn(x, w, None, residual=conv(np.ones((4, 7), np.float32)))
    with pytest.raises(ValueError, match="eps"):
        rms_norm_fn(x, w, None, eps=-1.0)
    with pytest.raises(ValueError, match="weight"):
        rms_norm_fn(x, conv(np.ones((2, 4), np.float32)), None)
    with pytest.raises(TypeError, match="x: expected a float32"):
        rms_norm_fn(conv(np.ones((4, 8), np.int32)), w, None)
    with pytest.raises(TypeError, match="x"):
        rms_norm_fn([[1.0] * 8], w, None)
    with pytest.raises(ValueError, match="x: expected a non-empty"):
        rms_norm_fn(conv(np.ones((0, 8), np.float32)), w, None)
    with pytest.raises(ValueError, match="up: expected the shape of gate"):
        swiglu(x, conv(np.ones((4, 7), np.float32)))
    with pytest.raises(TypeError, match="gate"):
        swiglu(conv(np.ones((4, 8), np.int64)), x)
    with pytest.raises(TypeError, match="gate"):
        swiglu(None, x)


def test_cuda_device_mismatch():
    """weight on the CPU with x on the GPU: a ValueError naming weight."""
    if target_device() != "cuda":
        pytest.skip("needs the CUDA target")
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(ValueError, match="weight: expected a tensor on"):
        rms_norm_fn(x, torch.ones(8), None)
    assert is_torch(swiglu(x, x))
