"""The CUDA training forward's checkpoints and the backward from them.

``_core.selective_scan_fwd_ck`` on CUDA saves the state before every 32nd step,
float32 (b, d, ceil(l / 32), n) (``selective_scan_fwd_ck_*`` in
kernels/selective_scan_fwd.cu), where the backward's fast kernel runs (n <= 16,
time-varying B and C, groups of whole 32-channel blocks); elsewhere it returns an
empty tensor. ``_core.selective_scan_bwd(..., checkpoints=ck)`` then skips its
pre-pass. The states are the forward's own registers, computed with the same
arithmetic as the backward's pre-pass (for f16/bf16 u the backward uses the
forward's MUFU softplus), so:

* the checkpoints equal the backward's recomputation bit for bit, hence
* du, ddelta, dz, dinitial_state from the checkpoint path equal the recompute
  path's bit for bit, and so do dA, dB, dC, dD, ddelta_bias where at most two
  atomic adds meet in one element (b <= 2, <= 64 channels per B and C group: 0 + x + y
  is the same in either order); with more blocks the atomics' order varies from
  run to run and those are compared to float32 rounding (rel. 1e-6);
* the checkpoints match the float64 recurrence of SPEC §1; the gradients through
  autograd (which passes the checkpoints) match the float64 reference of
  test_grad.py.

Every test is marked ``cuda`` and skipped without a usable GPU.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mamba_attention._core")

from conftest import _core, cuda_only, scan_inputs  # noqa: E402
from reference import TOL, rel_err  # noqa: E402
from test_cuda_grad import check_grads  # noqa: E402
from test_grad import ALL_ON  # noqa: E402
from test_scan_checkpoints import ref_states  # noqa: E402

from mamba_attention import _autograd  # noqa: E402

pytestmark = [pytest.mark.usefixtures("target"), cuda_only]

LOW = {"u", "delta", "z", "B", "C"}
ORDER = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
CK = 32


def _inputs(dtype="float32", seed=0, **opts):
    x64 = scan_inputs(seed=seed, **opts)
    tdt = getattr(torch, dtype)
    return {k: torch.from_numpy(v).to(tdt if k in LOW else torch.float32).cuda()
            for k, v in x64.items()}


def _pos(x):
    return [x.get(k) for k in ORDER]


def _bwd_args(x, seed=7, dlast=True, softplus=True):
    b, d, length = x["u"].shape
    n = x["A"].shape[1]
    g = torch.Generator().manual_seed(seed)
    dev = x["u"].device
    dout = torch.randn(b, d, length, generator=g).to(x["u"].dtype).to(dev)
    dl = torch.randn(b, d, n, generator=g).to(dev) if dlast else None
    return (*_pos(x), softplus, x.get("initial_state"), dout, dl)


def _compare(want, got, exact_all):
    # du, ddelta, dz, dinit: written, never accumulated; the rest by atomics
    for i, (w, o) in enumerate(zip(want, got)):
        assert (w is None) == (o is None), i
        if w is None:
            continue
        assert torch.isfinite(o).all(), f"gradient {i} not finite"
        if exact_all or i in (0, 1, 6, 8):
            assert torch.equal(w, o), f"gradient {i} differs"
        else:
            assert rel_err(o.cpu(), w.cpu()) <= 1e-6, f"gradient {i}"


# (b, d, l, n, g, B, C): odd l, l below / at / above one chunk and not a multiple of
# 32 or 8, n < 16, g = 1 / groups of 32 and 64 channels; d = 33, 40: partial blocks.
# d = 96, g = 3 (32 channels per group) runs the forward's general kernel (its fast
# kernel takes groups of 64); the others its fast kernel.
SIZES = [
    (2, 33, 1, 16, 1, "shared", "grouped"),
    (2, 33, 5, 16, 1, "grouped", "shared"),
    (1, 40, 31, 7, 1, "grouped", "grouped"),
    (2, 40, 32, 16, 1, "shared", "shared"),
    (2, 33, 33, 16, 1, "shared", "grouped"),
    (2, 64, 97, 5, 1, "grouped", "grouped"),
    (2, 64, 300, 16, 2, "grouped", "grouped"),
    (2, 96, 257, 16, 3, "grouped", "shared"),
    (1, 128, 1000, 1, 2, "shared", "grouped"),
]
SIZE_IDS = ["b{}d{}l{}n{}g{}-{}-{}".format(*s) for s in SIZES]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("b,d,l,n,g,bl,cl", SIZES, ids=SIZE_IDS)
def test_forward_checkpoints(dtype, b, d, l, n, g, bl, cl):
    x = _inputs(dtype, b=b, d=d, l=l, n=n, g=g, B=bl, C=cl)
    out, last, ck = _core.selective_scan_fwd_ck(*_pos(x), True, x["initial_state"])
    assert ck.is_cuda and ck.dtype == torch.float32 and ck.is_contiguous()
    assert ck.shape == (b, d, -(-l // CK), n)
    # the plain forward: the same kernels' arithmetic, the same bits
    want_out, want_last = _core.selective_scan_fwd(*_pos(x), True, True, x["initial_state"])
    assert torch.equal(out, want_out) and torch.equal(last, want_last)
    # chunk 0 is the initial state; the rest against the float64 recurrence
    # (f16/bf16: the forward's MUFU softplus, rel. err ~1e-4, feeds every state)
    assert torch.equal(ck[:, :, 0], x["initial_state"])
    ref = ref_states({k: v.cpu() for k, v in x.items()}, CK).numpy()
    tol = 1e-5 if dtype == "float32" else 1e-3
    assert rel_err(ck.cpu(), ref) <= tol


def test_forward_checkpoints_without_initial_state_and_poisoned():
    # a big problem first (reused allocations), then one without initial state:
    # chunk 0 must be written as zeros, no stale memory may show
    big = _inputs(b=2, d=64, l=300, n=16)
    _core.selective_scan_fwd_ck(*_pos(big), True, big["initial_state"])
    x = _inputs(seed=4, b=2, d=33, l=70, n=16, initial_state=False)
    out, last, ck = _core.selective_scan_fwd_ck(*_pos(x), True, None)
    assert torch.equal(ck[:, :, 0], torch.zeros_like(ck[:, :, 0]))
    ref = ref_states({k: v.cpu() for k, v in x.items()}, CK).numpy()
    assert rel_err(ck.cpu(), ref) <= 1e-5


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("b,d,l,n,g,bl,cl", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("init,dlast", [(True, True), (False, False)])
def test_backward_from_checkpoints_is_the_recompute(dtype, b, d, l, n, g, bl, cl, init, dlast):
    x = _inputs(dtype, seed=3, b=b, d=d, l=l, n=n, g=g, B=bl, C=cl, initial_state=init)
    _, _, ck = _core.selective_scan_fwd_ck(*_pos(x), True, x.get("initial_state"))
    args = _bwd_args(x, dlast=dlast)
    want = _core.selective_scan_bwd(*args)
    got = _core.selective_scan_bwd(*args, ck)
    # channels per B / C group: at most two blocks of 32 -> at most two atomics meet
    cpg = max(d if lay == "shared" else d // g for lay in (bl, cl))
    _compare(want, got, exact_all=b <= 2 and cpg <= 64)


def test_backward_from_checkpoints_options_and_layouts():
    """No softplus / no z, D, bias; channel-last u/delta/z (the forward's scalar
    path, checkpoints from its per-step loop), time-major B, bf16 C."""
    for opts in (dict(D=False, z=False, delta_bias=False, softplus=False),
                 dict(D=True, z=True, delta_bias=True, softplus=True)):
        sp = opts["softplus"]
        x = _inputs(seed=5, b=2, d=40, l=75, n=16, B="shared", C="grouped", **opts)
        for k in ("u", "delta") + (("z",) if "z" in x else ()):
            x[k] = x[k].transpose(1, 2).contiguous().transpose(1, 2)
        x["B"] = x["B"].transpose(1, 2).contiguous().transpose(1, 2)
        x["C"] = x["C"].bfloat16()
        _, _, ck = _core.selective_scan_fwd_ck(*_pos(x), sp, x["initial_state"])
        ref = ref_states({k: v.cpu().float() for k, v in x.items()}, CK, softplus=sp).numpy()
        assert rel_err(ck.cpu(), ref) <= 1e-5
        args = _bwd_args(x, softplus=sp)
        _compare(_core.selective_scan_bwd(*args), _core.selective_scan_bwd(*args, ck), True)


@pytest.mark.parametrize("bl,cl,n,d,g", [("const", "shared", 16, 33, 1),
                                         ("shared", "shared", 20, 33, 1),
                                         ("grouped", "grouped", 16, 32, 2)])
def test_no_checkpoints_where_the_fast_backward_does_not_run(bl, cl, n, d, g):
    x = _inputs(b=2, d=d, l=70, n=n, g=g, B=bl, C=cl)
    out, last, ck = _core.selective_scan_fwd_ck(*_pos(x), True, x["initial_state"])
    assert ck.shape == (0,) and ck.is_cuda
    want_out, _ = _core.selective_scan_fwd(*_pos(x), True, True, x["initial_state"])
    assert torch.equal(out, want_out)
    assert not _autograd._cuda_checkpoints(d, n, x["B"], x["C"])
    # a checkpoint tensor there is refused; the empty one means recompute
    args = _bwd_args(x)
    fake = torch.zeros(2, d, 3, n, device="cuda")
    with pytest.raises(ValueError, match="checkpoints"):
        _core.selective_scan_bwd(*args, fake)
    # (the warp-scan kernel runs here: its atomics meet in varying order)
    _compare(_core.selective_scan_bwd(*args), _core.selective_scan_bwd(*args, ck), False)


@pytest.mark.parametrize("bad,exc", [
    (lambda ck: ck[:, :, :1], ValueError),
    (lambda ck: ck[..., :2], ValueError),
    (lambda ck: ck.double(), TypeError),
    (lambda ck: ck.cpu(), ValueError),
    (lambda ck: ck.transpose(0, 1).contiguous().transpose(0, 1), ValueError),
    (lambda ck: ck.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2), ValueError),
])
def test_bad_checkpoints(bad, exc):
    x = _inputs(b=2, d=33, l=70, n=4)
    _, _, ck = _core.selective_scan_fwd_ck(*_pos(x), True, x["initial_state"])
    with pytest.raises(exc, match="checkpoints"):
        _core.selective_scan_bwd(*_bwd_args(x), bad(ck))


def test_cpu_checkpoints_for_cuda_inputs_and_back():
    x = _inputs(b=1, d=33, l=70, n=4)
    xc = {k: v.cpu() for k, v in x.items()}
    _, _, ck_cpu = _core.selective_scan_fwd_ck(*_pos(xc), True, xc["initial_state"])
    with pytest.raises(ValueError, match="checkpoints"):
        _core.selective_scan_bwd(*_bwd_args(x), ck_cpu.cuda())
    _, _, ck = _core.selective_scan_fwd_ck(*_pos(x), True, x["initial_state"])
    with pytest.raises(ValueError, match="checkpoints"):
        _core.selective_scan_bwd(*_bwd_args(xc), ck.cpu())


def test_autograd_passes_the_forward_checkpoints(monkeypatch):
    seen = []
    real = _core.selective_scan_bwd

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(_autograd._core, "selective_scan_bwd", spy)
    x = {k: v.requires_grad_() for k, v in _inputs(b=1, d=33, l=70, n=4).items()}
    out, last = _autograd.selective_scan(*_pos(x), True, True, x["initial_state"])
    ((out * out).sum() + last.sum()).backward()
    assert len(seen) == 1 and seen[0].is_cuda and seen[0].shape == (1, 33, 3, 4)
    assert all(x[k].grad is not None for k in x)


# ------------------------------------------- float64 reference through autograd

@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("l", [1, 33, 97, 300])
def test_grads_reference(dtype, l):
    check_grads(dtype, b=2, d=40, l=l, n=16, g=1, B="grouped", C="shared", **ALL_ON)


@pytest.mark.parametrize("n,last_state,init",
                         [(7, True, True), (3, False, True), (16, True, False)])
def test_grads_reference_n_and_state(n, last_state, init):
    opts = dict(ALL_ON, initial_state=init)
    check_grads(b=2, d=64, l=129, n=n, g=2, B="grouped", C="grouped",
                last_state=last_state, **opts)


def test_grads_reference_general_forward_kernel():
    # groups of 32 channels: the forward's general kernel writes the checkpoints
    check_grads("bfloat16", b=2, d=96, l=200, n=16, g=3, B="grouped", C="grouped", **ALL_ON)


# ------------------------------------------------------ custom ops and compile

FWD = torch.ops.mamba_attention.selective_scan_fwd.default
BWD = torch.ops.mamba_attention.selective_scan_bwd.default


@pytest.mark.parametrize("dlast", [False, True])
def test_opcheck_cuda_checkpoints(dlast):
    x = {k: v.requires_grad_() for k, v in _inputs(b=2, d=33, l=70, n=4).items()}
    args = (*_pos(x), True, x["initial_state"])
    torch.library.opcheck(FWD, args)
    y = {k: t.detach() for k, t in x.items()}
    _, _, ck = FWD(*_pos(y), True, y["initial_state"])
    assert ck.shape == (2, 33, 3, 4)
    dout = torch.randn(2, 33, 70, device="cuda")
    dl = torch.randn(2, 33, 4, device="cuda") if dlast else None
    torch.library.opcheck(BWD, (*_pos(y), True, y["initial_state"], dout, dl, ck))


def _loss_fn(u, delta, A, B, C, D, z, delta_bias, initial_state):
    out, h = _autograd.selective_scan(u, delta, A, B, C, D, z, delta_bias, True, True,
                                      initial_state)
    return (out * out).sum() + (h * torch.cos(h)).sum()


def test_torch_compile_fullgraph_checkpoints():
    x = {k: v.requires_grad_() for k, v in _inputs(b=2, d=33, l=100, n=16).items()}
    args = [x[k] for k in (*ORDER, "initial_state")]
    compiled = torch.compile(_loss_fn, fullgraph=True)
    loss_c = compiled(*args)
    grads_c = torch.autograd.grad(loss_c, args)
    loss_e = _loss_fn(*args)
    grads_e = torch.autograd.grad(loss_e, args)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-5)
