"""Per-call time of C6 (selective_state_update b1 d1536 n16 float32 CPU torch) and of
the same call at d8 (the fixed cost), best of 40 batches of 100 back-to-back calls.
Alternate builds: PYTHONPATH=<dir holding another mamba_attention> python bench/kernel_tools/c6_timing.py"""
import sys, time, gc
import numpy as np, torch
from mamba_attention import _core, ops

def make(b, d, n, seed=1):
    r = np.random.default_rng(seed)
    f = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    return dict(state=f(r.standard_normal((b, d, n))), x=f(r.standard_normal((b, d))),
        dt=f(r.standard_normal((b, d)) * 0.5 - 2.0), A=f(-np.exp(r.standard_normal((d, n)))),
        B=f(r.standard_normal((b, n))), C=f(r.standard_normal((b, n))), D=f(r.standard_normal(d)),
        z=f(r.standard_normal((b, d))), dt_bias=f(r.uniform(-4.0, -1.0, d)))

def per_call(fn, batch=100, reps=40, clock=time.perf_counter):
    for _ in range(50): fn()
    best = 1e9
    for _ in range(reps):
        t0 = clock()
        for _ in range(batch): fn()
        best = min(best, (clock() - t0) / batch)
    return best * 1e6

res = {}
for d in (1536, 8):
    ins = make(1, d, 16)
    s = ins.pop("state")
    full = lambda: (ops.selective_state_update(s, **ins, dt_softplus=True), s)
    I = ins
    core = lambda: _core.selective_state_update(s, I["x"], I["dt"], I["A"], I["B"], I["C"], I["D"], I["z"], I["dt_bias"], True, None)
    res[f"d{d} bench-closure"] = per_call(full)
    res[f"d{d} _core"] = per_call(core)
    res[f"d{d} bench-closure cpu"] = per_call(full, clock=time.process_time)
print("  ".join(f"{k}: {v:.2f}" for k, v in res.items()))
