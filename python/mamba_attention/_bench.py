"""Benchmark workloads (BENCHMARKS.md) and their runner.

A :class:`Workload` builds fresh seeded inputs in ``setup()`` and returns
closures ``{"ours": fn, "<peer name>": fn, ...}``; each closure runs one call
and returns its output(s). The runner first compares every peer's first output
with ours (a row whose outputs differ is marked ``MISMATCH``, never dropped),
then times each closure: warm-up, then the MEDIAN of per-call wall times
(``time.perf_counter``), with repetitions chosen by a time budget and fast
calls timed in batches.

Floors are ESTIMATES from an analytic model of the reference machine class
(:data:`REFERENCE_MACHINES`), not measurements of the machine running the
benchmark. To add a GPU workload, append a ``Workload(device="cuda", ...)``
built by the same helpers to :func:`workloads`; the runner only runs it where
``torch.cuda.is_available()``.

GPU workloads (G1, G1f, G3, G5-b1, G5-b64; ``--only G5`` selects both G5 rows) are
timed on the GPU, never with bare host timers around asynchronous launches:
``triton.testing.do_bench`` (CUDA events, L2 flushed between calls, median) when
Triton is importable, else the median of ``torch.cuda.synchronize``-bracketed
batches; a call slower than 0.1 s (the PyTorch reference loop, ~163 ms at G1)
takes only a few synchronized repetitions. Their peers are mamba_ssm's kernels
when ``import mamba_ssm`` works and the float32 PyTorch reference loop of
:mod:`._torch_ref` on the GPU. GPU rows carry a ``gpu`` object (name, compute
capability, torch's CUDA version, driver) from :func:`gpu_meta`.
"""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np

# --------------------------------------------------------------------------
# Floor model (estimates; see BENCHMARKS.md "Floor = max(bytes / bandwidth,
# arithmetic / rate)").
# --------------------------------------------------------------------------

#: Analytic models of the reference machines. "cpu": 2-core x86-64 AVX-512,
#: float32; ~200 GFLOP/s of vector arithmetic, an exp costing ~20 FLOP (range
#: reduction + polynomial), and ~20 GB/s of sustained DRAM bandwidth.
REFERENCE_MACHINES: Dict[str, Dict[str, float]] = {
    "cpu": {
        "flops": 200e9,  # float32 FLOP/s, both cores
        "exp_per_s": 200e9 / 20,  # ~10 G exp/s
        "mem_bytes_per_s": 20e9,  # read + write
    },
    "cuda": {  # one H100 (BENCHMARKS.md)
        "flops": 67e12,  # fp32 FMA
        "exp_per_s": 3.9e12,  # SFU
        "mem_bytes_per_s": 3.0e12,
    },
}

#: Default relative error (max |ours - peer| / max |peer|) allowed: float32.
RTOL = 1e-4


def scan_floor_ms(device, b, d, n, l, g=1, itemsize=4):
    """Selective-scan forward floor: one exp(Δ·A) per (b, d, l, n) element, or
    the bytes of u, delta, z, out (b, d, l) and B, C (b, g, n, l), all ``itemsize``
    bytes an element (the input dtype), whichever is larger."""
    m = REFERENCE_MACHINES[device]
    exp_s = b * d * l * n / m["exp_per_s"]
    bytes_s = itemsize * (4 * b * d * l + 2 * b * g * n * l) / m["mem_bytes_per_s"]
    return 1e3 * max(exp_s, bytes_s)


def update_floor_ms(device, b, d, n):
    """State-update floor: bytes / bandwidth, counting the state's read + write
    (b, d, n), x, dt, z, out (b, d), A (d, n), B, C (b, n) and D, dt_bias (d,)."""
    m = REFERENCE_MACHINES[device]
    nbytes = 4 * (2 * b * d * n + 4 * b * d + d * n + 2 * b * n + 2 * d)
    return 1e3 * nbytes / m["mem_bytes_per_s"]


def state_floor_ms(device, b, d, n):
    """Decode-step floor counting only the float32 state's read + write (b, d, n)
    (BENCHMARKS.md G5: "~0.01 ms (b64 state r+w)")."""
    return 1e3 * 2 * 4 * b * d * n / REFERENCE_MACHINES[device]["mem_bytes_per_s"]


_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
#: Peer-agreement tolerance by the dtype of the main inputs (outputs are rounded to it).
_DTYPE_RTOL = {"float32": RTOL, "float16": 5e-3, "bfloat16": 1e-2}


