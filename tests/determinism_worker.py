"""Run every op of mamba_attention on fixed inputs and print a hash of each result.

Used by test_determinism.py in a subprocess (rayon's thread pool is global to a
process, so each thread count needs its own process):

    RAYON_NUM_THREADS=3 python tests/determinism_worker.py cpu portable,avx2,avx512
    python tests/determinism_worker.py cuda

prints one JSON object {level: {case: sha256 of the result's bytes}} (level is the
SIMD level, or "cuda"; on CUDA only forwards and the deterministic=True attention
backward are hashed). Each case runs twice in the process; a case whose two runs
differ is reported as "MISMATCH <hash1> <hash2>". The inputs come from a seeded
generator, so every process sees the same bits. The sizes are chosen so the
kernels take their parallel paths: few (query block, kv head) tasks with many keys
(the CPU's split-KV attention), many channel blocks with time-varying B/C (the scan
backward's partial sums of dB/dC), several channels summed by hidden_attention's
mean, many rows in the RMSNorm backward.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np
import torch

import mamba_attention as ma
from mamba_attention import nn as man

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def _digest(res):
    """sha256 over the raw bytes of every tensor in ``res`` (nested tuples/lists/dicts)."""
    h = hashlib.sha256()

    def add(x):
        if x is None:
            h.update(b"None")
        elif isinstance(x, torch.Tensor):
            t = x.detach().contiguous().cpu()
            h.update(str((tuple(t.shape), t.dtype)).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, np.ndarray):
            h.update(str((x.shape, str(x.dtype))).encode())
            h.update(np.ascontiguousarray(x).tobytes())
        elif isinstance(x, dict):
            for k in sorted(x):
                h.update(k.encode())
                add(x[k])
        elif isinstance(x, (tuple, list)):
            for y in x:
                add(y)
        else:
            h.update(repr(x).encode())

    add(res)
    return h.hexdigest()


class Inputs:
    """Seeded float32 inputs on one device (generated on the CPU, then moved)."""

    def __init__(self, device, seed):
        self.device = device
        self.g = torch.Generator().manual_seed(seed)

    def randn(self, *shape, dtype=torch.float32, scale=1.0, shift=0.0, grad=False):
        t = (torch.randn(*shape, generator=self.g) * scale + shift).to(dtype).to(self.device)
        return t.requires_grad_(grad)

    def uniform(self, *shape, lo=0.0, hi=1.0, grad=False):
        t = (torch.rand(*shape, generator=self.g) * (hi - lo) + lo).to(self.device)
        return t.requires_grad_(grad)


#: Whether the running case's gradients are hashed (set per case by run_level): always
#: on the CPU; on CUDA only for backwards documented as deterministic (attention with
#: deterministic=True): the others add into their gradients with atomics.
GRADS = {"on": True}
CUDA_DETERMINISTIC_BACKWARD = {"attention_det_bwd"}


def _grads(out, inputs, seed):
    """Backward of sum(out · fixed random cotangent); returns the inputs' grads ([] when
    this case's backward is not hashed)."""
    if not GRADS["on"]:
        return []
    outs = out if isinstance(out, (tuple, list)) else (out,)
    g = torch.Generator().manual_seed(seed)
    loss = 0
    for o in outs:
        if o is None or not o.requires_grad:
            continue
        w = torch.randn(o.shape, generator=g).to(o.dtype).to(o.device)
        loss = loss + (o.float() * w.float()).sum()
    gs = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [None if x is None else x for x in gs]


# ------------------------------------------------------------------ the cases
# Each case(device) returns the tensors to hash. Inputs are built inside so each
# run (two per process) starts from identical bits.


def scan_fwd(dev, dtype=torch.float32):
    r = Inputs(dev, 1)
    b, d, l, n = 2, 64, 150, 16
    u = r.randn(b, d, l, dtype=dtype)
    delta = r.randn(b, d, l, dtype=dtype, scale=0.5, shift=-1.0)
    A = -torch.exp(r.randn(d, n))
    B = r.randn(b, n, l, dtype=dtype)
    C = r.randn(b, 2, n, l, dtype=dtype)
    D, z, bias = r.randn(d), r.randn(b, d, l, dtype=dtype), r.uniform(d, lo=-4, hi=-1)
    h0 = r.randn(b, d, n)
    return ma.selective_scan_fn(u, delta, A, B, C, D, z, bias, True, True, h0)


def scan_fwd_bf16(dev):
    return scan_fwd(dev, torch.bfloat16)


def scan_bwd(dev, groups=1, b=1, d=256, l=80, n=16):
    r = Inputs(dev, 2)
    u = r.randn(b, d, l, grad=True)
    delta = r.randn(b, d, l, scale=0.5, shift=-1.0, grad=True)
    A = (-torch.exp(r.randn(d, n))).requires_grad_(True)
    B = r.randn(b, groups, n, l, grad=True)
    C = r.randn(b, groups, n, l, grad=True)
    D, z = r.randn(d, grad=True), r.randn(b, d, l, grad=True)
    bias, h0 = r.uniform(d, lo=-4, hi=-1, grad=True), r.randn(b, d, n, grad=True)
    out, last = ma.selective_scan_fn(u, delta, A, B, C, D, z, bias, True, True, h0)
    return [out, last] + _grads((out, last), [u, delta, A, B, C, D, z, bias, h0], 3)


