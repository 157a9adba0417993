"""Bad input raises exactly ValueError (shape/value) or TypeError (kind/dtype), naming
the offending argument -- never a pyo3 PanicException or a crash (SPEC conventions).

Every case runs with NumPy inputs and again with torch tensors (NumPy overrides are
converted with torch.from_numpy; lists, None and strings stay as they are).
"""

import re

import numpy as np
import pytest

pytest.importorskip("mamba_attention._core")

from conftest import (same_values, scan_inputs, selective_scan_fn,  # noqa: E402
                      selective_state_update, to_kind, update_inputs)

b, d, l, n = 2, 4, 5, 3
_rng = np.random.default_rng(0)


def arr(*shape, dtype=np.float32):
    a = _rng.standard_normal(shape) + 2.0
    return a.astype(dtype) if np.dtype(dtype).kind != "c" else (a + 1j).astype(dtype)


def empty_case(**dims):
    """Overrides giving every argument the shape for b, d, l, n updated by ``dims``."""
    B_, D_, L_, N_ = (dims.get(k, v) for k, v in (("b", b), ("d", d), ("l", l), ("n", n)))
    return dict(u=arr(B_, D_, L_), delta=arr(B_, D_, L_), z=arr(B_, D_, L_), A=arr(D_, N_),
                B=arr(B_, N_, L_), C=arr(B_, N_, L_), D=arr(D_), delta_bias=arr(D_),
                initial_state=arr(B_, D_, N_))


ALL_SCAN = ("u", "delta", "z", "A", "B", "C", "D", "delta_bias", "initial_state", "b", "d", "l", "n")
V, T = ValueError, TypeError

SCAN_ERRORS = {
    # shapes
    "u-rank2": (dict(u=arr(b, d)), V, ["u"]),
    "u-rank4": (dict(u=arr(b, d, l, 1)), V, ["u"]),
    "delta-rank2": (dict(delta=arr(b, d)), V, ["delta"]),
    "delta-l": (dict(delta=arr(b, d, l + 1)), V, ["delta"]),
    "delta-b": (dict(delta=arr(b + 1, d, l)), V, ["delta"]),
    "z-d": (dict(z=arr(b, d + 1, l)), V, ["z"]),
    "A-rank1": (dict(A=arr(d)), V, ["A"]),
    "A-rank3": (dict(A=arr(d, n, 1)), V, ["A"]),
    "A-d": (dict(A=arr(d + 1, n)), V, ["A"]),
    "B-rank1": (dict(B=arr(n)), V, ["B"]),
    "B-rank5": (dict(B=arr(b, 1, n, l, 1)), V, ["B"]),
    "B-const-d": (dict(B=arr(d + 1, n)), V, ["B"]),
    "B-const-n": (dict(B=arr(d, n + 1)), V, ["B"]),
    "B-shared-b": (dict(B=arr(b + 1, n, l)), V, ["B"]),
    "B-shared-n": (dict(B=arr(b, n + 1, l)), V, ["B"]),
    "B-shared-l": (dict(B=arr(b, n, l + 1)), V, ["B"]),
    "B-grouped-l": (dict(B=arr(b, 2, n, l - 1)), V, ["B"]),
    "B-grouped-indivisible": (dict(B=arr(b, 3, n, l)), V, ["B"]),
    "C-grouped-indivisible": (dict(C=arr(b, 3, n, l)), V, ["C"]),
    "C-grouped-g>d": (dict(C=arr(b, 2 * d, n, l)), V, ["C"]),
    "C-grouped-n": (dict(C=arr(b, 2, n + 1, l)), V, ["C"]),
    "C-const-n": (dict(C=arr(d, n - 1)), V, ["C"]),
    "D-d": (dict(D=arr(d + 1)), V, ["D"]),
    "D-rank2": (dict(D=arr(d, 1)), V, ["D"]),
    "delta_bias-d": (dict(delta_bias=arr(d - 1)), V, ["delta_bias"]),
    "initial_state-b": (dict(initial_state=arr(b + 1, d, n)), V, ["initial_state"]),
    "initial_state-n": (dict(initial_state=arr(b, d, n + 1)), V, ["initial_state"]),
    "initial_state-rank2": (dict(initial_state=arr(b, d)), V, ["initial_state"]),
    "n>256": (dict(A=arr(d, 257), B=arr(b, 257, l), C=arr(b, 257, l), initial_state=arr(b, d, 257)),
              V, ["A", "B", "C", "initial_state", "n"]),
    "empty-b": (empty_case(b=0), V, ALL_SCAN),
    "empty-d": (empty_case(d=0), V, ALL_SCAN),
    "empty-l": (empty_case(l=0), V, ALL_SCAN),
    "empty-n": (empty_case(n=0), V, ALL_SCAN),
    # dtypes
    "u-int32": (dict(u=arr(b, d, l, dtype=np.int32)), T, ["u"]),
    "delta-complex64": (dict(delta=arr(b, d, l, dtype=np.complex64)), T, ["delta"]),
    "A-int32": (dict(A=arr(d, n, dtype=np.int32)), T, ["A"]),
    "B-int64": (dict(B=arr(b, n, l, dtype=np.int64)), T, ["B"]),
    "C-bool": (dict(C=arr(d, n, dtype=np.bool_)), T, ["C"]),
    "D-int64": (dict(D=arr(d, dtype=np.int64)), T, ["D"]),
    "initial_state-int32": (dict(initial_state=arr(b, d, n, dtype=np.int32)), T, ["initial_state"]),
    "delta-mixed-float16": (dict(delta=arr(b, d, l, dtype=np.float16)), T, ["delta"]),
    "z-mixed-float64": (dict(z=arr(b, d, l, dtype=np.float64)), T, ["z"]),
    "u-mixed-float16": (dict(u=arr(b, d, l, dtype=np.float16)), T, ["u", "delta"]),
    # Python objects where a tensor is required
    "u-list": (dict(u=[[[1.0] * l] * d] * b), T, ["u"]),
    "u-None": (dict(u=None), T, ["u"]),
    "delta-None": (dict(delta=None), T, ["delta"]),
    "A-None": (dict(A=None), T, ["A"]),
    "B-None": (dict(B=None), T, ["B"]),
    "C-list": (dict(C=[[1.0] * n] * d), T, ["C"]),
    "D-float": (dict(D=1.5), T, ["D"]),
    "z-str": (dict(z="zzz"), T, ["z"]),
    "initial_state-list": (dict(initial_state=[[[0.0] * n] * d] * b), T, ["initial_state"]),
}