# --------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------


@dataclass
class Workload:
    """One benchmark case.

    ``setup()`` builds inputs and returns ``{"ours": fn, peer_name: fn, ...}``;
    each ``fn()`` performs one call and returns an array/tensor or a tuple of them.
    """

    id: str
    device: str  # "cpu" or "cuda"
    description: str
    setup: Callable[[], Dict[str, Callable[[], object]]]
    floor_ms: Optional[float] = None
    floor_note: str = ""
    rtol: float = RTOL  # max |ours - peer| / max |peer| allowed (raise for bf16/fp16)


def _have_torch():
    try:
        import torch  # noqa: F401

        return True
    except ImportError:
        return False


def _make_inputs(device, seed, dtypes=None, **makers):
    """Seeded float32 inputs: ``makers[name](rng)`` gives each as NumPy, moved to a torch
    tensor on ``device`` when torch is installed, in ``dtypes[name]`` (a torch dtype
    name; float32 when absent). Returns ``(inputs, is_torch)``."""
    dtypes = dtypes or {}
    rng = np.random.default_rng(seed)
    arrays = {k: np.ascontiguousarray(f(rng), dtype=np.float32) for k, f in makers.items()}
    if not _have_torch():
        if device != "cpu" or any(dt != "float32" for dt in dtypes.values()):
            raise RuntimeError("GPU and non-float32 workloads need torch")
        return arrays, False
    import torch

    return {k: torch.from_numpy(v).to(device=device, dtype=getattr(torch, dtypes.get(k, "float32")))
            for k, v in arrays.items()}, True


def _float32_copies(ins):
    """float32 copies of torch inputs (the PyTorch reference peer runs in float32 on the
    same rounded values), made once in setup so the conversion is not timed."""
    return {k: v.float() for k, v in ins.items()}


def _mamba_ssm(module, name):
    """``mamba_ssm.<module>.<name>`` when mamba_ssm imports, else None (a missing or
    broken peer is simply not measured)."""
    try:
        import importlib

        return getattr(importlib.import_module(f"mamba_ssm.{module}"), name)
    except Exception:  # noqa: BLE001 - ImportError, or a build without its CUDA extension
        return None


def _scan_workload(wid, device, b, d, n, l, g=1, dtype="float32"):
    """selective_scan_fn forward with z, D, delta_bias, softplus; B, C grouped (b, g, n, l).

    u, delta, z, B, C in ``dtype``; A, D, delta_bias float32 (mamba_ssm's convention).
    Peers: mamba_ssm's CUDA kernel (GPU, when importable) and the float32 PyTorch
    reference loop, fed float32 copies of the same rounded inputs."""
    main = {k: dtype for k in ("u", "delta", "z", "B", "C")}

    def setup():
        from . import ops

        ins, is_torch = _make_inputs(
            device,
            seed=0,
            dtypes=main,
            u=lambda r: r.standard_normal((b, d, l)),
            delta=lambda r: r.standard_normal((b, d, l)) * 0.5 - 2.0,
            # S4D-real initialisation, as Mamba layers use: A[c, k] = -(k + 1)
            A=lambda r: -np.tile(np.arange(1, n + 1, dtype=np.float64), (d, 1)),
            B=lambda r: r.standard_normal((b, g, n, l)),
            C=lambda r: r.standard_normal((b, g, n, l)),
            D=lambda r: r.standard_normal(d),
            z=lambda r: r.standard_normal((b, d, l)),
            delta_bias=lambda r: r.uniform(-4.0, -1.0, d),
        )
        kw = dict(delta_softplus=True)
        fns = {"ours": lambda: ops.selective_scan_fn(**ins, **kw)}
        mm_scan = _mamba_ssm("ops.selective_scan_interface", "selective_scan_fn") \
            if device == "cuda" else None
        if mm_scan is not None:
            fns["mamba_ssm"] = lambda: mm_scan(ins["u"], ins["delta"], ins["A"], ins["B"], ins["C"],
                                               D=ins["D"], z=ins["z"], delta_bias=ins["delta_bias"],
                                               **kw)
        if is_torch:
            from ._torch_ref import selective_scan_ref

            ref_ins = ins if dtype == "float32" else _float32_copies(ins)
            fns["torch ref loop (fp32)" if device == "cuda" else "torch ref loop"] = \
                lambda: selective_scan_ref(**ref_ins, **kw)
        return fns

    dt = "" if dtype == "float32" and device == "cpu" else f" {dtype}"
    return Workload(
        id=wid,
        device=device,
        description=f"selective_scan_fn fwd{dt} b{b} d{d} n{n} l{l} g{g}, z D Δbias softplus",
        setup=setup,
        floor_ms=scan_floor_ms(device, b, d, n, l, g=g, itemsize=_ITEMSIZE[dtype]),
        floor_note=("H100 estimate: " if device == "cuda" else "")
        + f"max(b·d·l·n exp(Δ·A) / exp rate, bytes of u, delta, z, out, B, C in {dtype} / bandwidth)",
        rtol=_DTYPE_RTOL[dtype],
    )


