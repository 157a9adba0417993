"""Return kind/dtype/device per input kind, autograd-tracked inputs, ml_dtypes bfloat16,
and the SIMD level controls."""

import numpy as np
import pytest

pytest.importorskip("mamba_attention._core")

from conftest import (KINDS, SIMD_LEVELS, _core, assert_close, assert_output, kind_of,  # noqa: E402
                      require, scan_inputs, selective_scan_fn, selective_scan_ref,
                      selective_state_update, selective_state_update_ref, split_kind, to_kind,
                      update_inputs)

ALL_ON = dict(D=True, z=True, delta_bias=True, softplus=True, initial_state=True)


@pytest.mark.parametrize("kind", KINDS)
def test_scan_return_kind(kind):
    x = to_kind(scan_inputs(b=2, d=3, l=6, n=4, **ALL_ON), kind)
    out = selective_scan_fn(**x, delta_softplus=True)
    framework, dtype = split_kind(kind)
    assert type(out).__module__.split(".")[0] == framework and kind_of(out) == kind
    out, h = selective_scan_fn(**x, delta_softplus=True, return_last_state=True)
    assert kind_of(out) == kind and kind_of(h) == f"{framework}-float32"
    if framework == "torch":
        assert out.device.type == "cpu" and h.device.type == "cpu"
    ref_out, ref_h = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    assert_close(out, ref_out, dtype)
    assert_close(h, ref_h, "float32", "last_state")


@pytest.mark.parametrize("kind", KINDS)
def test_state_update_return_kind(kind):
    x = to_kind(update_inputs(b=2, d=3, n=4, D=True, z=True, dt_bias=True, softplus=True), kind)
    ref_out, _ = selective_state_update_ref(**x, dt_softplus=True)
    out = selective_state_update(**x, dt_softplus=True)
    assert kind_of(out) == kind and kind_of(x["state"]) == split_kind(kind)[0] + "-float32"
    assert_close(out, ref_out, split_kind(kind)[1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_requires_grad_inputs(dtype):
    require(f"torch-{dtype}")
    x = to_kind(scan_inputs(b=2, d=3, l=8, n=4, B="grouped", C="const", g=3, **ALL_ON),
                f"torch-{dtype}")
    for v in x.values():
        v.requires_grad_(True)
    out, h = selective_scan_fn(**x, delta_softplus=True, return_last_state=True)
    ref_out, ref_h = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    assert_output(out, x["u"], ref_out.shape)
    assert_close(out, ref_out, dtype)
    assert_close(h, ref_h, "float32", "last_state")

    y = to_kind(update_inputs(b=2, d=3, n=4, D=True, z=True, dt_bias=True), f"torch-{dtype}")
    for k, v in y.items():
        if k != "state":
            v.requires_grad_(True)
    ref_out, ref_state = selective_state_update_ref(**y, dt_softplus=True)
    out = selective_state_update(**y, dt_softplus=True)
    assert_close(out, ref_out, dtype)
    assert_close(y["state"], ref_state, "float32", "state")


def test_torch_parameters_subclasses_and_outputs():
    """Inputs of type torch.nn.Parameter (read through torch's DLPack exchange API, like
    plain tensors), of a Tensor subclass (read through attributes) and views with a
    storage offset give the reference result; the output is a plain contiguous tensor
    of x's dtype, on x's device, that owns its memory."""
    torch = pytest.importorskip("torch")

    class Sub(torch.Tensor):
        pass

    y = to_kind(update_inputs(b=2, d=40, n=16, D=True, z=True, dt_bias=True), "torch-float32")
    ref_out, ref_state = selective_state_update_ref(**y, dt_softplus=True)
    wide = torch.full((2, 80), float("nan"))
    wide[:, 1::2] = y["x"]
    args = dict(y, A=torch.nn.Parameter(y["A"].clone()), D=torch.nn.Parameter(y["D"].clone()),
                dt_bias=y["dt_bias"].clone().as_subclass(Sub), x=wide[:, 1::2])
    with torch.no_grad():
        out = selective_state_update(**args, dt_softplus=True)
    assert type(out) is torch.Tensor and out.is_contiguous() and not out.requires_grad
    assert out.dtype == torch.float32 and out.device.type == "cpu" and out.shape == (2, 40)
    assert_close(out, ref_out, "float32")
    assert_close(y["state"], ref_state, "float32", "state")
    keep = out.clone()
    del args, y
    out.add_(0.0)  # the memory stays valid after the inputs are gone
    assert torch.equal(out, keep)


def test_torch_inference_mode_tensors():
    torch = pytest.importorskip("torch")
    with torch.inference_mode():
        x = to_kind(scan_inputs(b=2, d=3, l=8, n=4, **ALL_ON), "torch-bfloat16")
        out = selective_scan_fn(**x, delta_softplus=True)
        y = to_kind(update_inputs(b=2, d=3, n=4), "torch-bfloat16")
        ref_out, ref_state = selective_state_update_ref(**y, dt_softplus=True)
        out2 = selective_state_update(**y, dt_softplus=True)
    assert_close(out, selective_scan_ref(**x, delta_softplus=True), "bfloat16")
    assert_close(out2, ref_out, "bfloat16")
    assert_close(y["state"], ref_state, "float32", "state")


def test_ml_dtypes_bfloat16_round_trip():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = to_kind(scan_inputs(b=2, d=5, l=16, n=4, **ALL_ON), "numpy-bfloat16")
    assert x["u"].dtype == ml_dtypes.bfloat16
    out, h = selective_scan_fn(**x, delta_softplus=True, return_last_state=True)
    assert type(out) is np.ndarray and out.dtype == ml_dtypes.bfloat16 and out.shape == (2, 5, 16)
    assert type(h) is np.ndarray and h.dtype == np.float32
    ref_out, ref_h = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    assert_close(out.astype(np.float32), ref_out, "bfloat16")
    assert_close(h, ref_h, "float32", "last_state")
    # feeding the bfloat16 output back in as u works too
    x["u"] = out
    out2 = selective_scan_fn(**x, delta_softplus=True)
    assert_close(out2, selective_scan_ref(**x, delta_softplus=True), "bfloat16")


# ------------------------------------------------------------------------ SIMD control

def test_simd_level_forced(simd_level):
    assert _core.simd_level() == simd_level


def test_simd_levels_listed():
    levels = _core.simd_levels()
    assert "portable" in levels
    assert set(levels) <= {"portable", "avx2", "avx512"} and len(set(levels)) == len(levels)


def test_default_simd_level(monkeypatch):
    monkeypatch.delenv("MAMBA_ATTENTION_SIMD", raising=False)
    assert _core.simd_level() in SIMD_LEVELS


@pytest.mark.parametrize("level", ["avx2", "avx512"])
def test_unsupported_simd_level_raises(level, monkeypatch):
    if level in SIMD_LEVELS:
        pytest.skip(f"this CPU supports {level}")
    monkeypatch.setenv("MAMBA_ATTENTION_SIMD", level)
    x = to_kind(scan_inputs(), "numpy-float32")
    with pytest.raises(BaseException) as e:
        selective_scan_fn(**x)
    assert type(e.value) is RuntimeError


def test_unknown_simd_level_rejected(monkeypatch):
    monkeypatch.setenv("MAMBA_ATTENTION_SIMD", "sse9000")
    x = to_kind(scan_inputs(), "numpy-float32")
    with pytest.raises(BaseException) as e:
        selective_scan_fn(**x)
    assert type(e.value) in (ValueError, RuntimeError)
