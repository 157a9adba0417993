#!/usr/bin/env python3
"""Every CUDA kernel of the library once, on small odd shapes, for compute-sanitizer.

Run under each tool (bench/device.sh does this with SANITIZE=1):

    compute-sanitizer --tool racecheck python3 bench/kernel_tools/sanitize_cases.py

The shapes are chosen to reach the edges: tails of every tile (l = 77, d = 37/40,
odd head counts), every kernel variant the launchers choose between (the scan's
general / fast / checkpointed backward, the vectorised and general state update,
the one-warp and general conv1d, every attention head dim, the wgmma forward on
sm_90, GQA, windows, softcap, ALiBi, varlen, deterministic backward, the ring
cache, the Samba CUDA-graph step, nn.Mamba). Each case also checks that its
outputs are finite (inputs are random, never zeros), so a kernel that reads
memory nothing wrote is likely to show up twice. ``--only a,b`` runs the cases
whose names contain one of the substrings; ``--list`` prints the names.

Needs a CUDA GPU, torch and the installed wheel. Not run by CI.
"""

from __future__ import annotations

import argparse
import sys
import traceback

import torch

import mamba_attention as ma
from mamba_attention import nn as mnn

DEV = "cuda"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CASES = []


def case(fn):
    CASES.append(fn)
    return fn


def rnd(*shape, dtype=torch.float32, scale=1.0, grad=False):
    t = (torch.randn(*shape, device=DEV) * scale).to(dtype)
    return t.requires_grad_(grad)


def finite(*ts):
    for t in ts:
        if t is None:
            continue
        if isinstance(t, (tuple, list)):
            finite(*t)
            continue
        if not torch.isfinite(t.float()).all():
            raise AssertionError(f"non-finite values in a tensor of shape {tuple(t.shape)}")


def backward(out, *inputs):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    loss = sum((o.float() * torch.randn_like(o, dtype=torch.float32)).sum() for o in outs)
    loss.backward()
    finite(*[t.grad for t in inputs if t is not None and t.requires_grad])


def scan_inputs(b, d, l, n, dtype, bc="shared", g=1, grad=False, z=True):
    u = rnd(b, d, l, dtype=dtype, grad=grad)
    delta = rnd(b, d, l, dtype=dtype, scale=0.5, grad=grad)
    A = (-torch.rand(d, n, device=DEV) - 0.3).requires_grad_(grad)
    if bc == "const":
        B, C = rnd(d, n, grad=grad), rnd(d, n, grad=grad)
    elif bc == "shared":
        B, C = rnd(b, n, l, dtype=dtype, grad=grad), rnd(b, n, l, dtype=dtype, grad=grad)
    else:
        B, C = rnd(b, g, n, l, dtype=dtype, grad=grad), rnd(b, g, n, l, dtype=dtype, grad=grad)
    D = rnd(d, grad=grad)
    zz = rnd(b, d, l, dtype=dtype, grad=grad) if z else None
    db = rnd(d, scale=0.3, grad=grad)
    h0 = rnd(b, d, n, grad=grad)
    return [u, delta, A, B, C, D, zz, db, h0]


# ---------------------------------------------------------------- selective scan


@case
def scan_fwd():
    for dtype in DTYPES:
        for b, d, l, n, bc, g in ((2, 40, 77, 16, "shared", 1), (1, 37, 300, 5, "grouped", 1),
                                  (2, 64, 77, 64, "grouped", 2), (1, 9, 33, 3, "const", 1)):
            x = scan_inputs(b, d, l, n, dtype, bc, g)
            out, h = ma.selective_scan_fn(*x[:7], delta_bias=x[7], delta_softplus=True,
                                          return_last_state=True, initial_state=x[8])
            finite(out, h)


@case
def scan_bwd():
    # general backward (constant B/C, n > 16), fast (n <= 16, shared B/C) and the
    # checkpointed fast one (groups of whole 32-channel blocks)
    for dtype in DTYPES:
        for b, d, l, n, bc, g in ((2, 40, 77, 16, "shared", 1), (2, 40, 77, 16, "const", 1),
                                  (2, 64, 77, 5, "grouped", 2), (1, 37, 70, 32, "shared", 1),
                                  (1, 33, 100, 7, "grouped", 3)):
            x = scan_inputs(b, d, l, n, dtype, bc, g, grad=True)
            out, h = ma.selective_scan_fn(*x[:7], delta_bias=x[7], delta_softplus=True,
                                          return_last_state=True, initial_state=x[8])
            backward((out, h), *x)


@case
def scan_long_chunks():
    # several 2048-step chunks of the forward, several checkpoints of the backward
    x = scan_inputs(1, 32, 4100, 16, torch.bfloat16, "shared", grad=True)
    out = ma.selective_scan_fn(*x[:7], delta_bias=x[7], delta_softplus=True)
    backward(out, *x)