def _update_workload(wid, device, b, d, n, dtype="float32", state_only_floor=False):
    """selective_state_update with D, z, dt_bias, dt_softplus; B, C (b, n).

    x, dt, z, B, C in ``dtype``; the state, A, D, dt_bias float32. Peers: mamba_ssm's
    Triton kernel (GPU, when importable) and the float32 PyTorch reference."""
    main = {k: dtype for k in ("x", "dt", "z", "B", "C")}

    def setup():
        from . import ops

        ins, is_torch = _make_inputs(
            device,
            seed=1,
            dtypes=main,
            state=lambda r: r.standard_normal((b, d, n)),
            x=lambda r: r.standard_normal((b, d)),
            dt=lambda r: r.standard_normal((b, d)) * 0.5 - 2.0,
            A=lambda r: -np.exp(r.standard_normal((d, n))),
            B=lambda r: r.standard_normal((b, n)),
            C=lambda r: r.standard_normal((b, n)),
            D=lambda r: r.standard_normal(d),
            z=lambda r: r.standard_normal((b, d)),
            dt_bias=lambda r: r.uniform(-4.0, -1.0, d),
        )
        state0 = ins.pop("state")
        # Each closure owns a copy of the state (updated in place on every call).
        s_ours = state0.copy() if isinstance(state0, np.ndarray) else state0.clone()

        def ours():
            return ops.selective_state_update(s_ours, **ins, dt_softplus=True), s_ours

        fns = {"ours": ours}
        mm_update = _mamba_ssm("ops.triton.selective_state_update", "selective_state_update") \
            if device == "cuda" else None
        if mm_update is not None:
            s_mm = state0.clone()

            def mamba_ssm_peer():
                return mm_update(s_mm, **ins, dt_softplus=True), s_mm

            fns["mamba_ssm"] = mamba_ssm_peer
        if is_torch:
            from ._torch_ref import selective_state_update_ref

            s_peer = state0.clone()
            ref_ins = ins if dtype == "float32" else _float32_copies(ins)

            def peer():
                return selective_state_update_ref(s_peer, **ref_ins, dt_softplus=True), s_peer

            fns["torch ref (fp32)" if device == "cuda" else "torch ref"] = peer
        return fns

    if state_only_floor:
        floor = state_floor_ms(device, b, d, n)
        note = "state r+w bytes / bandwidth"
    else:
        floor = update_floor_ms(device, b, d, n)
        note = "(state r+w + other inputs + out bytes) / bandwidth"
    dt = "" if dtype == "float32" else f" {dtype} x, fp32 state,"
    return Workload(
        id=wid,
        device=device,
        description=f"selective_state_update{dt} b{b} d{d} n{n}, D z dt_bias softplus",
        setup=setup,
        floor_ms=floor,
        floor_note=("H100 estimate: " if device == "cuda" else "") + note,
        rtol=_DTYPE_RTOL[dtype],
    )


def workloads() -> List[Workload]:
    """All workloads, CPU and GPU (the runner filters by device)."""
    return [
        _scan_workload("C1", "cpu", b=1, d=1536, n=16, l=2048, g=1),
        _update_workload("C6", "cpu", b=1, d=1536, n=16),
        # GPU (BENCHMARKS.md; floors are H100 estimates: 3.0 TB/s, 3.9 T exp/s).
        _scan_workload("G1", "cuda", b=8, d=2048, n=16, l=2048, g=1, dtype="bfloat16"),
        _scan_workload("G1f", "cuda", b=8, d=2048, n=16, l=2048, g=1, dtype="float32"),
        _scan_workload("G3", "cuda", b=8, d=2048, n=16, l=8192, g=1, dtype="bfloat16"),
        _update_workload("G5-b1", "cuda", b=1, d=4096, n=16, dtype="bfloat16", state_only_floor=True),
        _update_workload("G5-b64", "cuda", b=64, d=4096, n=16, dtype="bfloat16", state_only_floor=True),
        _attn_workload("C4", "cpu", b=1, s=4096, h=16, hd=64),
        _attn_workload("C5", "cpu", b=1, s=4096, h=16, hd=64, window=512),
    ]


