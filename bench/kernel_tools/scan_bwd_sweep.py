#!/usr/bin/env python3
"""Compile variants of kernels/selective_scan_bwd.cu (NVRTC -D knobs, and the
kernel entry: v1 = selective_scan_bwd, v2 = selective_scan_bwd_v2, fast =
selective_scan_bwd_fast, fastck = selective_scan_bwd_fast_ck given the
forward's checkpoints, fast+ck = selective_scan_bwd_fast given them), launch them
through the driver API on torch tensors, check each against the installed
library's backward (itself checked against the float64 reference by
tests/test_cuda_grad.py) on the G2 shape and on an odd layout, and time them at
the G2 shape (bf16 b8 d2048 n16 l2048; CUDA graph of back-to-back launches).

    python3 bench/kernel_tools/scan_bwd_sweep.py "v1" "v2:SB_MINB2=1" "v1:SB_IT=16,SB_MINB=1"

SB_DIAG variants compute wrong gradients on purpose (timing diagnostics); their
check is skipped.
"""

import ctypes
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_selftest as gs  # noqa: E402

T4 = gs.Tensor4
FIELDS = ("u", "delta", "z", "dout", "A", "B", "C", "D", "delta_bias", "initial_state", "dlast",
          "du", "ddelta", "dz", "dA", "dB", "dC", "dD", "ddelta_bias", "dinit", "scratch")
NAMES = ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias", "dinit")


class Params(ctypes.Structure):
    _fields_ = [(f, ctypes.c_int32) for f in ("b", "d", "l", "n", "groups_b", "groups_c", "softplus",
                                               "nchunks")] + [(f, T4) for f in FIELDS] + \
        [("ck_given", ctypes.c_int32), ("_pad", ctypes.c_int32)]


def bc4(t):
    """(strides as (b, g, n, l) or constant (0, d, n, 0), groups) of B/C or their grads."""
    s = t.stride()
    if t.dim() == 2:
        return gs.t4(t, [0, s[0], s[1], 0]), 0
    if t.dim() == 3:
        return gs.t4(t, [s[0], 0, s[1], s[2]]), 1
    return gs.t4(t), t.shape[1]


def g2(b=8, d=2048, n=16, l=2048, dtype=torch.bfloat16):
    torch.manual_seed(5)
    dev = "cuda"
    return dict(u=torch.randn(b, d, l, device=dev).to(dtype),
                delta=(torch.randn(b, d, l, device=dev) * 0.5 - 2).to(dtype),
                z=torch.randn(b, d, l, device=dev).to(dtype),
                A=-torch.arange(1, n + 1, device=dev, dtype=torch.float32).repeat(d, 1),
                B=torch.randn(b, 1, n, l, device=dev).to(dtype),
                C=torch.randn(b, 1, n, l, device=dev).to(dtype),
                D=torch.randn(d, device=dev), delta_bias=torch.rand(d, device=dev) * -3 - 1,
                dout=torch.randn(b, d, l, device=dev).to(dtype))


def odd(b=2, d=34, n=20, l=600):
    torch.manual_seed(6)
    dev = "cuda"
    return dict(u=torch.randn(b, d, l, device=dev), delta=torch.randn(b, d, l, device=dev) * 0.5 - 1,
                z=torch.randn(b, d, l, device=dev), A=-torch.rand(d, n, device=dev) - 0.2,
                B=torch.randn(b, 17, n, l, device=dev), C=torch.randn(d, n, device=dev),
                D=torch.randn(d, device=dev), delta_bias=torch.rand(d, device=dev) - 0.5,
                initial_state=torch.randn(b, d, n, device=dev), dlast=torch.randn(b, d, n, device=dev),
                dout=torch.randn(b, d, l, device=dev))


def odd_fast(b=3, d=40, n=7, l=601):
    """An odd shape within the fast kernel's rules (n <= 16, time-varying B/C)."""
    x = odd(b=b, d=d, n=n, l=l)
    torch.manual_seed(7)
    x["B"] = torch.randn(b, 1, n, l, device="cuda")
    x["C"] = torch.randn(b, 1, n, l, device="cuda").bfloat16()
    return x