def scan_bwd_const_bc(dev):
    r = Inputs(dev, 4)
    b, d, l, n = 3, 40, 200, 5
    u = r.randn(b, d, l, grad=True)
    delta = r.randn(b, d, l, scale=0.5, shift=-1.0, grad=True)
    A = (-torch.exp(r.randn(d, n))).requires_grad_(True)
    B, C = r.randn(d, n, grad=True), r.randn(d, n, grad=True)
    out = ma.selective_scan_fn(u, delta, A, B, C, None, None, None, True, False)
    return [out] + _grads(out, [u, delta, A, B, C], 5)


def scan_bwd_grouped(dev):
    return scan_bwd(dev, groups=4, b=2, d=128, l=100, n=8)


def state_update(dev):
    r = Inputs(dev, 6)
    b, d, n = 5, 200, 16
    state = r.randn(b, d, n)
    out = ma.selective_state_update(state, r.randn(b, d), r.randn(b, d, scale=0.5, shift=-1.0),
                                    -torch.exp(r.randn(d, n)), r.randn(b, n), r.randn(b, n),
                                    r.randn(d), r.randn(b, d), r.uniform(d, lo=-4, hi=-1), True)
    return [out, state]


def conv1d(dev, dtype=torch.float32):
    r = Inputs(dev, 7)
    b, d, l, w = 2, 64, 200, 4
    x = r.randn(b, d, l, dtype=dtype, grad=True)
    weight, bias = r.randn(d, w, grad=True), r.randn(d, grad=True)
    init = r.randn(b, d, w - 1, dtype=dtype, grad=True)
    out, fin = ma.causal_conv1d_fn(x, weight, bias, init, True, "silu")
    return [out, fin] + _grads((out, fin), [x, weight, bias, init], 8)


def conv1d_bf16(dev):
    return conv1d(dev, torch.bfloat16)


def conv1d_update(dev):
    r = Inputs(dev, 9)
    b, d, w, sl = 3, 300, 4, 6
    state = r.randn(b, d, sl)
    seqlens = torch.tensor([0, 4, 11], dtype=torch.int32, device=dev)
    out = ma.causal_conv1d_update(r.randn(b, d, 2), state, r.randn(d, w), r.randn(d), "silu", seqlens)
    return [out, state]


def rms_norm(dev):
    r = Inputs(dev, 10)
    rows, h = 1500, 96
    x, res = r.randn(rows, h, grad=True), r.randn(rows, h, grad=True)
    w, bias = r.randn(h, grad=True), r.randn(h, grad=True)
    out, res_out = ma.rms_norm_fn(x, w, bias, residual=res, prenorm=True, eps=1e-5)
    return [out, res_out] + _grads((out, res_out), [x, w, bias, res], 11)


def swiglu(dev):
    r = Inputs(dev, 12)
    g, u = r.randn(300, 150, grad=True), r.randn(300, 150, grad=True)
    out = ma.swiglu(g, u)
    return [out] + _grads(out, [g, u], 13)


def hidden_attention(dev, reduce=None):
    r = Inputs(dev, 14)
    b, d, l, n = 2, 24, 70, 6
    delta = r.randn(b, d, l, scale=0.5, shift=-1.0)
    A, B, C = -torch.exp(r.randn(d, n)), r.randn(b, n, l), r.randn(b, n, l)
    bias = r.uniform(d, lo=-4, hi=-1)
    return ma.hidden_attention(delta, A, B, C, bias, True, reduce=reduce)


def hidden_attention_mean(dev):
    return hidden_attention(dev, "mean")


def attention(dev, dtype=torch.float32, b=2, sq=150, sk=150, hq=4, hk=2, hd=64, **kw):
    r = Inputs(dev, 15)
    q = r.randn(b, sq, hq, hd, dtype=dtype, grad=True)
    k, v = r.randn(b, sk, hk, hd, dtype=dtype, grad=True), r.randn(b, sk, hk, hd, dtype=dtype, grad=True)
    out, lse, _ = ma.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    return [out, lse] + _grads(out, [q, k, v], 16)


def attention_causal_window(dev):
    return attention(dev, causal=True, window_size=(100, 0), softcap=20.0)


def attention_bf16_alibi(dev):
    return attention(dev, torch.bfloat16, hd=96, causal=True, alibi_slopes=torch.tensor(
        [0.1, 0.2, 0.3, 0.4], device=dev))


def attention_det_bwd(dev):
    return attention(dev, torch.bfloat16, causal=True, deterministic=True)


def attention_decode(dev):
    """One query row against many keys: the CPU splits the keys over threads."""
    r = Inputs(dev, 17)
    q = r.randn(1, 1, 8, 64)
    k, v = r.randn(1, 6000, 2, 64), r.randn(1, 6000, 2, 64)
    return ma.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)[:2]