# --------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------


def _to_numpy(x):
    """A float64 NumPy copy of an array or tensor."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.array(x, dtype=np.float64, copy=True)


def _outputs(res):
    return [_to_numpy(r) for r in (res if isinstance(res, tuple) else (res,))]


def rel_err(ours, peer):
    """max |ours - peer| / max |peer| over all outputs (inf if shapes differ or non-finite)."""
    err = 0.0
    for a, b in zip(ours, peer):
        if a.shape != b.shape:
            return math.inf
        scale = max(float(np.abs(b).max(initial=0.0)), 1e-30)
        e = float(np.abs(a - b).max(initial=0.0)) / scale
        err = max(err, e if math.isfinite(e) else math.inf)
    return err if len(ours) == len(peer) else math.inf


def _sync_for(device):
    if device == "cuda":
        import torch

        return torch.cuda.synchronize
    return lambda: None


def measure(fn, budget_s=1.0, min_reps=5, slow_min_reps=3, slow_s=0.1, sync=lambda: None, tick=None,
            first_call_s=None):
    """Median seconds per call of ``fn`` and the number of samples taken.

    Warm-up: at least two calls and 20 ms, or none when ``first_call_s`` (the
    time of an earlier call, e.g. the correctness check's) exceeds 0.2 s. Calls
    shorter than 2 ms are timed in batches per sample. Samples: ``budget_s``
    worth, at least ``min_reps`` (``slow_min_reps`` for calls over ``slow_s``).
    """
    if first_call_s is not None and first_call_s > 0.2:
        per_call = first_call_s
    else:
        t0, calls = time.perf_counter(), 0
        while True:
            fn()
            sync()
            calls += 1
            el = time.perf_counter() - t0
            if el > 0.2 or (calls >= 2 and el >= 0.02):
                break
        per_call = el / calls
    batch = max(1, min(10000, math.ceil(2e-3 / max(per_call, 1e-9))))
    lo = slow_min_reps if per_call > slow_s else min_reps
    reps = max(lo, min(1000, round(budget_s / (per_call * batch))))
    samples = []
    for i in range(reps):
        sync()
        t0 = time.perf_counter()
        for _ in range(batch):
            fn()
        sync()
        samples.append((time.perf_counter() - t0) / batch)
        if tick:
            tick(i + 1, reps)
    return statistics.median(samples), reps


def _do_bench():
    """``triton.testing.do_bench`` when Triton imports, else None."""
    try:
        from triton.testing import do_bench
    except Exception:  # noqa: BLE001 - not installed, or no usable backend
        return None
    return do_bench


def measure_cuda(fn, budget_s=1.0, min_reps=5, slow_min_reps=3, slow_s=0.1, tick=None):
    """Median seconds per call of a GPU ``fn`` and the number of timed calls; also the
    timer used ("do_bench" or "sync").

    One synchronized call estimates the time (the correctness check has already
    warmed caches and compiled kernels). A call over ``slow_s`` (the PyTorch loop)
    gets a few ``torch.cuda.synchronize``-bracketed samples (:func:`measure`, at
    least ``slow_min_reps``). Otherwise ``triton.testing.do_bench`` (CUDA events
    around each call, L2 flushed before it, median over ``budget_s`` of calls), or,
    without Triton, the median of synchronized batches (:func:`measure`)."""
    import torch

    sync = torch.cuda.synchronize
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    est = time.perf_counter() - t0
    do_bench = None if est > slow_s else _do_bench()
    if do_bench is None:
        sec, reps = measure(fn, budget_s, min_reps, slow_min_reps, slow_s, sync=sync, tick=tick,
                            first_call_s=est if est > 0.2 else None)
        return sec, reps, "sync"
    warmup_ms, rep_ms = (5, 1e3 * budget_s) if budget_s < 0.5 else (25, 1e3 * budget_s)
    try:
        ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    except TypeError:  # older Triton: no return_mode
        ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5])
    ms = float(ms[0] if isinstance(ms, (list, tuple)) else ms)
    if tick:
        tick(1, 1)
    return ms / 1e3, max(1, int(rep_ms / max(ms, 1e-6))), "do_bench"


def _driver_versions():
    """(NVIDIA driver release, e.g. "580.159.04", CUDA driver API version, e.g. "13.0"),
    each None when it cannot be read."""
    release = api = None
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        if r.returncode == 0 and r.stdout.strip():
            release = r.stdout.strip().splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import ctypes

        v = ctypes.c_int(0)
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(v)) == 0 and v.value:
            api = f"{v.value // 1000}.{v.value % 1000 // 10}"
    except (OSError, AttributeError):
        pass
    return release, api


def gpu_meta(index=None):
    """Where GPU rows ran: device name (torch.cuda.get_device_name), compute capability,
    multiprocessors, memory, torch's CUDA version (torch.version.cuda), the driver
    release and its CUDA API version. None without torch or a GPU."""
    if not _have_torch():
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device() if index is None else index
    props = torch.cuda.get_device_properties(index)
    release, api = _driver_versions()
    return {
        "index": index,
        "name": torch.cuda.get_device_name(index),
        "capability": "%d.%d" % torch.cuda.get_device_capability(index),
        "multiprocessors": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "count": torch.cuda.device_count(),
        "torch_cuda": torch.version.cuda,
        "driver": release,
        "driver_cuda": api,
    }


# --------------------------------------------------------------------------
# Runner and progress display
# --------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr (\\r-redrawn), or, when stderr is not a
    TTY, a plain log line per finished workload."""

    def __init__(self, total, stream=None, width=24):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.total, self.done, self.width, self._len, self._last = max(total, 1), 0, width, 0, 0.0

    def show(self, label, frac=0.0, throttle=False):
        """Redraw: ``done`` finished workloads plus ``frac`` of the current one
        (with ``throttle``, at most 10 redraws a second)."""
        if not self.tty:
            return
        now = time.perf_counter()
        if throttle and now - self._last < 0.1:
            return
        self._last = now
        f = min(1.0, (self.done + frac) / self.total)
        filled = int(f * self.width)
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {100 * f:3.0f}% {label}"
        self.stream.write("\r" + line + " " * max(0, self._len - len(line)))
        self.stream.flush()
        self._len = len(line)

    def finish(self, line):
        """One workload done: log ``line`` when not on a TTY (the bar shows it otherwise)."""
        self.done += 1
        if not self.tty:
            print(line, file=self.stream, flush=True)

    def close(self):
        if self.tty and self._len:
            self.stream.write("\r" + " " * self._len + "\r")
            self.stream.flush()


def _selects(want, wid):
    """Whether id ``want`` selects workload ``wid``: equal, or a family ("G5" → "G5-b1")."""
    want, wid = want.upper(), wid.upper()
    return wid == want or wid.startswith(want + "-")


def runnable(wls, only=None):
    """Workloads that fit this machine (CPU always, CUDA when torch sees a GPU), filtered
    by ``only`` ids (an id also selects its family: "G5" runs "G5-b1" and "G5-b64")."""
    cuda = False
    if _have_torch():
        import torch

        cuda = torch.cuda.is_available()
    if only:
        unknown = {w for w in only if not any(_selects(w, x.id) for x in wls)}
        if unknown:
            raise ValueError(f"unknown workload id(s): {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(w.id for w in wls)}")
        wls = [x for x in wls if any(_selects(w, x.id) for w in only)]
    return [w for w in wls if w.device == "cpu" or (w.device == "cuda" and cuda)]


def _err(e):
    return f"{type(e).__name__}: {e}"


def run_workload(w, quick=False, progress=None):
    """Set up, check and time one workload; returns its result row (a dict).

    ``status`` is "ok", "MISMATCH" (some peer disagrees with ours beyond
    ``w.rtol``), "ERROR" (ours or the setup raised) or "unchecked" (no peer
    to compare with). A peer that raises is reported in its own entry.
    """
    budget, min_reps, slow_min = (0.1, 3, 1) if quick else (1.0, 5, 3)
    sync = _sync_for(w.device)
    show = progress.show if progress else (lambda *a: None)
    row = dict(id=w.id, device=w.device, description=w.description, status="ok", error=None,
               ours_ms=None, ours_reps=None, peers=[], floor_ms=w.floor_ms, floor_is_estimate=True,
               floor_note=w.floor_note, floor_frac=None)
    if w.device == "cuda":
        row.update(gpu=gpu_meta(), timer=None)
    show(f"{w.id} setup")
    try:
        fns = w.setup()
    except Exception as e:  # noqa: BLE001 - reported in the row
        row.update(status="ERROR", error="setup: " + _err(e))
        fns = {}
    peers = {name: dict(name=name, ms=None, reps=None, ratio=None, rel_err=None, status="ok", error=None)
             for name in fns if name != "ours"}
    if w.device == "cuda":
        for p in peers.values():
            p["timer"] = None
    row["peers"] = list(peers.values())

    # Correctness: the first call of each closure (also its first warm-up).
    first, first_s = {}, {}
    for name, fn in fns.items():
        show(f"{w.id} check {name}")
        try:
            t0 = time.perf_counter()
            res = fn()
            sync()
            first_s[name] = time.perf_counter() - t0
            first[name] = _outputs(res)
        except Exception as e:  # noqa: BLE001
            (row if name == "ours" else peers[name]).update(status="ERROR", error=_err(e))
    if row["status"] == "ok":
        for name, p in peers.items():
            if p["status"] == "ok":
                p["rel_err"] = rel_err(first["ours"], first[name])
                if not p["rel_err"] < w.rtol:
                    p["status"] = row["status"] = "MISMATCH"
        if not any(p["rel_err"] is not None for p in peers.values()):
            row["status"] = "unchecked"
    del first

    # Timing.
    for k, (name, fn) in enumerate(fns.items()):
        entry = row if name == "ours" else peers[name]
        if entry["status"] == "ERROR" or (name == "ours" and row["status"] == "ERROR"):
            continue

        def tick(i, n, name=name, k=k):
            show(f"{w.id} timing {name} {i}/{n}", (k + i / n) / len(fns), True)

        show(f"{w.id} timing {name} (warm-up)", k / len(fns))
        try:
            if w.device == "cuda":
                sec, reps, timer = measure_cuda(fn, budget, min_reps, slow_min, tick=tick)
                entry["timer"] = timer
            else:
                sec, reps = measure(fn, budget, min_reps, slow_min, sync=sync, tick=tick,
                                    first_call_s=first_s.get(name))
        except Exception as e:  # noqa: BLE001
            entry.update(status="ERROR", error=_err(e))
            continue
        if name == "ours":
            row.update(ours_ms=1e3 * sec, ours_reps=reps)
        else:
            entry.update(ms=1e3 * sec, reps=reps)

    ours = row["ours_ms"]
    for p in row["peers"]:
        if ours and p["ms"]:
            p["ratio"] = p["ms"] / ours
    if ours and w.floor_ms:
        row["floor_frac"] = w.floor_ms / ours
    main = row["peers"][0] if row["peers"] else {}
    row.update(peer=main.get("name"), peer_ms=main.get("ms"), ratio=main.get("ratio"),
               rel_err=main.get("rel_err"))
    return row


def run(wls, quick=False, progress_stream=None):
    """Run workloads in order with a progress display; returns the result rows."""
    prog = Progress(len(wls), progress_stream)
    rows = []
    try:
        for w in wls:
            row = run_workload(w, quick=quick, progress=prog)
            rows.append(row)
            peer = f"{row['peer']} {_fmt_ms(row['peer_ms'])} ms" if row["peer"] else "no peer"
            prog.finish(f"{w.id}: ours {_fmt_ms(row['ours_ms'])} ms, {peer} [{row['status']}]")
    finally:
        prog.close()
    return rows


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def _fmt_ms(x):
    """Milliseconds with about four significant digits."""
    if x is None:
        return "-"
    return f"{x:.4g}" if x < 1 else f"{x:.{max(0, 3 - int(math.log10(x)))}f}"


def format_table(rows):
    """The result table: one line per (workload, peer); ours repeats only on the first."""
    head = ["id", "workload", "ours ms", "peer", "peer ms", "ratio ×", "floor ms", "% of floor", "check"]
    lines = []
    for r in rows:
        peers = r["peers"] or [dict(name="-", ms=None, ratio=None, rel_err=None, status=r["status"])]
        for i, p in enumerate(peers):
            status = "ERROR" if r["status"] == "ERROR" else p["status"]
            if p.get("rel_err") is not None:
                status += f" ({p['rel_err']:.1e})"
            first = i == 0
            lines.append([
                r["id"] if first else "",
                r["description"] if first else "",
                _fmt_ms(r["ours_ms"]) if first else "",
                p["name"],
                _fmt_ms(p["ms"]),
                "-" if p["ratio"] is None else f"{p['ratio']:.2f}",
                _fmt_ms(r["floor_ms"]) + "*" if first and r["floor_ms"] else "",
                f"{100 * r['floor_frac']:.0f}%" if first and r["floor_frac"] else "",
                status,
            ])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    right = {2, 4, 5, 6, 7}

    def fmt(cells):
        return "  ".join(str(c).rjust(wd) if j in right else str(c).ljust(wd)
                         for j, (c, wd) in enumerate(zip(cells, widths))).rstrip()

    out = [fmt(head), "  ".join("-" * wd for wd in widths)] + [fmt(x) for x in lines]
    out.append("* floors are estimates from an analytic model of the reference machine "
               "(mamba_attention._bench.REFERENCE_MACHINES); check = max|ours-peer|/max|peer| "
               "(< 1e-4 in float32, 5e-3 in float16, 1e-2 in bfloat16 required); GPU times: "
               "triton.testing.do_bench median, or synchronized medians for slow calls")
    out += [f"error: {r['id']}: {r['error']}" for r in rows if r["error"]]
    out += [f"error: {r['id']} peer {p['name']}: {p['error']}" for r in rows for p in r["peers"] if p["error"]]
    return "\n".join(out)


def failed(rows):
    """True if any row is a MISMATCH or an ERROR of ours (a failing peer is only reported)."""
    return any(r["status"] in ("MISMATCH", "ERROR") for r in rows)


# --------------------------------------------------------------------------
# Attention (SPEC §3)
# --------------------------------------------------------------------------


def attn_flops(b, hq, sq, sk, hd, causal=True, window=None):
    """BENCHMARKS.md's convention: 4·b·hq·sq·sk·hd, halved for causal; a causal
    window of W keys: 4·b·hq·hd·(s·W − W(W−1)/2)."""
    if window is not None:
        return 4 * b * hq * hd * (sq * window - window * (window - 1) / 2)
    return 4 * b * hq * sq * sk * hd / (2 if causal else 1)


def _attn_workload(wid, device, b, s, h, hd, window=None, dtype="float32"):
    """flash_attn_func causal (``window``: sliding window of that many keys, i.e.
    window_size=(window − 1, 0)) on (b, s, h, hd) tensors. Peer: torch's
    scaled_dot_product_attention on the (b, h, s, hd) views — is_causal=True, or
    with a dense boolean mask for the window (what a torch user writes)."""

    def setup():
        from . import ops

        ins, is_torch = _make_inputs(
            device, seed=3, dtypes={k: dtype for k in "qkv"},
            q=lambda r: r.standard_normal((b, s, h, hd)),
            k=lambda r: r.standard_normal((b, s, h, hd)),
            v=lambda r: r.standard_normal((b, s, h, hd)),
        )
        q, k, v = ins["q"], ins["k"], ins["v"]
        if window is None:
            fns = {"ours": lambda: ops.flash_attn_func(q, k, v, causal=True)}
        else:
            fns = {"ours": lambda: ops.sliding_window_attention(q, k, v, window)}
        if is_torch:
            import torch
            import torch.nn.functional as F

            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            if window is None:
                fns["torch SDPA"] = lambda: F.scaled_dot_product_attention(
                    qt, kt, vt, is_causal=True).transpose(1, 2)
            else:
                i = torch.arange(s, device=device)
                mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
                fns["torch SDPA (dense mask)"] = lambda: F.scaled_dot_product_attention(
                    qt, kt, vt, attn_mask=mask).transpose(1, 2)
        return fns

    flops = attn_flops(b, h, s, s, hd, causal=True, window=window)
    m = REFERENCE_MACHINES[device]
    what = "causal" if window is None else f"sliding window {window}, causal"
    return Workload(
        id=wid,
        device=device,
        description=f"flash_attn_func {what} b{b} s{s} h{h} hd{hd} {dtype} ({flops / 1e9:.2f} GFLOP)",
        setup=setup,
        floor_ms=1e3 * flops / m["flops"],
        floor_note=("H100 estimate: " if device == "cuda" else "")
        + "attention FLOPs (BENCHMARKS.md convention) / float32 FMA rate",
        rtol=_DTYPE_RTOL[dtype],
    )
