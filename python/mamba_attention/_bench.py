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


ATTN_TFLOPS_REF = 800e12


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
        _conv_workload("C3", "cpu", b=1, d=1536, l=2048, w=4, dtype="float32"),
        _scan_fwd_bwd_workload("C2", "cpu", b=1, d=1536, n=16, l=2048, g=1, dtype="float32",
                               ref_peer=False),
        # GPU (BENCHMARKS.md; floors are H100 estimates: 3.0 TB/s, 3.9 T exp/s).
        _scan_workload("G1", "cuda", b=8, d=2048, n=16, l=2048, g=1, dtype="bfloat16"),
        _scan_workload("G1f", "cuda", b=8, d=2048, n=16, l=2048, g=1, dtype="float32"),
        _scan_workload("G3", "cuda", b=8, d=2048, n=16, l=8192, g=1, dtype="bfloat16"),
        _update_workload("G5-b1", "cuda", b=1, d=4096, n=16, dtype="bfloat16", state_only_floor=True),
        _update_workload("G5-b64", "cuda", b=64, d=4096, n=16, dtype="bfloat16", state_only_floor=True),
        _attn_workload("C4", "cpu", b=1, s=4096, h=16, hd=64),
        _attn_workload("C5", "cpu", b=1, s=4096, h=16, hd=64, window=512),
        *attention_workloads(),
        *attention_bwd_workloads(),
        # The Mamba layer (nn.Mamba), forward + backward.
        _mamba_layer_workload("CM1", "cpu", b=1, d_model=256, l=1024, dtype="float32"),
        _mamba_layer_workload("GM1", "cuda", b=4, d_model=2048, l=4096, dtype="bfloat16"),
        _scan_fwd_bwd_workload("G2", "cuda", b=8, d=2048, n=16, l=2048, g=1, dtype="bfloat16"),
        _conv_workload("G4", "cuda", b=8, d=4096, l=2048, w=4, dtype="bfloat16"),
    ] + hybrid_workloads() + conv_scan_workloads()


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


def attn_fwd_flops(b, hq, sq, sk, hd, causal=False, window=None):
    """BENCHMARKS.md's convention: 4·b·hq·sq·sk·hd, halved for causal; a window of W
    keys: 4·b·hq·hd·(s·W − W(W−1)/2)."""
    if window is not None:
        return 4 * b * hq * hd * (sq * window - window * (window - 1) / 2)
    f = 4 * b * hq * sq * sk * hd
    return f / 2 if causal else f


def _attn_ours(q, k, v, causal, window):
    """Our CUDA forward with flash_attn's options normalised: causal → right = 0;
    a sliding window of W keys including the query → left = W − 1."""
    import torch

    from . import _core

    b, sq, hq, hd = q.shape
    left = -1 if window is None else window - 1
    right = 0 if causal else (-1 if window is None else window - 1)
    out = torch.empty_like(q)
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    _core._flash_attn_fwd_cuda(q, k, v, out, lse, 1.0 / math.sqrt(hd), left, right, 0.0, None)
    return out