def launch_variant(spec, x):
    kern, _, defs = spec.partition(":")
    defines = [a for a in defs.split(",") if a]
    kv = dict(a.split("=") for a in defines)
    W, IT, KB = int(kv.get("SB_W", 8)), int(kv.get("SB_IT", 8)), int(kv.get("SB_KB", 16))
    CH = 32 * IT
    given = kern in ("fastck", "fast+ck")
    if kern in ("fast", "fastck", "fast+ck"):  # the channel-parallel kernel: 32-step chunks
        CH = 32
    mod = gs.Module(os.path.join(gs.KDIR, "selective_scan_bwd.cu"), defines)
    b, d, l = x["u"].shape
    n = x["A"].shape[1]
    nch = (l + CH - 1) // CH
    z = lambda *sh: torch.zeros(*sh, device="cuda")  # noqa: E731
    o = dict(du=torch.empty_like(x["u"]), ddelta=torch.empty_like(x["u"]), dz=torch.empty_like(x["u"]),
             dA=z(d, n), dB=z(*x["B"].shape), dC=z(*x["C"].shape), dD=z(d), ddelta_bias=z(d),
             dinit=z(b, d, n) if "initial_state" in x else None,
             scratch=torch.empty(b, d, nch, n, device="cuda") if nch > 1 else None)
    if given:  # the forward's checkpoints stand in for the scratch
        from mamba_attention import _core

        o["scratch"] = _core.selective_scan_fwd_ck(
            x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True,
            x.get("initial_state"))[2]
    (tB, gB), (tC, gC) = bc4(x["B"]), bc4(x["C"])
    p = Params(b, d, l, n, gB, gC, 1, nch)
    p.ck_given = int(given)
    for f in FIELDS:
        t = x.get(f, o.get(f))
        if t is not None:
            setattr(p, f, gs.t4(t))
    p.B, p.C, p.dB, p.dC = tB, tC, bc4(o["dB"])[0], bc4(o["dC"])[0]
    smem = 4 * (6 * W * CH + W * (CH + CH // 32) + 2 * W * n + 64 * W)
    name = "selective_scan_bwd"
    if kern == "v2":  # the warp-per-channel variant (removed from the file after it measured slower)
        smem += 4 * 2 * KB * (CH + 32)
        name = "selective_scan_bwd_v2"
    grid, block = ((d + W - 1) // W, b, 1), (32 * W, 1, 1)
    if kern in ("fast", "fastck", "fast+ck"):
        name = "selective_scan_bwd_fast_ck" if kern == "fastck" else "selective_scan_bwd_fast"
        smem = 4 * (2 * 16 * CH + 5 * 32 * CH + 4 * 128 * (CH // 4 - 1) + 2 * 32 * 64)
        smem += 4 * (2 * 128 + 32)  # SF_ACC: D, dD, dΔbias partials (SF_DSM, SF_DSM_CK)
        grid, block = ((d + 31) // 32, b, 1), (128, 1, 1)
    f = mod.fn(name)
    gs.ck(gs.cuda.cuFuncSetAttribute(f, 8, smem), "cuFuncSetAttribute")
    go = mod.prepare(name, grid, block, p, smem)
    info = mod.info.get(name, {})
    return go, o, info


def check(spec, x, ref):
    go, o, _ = launch_variant(spec, x)
    go()
    torch.cuda.synchronize()
    errs = []
    for nm, r in zip(NAMES, ref):
        if r is None or o.get(nm) is None:
            continue
        errs.append(((o[nm].float() - r.float()).norm() / r.float().norm().clamp_min(1e-30)).item())
    return max(errs)


def main():
    from mamba_attention import _core

    cases = []
    for mk in (g2, odd, odd_fast):
        x = mk()
        ref = _core.selective_scan_bwd(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                       x["delta_bias"], True, x.get("initial_state"), x["dout"],
                                       x.get("dlast"))
        cases.append((x, ref))
    for spec in sys.argv[1:] or ["v1"]:
        try:
            go, o, info = launch_variant(spec, cases[0][0])
            ms = gs.bench(go, iters=5, reps=3)
            msg = f"{spec:36s} regs {info.get('regs', '?')} frame {info.get('frame', '?')}  {ms:.3f} ms"
            if "SB_DIAG" not in spec:
                sel = cases[0::2] if spec.startswith("fast") else cases[:2]
                msg += "  err vs library: G2 {:.1e} odd {:.1e}".format(*(check(spec, x, r) for x, r in sel))
            print(msg, flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"{spec}: ERROR {e}", flush=True)


if __name__ == "__main__":
    main()
