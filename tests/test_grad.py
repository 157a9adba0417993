"""Gradients of selective_scan_fn (SPEC §1) against autograd through a float64 reference.

The reference below is SPEC §1's recurrence written step by step in float64
torch, independently of the kernels; torch's autograd differentiates it. Ours
come from the Rust backward kernel through the custom op
(``mamba_attention._autograd``). The loss weights both outputs, out and
last_state, with random values, so dout and dlast_state are dense and
non-zero (SPEC: gradients flow through last_state). The reference runs on the
inputs as rounded to the tested dtype, so a float16/bfloat16 case measures the
kernel, not the rounding of its inputs. Every test runs once per SIMD level.
"""

import functools
import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mamba_attention._core")

from conftest import _core, scan_inputs, selective_scan_fn  # noqa: E402
from reference import TOL, rel_err  # noqa: E402

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
LOW = {"u", "delta", "z", "B", "C"}  # take the tested dtype; the rest are float32
BC_PAIRS = list(itertools.product(["const", "shared", "grouped"], repeat=2))


def ref_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
             initial_state=None):
    """SPEC §1 in torch, one step at a time. Returns (out, last_state)."""
    b, d, length = u.shape
    dt = delta if delta_bias is None else delta + delta_bias[:, None]
    if delta_softplus:  # clamp inside so the unused branch has no inf (and no NaN gradient)
        dt = torch.where(dt > 20, dt, torch.log1p(torch.exp(torch.clamp(dt, max=20.0))))

    def at(X, t):  # B or C at step t, broadcastable to (b, d, n)
        if X.dim() == 2:
            return X
        if X.dim() == 3:
            return X[:, None, :, t]
        return X[:, torch.arange(d) // (d // X.shape[1]), :, t]

    h = u.new_zeros(b, d, A.shape[1]) if initial_state is None else initial_state
    ys = []
    for t in range(length):
        dt_t = dt[:, :, t, None]
        h = torch.exp(dt_t * A) * h + dt_t * at(B, t) * u[:, :, t, None]
        ys.append((at(C, t) * h).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * z * torch.sigmoid(z)
    return y, h


def make_inputs(dtype, seed, softplus, **opts):
    """Leaf tensors of ``selective_scan_fn``: LOW arguments in ``dtype``, others float32."""
    x64 = scan_inputs(seed=seed, softplus=softplus, **opts)
    tdt = getattr(torch, dtype)
    return {k: torch.from_numpy(v).to(tdt if k in LOW else torch.float32).requires_grad_()
            for k, v in x64.items()}


def loss_weights(x, seed, dtype):
    """Random weights of out and last_state, rounded to those outputs' dtypes (they are
    the dout / dlast_state the kernel receives)."""
    rng = np.random.default_rng(seed + 1)
    (b, d, length), n = x["u"].shape, x["A"].shape[1]
    w = torch.from_numpy(rng.standard_normal((b, d, length))).to(getattr(torch, dtype)).double()
    v = torch.from_numpy(rng.standard_normal((b, d, n))).float().double()
    return w, v


@functools.lru_cache(maxsize=None)
def reference_grads(dtype, seed, softplus, last_state, opts):
    """Gradients of the float64 reference on the rounded inputs (cached: the same for
    every SIMD level)."""
    x = {k: v.detach().double().requires_grad_() for k, v in
         make_inputs(dtype, seed, softplus, **dict(opts)).items()}
    w, v = loss_weights(x, seed, dtype)
    out, h = ref_scan(**x, delta_softplus=softplus)
    loss = (out * w).sum() + ((h * v).sum() if last_state else 0.0)
    loss.backward()
    return {k: t.grad.numpy() for k, t in x.items()}


def check_grads(dtype="float32", softplus=True, last_state=True, seed=0, **opts):
    x = make_inputs(dtype, seed, softplus, **opts)
    w, v = loss_weights(x, seed, dtype)
    res = selective_scan_fn(**x, delta_softplus=softplus, return_last_state=last_state)
    out, h = res if last_state else (res, None)
    assert out.dtype == x["u"].dtype and out.grad_fn is not None
    loss = (out.double() * w).sum() + ((h.double() * v).sum() if last_state else 0.0)
    loss.backward()
    ref = reference_grads(dtype, seed, softplus, last_state, tuple(sorted(opts.items())))
    for k, t in x.items():
        assert t.grad is not None, f"no gradient for {k}"
        assert t.grad.dtype == t.dtype and t.grad.shape == t.shape, (k, t.grad.dtype, t.grad.shape)
        tol = TOL[dtype] if k in LOW else TOL["float32"]
        err = rel_err(t.grad, ref[k])
        assert err <= tol, f"d{k}: rel_err {err:.3e} > {tol:.0e} ({dtype})"
    return x


pytestmark = pytest.mark.usefixtures("simd_level")

OPTION_NAMES = ("D", "z", "delta_bias", "softplus", "initial_state", "last_state")
OPTION_CASES = [
    pytest.param(dict(zip(OPTION_NAMES, vals)), *BC_PAIRS[i % len(BC_PAIRS)],
                 id="-".join(["".join("DZbsiL"[j] if on else "_" for j, on in enumerate(vals)),
                              *BC_PAIRS[i % len(BC_PAIRS)]]))
    for i, vals in enumerate(itertools.product([False, True], repeat=6))
]
OPTS = dict(D=True, z=True, delta_bias=True, initial_state=True)  # for make_inputs
ALL_ON = dict(OPTS, softplus=True)


@pytest.mark.parametrize("opts,bl,cl", OPTION_CASES)
def test_options(opts, bl, cl):
    """Every combination of the options, the B/C layout pair cycling through all nine."""
    check_grads(b=2, d=6, l=20, n=4, g=3, B=bl, C=cl, **opts)


@pytest.mark.parametrize("bl,cl", BC_PAIRS, ids=["-".join(p) for p in BC_PAIRS])
def test_bc_layouts(bl, cl):
    check_grads(b=2, d=12, l=70, n=8, g=3, B=bl, C=cl, **ALL_ON)


@pytest.mark.parametrize("l", [1, 7, 64, 300])
@pytest.mark.parametrize("n", [1, 4, 16])
@pytest.mark.parametrize("d", [3, 17])
def test_sizes(d, n, l):
    """Odd channel counts (partial vector blocks), n = 1 (no full group of 8 states),
    and lengths around the 16-step sub-chunks of the recomputation."""
    check_grads(b=2, d=d, l=l, n=n, B="shared", C="grouped", g=1, **ALL_ON)


@pytest.mark.parametrize("d,g", [(16, 2), (34, 2), (48, 3), (5, 5)])
def test_groups(d, g):
    """Groups that are not a multiple of the vector width: blocks end at group edges."""
    check_grads(b=2, d=d, l=40, n=4, g=g, B="grouped", C="grouped", **ALL_ON)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_dtypes(dtype):
    check_grads(dtype, b=2, d=17, l=64, n=16, g=1, B="grouped", C="shared", **ALL_ON)


def test_long_sequence():
    """l = 3000: ~190 sub-chunks recomputed from their checkpoints, in reverse."""
    check_grads(b=1, d=3, l=3000, n=4, B="shared", C="const", **ALL_ON)


def test_large_delta():
    """Δ above softplus' threshold (derivative 1) and far below it (derivative ~0)."""
    x = make_inputs("float32", 4, True, b=2, d=5, l=30, n=4, **OPTS)
    with torch.no_grad():
        x["delta"][0, :, ::3] = 25.0
        x["delta"][1, 2, :5] = torch.tensor([-100.0, -30.0, -20.5, 19.9, 20.1])
    ref = {k: t.detach().double().requires_grad_() for k, t in x.items()}
    out, h = selective_scan_fn(**x, delta_softplus=True, return_last_state=True)
    (out.sum() + h.sum()).backward()
    ro, rh = ref_scan(**ref, delta_softplus=True)
    (ro.sum() + rh.sum()).backward()
    for k in x:
        assert rel_err(x[k].grad, ref[k].grad) <= TOL["float32"], k


def test_finite_differences():
    """Our backward against finite differences of our own forward (float64 tensors in,
    float32 arithmetic inside). gradcheck's defaults (eps 1e-6, atol 1e-5) would
    measure float32 rounding amplified by 1/eps (~0.1); with eps = 1e-3 that noise is
    ~1e-4 and the O(eps²) truncation ~1e-6, so rtol = atol = 1e-3 is a real check."""
    x = make_inputs("float64", 7, True, b=1, d=3, l=6, n=2, B="grouped", C="shared", g=3,
                    **OPTS)
    x = {k: t.detach().double().requires_grad_() for k, t in x.items()}

    def f(*args):
        return selective_scan_fn(*args[:5], D=args[5], z=args[6], delta_bias=args[7],
                                 delta_softplus=True, return_last_state=True,
                                 initial_state=args[8])

    assert torch.autograd.gradcheck(f, [x[k] for k in NAMES], eps=1e-3, atol=1e-3, rtol=1e-3)


def test_only_last_state_used():
    """dout is None for the kernel's purposes when out does not reach the loss."""
    x = make_inputs("float32", 1, True, b=2, d=4, l=10, n=4, **OPTS)
    ref = {k: t.detach().double().requires_grad_() for k, t in x.items()}
    _, h = selective_scan_fn(**x, delta_softplus=True, return_last_state=True)
    h.square().sum().backward()
    _, rh = ref_scan(**ref, delta_softplus=True)
    rh.square().sum().backward()
    for k in x:
        if ref[k].grad is None:  # D and z do not reach last_state
            assert x[k].grad is None or not x[k].grad.any(), k
        else:
            assert rel_err(x[k].grad, ref[k].grad) <= TOL["float32"], k


def test_partial_requires_grad_and_mixed_dtypes():
    """Gradients only where asked; each has its input's dtype (float32 inside)."""
    x = make_inputs("float32", 2, True, b=2, d=4, l=12, n=4, B="grouped", C="const", g=2,
                    **OPTS)
    x = {k: t.detach() for k, t in x.items()}
    x["A"] = x["A"].double().requires_grad_()
    x["B"] = x["B"].bfloat16().requires_grad_()
    x["u"].requires_grad_()
    out = selective_scan_fn(**x, delta_softplus=True)
    out.sum().backward()  # dout: an expanded (stride-0) tensor of ones
    ref = {k: t.detach().double().requires_grad_(t.requires_grad) for k, t in x.items()}
    ref_scan(**ref, delta_softplus=True)[0].sum().backward()
    assert x["A"].grad.dtype == torch.float64 and x["B"].grad.dtype == torch.bfloat16
    assert x["delta"].grad is None and x["D"].grad is None
    assert rel_err(x["u"].grad, ref["u"].grad) <= TOL["float32"]
    assert rel_err(x["A"].grad, ref["A"].grad) <= TOL["float32"]
    assert rel_err(x["B"].grad, ref["B"].grad) <= TOL["bfloat16"]


def test_noncontiguous_inputs():
    """Transposed views (channel-last u/delta/z, time-major B) read in place."""
    x = make_inputs("float32", 3, True, b=2, d=16, l=32, n=4, B="shared", C="grouped", g=2,
                    **OPTS)
    v = {k: t.detach() for k, t in x.items()}
    for k in ("u", "delta", "z"):
        v[k] = v[k].transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    v["B"] = v["B"].transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    for k in ("A", "C", "D", "delta_bias", "initial_state"):
        v[k].requires_grad_()
    out, h = selective_scan_fn(**v, delta_softplus=True, return_last_state=True)
    (out.square().sum() + h.sum()).backward()
    ref = {k: t.detach().double().requires_grad_() for k, t in v.items()}
    ro, rh = ref_scan(**ref, delta_softplus=True)
    (ro.square().sum() + rh.sum()).backward()
    for k in v:
        assert rel_err(v[k].grad, ref[k].grad) <= TOL["float32"], k


# ------------------------------------------------------------ the binding itself

def _bwd_args(**over):
    x = {k: t.detach() for k, t in make_inputs("float32", 0, True, b=2, d=5, l=9, n=4,
                                                **OPTS).items()}
    args = dict(x, delta_softplus=True, dout=torch.randn(2, 5, 9), dlast_state=None)
    args.update(over)
    return args


def test_binding_returns_none_for_missing_inputs():
    args = _bwd_args(D=None, z=None, delta_bias=None, initial_state=None)
    g = _core.selective_scan_bwd(*(args[k] for k in NAMES[:5]), args["D"], args["z"],
                                 args["delta_bias"], True, None, args["dout"], None)
    assert len(g) == 9 and g[5] is None and g[6] is None and g[7] is None and g[8] is None
    assert g[0].shape == (2, 5, 9) and g[2].dtype == torch.float32


@pytest.mark.parametrize("name,value,exc", [
    ("dout", torch.randn(2, 5, 8), ValueError),
    ("dout", torch.randn(2, 5), ValueError),
    ("dout", torch.zeros(2, 5, 9, dtype=torch.int32), TypeError),
    ("dout", None, TypeError),
    ("dlast_state", torch.randn(2, 5, 3), ValueError),
    ("dlast_state", "x", TypeError),
])
def test_binding_errors(name, value, exc):
    a = _bwd_args(**{name: value})
    with pytest.raises(exc, match=name):
        _core.selective_scan_bwd(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"],
                                 a["delta_bias"], True, a["initial_state"], a["dout"],
                                 a["dlast_state"])


def test_binding_checks_inputs_like_the_forward():
    a = _bwd_args()
    with pytest.raises(ValueError, match="A"):
        _core.selective_scan_bwd(a["u"], a["delta"], a["A"][:4], a["B"], a["C"], a["D"],
                                 a["z"], a["delta_bias"], True, a["initial_state"], a["dout"])


@pytest.mark.parametrize("which", ["B", "C"])
@pytest.mark.parametrize("d", [1, 3, 17])
def test_infinite_time_varying_bc(which, d):
    """An infinite B_t (C_t) of the shared (b, n, l) layout, with d channels that fill
    a vector block partly: dC (dB) sums Σ_c dy·h (Σ_c g·Δ·u) across the block's lanes,
    and the padding lanes (u = 0, but h = 0·inf = NaN) used to turn the reference's
    +inf into NaN. u, dout > 0 so that every channel's term has the same sign."""
    n, length, t0 = 3, 20, 7
    x64 = scan_inputs(seed=4, b=1, d=d, l=length, n=n, B="shared", C="shared", D=False,
                      z=False, delta_bias=True, softplus=True, initial_state=False)
    x64["u"] = np.abs(x64["u"]) + 0.1
    x64[which][0, 1, t0] = np.inf
    w = np.abs(np.random.default_rng(5).standard_normal((1, d, length))) + 0.1
    grads = {}
    for name, f in (("ours", selective_scan_fn), ("ref", ref_scan)):
        dt = torch.float32 if name == "ours" else torch.float64
        x = {k: torch.tensor(v, dtype=dt, requires_grad=True) for k, v in x64.items()}
        out = f(**x, delta_softplus=True, **({"return_last_state": False} if name == "ours" else {}))
        out = out[0] if isinstance(out, tuple) else out
        (out.double() * torch.tensor(w)).sum().backward()
        grads[name] = x["C" if which == "B" else "B"].grad.double().numpy()
    ours, ref = grads["ours"], grads["ref"]
    assert not np.isnan(ref).any()
    assert np.isinf(ref).any(), "the case does not reach an infinite gradient"
    assert not np.isnan(ours).any(), f"NaN in d{'C' if which == 'B' else 'B'}"
    assert np.array_equal(np.isinf(ours), np.isinf(ref)) and (ours[np.isinf(ref)] > 0).all()
    fin = np.isfinite(ref)
    assert rel_err(ours[fin], ref[fin]) <= TOL["float32"]
