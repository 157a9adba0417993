"""Shared fixtures and input helpers for the mamba_attention test suite."""

from __future__ import annotations

import numpy as np
import pytest

from reference import TOL, rel_err, selective_scan_ref, selective_state_update_ref, to_f64

try:
    from mamba_attention import _core, selective_scan_fn, selective_state_update

    SIMD_LEVELS = list(_core.simd_levels())
except ImportError:  # extension not built: only test_reference.py can run
    _core = selective_scan_fn = selective_state_update = None
    SIMD_LEVELS = []

try:
    import torch
except ImportError:
    torch = None

try:
    import ml_dtypes
except ImportError:
    ml_dtypes = None


@pytest.fixture(params=SIMD_LEVELS)
def simd_level(request, monkeypatch):
    """Runs the test once per SIMD level this CPU supports, forced through the env var."""
    monkeypatch.setenv("MAMBA_ATTENTION_SIMD", request.param)
    return request.param


# ------------------------------------------------------------------ target devices

#: Where the parity tests run: each CPU SIMD level, then the CUDA backend.
TARGETS = SIMD_LEVELS + ["cuda"] if SIMD_LEVELS else []

#: The device the helpers below put torch inputs on; set by the ``target`` fixture.
#: Everything defaults to the CPU, so tests that do not use ``target`` are unaffected.
_TARGET = {"device": "cpu"}


def cuda_skip_reason():
    """Why the CUDA target cannot run here, or None when it can."""
    if torch is None:
        return "CUDA target: torch is not installed"
    if not torch.cuda.is_available():
        return "CUDA target: torch.cuda.is_available() is False (no GPU or no driver)"
    if _core is None:
        return "CUDA target: mamba_attention._core is not built"
    return None


def skip_unless_cuda():
    reason = cuda_skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(params=TARGETS)
def target(request, monkeypatch):
    """Runs the test once per SIMD level this CPU supports (forced through the env var,
    as ``simd_level`` does) and once on "cuda" (skipped without a usable GPU).

    On "cuda", the helpers of this module create torch inputs on the GPU (NumPy kinds
    and float64 main tensors are skipped: the CUDA contract is torch float32/float16/
    bfloat16), synchronize after each launch, and compare with the CPU float64
    reference at :func:`tol`'s CUDA tolerances. ``cpu_only`` / ``cuda_only`` restrict
    a single test to one side."""
    if request.param == "cuda":
        skip_unless_cuda()
        monkeypatch.setitem(_TARGET, "device", "cuda")
    else:
        monkeypatch.setenv("MAMBA_ATTENTION_SIMD", request.param)
    return request.param


#: Decorators that override ``target``'s params for one test.
cpu_only = pytest.mark.parametrize("target", SIMD_LEVELS, indirect=True)
cuda_only = pytest.mark.parametrize("target", ["cuda"], indirect=True)


def on_cuda():
    """Whether the running test targets the CUDA backend."""
    return _TARGET["device"] == "cuda"


def target_device():
    return _TARGET["device"]


def default_kind():
    """The kind a parity test uses when it names none: NumPy float32 on the CPU
    (as before), torch float32 on the GPU."""
    return "torch-float32" if on_cuda() else "numpy-float32"


def sync():
    """On the CUDA target, wait for the GPU so an asynchronous fault (illegal address,
    misaligned access, launch failure) is raised by the test that caused it."""
    if on_cuda():
        torch.cuda.synchronize()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuda: runs on the CUDA backend (added automatically to the 'cuda' "
        "target of parity tests and to tests/test_cuda.py); select with -m cuda")


def pytest_collection_modifyitems(config, items):
    """Mark every CUDA test ``cuda``; without a usable GPU, skip the parity tests'
    "cuda" target already here (cheaper than setting up fixtures to skip in them)."""
    reason = cuda_skip_reason()
    for item in items:
        callspec = getattr(item, "callspec", None)
        cuda_param = callspec is not None and callspec.params.get("target") == "cuda"
        if cuda_param or item.path.name == "test_cuda.py":
            item.add_marker(pytest.mark.cuda)
        if cuda_param and reason:
            item.add_marker(pytest.mark.skip(reason=reason))


