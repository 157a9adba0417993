"""selective_state_update against the float64 reference (SPEC §1), on every SIMD level
and on the CUDA backend (the ``target`` fixture; see test_selective_scan.py)."""

import itertools

import numpy as np
import pytest

pytest.importorskip("mamba_attention._core")

from conftest import (KINDS, LAYOUTS, assert_close, assert_output, cpu_only,  # noqa: E402
                      cuda_only, is_contiguous, is_torch, on_cuda, run_update, same_values,
                      scan_inputs, selective_scan_fn, selective_scan_ref,
                      selective_state_update, selective_state_update_ref, split_kind, sync, tol,
                      to_f64, to_kind, update_inputs)
from reference import rel_err  # noqa: E402

pytestmark = pytest.mark.usefixtures("target")

ALL_ON = dict(D=True, z=True, dt_bias=True, softplus=True)
GROUPED = list(itertools.product([False, True], repeat=2))  # (grouped_B, grouped_C)
OPTION_CASES = [
    pytest.param(dict(zip(("D", "z", "dt_bias", "softplus"), vals)), *GROUPED[i % 4],
                 id="".join("DZbs"[j] if v else "_" for j, v in enumerate(vals))
                 + "-B" + "sg"[GROUPED[i % 4][0]] + "C" + "sg"[GROUPED[i % 4][1]])
    for i, vals in enumerate(itertools.product([False, True], repeat=4))
]


@pytest.mark.parametrize("opts,grouped_B,grouped_C", OPTION_CASES)
def test_options(opts, grouped_B, grouped_C):
    run_update(b=3, d=6, n=4, g=3, grouped_B=grouped_B, grouped_C=grouped_C, **opts)


@pytest.mark.parametrize("d,g", [(6, 2), (36, 3), (34, 2), (5, 5), (600, 4), (780, 6)])
@pytest.mark.parametrize("grouped_B,grouped_C", GROUPED, ids=["Bs-Cs", "Bs-Cg", "Bg-Cs", "Bg-Cg"])
def test_bc_layouts(grouped_B, grouped_C, d, g):
    run_update(b=2, d=d, n=16, g=g, grouped_B=grouped_B, grouped_C=grouped_C, **ALL_ON)


@cuda_only
@pytest.mark.parametrize("d,g", [(256, 2), (400, 2), (768, 4), (260, 2), (1000, 8)])
@pytest.mark.parametrize("grouped_B,grouped_C", GROUPED[1:], ids=["Bs-Cg", "Bg-Cs", "Bg-Cg"])
def test_bc_layouts_gpu(grouped_B, grouped_C, d, g):
    """Group boundaries inside and across blocks of channels (d/g = 128, 200, 192, 130, 125)."""
    run_update(b=3, d=d, n=16, g=g, grouped_B=grouped_B, grouped_C=grouped_C, **ALL_ON)


@pytest.mark.parametrize("b,d,n", [(1, 1, 1), (3, 17, 16), (2, 37, 64), (1, 3, 256), (5, 67, 4), (2, 300, 8),
                                   (2, 600, 32), (1, 520, 24), (1, 1536, 16)])
def test_sizes(b, d, n):
    run_update(b=b, d=d, n=n, **ALL_ON)


@cuda_only
@pytest.mark.parametrize("b,d,n", [(64, 512, 16), (3, 1000, 16), (2, 130, 256), (128, 129, 4),
                                   (1, 4096, 16), (5, 257, 100)])
def test_sizes_gpu(b, d, n):
    run_update(b=b, d=d, n=n, **ALL_ON)


@pytest.mark.parametrize("opts", [ALL_ON, dict(D=False, z=False, dt_bias=False, softplus=False)],
                         ids=["all", "none"])
@pytest.mark.parametrize("kind", KINDS)
def test_dtypes(kind, opts):
    run_update(kind, b=2, d=17, n=16, g=1, grouped_B=True, **opts)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["numpy-float32", "numpy-float16", "torch-float32", "torch-bfloat16"])
def test_noncontiguous(kind, layout):
    """Non-contiguous inputs, the state included: it is updated through the view and
    the NaN-filled padding around it (layouts "strided", "offset") stays untouched."""
    if layout == "negative" and kind.startswith("torch"):
        pytest.skip("torch has no negative strides")
    _, x, _, _, _ = run_update(kind, layout, b=3, d=6, n=5, g=3, grouped_B=True, **ALL_ON)
    state = x["state"]
    assert not is_contiguous(state) and not is_contiguous(x["x"])
    if layout in ("strided", "offset"):
        base = state._base if is_torch(state) else state.base
        assert np.isnan(to_f64(base)).sum() == np.prod(base.shape) - np.prod(state.shape)


@cpu_only
def test_readonly_numpy_inputs():
    x = to_kind(update_inputs(b=2, d=5, n=4, **ALL_ON), "numpy-float32")
    for k, v in x.items():
        v.flags.writeable = k == "state"
    ref_out, ref_state = selective_state_update_ref(**x, dt_softplus=True)
    out = selective_state_update(**x, dt_softplus=True)
    assert_close(out, ref_out, "float32")
    assert_close(x["state"], ref_state, "float32", "state")


