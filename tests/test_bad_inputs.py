"""Property-based bad-input suite (issue 15): every public function of
``mamba_attention`` and every ``mamba_attention.nn`` module, called with one
argument of a valid call mutated at a time.

Mutations: the dtype, the rank, one dimension, a zero-size dimension, the strides
(transposed storage, negative strides (NumPy), zero strides), the negative and
conjugate bits (torch), NaN / Inf values, aliasing with an argument written in
place, huge integers and wrong Python types; torch inputs with and without
``requires_grad``. Each outcome must be one of:

- ``T`` / ``V``: a TypeError / ValueError whose message names the argument (for
  the first tensor of a call, whose sizes define the others', and in modules,
  whose errors may come from the op they call: any argument); ``VT``: either;
- ``EQUAL``: accepted, with the result (and every buffer written in place) of
  the unmutated call: transposed or zero-stride storage, negative strides, the
  negative bit, NumPy scalars for ints, floats and flags, any pair for
  window_size;
- ``OK``: accepted: NaN / Inf (SPEC says where they propagate; the NaN-isolation
  tests check that), a size that the call leaves free (q's length, ...);
  ``OK_V``: accepted or a ValueError naming the argument.

The defaults per mutation are in ``default_expect``; the documented exceptions
per function are the ``accept`` tables of the specs below.

Crashes (a segfault, an abort) must not take pytest down: the cases run in one
worker subprocess (this file run with ``--worker``), one JSON line per case; a
worker that dies is restarted and the case that killed it reported, as is a case
that hangs (``Worker.TIMEOUT``). The worker's memory is capped
(``BAD_INPUTS_MEMORY_MB``, default 4096), so that a size read wrong fails there
instead of exhausting the machine. CPU only: the CUDA paths' argument checks are
the same Rust checks (tests/test_args.py runs them on the "cuda" target).

The enumeration covers every (argument, mutation) of every target with fixed
sizes; the hypothesis tests add random small (odd, distinct) sizes and a random
choice of cases, derandomized so CI is reproducible.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import traceback

import numpy as np

if __name__ != "__main__":
    import pytest

    pytest.importorskip("torch")
    pytest.importorskip("hypothesis")
    pytest.importorskip("mamba_attention._core")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

T, V, EQUAL, OK = "T", "V", "EQUAL", "OK"
OK_V = "OK|V"  # accepted, or a ValueError naming the argument
# ``V|T``: either kind (both are the SPEC's argument errors; which one depends on
# whether the mutated value is read as a shape or as a kind, e.g. a rank-0 array).
VT = "V|T"


# ------------------------------------------------------------------ the specs

class TArg:
    """A tensor argument: ``shape(dims)``, values from ``make(rng, shape)`` (float32
    normal by default), ``kind`` "float" or "int" (int32; "int64" for token ids)."""

    def __init__(self, shape, make=None, kind="float", optional=False, written=False,
                 grad=True):
        self.shape, self.make, self.kind = shape, make, kind
        self.optional, self.written, self.grad = optional, written, grad


class SArg:
    """A scalar argument: ``kind`` flag / int / float / window / str / dtype; its valid
    ``value``; ``none_ok``: None is a valid value."""

    def __init__(self, kind, value, none_ok=False, minimum=None, choices=None):
        self.kind, self.value, self.none_ok = kind, value, none_ok
        self.minimum, self.choices = minimum, choices


class Spec:
    """A target: ``call(a) -> outputs`` with the argument dict ``a``; ``args`` in call
    order; ``primary``: the argument whose sizes define the others'; ``accept``:
    {(arg, mutation): outcome} overriding ``default_expect`` (mutation names as in
    ``mutations``, or (arg, "*") for all of an argument's shape mutations);
    ``frameworks``: "numpy" / "torch" / "torch+grad"; ``dims``: fixed sizes and
    hypothesis ranges."""

    def __init__(self, name, call, args, dims, primary, accept=None,
                 frameworks=("numpy", "torch", "torch+grad"), module=False, any_name=False,
                 free=None, names=None):
        self.name, self.call, self.args, self.dims = name, call, args, dims
        self.free, self.names = free, names or {}
        self.primary, self.accept = primary, accept or {}
        self.frameworks, self.module, self.any_name = frameworks, module, any_name


def normal(rng, shape):
    return rng.standard_normal(shape).astype(np.float32) + 0.1


def positive(rng, shape):
    return (rng.random(shape) * 0.5 + 0.05).astype(np.float32)


def negative(rng, shape):
    return -(rng.random(shape) + 0.1).astype(np.float32)


def bias(rng, shape):
    return (rng.standard_normal(shape) * 0.2).astype(np.float32)


def _scan_args(u="u"):
    return {
        u: TArg(lambda D: (D["b"], D["d"], D["l"])),
        "delta": TArg(lambda D: (D["b"], D["d"], D["l"]), positive),
        "A": TArg(lambda D: (D["d"], D["n"]), negative),
        "B": TArg(lambda D: (D["b"], D["n"], D["l"])),
        "C": TArg(lambda D: (D["b"], D["n"], D["l"])),
        "D": TArg(lambda D: (D["d"],), optional=True),
        "z": TArg(lambda D: (D["b"], D["d"], D["l"]), optional=True),
        "delta_bias": TArg(lambda D: (D["d"],), bias, optional=True),
    }


SCAN_DIMS = dict(b=2, d=5, l=7, n=3)


def _attn_scalars(kvcache=False):
    s = {
        "softmax_scale": SArg("float", 0.3, none_ok=True),
        "causal": SArg("flag", True),
        "window_size": SArg("window", (3, 1)),
        # None means 0 (no softcap), as the default does.
        "softcap": SArg("float", 5.0, minimum=0.0, none_ok=True),
    }
    if not kvcache:
        s["deterministic"] = SArg("flag", False)
        s["return_attn_probs"] = SArg("flag", True)
        s["dropout_p"] = SArg("float", 0.0, choices=(0.0,))
    else:
        s["return_softmax_lse"] = SArg("flag", True)
    return s


def _attn_kwargs(a, kvcache=False):
    keys = ["softmax_scale", "causal", "window_size", "softcap", "alibi_slopes"]
    keys += ["return_softmax_lse"] if kvcache else ["deterministic", "return_attn_probs",
                                                    "dropout_p"]
    return {k: a[k] for k in keys if k in a}


def _cu(rng, shape):
    # b + 1 offsets; the sizes the specs use: (0, 2, 5) for q, (0, 3, 6) for k.
    return np.array([0, 2, 5][: shape[0]] if shape[0] <= 3 else range(shape[0]), np.int32)


def _cu_k(rng, shape):
    return np.array([0, 3, 6][: shape[0]] if shape[0] <= 3 else range(shape[0]), np.int32)


def _specs():
    import mamba_attention as ma

    specs = []
    # --- SPEC §1 selective scan
    args = _scan_args()
    args["initial_state"] = TArg(lambda D: (D["b"], D["d"], D["n"]), optional=True)
    args["delta_softplus"] = SArg("flag", True)
    args["return_last_state"] = SArg("flag", True)
    specs.append(Spec(
        "selective_scan_fn",
        lambda a: ma.selective_scan_fn(**a),
        args, SCAN_DIMS, "u",
        accept={
            # A sets n: a larger n is reported where B, C and initial_state disagree.
            ("A", "dim1+1"): (V, ("B", "C", "initial_state")),
        }))
    for with_idx in (False, True):
        b_c = "c" if with_idx else "b"  # with indices: a cache of b + 2 states
        args = {
            "state": TArg(lambda D, k=b_c: (D["b"] + (2 if k == "c" else 0), D["d"], D["n"]),
                          written=True, grad=False),
            "x": TArg(lambda D: (D["b"], D["d"])),
            "dt": TArg(lambda D: (D["b"], D["d"]), positive),
            "A": TArg(lambda D: (D["d"], D["n"]), negative),
            "B": TArg(lambda D: (D["b"], D["n"])),
            "C": TArg(lambda D: (D["b"], D["n"])),
            "D": TArg(lambda D: (D["d"],), optional=True),
            "z": TArg(lambda D: (D["b"], D["d"]), optional=True),
            "dt_bias": TArg(lambda D: (D["d"],), bias, optional=True),
            "dt_softplus": SArg("flag", True),
        }
        accept = {("A", "dim1+1"): (V, ("state", "B", "C"))}
        if with_idx:
            args["state_batch_indices"] = TArg(
                lambda D: (D["b"],), kind="int", optional=True,
                make=lambda rng, shape: np.arange(shape[0], dtype=np.int32)[::-1].copy())
            # The state's first dimension is the cache size, free with indices; a
            # repeated index is refused (two entries would update one row).
            accept[("state", "dim0+1")] = OK
            accept[("state_batch_indices", "zero_stride")] = V
        specs.append(Spec(
            "selective_state_update" + ("[indices]" if with_idx else ""),
            lambda a: ma.selective_state_update(**a),
            args, dict(b=2, d=5, n=3), "x", accept=accept))
    # --- SPEC §2 causal conv1d
    specs.append(Spec(
        "causal_conv1d_fn",
        lambda a: ma.causal_conv1d_fn(**a),
        {
            "x": TArg(lambda D: (D["b"], D["d"], D["l"])),
            "weight": TArg(lambda D: (D["d"], D["w"])),
            "bias": TArg(lambda D: (D["d"],), bias, optional=True),
            "initial_states": TArg(lambda D: (D["b"], D["d"], D["w"] - 1), optional=True),
            "return_final_states": SArg("flag", True),
            "activation": SArg("str", "silu", none_ok=True, choices=("silu", "swish")),
        },
        dict(b=2, d=5, l=7, w=4), "x",
        accept={
            ("x", "dim2+1"): OK,  # l
            # weight's width w sets initial_states' size (w in 2..8).
            ("weight", "dim1+1"): (V, ("initial_states",)),
        }))
    for with_lens in (False, True):
        args = {
            "x": TArg(lambda D: (D["b"], D["d"])),
            "conv_state": TArg(lambda D: (D["b"], D["d"], D["s"]), written=True, grad=False),
            "weight": TArg(lambda D: (D["d"], D["w"])),
            "bias": TArg(lambda D: (D["d"],), bias, optional=True),
            "activation": SArg("str", "silu", none_ok=True, choices=("silu", "swish")),
        }
        accept = {
            # x (b, d, l_new) is the multi-token form; state_len ≥ w - 1 is free.
            ("x", "rank+1"): VT, ("conv_state", "dim2+1"): OK, ("weight", "dim1+1"): OK,
        }
        if with_lens:
            args["cache_seqlens"] = TArg(
                lambda D: (D["b"],), kind="int", optional=True,
                make=lambda rng, shape: np.arange(3, 3 + shape[0], dtype=np.int32))
        specs.append(Spec(
            "causal_conv1d_update" + ("[cache_seqlens]" if with_lens else ""),
            lambda a: ma.causal_conv1d_update(**a),
            args, dict(b=2, d=5, w=4, s=5), "x", accept=accept))
    # --- RMSNorm, SwiGLU
    specs.append(Spec(
        "rms_norm_fn",
        lambda a: ma.rms_norm_fn(**a),
        {
            "x": TArg(lambda D: (D["r"], D["c"], D["h"])),
            "weight": TArg(lambda D: (D["h"],)),
            "bias": TArg(lambda D: (D["h"],), bias, optional=True),
            "residual": TArg(lambda D: (D["r"], D["c"], D["h"]), optional=True),
            "prenorm": SArg("flag", True),
            "residual_in_fp32": SArg("flag", False),
            "eps": SArg("float", 1e-5, minimum=0.0),
        },
        dict(r=2, c=3, h=9), "x"))
    specs.append(Spec(
        "swiglu", lambda a: ma.swiglu(**a),
        {"gate": TArg(lambda D: (D["r"], D["c"], D["h"])),
         "up": TArg(lambda D: (D["r"], D["c"], D["h"]))},
        dict(r=2, c=3, h=9), "gate",
        accept={("gate", "rank+1"): V, ("up", "rank+1"): V}))
    # --- SPEC §4 hidden attention
    args = {k: v for k, v in _scan_args("delta").items() if k in ("delta", "A", "B", "C",
                                                                  "delta_bias")}
    args["delta"] = TArg(lambda D: (D["b"], D["d"], D["l"]), positive)
    args["delta_softplus"] = SArg("flag", True)
    args["reduce"] = SArg("str", "mean", none_ok=True, choices=("mean",))
    specs.append(Spec("hidden_attention", lambda a: ma.hidden_attention(**a), args,
                      SCAN_DIMS, "delta", frameworks=("numpy", "torch"),
                      accept={("A", "dim1+1"): (V, ("B", "C"))}))
    # --- SPEC §3 attention
    qkv = {
        "q": TArg(lambda D: (D["b"], D["sq"], D["hq"], D["hd"])),
        "k": TArg(lambda D: (D["b"], D["sk"], D["hk"], D["hd"])),
        "v": TArg(lambda D: (D["b"], D["sk"], D["hk"], D["hd"])),
    }
    attn_dims = dict(b=2, sq=5, sk=6, hq=4, hk=2, hd=8)
    alibi = TArg(lambda D: (D["hq"],), positive, optional=True, grad=False)
    specs.append(Spec(
        "flash_attn_func",
        lambda a: ma.flash_attn_func(a["q"], a["k"], a["v"], **_attn_kwargs(a)),
        {**qkv, "alibi_slopes": alibi, **_attn_scalars()}, attn_dims, "q",
        accept={("q", "dim1+1"): OK, ("k", "dim1+1"): V, ("dropout_p", "+1"): V}))
    specs.append(Spec(
        "flash_attn_varlen_func",
        lambda a: ma.flash_attn_varlen_func(a["q"], a["k"], a["v"], a["cu_seqlens_q"],
                                            a["cu_seqlens_k"], a["max_seqlen_q"],
                                            a["max_seqlen_k"], **_attn_kwargs(a)),
        {
            "q": TArg(lambda D: (D["tq"], D["hq"], D["hd"])),
            "k": TArg(lambda D: (D["tk"], D["hk"], D["hd"])),
            "v": TArg(lambda D: (D["tk"], D["hk"], D["hd"])),
            "cu_seqlens_q": TArg(lambda D: (3,), _cu, kind="int"),
            "cu_seqlens_k": TArg(lambda D: (3,), _cu_k, kind="int"),
            "max_seqlen_q": SArg("int", 3, minimum=0),
            "max_seqlen_k": SArg("int", 3, minimum=0),
            "alibi_slopes": alibi,
            **_attn_scalars(),
        },
        dict(tq=6, tk=7, hq=4, hk=2, hd=8), "q",
        accept={
            # Rows past the last offset are free (they get 0); a larger maximum is fine.
            ("q", "dim0+1"): OK, ("k", "dim0+1"): V, ("dropout_p", "+1"): V,
        }))
    specs.append(Spec(
        "flash_attn_with_kvcache",
        lambda a: ma.flash_attn_with_kvcache(a["q"], a["k_cache"], a["v_cache"], a["k"], a["v"],
                                             a["cache_seqlens"], **_attn_kwargs(a, True)),
        {
            "q": TArg(lambda D: (D["b"], D["sq"], D["hq"], D["hd"])),
            "k_cache": TArg(lambda D: (D["b"], D["sc"], D["hk"], D["hd"]), written=True,
                            grad=False),
            "v_cache": TArg(lambda D: (D["b"], D["sc"], D["hk"], D["hd"]), written=True,
                            grad=False),
            "k": TArg(lambda D: (D["b"], D["sn"], D["hk"], D["hd"]), optional=True),
            "v": TArg(lambda D: (D["b"], D["sn"], D["hk"], D["hd"]), optional=True),
            "cache_seqlens": TArg(lambda D: (D["b"],), kind="int",
                                  make=lambda rng, s: (np.arange(s[0]) % 4 + 1).astype(np.int32)),
            "alibi_slopes": alibi,
            **_attn_scalars(kvcache=True),
        },
        dict(b=2, sq=3, sc=7, sn=2, hq=4, hk=2, hd=8), "q",
        accept={
            # The query length and the cache length are free (within the cache).
            ("q", "dim1+1"): OK, ("k_cache", "dim1+1"): V, ("k", "dim1+1"): V,
            # k / v only together; appending needs cache_seqlens.
            ("k", "None"): V, ("v", "None"): V, ("cache_seqlens", "None"): V,
            # cache_seqlens is an int or a (b,) tensor: a 0-d torch tensor reads as
            # an int (its __index__); a 0-d NumPy array is refused.
            ("cache_seqlens", "rank-1"): OK_V,
        },
        frameworks=("numpy", "torch")))
    specs.append(Spec(
        "sliding_window_attention",
        lambda a: ma.sliding_window_attention(a["q"], a["k"], a["v"], a["window"]),
        {**qkv, "window": SArg("int", 3, minimum=1)},
        attn_dims, "q", accept={("q", "dim1+1"): OK, ("k", "dim1+1"): V,
                                ("window", "huge"): V}))
    specs.append(Spec(
        "SlidingWindowKVCache",
        _ring_call,
        {
            "batch": SArg("int", 2, minimum=1),
            "window": SArg("int", 4, minimum=1),
            "n_kv_heads": SArg("int", 2, minimum=1),
            "head_dim": SArg("int", 8, minimum=1),
            "pos": SArg("int", 6, minimum=0),
            "q": TArg(lambda D: (D["b"], D["n"], D["hq"], D["hd"])),
            "k": TArg(lambda D: (D["b"], D["n"], D["hk"], D["hd"])),
            "v": TArg(lambda D: (D["b"], D["n"], D["hk"], D["hd"])),
            "softmax_scale": SArg("float", 0.3, none_ok=True),
            "softcap": SArg("float", 5.0, minimum=0.0, none_ok=True),
            "alibi_slopes": alibi,
        },
        dict(b=2, n=3, hq=4, hk=2, hd=8), "q",
        accept={
            # The constructor's sizes must match q/k/v: a wrong one names k_ring / q.
            ("batch", "+1"): V, ("n_kv_heads", "+1"): V, ("head_dim", "+1"): V,
            ("window", "+1"): OK, ("pos", "+1"): OK, ("pos", "huge"): VT,
            ("q", "dim1+1"): V,
        },
        frameworks=("numpy", "torch"), any_name=True, free=("n",)))
    args = _scan_args("x")
    args["x"] = TArg(lambda D: (D["b"], D["d"], D["l"]))
    args = {"x": args.pop("x"), "conv_weight": TArg(lambda D: (D["d"], D["w"])),
            "conv_bias": TArg(lambda D: (D["d"],), bias, optional=True), **args}
    args["initial_state"] = TArg(lambda D: (D["b"], D["d"], D["n"]), optional=True)
    args["delta_softplus"] = SArg("flag", True)
    args["activation"] = SArg("str", "silu", none_ok=True, choices=("silu", "swish"))
    args["return_last_state"] = SArg("flag", True)
    specs.append(Spec(
        "conv_selective_scan_fn",
        lambda a: ma.conv_selective_scan_fn(**a),
        args, dict(SCAN_DIMS, w=4), "x",
        accept={("conv_weight", "dim1+1"): OK,
                ("A", "dim1+1"): (V, ("B", "C", "initial_state"))}))
    specs += _nn_specs()
    return {s.name: s for s in specs}


def _ring_call(a):
    import mamba_attention as ma

    q = a["q"]
    if isinstance(q, np.ndarray):
        dtype = "float32"
    else:
        import torch

        dtype = torch.float32
    cache = ma.SlidingWindowKVCache(a["batch"], a["window"], a["n_kv_heads"], a["head_dim"],
                                    dtype=dtype)
    rng = np.random.default_rng(7)
    for t in (cache.k, cache.v):  # fresh values, not zeros
        t[...] = _like(t, normal(rng, tuple(t.shape)))
    cache.pos = a["pos"]
    out = cache.append_and_attend(q, a["k"], a["v"], softmax_scale=a["softmax_scale"],
                                  softcap=a["softcap"], alibi_slopes=a["alibi_slopes"])
    return out, cache.k, cache.v, cache.pos


def _like(t, arr):
    if isinstance(t, np.ndarray):
        return arr
    import torch

    return torch.from_numpy(arr)


# ------------------------------------------------------------------- nn modules

def _nn_specs():
    import torch

    import mamba_attention.nn as mnn

    def module(cls, ctor, a, seed=0):
        torch.manual_seed(seed)
        return cls(**{k: a[k] for k in ctor})

    def ctor_args(**kw):
        return {k: v for k, v in kw.items()}

    specs = []
    d = 16
    mamba_ctor = ctor_args(d_model=SArg("int", d, minimum=1), d_state=SArg("int", 4, minimum=1),
                           d_conv=SArg("int", 4, minimum=2), expand=SArg("float", 2, minimum=0),
                           dt_rank=SArg("int", 3, minimum=1))
    specs.append(Spec(
        "nn.Mamba", lambda a: module(mnn.Mamba, mamba_ctor, a)(a["hidden_states"]),
        {**mamba_ctor, "hidden_states": TArg(lambda D: (D["b"], D["l"], d))},
        dict(b=2, l=7), "hidden_states", module=True,
        accept={("d_state", "+1"): OK, ("d_conv", "+1"): OK, ("expand", "+1"): OK,
                ("dt_rank", "+1"): OK, ("d_model", "+1"): V, ("dt_rank", "type:str"): V,
                ("hidden_states", "dim0+1"): OK, ("hidden_states", "dim1+1"): OK}))

    def mamba_step(a):
        m = module(mnn.Mamba, mamba_ctor, a)
        return m.step(a["hidden_states"], a["conv_state"], a["ssm_state"])

    specs.append(Spec(
        "nn.Mamba.step", mamba_step,
        {**mamba_ctor,
         "hidden_states": TArg(lambda D: (D["b"], 1, d)),
         "conv_state": TArg(lambda D: (D["b"], 2 * d, 4), written=True, grad=False),
         "ssm_state": TArg(lambda D: (D["b"], 2 * d, 4), written=True, grad=False)},
        dict(b=2), "hidden_states", module=True,
        accept={("d_state", "+1"): V, ("d_conv", "+1"): V, ("expand", "+1"): V,
                ("dt_rank", "+1"): OK, ("d_model", "+1"): V, ("dt_rank", "type:str"): V,
                ("hidden_states", "dim0+1"): V,
                # A negated view goes through a float32 copy, written back.
                ("ssm_state", "neg_bit"): EQUAL},
        names={"ssm_state": ("state",)}))
    ma_ctor = ctor_args(hidden_size=SArg("int", d, minimum=1), num_heads=SArg("int", 4, minimum=1),
                        window_size=SArg("int", 2, minimum=0, none_ok=True),
                        causal=SArg("flag", True), batch_first=SArg("flag", False))
    specs.append(Spec(
        "nn.MambaAttention", lambda a: module(mnn.MambaAttention, ma_ctor, a)(a["x"]),
        {**ma_ctor, "x": TArg(lambda D: (D["l"], D["b"], d))},
        dict(b=2, l=5), "x", module=True,
        accept={("num_heads", "+1"): V, ("window_size", "+1"): OK, ("hidden_size", "+1"): V,
                ("batch_first", "flip"): OK, ("causal", "flip"): OK,
                ("x", "dim0+1"): OK, ("x", "dim1+1"): OK}))
    swa_ctor = ctor_args(d_model=SArg("int", d, minimum=1), n_heads=SArg("int", 4, minimum=1),
                         n_kv_heads=SArg("int", 2, minimum=1, none_ok=True),
                         window_size=SArg("int", 3, minimum=1))
    specs.append(Spec(
        "nn.SlidingWindowAttention",
        lambda a: module(mnn.SlidingWindowAttention, swa_ctor, a)(a["x"]),
        {**swa_ctor, "x": TArg(lambda D: (D["b"], D["l"], d))},
        dict(b=2, l=5), "x", module=True,
        accept={("n_heads", "+1"): V, ("n_kv_heads", "+1"): V, ("window_size", "+1"): OK,
                ("d_model", "+1"): V, ("x", "dim0+1"): OK, ("x", "dim1+1"): OK}))

    def swa_step(a):
        m = module(mnn.SlidingWindowAttention, swa_ctor, a)
        b = a["x"].shape[0] if hasattr(a["x"], "shape") and a["x"].dim() else 2
        cache = m.allocate_inference_cache(max(b, 1))
        return m.step(a["x"], cache), cache.k, cache.v

    specs.append(Spec(
        "nn.SlidingWindowAttention.step", swa_step,
        {**swa_ctor, "x": TArg(lambda D: (D["b"], 1, d))},
        dict(b=2), "x", module=True,
        accept={("n_heads", "+1"): V, ("n_kv_heads", "+1"): V, ("window_size", "+1"): OK,
                ("d_model", "+1"): V, ("x", "dim0+1"): OK, ("x", "dim1+1"): OK}))
    rms_ctor = ctor_args(hidden_size=SArg("int", d, minimum=1),
                         eps=SArg("float", 1e-5, minimum=0.0))
    specs.append(Spec(
        "nn.RMSNorm",
        lambda a: module(mnn.RMSNorm, rms_ctor, a)(a["x"], a["residual"], prenorm=a["prenorm"],
                                                  residual_in_fp32=a["residual_in_fp32"]),
        {**rms_ctor, "x": TArg(lambda D: (D["b"], D["l"], d)),
         "residual": TArg(lambda D: (D["b"], D["l"], d), optional=True),
         "prenorm": SArg("flag", True), "residual_in_fp32": SArg("flag", False)},
        dict(b=2, l=5), "x", module=True,
        accept={("hidden_size", "+1"): V, ("x", "rank+1"): V}))
    mlp_ctor = ctor_args(in_features=SArg("int", d, minimum=1),
                         hidden_features=SArg("int", 24, minimum=1, none_ok=True))
    specs.append(Spec(
        "nn.GatedMLP", lambda a: module(mnn.GatedMLP, mlp_ctor, a)(a["x"]),
        {**mlp_ctor, "x": TArg(lambda D: (D["b"], D["l"], d))},
        dict(b=2, l=5), "x", module=True,
        accept={("hidden_features", "+1"): OK, ("in_features", "+1"): V, ("x", "rank+1"): OK,
                ("x", "rank-1"): OK, ("x", "dim0+1"): OK, ("x", "dim1+1"): OK}))
    blk_ctor = ctor_args(d_model=SArg("int", d, minimum=1), n_heads=SArg("int", 2, minimum=1),
                         window_size=SArg("int", 3, minimum=1), d_state=SArg("int", 4, minimum=1))
    specs.append(Spec(
        "nn.SambaBlock",
        lambda a: module(mnn.SambaBlock, blk_ctor, a)(a["hidden"], a["residual"]),
        {**blk_ctor, "hidden": TArg(lambda D: (D["b"], D["l"], d)),
         "residual": TArg(lambda D: (D["b"], D["l"], d), optional=True)},
        dict(b=2, l=5), "hidden", module=True,
        accept={("n_heads", "+1"): V, ("window_size", "+1"): OK, ("d_state", "+1"): OK,
                ("d_model", "+1"): V}))

    def blk_step(a):
        m = module(mnn.SambaBlock, blk_ctor, a)
        b = a["hidden"].shape[0] if hasattr(a["hidden"], "shape") and a["hidden"].dim() else 2
        cache = m.allocate_inference_cache(max(b, 1))
        for t in cache[:2]:
            t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(5)))
        h, r = m.step(a["hidden"], a["residual"], cache)
        return h, r, cache[0], cache[1], cache[2].k

    specs.append(Spec(
        "nn.SambaBlock.step", blk_step,
        {**blk_ctor, "hidden": TArg(lambda D: (D["b"], 1, d)),
         "residual": TArg(lambda D: (D["b"], 1, d), optional=True)},
        dict(b=2), "hidden", module=True,
        accept={("n_heads", "+1"): V, ("window_size", "+1"): OK, ("d_state", "+1"): OK,
                ("d_model", "+1"): V}))
    cfg = dict(d_model=d, n_blocks=1, n_heads=2, n_kv_heads=2, head_dim=8, window_size=3,
               d_state=4, vocab_size=50)

    def samba(a):
        torch.manual_seed(0)
        return mnn.Samba(mnn.SambaConfig(**{**cfg, "n_blocks": a["n_blocks"],
                                            "vocab_size": a["vocab_size"]}))

    ids = TArg(lambda D: (D["b"], D["l"]), kind="int64", grad=False,
               make=lambda rng, s: rng.integers(0, 50, s).astype(np.int64))
    specs.append(Spec(
        "nn.Samba", lambda a: samba(a)(a["input_ids"]),
        {"n_blocks": SArg("int", 1, minimum=1), "vocab_size": SArg("int", 50, minimum=1),
         "input_ids": ids},
        dict(b=2, l=5), "input_ids", module=True,
        accept={("n_blocks", "+1"): OK, ("vocab_size", "+1"): OK, ("input_ids", "huge:uint64"): T,
                ("input_ids", "dim1+1"): OK, ("input_ids", "dim0+1"): OK}))

    def samba_step(a):
        m = samba(a)
        b = a["input_ids"].shape[0] if hasattr(a["input_ids"], "shape") and \
            a["input_ids"].dim() else 2
        cache = m.allocate_inference_cache(max(b, 1))
        return m.step(a["input_ids"], cache), cache[0][1]

    specs.append(Spec(
        "nn.Samba.step", samba_step,
        {"n_blocks": SArg("int", 1, minimum=1), "vocab_size": SArg("int", 50, minimum=1),
         "input_ids": TArg(lambda D: (D["b"], 1), kind="int64", grad=False,
                           make=lambda rng, s: rng.integers(0, 50, s).astype(np.int64))},
        dict(b=2), "input_ids", module=True,
        accept={("n_blocks", "+1"): OK, ("vocab_size", "+1"): OK, ("input_ids", "huge:uint64"): T,
                ("input_ids", "dim0+1"): OK}))
    for s in specs:
        s.frameworks = ("torch", "torch+grad")
    return specs


# ------------------------------------------------------------------- mutations

def mutations(spec, framework):
    """Every (arg, mutation) of a spec: names understood by ``apply_mutation``."""
    out = []
    for name, a in spec.args.items():
        if isinstance(a, TArg):
            nd = len(a.shape(spec.dims))
            torch_ = framework != "numpy"
            if a.kind == "float":
                out += [(name, m) for m in ("dtype:int32", "dtype:complex64", "dtype:bool")]
            else:
                out += [(name, m) for m in ("dtype:float32", "huge:uint64")]
            out += [(name, "rank+1"), (name, "rank-1")]
            out += [(name, f"dim{i}+1") for i in range(nd)]
            out += [(name, f"zero{i}") for i in range(nd)]
            if nd >= 2:
                out.append((name, "transposed"))
            if not torch_:
                out.append((name, "negative_strides"))
            out.append((name, "zero_stride"))
            if torch_:
                out.append((name, "neg_bit"))
                if a.kind == "float":
                    out.append((name, "conj_bit"))
            if a.kind == "float":
                out += [(name, "nan"), (name, "inf")]
            if not a.written:
                for w, wa in spec.args.items():
                    if isinstance(wa, TArg) and wa.written:
                        out.append((name, f"alias:{w}"))
            out += [(name, "type:str"), (name, "type:list"), (name, "type:float")]
            if not a.optional:
                out.append((name, "None"))
        else:
            kinds = {
                "flag": ["type:str", "type:int", "None", "type:float", "np_bool", "flip"],
                "int": ["type:float", "type:str", "type:bool", "huge", "np_int", "+1",
                        "below_min"],
                "float": ["type:str", "type:bool", "nan", "np_float", "+1"],
                "window": ["list", "np_array", "type:float_pair", "type:str", "short",
                           "huge", "below_min"],
                "str": ["type:int", "bad_choice"],
            }[a.kind]
            if a.kind in ("int", "float") and not a.none_ok:
                kinds.append("None")
            if a.kind == "float" and a.minimum is not None:
                kinds.append("below_min")
            if a.kind == "float" and a.choices is not None:
                kinds.append("bad_choice")
            out += [(name, m) for m in kinds]
    return out


def default_expect(spec, name, mut):
    """The outcome a mutation must have unless ``spec.accept`` says otherwise."""
    a = spec.args[name]
    if isinstance(a, TArg):
        if mut.startswith("dtype") or mut.startswith("type") or mut in ("None", "conj_bit"):
            return T
        if mut.startswith("rank") or mut.startswith("dim") or mut.startswith("zero") and \
                mut != "zero_stride":
            return V
        if mut == "zero_stride":
            return V if a.written else EQUAL
        if mut in ("transposed", "negative_strides"):
            return EQUAL
        if mut == "neg_bit":
            return T if a.written else EQUAL
        if mut in ("nan", "inf"):
            return OK
        if mut.startswith("alias"):
            # A module reads its input (through its projections) before it writes
            # its state: an input aliasing the state is harmless there.
            return OK if spec.module else V
        if mut == "huge:uint64":
            return V
    else:
        if mut in ("np_bool", "np_int", "np_float", "list", "np_array"):
            return EQUAL
        if mut in ("flip", "+1"):
            return OK
        if mut == "huge" and a.kind == "window":
            return OK  # a bound past every key (even past int64) is unbounded: it saturates
        if mut in ("nan", "huge", "below_min", "bad_choice"):
            return V
        if mut in ("short",):
            return T
        return T
    raise AssertionError(mut)


# ----------------------------------------------------------- building the calls

def _torch():
    import torch

    return torch


def build(spec, framework, dims, seed):
    """The valid call's arguments (fresh objects every time: some are written)."""
    rng = np.random.default_rng(seed)
    a = {}
    for name, arg in spec.args.items():
        if isinstance(arg, SArg):
            a[name] = arg.value
            continue
        shape = arg.shape(dims)
        arr = (arg.make or normal)(rng, shape)
        a[name] = convert(arr, framework, arg)
    return a


def convert(arr, framework, arg=None):
    arr = np.array(arr, order="C")  # a C-contiguous copy; 0-d stays 0-d
    if framework == "numpy":
        return arr
    torch = _torch()
    t = torch.from_numpy(arr).clone()
    if framework == "torch+grad" and arg is not None and arg.grad and t.is_floating_point():
        t.requires_grad_(True)
    return t


def _new_like(x, arr, framework, arg):
    """arr (NumPy) as x's kind (and requires_grad)."""
    return convert(arr, framework, arg)


def _np(x):
    """A NumPy copy of an array / tensor for comparisons."""
    if x is None:
        return None
    if isinstance(x, (int, float, bool)):
        return np.array(x)
    if isinstance(x, np.ndarray):
        return np.array(x, dtype=np.float64) if x.dtype.kind != "c" else np.array(x)
    torch = _torch()
    if isinstance(x, torch.Tensor):
        t = x.detach().resolve_neg().resolve_conj().cpu()
        return t.double().numpy() if not t.is_complex() else t.numpy()
    raise TypeError(type(x))


def apply_mutation(spec, framework, a, name, mut, dims, seed):
    """Returns (baseline args or None, mutated args): baseline is the valid call whose
    result an EQUAL outcome must reproduce (its values may differ from the plain
    valid call's, e.g. rows made equal for a zero-stride view)."""
    arg = spec.args[name]
    rng = np.random.default_rng(seed + 1000)
    x = a[name]
    m = dict(a)
    base = None
    is_np = framework == "numpy"
    torch = None if is_np else _torch()
    if isinstance(arg, TArg):
        shape = tuple(x.shape)
        raw = _np_raw(x)
        if mut.startswith("dtype:"):
            dt = mut.split(":")[1]
            if is_np:
                v = raw.astype(dt)
                if dt == "complex64":
                    v = v + 1j
            else:
                v = torch.from_numpy(raw.astype(dt) if dt != "complex64" else
                                     (raw + 1j).astype(dt))
            m[name] = v
        elif mut == "huge:uint64":
            v = raw.astype(np.uint64)
            v.reshape(-1)[0] = 2**63
            m[name] = v if is_np else torch.from_numpy(v)
        elif mut == "rank+1":
            # A leading dimension of 11, a size no spec uses (so no layout of another
            # rank becomes valid by coincidence).
            m[name] = _new_like(x, np.stack([raw] * 11), framework, arg)
        elif mut == "rank-1":
            m[name] = _new_like(x, np.array(raw[0]), framework, arg)
        elif mut.startswith("dim"):
            i = int(mut[3:-2])
            s = list(shape)
            s[i] += 1
            m[name] = _new_like(x, _values(arg, rng, s, raw), framework, arg)
        elif mut.startswith("zero") and mut != "zero_stride":
            i = int(mut[4:])
            s = list(shape)
            s[i] = 0
            m[name] = _new_like(x, np.zeros(s, raw.dtype), framework, arg)
        elif mut == "transposed":
            m[name] = _transposed(x, framework)
            base = a
        elif mut == "negative_strides":
            axes = [i for i, n in enumerate(shape) if n > 1]
            if not axes:
                return None, None
            i = axes[-1]
            v = np.flip(np.ascontiguousarray(np.flip(raw, i)), i)
            assert v.strides[i] < 0 and np.array_equal(v, raw)
            m[name] = v
            base = a
        elif mut == "zero_stride":
            # The first dimension of size > 1 made a repeat of its first entry: the
            # baseline holds the repeats, the view a zero stride.
            axes = [i for i, n in enumerate(shape) if n > 1]
            if not axes:
                return None, None
            i = axes[0]
            first = np.ascontiguousarray(np.take(raw, [0], axis=i))
            base = dict(a)
            base[name] = _new_like(x, np.ascontiguousarray(np.repeat(first, shape[i], axis=i)),
                                   framework, arg)
            if is_np:
                strides = list(first.strides)
                strides[i] = 0
                v = np.lib.stride_tricks.as_strided(first, shape, strides, writeable=True)
            else:
                v = _new_like(x, first, framework, arg).expand(*shape)
            m[name] = v
        elif mut == "neg_bit":
            v = torch._neg_view(-(x.detach()))
            if x.requires_grad:
                v = v.requires_grad_() if v.is_leaf else v
            m[name] = v
            base = a
        elif mut == "conj_bit":
            m[name] = torch.from_numpy(raw.astype(np.complex64) + 1j).conj()
        elif mut in ("nan", "inf"):
            v = raw.copy()
            if v.size:
                v.reshape(-1)[v.size // 2] = np.nan if mut == "nan" else np.inf
            m[name] = _new_like(x, v, framework, arg)
        elif mut.startswith("alias:"):
            w = a[mut.split(":")[1]]
            n = int(np.prod(shape))
            if int(np.prod(w.shape)) < n or _np_raw(w).dtype != raw.dtype:
                return None, None  # cannot alias: skipped
            if is_np:
                v = w.reshape(-1)[:n].reshape(shape)
            else:
                v = w.detach().reshape(-1)[:n].view(shape)
            m[name] = v
        elif mut == "type:str":
            m[name] = "a string"
        elif mut == "type:list":
            m[name] = raw.tolist()
        elif mut == "type:float":
            m[name] = 1.5
        elif mut == "None":
            m[name] = None
        else:
            raise AssertionError(mut)
        return base, m
    # scalars
    val = arg.value
    if mut == "type:str":
        m[name] = "3"
    elif mut == "type:int":
        m[name] = 1
    elif mut == "type:float":
        m[name] = 1.5 if arg.kind != "window" else (1.5, 0)
    elif mut == "type:bool":
        m[name] = True
    elif mut == "type:float_pair":
        m[name] = (float(val[0]) + 0.5, val[1])
    elif mut == "None":
        m[name] = None
    elif mut == "np_bool":
        m[name], base = np.bool_(val), a
    elif mut == "np_int":
        m[name], base = np.int64(val), a
    elif mut == "np_float":
        m[name], base = np.float32(val), dict(a, **{name: float(np.float32(val))})
    elif mut == "flip":
        m[name] = not val
    elif mut == "+1":
        m[name] = val + 1
    elif mut == "huge":
        m[name] = 2**64 if arg.kind == "int" else (2**64, 0)
    elif mut == "nan":
        m[name] = float("nan")
    elif mut == "below_min":
        if arg.kind == "window":
            m[name] = (-2, val[1])
        else:
            m[name] = (arg.minimum - 1) if arg.kind == "int" else -1.0
    elif mut == "list":
        m[name], base = list(val), a
    elif mut == "np_array":
        m[name], base = np.array(val), a
    elif mut == "short":
        m[name] = (val[0],)
    elif mut == "bad_choice":
        m[name] = "not-a-choice" if arg.kind == "str" else 0.5
    else:
        raise AssertionError(mut)
    return base, m


def _np_raw(x):
    if isinstance(x, np.ndarray):
        return np.array(x)
    return x.detach().resolve_neg().cpu().numpy().copy()


def _values(arg, rng, shape, like):
    if like.dtype.kind in "iu":
        return np.zeros(shape, like.dtype)
    return (arg.make or normal)(rng, tuple(shape))


def _transposed(x, framework):
    """x's values stored with the dimensions reversed (strides in the other order)."""
    if framework == "numpy":
        v = np.asfortranarray(x)
        assert v.shape == x.shape
        return v
    t = x.detach().permute(*reversed(range(x.dim()))).contiguous()
    t = t.permute(*reversed(range(x.dim())))
    return t.requires_grad_() if x.requires_grad else t


# ------------------------------------------------------------------- running

def _flatten(r):
    if isinstance(r, (tuple, list)):
        out = []
        for e in r:
            out += _flatten(e)
        return out
    return [r]


def run_call(spec, framework, args):
    """Runs the call; ("ok", outputs, written) or ("error", type name, message)."""
    torch = None if framework == "numpy" else _torch()
    try:
        if framework == "torch" and spec.module:
            with torch.no_grad():
                r = spec.call(args)
        else:
            r = spec.call(args)
    except (TypeError, ValueError) as e:
        return ("error", type(e).__name__, str(e))
    except Exception as e:  # noqa: BLE001 - any other kind is a failure, reported
        return ("error", type(e).__name__, f"{e}\n{traceback.format_exc(limit=4)}")
    outs = [_np(o) for o in _flatten(r) if o is None or not isinstance(o, str)]
    written = {k: _np(args[k]) for k, v in spec.args.items()
               if isinstance(v, TArg) and v.written and args.get(k) is not None
               and hasattr(args[k], "shape")}
    return ("ok", outs, written)


def _close(a, b):
    if a is None or b is None:
        return a is None and b is None
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and np.allclose(a, b, rtol=1e-5, atol=1e-5, equal_nan=True)


def _names(msg, name, spec, also=()):
    """Whether the message names ``name`` or one of ``also`` (for the primary argument
    and in modules: any argument)."""
    def word(n):
        return re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", msg) is not None

    if word(name) or any(word(n) for n in also + tuple(spec.names.get(name, ()))):
        return True
    if name == spec.primary or spec.module or spec.any_name:
        return any(word(n) for n in spec.args) or word("k_ring") or word("v_ring")
    return False


def evaluate(spec, framework, name, mut, dims, seed):
    """Runs one case; returns None when it passes, else a description of the failure."""
    a = build(spec, framework, dims, seed)
    base, m = apply_mutation(spec, framework, a, name, mut, dims, seed)
    if m is None:
        return None  # not applicable
    want = spec.accept.get((name, mut), default_expect(spec, name, mut))
    want, also = (want, ()) if isinstance(want, str) else want
    if base is not None and want == EQUAL:
        base = {k: v for k, v in base.items()}
        # Fresh written buffers for the baseline (the mutated call writes its own).
        fresh = build(spec, framework, dims, seed)
        for k, v in spec.args.items():
            if isinstance(v, TArg) and v.written and base.get(k) is a.get(k):
                base[k] = fresh[k]
        ref = run_call(spec, framework, base)
        if ref[0] != "ok":
            return f"the baseline failed: {ref[1]}: {ref[2]}"
    got = run_call(spec, framework, m)
    if got[0] == "error":
        kind, msg = got[1], got[2]
        if want in (T, V, VT, OK_V) and kind in ({T: ["TypeError"], V: ["ValueError"],
                                                  VT: ["TypeError", "ValueError"],
                                                  OK_V: ["ValueError"]}[want]):
            if _names(msg, name, spec, also):
                return None
            return f"{kind} does not name {name}: {msg}"
        return f"expected {want}, got {kind}: {msg}"
    if want in (T, V, VT):
        return f"expected a {want} error naming {name}, but the call was accepted"
    if want == EQUAL:
        _, outs, written = got
        _, routs, rwritten = ref
        if len(outs) != len(routs) or not all(_close(x, y) for x, y in zip(outs, routs)):
            return "accepted, but the result differs from the unmutated call's"
        for k in rwritten:
            if not _close(written.get(k), rwritten[k]):
                return f"accepted, but {k} (written in place) differs from the unmutated call's"
    return None


# ------------------------------------------------------------- worker protocol

_SPECS = None


def specs():
    global _SPECS
    if _SPECS is None:
        _SPECS = _specs()
    return _SPECS


def worker_main():
    """Reads one JSON case per line, writes one JSON result per line."""
    import resource

    import torch

    # A runaway allocation (a size read wrong) must fail here, not take the machine.
    limit = int(os.environ.get("BAD_INPUTS_MEMORY_MB", "4096")) << 20
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    torch.set_num_threads(1)
    for line in sys.stdin:
        case = json.loads(line)
        if case["target"] == "__crash__":  # the harness's own test: die as a segfault would
            os.abort()
        try:
            spec = specs()[case["target"]]
            err = evaluate(spec, case["framework"], case["arg"], case["mut"], case["dims"],
                           case["seed"])
        except Exception:  # noqa: BLE001 - a bug of the harness, reported as such
            err = "harness error: " + traceback.format_exc(limit=6)
        sys.stdout.write(json.dumps({"error": err}) + "\n")
        sys.stdout.flush()


class Worker:
    """One subprocess running cases; restarted after a crash."""

    def __init__(self):
        self.p = None

    def start(self):
        env = dict(os.environ, RAYON_NUM_THREADS=os.environ.get("RAYON_NUM_THREADS", "2"),
                   PYTHONFAULTHANDLER="1")
        import tempfile

        # stderr to a file: a pipe nobody reads would block a chatty worker.
        self.err = tempfile.TemporaryFile()
        self.p = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.err, text=True, env=env,
            cwd=os.path.dirname(os.path.abspath(__file__)))

    #: Seconds a case may take (a hang is reported as one).
    TIMEOUT = 120

    def run(self, case):
        import select

        if self.p is None or self.p.poll() is not None:
            self.start()
        try:
            self.p.stdin.write(json.dumps(case) + "\n")
            self.p.stdin.flush()
            ready, _, _ = select.select([self.p.stdout], [], [], self.TIMEOUT)
            line = self.p.stdout.readline() if ready else None
        except BrokenPipeError:
            line = ""
        if line is None:
            self.p.kill()
            self.p.wait()
            self.p = None
            return f"the case hung (no answer within {self.TIMEOUT} s)"
        if not line:
            code = self.p.wait()
            self.err.seek(0)
            err = self.err.read().decode(errors="replace")[-3000:]
            self.p = None
            return f"the worker crashed (exit code {code}):\n{err}"
        return json.loads(line)["error"]

    def close(self):
        if self.p is not None and self.p.poll() is None:
            self.p.stdin.close()
            self.p.wait(timeout=30)


def run_cases(worker, cases):
    failures = []
    for c in cases:
        err = worker.run(c)
        if err:
            failures.append(f"{c['target']} [{c['framework']}] {c['arg']} {c['mut']} "
                            f"dims={c['dims']}: {err}")
    return failures


def all_cases(spec, dims, seed=0):
    cases = []
    for fw in spec.frameworks:
        for arg, mut in mutations(spec, fw):
            cases.append(dict(target=spec.name, framework=fw, arg=arg, mut=mut, dims=dims,
                              seed=seed))
    return cases


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        worker_main()
    sys.exit(0)


# ------------------------------------------------------------------- the tests

TARGETS = sorted(specs())


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


@pytest.mark.parametrize("target", TARGETS)
def test_every_mutation(worker, target):
    """Every (argument, mutation) of ``target`` with its spec's sizes, NumPy and torch,
    with and without requires_grad."""
    spec = specs()[target]
    failures = run_cases(worker, all_cases(spec, spec.dims))
    assert not failures, f"{len(failures)} failing cases:\n" + "\n".join(failures)


def _dims_strategy(spec):
    """Random small sizes for the spec's free sizes (batch, channels, lengths, state
    size; heads, head dims and widths stay): distinct from each other and from the
    fixed ones, so that no mutated shape becomes valid by coincidence."""
    fixed = {"hq", "hk", "hd", "w", "s", "sc", "sn", "tq", "tk"}
    free = sorted(spec.free if spec.free is not None else
                  (k for k in spec.dims if k not in fixed))
    taken = {v for k, v in spec.dims.items() if k not in free}
    values = st.lists(st.integers(1, 9).filter(lambda v: v not in taken), min_size=len(free),
                      max_size=len(free), unique=True)
    return values.map(lambda vs: {**spec.dims, **dict(zip(free, vs))})


@settings(max_examples=10, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck),
          # No shrinking: a failing example is reported as drawn (CI time stays bounded).
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(data=st.data())
def test_random_cases(worker, data):
    """Random sizes (hypothesis, derandomized) and a random choice of the cases of
    every target."""
    failures = []
    for target in TARGETS:
        spec = specs()[target]
        dims = data.draw(_dims_strategy(spec), label=f"{target} dims")
        cases = all_cases(spec, dims, seed=data.draw(st.integers(0, 2**16), label="seed"))
        picks = data.draw(st.lists(st.integers(0, len(cases) - 1), min_size=8, max_size=8,
                                   unique=True), label=f"{target} cases")
        failures += run_cases(worker, [cases[i] for i in picks])
    assert not failures, f"{len(failures)} failing cases:\n" + "\n".join(failures)


def test_worker_reports_crashes(worker):
    """A case that kills the worker (as a segfault or an abort in a kernel would) is
    reported by name, and the next case runs in a fresh worker."""
    spec = specs()["swiglu"]
    good = all_cases(spec, spec.dims)[:1]
    crash = dict(good[0], target="__crash__")
    failures = run_cases(worker, [crash] + good)
    assert len(failures) == 1 and failures[0].startswith("__crash__"), failures
    assert "the worker crashed" in failures[0]


def test_covers_every_public_function_and_module():
    """Every name of ``mamba_attention.__all__`` (but the version) and every module
    class of ``mamba_attention.nn`` has a spec here."""
    import torch

    import mamba_attention as ma
    import mamba_attention.nn as mnn

    covered = {t.split("[")[0] for t in TARGETS}
    public = set(ma.__all__) - {"__version__"}
    modules = {f"nn.{n}" for n in mnn.__all__
               if isinstance(getattr(mnn, n), type) and issubclass(getattr(mnn, n), torch.nn.Module)}
    missing = (public | modules) - covered
    assert not missing, f"no bad-input spec for {sorted(missing)}"
