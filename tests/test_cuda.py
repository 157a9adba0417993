"""CUDA-only checks of selective_scan_fn / selective_state_update (SPEC §1, CUDA contract).

The parity sweeps (options, layouts, sizes, dtypes, strides, indices) run on the GPU
through the ``target`` fixture of test_selective_scan.py / test_state_update.py; this
file covers what only a GPU has: devices, streams, asynchronous faults, determinism,
full-size shapes against the float32 PyTorch reference computed on the GPU, mixed-device
arguments, out-of-range cache indices and more than one GPU.

Every test is marked ``cuda`` and skipped without a usable GPU. Run them alone with
``pytest -m cuda`` (this file plus the "cuda" target of the parity tests).
"""

import math
import re

import numpy as np
import pytest

pytest.importorskip("mamba_attention._core")
torch = pytest.importorskip("torch")

from conftest import (assert_close, assert_output, cuda_only, rel_err, scan_inputs,  # noqa: E402
                      selective_scan_fn, selective_scan_ref, selective_state_update,
                      selective_state_update_ref, to_f64, to_kind, update_inputs)

# Every test runs once, on the "cuda" target (skipped here without a GPU), so the
# conftest helpers put torch inputs on the GPU and use the CUDA tolerances.
pytestmark = [pytest.mark.usefixtures("target"), cuda_only]

ALL_ON = dict(D=True, z=True, delta_bias=True, softplus=True, initial_state=True)
UPD_ON = dict(D=True, z=True, dt_bias=True, softplus=True)
DTYPES = ["float32", "float16", "bfloat16"]
NAN = float("nan")


def scan(x, **kw):
    return selective_scan_fn(**x, delta_softplus=True, return_last_state=True, **kw)


def update(x):
    return selective_state_update(**x, dt_softplus=True)


def launch(fn):
    """Run ``fn`` and wait for the GPU: an asynchronous fault (illegal address, launch
    failure) raises here, in the test that caused it, not in a later one."""
    res = fn()
    torch.cuda.synchronize()
    return res


def finite(t):
    return bool(torch.isfinite(t).all().item())


def poison(*like):
    """Fill caching-allocator blocks of the outputs' sizes with NaN and free them, so the
    library's output allocations (torch.empty on the current stream) most likely reuse
    them: an element the kernel forgets to write then reads as NaN. ``like``: (shape,
    dtype) pairs. Nothing is pre-filled for the library; it allocates its outputs."""
    bufs = [torch.full(shape, NAN, dtype=dt, device="cuda") for shape, dt in like]
    torch.cuda.synchronize()
    del bufs


