"""selective_scan_fn against the float64 reference (SPEC §1).

Parametrisation: the full product of the six options at one small size (with
the B/C layout pair cycling through all nine), then one-axis sweeps over B/C
layouts, l, n, d, groups and kinds/dtypes, plus memory layouts and special
cases. Every test runs once per SIMD level of this CPU and once on the CUDA
backend (the ``target`` fixture; "cuda" is skipped without a GPU): on "cuda" the
torch inputs live on the GPU, NumPy kinds are skipped and the float64 reference
runs on the CPU. ``cpu_only`` / ``cuda_only`` restrict a test to one side; the
``*_gpu`` tests add shapes that matter for the CUDA kernel's launch geometry
(128 channels per block, long sequences) without changing the CPU runs.
"""

import itertools

import numpy as np
import pytest

pytest.importorskip("mamba_attention._core")

from conftest import (KINDS, LAYOUTS, assert_close, assert_output, clone, convert,  # noqa: E402
                      cpu_only, cuda_only, default_kind, is_contiguous, is_torch, require,
                      run_scan, same_values, scan_inputs, selective_scan_fn, selective_scan_ref,
                      shares_memory, split_kind, sync, to_f64, to_kind)
from reference import scalar_scan_ref, silu, softplus  # noqa: E402

pytestmark = pytest.mark.usefixtures("target")

ALL_ON = dict(D=True, z=True, delta_bias=True, softplus=True, initial_state=True)
BC_PAIRS = list(itertools.product(["const", "shared", "grouped"], repeat=2))
OPTION_NAMES = ("D", "z", "delta_bias", "softplus", "last_state", "initial_state")
OPTION_CASES = [
    pytest.param(dict(zip(OPTION_NAMES, vals)), *BC_PAIRS[i % len(BC_PAIRS)],
                 id="-".join(["".join("DZbsLi"[j] if v else "_" for j, v in enumerate(vals)),
                              *BC_PAIRS[i % len(BC_PAIRS)]]))
    for i, vals in enumerate(itertools.product([False, True], repeat=6))
]


@pytest.mark.parametrize("opts,bl,cl", OPTION_CASES)
def test_options(opts, bl, cl):
    opts = dict(opts)
    run_scan(b=2, d=6, l=9, n=4, g=3, B=bl, C=cl, last_state=opts.pop("last_state"), **opts)


@pytest.mark.parametrize("bl,cl", BC_PAIRS, ids=["-".join(p) for p in BC_PAIRS])
@pytest.mark.parametrize("kind", ["numpy-float32", "torch-bfloat16"])
def test_bc_layouts(bl, cl, kind):
    run_scan(kind, b=3, d=10, l=40, n=8, g=2, B=bl, C=cl, **ALL_ON)


@pytest.mark.parametrize("bc", [("shared", "shared"), ("const", "grouped")], ids="-".join)
@pytest.mark.parametrize("l", [1, 2, 7, 63, 64, 65, 129, 1000, 5000])
def test_seqlen(l, bc):
    run_scan(b=2, d=6, l=l, n=16, g=2, B=bc[0], C=bc[1], **ALL_ON)


@cuda_only
@pytest.mark.parametrize("l", [255, 256, 257, 2047, 2048, 2049, 8193])
def test_seqlen_gpu(l):
    """Sequence lengths around the powers of two a GPU kernel tiles time by."""
    run_scan(b=2, d=6, l=l, n=16, g=2, B="shared", C="grouped", **ALL_ON)


@pytest.mark.parametrize("n,l", [(1, 100), (4, 100), (16, 100), (64, 100), (256, 33)])
def test_dstate(n, l):
    run_scan(b=2, d=3, l=l, n=n, B="shared", C="grouped", g=3, **ALL_ON)


@cuda_only
@pytest.mark.parametrize("n", [2, 3, 8, 17, 32, 100, 128, 255])
def test_dstate_gpu(n):
    run_scan(b=2, d=5, l=70, n=n, B="grouped", C="shared", g=5, **ALL_ON)


@pytest.mark.parametrize("d", [1, 3, 17, 37, 67])
def test_channels(d):
    run_scan(b=2, d=d, l=50, n=16, B="shared", C="const", **ALL_ON)