def _attn_gpu_workload(wid, b, s, hq, hk, hd, causal=True, window=None, peers=("cudnn", "flash", "flex")):
    """flash_attn_func forward, bf16, layout (b, s, h, d). Peers: SDPA's cuDNN and
    flash (FlashAttention-2) backends (k/v expanded to hq heads beforehand for GQA,
    outside the timing) where the mask is plain causal, and flex_attention
    (torch.compile'd, block mask; enable_gqa) for every mask."""
    flops = attn_fwd_flops(b, hq, s, s, hd, causal=causal, window=window)

    def setup():
        import torch
        import torch.nn.functional as F

        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, s, h, hd, device="cuda", generator=g, dtype=torch.bfloat16)
                   for h in (hq, hk, hk))
        fns = {"ours": lambda: _attn_ours(q, k, v, causal, window)}
        # Peers use (b, h, s, d).
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        if window is None:
            ke, ve = (t.repeat_interleave(hq // hk, dim=1) if hq != hk else t for t in (kt, vt))
            try:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                def sdpa(backend):
                    def fn():
                        with sdpa_kernel(backend):
                            o = F.scaled_dot_product_attention(qt, ke, ve, is_causal=causal)
                        return o.transpose(1, 2)
                    return fn

                if "cudnn" in peers:
                    fns["SDPA cuDNN"] = sdpa(SDPBackend.CUDNN_ATTENTION)
                if "flash" in peers:
                    fns["SDPA flash (FA2)"] = sdpa(SDPBackend.FLASH_ATTENTION)
            except ImportError:
                pass
        if "flex" in peers:
            try:
                from torch.nn.attention.flex_attention import create_block_mask, flex_attention

                def mask_mod(bb, hh, qi, kj):
                    m = kj <= qi if causal else (kj >= 0)
                    if window is not None:
                        m = m & (qi - kj < window)
                        if not causal:
                            m = m & (kj - qi < window)
                    return m

                bm = create_block_mask(mask_mod, None, None, s, s, device="cuda")
                flex = torch.compile(flex_attention, dynamic=False)
                fns["flex_attention"] = lambda: flex(qt, kt, vt, block_mask=bm,
                                                     enable_gqa=hq != hk).transpose(1, 2)
            except Exception:  # noqa: BLE001 - flex unavailable on this torch
                pass
        return fns

    mask = "causal" if causal and window is None else (
        f"window {window}{' causal' if causal else ''}" if window else "full")
    return Workload(
        id=wid,
        device="cuda",
        description=f"flash_attn fwd bf16 {mask} b{b} s{s} hq{hq} hk{hk} hd{hd} ({flops / 1e12:.3g} TFLOP)",
        setup=setup,
        floor_ms=1e3 * flops / ATTN_TFLOPS_REF,
        floor_note="FLOPs (BENCHMARKS.md convention) at 800 TFLOP/s bf16: TFLOP/s = 800 × floor fraction",
        rtol=_DTYPE_RTOL["bfloat16"],
    )


def attention_workloads() -> List[Workload]:
    """G6–G9 of BENCHMARKS.md."""
    return [
        _attn_gpu_workload("G6", b=4, s=8192, hq=32, hk=32, hd=128, causal=True),
        _attn_gpu_workload("G7", b=4, s=8192, hq=32, hk=8, hd=128, causal=True),
        _attn_gpu_workload("G8", b=2, s=16384, hq=32, hk=8, hd=128, causal=True, window=2048),
        _attn_gpu_workload("G9", b=1, s=65536, hq=32, hk=1, hd=128, causal=True, window=2048),
    ]


# --------------------------------------------------------------------------
# The Mamba layer (nn.Mamba): forward + backward
# --------------------------------------------------------------------------


def mamba_layer_floor_ms(device, b, d_model, l, d_state=16, expand=2):
    """Forward + backward of one Mamba layer: the projections' FLOPs (in_proj,
    x_proj, dt_proj, out_proj: 2·b·l·(2d·dm + d·(r+2n) + r·d + d·dm) forward, three
    times that with the backward) at the fp32 FMA rate, plus the scan's exp(Δ·A)
    (b·d·l·n forward, twice that in the backward) at the exp rate. The conv and the
    elementwise work are not counted: an underestimate."""
    m = REFERENCE_MACHINES[device]
    d = expand * d_model
    r = math.ceil(d_model / 16)
    mm = 2 * b * l * (2 * d * d_model + d * (r + 2 * d_state) + r * d + d * d_model)
    return 1e3 * (3 * mm / m["flops"] + 3 * b * d * l * d_state / m["exp_per_s"])


def _mamba_layer_workload(wid, device, b, d_model, l, dtype="float32"):
    """nn.Mamba(d_model) forward + backward (gradients of the input and every parameter)
    on seeded (b, l, d_model) input. Peers: the same layer built from the PyTorch
    references (:func:`._torch_ref.mamba_layer_ref`: torch F.conv1d + the reference
    scan loop, autograd), and mamba_ssm's Mamba with the same weights (GPU, when
    importable). Each call returns (out, d input, d in_proj.weight, d A_log)."""

    def setup():
        import torch

        from ._torch_ref import mamba_layer_ref
        from .nn import Mamba

        tdt = getattr(torch, dtype)
        torch.manual_seed(0)
        layer = Mamba(d_model, device=device, dtype=tdt)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(b, l, d_model, generator=gen).to(device=device, dtype=tdt)
        gout = torch.randn(b, l, d_model, generator=gen).to(device=device, dtype=tdt)

        def step(module, fwd):
            def call():
                xi = x.detach().requires_grad_()
                for p in module.parameters():
                    p.grad = None
                out = fwd(xi)
                out.backward(gout)
                return out.detach(), xi.grad, module.in_proj.weight.grad, module.A_log.grad

            return call

        fns = {"ours": step(layer, layer)}
        mm_cls = _mamba_ssm("modules.mamba_simple", "Mamba") if device == "cuda" else None
        if mm_cls is not None:
            peer = mm_cls(d_model, device=device, dtype=tdt)
            peer.load_state_dict(layer.state_dict())
            fns["mamba_ssm"] = step(peer, peer)
        fns["torch ref layer"] = step(layer, lambda xi: mamba_layer_ref(layer, xi))
        return fns

    return Workload(
        id=wid,
        device=device,
        description=f"nn.Mamba fwd+bwd {dtype} b{b} d_model{d_model} l{l} (d_state 16, d_conv 4, expand 2)",
        setup=setup,
        floor_ms=mamba_layer_floor_ms(device, b, d_model, l),
        floor_note=("H100 estimate: " if device == "cuda" else "")
        + "3 × projection FLOPs / FMA rate + 3 × b·d·l·n exp / exp rate",
        # max-norm agreement of outputs and gradients; fp16/bf16 layers round every
        # intermediate tensor, so their gradients agree less tightly than one op's
        rtol={"float32": RTOL, "float16": 2e-2, "bfloat16": 5e-2}[dtype],
    )


# --------------------------------------------------------------------------
# G2: selective scan forward + backward (scan-cuda helper)
# --------------------------------------------------------------------------


def _scan_fwd_bwd_workload(wid, device, b, d, n, l, g=1, dtype="bfloat16", ref_peer=True):
    """selective_scan_fn forward + backward (every input's gradient) with z, D,
    delta_bias, softplus; B, C (b, g, n, l). A fixed random dout; each closure
    returns (du, ddelta, dz, dA, dD, ddelta_bias). Peers: mamba_ssm (when importable)
    and, with ``ref_peer``, the float32 PyTorch reference loop through torch.autograd
    (on the CPU at C2's size one call of it took 347 s, so C2 goes without it; the
    tests check the gradients)."""
    main = {k: dtype for k in ("u", "delta", "z", "B", "C")}
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

    def setup():
        import torch

        from . import ops

        ins, _ = _make_inputs(
            device,
            seed=2,
            dtypes=main,
            u=lambda r: r.standard_normal((b, d, l)),
            delta=lambda r: r.standard_normal((b, d, l)) * 0.5 - 2.0,
            A=lambda r: -np.tile(np.arange(1, n + 1, dtype=np.float64), (d, 1)),
            B=lambda r: r.standard_normal((b, g, n, l)),
            C=lambda r: r.standard_normal((b, g, n, l)),
            D=lambda r: r.standard_normal(d),
            z=lambda r: r.standard_normal((b, d, l)),
            delta_bias=lambda r: r.uniform(-4.0, -1.0, d),
            dout=lambda r: r.standard_normal((b, d, l)),
        )
        dout = ins.pop("dout").to(getattr(torch, dtype))
        leaves = {k: v.detach().requires_grad_() for k, v in ins.items()}
        pick = (0, 1, 6, 2, 5, 7)  # du, ddelta, dz, dA, dD, ddelta_bias

        def run(fn, xs, go):
            out = fn(*(xs[k] for k in names), delta_softplus=True)
            grads = torch.autograd.grad(out, [xs[k] for k in names], go)
            return tuple(grads[i] for i in pick)

        fns = {"ours": lambda: run(lambda *a, **kw: ops.selective_scan_fn(*a[:5], D=a[5], z=a[6],
                                                                          delta_bias=a[7], **kw),
                                   leaves, dout)}
        mm_scan = _mamba_ssm("ops.selective_scan_interface", "selective_scan_fn")
        if mm_scan is not None:
            fns["mamba_ssm"] = lambda: run(lambda *a, **kw: mm_scan(*a[:5], D=a[5], z=a[6],
                                                                    delta_bias=a[7], **kw),
                                           leaves, dout)
        if not ref_peer:
            return fns
        from ._torch_ref import selective_scan_ref

        ref = {k: v.detach().float().requires_grad_() for k, v in ins.items()}
        fns["torch ref loop (fp32)"] = lambda: run(
            lambda *a, **kw: selective_scan_ref(*a[:5], D=a[5], z=a[6], delta_bias=a[7], **kw),
            ref, dout.float())
        return fns

    m = REFERENCE_MACHINES[device]
    exps = 3 * b * d * l * n  # forward, and the backward's state recomputation + adjoint pass
    nbytes = _ITEMSIZE[dtype] * 11 * b * d * l  # fwd: u, delta, z, out; bwd: 4 in, 3 out
    return Workload(
        id=wid,
        device=device,
        description=f"selective_scan_fn fwd+bwd {dtype} b{b} d{d} n{n} l{l} g{g}, z D Δbias softplus",
        setup=setup,
        floor_ms=1e3 * max(exps / m["exp_per_s"], nbytes / m["mem_bytes_per_s"]),
        floor_note=("H100 estimate: " if device == "cuda" else "")
        + "max(3·b·d·l·n exp / exp rate, 11 (b, d, l) tensors / bandwidth)",
        rtol=_DTYPE_RTOL[dtype],
    )


# --------------------------------------------------------------------------
# G4: causal conv1d forward on CUDA (scan-cuda helper)
# --------------------------------------------------------------------------


def _conv_workload(wid, device, b, d, l, w, dtype="bfloat16"):
    """causal_conv1d_fn forward with bias and silu; x in ``dtype``, weight and bias
    float32. Peers: the causal_conv1d package (when importable) and torch's
    depthwise F.conv1d + silu on the same inputs."""

    def setup():
        import torch

        from . import ops

        ins, _ = _make_inputs(
            device,
            seed=3,
            dtypes={"x": dtype},
            x=lambda r: r.standard_normal((b, d, l)),
            weight=lambda r: r.standard_normal((d, w)) / math.sqrt(w),
            bias=lambda r: r.standard_normal(d),
        )
        fns = {"ours": lambda: ops.causal_conv1d_fn(ins["x"], ins["weight"], ins["bias"],
                                                    activation="silu")}
        try:
            from causal_conv1d import causal_conv1d_fn as peer

            wt, bs = ins["weight"].to(ins["x"].dtype), ins["bias"].to(ins["x"].dtype)
            fns["causal_conv1d"] = lambda: peer(ins["x"], wt, bs, activation="silu")
        except Exception:  # noqa: BLE001 - not installed or no CUDA build
            pass
        F = torch.nn.functional
        wt_t, bs_t = ins["weight"].to(ins["x"].dtype).unsqueeze(1), ins["bias"].to(ins["x"].dtype)
        fns["torch conv1d"] = lambda: F.silu(F.conv1d(ins["x"], wt_t, bs_t, padding=w - 1,
                                                      groups=d)[..., :l])
        return fns

    m = REFERENCE_MACHINES[device]
    return Workload(
        id=wid,
        device=device,
        description=f"causal_conv1d_fn fwd {dtype} b{b} d{d} l{l} w{w}, bias silu",
        setup=setup,
        floor_ms=1e3 * 2 * _ITEMSIZE[dtype] * b * d * l / m["mem_bytes_per_s"],
        floor_note=("H100 estimate: " if device == "cuda" else "")
        + "(x read + out written) / bandwidth",
        rtol=_DTYPE_RTOL[dtype],
    )


# --------------------------------------------------------------------------
# Hybrid layers (issue 6): MambaAttention, the Samba block, Samba decoding
# --------------------------------------------------------------------------


def _fwd_bwd(module_params, fwd, x, gout):
    """A call doing forward + backward of ``fwd`` on a fresh leaf copy of x; returns
    (out, dx, grad of the first parameter)."""

    def call():
        xi = x.detach().requires_grad_()
        for p in module_params:
            p.grad = None
        out = fwd(xi)
        out.backward(gout)
        return out.detach(), xi.grad, module_params[0].grad

    return call


def _mamba_attention_workload(wid, device, L, N, E, dtype="float32"):
    """MambaAttention(E) (the documents' layer, default options: two full
    attentions summed) forward + backward against the documents' snippet
    (two nn.MultiheadAttention) holding the same weights."""

    def setup():
        import torch
        from torch import nn

        from .nn import MambaAttention

        tdt = getattr(torch, dtype)

        class Snippet(nn.Module):
            def __init__(self, hidden_size):
                super().__init__()
                self.global_attention = nn.MultiheadAttention(hidden_size, num_heads=8)
                self.local_attention = nn.MultiheadAttention(hidden_size, num_heads=8)

            def forward(self, x):
                global_out, _ = self.global_attention(x, x, x)
                local_out, _ = self.local_attention(x, x, x)
                return global_out + local_out

        torch.manual_seed(0)
        snip = Snippet(E).to(device=device, dtype=tdt)
        ours = MambaAttention(E).to(device=device, dtype=tdt)
        ours.load_state_dict(snip.state_dict(), strict=True)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(L, N, E, generator=gen).to(device=device, dtype=tdt)
        gout = torch.randn(L, N, E, generator=gen).to(device=device, dtype=tdt)
        return {
            "ours": _fwd_bwd(list(ours.parameters()), ours, x, gout),
            "snippet (nn.MultiheadAttention)": _fwd_bwd(list(snip.parameters()), snip, x, gout),
        }

    # 2 branches × (projections 4·L·N·E² ·2 flops + attention 4·N·L²·E), ×3 for fwd+bwd.
    flops = 3 * 2 * (8 * L * N * E * E + 4 * N * L * L * E)
    rate = 600e12 if device == "cuda" else 150e9
    return Workload(
        id=wid, device=device,
        description=f"MambaAttention fwd+bwd {dtype} L{L} N{N} E{E} (8 heads) vs the snippet",
        setup=setup, floor_ms=flops / rate * 1e3,
        floor_note=("H100 estimate: " if device == "cuda" else "")
        + f"fwd+bwd FLOPs / {rate / 1e12:g} TFLOP/s",
        rtol={"float32": 1e-3, "float16": 2e-2, "bfloat16": 5e-2}[dtype],
    )


def _peer_samba_block(blk, attn):
    """The same Samba block from PyTorch peers, with blk's weights: torch RMSNorm and
    MLP, the Mamba layer from the PyTorch references (or mamba_ssm's, GPU), and
    ``attn(q, k, v)`` for the sliding window (b, l, h, hd layout)."""
    import torch
    import torch.nn.functional as F

    from ._torch_ref import mamba_layer_ref
    from .nn.attention import apply_rotary

    mm_cls = _mamba_ssm("modules.mamba_simple", "Mamba") if blk.norms[0].weight.is_cuda else None
    if mm_cls is not None:
        w = blk.mamba.in_proj.weight
        mamba = mm_cls(blk.mamba.d_model, device=w.device, dtype=w.dtype)
        mamba.load_state_dict(blk.mamba.state_dict())
    else:
        def mamba(h):
            return mamba_layer_ref(blk.mamba, h)

    def mlp(m, h):
        return m.down(F.silu(m.gate(h)) * m.up(h))

    def swa(h):
        s = blk.swa
        b, l, _ = h.shape
        pos = torch.arange(l, device=h.device)
        q = apply_rotary(s.q_proj(h).view(b, l, s.n_heads, s.head_dim), pos)
        k = apply_rotary(s.k_proj(h).view(b, l, s.n_kv_heads, s.head_dim), pos)
        v = s.v_proj(h).view(b, l, s.n_kv_heads, s.head_dim)
        return s.out_proj(attn(q, k, v, s.window_size).reshape(b, l, -1))

    mixers = (mamba, lambda h: mlp(blk.mlp1, h), swa, lambda h: mlp(blk.mlp2, h))

    def fwd(x):
        hidden, residual = x, None
        for norm, mixer in zip(blk.norms, mixers):
            residual = hidden.float() if residual is None else residual + hidden.float()
            hidden = mixer(F.rms_norm(residual.to(x.dtype), (x.shape[-1],), norm.weight, norm.eps))
        return hidden

    return fwd


def _sdpa_window(q, k, v, window):
    """Sliding-window attention through torch SDPA with a dense boolean mask (GQA by
    repeating K/V): the CPU peer."""
    import torch
    import torch.nn.functional as F

    l, rep = q.shape[1], q.shape[2] // k.shape[2]
    i = torch.arange(l, device=q.device)
    dist = i[:, None] - i[None, :]
    mask = (dist >= 0) & (dist < window)
    k, v = (t.repeat_interleave(rep, dim=2) for t in (k, v))
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask)
    return o.transpose(1, 2)


def _flex_window():
    """flex_attention with a sliding-window block mask (the GPU peer), compiled."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention)
    masks = {}

    def attn(q, k, v, window):
        b, l, hq, _ = q.shape
        key = (l, window, q.device)
        if key not in masks:
            def swa(b_, h_, qi, ki):
                return (qi >= ki) & (qi - ki < window)

            masks[key] = create_block_mask(swa, None, None, l, l, device=q.device)
        o = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                     block_mask=masks[key], enable_gqa=k.shape[2] != hq)
        return o.transpose(1, 2)

    return attn


def _samba_block_workload(wid, device, b, l, cfg_name, dtype, backward, **overrides):
    """One SambaBlock (sizes of a published config) forward (+ backward), ours
    against the same block assembled from PyTorch peers with the same weights."""

    def setup():
        import torch

        from .nn import SAMBA_CONFIGS, SambaBlock

        c = SAMBA_CONFIGS[cfg_name]
        c = type(c)(**{**c.__dict__, **overrides})
        tdt = getattr(torch, dtype)
        torch.manual_seed(0)
        blk = SambaBlock(c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.window_size,
                         c.d_state, c.d_conv, c.expand, c.mlp_hidden, c.norm_eps,
                         device=device, dtype=tdt)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(b, l, c.d_model, generator=gen).to(device=device, dtype=tdt)
        gout = torch.randn(b, l, c.d_model, generator=gen).to(device=device, dtype=tdt)
        attn = _flex_window() if device == "cuda" else _sdpa_window
        peer = _peer_samba_block(blk, attn)
        params = list(blk.parameters())

        def ours_fwd(xi):
            return blk(xi)[0]

        if backward:
            return {"ours": _fwd_bwd(params, ours_fwd, x, gout),
                    "peer composition": _fwd_bwd(params, peer, x, gout)}
        with torch.no_grad():
            return {"ours": lambda: blk(x)[0], "peer composition": lambda: peer(x)}

    what = "fwd+bwd" if backward else "fwd"
    peer_attn = "flex_attention" if device == "cuda" else "SDPA + dense mask"
    return Workload(
        id=wid, device=device,
        description=f"SambaBlock ({cfg_name} sizes) {what} {dtype} b{b} l{l}; peer: torch "
                    f"RMSNorm/MLP + ref or mamba_ssm Mamba + {peer_attn}",
        setup=setup,
        rtol={"float32": 1e-3, "float16": 3e-2, "bfloat16": 6e-2}[dtype],
    )


def _samba_decode_floor_ms(c, b, dtype):
    """H100 bytes floor of one decode step: every weight read once (the tied LM head
    counted once, the embedding rows not at all) plus the caches (the ring buffers'
    keys/values, the conv state and the float32 SSM state) read and written."""
    try:
        import torch

        from .nn import Samba
    except ImportError:
        return None
    with torch.device("meta"):
        model = Samba(c, dtype=getattr(torch, dtype))
    item = _ITEMSIZE[dtype]
    weights = sum(p.numel() for p in model.parameters()) * item
    blk = model.blocks[0]
    e, n = blk.mamba.d_inner, blk.mamba.d_state
    ring = 2 * b * c.window_size * (c.n_kv_heads or c.n_heads) * blk.swa.head_dim * item
    states = b * e * (c.d_conv * item + 2 * 4 * n)
    return 1e3 * (weights + c.n_blocks * (ring + states)) / REFERENCE_MACHINES["cuda"]["mem_bytes_per_s"]


def _samba_decode_workload(wid, device, context, b=16, cfg_name="samba-1.7b", n_blocks=2,
                           dtype="bfloat16"):
    """Per-token decode time of a Samba stack at a given context length: the caches
    are brought to the state after ``context`` tokens (Mamba states and a full ring
    buffer of random keys/values at position ``context``), then one step is timed.
    Ours is the step captured in a CUDA graph (``Samba.capture_step``); the peer
    "eager step (ours)" is ``Samba.step`` run from Python on a copy of the caches.
    Each call first rewinds the position to ``context`` (the states still evolve).
    Constant memory means the time should not depend on ``context``."""

    from .nn import SAMBA_CONFIGS

    c = SAMBA_CONFIGS[cfg_name]
    c = type(c)(**{**c.__dict__, "n_blocks": n_blocks})

    def setup():
        import torch

        from .nn import Samba

        tdt = getattr(torch, dtype)
        torch.manual_seed(0)
        model = Samba(c, device=device, dtype=tdt).eval()
        cache = model.allocate_inference_cache(b)
        for blk in cache:
            for t in blk[:2]:
                t.normal_()
            kv = blk[2]
            kv.k.normal_()
            kv.v.normal_()
            kv.pos = context
        eager_cache = model.allocate_inference_cache(b)
        for mine, theirs in zip(cache, eager_cache):
            for t, u in zip(mine[:2], theirs[:2]):
                u.copy_(t)
            theirs[2].k.copy_(mine[2].k)
            theirs[2].v.copy_(mine[2].v)
            theirs[2].pos = context
        ids = torch.randint(0, c.vocab_size, (b, 1), device=device)
        graph_step = model.capture_step(cache)

        def ours():
            for blk in cache:
                blk[2].pos = context
            return graph_step(ids)

        def eager():
            for blk in eager_cache:
                blk[2].pos = context
            return model.step(ids, eager_cache)

        return {"ours": ours, "eager step (ours)": eager}

    return Workload(
        id=wid, device=device,
        description=f"Samba decode step ({cfg_name} sizes, {n_blocks} blocks) b{b} {dtype} "
                    f"at context {context}, CUDA graph",
        setup=setup,
        floor_ms=_samba_decode_floor_ms(c, b, dtype),
        floor_note="H100 estimate: weights + caches read once",
        rtol=6e-2,
    )


def _rotary_workload(wid, device, b=4, l=4096, hq=32, hk=4, hd=64, dtype="bfloat16"):
    """Rotary embedding of q and k from the strided views of one fused projection
    output (as SlidingWindowAttention has them), forward: ours (one kernel) against
    the torch formula applied to q and to k."""

    def setup():
        import torch

        from ._autograd import rotary_torch
        from .nn.attention import apply_rotary_qk, rotary_inv_freq

        torch.manual_seed(0)
        proj = torch.randn(b, l, (hq + hk) * hd, device=device, dtype=getattr(torch, dtype))
        q = proj[..., :hq * hd].view(b, l, hq, hd)
        k = proj[..., hq * hd:].view(b, l, hk, hd)
        pos = torch.arange(l, device=device)
        inv = rotary_inv_freq(hd, device=device)
        return {"ours": lambda: apply_rotary_qk(q, k, pos),
                "torch formula": lambda: (rotary_torch(q, pos, inv), rotary_torch(k, pos, inv))}

    nbytes = 2 * b * l * (hq + hk) * hd * _ITEMSIZE[dtype]
    return Workload(
        id=wid, device=device,
        description=f"rotary q,k b{b} l{l} hq{hq} hk{hk} hd{hd} {dtype}, strided inputs",
        setup=setup,
        floor_ms=1e3 * nbytes / REFERENCE_MACHINES[device]["mem_bytes_per_s"],
        floor_note="H100 estimate: q, k read + written once",
        rtol=_DTYPE_RTOL[dtype],
    )


def hybrid_workloads() -> List[Workload]:
    return [
        _mamba_attention_workload("CH1", "cpu", L=512, N=2, E=512),
        _samba_block_workload("CH2", "cpu", b=1, l=2048, cfg_name="samba-421m", dtype="float32",
                              backward=False),
        _mamba_attention_workload("GH1", "cuda", L=4096, N=4, E=1024, dtype="bfloat16"),
        _samba_block_workload("G10", "cuda", b=4, l=4096, cfg_name="samba-1.7b", dtype="bfloat16",
                              backward=True),
        _samba_decode_workload("G11-1k", "cuda", 1024),
        _samba_decode_workload("G11-16k", "cuda", 16384),
        _samba_decode_workload("G11-64k", "cuda", 65536),
        _rotary_workload("GR1", "cuda"),
    ]


# --------------------------------------------------------------------------
# G6b, G8b: attention forward + backward (CUDA, bf16)
# --------------------------------------------------------------------------


def _attn_fwd_bwd_workload(wid, b, s, hq, hk, hd, causal=True, window=None):
    """flash_attn_func forward + backward (dq, dk, dv), bf16, layout (b, s, h, d),
    fresh leaves each call. FLOPs: forward + 2.5 × forward (the backward's five
    matmuls against the forward's two). Peers, each timed fwd+bwd in the same
    process: SDPA flash (FlashAttention-2) and cuDNN where the mask is plain
    causal (k/v expanded to hq heads inside the call for GQA, so their gradients
    are summed back like ours), flex_attention (torch.compile'd, block mask,
    enable_gqa) for every mask. Each call returns (out, dq, dk, dv)."""
    flops = 3.5 * attn_fwd_flops(b, hq, s, s, hd, causal=causal, window=window)

    def setup():
        import torch
        import torch.nn.functional as F

        from .ops import flash_attn_func

        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, do = (torch.randn(b, s, h, hd, device="cuda", generator=g, dtype=torch.bfloat16)
                       for h in (hq, hk, hk, hq))
        left = -1 if window is None else window - 1

        def step(fwd, layout_bhsd=False):
            def call():
                qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
                if layout_bhsd:
                    o = fwd(*(t.transpose(1, 2) for t in (qq, kk, vv))).transpose(1, 2)
                else:
                    o = fwd(qq, kk, vv)
                dq, dk, dv = torch.autograd.grad(o, (qq, kk, vv), do)
                return o.detach(), dq, dk, dv
            return call

        fns = {"ours": step(lambda qq, kk, vv: flash_attn_func(
            qq, kk, vv, causal=causal, window_size=(left, -1 if causal else left)))}
        if window is None:
            try:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                def sdpa(backend):
                    def fn(qt, kt, vt):
                        if hq != hk:
                            kt, vt = (t.repeat_interleave(hq // hk, dim=1) for t in (kt, vt))
                        with sdpa_kernel(backend):
                            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                    return fn

                fns["SDPA flash (FA2)"] = step(sdpa(SDPBackend.FLASH_ATTENTION), True)
                fns["SDPA cuDNN"] = step(sdpa(SDPBackend.CUDNN_ATTENTION), True)
            except ImportError:
                pass
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            def mask_mod(bb, hh, qi, kj):
                m = kj <= qi if causal else (kj >= 0)
                if window is not None:
                    m = m & (qi - kj < window)
                    if not causal:
                        m = m & (kj - qi < window)
                return m

            bm = create_block_mask(mask_mod, None, None, s, s, device="cuda")
            flex = torch.compile(flex_attention, dynamic=False)
            fns["flex_attention"] = step(
                lambda qt, kt, vt: flex(qt, kt, vt, block_mask=bm, enable_gqa=hq != hk), True)
        except Exception:  # noqa: BLE001 - flex unavailable on this torch
            pass
        return fns

    mask = "causal" if causal and window is None else (
        f"window {window}{' causal' if causal else ''}" if window else "full")
    return Workload(
        id=wid,
        device="cuda",
        description=f"flash_attn fwd+bwd bf16 {mask} b{b} s{s} hq{hq} hk{hk} hd{hd} "
                    f"({flops / 1e12:.3g} TFLOP)",
        setup=setup,
        floor_ms=1e3 * flops / ATTN_TFLOPS_REF,
        floor_note="FLOPs (3.5 × forward, BENCHMARKS.md convention) at 800 TFLOP/s bf16: "
                   "TFLOP/s = 800 × floor fraction",
        rtol=3e-2,
    )


def attention_bwd_workloads() -> List[Workload]:
    """G6b, G8b: the G6 and G8 shapes, forward + backward."""
    return [
        _attn_fwd_bwd_workload("G6b", b=4, s=8192, hq=32, hk=32, hd=128, causal=True),
        _attn_fwd_bwd_workload("G8b", b=2, s=16384, hq=32, hk=8, hd=128, causal=True, window=2048),
    ]


# --------------------------------------------------------------------------
# CF1 / GF1: fused causal conv1d + selective scan (issue 5, item 3)
# --------------------------------------------------------------------------


def _conv_scan_workload(wid, device, b, d, n, l, w=4, g=1, dtype="float32", backward=False):
    """conv_selective_scan_fn (the conv + SiLU fused into the scan) against the unfused
    pair causal_conv1d_fn → selective_scan_fn on the same inputs: x, delta, z, B, C in
    ``dtype``; conv weight / bias, A, D, delta_bias float32; z, D, Δbias, softplus.
    ``backward``: forward + backward (gradients of every input) through autograd; each
    call returns (out, dx, ddelta, dconv_weight). The ratio is unfused ms / fused ms."""
    main = {k: dtype for k in ("x", "delta", "z", "B", "C")}
    names = ("x", "conv_weight", "conv_bias", "delta", "A", "B", "C", "D", "z", "delta_bias")

    def setup():
        from . import ops

        ins, is_torch = _make_inputs(
            device,
            seed=4,
            dtypes=main,
            x=lambda r: r.standard_normal((b, d, l)),
            conv_weight=lambda r: r.standard_normal((d, w)) / math.sqrt(w),
            conv_bias=lambda r: r.standard_normal(d) * 0.3,
            delta=lambda r: r.standard_normal((b, d, l)) * 0.5 - 2.0,
            A=lambda r: -np.tile(np.arange(1, n + 1, dtype=np.float64), (d, 1)),
            B=lambda r: r.standard_normal((b, g, n, l)),
            C=lambda r: r.standard_normal((b, g, n, l)),
            D=lambda r: r.standard_normal(d),
            z=lambda r: r.standard_normal((b, d, l)),
            delta_bias=lambda r: r.uniform(-4.0, -1.0, d),
        )
        kw = dict(delta_softplus=True)

        def fused(a):
            return ops.conv_selective_scan_fn(**a, activation="silu", **kw)

        def unfused(a):
            u = ops.causal_conv1d_fn(a["x"], a["conv_weight"], a["conv_bias"], activation="silu")
            rest = {k: v for k, v in a.items() if k not in ("x", "conv_weight", "conv_bias")}
            return ops.selective_scan_fn(u, **rest, **kw)

        if not backward:
            return {"ours": lambda: fused(ins), "unfused conv1d + scan": lambda: unfused(ins)}
        import torch

        leaves = {k: v.detach().requires_grad_() for k, v in ins.items()}
        gen = torch.Generator().manual_seed(5)
        dout = torch.randn(b, d, l, generator=gen).to(device=device, dtype=ins["x"].dtype)
        want = [leaves[k] for k in ("x", "delta", "conv_weight")]

        def run(fn):
            out = fn(leaves)
            grads = torch.autograd.grad(out, want, dout)
            return (out.detach(),) + tuple(grads)

        assert is_torch
        return {"ours": lambda: run(fused), "unfused conv1d + scan": lambda: run(unfused)}

    what = "fwd+bwd" if backward else "fwd"
    m = REFERENCE_MACHINES[device]
    if backward:
        exps = 3 * b * d * l * n
        nbytes = _ITEMSIZE[dtype] * 13 * b * d * l  # the scan's 11 + x read twice
    else:
        exps = b * d * l * n
        nbytes = _ITEMSIZE[dtype] * (4 * b * d * l + 2 * b * g * n * l)  # x, delta, z, out, B, C
    return Workload(
        id=wid,
        device=device,
        description=f"conv_selective_scan_fn {what} {dtype} b{b} d{d} n{n} l{l} g{g} conv w{w}, "
        "bias silu, z D Δbias softplus (peer: the unfused pair)",
        setup=setup,
        floor_ms=1e3 * max(exps / m["exp_per_s"], nbytes / m["mem_bytes_per_s"]),
        floor_note=("H100 estimate: " if device == "cuda" else "")
        + "max(exp(Δ·A) count / exp rate, (b, d, l) tensors read + written / bandwidth)",
        rtol=_DTYPE_RTOL[dtype],
    )


def _mamba_fused_workload(wid, device, b, d_model, l, dtype="float32"):
    """nn.Mamba fwd+bwd with ``fused_conv_scan`` on (ours) against off (the peer), the
    same layer and inputs; each call returns (out, d input, d in_proj.weight, d A_log)."""

    def setup():
        import torch

        from .nn import Mamba

        tdt = getattr(torch, dtype)
        torch.manual_seed(0)
        layer = Mamba(d_model, device=device, dtype=tdt)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(b, l, d_model, generator=gen).to(device=device, dtype=tdt)
        gout = torch.randn(b, l, d_model, generator=gen).to(device=device, dtype=tdt)

        def step(fused):
            def call():
                layer.fused_conv_scan = fused
                xi = x.detach().requires_grad_()
                for p in layer.parameters():
                    p.grad = None
                out = layer(xi)
                out.backward(gout)
                return out.detach(), xi.grad, layer.in_proj.weight.grad, layer.A_log.grad

            return call

        return {"ours": step(True), "unfused layer": step(False)}

    return Workload(
        id=wid,
        device=device,
        description=f"nn.Mamba fwd+bwd {dtype} b{b} d_model{d_model} l{l}, fused_conv_scan "
        "on (ours) vs off (peer)",
        setup=setup,
        rtol={"float32": RTOL, "float16": 2e-2, "bfloat16": 5e-2}[dtype],
    )


def conv_scan_workloads() -> List[Workload]:
    return [
        _conv_scan_workload("CF1", "cpu", b=1, d=1536, n=16, l=2048, w=4),
        _conv_scan_workload("GF1", "cuda", b=8, d=2048, n=16, l=2048, w=4, dtype="bfloat16"),
        _conv_scan_workload("GF1-bwd", "cuda", b=8, d=2048, n=16, l=2048, w=4, dtype="bfloat16",
                            backward=True),
        _mamba_fused_workload("CM1-fused", "cpu", b=1, d_model=256, l=1024),
        _mamba_fused_workload("GM1-fused", "cuda", b=4, d_model=2048, l=4096, dtype="bfloat16"),
    ]
