"""Command line: ``python -m mamba_attention {info,bench}``.

``info``   version, SIMD level, threads, CUDA/NVRTC status, kernel cache path.
``bench``  runs the BENCHMARKS.md workloads that fit this machine and prints a
           table of our time, the peers' times, the ratio and the fraction of
           the (estimated) floor; ``--json PATH`` writes the same as JSON.
           Exits 1 if ours disagrees with a peer (MISMATCH) or fails.
``hidden-attention --out map.png``  draws the channel-mean hidden attention of a
           Mamba layer (random, or --weights) as a heatmap (needs matplotlib).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys


def _core_call(name, *default):
    """Call ``_core.<name>()``; return ``default`` (or an error string) if it is missing or raises."""
    try:
        from . import _core

        return getattr(_core, name)()
    except Exception as e:  # noqa: BLE001 - info must always print something
        return default[0] if default else f"unavailable ({type(e).__name__}: {e})"


def _version():
    try:
        from . import __version__

        return __version__
    except Exception:  # noqa: BLE001
        return None


def _torch():
    try:
        import torch

        return torch
    except ImportError:
        return None


def cpu_model():
    """CPU model name from /proc/cpuinfo, else platform's."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or None


def git_commit():
    """``git rev-parse HEAD`` in the current directory, or None."""
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def cmd_info(args):
    """Print the build and runtime configuration."""
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    levels = _core_call("simd_levels")
    if isinstance(levels, (list, tuple)):
        levels = ", ".join(map(str, levels))
    cuda = _core_call("cuda_info")
    print(f"mamba-attention {_version()}")
    print(f"SIMD level      : {_core_call('simd_level')} (available: {levels})")
    print(f"threads (rayon) : {_core_call('num_threads')}")
    if isinstance(cuda, dict):
        print(f"CUDA driver     : {yes(cuda.get('driver'))}")
        print(f"NVRTC           : {yes(cuda.get('nvrtc'))}")
        if cuda.get("detail"):
            print(f"CUDA detail     : {cuda['detail']}")
    else:
        print(f"CUDA            : {cuda}")
    print(f"kernel cache    : {_core_call('kernel_cache_dir')}")
    torch = _torch()
    if torch is None:
        print("torch           : not installed (NumPy arrays only)")
    else:
        print(f"torch           : {torch.__version__} ({torch.get_num_threads()} threads, "
              f"CUDA available: {yes(torch.cuda.is_available())})")
    print(f"CPU             : {cpu_model()} ({os.cpu_count()} logical cores)")
    return 0


def bench_meta():
    """Where and when a benchmark ran: the ``meta`` object of the JSON."""
    from . import _bench

    torch = _torch()
    gpu = _bench.gpu_meta()
    return {
        "version": _version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "simd_level": _core_call("simd_level", None),
        "threads": _core_call("num_threads", None),
        "torch": None if torch is None else torch.__version__,
        "torch_threads": None if torch is None else torch.get_num_threads(),
        "git_commit": git_commit(),
        "device": None if gpu is None else gpu["name"],
        "gpu": gpu,
    }


def _json_safe(x):
    """Non-finite floats as strings ("inf", "nan"), so the file is strict JSON."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def cmd_bench(args):
    """Run the workloads, print the table, optionally write JSON; 1 on MISMATCH/ERROR."""
    from . import _bench

    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    try:
        wls = _bench.runnable(_bench.workloads(), only)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not wls:
        print("no workload fits this machine", file=sys.stderr)
        return 2
    meta = bench_meta()
    rows = _bench.run(wls, quick=args.quick)
    print(_bench.format_table(rows))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(_json_safe({"meta": meta, "results": rows}), f, indent=2, allow_nan=False)
            f.write("\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if _bench.failed(rows):
        print("FAILED: " + ", ".join(f"{r['id']} {r['status']}" for r in rows
                                     if r["status"] in ("MISMATCH", "ERROR")), file=sys.stderr)
        return 1
    return 0


def cmd_compile_kernels(args):
    """Compile the CUDA kernels through NVRTC for each arch (no GPU needed), through
    the kernel cache unless --no-cache."""
    from . import _core

    failed = False
    modules = [m.strip() for m in args.module.split(",") if m.strip()] if args.module else None
    for arch in [a.strip() for a in args.arch.split(",") if a.strip()]:
        try:
            for module, size, log, cached in _core.compile_kernels(arch, modules, not args.no_cache):
                how = "from the cache" if cached else "compiled"
                print(f"{arch:7s} {module:32s} {size:9d} bytes cubin, {how}" + (f"\n{log}" if log else ""))
        except (RuntimeError, ValueError) as e:
            print(f"{arch}: FAILED\n{e}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


def main(argv=None):
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m mamba_attention", description="mamba-attention: show the configuration (info), run the benchmarks (bench), or compile the CUDA kernels (compile-kernels).")
    sub = parser.add_subparsers(dest="command", metavar="{info,bench,compile-kernels}")
    p = sub.add_parser("info", help="show version, SIMD level, threads, CUDA status, kernel cache")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("bench", help="run the benchmark workloads (BENCHMARKS.md) against their peers")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--only", metavar="IDS", help="comma-separated workload ids, e.g. C1,C6")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (CI smoke test)")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("compile-kernels", help="compile every CUDA kernel through NVRTC into the kernel cache "
                       "(no GPU needed; CI runs it)")
    p.add_argument("--arch", default="sm_80,sm_90", help="comma-separated architectures (default: sm_80,sm_90)")
    p.add_argument("--module", metavar="NAMES", help="comma-separated kernel modules (default: all), e.g. norm")
    p.add_argument("--no-cache", action="store_true",
                   help="compile every module afresh and leave the kernel cache untouched")
    p.set_defaults(func=cmd_compile_kernels)
    from . import _hidden_attention_cli

    _hidden_attention_cli.add_parser(sub)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
