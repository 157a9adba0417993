"""causal_conv1d_fn / causal_conv1d_update / causal_conv1d_bwd on CUDA
(kernels/causal_conv1d.cu) against the float64 references (SPEC §2).

Inputs go to the GPU through conftest's ``target`` fixture ("cuda" only here); the
references run on the CPU in float64 on the same rounded values. Every test is
marked ``cuda`` and skipped without a usable GPU. A block covers 1024 steps of one
row (128 threads × 8), so lengths straddle threads and blocks.
"""

import numpy as np
import pytest

pytest.importorskip("mamba_attention._core")
torch = pytest.importorskip("torch")

from conftest import assert_close, assert_output, convert, cuda_only, to_f64  # noqa: E402
from mamba_attention import _core, causal_conv1d_fn, causal_conv1d_update  # noqa: E402
from reference import causal_conv1d_update_ref  # noqa: E402
from test_conv1d import _torch_ref, run_conv  # noqa: E402

pytestmark = [pytest.mark.usefixtures("target"), cuda_only]
OPTS = [(b, i, f) for b in (False, True) for i in (False, True) for f in (False, True)]


@pytest.mark.parametrize("opts", OPTS, ids=["".join("bif"[i] if v else "_" for i, v in enumerate(o)) for o in OPTS])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("w", range(2, 9))
def test_widths_options(w, activation, opts):
    bias, init, final = opts
    out = run_conv("torch-float32", final=final, activation=activation, w=w, bias=bias, init=init,
                   b=2, d=5, l=37)
    assert out.is_cuda


@pytest.mark.parametrize("w", [2, 4, 8])
@pytest.mark.parametrize("l", [1, 2, 7, 8, 9, 64, 1000, 1024, 1025, 4097])
def test_seqlen(l, w):
    run_conv("torch-float32", w=w, l=l, b=2, d=3)


