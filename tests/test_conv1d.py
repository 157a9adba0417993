"""causal_conv1d_fn / causal_conv1d_update / causal_conv1d_bwd against the float64
reference (SPEC §2), on every SIMD level of this CPU; errors. (CUDA: test_cuda_conv1d.py.)"""

import itertools

import numpy as np
import pytest

pytest.importorskip("mamba_attention._core")

from conftest import (KINDS, LAYOUTS, assert_close, assert_output, clone, convert,  # noqa: E402
                      is_torch, require, same_values, split_kind, to_f64)
from mamba_attention import _core, causal_conv1d_fn, causal_conv1d_update  # noqa: E402
from reference import causal_conv1d_ref, causal_conv1d_update_ref  # noqa: E402

ACTS = [None, "silu", "swish"]


def conv_inputs(seed=0, b=2, d=5, l=9, w=4, bias=True, init=True):
    rng = np.random.default_rng(seed)
    x = dict(x=rng.standard_normal((b, d, l)), weight=rng.standard_normal((d, w)) / np.sqrt(w))
    if bias:
        x["bias"] = rng.standard_normal(d)
    if init:
        x["initial_states"] = rng.standard_normal((b, d, w - 1))
    return x


def to_conv_kind(inputs, kind, aux=None):
    """x in ``kind``; weight, bias, initial_states in ``aux`` (default: the same kind)."""
    fw, _ = split_kind(kind)
    return {k: convert(v, kind if k == "x" or aux is None else f"{fw}-{aux}") for k, v in inputs.items()}


def run_conv(kind="numpy-float32", final=True, activation="silu", aux=None, layout=None, **opts):
    x = to_conv_kind(conv_inputs(**opts), kind, aux)
    if layout is not None:
        x = {k: layout(v) for k, v in x.items()}
    before = {k: clone(v) for k, v in x.items()}
    ref_out, ref_fin = causal_conv1d_ref(**x, return_final_states=True, activation=activation)
    res = causal_conv1d_fn(**x, return_final_states=final, activation=activation)
    for k in x:
        assert same_values(x[k], before[k]), f"input {k} was modified"
    dt = split_kind(kind)[1]
    if final:
        assert isinstance(res, tuple) and len(res) == 2
        out, fin = res
        assert_output(fin, x["x"], ref_fin.shape)
        # final_states are copies of inputs: exact (up to the cast to x's dtype).
        assert_close(fin, ref_fin, dt, "final_states")
    else:
        assert not isinstance(res, tuple)
        out = res
    assert_output(out, x["x"], ref_out.shape)
    assert_close(out, ref_out, dt)
    return out


# ------------------------------------------------------------------ forward parity

OPTS = list(itertools.product([False, True], repeat=3))


@pytest.mark.parametrize("opts", OPTS, ids=["".join("bif"[i] if v else "_" for i, v in enumerate(o)) for o in OPTS])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("w", range(2, 9))
def test_widths_options(simd_level, w, activation, opts):
    bias, init, final = opts
    run_conv(w=w, bias=bias, init=init, final=final, activation=activation, d=7, l=19)


@pytest.mark.parametrize("w", [2, 4, 8])
@pytest.mark.parametrize("l", [1, 2, 7, 64, 1000, 4097])
def test_seqlen(simd_level, l, w):
    run_conv(w=w, l=l, d=3, b=2)
    run_conv(w=w, l=l, d=3, b=1, init=False, activation=None)


@pytest.mark.parametrize("kind", KINDS)
def test_kinds(simd_level, kind):
    require(kind)
    run_conv(kind, w=4, d=9, l=70)


@pytest.mark.parametrize("kind", ["numpy-bfloat16", "torch-bfloat16", "torch-float16", "torch-float64"])
def test_float32_weights(simd_level, kind):
    require(kind)
    run_conv(kind, aux="float32", w=3, d=9, l=70)


def test_float64_weights_with_bf16_x(simd_level):
    run_conv("torch-bfloat16", aux="float64", w=5, d=9, l=33)