def update_empty(**dims):
    B_, D_, N_ = (dims.get(k, v) for k, v in (("b", b), ("d", d), ("n", n)))
    return dict(state=arr(B_, D_, N_), x=arr(B_, D_), dt=arr(B_, D_), z=arr(B_, D_), A=arr(D_, N_),
                B=arr(B_, N_), C=arr(B_, N_), D=arr(D_), dt_bias=arr(D_))


ALL_UPDATE = ("state", "x", "dt", "z", "A", "B", "C", "D", "dt_bias", "b", "d", "n")
IDX = "state_batch_indices"
UPDATE_ERRORS = {
    "state-rank2": (dict(state=arr(b, d)), V, ["state"]),
    "state-d": (dict(state=arr(b, d + 1, n)), V, ["state"]),
    "state-n": (dict(state=arr(b, d, n + 1)), V, ["state"]),
    "state-b-without-indices": (dict(state=arr(b + 1, d, n)), V, ["state"]),
    "x-rank3": (dict(x=arr(b, d, 1)), V, ["x"]),
    "x-rank1": (dict(x=arr(d)), V, ["x"]),
    "dt-d": (dict(dt=arr(b, d + 1)), V, ["dt"]),
    "z-b": (dict(z=arr(b + 1, d)), V, ["z"]),
    "A-d": (dict(A=arr(d - 1, n)), V, ["A"]),
    "A-rank1": (dict(A=arr(d)), V, ["A"]),
    "B-rank1": (dict(B=arr(n)), V, ["B"]),
    "B-rank4": (dict(B=arr(b, 1, n, 1)), V, ["B"]),
    "B-b": (dict(B=arr(b + 1, n)), V, ["B"]),
    "B-n": (dict(B=arr(b, n + 1)), V, ["B"]),
    "B-grouped-indivisible": (dict(B=arr(b, 3, n)), V, ["B"]),
    "C-grouped-indivisible": (dict(C=arr(b, 3, n)), V, ["C"]),
    "C-grouped-n": (dict(C=arr(b, 2, n + 1)), V, ["C"]),
    "D-d": (dict(D=arr(d + 1)), V, ["D"]),
    "dt_bias-d": (dict(dt_bias=arr(d - 1)), V, ["dt_bias"]),
    "n>256": (dict(state=arr(b, d, 257), A=arr(d, 257), B=arr(b, 257), C=arr(b, 257)),
              V, ["A", "B", "C", "state", "n"]),
    "empty-b": (update_empty(b=0), V, ALL_UPDATE),
    "empty-d": (update_empty(d=0), V, ALL_UPDATE),
    "empty-n": (update_empty(n=0), V, ALL_UPDATE),
    "x-int32": (dict(x=arr(b, d, dtype=np.int32)), T, ["x"]),
    "dt-mixed-float16": (dict(dt=arr(b, d, dtype=np.float16)), T, ["dt"]),
    "z-mixed-float64": (dict(z=arr(b, d, dtype=np.float64)), T, ["z"]),
    "A-int64": (dict(A=arr(d, n, dtype=np.int64)), T, ["A"]),
    "B-bool": (dict(B=arr(b, n, dtype=np.bool_)), T, ["B"]),
    "x-None": (dict(x=None), T, ["x"]),
    "state-None": (dict(state=None), T, ["state"]),
    "state-list": (dict(state=[[[0.0] * n] * d] * b), T, ["state"]),
    "dt-list": (dict(dt=[[0.1] * d] * b), T, ["dt"]),
    "A-None": (dict(A=None), T, ["A"]),
    "indices-out-of-range": ({IDX: np.array([0, b], np.int32)}, V, [IDX]),
    "indices-far-out-of-range": ({IDX: np.array([2**31 - 1, 0], np.int64)}, V, [IDX]),
    "indices-too-long": ({IDX: np.array([0, 1, 1], np.int32)}, V, [IDX]),
    "indices-too-short": ({IDX: np.array([0], np.int32)}, V, [IDX]),
    "indices-rank2": ({IDX: np.array([[0], [1]], np.int32)}, V, [IDX]),
    "indices-float": ({IDX: np.array([0.0, 1.0], np.float32)}, T, [IDX]),
}