@case
def state_update():
    for dtype in DTYPES:
        # vectorised kernel (contiguous, aligned) and general (strided state, groups)
        b, d, n = 3, 40, 16
        state = rnd(b, d, n)
        y = ma.selective_state_update(state, rnd(b, d, dtype=dtype), rnd(b, d, dtype=dtype),
                                      -torch.rand(d, n, device=DEV), rnd(b, n, dtype=dtype),
                                      rnd(b, n, dtype=dtype), rnd(d), rnd(b, d, dtype=dtype),
                                      rnd(d), True)
        finite(y, state)
        big = rnd(5, d, 2 * n)
        st = big[:, :, ::2]
        idx = torch.tensor([4, -1, 0], device=DEV, dtype=torch.int32)
        y = ma.selective_state_update(st, rnd(b, d, dtype=dtype), rnd(b, d, dtype=dtype),
                                      -torch.rand(d, n, device=DEV), rnd(b, 2, n, dtype=dtype),
                                      rnd(b, 2, n, dtype=dtype), dt_softplus=True,
                                      state_batch_indices=idx)
        finite(y, st)


# ---------------------------------------------------------------- conv1d


@case
def conv1d():
    for dtype in DTYPES:
        for w in (2, 3, 4, 5, 8):
            b, d, l = 2, 37, 77
            x = rnd(b, d, l, dtype=dtype, grad=True)
            wt, bias = rnd(d, w, grad=True), rnd(d, grad=True)
            init = rnd(b, d, w - 1, dtype=dtype, grad=True)
            out, fin = ma.causal_conv1d_fn(x, wt, bias, init, True, "silu")
            backward((out, fin), x, wt, bias, init)
            xl = rnd(b, l, d, dtype=dtype, grad=True)  # channel-last
            out = ma.causal_conv1d_fn(xl.transpose(1, 2), wt, None, activation=None)
            backward(out, xl, wt)
        xa = rnd(2, 64, 256, dtype=dtype)  # aligned, l-contiguous, w 4: the one-warp kernel
        finite(ma.causal_conv1d_fn(xa, rnd(64, 4), rnd(64), activation="silu"))


@case
def conv1d_update():
    for dtype in DTYPES:
        b, d, w = 3, 37, 4
        for l_new in (1, 3):
            st = rnd(b, d, 7, dtype=dtype)
            x = rnd(b, d, l_new, dtype=dtype) if l_new > 1 else rnd(b, d, dtype=dtype)
            finite(ma.causal_conv1d_update(x, st, rnd(d, w), rnd(d), "silu"), st)
            seq = torch.tensor([0, 5, 12], device=DEV, dtype=torch.int32)
            finite(ma.causal_conv1d_update(x, st, rnd(d, w), None, None, seq), st)


@case
def conv_scan():
    for dtype in DTYPES:
        x = scan_inputs(2, 40, 77, 16, dtype, "shared", grad=True)
        cw, cb = rnd(40, 4, grad=True), rnd(40, grad=True)
        out, h = ma.conv_selective_scan_fn(x[0], cw, cb, *x[1:7], delta_bias=x[7],
                                           delta_softplus=True, return_last_state=True,
                                           initial_state=x[8])
        backward((out, h), cw, cb, *x)


# ---------------------------------------------------------------- small ops


@case
def hidden_attention():
    for n in (5, 16, 40):
        x = scan_inputs(2, 9, 37, n, torch.float32, "grouped", 3)
        finite(ma.hidden_attention(x[1], x[2], x[3], x[4], x[7], True))
        finite(ma.hidden_attention(x[1], x[2], x[3], x[4], x[7], True, reduce="mean"))


@case
def norm_swiglu():
    for dtype in DTYPES:
        x, r = rnd(37, 77, dtype=dtype, grad=True), rnd(37, 77, dtype=dtype, grad=True)
        w, bias = rnd(77, grad=True), rnd(77, grad=True)
        out, res = ma.rms_norm_fn(x, w, bias, residual=r, prenorm=True)
        backward((out, res), x, r, w, bias)
        out = ma.rms_norm_fn(x, w, residual_in_fp32=True)
        backward(out, x, w)
        g, u = rnd(5, 7, 33, dtype=dtype, grad=True), rnd(5, 7, 33, dtype=dtype, grad=True)
        backward(ma.swiglu(g, u), g, u)


@case
def rotary_swa_module():
    for dtype in (torch.float32, torch.bfloat16):
        m = mnn.SlidingWindowAttention(96, 3, 1, head_dim=32, window_size=20).to(DEV, dtype)
        x = rnd(2, 45, 96, dtype=dtype, grad=True)
        backward(m(x), x)


# ---------------------------------------------------------------- attention