# ---------------------------------------------------------------- kinds and dtypes

KINDS = ["numpy-float32", "numpy-float16", "numpy-bfloat16", "numpy-float64",
         "torch-float32", "torch-float16", "torch-bfloat16", "torch-float64"]


def split_kind(kind):
    framework, dtype = kind.split("-")
    return framework, dtype


def require(kind):
    """Skip the running test if ``kind`` needs torch or ml_dtypes and they are missing,
    or is a NumPy kind on the CUDA target (NumPy arrays live on the CPU)."""
    framework, dtype = split_kind(kind)
    if framework == "torch":
        pytest.importorskip("torch")
    else:
        if on_cuda():
            pytest.skip("CUDA target: NumPy arrays are CPU-only")
        if dtype == "bfloat16":
            pytest.importorskip("ml_dtypes")


def np_dtype(name):
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def convert(x, kind):
    """float64 NumPy array -> array of ``kind`` (e.g. "torch-bfloat16")."""
    require(kind)
    framework, dtype = split_kind(kind)
    if framework == "numpy":
        return np.ascontiguousarray(x).astype(np_dtype(dtype))
    return torch.from_numpy(np.ascontiguousarray(x)).to(getattr(torch, dtype)).to(target_device())


def is_torch(x):
    return torch is not None and isinstance(x, torch.Tensor)


def kind_of(x):
    """The kind string of an array or tensor."""
    if is_torch(x):
        return "torch-" + str(x.dtype).replace("torch.", "")
    assert type(x) is np.ndarray, type(x)
    is_bf16 = ml_dtypes is not None and x.dtype == ml_dtypes.bfloat16
    return "numpy-" + ("bfloat16" if is_bf16 else x.dtype.name)


def clone(x):
    if x is None:
        return None
    return x.clone() if is_torch(x) else x.copy()


def same_values(a, b):
    """Exact equality of two arrays/tensors (NaN == NaN); float64 holds every value exactly."""
    return tuple(a.shape) == tuple(b.shape) and np.array_equal(to_f64(a), to_f64(b), equal_nan=True)


def shares_memory(a, b):
    """Whether the storage of two arrays/tensors overlaps."""
    if is_torch(a) != is_torch(b):
        return False
    if is_torch(a):
        def span(t):
            lo = t.data_ptr()
            return lo, lo + t.untyped_storage().nbytes()
        (a0, a1), (b0, b1) = span(a), span(b)
        return a0 < b1 and b0 < a1
    return np.shares_memory(a, b)


# ------------------------------------------------------------------ memory layouts

LAYOUTS = ["strided", "offset", "reversed_order", "swap_last2", "negative"]


def relayout(x, layout):
    """Same values as ``x`` in a non-contiguous memory layout.

    strided: every axis has step 2 inside a NaN-filled buffer (reading a gap shows up
    as NaN); offset: the view [1:, 1:, ...] of a NaN-filled buffer one larger on every
    axis (non-zero storage offset, row padding); reversed_order: Fortran order; swap_last2: the last two axes swapped in
    memory (torch.randn(b, l, d).transpose(1, 2)); negative: every stride negative
    (NumPy only).
    """
    if x is None or layout == "contiguous":
        return x
    nd = x.ndim
    if layout in ("strided", "offset"):
        if layout == "strided":
            step, shape = (slice(None, None, 2),) * nd, [2 * s for s in x.shape]
        else:
            step, shape = (slice(1, None),) * nd, [s + 1 for s in x.shape]
        if is_torch(x):
            big = torch.full(shape, float("nan"), dtype=x.dtype, device=x.device)
        else:
            big = np.full(shape, np.nan, dtype=x.dtype)
        big[step] = x
        return big[step]
    if layout == "reversed_order":
        perm = list(range(nd))[::-1]
    elif layout == "swap_last2":
        perm = list(range(nd - 2)) + [nd - 1, nd - 2] if nd >= 2 else [0]
    elif layout == "negative":
        assert not is_torch(x), "torch has no negative strides"
        flip = (slice(None, None, -1),) * nd
        return x[flip].copy()[flip]
    else:
        raise ValueError(layout)
    if is_torch(x):
        return x.permute(perm).contiguous().permute(perm)
    return np.ascontiguousarray(x.transpose(perm)).transpose(perm)


