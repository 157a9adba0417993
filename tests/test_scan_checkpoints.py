"""The CPU training forward's checkpoints (``_core.selective_scan_fwd_ck``) and the
backward from them (``_core.selective_scan_bwd(..., checkpoints=...)``).

The checkpoints are the states before every ``chunk`` steps, float32 (b, d,
ceil(l / chunk), n): checked against the float64 recurrence of SPEC §1. The
backward from them skips recomputing those states; it runs the same arithmetic
as the backward without them, so the gradients are compared bitwise (and
against the float64 reference in test_grad.py, which goes through this path).
Every test runs once per SIMD level.
"""

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mamba_attention._core")

from conftest import _core, scan_inputs  # noqa: E402
from reference import rel_err  # noqa: E402

from mamba_attention import _autograd  # noqa: E402

pytestmark = pytest.mark.usefixtures("simd_level")

LOW = {"u", "delta", "z", "B", "C"}
ORDER = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _inputs(dtype="float32", seed=0, **opts):
    x64 = scan_inputs(seed=seed, **opts)
    tdt = getattr(torch, dtype)
    return {k: torch.from_numpy(v).to(tdt if k in LOW else torch.float32) for k, v in x64.items()}


def _pos(x):
    """Positional arguments up to delta_bias (None for absent ones)."""
    return [x.get(k) for k in ORDER]