@pytest.mark.parametrize("l", [1, 131, 2100])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("init", [False, True])
def test_channel_last_torch(simd_level, dtype, init, l):
    torch = pytest.importorskip("torch")
    b, d, w = 2, 37, 4
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, l, d, generator=g).to(getattr(torch, dtype)).transpose(1, 2)
    assert x.stride(1) == 1
    weight = torch.randn(d, w, generator=g)
    bias = torch.randn(d, generator=g)
    initial = torch.randn(b, w - 1, d, generator=g).to(x.dtype).transpose(1, 2) if init else None
    out, fin = causal_conv1d_fn(x, weight, bias, initial, True, "silu")
    ref_out, ref_fin = causal_conv1d_ref(x, weight, bias, initial, True, "silu")
    assert_output(out, x, (b, d, l))
    assert_close(out, ref_out, dtype)
    assert_close(fin, ref_fin, dtype, "final_states")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_numpy(simd_level, layout):
    from conftest import relayout
    run_conv("numpy-float32", layout=lambda v: relayout(v, layout), w=4, d=6, l=50)


def test_larger(simd_level):
    run_conv("torch-float32", b=2, d=70, l=300, w=4)


def test_output_fully_written(simd_level):
    """Every output element is written (outputs come from *.empty)."""
    torch = pytest.importorskip("torch")
    x = torch.randn(3, 17, 33)
    w = torch.randn(17, 4)
    for _ in range(3):
        torch.full((3, 17, 33), float("nan")).sum()  # recycle allocator memory as NaN
        out = causal_conv1d_fn(x, w, activation="silu")
        assert not torch.isnan(out).any()


# ------------------------------------------------------------------- update