@cuda_only
@pytest.mark.parametrize("d", [127, 128, 129, 255, 257, 1000])
def test_channels_gpu(d):
    """One thread block per 128 channels: full, partial and several blocks."""
    run_scan(b=3, d=d, l=40, n=16, B="shared", C="const", **ALL_ON)


@pytest.mark.parametrize("bc", [("grouped", "grouped"), ("grouped", "shared")], ids="-".join)
@pytest.mark.parametrize("d,g", [(4, 1), (4, 2), (8, 4), (36, 3), (34, 2), (48, 4), (64, 2), (5, 5)])
def test_groups(d, g, bc):
    run_scan(b=2, d=d, l=20, n=8, g=g, B=bc[0], C=bc[1], **ALL_ON)


@cuda_only
@pytest.mark.parametrize("bc", [("grouped", "grouped"), ("grouped", "const")], ids="-".join)
@pytest.mark.parametrize("d,g", [(256, 2), (384, 3), (400, 2), (768, 4), (260, 2), (1000, 8)])
def test_groups_gpu(d, g, bc):
    """Channels per group a multiple of 128 (128), of 16 but not 128 (192), of neither
    (200, 130, 125): group boundaries inside and across 128-channel blocks."""
    run_scan(b=2, d=d, l=20, n=8, g=g, B=bc[0], C=bc[1], **ALL_ON)


@pytest.mark.parametrize("opts", [ALL_ON, dict(D=False, z=False, delta_bias=False, softplus=False,
                                               initial_state=False)], ids=["all", "none"])
@pytest.mark.parametrize("kind", KINDS)
def test_dtypes(kind, opts):
    run_scan(kind, b=2, d=17, l=64, n=16, g=1, B="grouped", C="shared", **opts)


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_float32_params_with_other_dtypes(framework):
    """A, D, delta_bias, B, C, initial_state may each have any supported float dtype."""
    dts = {"A": "float64", "D": "float16", "delta_bias": "bfloat16", "B": "float16",
           "C": "float64", "initial_state": "bfloat16"}
    x64 = scan_inputs(b=2, d=7, l=30, n=8, B="shared", C="const", **ALL_ON)
    x = to_kind(x64, f"{framework}-float32")
    x.update({k: convert(x64[k], f"{framework}-{dt}") for k, dt in dts.items()})
    out, h = selective_scan_fn(**x, delta_softplus=True, return_last_state=True)
    ref_out, ref_h = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    assert_output(out, x["u"], ref_out.shape)
    assert_close(out, ref_out, "float32")
    assert_close(h, ref_h, "float32", "last_state")


@pytest.mark.parametrize("bc", [("grouped", "shared"), ("const", "grouped")], ids="-".join)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["numpy-float32", "numpy-float16", "torch-float32", "torch-bfloat16"])
def test_noncontiguous(kind, layout, bc):
    if layout == "negative" and kind.startswith("torch"):
        pytest.skip("torch has no negative strides")
    _, _, x, _, _ = run_scan(kind, layout, b=2, d=6, l=13, n=5, g=2, B=bc[0], C=bc[1], **ALL_ON)
    assert not is_contiguous(x["u"]) and not is_contiguous(x["B"])


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_broadcast_stride0_inputs(framework):
    """Expanded views (stride 0), e.g. np.broadcast_to / Tensor.expand, read correctly."""
    require(f"{framework}-float32")
    x = to_kind(scan_inputs(b=3, d=5, l=11, n=4, B="const", C="shared", **ALL_ON),
                f"{framework}-float32")
    axes = {"u": 1, "delta": 0, "z": 2, "A": 0, "B": 0, "C": 0, "D": 0, "delta_bias": 0,
            "initial_state": 1}
    for k, ax in axes.items():
        v = x[k]
        if is_torch(v):
            x[k] = v.narrow(ax, 0, 1).expand(v.shape)
        else:
            x[k] = np.broadcast_to(v.take([0], axis=ax), v.shape)
    out, h = selective_scan_fn(**x, delta_softplus=True, return_last_state=True)
    ref_out, ref_h = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    assert_output(out, x["u"], ref_out.shape)
    assert_close(out, ref_out, "float32")
    assert_close(h, ref_h, "float32", "last_state")