@pytest.mark.parametrize("kind", ["torch-float16", "torch-bfloat16"])
@pytest.mark.parametrize("aux", [None, "float32"])
def test_dtypes(kind, aux):
    run_conv(kind, aux=aux, w=4, l=2100, b=2, d=6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_channel_last(dtype):
    cl = lambda t: t.transpose(1, 2).contiguous().transpose(1, 2) if t.dim() == 3 else t  # noqa: E731
    run_conv(f"torch-{dtype}", layout=cl, w=4, l=300, b=2, d=9)


def test_misaligned_rows():
    """Rows that start off a 16-byte boundary take the scalar path."""
    x = torch.randn(2, 5, 41, device="cuda")[:, :, 1:]
    wt = torch.randn(5, 4, device="cuda")
    out = causal_conv1d_fn(x, wt, activation="silu")
    ref = _torch_ref(torch, x.double().cpu(), wt.double().cpu(), None, None, "silu")[0]
    assert_close(out, ref, "float32")


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("w", [2, 4, 8])
def test_update_matches_forward(w, activation):
    b, d, L = 2, 5, w + 2
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((b, d, 11))
    wt, bias = rng.standard_normal((d, w)), rng.standard_normal(d)
    init = rng.standard_normal((b, d, w - 1))
    state0 = rng.standard_normal((b, d, L))
    state0[:, :, L - (w - 1):] = init
    kind = "torch-float32"
    xk, wk, bk, ik = (convert(v, kind) for v in (xs, wt, bias, init))
    ref = _torch_ref(torch, *(torch.from_numpy(v) for v in (xs, wt, bias, init)), activation)[0]
    for step in (1, 3):
        state = convert(state0, kind)
        outs = []
        for t in range(0, xs.shape[-1], step):
            xt = xk[:, :, t] if step == 1 else xk[:, :, t:t + step]
            o = causal_conv1d_update(xt, state, wk, bk, activation)
            assert_output(o, xk, xt.shape)
            outs.append(to_f64(o)[..., None] if step == 1 else to_f64(o))
        assert_close(np.concatenate(outs, -1), ref, "float32", f"out (step {step})")
        want_state = np.concatenate([state0, xs], -1)[:, :, -L:]
        assert_close(state, want_state, "float32", "conv_state")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("seq_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("l_new", [1, 3, 9])
@pytest.mark.parametrize("circular", [False, True])
def test_update_vs_reference(circular, l_new, seq_dtype, dtype):
    rng = np.random.default_rng(l_new)
    b, d, w, L = 3, 6, 4, 5
    kind = f"torch-{dtype}"
    x = convert(rng.standard_normal((b, d, l_new)), kind)
    if l_new == 1:
        x = x[:, :, 0]
    state = convert(rng.standard_normal((b, d, L)), kind)
    weight = convert(rng.standard_normal((d, w)), "torch-float32")
    bias = convert(rng.standard_normal(d), "torch-float32")
    sl = torch.tensor([7, 2, -3], dtype=seq_dtype, device="cuda") if circular else None
    want, want_state = causal_conv1d_update_ref(x, state, weight, bias, "silu", sl)
    out = causal_conv1d_update(x, state, weight, bias, "silu", sl)
    assert_output(out, x, tuple(x.shape))
    assert_close(out, want, dtype)
    assert_close(state, want_state, dtype, "conv_state")


@pytest.mark.parametrize("bias,init,dfinal", [(False, False, False), (True, True, True),
                                               (True, False, True), (False, True, False)])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("w,l", [(2, 1), (4, 2), (4, 50), (8, 3), (8, 33), (4, 2049), (7, 1030)])
def test_backward_vs_autograd(w, l, activation, bias, init, dfinal):
    g = torch.Generator().manual_seed(w * 100 + l)
    b, d = 2, 5
    x = torch.randn(b, d, l, generator=g)
    wt = torch.randn(d, w, generator=g)
    bs = torch.randn(d, generator=g) if bias else None
    ini = torch.randn(b, d, w - 1, generator=g) if init else None
    dout = torch.randn(b, d, l, generator=g)
    dfin = torch.randn(b, d, w - 1, generator=g) if dfinal else None
    leaves = [t.double().requires_grad_() if t is not None else None for t in (x, wt, bs, ini)]
    out, fin = _torch_ref(torch, *leaves, activation)
    loss = (out * dout.double()).sum() + ((fin * dfin.double()).sum() if dfinal else 0)
    loss.backward()
    cu = lambda t: None if t is None else t.cuda()  # noqa: E731
    dx, dw, db, di = _core.causal_conv1d_bwd(cu(x), cu(wt), cu(bs), cu(ini), cu(dout), cu(dfin),
                                             activation)
    assert dx.is_cuda and dx.dtype == x.dtype and dw.dtype == torch.float32
    assert_close(dx, leaves[0].grad, "float32", "dx")
    assert_close(dw, leaves[1].grad, "float32", "dweight")
    if bias:
        assert_close(db, leaves[2].grad, "float32", "dbias")
    else:
        assert db is None
    if init:
        assert_close(di, leaves[3].grad, "float32", "dinitial_states")
    else:
        assert di is None


def test_backward_bf16_channel_last():
    g = torch.Generator().manual_seed(0)
    b, d, l, w = 2, 9, 40, 4
    x = torch.randn(b, l, d, generator=g).bfloat16().transpose(1, 2)
    wt, bs = torch.randn(d, w, generator=g), torch.randn(d, generator=g)
    dout = torch.randn(b, d, l, generator=g).bfloat16()
    leaves = [t.double().requires_grad_() for t in (x, wt, bs)]
    out, _ = _torch_ref(torch, *leaves, None, "silu")
    (out * dout.double()).sum().backward()
    dx, dw, db, _ = _core.causal_conv1d_bwd(x.cuda(), wt.cuda(), bs.cuda(), None, dout.cuda(), None,
                                            "silu")
    assert dx.dtype == torch.bfloat16
    assert_close(dx, leaves[0].grad, "bfloat16", "dx")
    assert_close(dw, leaves[1].grad, "bfloat16", "dweight")
    assert_close(db, leaves[2].grad, "bfloat16", "dbias")


def test_autograd_through_wrapper_cuda():
    g = torch.Generator().manual_seed(7)
    b, d, l, w = 2, 6, 300, 4
    leaves = [torch.randn(*s, generator=g) for s in ((b, d, l), (d, w), (d,), (b, d, w - 1))]
    ours = [t.cuda().requires_grad_() for t in leaves]
    refs = [t.double().requires_grad_() for t in leaves]
    dout = torch.randn(b, d, l, generator=g)
    dfin = torch.randn(b, d, w - 1, generator=g)
    out, fin = causal_conv1d_fn(*ours, return_final_states=True, activation="silu")
    ((out * dout.cuda()).sum() + (fin * dfin.cuda()).sum()).backward()
    rout, rfin = _torch_ref(torch, *refs, "silu")
    ((rout * dout.double()).sum() + (rfin * dfin.double()).sum()).backward()
    for name, a, r in zip(("x", "weight", "bias", "initial_states"), ours, refs):
        assert a.grad.is_cuda and a.grad.dtype == a.dtype
        assert_close(a.grad, r.grad, "float32", f"d{name}")
