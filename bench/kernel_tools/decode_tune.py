#!/usr/bin/env python3
"""GPU parity check and timing of the decode-step kernels (G5) and the causal
conv1d forward (G4), independent of the Rust host, over compile-time variants.

Compiles kernels/selective_state_update.cu and kernels/causal_conv1d.cu with
NVRTC exactly as the library does (gpu_selftest.Module), launches them through
the driver API on torch tensors, checks them against float64 references
written from SPEC §1/§2, then times them two ways:
  graph    back-to-back launches in a CUDA graph (G5: 4 rotated state buffers,
           so b64 is not L2-resident), median of 5;
  do_bench triton.testing.do_bench (L2 flushed before each call, CUDA events
           around it, median): what `python -m mamba_attention bench` reports,
           less the host's per-call work.
The launch rules mirror the kernels' header comments and src/cuda/{scan,conv1d}.rs.

    python3 bench/kernel_tools/decode_tune.py [--ssu-defs SSU_VR=2 ...] [--conv-defs CV3_K=4 ...]
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_selftest as gs  # noqa: E402

KDIR = gs.KDIR
VT = [128]  # SSU_VTHREADS of the module being checked / timed
SUFFIX, TOL, t4, rnd, relerr, report = gs.SUFFIX, gs.TOL, gs.t4, gs.rnd, gs.relerr, gs.report


def do_bench_us(go):
    try:
        from triton.testing import do_bench
    except Exception:  # noqa: BLE001
        return float("nan")
    return do_bench(go, warmup=25, rep=300, return_mode="median") * 1000


def graph_us(go, iters=200):
    return gs.bench(go, iters=iters) * 1000


# --------------------------------------------------------------------------
# selective_state_update
# --------------------------------------------------------------------------

def ssu_params(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, softplus=False, rows=None, out=None):
    def bc(t):
        if t.dim() == 2:
            s = t.stride()
            return t4(t, [s[0], 0, s[1], 0]), 1
        return t4(t), t.shape[1]

    tb, gb = bc(B)
    tc, gc = bc(C)
    b, d = x.shape
    return gs.StateUpdateParams(b, d, A.shape[1], state.shape[0], gb, gc, int(softplus), 0, t4(state), t4(x),
                                t4(dt), t4(z), t4(out), t4(A), tb, tc, t4(D), t4(dt_bias), t4(rows))


def vr_of(defs):
    for d in defs:
        if d.startswith("SSU_VR="):
            return int(d.split("=")[1])
    return 2


def ssu_go(mod, kind, R, p, b, d, n):
    """kind: 'old' (selective_state_update_*), 'vec1', 'vecR'."""
    sfx = SUFFIX[{0: torch.float32, 1: torch.float16, 2: torch.bfloat16}[p.x.dtype]]
    if kind == "old":
        T = min(32, gs.next_pow2(math.ceil(n / 16)))
        return mod.prepare("selective_state_update_" + sfx, (math.ceil(d * T / 128), b, 1), (128, 1, 1), p)
    T = n // 4
    r = 1 if kind == "vec1" else R
    nt = VT[0]
    return mod.prepare(f"selective_state_update_{kind}_{sfx}", (math.ceil(d * T / nt), math.ceil(b / r), 1),
                       (nt, 1, 1), p)


def ssu_check(mod, R):
    torch.manual_seed(5)
    for kind in ("vec1", "vecR"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for n in (4, 8, 16, 32, 64, 128):
                for bcl, bcdt, use_rows in (("shared", dtype, False), ("grouped", torch.float32, True),
                                            ("grouped", torch.bfloat16, False)):
                    if n not in (16, 128) and bcl != "shared":
                        continue
                    b, d, cache = 5, 203, 8
                    state = rnd(cache if use_rows else b, d, n)
                    x, dt, z = rnd(b, d, dtype=dtype), rnd(b, d, dtype=dtype, scale=0.5), rnd(b, d, dtype=dtype)
                    A = -torch.exp(rnd(d, n, scale=0.5))
                    if bcl == "shared":
                        B, C = rnd(b, n, dtype=bcdt), rnd(b, n, dtype=bcdt)
                    else:
                        B, C = rnd(b, 7, n, dtype=bcdt), rnd(b, 29, n, dtype=bcdt)
                    D, bias = rnd(d), rnd(d, scale=0.5)
                    rows = torch.tensor([3, -1, 0, 9, 6], device="cuda", dtype=torch.int32) if use_rows else None
                    st0 = state.clone()
                    args = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=bias, softplus=True, rows=rows)
                    out_ref, st_ref = gs.ref_ssu(state, **args)
                    out = torch.full((b, d), float("nan"), device="cuda", dtype=dtype)
                    p = ssu_params(state, out=out, **args)
                    ssu_go(mod, kind, R, p, b, d, n)()
                    torch.cuda.synchronize()
                    name = f"ssu {kind} x {SUFFIX[dtype]} n{n} B/C {bcl} {SUFFIX[bcdt]} rows {use_rows}"
                    valid = ~torch.isnan(out_ref[:, 0])
                    report(name + " out", relerr(out[valid], out_ref[valid]), TOL[dtype])
                    report(name + " state", relerr(state, st_ref), 1e-5)
                    if use_rows:
                        ok = torch.isnan(out[~valid]).all().item() and out[1].abs().max().item() == 0
                        report(name + " skipped/out-of-range rows", 0.0 if ok else 1.0, 0)
                        untouched = [1, 2, 4, 5, 7]
                        report(name + " untouched", (state[untouched] - st0[untouched]).abs().max().item(), 0)
    # no D / z / dt_bias / softplus
    b, d, n = 3, 64, 16
    state = rnd(b, d, n)
    x, dt = rnd(b, d), rnd(b, d).abs() * 0.1
    A, B, C = -torch.exp(rnd(d, n)), rnd(b, n), rnd(b, n)
    out_ref, st_ref = gs.ref_ssu(state, x, dt, A, B, C)
    out = torch.empty(b, d, device="cuda")
    ssu_go(mod, "vecR", R, ssu_params(state, x, dt, A, B, C, out=out), b, d, n)()
    torch.cuda.synchronize()
    report("ssu vecR no options out", relerr(out, out_ref), 1e-5)
    report("ssu vecR no options state", relerr(state, st_ref), 1e-5)


def ssu_time(mod, kind, R, b, d=4096, n=16, rotate=4):
    x, dt, z = (rnd(b, d, dtype=torch.bfloat16) for _ in range(3))
    A = -torch.exp(rnd(d, n))
    B, C = rnd(b, n, dtype=torch.bfloat16), rnd(b, n, dtype=torch.bfloat16)
    D, bias = rnd(d), rnd(d)
    out = torch.empty(b, d, device="cuda", dtype=torch.bfloat16)
    states = [rnd(b, d, n) for _ in range(rotate)]
    ps = [ssu_params(st, x, dt, A, B, C, D=D, z=z, dt_bias=bias, softplus=True, out=out) for st in states]
    gos = [ssu_go(mod, kind, R, p, b, d, n) for p in ps]
    k = [0]

    def go():
        gos[k[0] % rotate]()
        k[0] += 1
    keep = ps  # noqa: F841
    return graph_us(go), do_bench_us(gos[0])


# --------------------------------------------------------------------------
# causal_conv1d forward
# --------------------------------------------------------------------------

class ConvParams(ctypes.Structure):
    _fields_ = [(f, ctypes.c_int32) for f in ("b", "d", "l", "w", "silu", "state_len", "_pad0", "_pad1")] + \
               [(f, gs.Tensor4) for f in ("x", "weight", "bias", "init", "out", "fin", "dout", "dfin", "dx",
                                          "dweight", "dbias", "dinit", "state", "seqlens")]


def k_of(defs):
    for d in defs:
        if d.startswith("CV3_K="):
            return int(d.split("=")[1])
    return 4


def conv_go(mod, kind, K, x, w, bias, out, fin=None, silu=True):
    b, d, l = x.shape
    p = ConvParams(b, d, l, w.shape[1], int(silu), 0, 0, 0, t4(x), t4(w), t4(bias), gs.Tensor4(), t4(out), t4(fin))
    if kind == "fwd2":
        go = mod.prepare("causal_conv1d_fwd2", (math.ceil(l / 2048), d, b), (128, 1, 1), p)
    else:
        chunks = math.ceil(l / (256 * K))
        go = mod.prepare("causal_conv1d_fwd3_" + SUFFIX[x.dtype], (math.ceil(b * d * chunks / 4), 1, 1),
                         (128, 1, 1), p)
    go.keep = p
    return go


def conv_ref(x, w, bias, silu):
    d, wd = w.shape
    y = torch.nn.functional.conv1d(x.double(), w.double()[:, None, :], bias.double() if bias is not None else None,
                                   padding=wd - 1, groups=d)[..., : x.shape[-1]]
    return y * torch.sigmoid(y) if silu else y


def conv_check(mod, K):
    torch.manual_seed(6)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for l in (8, 64, 248, 256, 264, 1032, 2048, 4104):
            for wd in (2, 3, 4):
                for silu in (True, False):
                    if l not in (248, 2048) and (wd != 4 or not silu):
                        continue
                    b, d = 3, 5
                    x = rnd(b, d, l, dtype=dtype)
                    w, bias = rnd(d, wd), rnd(d)
                    out = torch.full_like(x, float("nan"))
                    fin = torch.full((b, d, wd - 1), float("nan"), device="cuda", dtype=dtype)
                    conv_go(mod, "fwd3", K, x, w, bias, out, fin, silu)()
                    torch.cuda.synchronize()
                    ref = conv_ref(x, w, bias, silu)
                    name = f"conv fwd3 {SUFFIX[dtype]} l{l} w{wd} silu {silu}"
                    report(name, relerr(out, ref), TOL[dtype])
                    report(name + " final_states", (fin.double() - x[..., l - wd + 1:].double()).abs().max().item(), 0)
    # bf16 weights / no bias
    x = rnd(2, 7, 512, dtype=torch.bfloat16)
    w = rnd(7, 4, dtype=torch.bfloat16)
    out = torch.empty_like(x)
    conv_go(mod, "fwd3", K, x, w, None, out)()
    torch.cuda.synchronize()
    report("conv fwd3 bf16 weights no bias", relerr(out, conv_ref(x, w, None, True)), TOL[torch.bfloat16])


def conv_time(mod, kind, K, b=8, d=4096, l=2048, dtype=torch.bfloat16):
    x = rnd(b, d, l, dtype=dtype)
    w, bias = rnd(d, 4), rnd(d)
    out = torch.empty_like(x)
    go = conv_go(mod, kind, K, x, w, bias, out)
    return graph_us(go, iters=20), do_bench_us(go)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ssu-defs", action="append", default=[], help="comma-separated -D set (repeatable)")
    ap.add_argument("--conv-defs", action="append", default=[], help="comma-separated -D set (repeatable)")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    ssu_sets = [s.split(",") if s else [] for s in (args.ssu_defs or [""])]
    conv_sets = [s.split(",") if s else [] for s in (args.conv_defs or [""])]
    base_ssu = gs.Module(os.path.join(KDIR, "selective_state_update.cu"))
    g1, d1 = ssu_time(base_ssu, "old", 1, 1)
    g64, d64 = ssu_time(base_ssu, "old", 1, 64)
    print(f"TIME ssu old (16 states/thread)           b1 graph {g1:6.1f} dobench {d1:6.1f} | b64 graph {g64:6.1f} "
          f"dobench {d64:6.1f} us", flush=True)
    srcs = [rnd(64, 4096, 16) for _ in range(4)]
    dst = torch.empty_like(srcs[0])
    kk = [0]

    def copy():
        dst.copy_(srcs[kk[0] % 4])
        kk[0] += 1
    print(f"TIME torch copy 16.8 MB graph {graph_us(copy):6.1f} dobench {do_bench_us(lambda: dst.copy_(srcs[0])):6.1f} us",
          flush=True)
    # the decode step's own traffic: an in-place read-modify-write of the state
    # (reads 16.8 MB, writes them back), 4 rotated buffers as in ssu_time
    kk2 = [0]

    def rmw():
        srcs[kk2[0] % 4].mul_(1.0)
        kk2[0] += 1
    print(f"TIME torch in-place mul_ 16.8 MB graph {graph_us(rmw):6.1f} dobench {do_bench_us(lambda: srcs[0].mul_(1.0)):6.1f} us",
          flush=True)
    for i, defs in enumerate(ssu_sets):
        m = gs.Module(os.path.join(KDIR, "selective_state_update.cu"), defs)
        R = vr_of(defs)
        VT[0] = next((int(x.split("=")[1]) for x in defs if x.startswith("SSU_VTHREADS=")), 128)
        if i == 0 and not args.no_check:
            ssu_check(m, R)
        regs = {k: v["regs"] for k, v in m.info.items() if "vec" in k and "bf16" in k}
        g1, d1 = ssu_time(m, "vec1", R, 1)
        g64a, d64a = ssu_time(m, "vec1", R, 64)
        g64, d64 = ssu_time(m, "vecR", R, 64)
        print(f"TIME ssu {' '.join(defs) or 'default':30s} b1 vec1 graph {g1:6.1f} dobench {d1:6.1f} | b64 vec1 graph "
              f"{g64a:6.1f} dobench {d64a:6.1f} | b64 vecR graph {g64:6.1f} dobench {d64:6.1f} us  regs {regs}",
              flush=True)
    base_conv = gs.Module(os.path.join(KDIR, "causal_conv1d.cu"))
    g, db = conv_time(base_conv, "fwd2", 4)
    print(f"TIME conv fwd2 G4 graph {g:7.1f} dobench {db:7.1f} us", flush=True)
    for i, defs in enumerate(conv_sets):
        m = gs.Module(os.path.join(KDIR, "causal_conv1d.cu"), defs)
        K = k_of(defs)
        if i == 0 and not args.no_check:
            conv_check(m, K)
        regs = {k: v["regs"] for k, v in m.info.items() if "fwd3" in k}
        g, db = conv_time(m, "fwd3", K)
        gf, dbf = conv_time(m, "fwd3", K, dtype=torch.float32)
        print(f"TIME conv fwd3 {' '.join(defs) or 'default':24s} G4 graph {g:7.1f} dobench {db:7.1f} us | f32 graph "
              f"{gf:7.1f} dobench {dbf:7.1f}  regs {regs}", flush=True)
    print(f"correctness: {len(gs.FAILS)} failures", gs.FAILS[:20])


if __name__ == "__main__":
    main()
