"""hidden_attention (SPEC §4): parity with a float64 reference written from the
formula, the identity Σⱼ α[c,i,j]·uⱼ = selective_scan_fn(u, …) (no D, no z), every
B/C layout, delta_bias / softplus, both reduce modes, dtypes, SIMD levels, CUDA."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import (
    BC_SHAPES,
    clone,
    convert,
    is_torch,
    on_cuda,
    same_values,
    split_kind,
    sync,
    target_device,
    to_kind,
)
from reference import hidden_attention_ref, rel_err, selective_scan_ref, to_f64

from mamba_attention import hidden_attention, selective_scan_fn

#: float32 bound: the running decay rounds once per step and the sums over n are
#: float32; the relative error is that of a float32 scan (DESIGN.md: 1e-5).
TOL_F32 = 1e-5
TOL_CUDA = 3e-5


def ha_inputs(seed=0, b=2, d=5, l=9, n=4, g=1, B="shared", C="shared", delta_bias=True,
              softplus=True):
    """float64 keyword arguments of hidden_attention (without the flags)."""
    rng = np.random.default_rng(seed)
    if softplus:
        delta = rng.standard_normal((b, d, l)) * 0.5 - 1.0
    else:
        delta = rng.uniform(0.001, 0.1, (b, d, l))
    x = dict(delta=delta, A=-np.exp(rng.standard_normal((d, n))),
             B=rng.standard_normal(BC_SHAPES[B](b, d, n, l, g)),
             C=rng.standard_normal(BC_SHAPES[C](b, d, n, l, g)))
    if delta_bias:
        x["delta_bias"] = rng.uniform(-4.0, -1.0, d) if softplus else rng.uniform(0.001, 0.05, d)
    return x


def tol(dtype):
    # The output is float32 whatever the input dtype: the inputs are rounded
    # already (the reference sees the rounded values), so float32 bounds apply.
    return TOL_CUDA if on_cuda() else TOL_F32


def run_ha(kind=None, softplus=True, reduce=None, **opts):
    """Call hidden_attention on inputs of ``kind`` (delta, B, C in its dtype; A and
    delta_bias float32), check kind/shape/device/dtype, parity and untouched inputs."""
    kind = kind or ("torch-float32" if on_cuda() else "numpy-float32")
    x = to_kind(ha_inputs(softplus=softplus, **opts), kind)
    before = {k: clone(v) for k, v in x.items()}
    ref = hidden_attention_ref(**x, delta_softplus=softplus, reduce=reduce)
    out = hidden_attention(**x, delta_softplus=softplus, reduce=reduce)
    sync()
    for k in x:
        assert same_values(x[k], before[k]), f"input {k} was modified"
    framework = split_kind(kind)[0]
    if framework == "torch":
        import torch

        assert is_torch(out) and out.dtype == torch.float32
        assert out.device.type == target_device()
    else:
        assert type(out) is np.ndarray and out.dtype == np.float32
    assert tuple(out.shape) == ref.shape
    o = to_f64(out)
    assert not np.isnan(o).any()
    err = rel_err(o, ref)
    assert err <= tol(split_kind(kind)[1]), f"rel_err {err:.3e} ({kind}, reduce={reduce})"
    # strictly upper triangle exactly zero
    iu = np.triu_indices(ref.shape[-1], 1)
    assert not o[..., iu[0], iu[1]].any()
    return out, x, ref


# ------------------------------------------------------------------ parity

@pytest.mark.parametrize("reduce", [None, "mean"])
@pytest.mark.parametrize("B,C", [("shared", "shared"), ("const", "const"), ("grouped", "grouped"),
                                 ("const", "grouped"), ("grouped", "shared")])
def test_layouts(target, B, C, reduce):
    run_ha(B=B, C=C, g=3 if "grouped" in (B, C) else 1, d=6, l=13, n=5, reduce=reduce)


@pytest.mark.parametrize("softplus", [True, False])
@pytest.mark.parametrize("delta_bias", [True, False])
def test_bias_softplus(target, softplus, delta_bias):
    run_ha(softplus=softplus, delta_bias=delta_bias, l=21)
    run_ha(softplus=softplus, delta_bias=delta_bias, l=21, reduce="mean")


@pytest.mark.parametrize("b,d,l,n", [(1, 1, 1, 1), (1, 1, 2, 1), (3, 2, 17, 3), (1, 7, 31, 16),
                                     (2, 3, 33, 17), (1, 2, 65, 64), (1, 1, 20, 65), (1, 1, 9, 256)])
@pytest.mark.parametrize("reduce", [None, "mean"])
def test_sizes(target, b, d, l, n, reduce):
    run_ha(b=b, d=d, l=l, n=n, reduce=reduce)


@pytest.mark.parametrize("kind", ["numpy-float32", "numpy-float16", "numpy-bfloat16", "numpy-float64",
                                  "torch-float32", "torch-float16", "torch-bfloat16", "torch-float64"])
def test_dtypes(target, kind):
    run_ha(kind=kind, l=19, d=4)
    run_ha(kind=kind, l=19, d=4, B="grouped", C="grouped", g=2, reduce="mean")


def test_every_simd_level_long(simd_level):
    """A long-ish sequence (the running decay over ~300 steps) on every SIMD level."""
    run_ha(b=1, d=3, l=300, n=16, reduce=None)
    run_ha(b=2, d=9, l=150, n=16, reduce="mean")


def test_mean_is_channel_mean(target):
    kind = "torch-float32" if on_cuda() else "numpy-float32"
    x = to_kind(ha_inputs(b=2, d=11, l=23, n=6), kind)
    full = to_f64(hidden_attention(**x, delta_softplus=True))
    mean = to_f64(hidden_attention(**x, delta_softplus=True, reduce="mean"))
    assert rel_err(mean, full.mean(axis=1)) <= 1e-6


def test_many_channels_mean():
    """More channels than threads: the partial means of several channel ranges add up."""
    run_ha(b=1, d=37, l=40, n=4, reduce="mean")


def test_extreme_decay():
    """Large Δ·|A|: entries far from the diagonal underflow to exactly 0, no NaN/inf."""
    x = ha_inputs(b=1, d=2, l=40, n=4, softplus=False, delta_bias=False)
    x["delta"] = np.full_like(x["delta"], 30.0)
    x["A"] = -np.full_like(x["A"], 5.0)
    out = hidden_attention(**{k: v.astype(np.float32) for k, v in x.items()})
    ref = hidden_attention_ref(**x)
    assert np.isfinite(out).all()
    assert rel_err(out, ref) <= 1e-5
    assert out[0, 0, 39, 0] == 0.0


# ------------------------------------------------------------------ NaN / inf inputs

def _kind():
    return "torch-float32" if on_cuda() else "numpy-float32"


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["A", "C", "delta", "delta_bias", "B"])
@pytest.mark.parametrize("reduce", [None, "mean"])
def test_bad_value_never_above_diagonal(target, where, reduce, value):
    """Issue 15 item 7: a NaN / inf in A, B, C, delta or delta_bias left NaN above the
    diagonal (the lanes of columns j > i not yet started hold 0·exp(Δ·A) products).
    SPEC §4: α is exactly 0 for j > i, whatever the inputs; the other channels (when
    the bad value is in one channel's parameters) equal the float64 reference."""
    x64 = ha_inputs(seed=3, b=2, d=3, l=37, n=5, B="shared", C="shared")
    pos = {"A": (1, 2), "delta_bias": (1,), "delta": (1, 1, 20), "B": (0, 1, 9),
           "C": (1, 4, 30)}[where]
    x64[where][pos] = value
    x = to_kind(x64, _kind())
    out = to_f64(hidden_attention(**x, delta_softplus=True, reduce=reduce))
    sync()
    iu = np.triu_indices(37, 1)
    assert (out[..., iu[0], iu[1]] == 0).all(), "α is not 0 above the diagonal"
    if reduce is None and where in ("A", "delta_bias"):
        ref = hidden_attention_ref(**x, delta_softplus=True)
        assert rel_err(np.delete(out, 1, axis=1), np.delete(ref, 1, axis=1)) <= tol("float32")


def test_issue_nan_above_diagonal_reproducer(target):
    x = to_kind(ha_inputs(seed=4, b=1, d=2, l=20, n=3), _kind())
    x["A"][0, 0] = float("nan")
    for reduce in (None, "mean"):
        out = to_f64(hidden_attention(**x, delta_softplus=True, reduce=reduce))
        sync()
        assert not out[..., np.triu_indices(20, 1)[0], np.triu_indices(20, 1)[1]].any()


@pytest.mark.parametrize("n", [1, 5, 16, 17])
def test_infinite_step_decays_to_zero(target, n):
    """Δ_t = +inf with A < 0: exp(Δ_t·A) = 0, so α[i, j] = 0 exactly for j < t <= i
    (SPEC §4). The padding states k >= n of a vector used to compute exp(inf·0) = NaN
    there. Columns j > t do not involve Δ_t: they equal the reference of the steps
    after t."""
    x64 = ha_inputs(seed=5, b=1, d=2, l=30, n=n, softplus=False, delta_bias=False)
    t = 11
    x64["delta"][0, 1, t] = np.inf
    x = to_kind(x64, _kind())
    out = to_f64(hidden_attention(**x))
    sync()
    o = out[0, 1]
    assert (o[t:, :t] == 0).all()
    assert not o[np.triu_indices(30, 1)].any()
    ref = hidden_attention_ref(**x)
    assert rel_err(o[:t, :t], ref[0, 1, :t, :t]) <= tol("float32")
    assert rel_err(out[0, 0], ref[0, 0]) <= tol("float32")
    tail = {k: (v[..., t + 1:] if k != "A" and v.ndim == 3 else v) for k, v in x64.items()}
    ref_tail = hidden_attention_ref(**to_kind(tail, _kind()))
    assert rel_err(o[t + 1:, t + 1:], ref_tail[0, 1]) <= tol("float32")


# ------------------------------------------------------------------ identity with the scan

@pytest.mark.parametrize("B,C", [("shared", "shared"), ("const", "grouped"), ("grouped", "const")])
@pytest.mark.parametrize("softplus", [True, False])
def test_identity_with_selective_scan(target, B, C, softplus):
    """Σ_j α[c, i, j]·u[c, j] equals selective_scan_fn(u, delta, A, B, C) without D and z,
    both computed by our kernels (and both checked against the float64 references)."""
    kind = "torch-float32" if on_cuda() else "numpy-float32"
    inp = ha_inputs(b=2, d=6, l=37, n=8, g=3, B=B, C=C, softplus=softplus)
    rng = np.random.default_rng(1)
    inp_u = rng.standard_normal((2, 6, 37))
    x = to_kind(inp, kind)
    u = convert(inp_u, kind)
    alpha = to_f64(hidden_attention(**x, delta_softplus=softplus))
    y = to_f64(selective_scan_fn(u, **x, delta_softplus=softplus))
    sync()
    via_alpha = np.einsum("bcij,bcj->bci", alpha, to_f64(u))
    assert rel_err(via_alpha, y) <= 3e-5
    ref_y = selective_scan_ref(u, **x, delta_softplus=softplus)
    assert rel_err(via_alpha, ref_y) <= 3e-5


def test_identity_reference():
    """The float64 references agree with each other (guards the reference itself)."""
    inp = ha_inputs(b=2, d=3, l=25, n=4, B="grouped", C="const", g=3)
    u = np.random.default_rng(2).standard_normal((2, 3, 25))
    alpha = hidden_attention_ref(**inp, delta_softplus=True)
    y = selective_scan_ref(u, **inp, delta_softplus=True)
    assert rel_err(np.einsum("bcij,bcj->bci", alpha, u), y) <= 1e-12


# ------------------------------------------------------------------ layouts in memory

def test_noncontiguous_inputs():
    torch = pytest.importorskip("torch")
    x = to_kind(ha_inputs(b=2, d=4, l=15, n=3), "torch-float32")
    ref = hidden_attention_ref(**x, delta_softplus=True)
    nc = {k: (v.t().contiguous().t() if v.dim() == 2 else v.transpose(-1, -2).contiguous().transpose(-1, -2))
          for k, v in x.items() if v.dim() >= 2}
    nc["delta_bias"] = torch.stack([x["delta_bias"], x["delta_bias"]], 1)[:, 0]
    assert not nc["delta"].is_contiguous() and not nc["delta_bias"].is_contiguous()
    out = hidden_attention(**nc, delta_softplus=True)
    assert rel_err(out, ref) <= TOL_F32


# ------------------------------------------------------------------ errors

def _args(**kw):
    x = {k: v.astype(np.float32) for k, v in ha_inputs(b=2, d=4, l=6, n=3).items()}
    x.update(kw)
    return x


def test_bad_reduce():
    with pytest.raises(ValueError, match=r"reduce.*'sum'|reduce.*\"sum\""):
        hidden_attention(**_args(), reduce="sum")
    with pytest.raises(TypeError, match="reduce"):
        hidden_attention(**_args(), reduce=3)


@pytest.mark.parametrize("name,value,exc,match", [
    ("delta", np.zeros((2, 4), np.float32), ValueError, "delta"),
    ("delta", np.zeros((2, 4, 6), np.int32), TypeError, "delta"),
    ("A", np.zeros((5, 3), np.float32), ValueError, "A"),
    ("A", np.zeros((4, 300), np.float32), ValueError, "A.*256"),
    ("B", np.zeros((2, 3, 7), np.float32), ValueError, "B"),
    ("B", np.zeros((2, 3, 3, 6), np.float32), ValueError, "B.*groups"),
    ("C", np.zeros((4, 2), np.float32), ValueError, "C"),
    ("C", np.zeros((2, 2, 3, 6, 1), np.float32), ValueError, "C"),
    ("delta_bias", np.zeros(5, np.float32), ValueError, "delta_bias"),
    ("delta", [[[1.0]]], TypeError, "delta"),
])
def test_bad_arguments(name, value, exc, match):
    with pytest.raises(exc, match=match):
        hidden_attention(**_args(**{name: value}), delta_softplus=True)


def test_empty_sequence_is_refused():
    x = _args(delta=np.zeros((2, 4, 0), np.float32), B=np.zeros((2, 3, 0), np.float32),
              C=np.zeros((2, 3, 0), np.float32))
    with pytest.raises(ValueError, match="delta"):
        hidden_attention(**x)


def test_mixed_devices_refused():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU to mix devices")
    x = to_kind(ha_inputs(), "torch-float32")
    x["A"] = x["A"].cuda()
    with pytest.raises(ValueError, match="A"):
        hidden_attention(**x)
