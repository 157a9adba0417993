"""The cache of CPU output buffers (``tensor::alloc_reuse``): the scan's large
torch outputs (out, checkpoints, du, ddelta, dz of at least 1 MB) reuse the
buffers of outputs that were freed, instead of fresh memory that costs a page
fault per 4 KB on first write.

Checked here: a reused buffer gives the same results as a fresh one, a live
output is never handed out again, a freed one is (so the cache is in use),
every dtype and both the forward and the backward, and the outputs behave as
ordinary tensors.
"""

import gc

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mamba_attention._core")

from conftest import _core, scan_inputs  # noqa: E402

from mamba_attention import ops  # noqa: E402

pytestmark = pytest.mark.usefixtures("simd_level")

# b·d·l = 2·64·2048 = 262144 elements: 1 MB in float32, 0.5 MB in 16-bit types.
SHAPE = dict(b=2, d=64, l=2048, n=4)
LOW = {"u", "delta", "z", "B", "C"}


def _inputs(dtype, seed=0):
    x = scan_inputs(seed=seed, initial_state=False, **SHAPE)
    tdt = getattr(torch, dtype)
    return {k: torch.from_numpy(v).to(tdt if k in LOW else torch.float32) for k, v in x.items()}


def _fwd(x):
    return ops.selective_scan_fn(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"],
                                 delta_bias=x["delta_bias"], delta_softplus=True)


def test_live_output_not_reused_freed_one_is():
    x = _inputs("float32")
    first = _fwd(x)
    keep = first.clone()
    second = _fwd(_inputs("float32", seed=1))
    assert first.data_ptr() != second.data_ptr()
    assert torch.equal(first, keep)  # the second call did not write into the first output
    ptr = second.data_ptr()
    del second
    gc.collect()
    third = _fwd(x)
    assert third.data_ptr() == ptr  # the freed buffer came back
    assert torch.equal(third, keep)  # and gives the same result as a fresh one
    assert third.is_contiguous() and third.shape == x["u"].shape and third.dtype == torch.float32


def test_reused_output_is_an_ordinary_tensor():
    x = _inputs("float32")
    out = _fwd(x)
    assert out.device.type == "cpu" and not out.requires_grad
    y = out * 2 + 1  # arithmetic, views, numpy, pickling
    assert torch.equal(y[0, :3], out[0, :3] * 2 + 1)
    np.testing.assert_array_equal(out.numpy()[1, 5], out[1, 5].numpy())
    import io

    buf = io.BytesIO()
    torch.save(out, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), out)
    out.add_(1.0)  # in place
    out.resize_(2, 64, 16)  # shrinking is allowed
    assert out.shape == (2, 64, 16)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_backward_outputs_repeat(dtype):
    """Gradients through autograd twice (the second call reuses the first call's
    freed buffers): identical, and of the input's dtypes."""
    x = _inputs(dtype)
    go = torch.from_numpy(np.random.default_rng(3).standard_normal(x["u"].shape)).to(x["u"].dtype)

    def grads():
        leaves = {k: v.detach().requires_grad_() for k, v in x.items()}
        out = _fwd(leaves)
        gs = torch.autograd.grad(out, list(leaves.values()), go)
        return out.detach(), dict(zip(leaves, gs))

    out1, g1 = grads()
    big = ("u", "delta", "z")  # du, ddelta, dz: 1 MB in float32, like out
    ptrs = {out1.data_ptr()} | {g1[k].data_ptr() for k in big}
    ref = (out1.clone(), {k: v.clone() for k, v in g1.items()})
    del out1, g1
    gc.collect()
    out2, g2 = grads()
    assert torch.equal(out2, ref[0])
    for k, v in g2.items():
        assert v.dtype == x[k].dtype and v.shape == x[k].shape, k
        assert torch.equal(v, ref[1][k]), k
    if dtype == "float32":  # the second call got the first call's freed buffers
        assert {out2.data_ptr()} | {g2[k].data_ptr() for k in big} == ptrs


def test_checkpoints_from_cache_match_fresh():
    """The training forward's checkpoints (b·d·ceil(l/16)·n float32 = 1 MB at
    n = 16) are the same from a reused buffer."""
    x = scan_inputs(seed=4, b=2, d=64, l=2048, n=16, initial_state=False)
    t = {k: torch.from_numpy(v).float() for k, v in x.items()}
    args = (t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True, None)
    out1, last1, ck1 = _core.selective_scan_fwd_ck(*args)
    assert ck1.numel() * 4 >= 1 << 20
    ref = (out1.clone(), last1.clone(), ck1.clone())
    p = ck1.data_ptr()
    del out1, last1, ck1
    gc.collect()
    out2, last2, ck2 = _core.selective_scan_fwd_ck(*args)
    assert p in (out2.data_ptr(), ck2.data_ptr())
    for a, b in zip((out2, last2, ck2), ref):
        assert torch.equal(a, b)


def test_numpy_outputs_unchanged():
    """NumPy callers get numpy.empty outputs as before."""
    x = scan_inputs(seed=5, initial_state=False, **SHAPE)
    x = {k: v.astype(np.float32) for k, v in x.items()}
    out = _core.selective_scan_fwd(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                   x["delta_bias"], True)
    out = out[0] if isinstance(out, tuple) else out
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.flags.owndata