def update_setup(seed, b, d, w):
    """12 tokens x (b, d, 12), weight, bias and the w-1 tokens before them."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, d, 12)), rng.standard_normal((d, w)) / np.sqrt(w),
            rng.standard_normal(d), rng.standard_normal((b, d, w - 1)))


@pytest.mark.parametrize("framework", ["numpy", "torch"])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("extra", [0, 3])
@pytest.mark.parametrize("w", [2, 4, 8])
def test_update_matches_forward(simd_level, w, extra, activation, framework):
    """Feeding tokens one at a time (and in chunks of 3) reproduces causal_conv1d_fn."""
    if framework == "torch":
        pytest.importorskip("torch")
    b, d, L = 2, 5, w - 1 + extra
    xs, weight, bias, init = update_setup(0, b, d, w)
    kind = f"{framework}-float32"
    xk, wk, bk, ik = (convert(v, kind) for v in (xs, weight, bias, init))
    ref = causal_conv1d_ref(xk, wk, bk, ik, False, activation)
    state0 = np.random.default_rng(5).standard_normal((b, d, L))
    state0[:, :, L - (w - 1):] = init
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


@pytest.mark.parametrize("framework", ["numpy", "torch"])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("extra", [0, 2, 5])
@pytest.mark.parametrize("w", [2, 4, 8])
def test_update_circular_matches_forward(simd_level, w, extra, activation, framework):
    """Circular conv_state with cache_seqlens: token by token (and in chunks of 3,
    advancing cache_seqlens) reproduces causal_conv1d_fn."""
    if framework == "torch":
        pytest.importorskip("torch")
    b, d, L = 3, 4, w - 1 + extra
    xs, weight, bias, init = update_setup(1, b, d, w)
    kind = f"{framework}-float32"
    xk, wk, bk, ik = (convert(v, kind) for v in (xs, weight, bias, init))
    ref = causal_conv1d_ref(xk, wk, bk, ik, False, activation)
    start = np.array([0, 5, 13])[:b]
    state0 = np.random.default_rng(6).standard_normal((b, d, L))
    for i in range(b):  # place the w-1 previous tokens just before position start[i]
        for j in range(w - 1):
            state0[i, :, (start[i] - (w - 1) + j) % L] = init[i, :, j]

    def seqlens(v):
        a = np.asarray(v, dtype=np.int32)
        if framework == "torch":
            import torch
            return torch.from_numpy(a)
        return a

    for step in (1, 3):
        state = convert(state0, kind)
        pos = start.copy()
        outs = []
        for t in range(0, xs.shape[-1], step):
            xt = xk[:, :, t] if step == 1 else xk[:, :, t:t + step]
            sl = seqlens(pos)
            want, want_state = causal_conv1d_update_ref(xt, state, wk, bk, activation, sl)
            o = causal_conv1d_update(xt, state, wk, bk, activation, sl)
            assert_close(o, want, "float32", "out vs update ref")
            assert_close(state, want_state, "float32", "conv_state vs update ref")
            outs.append(to_f64(o)[..., None] if step == 1 else to_f64(o))
            pos += step
        assert_close(np.concatenate(outs, -1), ref, "float32", f"out (step {step})")


@pytest.mark.parametrize("circular", [False, True])
@pytest.mark.parametrize("kind", ["numpy-float32", "numpy-float16", "numpy-bfloat16", "numpy-float64",
                                  "torch-float32", "torch-bfloat16", "torch-float16"])
def test_update_kinds(simd_level, kind, circular):
    require(kind)
    fw, dt = split_kind(kind)
    rng = np.random.default_rng(3)
    b, d, w, L = 2, 6, 4, 5
    x = convert(rng.standard_normal((b, d)), kind)
    state = convert(rng.standard_normal((b, d, L)), kind)
    weight = convert(rng.standard_normal((d, w)), f"{fw}-float32")
    bias = convert(rng.standard_normal(d), f"{fw}-float32")
    sl = None
    if circular:
        sl = np.array([7, 2], np.int32)
        if fw == "torch":
            import torch
            sl = torch.from_numpy(sl)
    want, want_state = causal_conv1d_update_ref(x, state, weight, bias, "silu", sl)
    out = causal_conv1d_update(x, state, weight, bias, "silu", sl)
    assert_output(out, x, (b, d))
    assert_close(out, want, dt)
    # The state keeps its dtype; shifted values are exact, new ones rounded to it.
    assert_close(state, want_state, dt, "conv_state")


@pytest.mark.parametrize("circular", [False, True])
@pytest.mark.parametrize("l_new", [1, 4, 7, 20])
def test_update_long_chunk(simd_level, l_new, circular):
    """l_new larger than state_len (shift keeps the last inputs; circular: last write wins)."""
    rng = np.random.default_rng(4)
    b, d, w, L = 2, 3, 4, 5
    x = rng.standard_normal((b, d, l_new)).astype(np.float32)
    state = rng.standard_normal((b, d, L)).astype(np.float32)
    weight = rng.standard_normal((d, w)).astype(np.float32)
    sl = np.array([3, 11], np.int32) if circular else None
    want, want_state = causal_conv1d_update_ref(x, state, weight, None, None, sl)
    out = causal_conv1d_update(x, state, weight, cache_seqlens=sl)
    assert_close(out, want, "float32")
    assert_close(state, want_state, "float32", "conv_state")


def test_update_float64_state_shift_exact(simd_level):
    rng = np.random.default_rng(5)
    state = rng.standard_normal((1, 3, 6))
    x = rng.standard_normal((1, 3, 2))
    weight = rng.standard_normal((3, 3)).astype(np.float32)
    before = state.copy()
    causal_conv1d_update(x, state, weight)
    assert np.array_equal(state[:, :, :4], before[:, :, 2:])
    assert np.array_equal(state[:, :, 4:], x)


def test_update_large_parallel(simd_level):
    """Big enough to take the multi-threaded path."""
    rng = np.random.default_rng(6)
    b, d, w, L = 4, 4096, 4, 8
    x = rng.standard_normal((b, d)).astype(np.float32)
    state = rng.standard_normal((b, d, L)).astype(np.float32)
    weight = rng.standard_normal((d, w)).astype(np.float32)
    bias = rng.standard_normal(d).astype(np.float32)
    want, want_state = causal_conv1d_update_ref(x, state, weight, bias, "silu")
    out = causal_conv1d_update(x, state, weight, bias, "silu")
    assert_close(out, want, "float32")
    assert_close(state, want_state, "float32", "conv_state")


# ------------------------------------------------------------------ backward

@pytest.fixture
def one_torch_thread():
    """torch's reference autograd on one thread: its thread pool stalls badly when
    another process keeps the machine's cores busy."""
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _torch_ref(torch, x, weight, bias, init, activation):
    F = torch.nn.functional
    b, d, l = x.shape
    w = weight.shape[1]
    xpad = torch.cat([init if init is not None else x.new_zeros(b, d, w - 1), x], -1)
    out = F.conv1d(xpad, weight.unsqueeze(1), bias, groups=d)
    if activation in ("silu", "swish"):
        out = F.silu(out)
    return out, xpad[:, :, l:]


@pytest.mark.parametrize("bias,init,dfinal", [(False, False, False), (True, True, True),
                                               (True, False, True), (False, True, False)])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("w,l", [(2, 1), (4, 2), (4, 50), (8, 3), (8, 33)])
def test_backward_vs_autograd(one_torch_thread, w, l, activation, bias, init, dfinal):
    torch = pytest.importorskip("torch")
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
    dx, dw, db, di = _core.causal_conv1d_bwd(x, wt, bs, ini, dout, dfin, activation)
    assert dx.dtype == x.dtype and dw.dtype == torch.float32
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