@case
def attention_fwd_bwd():
    for dtype in (torch.float16, torch.bfloat16):
        for hd in (32, 40, 64, 96, 128, 256):
            for causal, window, softcap, gqa in ((False, (-1, -1), 0.0, 1), (True, (-1, -1), 0.0, 3),
                                                 (True, (17, 0), 30.0, 1), (False, (9, 5), 0.0, 3)):
                hq, hk = 3, 3 // gqa
                q = rnd(2, 70, hq, hd, dtype=dtype, grad=True)
                k = rnd(2, 83, hk, hd, dtype=dtype, grad=True)
                v = rnd(2, 83, hk, hd, dtype=dtype, grad=True)
                out, lse, _ = ma.flash_attn_func(q, k, v, causal=causal, window_size=window,
                                                 softcap=softcap, return_attn_probs=True)
                backward(out, q, k, v)
                det = ma.flash_attn_func(q, k, v, causal=causal, window_size=window,
                                         softcap=softcap, deterministic=True)
                backward(det, q, k, v)


@case
def attention_alibi():
    for dtype in (torch.float16, torch.bfloat16):
        q = rnd(1, 65, 4, 64, dtype=dtype, grad=True)
        k, v = rnd(1, 65, 2, 64, dtype=dtype, grad=True), rnd(1, 65, 2, 64, dtype=dtype, grad=True)
        slopes = torch.rand(4, device=DEV)
        backward(ma.flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes), q, k, v)


@case
def attention_wgmma():
    # sm_90: the bf16/f16 hd128 forward without softcap/ALiBi/varlen runs the wgmma kernel
    for dtype in (torch.float16, torch.bfloat16):
        for causal in (False, True):
            q = rnd(2, 200, 4, 128, dtype=dtype)
            k, v = rnd(2, 333, 2, 128, dtype=dtype), rnd(2, 333, 2, 128, dtype=dtype)
            finite(ma.flash_attn_func(q, k, v, causal=causal))
            finite(ma.flash_attn_func(q, k, v, causal=True, window_size=(50, 0)))


@case
def attention_varlen():
    for dtype in (torch.float16, torch.bfloat16):
        for hd in (64, 128):
            cu_q = torch.tensor([0, 5, 5, 40, 71], device=DEV, dtype=torch.int32)
            cu_k = torch.tensor([0, 9, 12, 40, 90], device=DEV, dtype=torch.int32)
            q = rnd(75, 4, hd, dtype=dtype, grad=True)  # 4 rows after the last sequence
            k, v = rnd(90, 2, hd, dtype=dtype, grad=True), rnd(90, 2, hd, dtype=dtype, grad=True)
            out = ma.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 35, 50, causal=True)
            backward(out, q, k, v)
            out = ma.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 35, 50, window_size=(7, 3),
                                            deterministic=True)
            backward(out, q, k, v)


@case
def ring_cache_and_samba_step():
    for dtype in (torch.float16, torch.bfloat16):
        c = ma.SlidingWindowKVCache(2, 5, 2, 64, dtype=dtype, device=DEV)
        for n in (1, 1, 3, 1, 7, 1):
            finite(c.append_and_attend(rnd(2, n, 4, 64, dtype=dtype), rnd(2, n, 2, 64, dtype=dtype),
                                       rnd(2, n, 2, 64, dtype=dtype)))
    cfg = mnn.SambaConfig(d_model=96, n_blocks=1, n_heads=3, n_kv_heads=1, head_dim=32,
                          window_size=8, vocab_size=50)
    model = mnn.Samba(cfg).to(DEV, torch.bfloat16)
    ids = torch.randint(0, 50, (2, 5), device=DEV)
    finite(model(ids))
    cache = model.allocate_inference_cache(2)
    step = model.capture_step(cache)
    for _ in range(3):
        finite(step(torch.randint(0, 50, (2, 1), device=DEV)))
    finite(model.generate(ids, max_new_tokens=4))


@case
def mamba_module():
    for dtype in (torch.float32, torch.bfloat16):
        m = mnn.Mamba(64, d_state=16, layer_idx=0).to(DEV, dtype)
        x = rnd(2, 37, 64, dtype=dtype, grad=True)
        backward(m(x), x)
        conv_state, ssm_state = m.allocate_inference_cache(2, 8)
        with torch.no_grad():
            for _ in range(3):
                out, conv_state, ssm_state = m.step(rnd(2, 1, 64, dtype=dtype), conv_state,
                                                    ssm_state)
                finite(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated substrings of case names")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the cases' code")
    a = ap.parse_args()
    global DEV
    DEV = a.device
    pick = [s for s in a.only.split(",") if s]
    cases = [c for c in CASES if not pick or any(p in c.__name__ for p in pick)]
    if a.list:
        print("\n".join(c.__name__ for c in cases))
        return 0
    torch.manual_seed(0)
    failed = []
    for c in cases:
        try:
            c()
            if DEV != "cpu":
                torch.cuda.synchronize()
            print(f"case {c.__name__}: ok", flush=True)
        except Exception:  # report and go on: the sanitizer's log is what matters
            failed.append(c.__name__)
            print(f"case {c.__name__}: FAILED", flush=True)
            traceback.print_exc()
    print(f"sanitize_cases: {len(cases) - len(failed)} ok, {len(failed)} failed {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