def is_contiguous(x):
    return x.is_contiguous() if is_torch(x) else x.flags.c_contiguous


# ----------------------------------------------------------------- random inputs

# Arguments that take the kind's dtype (the rest go in float32 of the same framework).
MAIN_ARGS = {"u", "delta", "z", "B", "C", "x", "dt"}
BC_SHAPES = {"const": lambda b, d, n, l, g: (d, n), "shared": lambda b, d, n, l, g: (b, n, l),
             "grouped": lambda b, d, n, l, g: (b, g, n, l)}


def _delta(rng, shape, softplus):
    return rng.standard_normal(shape) * 0.5 - 1.0 if softplus else rng.uniform(0.001, 0.1, shape)


def _delta_bias(rng, d, softplus):
    return rng.uniform(-4.0, -1.0, d) if softplus else rng.uniform(0.001, 0.05, d)


def scan_inputs(seed=0, b=2, d=5, l=9, n=4, g=1, B="shared", C="shared", D=True, z=True,
                delta_bias=True, softplus=True, initial_state=True):
    """float64 keyword arguments of selective_scan_fn (without the flags)."""
    rng = np.random.default_rng(seed)
    x = dict(u=rng.standard_normal((b, d, l)), delta=_delta(rng, (b, d, l), softplus),
             A=-np.exp(rng.standard_normal((d, n))),
             B=rng.standard_normal(BC_SHAPES[B](b, d, n, l, g)),
             C=rng.standard_normal(BC_SHAPES[C](b, d, n, l, g)))
    if D:
        x["D"] = rng.standard_normal(d)
    if z:
        x["z"] = rng.standard_normal((b, d, l))
    if delta_bias:
        x["delta_bias"] = _delta_bias(rng, d, softplus)
    if initial_state:
        x["initial_state"] = rng.standard_normal((b, d, n))
    return x


def update_inputs(seed=0, b=2, d=5, n=4, g=1, grouped_B=False, grouped_C=False, D=True, z=True,
                  dt_bias=True, softplus=True, cache=None):
    """float64 keyword arguments of selective_state_update (state: (cache or b, d, n))."""
    rng = np.random.default_rng(seed)
    x = dict(state=rng.standard_normal((cache or b, d, n)), x=rng.standard_normal((b, d)),
             dt=_delta(rng, (b, d), softplus), A=-np.exp(rng.standard_normal((d, n))),
             B=rng.standard_normal((b, g, n) if grouped_B else (b, n)),
             C=rng.standard_normal((b, g, n) if grouped_C else (b, n)))
    if D:
        x["D"] = rng.standard_normal(d)
    if z:
        x["z"] = rng.standard_normal((b, d))
    if dt_bias:
        x["dt_bias"] = _delta_bias(rng, d, softplus)
    return x


def to_kind(inputs, kind, layout="contiguous", aux="float32"):
    """Convert float64 inputs: MAIN_ARGS to ``kind``, the others (A, D, biases, states)
    to ``aux`` in the same framework; then apply ``layout`` to every array."""
    framework, dtype = split_kind(kind)
    if on_cuda() and framework == "torch" and dtype == "float64":
        pytest.skip("CUDA target: float64 u/delta/z/x/dt are CPU-only (the CUDA contract is "
                    "float32/float16/bfloat16; A, D, biases and states may still be float64)")
    out = {}
    for k, v in inputs.items():
        conv = kind if k in MAIN_ARGS else f"{framework}-{aux}"
        if k == "state":
            conv = f"{framework}-float32"
        out[k] = relayout(convert(v, conv), layout)
    return out


# ---------------------------------------------------------------------- checks

def assert_output(out, like, shape, dtype=None):
    """``out`` has exactly ``like``'s kind (framework + dtype unless given), the shape,
    ``like``'s device (the target's: CPU, or the input's GPU), and no NaN."""
    want = kind_of(like) if dtype is None else split_kind(kind_of(like))[0] + "-" + dtype
    assert kind_of(out) == want, (kind_of(out), want)
    assert tuple(out.shape) == tuple(shape), (tuple(out.shape), shape)
    if is_torch(out):
        assert out.device.type == target_device(), (out.device, target_device())
        assert out.device == like.device, (out.device, like.device)
    assert not np.isnan(to_f64(out)).any(), "output contains NaN"