def test_backward_bf16_channel_last(one_torch_thread):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    b, d, l, w = 2, 9, 40, 4
    x = torch.randn(b, l, d, generator=g).bfloat16().transpose(1, 2)
    wt, bs = torch.randn(d, w, generator=g), torch.randn(d, generator=g)
    dout = torch.randn(b, d, l, generator=g).bfloat16()
    leaves = [t.double().requires_grad_() for t in (x, wt, bs)]
    out, _ = _torch_ref(torch, *leaves, None, "silu")
    (out * dout.double()).sum().backward()
    dx, dw, db, di = _core.causal_conv1d_bwd(x, wt, bs, None, dout, None, "silu")
    assert dx.dtype == torch.bfloat16 and di is None
    assert_close(dx, leaves[0].grad, "bfloat16", "dx")
    assert_close(dw, leaves[1].grad, "float32", "dweight")
    assert_close(db, leaves[2].grad, "float32", "dbias")


# -------------------------------------------------------------------- errors

V, T = ValueError, TypeError


def _arr(*shape, dtype=np.float32):
    return (np.random.default_rng(0).standard_normal(shape) + 2).astype(dtype)


b_, d_, l_, w_ = 2, 4, 5, 4
FWD_BASE = dict(x=_arr(b_, d_, l_), weight=_arr(d_, w_), bias=_arr(d_), initial_states=_arr(b_, d_, w_ - 1))
FWD_ERRORS = {
    "x-rank2": (dict(x=_arr(b_, d_)), V, "x"),
    "x-rank4": (dict(x=_arr(b_, d_, l_, 1)), V, "x"),
    "x-empty": (dict(x=_arr(b_, d_, 0)), V, "x"),
    "x-int": (dict(x=_arr(b_, d_, l_, dtype=np.int32)), T, "x"),
    "x-list": (dict(x=[[[1.0] * l_] * d_] * b_), T, "x"),
    "x-None": (dict(x=None), T, "x"),
    "weight-rank1": (dict(weight=_arr(d_)), V, "weight"),
    "weight-d": (dict(weight=_arr(d_ + 1, w_)), V, "weight"),
    "weight-w1": (dict(weight=_arr(d_, 1), initial_states=None), V, "weight"),
    "weight-w9": (dict(weight=_arr(d_, 9), initial_states=None), V, "weight"),
    "weight-int": (dict(weight=_arr(d_, w_, dtype=np.int64)), T, "weight"),
    "bias-d": (dict(bias=_arr(d_ + 1)), V, "bias"),
    "bias-rank2": (dict(bias=_arr(d_, 1)), V, "bias"),
    "bias-str": (dict(bias="b"), T, "bias"),
    "init-w": (dict(initial_states=_arr(b_, d_, w_)), V, "initial_states"),
    "init-b": (dict(initial_states=_arr(b_ + 1, d_, w_ - 1)), V, "initial_states"),
    "init-rank2": (dict(initial_states=_arr(b_, d_)), V, "initial_states"),
    "activation-bad": (dict(activation="relu"), V, "activation"),
    "activation-int": (dict(activation=1), T, "activation"),
}


def _fw(framework, v):
    if framework == "torch" and isinstance(v, np.ndarray):
        import torch
        return torch.from_numpy(v)
    return v


def _check(fn, kw, exc, name):
    with pytest.raises(BaseException) as info:
        fn(**kw)
    e = info.value
    assert type(e) is exc, f"expected {exc.__name__}, got {type(e).__name__}: {e}"
    assert name in str(e), f"message does not name {name}: {e}"


@pytest.mark.parametrize("case", list(FWD_ERRORS))
@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_forward_errors(framework, case):
    if framework == "torch":
        pytest.importorskip("torch")
    over, exc, name = FWD_ERRORS[case]
    kw = {k: _fw(framework, v) for k, v in {**FWD_BASE, **over}.items()}
    _check(causal_conv1d_fn, kw, exc, name)


