#!/usr/bin/env python3
"""Compile-check every CUDA kernel in kernels/ with NVRTC, without a GPU.

The library compiles its kernels at run time with NVRTC, exactly like this:
the source handed to NVRTC is ``common.cuh`` followed by one ``*.cu`` file
(kernel files include nothing), compiled to a cubin for the device's real
architecture.  This script does the same for sm_80 and sm_90 (or the
architectures given with --arch) and fails when anything is off:

* a compile error, or any warning in the NVRTC log;
* a ``extern "C" __global__`` kernel named in the source that is missing
  from the cubin's symbol table (a typo or a template never instantiated);
* a kernel that uses a stack frame (local memory: spilled registers or a
  register array indexed at run time), unless --allow-stack is given.

For each kernel it prints the register count and stack frame, read from the
cubin's ELF ``.nv.info`` sections, which is what ``ptxas -v`` would report.

Only the standard library is used (ctypes).  libnvrtc is looked up, in
order, at --nvrtc, $NVRTC_LIB, the pip package ``nvidia-cuda-nvrtc`` of the
project's virtual environment (nvidia/cu13/lib/libnvrtc.so.13, or the
cuda_nvrtc/lib folder of CUDA 12 wheels) on sys.path, then the system
loader's search.

Usage::

    .venv/bin/python bench/kernel_tools/nvrtc_check.py            # all kernels/*.cu
    .venv/bin/python bench/kernel_tools/nvrtc_check.py kernels/selective_scan_fwd.cu
    .venv/bin/python bench/kernel_tools/nvrtc_check.py --arch sm_86 --arch sm_90

Exit status: 0 when every file compiled cleanly for every architecture.
The module also exports ``compile_cubin`` so that GPU test scripts can
compile with exactly the same options.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import re
import struct
import sys

KERNEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "kernels")
COMMON = os.path.join(KERNEL_DIR, "common.cuh")
DEFAULT_ARCHS = ("sm_80", "sm_90")
# The options the library uses (plus --gpu-architecture). Keep in step with
# src/cuda/.
BASE_OPTIONS = ("--std=c++17", "-lineinfo")


# --------------------------------------------------------------------------
# Loading NVRTC
# --------------------------------------------------------------------------

def _candidates(explicit: str | None) -> list[str]:
    out = []
    if explicit:
        out.append(explicit)
    if os.environ.get("NVRTC_LIB"):
        out.append(os.environ["NVRTC_LIB"])
    roots = list(sys.path)
    venv = os.path.join(os.path.dirname(KERNEL_DIR), ".venv", "lib")
    roots += glob.glob(os.path.join(venv, "python3*", "site-packages"))
    for root in roots:
        for sub in ("nvidia/cu13/lib", "nvidia/cuda_nvrtc/lib"):
            out += sorted(glob.glob(os.path.join(root, sub, "libnvrtc.so*")))
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            out += sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so*")))
    out += ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
    # keep order, drop duplicates and the builtins helper library
    seen, res = set(), []
    for c in out:
        if "builtins" in os.path.basename(c) or c in seen:
            continue
        seen.add(c)
        res.append(c)
    return res


def load_nvrtc(explicit: str | None = None) -> ctypes.CDLL:
    errors = []
    for cand in _candidates(explicit):
        try:
            lib = ctypes.CDLL(cand)
        except OSError as e:
            errors.append(f"{cand}: {e}")
            continue
        _declare(lib)
        return lib
    raise SystemExit("nvrtc_check: could not load libnvrtc; tried:\n  " + "\n  ".join(errors))


def _declare(lib: ctypes.CDLL) -> None:
    c_prog = ctypes.c_void_p
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    lib.nvrtcGetErrorString.argtypes = [ctypes.c_int]
    lib.nvrtcVersion.argtypes = [ctypes.POINTER(ctypes.c_int)] * 2
    lib.nvrtcCreateProgram.argtypes = [
        ctypes.POINTER(c_prog), ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int,
        ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_char_p)]
    lib.nvrtcCompileProgram.argtypes = [c_prog, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    lib.nvrtcGetProgramLogSize.argtypes = [c_prog, ctypes.POINTER(ctypes.c_size_t)]
    lib.nvrtcGetProgramLog.argtypes = [c_prog, ctypes.c_char_p]
    lib.nvrtcGetCUBINSize.argtypes = [c_prog, ctypes.POINTER(ctypes.c_size_t)]
    lib.nvrtcGetCUBIN.argtypes = [c_prog, ctypes.c_char_p]
    lib.nvrtcDestroyProgram.argtypes = [ctypes.POINTER(c_prog)]
    for f in ("nvrtcVersion", "nvrtcCreateProgram", "nvrtcCompileProgram",
              "nvrtcGetProgramLogSize", "nvrtcGetProgramLog", "nvrtcGetCUBINSize",
              "nvrtcGetCUBIN", "nvrtcDestroyProgram"):
        getattr(lib, f).restype = ctypes.c_int


def nvrtc_version(lib: ctypes.CDLL) -> str:
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return f"{major.value}.{minor.value}"


# --------------------------------------------------------------------------
# Compiling
# --------------------------------------------------------------------------

def kernel_source(cu_path: str) -> str:
    """What the host compiles: common.cuh, then the kernel file."""
    with open(COMMON, encoding="utf-8") as f:
        common = f.read()
    with open(cu_path, encoding="utf-8") as f:
        body = f.read()
    return common + "\n" + body


def compile_cubin(lib: ctypes.CDLL, source: str, name: str, arch: str,
                  extra: tuple[str, ...] = ()) -> tuple[bool, str, bytes]:
    """Returns (ok, log, cubin)."""
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None)
    if rc != 0:
        return False, f"nvrtcCreateProgram: {lib.nvrtcGetErrorString(rc).decode()}", b""
    try:
        opts = [f"--gpu-architecture={arch}", *BASE_OPTIONS, *extra]
        arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, buf)
        log = buf.value.decode(errors="replace").strip()
        if rc != 0:
            return False, log or lib.nvrtcGetErrorString(rc).decode(), b""
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        rc = lib.nvrtcGetCUBIN(prog, cubin)
        if rc != 0:
            return False, f"nvrtcGetCUBIN: {lib.nvrtcGetErrorString(rc).decode()}", b""
        return True, log, cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


# --------------------------------------------------------------------------
# Reading the cubin (ELF64): kernel symbols, registers, stack frame
# --------------------------------------------------------------------------

EIATTR_FRAME_SIZE = 0x11
EIATTR_MAX_STACK_SIZE = 0x23
EIATTR_REGCOUNT = 0x2F


def _sections(elf: bytes):
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    secs = []
    for i in range(shnum):
        name, typ, flags, addr, off, size, link, info, align, entsize = struct.unpack_from(
            "<IIQQQQIIQQ", elf, shoff + i * shentsize)
        secs.append(dict(name_off=name, type=typ, off=off, size=size, link=link, info=info,
                         entsize=entsize))
    strtab = secs[shstrndx]

    def cstr(tab, o):
        start = tab["off"] + o
        return elf[start:elf.index(b"\0", start)].decode()

    for s in secs:
        s["name"] = cstr(strtab, s["name_off"])
    return secs, cstr


def kernel_info(cubin: bytes) -> dict[str, dict[str, int]]:
    """{kernel name: {"regs": n, "frame": bytes, "stack": bytes}} from the cubin."""
    secs, cstr = _sections(cubin)
    symtab = next(s for s in secs if s["type"] == 2)  # SHT_SYMTAB
    strtab = secs[symtab["link"]]
    syms = []
    for i in range(symtab["size"] // 24):
        st_name, st_info, st_other, st_shndx, st_value, st_size = struct.unpack_from(
            "<IBBHQQ", cubin, symtab["off"] + 24 * i)
        syms.append((cstr(strtab, st_name), st_info, st_shndx))
    kernels = {}
    for name, st_info, shndx in syms:
        # global (binding 1) functions (type 2) that own a .text.<name> section
        if st_info >> 4 == 1 and st_info & 0xF == 2 and 0 < shndx < len(secs) \
                and secs[shndx]["name"] == ".text." + name:
            kernels[name] = {"regs": -1, "frame": 0, "stack": 0}
    # Attributes: format byte, attribute byte, then a 2-byte value (format 3)
    # or a 2-byte size and that many bytes (format 4). The per-module .nv.info
    # holds (symbol index, value) pairs for REGCOUNT / FRAME_SIZE / stack.
    for s in secs:
        if not s["name"].startswith(".nv.info"):
            continue
        pos, end = s["off"], s["off"] + s["size"]
        while pos + 2 <= end:
            fmt, attr = cubin[pos], cubin[pos + 1]
            pos += 2
            if fmt == 1:
                continue
            if fmt == 2:
                pos += 1
                continue
            (val,) = struct.unpack_from("<H", cubin, pos)
            pos += 2
            if fmt != 4:
                continue
            payload = cubin[pos:pos + val]
            pos += val
            key = {EIATTR_REGCOUNT: "regs", EIATTR_FRAME_SIZE: "frame",
                   EIATTR_MAX_STACK_SIZE: "stack"}.get(attr)
            if key and len(payload) == 8:
                sym, v = struct.unpack("<II", payload)
                if sym < len(syms) and syms[sym][0] in kernels:
                    kernels[syms[sym][0]][key] = v
    return kernels


def declared_kernels(source: str) -> list[str]:
    """Names of extern "C" __global__ functions written in the source."""
    pat = re.compile(r'extern\s+"C"\s+__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?'
                     r'void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(')
    return pat.findall(source)


# --------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", help="kernel files (default: kernels/*.cu)")
    ap.add_argument("--nvrtc", help="path to libnvrtc.so")
    ap.add_argument("--arch", action="append", help="sm_XY (repeatable; default sm_80, sm_90)")
    ap.add_argument("--allow-stack", action="store_true",
                    help="do not fail on kernels that use a stack frame (local memory)")
    ap.add_argument("--opt", action="append", default=[], help="extra NVRTC option (repeatable)")
    args = ap.parse_args(argv)

    lib = load_nvrtc(args.nvrtc)
    archs = args.arch or list(DEFAULT_ARCHS)
    files = args.files or sorted(glob.glob(os.path.join(KERNEL_DIR, "*.cu")))
    print(f"NVRTC {nvrtc_version(lib)}; archs {', '.join(archs)}; options "
          f"{' '.join(BASE_OPTIONS + tuple(args.opt))}")
    failed = False
    for path in files:
        src = kernel_source(path)
        declared = declared_kernels(src)
        for arch in archs:
            tag = f"{os.path.basename(path)} [{arch}]"
            ok, log, cubin = compile_cubin(lib, src, os.path.basename(path), arch, tuple(args.opt))
            if log:
                print(f"--- {tag}: NVRTC log ---\n{log}\n---")
            if not ok:
                print(f"FAIL {tag}: compile error")
                failed = True
                continue
            if log:
                print(f"FAIL {tag}: the log is not empty (warnings count as errors)")
                failed = True
            info = kernel_info(cubin)
            missing = [k for k in declared if k not in info]
            if missing:
                print(f"FAIL {tag}: declared kernels missing from the cubin: {missing}")
                failed = True
            if not info:
                print(f"FAIL {tag}: no kernel in the cubin")
                failed = True
            print(f"ok   {tag}: {len(cubin)} bytes, {len(info)} kernels")
            for name in sorted(info):
                k = info[name]
                spill = k["frame"] > 0 or k["stack"] > 0
                flag = "  <-- stack frame (local memory)" if spill else ""
                print(f"       {name:48s} regs {k['regs']:3d}  frame {k['frame']:4d} B{flag}")
                if spill and not args.allow_stack:
                    failed = True
    print("FAILED" if failed else "all kernels compiled cleanly")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