def delay_current_stream(ms=50):
    """Keep the current stream busy for about ``ms`` milliseconds, so that work another
    stream would run meanwhile (a launch on the wrong stream) races visibly."""
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is not None:
        sleep(int(ms * 2e6))  # spins for that many clock cycles (H100: ≤ 2 GHz)
    else:
        a = torch.randn(4096, 4096, device="cuda")
        for _ in range(max(1, ms // 2)):
            a = torch.tanh(a @ a * 1e-2)


def to_device(x, device):
    return {k: v.to(device) for k, v in x.items()}


def named(name):
    """A regex matching ``name`` as a whole identifier in an error message."""
    return rf"(?<![A-Za-z0-9_]){name}(?![A-Za-z0-9_])"


def gpu_rel_err(ours, ref):
    """‖ours − ref‖ / ‖ref‖ computed on the GPU in float64 (for large outputs)."""
    ours, ref = ours.double(), ref.double()
    if not finite(ours):
        return math.inf
    return float((torch.linalg.vector_norm(ours - ref) / torch.linalg.vector_norm(ref)).item())


# ------------------------------------------------------------------ device and dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_outputs_on_input_device(dtype):
    x = to_kind(scan_inputs(b=2, d=5, l=33, n=8, g=5, B="grouped", C="shared", **ALL_ON),
                f"torch-{dtype}")
    out, h = launch(lambda: scan(x))
    assert out.device == x["u"].device and out.device.index == torch.cuda.current_device()
    assert h.device == x["u"].device
    assert out.dtype == x["u"].dtype and h.dtype == torch.float32
    assert out.is_contiguous() and h.is_contiguous()
    ref_out, ref_h = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    assert_close(out, ref_out, dtype)
    assert_close(h, ref_h, "float32", "last_state")

    y = to_kind(update_inputs(b=3, d=5, n=8, **UPD_ON), f"torch-{dtype}")
    ref_out, ref_state = selective_state_update_ref(**y, dt_softplus=True)
    o = launch(lambda: update(y))
    assert o.device == y["x"].device and o.dtype == y["x"].dtype
    assert y["state"].device == y["x"].device and y["state"].dtype == torch.float32
    assert_close(o, ref_out, dtype)
    assert_close(y["state"], ref_state, "float32", "state")


def test_float64_main_tensor():
    """float64 u is outside the CUDA contract (float32/float16/bfloat16): it must either
    raise TypeError naming the argument, or compute correctly; never a wrong answer."""
    x = to_kind(scan_inputs(b=2, d=4, l=16, n=4, **ALL_ON), "torch-float32")
    x["u"] = x["u"].double()
    try:
        out, h = launch(lambda: scan(x))
    except TypeError as e:
        assert re.search(named("u"), str(e)), str(e)
        return
    ref_out, ref_h = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    assert_close(out, ref_out, "float32")
    assert_close(h, ref_h, "float32", "last_state")


# ------------------------------------------------------------------ streams


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_scan_runs_on_current_stream(dtype):
    """Inputs are written on a non-default stream after a delay and the outputs consumed
    on it: only a kernel launched on torch.cuda.current_stream() sees the inputs and is
    finished before the consumer runs. The result equals a default-stream run bit for bit."""
    x = to_kind(scan_inputs(b=2, d=300, l=700, n=16, g=2, B="grouped", C="shared", **ALL_ON),
                f"torch-{dtype}")
    ref_out, ref_h = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    out0, h0 = launch(lambda: scan(x))

    default = torch.cuda.current_stream()
    s = torch.cuda.Stream()
    assert s != default
    stale = {k: torch.full_like(v, NAN) for k, v in x.items()}  # what a wrong stream would read
    s.wait_stream(default)
    with torch.cuda.stream(s):
        assert torch.cuda.current_stream() == s
        delay_current_stream()
        for k, v in x.items():
            stale[k].copy_(v)
        out, h = scan(stale)
        out_s, h_s = out.clone(), h.clone()  # consumed on s
    s.synchronize()
    assert torch.cuda.current_stream() == default
    torch.cuda.synchronize()
    assert_close(out_s, ref_out, dtype)
    assert_close(h_s, ref_h, "float32", "last_state")
    assert torch.equal(out_s, out0) and torch.equal(h_s, h0), "stream changed the result"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_state_update_runs_on_current_stream(dtype):
    y = to_kind(update_inputs(b=4, d=300, n=16, g=3, grouped_B=True, cache=6, **UPD_ON),
                f"torch-{dtype}")
    y["state_batch_indices"] = torch.tensor([5, 0, -1, 2], dtype=torch.int32, device="cuda")
    ref_out, ref_state = selective_state_update_ref(**y, dt_softplus=True)
    y0 = dict(y, state=y["state"].clone())
    out0 = launch(lambda: update(y0))

    default = torch.cuda.current_stream()
    s = torch.cuda.Stream()
    stale = {k: torch.full_like(v, NAN) if v.is_floating_point() else torch.full_like(v, 0)
             for k, v in y.items()}
    s.wait_stream(default)
    with torch.cuda.stream(s):
        delay_current_stream()
        for k, v in y.items():
            stale[k].copy_(v)
        out = update(stale)
        out_s, state_s = out.clone(), stale["state"].clone()
    s.synchronize()
    torch.cuda.synchronize()
    assert_close(out_s, ref_out, dtype)
    assert_close(state_s, ref_state, "float32", "state")
    assert torch.equal(out_s, out0) and torch.equal(state_s, y0["state"])


# ------------------------------------------------------------------ determinism


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic(dtype):
    x = to_kind(scan_inputs(b=3, d=260, l=1500, n=16, g=2, B="grouped", C="grouped", **ALL_ON),
                f"torch-{dtype}")
    out1, h1 = launch(lambda: scan(x))
    out2, h2 = launch(lambda: scan(x))
    assert out1.data_ptr() != out2.data_ptr()
    assert torch.equal(out1, out2) and torch.equal(h1, h2)

    y = to_kind(update_inputs(b=5, d=260, n=16, **UPD_ON), f"torch-{dtype}")
    state0 = y["state"].clone()
    o1 = launch(lambda: update(y))
    s1 = y["state"].clone()
    y["state"].copy_(state0)
    o2 = launch(lambda: update(y))
    assert torch.equal(o1, o2) and torch.equal(s1, y["state"])


# ------------------------------------------------------------------ full-size shapes


@pytest.fixture
def ieee_fp32():
    """The float32 PyTorch reference must not use TF32 in its einsums."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)


def test_large_scan_bf16(ieee_fp32):
    """BENCHMARKS.md G1's shape (b8 d2048 n16 l2048 bf16, z, D, delta_bias, softplus,
    B/C (b, 1, n, l)) against _torch_ref's float32 loop on the GPU, fed the same
    bf16-rounded values: out rel err ≤ 1e-2 (bf16 output rounding); last_state is
    float32 in both, so ≤ 1e-3 (only exp rounding and summation order differ)."""
    from mamba_attention._torch_ref import selective_scan_ref as torch_ref

    b, d, n, l = 8, 2048, 16, 2048
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g, device="cuda").to(dtype)

    x = dict(u=rnd(b, d, l), delta=(rnd(b, d, l, dtype=torch.float32) * 0.5 - 1.0).bfloat16(),
             A=-torch.arange(1, n + 1, device="cuda", dtype=torch.float32).repeat(d, 1),
             B=rnd(b, 1, n, l), C=rnd(b, 1, n, l), D=rnd(d, dtype=torch.float32),
             z=rnd(b, d, l),
             delta_bias=torch.rand(d, generator=g, device="cuda") * -3.0 - 1.0)
    poison(((b, d, l), torch.bfloat16), ((b, d, n), torch.float32))
    out, h = launch(lambda: selective_scan_fn(**x, delta_softplus=True, return_last_state=True))
    assert out.shape == (b, d, l) and out.dtype == torch.bfloat16 and out.device == x["u"].device
    assert finite(out) and finite(h)
    ref_out, ref_h = torch_ref(**{k: v.float() for k, v in x.items()}, delta_softplus=True,
                               return_last_state=True)
    torch.cuda.synchronize()
    e_out, e_h = gpu_rel_err(out, ref_out), gpu_rel_err(h, ref_h)
    assert e_out <= 1e-2, f"out rel err {e_out:.3e}"
    assert e_h <= 1e-3, f"last_state rel err {e_h:.3e}"


def test_large_state_update(ieee_fp32):
    """G5's shape (b64 d4096 n16, fp32 state, bf16 x) against _torch_ref on the GPU."""
    from mamba_attention._torch_ref import selective_state_update_ref as torch_ref

    b, d, n = 64, 4096, 16
    g = torch.Generator(device="cuda").manual_seed(1)

    def rnd(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g, device="cuda").to(dtype)

    y = dict(x=rnd(b, d), dt=(rnd(b, d, dtype=torch.float32) * 0.5 - 2.0).bfloat16(),
             A=-torch.exp(rnd(d, n, dtype=torch.float32)), B=rnd(b, n), C=rnd(b, n),
             D=rnd(d, dtype=torch.float32), z=rnd(b, d),
             dt_bias=torch.rand(d, generator=g, device="cuda") * -3.0 - 1.0)
    state = rnd(b, d, n, dtype=torch.float32)
    ref_state = state.clone()
    ref_out = torch_ref(ref_state, **{k: v.float() for k, v in y.items()}, dt_softplus=True)
    poison(((b, d), torch.bfloat16))
    out = launch(lambda: selective_state_update(state, **y, dt_softplus=True))
    assert out.dtype == torch.bfloat16 and out.device == state.device and finite(out)
    assert gpu_rel_err(out, ref_out) <= 1e-2
    assert gpu_rel_err(state, ref_state) <= 2e-5


# ------------------------------------------------------------------ mixed devices

SCAN_ARGS = ["delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]
UPDATE_ARGS = ["state", "dt", "A", "B", "C", "D", "z", "dt_bias", "state_batch_indices"]


@pytest.mark.parametrize("odd", ["cpu-in-cuda", "cuda-in-cpu"])
@pytest.mark.parametrize("arg", SCAN_ARGS)
def test_scan_mixed_devices(arg, odd):
    """One argument on the other device than u → ValueError naming it."""
    x = to_kind(scan_inputs(b=2, d=4, l=8, n=4, g=2, B="grouped", C="shared", **ALL_ON),
                "torch-float32")
    if odd == "cpu-in-cuda":
        x[arg] = x[arg].cpu()
    else:
        x = {k: (v if k == arg else v.cpu()) for k, v in x.items()}
    with pytest.raises(ValueError, match=named(arg)):
        launch(lambda: scan(x))


def test_scan_u_on_other_device():
    x = to_kind(scan_inputs(b=2, d=4, l=8, n=4, **ALL_ON), "torch-float32")
    x["u"] = x["u"].cpu()
    with pytest.raises(ValueError):
        launch(lambda: scan(x))


@pytest.mark.parametrize("odd", ["cpu-in-cuda", "cuda-in-cpu"])
@pytest.mark.parametrize("arg", UPDATE_ARGS)
def test_state_update_mixed_devices(arg, odd):
    y = to_kind(update_inputs(b=2, d=4, n=4, g=2, grouped_C=True, cache=3, **UPD_ON),
                "torch-float32")
    y["state_batch_indices"] = torch.tensor([2, 0], dtype=torch.int32, device="cuda")
    state0 = y["state"].clone()
    if odd == "cpu-in-cuda":
        y[arg] = y[arg].cpu()
    else:
        y = {k: (v if k == arg else v.cpu()) for k, v in y.items()}
    with pytest.raises(ValueError, match=named(arg)):
        launch(lambda: update(y))
    assert torch.equal(y["state"].cpu(), state0.cpu()), "a rejected call changed the state"


# ------------------------------------------------------------------ asynchronous faults, poison

POISON_SCAN = [  # (b, d, n, l, g, B, C, dtype)
    (1, 1, 1, 1, 1, "shared", "shared", "float32"),
    (2, 3, 16, 7, 1, "const", "const", "bfloat16"),
    (3, 130, 16, 129, 2, "grouped", "shared", "float16"),
    (2, 257, 4, 3000, 1, "shared", "grouped", "bfloat16"),
    (1, 64, 256, 300, 4, "grouped", "grouped", "float32"),
    (5, 1000, 16, 65, 8, "grouped", "const", "bfloat16"),
]


@pytest.mark.parametrize("last_state", [True, False], ids=["L", "noL"])
@pytest.mark.parametrize("b,d,n,l,g,bl,cl,dtype", POISON_SCAN)
def test_scan_no_nan_no_fault(b, d, n, l, g, bl, cl, dtype, last_state):
    """Valid inputs → every output element written (NaN-poisoned allocator blocks show
    any gap), no asynchronous fault at synchronize, and parity with the reference."""
    x = to_kind(scan_inputs(b=b, d=d, l=l, n=n, g=g, B=bl, C=cl, **ALL_ON), f"torch-{dtype}")
    poison(((b, d, l), x["u"].dtype), ((b, d, n), torch.float32))
    res = launch(lambda: selective_scan_fn(**x, delta_softplus=True, return_last_state=last_state))
    out, h = res if last_state else (res, None)
    assert finite(out), "NaN/inf in out"
    ref_out, ref_h = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    assert_close(out, ref_out, dtype)
    if last_state:
        assert finite(h), "NaN/inf in last_state"
        assert_close(h, ref_h, "float32", "last_state")


@pytest.mark.parametrize("idx", [None, [1, -1, 0, -7]], ids=["no-idx", "idx"])
@pytest.mark.parametrize("b,d,n,dtype", [(4, 1, 1, "float32"), (4, 130, 16, "bfloat16"),
                                         (4, 257, 256, "float16"), (4, 4096, 16, "bfloat16")])
def test_state_update_no_nan_no_fault(b, d, n, dtype, idx):
    """Skipped rows (negative index) must be written as 0, not left as allocator garbage."""
    y = to_kind(update_inputs(b=b, d=d, n=n, cache=4, **UPD_ON), f"torch-{dtype}")
    if idx is not None:
        y["state_batch_indices"] = torch.tensor(idx, dtype=torch.int64, device="cuda")
    ref_out, ref_state = selective_state_update_ref(**y, dt_softplus=True)
    poison(((b, d), y["x"].dtype))
    out = launch(lambda: update(y))
    assert finite(out) and finite(y["state"])
    assert_output(out, y["x"], (b, d))
    assert_close(out, ref_out, dtype)
    assert_close(y["state"], ref_state, "float32", "state")
    for i, row in enumerate(idx or []):
        if row < 0:
            assert bool((out[i] == 0).all()), f"skipped row {i} not zeroed"


# ------------------------------------------------------------------ out-of-range indices

OOR_CASES = {  # (indices, index dtype); cache = 4, b = 4
    "just-past-end": ([0, 4, 2, -1], "int32"),
    "far-int32": ([2**31 - 1, 1, 3, 0], "int32"),
    "far-int64": ([3, 2**40, -2, 2**62], "int64"),
}


@pytest.mark.parametrize("case", list(OOR_CASES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_state_batch_indices_out_of_range(case, dtype):
    """CUDA does not range-check state_batch_indices on the host (that would cost a
    device→host copy): an index ≥ the cache size gives NaN output for that row, touches
    no state row and faults nothing; negative still skips and writes 0; the other rows
    are exact."""
    idx, idx_dtype = OOR_CASES[case]
    cache = 4
    y = to_kind(update_inputs(b=4, d=130, n=16, g=2, grouped_B=True, cache=cache, **UPD_ON),
                f"torch-{dtype}")
    y["state_batch_indices"] = torch.tensor(idx, dtype=getattr(torch, idx_dtype), device="cuda")
    state0 = y["state"].clone()
    valid = [r if 0 <= r < cache else -1 for r in idx]
    ref_out, ref_state = selective_state_update_ref(
        **dict(y, state_batch_indices=np.array(valid)), dt_softplus=True)
    out = launch(lambda: update(y))
    for i, r in enumerate(idx):
        if r >= cache:
            assert bool(torch.isnan(out[i]).all()), f"row {i} (index {r} ≥ {cache}) not NaN"
        elif r < 0:
            assert bool((out[i] == 0).all()), f"row {i} (index {r}) not 0"
        else:
            assert_close(out[i], ref_out[i], dtype, f"out row {i}")
    for r in range(cache):
        if r in valid:
            assert_close(y["state"][r], ref_state[r], "float32", f"state row {r}")
        else:
            assert torch.equal(y["state"][r], state0[r]), f"state row {r} changed"


# ------------------------------------------------------------------ several GPUs

multi_gpu = pytest.mark.skipif(torch.cuda.device_count() < 2,
                               reason="needs 2 GPUs (torch.cuda.device_count() < 2)")


@multi_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_second_gpu(dtype):
    """Inputs on cuda:1 while cuda:0 is current → launched on cuda:1 (its current
    stream), outputs on cuda:1; and inputs on cuda:0 inside ``torch.cuda.device(1)``."""
    assert torch.cuda.current_device() == 0
    dev1 = torch.device("cuda", 1)
    x = to_device(to_kind(scan_inputs(b=2, d=300, l=200, n=16, g=3, B="grouped", C="shared",
                                      **ALL_ON), f"torch-{dtype}"), dev1)
    ref_out, ref_h = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    out, h = scan(x)
    torch.cuda.synchronize(dev1)
    assert out.device == dev1 and h.device == dev1
    assert torch.cuda.current_device() == 0
    assert_close(out, ref_out, dtype)
    assert_close(h, ref_h, "float32", "last_state")

    # The current stream of cuda:1 is a non-default one: the launch must use it.
    s1 = torch.cuda.Stream(device=dev1)
    stale = {k: torch.full_like(v, NAN) for k, v in x.items()}
    s1.wait_stream(torch.cuda.current_stream(dev1))
    with torch.cuda.device(dev1), torch.cuda.stream(s1):
        delay_current_stream()
        for k, v in x.items():
            stale[k].copy_(v)
        o, hh = scan(stale)
        o, hh = o.clone(), hh.clone()
    s1.synchronize()
    assert torch.equal(o, out) and torch.equal(hh, h)

    x0 = to_device(x, "cuda:0")
    with torch.cuda.device(1):
        out0, h0 = scan(x0)
    torch.cuda.synchronize(0)
    assert out0.device == torch.device("cuda", 0) and h0.device == torch.device("cuda", 0)
    assert torch.equal(out0.cpu(), out.cpu()) and torch.equal(h0.cpu(), h.cpu())

    y = to_device(to_kind(update_inputs(b=3, d=300, n=16, **UPD_ON), f"torch-{dtype}"), dev1)
    y["state_batch_indices"] = torch.tensor([2, -1, 0], dtype=torch.int32, device=dev1)
    ref_o, ref_s = selective_state_update_ref(**y, dt_softplus=True)
    o = update(y)
    torch.cuda.synchronize(dev1)
    assert o.device == dev1 and y["state"].device == dev1
    assert_close(o, ref_o, dtype)
    assert_close(y["state"], ref_s, "float32", "state")


@multi_gpu
@pytest.mark.parametrize("arg", ["delta", "A", "B", "initial_state"])
def test_two_gpus_mixed(arg):
    x = to_kind(scan_inputs(b=2, d=4, l=8, n=4, **ALL_ON), "torch-float32")
    x[arg] = x[arg].to("cuda:1")
    with pytest.raises(ValueError, match=named(arg)):
        launch(lambda: scan(x))
    y = to_kind(update_inputs(b=2, d=4, n=4, **UPD_ON), "torch-float32")
    y["state"] = y["state"].to("cuda:1")
    with pytest.raises(ValueError, match=named("state")):
        launch(lambda: update(y))


def test_reference_helpers_see_gpu_tensors():
    """Sanity check of the harness itself: the float64 reference reads CUDA tensors."""
    x = to_kind(scan_inputs(b=1, d=2, l=5, n=3, **ALL_ON), "torch-float32")
    assert x["u"].is_cuda
    assert rel_err(x["u"], to_f64(x["u"].cpu())) == 0.0