def ref_states(x, chunk, softplus=True):
    """float64 states before steps 0, chunk, 2·chunk, ...: (b, d, nchunks, n)."""
    x = {k: v.double() for k, v in x.items()}
    u, delta, A = x["u"], x["delta"], x["A"]
    b, d, length = u.shape
    dt = delta + x["delta_bias"][:, None] if "delta_bias" in x else delta
    if softplus:
        dt = torch.where(dt > 20, dt, torch.log1p(torch.exp(torch.clamp(dt, max=20.0))))

    def at(X, t):
        if X.dim() == 2:
            return X
        if X.dim() == 3:
            return X[:, None, :, t]
        return X[:, torch.arange(d) // (d // X.shape[1]), :, t]

    h = x.get("initial_state", u.new_zeros(b, d, A.shape[1]))
    out = []
    for t in range(length):
        if t % chunk == 0:
            out.append(h)
        dt_t = dt[:, :, t, None]
        h = torch.exp(dt_t * A) * h + dt_t * at(x["B"], t) * u[:, :, t, None]
    return torch.stack(out, dim=2)


SIZES = [(1, 3, 1, 4), (2, 5, 15, 4), (1, 16, 16, 16), (2, 20, 17, 16), (1, 37, 100, 8),
         (2, 24, 300, 5)]
# Rows of whole 64-byte lines (l % 16 == 0), full 16-channel blocks next to a
# partial one, tiles of 64 steps and a 32- or 16-step tail: the AVX-512
# training forward streams out with non-temporal stores there.
STREAM_SIZES = [(2, 40, 96, 16), (1, 32, 208, 16), (1, 16, 2048, 16)]


@pytest.mark.parametrize("b,d,l,n", SIZES + STREAM_SIZES)
@pytest.mark.parametrize("layout", ["const", "shared", "grouped"])
def test_forward_checkpoints(b, d, l, n, layout):
    g = 4 if layout == "grouped" and d % 4 == 0 else 1
    x = _inputs(b=b, d=d, l=l, n=n, g=g, B=layout, C=layout)
    out, last, ck = _core.selective_scan_fwd_ck(*_pos(x), True, x.get("initial_state"))
    chunk = _autograd._checkpoint_chunk(b, d, n, l)
    assert ck.dtype == torch.float32 and ck.shape == (b, d, -(-l // chunk), n)
    assert ck.is_contiguous()
    want_out, want_last = _core.selective_scan_fwd(*_pos(x), True, True,
                                                   x.get("initial_state"))
    # Same arithmetic as the forward without checkpoints: same bits.
    assert torch.equal(out, want_out) and torch.equal(last, want_last)
    assert rel_err(ck, ref_states(x, chunk).numpy()) <= 1e-5


@pytest.mark.parametrize("b,d,l,n", SIZES)
@pytest.mark.parametrize("bl,cl", list(itertools.product(["const", "shared", "grouped"],
                                                           repeat=2))[::2])
@pytest.mark.parametrize("init,dlast", [(True, True), (False, False), (True, False)])
def test_backward_from_checkpoints_is_bitwise_the_recompute(b, d, l, n, bl, cl, init, dlast):
    g = 4 if d % 4 == 0 else 1
    x = _inputs(seed=3, b=b, d=d, l=l, n=n, g=g, B=bl, C=cl, initial_state=init)
    rng = np.random.default_rng(7)
    dout = torch.from_numpy(rng.standard_normal((b, d, l)).astype(np.float32))
    dl = torch.from_numpy(rng.standard_normal((b, d, n)).astype(np.float32)) if dlast else None
    _, _, ck = _core.selective_scan_fwd_ck(*_pos(x), True, x.get("initial_state"))
    args = (*_pos(x), True, x.get("initial_state"), dout, dl)
    want = _core.selective_scan_bwd(*args)
    got = _core.selective_scan_bwd(*args, ck)
    for i, (w, o) in enumerate(zip(want, got)):
        assert (w is None) == (o is None), i
        if w is not None:
            assert torch.equal(w, o), f"gradient {i} differs"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_dtypes(dtype):
    x = _inputs(dtype, b=2, d=9, l=40, n=16, B="grouped", C="shared", g=3)
    dout = torch.randn(2, 9, 40).to(getattr(torch, dtype))
    _, _, ck = _core.selective_scan_fwd_ck(*_pos(x), True, x["initial_state"])
    assert ck.dtype == torch.float32
    args = (*_pos(x), True, x["initial_state"], dout, None)
    for w, o in zip(_core.selective_scan_bwd(*args), _core.selective_scan_bwd(*args, ck)):
        assert torch.equal(w, o)


def test_numpy_inputs():
    x = {k: v.astype(np.float32) for k, v in scan_inputs(b=1, d=6, l=33, n=4).items()}
    out, last, ck = _core.selective_scan_fwd_ck(*_pos(x), True, x["initial_state"])
    assert isinstance(ck, np.ndarray) and ck.shape == (1, 6, 3, 4) and ck.dtype == np.float32
    dout = np.random.default_rng(1).standard_normal((1, 6, 33)).astype(np.float32)
    args = (*_pos(x), True, x["initial_state"], dout, None)
    for w, o in zip(_core.selective_scan_bwd(*args), _core.selective_scan_bwd(*args, ck)):
        np.testing.assert_array_equal(w, o)


def test_poisoned_output_buffers_do_not_leak():
    # Lanes past a short last block and never-written memory must not reach the
    # gradients: run a big problem first (reused allocations), then a small one.
    big = _inputs(b=1, d=40, l=64, n=16)
    _core.selective_scan_fwd_ck(*_pos(big), True, big["initial_state"])
    x = _inputs(seed=5, b=1, d=3, l=5, n=3)
    _, _, ck = _core.selective_scan_fwd_ck(*_pos(x), True, x["initial_state"])
    dout = torch.randn(1, 3, 5)
    args = (*_pos(x), True, x["initial_state"], dout, None)
    for w, o in zip(_core.selective_scan_bwd(*args), _core.selective_scan_bwd(*args, ck)):
        assert torch.isfinite(o).all() and torch.equal(w, o)


def test_empty_checkpoints_mean_recompute():
    x = _inputs(b=1, d=4, l=20, n=4)
    dout = torch.randn(1, 4, 20)
    args = (*_pos(x), True, x["initial_state"], dout, None)
    for w, o in zip(_core.selective_scan_bwd(*args),
                    _core.selective_scan_bwd(*args, torch.empty(0))):
        assert torch.equal(w, o)


@pytest.mark.parametrize("bad,exc", [
    (lambda ck: ck[:, :, :1], ValueError),
    (lambda ck: ck[..., :2], ValueError),
    (lambda ck: ck.double(), TypeError),
    (lambda ck: ck.transpose(0, 1).contiguous().transpose(0, 1), ValueError),
    (lambda ck: ck.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2), ValueError),
    (lambda ck: "x", TypeError),
])
def test_bad_checkpoints(bad, exc):
    x = _inputs(b=2, d=4, l=40, n=4)
    _, _, ck = _core.selective_scan_fwd_ck(*_pos(x), True, x["initial_state"])
    dout = torch.randn(2, 4, 40)
    with pytest.raises(exc, match="checkpoints"):
        _core.selective_scan_bwd(*_pos(x), True, x["initial_state"], dout, None, bad(ck))


def test_autograd_passes_the_forward_checkpoints(monkeypatch):
    seen = []
    real = _core.selective_scan_bwd

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(_autograd._core, "selective_scan_bwd", spy)
    x = {k: v.requires_grad_() for k, v in _inputs(b=1, d=5, l=50, n=4).items()}
    out, last = _autograd.selective_scan(*_pos(x), True, True, x["initial_state"])
    ((out * out).sum() + last.sum()).backward()
    assert len(seen) == 1 and seen[0].shape == (1, 5, 4, 4)
    assert all(x[k].grad is not None for k in x)


@pytest.mark.parametrize("b,d,n,l,chunk", [(1, 1536, 16, 2048, 16), (2, 7, 3, 1, 16),
                                           (5, 8192, 16, 2048, 32), (8, 8192, 16, 8192, 64)])
def test_chunk_rule(b, d, n, l, chunk):
    # The fake (meta) implementation predicts the checkpoint shape in Python with
    # the kernel's rule (checked against the kernel's shapes above for small sizes):
    # 16 steps, doubled while the checkpoints pass 256 MB, at most 64.
    assert _autograd._checkpoint_chunk(b, d, n, l) == chunk