INDEX_CASES = {
    "identity": ([0, 1, 2], 3),
    "permuted": ([4, 0, 2], 5),
    "negative": ([2, -1, 0], 4),
    "negative-first": ([-1, 3, 1], 4),
    "all-negative": ([-1, -1, -5], 2),
}


@pytest.mark.parametrize("idx_dtype", ["int32", "int64"])
@pytest.mark.parametrize("case", list(INDEX_CASES))
@pytest.mark.parametrize("kind", ["numpy-float32", "torch-float32", "torch-bfloat16"])
def test_state_batch_indices(kind, case, idx_dtype):
    idx, cache = INDEX_CASES[case]
    out, x, state0, _, _ = run_update(kind, indices=(idx, idx_dtype), b=3, d=6, n=4, g=2,
                                      grouped_C=True, cache=cache, **ALL_ON)
    out64, s, s0 = to_f64(out), x["state"], state0
    for i, row in enumerate(idx):
        if row < 0:
            assert np.all(out64[i] == 0.0), f"skipped row {i} wrote {out64[i]}"
    for row in set(range(cache)) - {r for r in idx if r >= 0}:
        assert same_values(s[row], s0[row]), f"state row {row} not referenced but changed"
    for row in {r for r in idx if r >= 0}:
        assert not same_values(s[row], s0[row]), f"state row {row} not updated"


@pytest.mark.parametrize("grouped", [False, True], ids=["shared", "grouped"])
@pytest.mark.parametrize("kind", ["numpy-float32", "torch-float16", "torch-bfloat16"])
def test_steps_reproduce_scan(kind, grouped):
    """T decoding steps from initial_state give the scan's outputs and last_state."""
    T, layout = 24, "grouped" if grouped else "shared"
    x = to_kind(scan_inputs(b=2, d=6, l=T, n=8, g=3, B=layout, C=layout, D=True, z=True,
                            delta_bias=True, softplus=True, initial_state=True), kind)
    ref_out, ref_h = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    dtype = split_kind(kind)[1]

    scan_out, scan_h = selective_scan_fn(**x, delta_softplus=True, return_last_state=True)
    assert_close(scan_out, ref_out, dtype, "scan out")
    assert_close(scan_h, ref_h, "float32", "scan last_state")

    state = x["initial_state"].clone() if is_torch(x["u"]) else x["initial_state"].copy()
    outs = []
    for t in range(T):
        y = selective_state_update(state, x["u"][..., t], x["delta"][..., t], x["A"],
                                   x["B"][..., t], x["C"][..., t], D=x["D"], z=x["z"][..., t],
                                   dt_bias=x["delta_bias"], dt_softplus=True)
        assert_output(y, x["u"], (2, 6))
        outs.append(to_f64(y))
    assert_close(np.stack(outs, axis=-1), ref_out, dtype, "stepped out")
    assert_close(state, ref_h, "float32", "stepped state")



def test_issue_nan_channel_reproducer():
    """Issue 15 item 3, as reported: a NaN x in channel 0 (n = 2) made every channel's
    output NaN (the float32 copy's padding states carried Δ·x·0 = NaN to the next
    channel)."""
    import torch

    dev = "cuda" if on_cuda() else "cpu"
    state = torch.zeros(1, 4, 2, device=dev)
    x = torch.ones(1, 4, device=dev)
    x[0, 0] = float("nan")
    y = selective_state_update(state, x, torch.ones(1, 4, device=dev), -torch.ones(4, 2, device=dev),
                               torch.ones(1, 2, device=dev), torch.ones(1, 2, device=dev))
    sync()
    assert torch.isnan(y[0, 0]) and torch.isnan(state[0, 0]).all()
    assert not torch.isnan(y[0, 1:]).any() and not torch.isnan(state[0, 1:]).any()


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["x", "dt", "state"])
@pytest.mark.parametrize("n", [1, 2, 5, 12, 17, 33])
@pytest.mark.parametrize("kind", ["numpy-float32", "torch-float32", "torch-bfloat16"])
def test_bad_value_stays_in_its_channel(kind, n, where, value):
    """A NaN or ±inf in x / dt / the state of one (batch entry, channel), n not a
    multiple of the vector width: every other channel's output and state row equal
    the float64 reference (SPEC §1: channels are independent)."""
    x64 = update_inputs(seed=n, b=2, d=21, n=n, **ALL_ON)
    bi, c = 1, 3
    if where == "state":
        x64["state"][bi, c, n // 2] = value
    else:
        x64[where][bi, c] = value
    x = to_kind(x64, kind)
    ref_out, ref_state = selective_state_update_ref(**x, dt_softplus=True)
    out = selective_state_update(**x, dt_softplus=True)
    sync()
    keep = np.ones((2, 21), bool)
    keep[bi, c] = False
    o, s = to_f64(out), to_f64(x["state"])
    assert np.isfinite(o[keep]).all() and np.isfinite(s[keep]).all()
    assert rel_err(o[keep], ref_out[keep]) <= tol(split_kind(kind)[1])
    assert rel_err(s[keep], ref_state[keep]) <= tol("float32")