def _convert(v, framework):
    if framework == "torch" and isinstance(v, np.ndarray):
        import torch
        return torch.from_numpy(v)
    return v


def _check(fn, kwargs, exc, names):
    with pytest.raises(BaseException) as info:
        fn(**kwargs)
    e = info.value
    assert type(e) is exc, f"expected {exc.__name__}, got {type(e).__module__}.{type(e).__name__}: {e}"
    msg = str(e)
    assert any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(nm)}(?![A-Za-z0-9_])", msg) for nm in names), \
        f"message does not name any of {names}: {msg!r}"


FRAMEWORKS = ["numpy", "torch"]


def _base(framework, inputs):
    if framework == "torch":
        pytest.importorskip("torch")
    return to_kind(inputs, f"{framework}-float32")


@pytest.mark.parametrize("case", list(SCAN_ERRORS))
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_selective_scan_errors(framework, case):
    overrides, exc, names = SCAN_ERRORS[case]
    kw = _base(framework, scan_inputs(b=b, d=d, l=l, n=n, g=2, B="shared", C="grouped"))
    kw.update({k: _convert(v, framework) for k, v in overrides.items()})
    _check(lambda **k: selective_scan_fn(**k, delta_softplus=True, return_last_state=True),
           kw, exc, names)


@pytest.mark.parametrize("case", list(UPDATE_ERRORS))
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_state_update_errors(framework, case):
    overrides, exc, names = UPDATE_ERRORS[case]
    kw = _base(framework, update_inputs(b=b, d=d, n=n, g=2, grouped_C=True))
    kw.update({k: _convert(v, framework) for k, v in overrides.items()})
    state = kw["state"]
    saved = state.copy() if isinstance(state, np.ndarray) else getattr(state, "clone", lambda: None)()
    _check(lambda **k: selective_state_update(**k, dt_softplus=True), kw, exc, names)
    if saved is not None:
        assert same_values(state, saved), "state modified by a call that raised"


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_valid_base_cases_pass(framework):
    """The unmodified inputs the error cases start from are valid."""
    kw = _base(framework, scan_inputs(b=b, d=d, l=l, n=n, g=2, B="shared", C="grouped"))
    selective_scan_fn(**kw, delta_softplus=True, return_last_state=True)
    kw = _base(framework, update_inputs(b=b, d=d, n=n, g=2, grouped_C=True))
    selective_state_update(**kw, dt_softplus=True, state_batch_indices=_convert(
        np.array([1, -1], np.int32), framework))
