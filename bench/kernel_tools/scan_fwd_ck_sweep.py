#!/usr/bin/env python3
"""Compile variants of kernels/selective_scan_fwd.cu (NVRTC -D knobs, comma
separated; "" = the file's defaults), launch the training forward
selective_scan_fwd_ck_bf16 (and the plain selective_scan_fwd_bf16 for
reference) through the driver API at the G2 shape (bf16 b8 d2048 n16 l2048,
z D Δbias softplus), compare out and the checkpoints bitwise with the
installed library's `_core.selective_scan_fwd_ck`, and time them (CUDA graph
of back-to-back launches, gs.bench).

    python3 bench/kernel_tools/scan_fwd_ck_sweep.py "" "SCAN_CK_PAIR=0"
"""
import ctypes
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_selftest as gs  # noqa: E402


class CkParams(ctypes.Structure):
    _fields_ = [("s", gs.ScanFwdParams), ("ck", ctypes.c_uint64)]


def main():
    from mamba_attention import _core

    b, d, n, l = 8, 2048, 16, 2048
    torch.manual_seed(5)
    bf = torch.bfloat16
    r = lambda *s: torch.randn(*s, device="cuda")  # noqa: E731
    u, z = r(b, d, l).to(bf), r(b, d, l).to(bf)
    delta = (r(b, d, l) * 0.5 - 2).to(bf)
    A = -torch.arange(1, n + 1, device="cuda", dtype=torch.float32).repeat(d, 1)
    B, C = r(b, 1, n, l).to(bf), r(b, 1, n, l).to(bf)
    D, bias = r(d), torch.rand(d, device="cuda") * -3 - 1
    ref_out, _, ref_ck = _core.selective_scan_fwd_ck(u, delta, A, B, C, D, z, bias, True, None)
    sB = B.stride()
    tb = gs.t4(B, [sB[0], 0, sB[2], sB[3]])
    tc = gs.t4(C, [sB[0], 0, sB[2], sB[3]])
    for spec in sys.argv[1:] or [""]:
        defines = [a for a in spec.split(",") if a]
        try:
            mod = gs.Module(os.path.join(gs.KDIR, "selective_scan_fwd.cu"), defines)
            out = torch.empty_like(u)
            last = torch.empty(b, d, n, device="cuda")
            ck = torch.full_like(ref_ck, float("nan"))
            sp = gs.ScanFwdParams(b, d, l, n, 1, 1, 1, 0, gs.t4(u), gs.t4(delta), gs.t4(z), gs.t4(out),
                                  gs.t4(A), tb, tc, gs.t4(D), gs.t4(bias), gs.Tensor4(), gs.t4(last))
            grid, block = ((d + 63) // 64, b, 1), (128, 1, 1)
            pc = CkParams(sp, ck.data_ptr())
            go_ck = mod.prepare("selective_scan_fwd_ck_bf16", grid, block, pc)
            go = mod.prepare("selective_scan_fwd_bf16", grid, block, sp)
            go_ck()
            torch.cuda.synchronize()
            same = bool(torch.equal(out, ref_out)) and bool(torch.equal(ck, ref_ck))
            t_ck = gs.bench(go_ck, iters=20, reps=5)
            t = gs.bench(go, iters=20, reps=5)
            i_ck = mod.info.get("selective_scan_fwd_ck_bf16", {})
            print(f"{spec or 'defaults':28s} fwd_ck {t_ck:.4f} ms (regs {i_ck.get('regs', '?')} frame "
                  f"{i_ck.get('frame', '?')})  fwd {t:.4f} ms  bitwise = library: {same}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"{spec}: ERROR {e}", flush=True)


if __name__ == "__main__":
    main()