L_ = 6
UPD_BASE = dict(x=_arr(b_, d_), conv_state=_arr(b_, d_, L_), weight=_arr(d_, w_), bias=_arr(d_))
UPD_ERRORS = {
    "x-rank1": (dict(x=_arr(d_)), V, "x"),
    "x-rank4": (dict(x=_arr(b_, d_, 1, 1)), V, "x"),
    "x-int": (dict(x=_arr(b_, d_, dtype=np.int16)), T, "x"),
    "state-rank2": (dict(conv_state=_arr(b_, d_)), V, "conv_state"),
    "state-short": (dict(conv_state=_arr(b_, d_, w_ - 2)), V, "conv_state"),
    "state-b": (dict(conv_state=_arr(b_ + 1, d_, L_)), V, "conv_state"),
    "state-d": (dict(conv_state=_arr(b_, d_ - 1, L_)), V, "conv_state"),
    "state-None": (dict(conv_state=None), T, "conv_state"),
    "weight-w9": (dict(weight=_arr(d_, 9), conv_state=_arr(b_, d_, 9)), V, "weight"),
    "weight-d": (dict(weight=_arr(d_ - 1, w_)), V, "weight"),
    "bias-d": (dict(bias=_arr(3)), V, "bias"),
    "seqlens-float": (dict(cache_seqlens=np.zeros(b_, np.float32)), T, "cache_seqlens"),
    "seqlens-len": (dict(cache_seqlens=np.zeros(b_ + 1, np.int32)), V, "cache_seqlens"),
    "activation-bad": (dict(activation="gelu"), V, "activation"),
}


@pytest.mark.parametrize("case", list(UPD_ERRORS))
@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_update_errors(framework, case):
    if framework == "torch":
        pytest.importorskip("torch")
    over, exc, name = UPD_ERRORS[case]
    kw = {k: _fw(framework, v) for k, v in {**UPD_BASE, **over}.items()}
    state = kw["conv_state"]
    saved = clone(state) if state is not None else None
    _check(causal_conv1d_update, kw, exc, name)
    if saved is not None:
        assert same_values(state, saved), "conv_state modified by a call that raised"


def test_update_readonly_state():
    s = _arr(b_, d_, L_)
    s.flags.writeable = False
    _check(causal_conv1d_update, {**UPD_BASE, "conv_state": s}, V, "conv_state")


def test_backward_errors():
    x, w = _arr(b_, d_, l_), _arr(d_, w_)
    _check(_core.causal_conv1d_bwd, dict(x=x, weight=w, bias=None, initial_states=None,
                                         dout=_arr(b_, d_, l_ + 1)), V, "dout")
    _check(_core.causal_conv1d_bwd, dict(x=x, weight=w, bias=None, initial_states=None,
                                         dout=_arr(b_, d_, l_), dfinal_states=_arr(b_, d_, w_)),
           V, "dfinal_states")
    _check(_core.causal_conv1d_bwd, dict(x=x, weight=w, bias=None, initial_states=None,
                                         dout=_arr(b_, d_, l_), activation="tanh"), V, "activation")


def test_cuda_float64_rejected():
    """CUDA runs float32/16/bf16 x (tests/test_cuda_conv1d.py); float64 x is CPU-only."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x = torch.randn(1, 4, 8, device="cuda", dtype=torch.float64)
    w = torch.randn(4, 4, device="cuda")
    with pytest.raises(TypeError, match="float64"):
        causal_conv1d_fn(x, w)
    with pytest.raises(TypeError, match="float64"):
        causal_conv1d_update(x[:, :, 0], torch.zeros(1, 4, 3, device="cuda"), w)


def test_exported():
    import mamba_attention
    assert {"causal_conv1d_fn", "causal_conv1d_update"} <= set(mamba_attention.__all__)
    assert mamba_attention.causal_conv1d_fn.__doc__


@pytest.mark.parametrize("final", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_autograd_through_wrapper(one_torch_thread, activation, final):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(7)
    b, d, l, w = 2, 6, 20, 4
    leaves = [torch.randn(*s, generator=g) for s in ((b, d, l), (d, w), (d,), (b, d, w - 1))]
    ours = [t.clone().requires_grad_() for t in leaves]
    refs = [t.double().requires_grad_() for t in leaves]
    dout = torch.randn(b, d, l, generator=g)
    dfin = torch.randn(b, d, w - 1, generator=g)
    res = causal_conv1d_fn(*ours, return_final_states=final, activation=activation)
    out, fin = res if final else (res, None)
    loss = (out * dout).sum() + ((fin * dfin).sum() if final else 0)
    loss.backward()
    rout, rfin = _torch_ref(torch, *refs, activation)
    rloss = (rout * dout.double()).sum() + ((rfin * dfin.double()).sum() if final else 0)
    rloss.backward()
    for name, a, r in zip(("x", "weight", "bias", "initial_states"), ours, refs):
        assert a.grad.dtype == a.dtype
        assert_close(a.grad, r.grad, "float32", f"d{name}")
    with torch.no_grad():
        assert not causal_conv1d_fn(*ours).requires_grad