#: CUDA tolerances: DESIGN.md's, except float32 results (outputs and float32 states)
#: at 2e-5 instead of 1e-5, because the kernel evaluates exp(Δ·A) with the fast
#: ex2.approx instruction (~2 ulp, vs the CPU's correctly-rounded-ish polynomial), and
#: those errors accumulate through the recurrence. fp16/bf16 outputs are dominated by
#: the output rounding, so their tolerances are unchanged.
TOL_CUDA = {**TOL, "float32": 2e-5, "float64": 2e-5}


def tol(dtype):
    """Relative tolerance for results of ``dtype`` on the current target."""
    return (TOL_CUDA if on_cuda() else TOL)[dtype]


def assert_close(ours, ref, dtype, what="out"):
    err, t = rel_err(ours, ref), tol(dtype)
    assert err <= t, f"{what}: rel_err {err:.3e} > {t:.0e} ({dtype}, {target_device()})"


def run_scan(kind=None, layout="contiguous", softplus=True, last_state=True,
             aux="float32", **opts):
    """Build inputs, call selective_scan_fn, check kind/shape/dtype/device, parity with
    the reference (computed on the CPU in float64 from the rounded inputs) and that no
    input was modified. ``kind`` defaults to :func:`default_kind`.
    Returns (out, last_state or None, converted inputs, reference out, reference state)."""
    kind = kind or default_kind()
    x = to_kind(scan_inputs(softplus=softplus, **opts), kind, layout, aux)
    before = {k: clone(v) for k, v in x.items()}
    ref_out, ref_h = selective_scan_ref(**x, delta_softplus=softplus, return_last_state=True)
    res = selective_scan_fn(**x, delta_softplus=softplus, return_last_state=last_state)
    sync()
    for k in x:
        assert same_values(x[k], before[k]), f"input {k} was modified"
    if last_state:
        assert isinstance(res, tuple) and len(res) == 2, type(res)
        out, h = res
        assert_output(h, x["u"], ref_h.shape, dtype="float32")
        assert_close(h, ref_h, "float32", "last_state")
    else:
        assert not isinstance(res, tuple), type(res)
        out, h = res, None
    assert_output(out, x["u"], ref_out.shape)
    assert_close(out, ref_out, split_kind(kind)[1])
    return out, h, x, ref_out, ref_h


def as_indices(idx, framework, dtype="int32"):
    """state_batch_indices in the given framework and integer dtype."""
    idx = np.asarray(idx, dtype=dtype)
    return torch.from_numpy(idx).to(target_device()) if framework == "torch" else idx


def run_update(kind=None, layout="contiguous", softplus=True, indices=None,
               aux="float32", **opts):
    """Build inputs, call selective_state_update, check the output, the in-place state
    update and the untouched inputs against the reference. ``indices``: a list, or a
    (list, int dtype) pair; ``kind`` defaults to :func:`default_kind`.
    Returns (out, converted inputs, state before, ref out, ref state)."""
    kind = kind or default_kind()
    x = to_kind(update_inputs(softplus=softplus, **opts), kind, layout, aux)
    if indices is not None:
        idx, idx_dtype = indices if isinstance(indices, tuple) else (indices, "int32")
        x["state_batch_indices"] = as_indices(idx, split_kind(kind)[0], idx_dtype)
    before = {k: clone(v) for k, v in x.items()}
    ref_out, ref_state = selective_state_update_ref(**x, dt_softplus=softplus)
    out = selective_state_update(**x, dt_softplus=softplus)
    sync()
    for k in x:
        if k != "state":
            assert same_values(x[k], before[k]), f"input {k} was modified"
    assert_output(out, x["x"], ref_out.shape)
    assert_close(out, ref_out, split_kind(kind)[1])
    assert kind_of(x["state"]) == split_kind(kind)[0] + "-float32"
    assert_close(x["state"], ref_state, "float32", "state")
    return out, x, before["state"], ref_out, ref_state
