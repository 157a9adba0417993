"""CUDA checks of the vectorised decode step (selective_state_update_vec* kernels) and
the causal conv1d forward causal_conv1d_fwd3 (the kernels the host picks for the usual
contiguous layouts), against float64 references: b1 / b64, odd d, every n the vec
kernels take (4..128) and one they do not (12), grouped B/C, state_batch_indices,
every dtype; conv: l at and around the 1024-step warp chunk, w 2..4, every dtype.
Marked ``cuda`` (skipped without a GPU)."""

import pytest

pytest.importorskip("mamba_attention._core")
torch = pytest.importorskip("torch")

from conftest import (assert_close, assert_output, cuda_only, selective_state_update,  # noqa: E402
                      selective_state_update_ref, to_kind, update_inputs)
from test_conv1d import run_conv  # noqa: E402

pytestmark = [pytest.mark.usefixtures("target"), cuda_only]
UPD_ON = dict(D=True, z=True, dt_bias=True, softplus=True)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("n", [4, 8, 12, 16, 32, 64, 128])
@pytest.mark.parametrize("b", [1, 3, 64])
def test_state_update_vec(b, n, dtype):
    y = to_kind(update_inputs(seed=b * 1000 + n, b=b, d=203, n=n, **UPD_ON), f"torch-{dtype}")
    ref_out, ref_state = selective_state_update_ref(**y, dt_softplus=True)
    out = selective_state_update(**y, dt_softplus=True)
    torch.cuda.synchronize()
    assert_output(out, y["x"], (b, 203))
    assert_close(out, ref_out, dtype)
    assert_close(y["state"], ref_state, "float32", "state")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("b", [2, 32])
def test_state_update_vec_grouped_indices(b, dtype):
    y = to_kind(update_inputs(seed=7, b=b, d=203, n=16, g=7, grouped_B=True, grouped_C=True,
                              cache=b + 3, **UPD_ON), f"torch-{dtype}")
    idx = list(range(b + 2, 1, -1))[:b]
    idx[1] = -1
    y["state_batch_indices"] = torch.tensor(idx, dtype=torch.int32, device="cuda")
    before = y["state"].clone()
    ref_out, ref_state = selective_state_update_ref(**y, dt_softplus=True)
    out = selective_state_update(**y, dt_softplus=True)
    torch.cuda.synchronize()
    assert_close(out, ref_out, dtype)
    assert bool((out[1] == 0).all())
    assert_close(y["state"], ref_state, "float32", "state")
    untouched = [r for r in range(b + 3) if r not in idx]
    assert torch.equal(y["state"][untouched], before[untouched])


def test_state_update_vec_no_options():
    y = to_kind(update_inputs(seed=3, b=64, d=64, n=16, D=False, z=False, dt_bias=False, softplus=False),
                "torch-float32")
    ref_out, ref_state = selective_state_update_ref(**y)
    out = selective_state_update(**y)
    assert_close(out, ref_out, "float32")
    assert_close(y["state"], ref_state, "float32", "state")


@pytest.mark.parametrize("kind", ["torch-float32", "torch-float16", "torch-bfloat16"])
@pytest.mark.parametrize("l", [8, 248, 1016, 1024, 1032, 2048, 4104])
@pytest.mark.parametrize("w", [2, 3, 4])
def test_conv_fwd3(kind, l, w):
    run_conv(kind, w=w, l=l, b=2, d=5, init=False)


@pytest.mark.parametrize("activation", [None, "silu"])
def test_conv_fwd3_options(activation):
    run_conv("torch-bfloat16", activation=activation, final=True, bias=False, init=False, w=4, l=2048, b=3, d=7)