@cpu_only
def test_readonly_numpy_inputs():
    x = to_kind(scan_inputs(b=2, d=5, l=12, n=4, B="grouped", C="const", **ALL_ON), "numpy-float32")
    for v in x.values():
        v.flags.writeable = False
    out, h = selective_scan_fn(**x, delta_softplus=True, return_last_state=True)
    ref_out, ref_h = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    assert_close(out, ref_out, "float32")
    assert_close(h, ref_h, "float32", "last_state")
    out[...] = 0.0  # the result itself is an ordinary writable array
    h[...] = 0.0


@pytest.mark.parametrize("kind", ["numpy-float32", "torch-float32", "torch-bfloat16"])
def test_outputs_not_aliased(kind):
    out, h, x, ref_out, _ = run_scan(kind, b=2, d=4, l=8, n=4, **ALL_ON)
    for v in list(x.values()) + [h]:
        assert not shares_memory(out, v)
    for v in x.values():
        assert not shares_memory(h, v)
    before = {k: clone(v) for k, v in x.items()}
    out2, h2 = selective_scan_fn(**x, delta_softplus=True, return_last_state=True)
    assert not shares_memory(out, out2) and not shares_memory(h, h2)
    assert same_values(out, out2) and same_values(h, h2)  # deterministic
    out[...] = 0
    h[...] = 0
    assert all(same_values(x[k], before[k]) for k in x)
    assert not same_values(out, out2)


@pytest.mark.parametrize("split", [1, 17, 63])
@pytest.mark.parametrize("kind", ["numpy-float32", "torch-bfloat16"])
def test_initial_state_chaining(kind, split):
    """Scanning [0:l1] then [l1:] from the first part's last_state equals the whole scan."""
    x = to_kind(scan_inputs(b=2, d=6, l=64, n=8, g=2, B="shared", C="grouped", **ALL_ON), kind)
    ref_out, ref_h = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)

    def part(sl, init):
        y = {k: (v[..., sl] if k in ("u", "delta", "z", "B", "C") else v) for k, v in x.items()}
        y["initial_state"] = init
        return selective_scan_fn(**y, delta_softplus=True, return_last_state=True)

    out1, h1 = part(slice(0, split), x["initial_state"])
    assert_output(h1, x["u"], (2, 6, 8), dtype="float32")
    out2, h2 = part(slice(split, None), h1)
    dtype = split_kind(kind)[1]
    assert_close(out1, ref_out[..., :split], dtype, "first part")
    assert_close(out2, ref_out[..., split:], dtype, "second part")
    assert_close(h2, ref_h, "float32", "last_state")


@cuda_only
@pytest.mark.parametrize("split", [1, 17, 63])
@pytest.mark.parametrize("kind", ["torch-float32", "torch-float16"])
def test_initial_state_chaining_gpu(kind, split):
    test_initial_state_chaining(kind, split)


def test_long_sequence_stable():
    out, h, *_ = run_scan(b=1, d=2, l=20000, n=4, B="shared", C="const", **ALL_ON)
    assert np.isfinite(to_f64(out)).all() and np.isfinite(to_f64(h)).all()


@pytest.mark.parametrize("b,d,n,l,g,bc", [
    (1, 2, 256, 20000, 1, ("shared", "shared")),
    (4, 4, 256, 1500, 4, ("grouped", "grouped")),
    (4, 8, 256, 1100, 2, ("const", "grouped")),
], ids=["l20000-shared", "l1500-grouped", "l1100-const-grouped"])
def test_many_time_chunks(b, d, n, l, g, bc):
    """Large b·g·n with long l: the kernel processes time in several outer chunks
    (it bounds its transposed B/C buffers to ~32 MB), so state must carry across them."""
    run_scan(b=b, d=d, n=n, l=l, g=g, B=bc[0], C=bc[1], **ALL_ON)


