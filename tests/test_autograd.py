"""The torch integration of selective_scan_fn: custom ops (opcheck), torch.compile,
and the routing between the differentiable op and the direct (inference) path."""

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mamba_attention._core")

from conftest import scan_inputs, selective_scan_fn  # noqa: E402

import mamba_attention._autograd  # noqa: E402,F401  (registers the ops)

FWD = torch.ops.mamba_attention.selective_scan_fwd.default
BWD = torch.ops.mamba_attention.selective_scan_bwd.default
ORDER = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
LOW = {"u", "delta", "z", "B", "C"}


def tensors(dtype=torch.float32, grad=False, seed=0, **opts):
    x = scan_inputs(seed=seed, **opts)
    return {k: torch.from_numpy(v).to(dtype if k in LOW else torch.float32).requires_grad_(grad)
            for k, v in x.items()}


def fwd_args(x, softplus=True):
    return (x["u"], x["delta"], x["A"], x["B"], x["C"], x.get("D"), x.get("z"),
            x.get("delta_bias"), softplus, x.get("initial_state"))


SAMPLES = [
    dict(b=2, d=5, l=9, n=4, B="shared", C="grouped", g=5),
    dict(b=1, d=4, l=20, n=3, B="const", C="const", D=False, z=False, delta_bias=False,
         initial_state=False, softplus=False),
    dict(b=2, d=6, l=7, n=2, B="grouped", C="shared", g=2, z=False),
]


@pytest.mark.parametrize("opts", SAMPLES, ids=["all", "none", "grouped"])
def test_opcheck_forward(opts):
    opts = dict(opts)
    softplus = opts.pop("softplus", True)
    x = tensors(grad=True, softplus=softplus, **opts)
    torch.library.opcheck(FWD, fwd_args(x, softplus))


@pytest.mark.parametrize("dlast", [False, True])
@pytest.mark.parametrize("opts", SAMPLES, ids=["all", "none", "grouped"])
def test_opcheck_backward(opts, dlast):
    opts = dict(opts)
    softplus = opts.pop("softplus", True)
    x = tensors(softplus=softplus, **opts)
    b, d, l = x["u"].shape
    dout = torch.randn(b, d, l)
    dl = torch.randn(b, d, x["A"].shape[1]) if dlast else None
    torch.library.opcheck(BWD, fwd_args(x, softplus) + (dout, dl))


def test_opcheck_bfloat16():
    x = tensors(torch.bfloat16, grad=True, b=2, d=4, l=8, n=4, B="grouped", C="const", g=2)
    torch.library.opcheck(FWD, fwd_args(x))


def _loss_fn(u, delta, A, B, C, D, z, delta_bias, initial_state):
    out, h = selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True,
                               return_last_state=True, initial_state=initial_state)
    return (out * out).sum() + (h * torch.cos(h)).sum()


def test_torch_compile_fullgraph():
    """Forward and backward through torch.compile(fullgraph=True) equal eager."""
    x = tensors(grad=True, b=2, d=6, l=12, n=4, B="shared", C="grouped", g=3)
    args = [x[k] for k in ORDER]
    compiled = torch.compile(_loss_fn, fullgraph=True)
    loss_c = compiled(*args)
    grads_c = torch.autograd.grad(loss_c, args)
    loss_e = _loss_fn(*args)
    grads_e = torch.autograd.grad(loss_e, args)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
    for k, gc, ge in zip(ORDER, grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6, msg=k)


def test_inference_paths():
    """No grad needed: the direct kernel call (no graph), same values and dtypes."""
    x = tensors(torch.bfloat16, grad=True, b=2, d=5, l=9, n=4, B="grouped", C="shared", g=5)
    out_g, h_g = selective_scan_fn(**x, delta_softplus=True, return_last_state=True)
    assert out_g.grad_fn is not None and out_g.dtype == torch.bfloat16
    assert h_g.dtype == torch.float32
    with torch.no_grad():
        out_n, h_n = selective_scan_fn(**x, delta_softplus=True, return_last_state=True)
        out_1 = selective_scan_fn(**x, delta_softplus=True)
    assert out_n.grad_fn is None and not out_n.requires_grad and out_n.dtype == torch.bfloat16
    assert torch.equal(out_n, out_g.detach()) and torch.equal(h_n, h_g.detach())
    assert isinstance(out_1, torch.Tensor) and torch.equal(out_1, out_n)
    y = {k: v.detach() for k, v in x.items()}  # grad enabled, nothing requires it
    out_d = selective_scan_fn(**y, delta_softplus=True)
    assert out_d.grad_fn is None and torch.equal(out_d, out_n)
    # Under autograd, return_last_state=False returns the tensor alone.
    out_a = selective_scan_fn(**x, delta_softplus=True)
    assert isinstance(out_a, torch.Tensor) and out_a.grad_fn is not None


def test_numpy_inputs_unaffected():
    x = scan_inputs(b=2, d=3, l=5, n=4)
    x = {k: v.astype(np.float32) for k, v in x.items()}
    out, h = selective_scan_fn(**x, delta_softplus=True, return_last_state=True)
    assert type(out) is np.ndarray and out.dtype == np.float32 and h.dtype == np.float32


def test_package_imports_and_runs_without_torch():
    """mamba_attention never imports torch itself: with torch unimportable, NumPy works."""
    code = (
        "import sys, numpy as np\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import mamba_attention as ma\n"
        "r = np.random.default_rng(0)\n"
        "u = r.standard_normal((1, 2, 5)).astype(np.float32)\n"
        "A = -np.ones((2, 3), np.float32)\n"
        "B = r.standard_normal((1, 3, 5)).astype(np.float32)\n"
        "out = ma.selective_scan_fn(u, np.abs(u), A, B, B, delta_softplus=True)\n"
        "assert out.shape == (1, 2, 5) and 'torch' not in sys.modules\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
