#!/usr/bin/env python3
"""GPU timing of the CUDA flash-attention forward (G6–G9 of BENCHMARKS.md) per
kernel configuration, beside SDPA's cuDNN and flash backends; prints one
compact table (ms and TFLOP/s, BENCHMARKS.md's FLOP convention).

    python bench/kernel_tools/attn_timing.py [--cfg w8m1n64,w4m1n64] [--only G6,G8]

Each configuration is selected through MAMBA_ATTENTION_FA_CFG (read at every
launch). Outputs of every configuration are compared with the first one's
(and G6/G7 with cuDNN's), so a broken variant shows as a large error."""

import argparse
import math
import os

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from mamba_attention import _core
from mamba_attention._bench import attn_fwd_flops

W = {
    "G6": dict(b=4, s=8192, hq=32, hk=32, hd=128, window=None),
    "G7": dict(b=4, s=8192, hq=32, hk=8, hd=128, window=None),
    "G8": dict(b=2, s=16384, hq=32, hk=8, hd=128, window=2048),
    "G9": dict(b=1, s=65536, hq=32, hk=1, hd=128, window=2048),
}


def ours(q, k, v, window):
    b, s, hq, hd = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((b, hq, s), dtype=torch.float32, device=q.device)
    left = -1 if window is None else window - 1
    _core._flash_attn_fwd_cuda(q, k, v, out, lse, 1 / math.sqrt(hd), left, 0, 0.0, None)
    return out


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cfg", default="w8m1n64,w4m2n32")
    ap.add_argument("--only", default="G6,G7,G8,G9")
    ap.add_argument("--rep", type=int, default=300)
    a = ap.parse_args()
    cfgs = a.cfg.split(",")
    rows = []
    for wid in a.only.split(","):
        w = W[wid]
        b, s, hq, hk, hd, win = w["b"], w["s"], w["hq"], w["hk"], w["hd"], w["window"]
        flops = attn_fwd_flops(b, hq, s, s, hd, causal=True, window=win)
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, s, h, hd, device="cuda", generator=g, dtype=torch.bfloat16)
                   for h in (hq, hk, hk))
        base = None
        for c in cfgs:
            os.environ["MAMBA_ATTENTION_FA_CFG"] = c
            try:
                o = ours(q, k, v, win)
                torch.cuda.synchronize()
                err = 0.0 if base is None else rel(o, base)
                if base is None:
                    base = o
                ms = do_bench(lambda: ours(q, k, v, win), warmup=50, rep=a.rep, return_mode="median")
                rows.append((wid, f"ours {c}", ms, flops / ms / 1e9, f"{err:.1e}"))
            except Exception as e:  # noqa: BLE001
                rows.append((wid, f"ours {c}", float("nan"), float("nan"), f"ERR {e}"[:60]))
            print(*rows[-1], flush=True)
        if win is None:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            if hq != hk:
                kt, vt = (t.repeat_interleave(hq // hk, dim=1) for t in (kt, vt))
            for name, be in [("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION), ("SDPA flash", SDPBackend.FLASH_ATTENTION)]:
                def fn(be=be):
                    with sdpa_kernel(be):
                        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
                try:
                    o = fn().transpose(1, 2)
                    err = rel(base, o)
                    ms = do_bench(fn, warmup=50, rep=a.rep, return_mode="median")
                    rows.append((wid, name, ms, flops / ms / 1e9, f"ours-vs-peer {err:.1e}"))
                except Exception as e:  # noqa: BLE001
                    rows.append((wid, name, float("nan"), float("nan"), f"ERR {e}"[:60]))
                print(*rows[-1], flush=True)
        del q, k, v, base
        torch.cuda.empty_cache()
    print(f"\n{'id':4} {'impl':22} {'ms':>8} {'TFLOP/s':>8}  err")
    for wid, name, ms, tf, err in rows:
        print(f"{wid:4} {name:22} {ms:8.3f} {tf:8.1f}  {err}")


if __name__ == "__main__":
    main()