@pytest.mark.parametrize("bc", [("grouped", "shared"), ("const", "const")], ids="-".join)
def test_large_problem(bc):
    """Many channel blocks and batches, so the parallel split and channel tails are exercised."""
    run_scan(b=3, d=165, l=300, n=16, g=5, B=bc[0], C=bc[1], **ALL_ON)


def test_very_long_sequence():
    """SPEC: l up to 2**20 must work; b = d = n = 1 so a scalar float64 loop can check it."""
    l = 2**20 + 3
    x64 = scan_inputs(seed=3, b=1, d=1, l=l, n=1, B="shared", C="shared", **ALL_ON)
    x = to_kind(x64, default_kind())
    out, h = selective_scan_fn(**x, delta_softplus=True, return_last_state=True)
    sync()
    r = {k: to_f64(v) for k, v in x.items()}
    dt = softplus(r["delta"][0, 0] + r["delta_bias"][0])
    y, h_l = scalar_scan_ref(r["u"][0, 0], dt, r["A"][0, 0], r["B"][0, 0], r["C"][0, 0],
                             r["initial_state"][0, 0, 0])
    y = (y + r["D"][0] * r["u"][0, 0]) * silu(r["z"][0, 0])
    assert_output(out, x["u"], (1, 1, l))
    assert_close(out[0, 0], y, "float32")
    assert_close(h[0, 0, 0], np.array(h_l), "float32", "last_state")


@pytest.mark.parametrize("n,bc", [(16, ("shared", "shared")), (64, ("grouped", "const"))],
                         ids=["n16", "n64-grouped"])
def test_small_delta_long_memory(n, bc):
    """Tiny Δ (long memory): decays exp(Δ·A) just below 1 compound over thousands
    of steps, so any error in exp of small negative arguments shows. This caught an
    AVX-512 exp2 that reduced with x − floor(x) (rel err 1.2e-5 at l = 3000)."""
    x = scan_inputs(seed=11, b=1, d=32, l=3000, n=n, g=2, B=bc[0], C=bc[1], D=False, z=False,
                    delta_bias=False, softplus=False, initial_state=True)
    x["delta"] = np.random.default_rng(12).uniform(1e-4, 1e-3, x["delta"].shape)
    x = to_kind(x, default_kind())
    out, h = selective_scan_fn(**x, delta_softplus=False, return_last_state=True)
    sync()
    ref_out, ref_h = selective_scan_ref(**x, delta_softplus=False, return_last_state=True)
    assert_close(out, ref_out, "float32")
    assert_close(h, ref_h, "float32", "last_state")


@pytest.mark.parametrize("softplus", [True, False])
def test_large_delta(softplus):
    """Δ > 20 bypasses log1p(exp(·)) (which would overflow for large Δ)."""
    x = scan_inputs(b=2, d=4, l=40, n=4, **{**ALL_ON, "softplus": softplus})
    rng = np.random.default_rng(5)
    big = rng.uniform(20.0, 120.0, x["delta"].shape)
    big[0, 0, :6] = [19.9, 20.0, 20.1, 88.0, 89.0, 1000.0]
    x["delta"] = np.where(rng.random(big.shape) < 0.5, big, x["delta"])
    if softplus:
        x["delta"][1, 1, :3] = [-100.0, -30.0, -20.5]
    x = to_kind(x, default_kind())
    out, h = selective_scan_fn(**x, delta_softplus=softplus, return_last_state=True)
    sync()
    ref_out, ref_h = selective_scan_ref(**x, delta_softplus=softplus, return_last_state=True)
    assert np.isfinite(to_f64(out)).all() and np.isfinite(to_f64(h)).all()
    assert_close(out, ref_out, "float32")
    assert_close(h, ref_h, "float32", "last_state")


def test_zero_initial_state_equals_none():
    kind = default_kind()
    x = to_kind(scan_inputs(b=2, d=5, l=10, n=4, initial_state=False), kind)
    zeros = convert(np.zeros((2, 5, 4)), split_kind(kind)[0] + "-float32")
    a = selective_scan_fn(**x, delta_softplus=True)
    b = selective_scan_fn(**x, delta_softplus=True, initial_state=zeros)
    sync()
    np.testing.assert_allclose(to_f64(a), to_f64(b), rtol=1e-6, atol=1e-7)