def attention_varlen(dev):
    r = Inputs(dev, 18)
    cu = torch.tensor([0, 17, 200, 201, 350], dtype=torch.int32, device=dev)
    q = r.randn(350, 4, 32, grad=True)
    k, v = r.randn(350, 2, 32, grad=True), r.randn(350, 2, 32, grad=True)
    out = ma.flash_attn_varlen_func(q, k, v, cu, cu, 183, 183, causal=True)
    return [out] + _grads(out, [q, k, v], 19)


def attention_kvcache(dev):
    r = Inputs(dev, 20)
    kc, vc = r.randn(2, 3000, 2, 64), r.randn(2, 3000, 2, 64)
    lens = torch.tensor([2500, 1234], dtype=torch.int32, device=dev)
    out, lse = ma.flash_attn_with_kvcache(r.randn(2, 1, 8, 64), kc, vc, r.randn(2, 1, 2, 64),
                                          r.randn(2, 1, 2, 64), lens, causal=True,
                                          return_softmax_lse=True)
    return [out, lse, kc, vc]


def sliding_window(dev):
    r = Inputs(dev, 21)
    q, k, v = r.randn(2, 200, 4, 32), r.randn(2, 200, 2, 32), r.randn(2, 200, 2, 32)
    return ma.sliding_window_attention(q, k, v, 64)


def ring_cache(dev):
    r = Inputs(dev, 22)
    cache = ma.SlidingWindowKVCache(1, 2000, 2, 32, dtype="float32", device=dev)
    outs = [cache.append_and_attend(r.randn(1, 1990, 4, 32), r.randn(1, 1990, 2, 32),
                                    r.randn(1, 1990, 2, 32))]
    for _ in range(3):
        outs.append(cache.append_and_attend(r.randn(1, 5, 4, 32), r.randn(1, 5, 2, 32),
                                            r.randn(1, 5, 2, 32)))
    return outs


def conv_scan(dev):
    r = Inputs(dev, 23)
    b, d, l, n, w = 1, 128, 200, 16, 4
    x = r.randn(b, d, l, grad=True)
    cw, cb = r.randn(d, w, scale=0.5, grad=True), r.randn(d, grad=True)
    delta = r.randn(b, d, l, scale=0.5, shift=-1.0, grad=True)
    A = (-torch.exp(r.randn(d, n))).requires_grad_(True)
    B, C = r.randn(b, n, l, grad=True), r.randn(b, n, l, grad=True)
    D, z, bias = r.randn(d, grad=True), r.randn(b, d, l, grad=True), r.uniform(d, lo=-4, hi=-1, grad=True)
    out, last = ma.conv_selective_scan_fn(x, cw, cb, delta, A, B, C, D, z, bias, delta_softplus=True,
                                          return_last_state=True)
    return [out, last] + _grads((out, last), [x, cw, cb, delta, A, B, C, D, z, bias], 24)


def modules(dev):
    torch.manual_seed(25)
    cfg = man.SambaConfig(d_model=32, n_blocks=1, n_heads=4, n_kv_heads=2, head_dim=8,
                          window_size=16, d_state=8, vocab_size=50)
    model = man.Samba(cfg).to(dev)
    ids = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(26)).to(dev)
    logits = model(ids)
    if not GRADS["on"]:
        return logits
    grads = torch.autograd.grad(logits.float().square().mean(), list(model.parameters()))
    return [logits] + list(grads)


CASES = [scan_fwd, scan_fwd_bf16, scan_bwd, scan_bwd_const_bc, scan_bwd_grouped, state_update,
         conv1d, conv1d_bf16, conv1d_update, rms_norm, swiglu, hidden_attention,
         hidden_attention_mean, attention,
         attention_causal_window, attention_bf16_alibi, attention_det_bwd, attention_decode,
         attention_varlen, attention_kvcache, sliding_window, ring_cache, conv_scan, modules]


def run_level(dev, only=None):
    out = {}
    for case in CASES:
        if only and case.__name__ not in only:
            continue
        GRADS["on"] = dev != "cuda" or case.__name__ in CUDA_DETERMINISTIC_BACKWARD
        try:
            h1, h2 = _digest(case(dev)), _digest(case(dev))
        except Exception as e:  # reported, so the parent shows which case failed
            out[case.__name__] = f"ERROR {type(e).__name__}: {e}"
            continue
        out[case.__name__] = h1 if h1 == h2 else f"MISMATCH {h1} {h2}"
    return out


def main(argv):
    dev = argv[1] if len(argv) > 1 else "cpu"
    only = set(os.environ.get("DETERMINISM_CASES", "").split(",")) - {""}
    res = {}
    if dev == "cuda":
        res["cuda"] = run_level("cuda", only)
    else:
        for level in argv[2].split(","):
            os.environ["MAMBA_ATTENTION_SIMD"] = level
            res[level] = run_level("cpu", only)
    print(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv)
