"""Out of memory (issue 15, item 7): an allocation that fails surfaces as a clean Python
exception, never a crash, and the library keeps working afterwards.

Every output, gradient and scratch buffer is allocated by the caller's framework
(torch's allocators on the input's device, numpy.empty), so a failure there is
torch's ``OutOfMemoryError`` for torch tensors (a RuntimeError subclass; what torch
itself raises for the CUDA caching allocator) and ``MemoryError`` for NumPy arrays,
with a message naming the output. The CUDA driver's own CUDA_ERROR_OUT_OF_MEMORY
(loading a kernel module) maps to torch's OutOfMemoryError too.

The CPU cases ask for outputs of ≥ 2^48 bytes through zero-stride (expanded) inputs:
more than any x86-64 address space, so the allocation fails even with Linux memory
overcommit on, and the inputs take no memory. The CUDA cases (skipped without a GPU)
ask for an output larger than the card, and run the ops under a tight
``torch.cuda.set_per_process_memory_fraction`` in a subprocess (a crash there fails the
test instead of the test run).
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("mamba_attention._core")
torch = pytest.importorskip("torch")

import mamba_attention as ma  # noqa: E402
from conftest import cuda_only, skip_unless_cuda  # noqa: E402

OOM = torch.OutOfMemoryError if hasattr(torch, "OutOfMemoryError") else torch.cuda.OutOfMemoryError


def _big(*shape, device="cpu", grad=False):
    """A tensor of ``shape`` that takes one element of memory (every stride 0)."""
    base = torch.randn(1, device=device, requires_grad=grad)
    return base.expand(*shape)


def _np_big(*shape):
    return np.broadcast_to(np.float32(0.5), shape)


# Outputs of 2^48 bytes or more (float32) for each op, built from expanded inputs.
B, D, L, N = 1 << 15, 1 << 15, 1 << 16, 4  # (b, d, l): 2^46 elements, 2^48 bytes in float32


def _cases(mk, dev="cpu"):
    a = -torch.ones(D, N, device=dev) if mk is _big else -np.ones((D, N), np.float32)
    w = torch.randn(D, 4, device=dev) if mk is _big else np.ones((D, 4), np.float32)
    h = 1 << 26
    hw = torch.ones(h, device=dev) if mk is _big else np.ones(h, np.float32)

    def kw(*shape):
        return mk(*shape, device=dev) if mk is _big else mk(*shape)

    return {
        "selective_scan_fn": lambda: ma.selective_scan_fn(kw(B, D, L), kw(B, D, L), a, kw(B, N, L), kw(B, N, L)),
        "causal_conv1d_fn": lambda: ma.causal_conv1d_fn(kw(B, D, L), w),
        "rms_norm_fn": lambda: ma.rms_norm_fn(kw(1 << 22, h), hw),
        "swiglu": lambda: ma.swiglu(kw(1 << 22, h), kw(1 << 22, h)),
        "hidden_attention": lambda: ma.hidden_attention(kw(1, 64, 1 << 21), a[:64], kw(1, N, 1 << 21),
                                                        kw(1, N, 1 << 21)),
        "flash_attn_func": lambda: ma.flash_attn_func(kw(64, 1 << 30, 16, 64), kw(64, 16, 16, 64),
                                                      kw(64, 16, 16, 64)),
    }


@pytest.mark.parametrize("op", list(_cases(_big)))
def test_cpu_torch_output_too_large(op):
    with pytest.raises(OOM, match="could not allocate"):
        _cases(_big)[op]()
    # The library keeps working.
    x = torch.randn(3, 8)
    torch.testing.assert_close(ma.swiglu(x, x), torch.nn.functional.silu(x) * x)


@pytest.mark.parametrize("op", [k for k in _cases(_big) if k != "flash_attn_func"])
def test_cpu_numpy_output_too_large(op):
    with pytest.raises(MemoryError, match="could not allocate"):
        _cases(_np_big)[op]()


def test_cpu_autograd_output_too_large():
    """Through the torch.library custom ops (inputs that require grad)."""
    u = _big(B, D, L, grad=True)
    with pytest.raises(OOM, match="could not allocate"):
        ma.selective_scan_fn(u, _big(B, D, L), -torch.ones(D, N), _big(B, N, L), _big(B, N, L))
    with pytest.raises(OOM, match="could not allocate"):
        ma.causal_conv1d_fn(_big(B, D, L, grad=True), torch.randn(D, 4))


# ------------------------------------------------------------------------- CUDA


@cuda_only
@pytest.mark.parametrize("op", list(_cases(_big)))
def test_cuda_output_larger_than_the_card(target, op):
    """Outputs of ≥ 2^48 bytes on the GPU: torch.OutOfMemoryError from torch's caching
    allocator, and the device still works (no sticky error)."""
    with pytest.raises(OOM):
        _cases(_big, "cuda")[op]()
    x = torch.randn(3, 8, device="cuda")
    torch.testing.assert_close(ma.swiglu(x, x), torch.nn.functional.silu(x) * x)
    torch.cuda.synchronize()


_TIGHT = textwrap.dedent(r"""
    import json, sys, torch
    import mamba_attention as ma
    OOM = torch.OutOfMemoryError if hasattr(torch, "OutOfMemoryError") else torch.cuda.OutOfMemoryError
    dev = "cuda"
    torch.manual_seed(0)
    total = torch.cuda.get_device_properties(0).total_memory

    def make(name):
        b, d, l, n = 2, 1024, 16384, 16          # 128 MB per (b, d, l) float32 tensor
        if name.startswith("scan"):
            x = [torch.randn(b, d, l, device=dev), torch.rand(b, d, l, device=dev) * 0.1,
                 -torch.rand(d, n, device=dev), torch.randn(b, n, l, device=dev),
                 torch.randn(b, n, l, device=dev)]
            if name == "scan_bwd":
                for t in x:
                    t.requires_grad_(True)
            return x
        if name.startswith("conv"):
            x = [torch.randn(b, d, l, device=dev), torch.randn(d, 4, device=dev)]
            if name == "conv_bwd":
                x[0].requires_grad_(True)
            return x
        if name == "rms_norm":
            return [torch.randn(b * l, d, device=dev), torch.ones(d, device=dev)]
        if name.startswith("attn"):
            q = torch.randn(4, 8192, 16, 128, device=dev, dtype=torch.bfloat16)
            x = [q, torch.randn_like(q), torch.randn_like(q)]
            if name == "attn_bwd":
                for t in x:
                    t.requires_grad_(True)
            return x
        if name == "hidden_attention":
            return [torch.rand(1, 64, 4096, device=dev) * 0.1, -torch.rand(64, 4, device=dev),
                    torch.randn(1, 4, 4096, device=dev), torch.randn(1, 4, 4096, device=dev)]
        raise ValueError(name)

    def forward(name, x):
        if name.startswith("scan"):
            return ma.selective_scan_fn(*x)
        if name.startswith("conv"):
            return ma.causal_conv1d_fn(*x, activation="silu")
        if name == "rms_norm":
            return ma.rms_norm_fn(*x)
        if name.startswith("attn"):
            return ma.flash_attn_func(*x, causal=True)
        if name == "hidden_attention":
            return ma.hidden_attention(*x)
        raise ValueError(name)

    def prepare(name):
        # the inputs, and for a backward case its forward's output (made before the limit)
        x = make(name)
        out = forward(name, x) if name.endswith("_bwd") else None
        return x, out

    def run(name, x, out):
        if name.endswith("_bwd"):
            wrt = [t for t in x if t.requires_grad]
            return torch.autograd.grad(out.float().sum(), wrt)
        return forward(name, x)

    res = {}
    for name in sys.argv[1].split(","):
        torch.cuda.set_per_process_memory_fraction(1.0)
        x, out = prepare(name)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        # Room for what exists now and 1 MB more: the new outputs cannot fit.
        torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_reserved() + (1 << 20)) / total))
        try:
            run(name, x, out)
            torch.cuda.synchronize()
            got = "no error"
        except OOM as e:
            got = "OutOfMemoryError"
        except RuntimeError as e:
            got = "RuntimeError out of memory" if "out of memory" in str(e).lower() else f"RuntimeError: {e}"
        except Exception as e:
            got = f"{type(e).__name__}: {e}"
        # With the limit lifted the same call succeeds and the device is healthy.
        torch.cuda.set_per_process_memory_fraction(1.0)
        del x, out
        torch.cuda.empty_cache()
        try:
            x, out = prepare(name)
            run(name, x, out)
            torch.cuda.synchronize()
            after = "ok"
        except Exception as e:
            after = f"{type(e).__name__}: {e}"
        res[name] = [got, after]
        x = out = None
        torch.cuda.empty_cache()
    print(json.dumps(res))
""")

TIGHT_OPS = ["scan_fwd", "scan_bwd", "conv_fwd", "conv_bwd", "rms_norm", "attn_fwd", "attn_bwd",
             "hidden_attention"]


@cuda_only
def test_cuda_tight_memory_limit(target):
    """Each op's forward (and backward) under a per-process memory limit that leaves no room
    for its outputs: OutOfMemoryError (or a RuntimeError saying out of memory), not a crash,
    and the same call succeeds once the limit is lifted. Needs ~2 GB of GPU memory."""
    skip_unless_cuda()
    r = subprocess.run([sys.executable, "-c", _TIGHT, ",".join(TIGHT_OPS)], capture_output=True,
                       text=True, timeout=600, env=dict(os.environ))
    assert r.returncode == 0, f"the subprocess died (rc {r.returncode}):\n{r.stdout}\n{r.stderr}"
    res = json.loads(r.stdout.strip().splitlines()[-1])
    bad = {k: v for k, v in res.items()
           if v[0] not in ("OutOfMemoryError", "RuntimeError out of memory") or v[1] != "ok"}
    assert not bad, bad
