"""Argument handling (issue 15): the negative / conjugate bits of torch tensors,
memory overlap of arguments written in place, out-of-range integers, flags that
are not bools, and the same errors on every path (with gradients, on CUDA).

Each test here is the regression test of one fix; tests/test_bad_inputs.py runs
the property-based sweep over every public function and module.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mamba_attention._core")

import mamba_attention as ma  # noqa: E402
from conftest import cpu_only, cuda_only, on_cuda, sync, target_device  # noqa: E402
from mamba_attention import _core  # noqa: E402
from mamba_attention.ops import (  # noqa: E402
    causal_conv1d_fn, causal_conv1d_update, conv_selective_scan_fn, flash_attn_func,
    flash_attn_varlen_func, flash_attn_with_kvcache, hidden_attention, rms_norm_fn,
    selective_scan_fn, selective_state_update, sliding_window_attention, swiglu)

F = torch.nn.functional


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rnd(*shape, seed=0, dtype=torch.float32, scale=1.0):
    """Fresh random values (never zeros) on the target device."""
    t = torch.randn(*shape, generator=_gen(seed)) * scale + 0.1
    return t.to(dtype=dtype, device=target_device())


def neg_bit(t):
    """A tensor showing t's values whose memory holds -t (the negative bit set)."""
    n = torch._neg_view(-t)
    assert n.is_neg() and torch.equal(n, t)
    return n


def imag_of_conj(t):
    """t's values as ``c.conj().imag`` of a complex tensor c: the issue's reproducer."""
    c = torch.complex(torch.zeros_like(t), -t).conj()
    v = c.imag
    assert v.is_neg() and torch.equal(v, t)
    return v


def attn_dtype():
    # The CUDA attention kernel takes float16/bfloat16; the CPU one float32 too.
    return torch.float16 if on_cuda() else torch.float32


# ------------------------------------------------------------ item 1: negative bit

def _calls():
    """(name, fn(args) -> outputs, args): one valid call of every function; each
    tensor argument is tried with the negative bit below."""
    b, d, l, n, w = 2, 5, 7, 3, 4
    dt = attn_dtype()
    q, k, v = rnd(2, 5, 4, 8, seed=1, dtype=dt), rnd(2, 6, 2, 8, seed=2, dtype=dt), \
        rnd(2, 6, 2, 8, seed=3, dtype=dt)
    scan = dict(u=rnd(b, d, l, seed=4), delta=rnd(b, d, l, seed=5, scale=0.3),
                A=-rnd(d, n, seed=6).abs(), B=rnd(b, n, l, seed=7), C=rnd(b, n, l, seed=8),
                D=rnd(d, seed=9), z=rnd(b, d, l, seed=10), delta_bias=rnd(d, seed=11))
    calls = [
        ("selective_scan_fn", lambda a: selective_scan_fn(**a, delta_softplus=True), scan),
        ("conv_selective_scan_fn",
         lambda a: conv_selective_scan_fn(a["x"], a["w"], a["cb"], a["delta"], a["A"], a["B"],
                                          a["C"], a["D"], a["z"], delta_softplus=True),
         dict(x=scan["u"], w=rnd(d, w, seed=12), cb=rnd(d, seed=13), delta=scan["delta"],
              A=scan["A"], B=scan["B"], C=scan["C"], D=scan["D"], z=scan["z"])),
        ("selective_state_update",
         lambda a: (selective_state_update(a["state"].clone(), a["x"], a["dt"], a["A"], a["B"],
                                           a["C"], a["D"], a["z"], a["dt_bias"], True),),
         dict(state=rnd(b, d, n, seed=14), x=rnd(b, d, seed=15), dt=rnd(b, d, seed=16),
              A=-rnd(d, n, seed=17).abs(), B=rnd(b, n, seed=18), C=rnd(b, n, seed=19),
              D=rnd(d, seed=20), z=rnd(b, d, seed=21), dt_bias=rnd(d, seed=22))),
        ("causal_conv1d_fn",
         lambda a: causal_conv1d_fn(a["x"], a["weight"], a["bias"], a["initial_states"], True,
                                    "silu"),
         dict(x=rnd(b, d, l, seed=23), weight=rnd(d, w, seed=24), bias=rnd(d, seed=25),
              initial_states=rnd(b, d, w - 1, seed=26))),
        ("causal_conv1d_update",
         lambda a: (causal_conv1d_update(a["x"], a["conv_state"].clone(), a["weight"],
                                         a["bias"], "silu"),),
         dict(x=rnd(b, d, seed=27), conv_state=rnd(b, d, w, seed=28),
              weight=rnd(d, w, seed=29), bias=rnd(d, seed=30))),
        ("rms_norm_fn",
         lambda a: rms_norm_fn(a["x"], a["weight"], a["bias"], a["residual"], prenorm=True),
         dict(x=rnd(3, 4, 9, seed=31), weight=rnd(9, seed=32), bias=rnd(9, seed=33),
              residual=rnd(3, 4, 9, seed=34))),
        ("swiglu", lambda a: (swiglu(a["gate"], a["up"]),),
         dict(gate=rnd(3, 4, 9, seed=35), up=rnd(3, 4, 9, seed=36))),
        ("hidden_attention",
         lambda a: (hidden_attention(a["delta"], a["A"], a["B"], a["C"], a["delta_bias"]),),
         dict(delta=scan["delta"], A=scan["A"], B=scan["B"], C=scan["C"],
              delta_bias=scan["delta_bias"])),
        ("flash_attn_func",
         lambda a: (flash_attn_func(a["q"], a["k"], a["v"], causal=True,
                                    alibi_slopes=a["alibi_slopes"]),),
         dict(q=q, k=k, v=v, alibi_slopes=rnd(4, seed=37).abs())),
        ("sliding_window_attention",
         lambda a: (sliding_window_attention(a["q"], a["k"], a["v"], 3),),
         dict(q=q, k=k, v=v)),
    ]
    if not on_cuda():  # CPU-only functions
        cu = torch.tensor([0, 2, 5], dtype=torch.int32)
        calls += [
            ("flash_attn_varlen_func",
             lambda a: (flash_attn_varlen_func(a["q"], a["k"], a["v"], a["cu_q"], a["cu_k"], 3,
                                               3, causal=True),),
             dict(q=rnd(5, 4, 8, seed=38), k=rnd(5, 2, 8, seed=39), v=rnd(5, 2, 8, seed=40),
                  cu_q=cu, cu_k=cu)),
            ("flash_attn_with_kvcache",
             lambda a: (flash_attn_with_kvcache(a["q"], a["k_cache"].clone(),
                                                a["v_cache"].clone(), a["k"], a["v"],
                                                a["cache_seqlens"], causal=True),),
             dict(q=rnd(2, 1, 4, 8, seed=41), k_cache=rnd(2, 6, 2, 8, seed=42),
                  v_cache=rnd(2, 6, 2, 8, seed=43), k=rnd(2, 1, 2, 8, seed=44),
                  v=rnd(2, 1, 2, 8, seed=45),
                  cache_seqlens=torch.tensor([2, 4], dtype=torch.int32))),
        ]
    return calls


def _outputs(r):
    return r if isinstance(r, tuple) else (r,)


@pytest.mark.parametrize("make", [neg_bit, imag_of_conj], ids=["neg_view", "conj_imag"])
def test_negative_bit_inputs_are_resolved(target, make):
    """Every tensor input with the negative bit set reads the values it shows (the
    exchange API exports its raw memory, which holds their negation): the result
    equals the call with a plain tensor, bit for bit."""
    for name, fn, args in _calls():
        want = [o.clone() for o in _outputs(fn(args))]
        for arg, t in args.items():
            if not t.is_floating_point() and make is imag_of_conj:
                continue
            got = _outputs(fn({**args, arg: make(t)}))
            sync()
            for g, w in zip(got, want):
                assert torch.equal(g, w), f"{name}: {arg} with the negative bit"


def test_issue_reproducer_swiglu():
    g = torch.randn(4, 8, dtype=torch.complex64).conj().imag
    u = torch.randn(4, 8)
    assert g.is_neg()
    torch.testing.assert_close(swiglu(g, u), F.silu(g.resolve_neg()) * u)


def test_negative_bit_int_tensors():
    """Integer arguments too: cache_seqlens with the negative bit."""
    kc, vc = torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8)
    q, k = torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8)
    lens = torch.tensor([2, 4], dtype=torch.int32)
    want = flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, k, lens, causal=True)
    got = flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, k, neg_bit(lens), causal=True)
    assert torch.equal(got, want)


def test_negative_bit_written_arguments_are_rejected(target):
    """An argument written in place cannot be resolved into a copy (the caller would
    never see the update): a TypeError naming it."""
    d, n, w = 4, 3, 4
    x = rnd(2, d, seed=1)
    with pytest.raises(TypeError, match=r"^state: .*negative"):
        selective_state_update(neg_bit(rnd(2, d, n)), x, x, -rnd(d, n).abs(), rnd(2, n),
                               rnd(2, n))
    with pytest.raises(TypeError, match=r"^conv_state: .*negative"):
        causal_conv1d_update(x, neg_bit(rnd(2, d, w)), rnd(d, w))
    if on_cuda():
        return
    q, kc = rnd(1, 1, 2, 8), rnd(1, 4, 2, 8)
    with pytest.raises(TypeError, match=r"^k_cache: .*negative"):
        flash_attn_with_kvcache(q, neg_bit(kc), kc.clone(), q, q, 1)
    cache = ma.SlidingWindowKVCache(1, 4, 2, 8, dtype=torch.float32)
    cache.v = neg_bit(cache.v + 1)
    with pytest.raises(TypeError, match=r"^v_ring: .*negative"):
        cache.append_and_attend(q, q, q)
    with pytest.raises(TypeError, match=r"^out: .*negative"):
        _core.attention_fwd(q, q, q, out=neg_bit(torch.ones_like(q)))


# --------------------------------------------------------- item 8: overlapping memory

def test_issue_reproducer_conv_state_expand():
    x, w = torch.randn(2, 6), torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"^conv_state: .*overlap"):
        causal_conv1d_update(x, torch.zeros(1, 6, 3).expand(2, 6, 3), w)


def test_written_arguments_with_shared_rows_are_rejected(target):
    """Rows that share memory (expand(), zero strides, as_strided) in an argument
    written in place: a ValueError naming it (torch's internal-overlap rule)."""
    d, n, w = 4, 3, 4
    x = rnd(2, d, seed=1)
    A, B = -rnd(d, n).abs(), rnd(2, n)
    for state in (rnd(1, d, n).expand(2, d, n), rnd(2, 1, n).expand(2, d, n),
                  torch.as_strided(rnd(20), (2, d, n), (n, 1, 1))):
        with pytest.raises(ValueError, match=r"^state: .*overlap"):
            selective_state_update(state, x, x, A, B, B)
    # A zero stride over a dimension of size 1 is harmless.
    state = torch.as_strided(rnd(2 * n), (2, 1, n), (n, 0, 1))
    selective_state_update(state, x[:, :1], x[:, :1], A[:1], B, B)
    with pytest.raises(ValueError, match=r"^conv_state: .*overlap"):
        causal_conv1d_update(x, rnd(2, d, 1).expand(2, d, w), rnd(d, w))
    if on_cuda():
        return
    q, kc = rnd(2, 1, 2, 8), rnd(1, 4, 2, 8).expand(2, 4, 2, 8)
    with pytest.raises(ValueError, match=r"^k_cache: .*overlap"):
        flash_attn_with_kvcache(q, kc, rnd(2, 4, 2, 8), q, q, 1)
    # Read-only caches (nothing appended) may be expanded.
    flash_attn_with_kvcache(q, kc, kc)
    cache = ma.SlidingWindowKVCache(2, 4, 2, 8, dtype=torch.float32)
    cache.k = rnd(1, 4, 2, 8).expand(2, 4, 2, 8)
    with pytest.raises(ValueError, match=r"^k_ring: .*overlap"):
        cache.append_and_attend(q, q, q)


def test_inputs_overlapping_written_arguments_are_rejected(target):
    """An input that is a view of (or overlaps) the buffer written in place: a
    ValueError naming the input; two written buffers that overlap likewise."""
    d, n, w = 4, 3, 4
    A, B = -rnd(d, n).abs(), rnd(2, n)
    state = rnd(2, d, n)
    with pytest.raises(ValueError, match=r"^x: shares memory with state"):
        selective_state_update(state, state[:, :, 0], rnd(2, d), A, B, B)
    with pytest.raises(ValueError, match=r"^B: shares memory with state"):
        selective_state_update(state, rnd(2, d), rnd(2, d), A, state[:, 1], B)
    cs = rnd(2, d, w)
    with pytest.raises(ValueError, match=r"^x: shares memory with conv_state"):
        causal_conv1d_update(cs[:, :, 0], cs, rnd(d, w))
    # Disjoint slices of one buffer are fine (their byte ranges do not meet).
    buf = rnd(2 * 2 * d * n)
    st, xs = buf[: 2 * d * n].view(2, d, n), buf[2 * d * n: 2 * d * n + 2 * d].view(2, d)
    selective_state_update(st, xs, rnd(2, d), A, B, B)
    if on_cuda():
        return
    q, kc = rnd(2, 1, 2, 8), rnd(2, 4, 2, 8)
    with pytest.raises(ValueError, match=r"^k: shares memory with k_cache"):
        flash_attn_with_kvcache(q, kc, rnd(2, 4, 2, 8), kc[:, :1], rnd(2, 1, 2, 8), 1)
    with pytest.raises(ValueError, match=r"^k_cache: shares memory with v_cache"):
        flash_attn_with_kvcache(q, kc, kc, q, q, 1)
    cache = ma.SlidingWindowKVCache(2, 4, 2, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"^k: shares memory with k_ring"):
        cache.append_and_attend(q, cache.k[:, 1:2], q)
    with pytest.raises(ValueError, match=r"^q: shares memory with out"):
        _core.attention_fwd(q, q, q, out=q)
    o = torch.empty(2 * 1 * 2 * 8 + 1)
    with pytest.raises(ValueError, match=r"^out: shares memory with softmax_lse"):
        _core.attention_fwd(q, q, q, out=o[:32].view(2, 1, 2, 8), softmax_lse=o[:4].view(2, 2, 1))


def test_overlap_numpy():
    """The same rule for NumPy arrays (broadcast_to gives zero strides)."""
    x, w = np.ones((2, 6), np.float32), np.ones((6, 4), np.float32)
    z = np.zeros((1, 6, 3), np.float32)
    expanded = np.lib.stride_tricks.as_strided(z, (2, 6, 3), (0,) + z.strides[1:])
    assert expanded.flags.writeable
    with pytest.raises(ValueError, match=r"^conv_state: .*overlap"):
        causal_conv1d_update(x, expanded, w)
    cs = np.zeros((2, 6, 3), np.float32)
    with pytest.raises(ValueError, match=r"^x: shares memory with conv_state"):
        causal_conv1d_update(cs[:, :, 0], cs, w)


# ------------------------------------------------------------- item 9: integers, flags

def test_uint64_indices_beyond_int64_are_rejected():
    """uint64 values ≥ 2**63 wrapped to negative and meant "skip": a ValueError."""
    st = torch.zeros(2, 4, 3)
    x = torch.randn(2, 4)
    for big in (2**63, 2**64 - 1):
        idx = torch.tensor([big, 0], dtype=torch.uint64)
        with pytest.raises(ValueError, match=r"^state_batch_indices: .*2\*\*63"):
            selective_state_update(st, x, x, -torch.rand(4, 3), torch.randn(2, 3),
                                   torch.randn(2, 3), state_batch_indices=idx)
        with pytest.raises(ValueError, match=r"^cache_seqlens: .*2\*\*63"):
            causal_conv1d_update(x, torch.zeros(2, 4, 3), torch.randn(4, 4),
                                 cache_seqlens=np.array([big, 0], np.uint64))
    # 2**63 - 1 is an index past the cache: the usual range error, not a skip.
    idx = np.array([2**63 - 1, 0], np.uint64)
    with pytest.raises(ValueError, match=r"^state_batch_indices: expected indices below"):
        selective_state_update(st.numpy(), x.numpy(), x.numpy(), -np.ones((4, 3), np.float32),
                               np.ones((2, 3), np.float32), np.ones((2, 3), np.float32),
                               state_batch_indices=idx)


def _flag_calls(mk):
    """function -> (call(flag, value), flag names); ``mk(*shape)`` makes the float
    inputs (requiring grad or not)."""
    cu = torch.tensor([0, 3], dtype=torch.int32)
    return {
        "selective_scan_fn": (lambda f, v: selective_scan_fn(
            mk(1, 2, 3), mk(1, 2, 3), -torch.rand(2, 2), mk(2, 2), mk(2, 2), **{f: v}),
            ["delta_softplus", "return_last_state"]),
        "conv_selective_scan_fn": (lambda f, v: conv_selective_scan_fn(
            mk(1, 2, 3), mk(2, 4), None, mk(1, 2, 3), -torch.rand(2, 2), mk(2, 2), mk(2, 2),
            **{f: v}), ["delta_softplus", "return_last_state"]),
        "selective_state_update": (lambda f, v: selective_state_update(
            torch.zeros(1, 2, 2), mk(1, 2), mk(1, 2), -torch.rand(2, 2), mk(1, 2), mk(1, 2),
            **{f: v}), ["dt_softplus"]),
        "causal_conv1d_fn": (lambda f, v: causal_conv1d_fn(mk(1, 2, 3), mk(2, 4), **{f: v}),
                             ["return_final_states"]),
        "hidden_attention": (lambda f, v: hidden_attention(
            mk(1, 2, 3), -torch.rand(2, 2), mk(2, 2), mk(2, 2), **{f: v}), ["delta_softplus"]),
        "rms_norm_fn": (lambda f, v: rms_norm_fn(mk(2, 4), mk(4), None, mk(2, 4), **{f: v}),
                        ["prenorm", "residual_in_fp32"]),
        "flash_attn_func": (lambda f, v: flash_attn_func(
            mk(1, 3, 2, 8), mk(1, 3, 2, 8), mk(1, 3, 2, 8), **{f: v}),
            ["causal", "deterministic", "return_attn_probs"]),
        "flash_attn_varlen_func": (lambda f, v: flash_attn_varlen_func(
            mk(3, 2, 8), mk(3, 2, 8), mk(3, 2, 8), cu, cu, 3, 3, **{f: v}),
            ["causal", "deterministic", "return_attn_probs"]),
        "flash_attn_with_kvcache": (lambda f, v: flash_attn_with_kvcache(
            mk(1, 3, 2, 8), mk(1, 3, 2, 8), mk(1, 3, 2, 8), **{f: v}),
            ["causal", "return_softmax_lse"]),
    }


FLAG_FUNCTIONS = sorted(_flag_calls(torch.randn))


@pytest.mark.parametrize("grad", [False, True], ids=["plain", "requires_grad"])
@pytest.mark.parametrize("fn", FLAG_FUNCTIONS)
def test_flags_must_be_bools(fn, grad):
    """``causal="no"`` was read as True: a flag takes bool or numpy.bool_, anything
    else is a TypeError naming it (with and without gradients)."""
    def mk(*shape):
        return torch.randn(*shape).requires_grad_(grad)

    call, flags = _flag_calls(mk)[fn]
    for flag in flags:
        for bad in ("no", "", 1, 0, 1.0, None, [True], torch.tensor(True)):
            with pytest.raises(TypeError, match=rf"^{flag}: expected a bool"):
                call(flag, bad)
        for good in (True, False, np.bool_(True), np.bool_(False)):
            call(flag, good)


# ------------------------------------------------- wrong kind of error: one path of truth

def _grad_cases():
    """(name, call(q-like tensors made by mk)) of bad calls of the differentiable
    functions; each must raise the same error with and without requires_grad."""
    def qkv(mk):
        return mk(1, 4, 2, 8), mk(1, 4, 2, 8), mk(1, 4, 2, 8)

    def varlen(mk, **kw):
        cu = torch.tensor([0, 4], dtype=torch.int32)
        base = dict(max_seqlen_q=4, max_seqlen_k=4)
        base.update(kw)
        return flash_attn_varlen_func(mk(4, 2, 8), mk(4, 2, 8), mk(4, 2, 8), cu, cu, **base)

    def scan(mk, **kw):
        a = dict(u=mk(1, 2, 5), delta=mk(1, 2, 5), A=-torch.rand(2, 3), B=mk(1, 3, 5),
                 C=mk(1, 3, 5))
        a.update(kw)
        return selective_scan_fn(**a)

    return {
        "alibi-list": lambda mk: flash_attn_func(*qkv(mk), alibi_slopes=[0.1, 0.2]),
        "alibi-shape": lambda mk: flash_attn_func(*qkv(mk), alibi_slopes=torch.rand(3)),
        "window-float": lambda mk: flash_attn_func(*qkv(mk), window_size=(1.5, 0)),
        "window-neg": lambda mk: flash_attn_func(*qkv(mk), window_size=(-3, 0)),
        "window-str": lambda mk: flash_attn_func(*qkv(mk), window_size="ab"),
        "scale-str": lambda mk: flash_attn_func(*qkv(mk), softmax_scale="1"),
        "softcap-neg": lambda mk: flash_attn_func(*qkv(mk), softcap=-1.0),
        "causal-str": lambda mk: flash_attn_func(*qkv(mk), causal="no"),
        "k-shape": lambda mk: flash_attn_func(mk(1, 4, 2, 8), mk(1, 4, 2, 4), mk(1, 4, 2, 8)),
        "k-dtype": lambda mk: flash_attn_func(mk(1, 4, 2, 8), mk(1, 4, 2, 8).half(),
                                              mk(1, 4, 2, 8)),
        "varlen-max-float": lambda mk: varlen(mk, max_seqlen_q=4.0),
        "varlen-max-neg": lambda mk: varlen(mk, max_seqlen_k=-1),
        "varlen-max-small": lambda mk: varlen(mk, max_seqlen_q=2),
        "varlen-cu-float": lambda mk: flash_attn_varlen_func(
            mk(4, 2, 8), mk(4, 2, 8), mk(4, 2, 8), torch.tensor([0.0, 4.0]),
            torch.tensor([0, 4], dtype=torch.int32), 4, 4),
        "scan-A-shape": lambda mk: scan(mk, A=-torch.rand(3, 3)),
        "scan-B-list": lambda mk: scan(mk, B=[[1.0]]),
        "scan-softplus-str": lambda mk: scan(mk, delta_softplus="yes"),
        "scan-D-int": lambda mk: scan(mk, D=torch.ones(2, dtype=torch.int32)),
        "conv-act": lambda mk: causal_conv1d_fn(mk(1, 2, 5), mk(2, 4), activation="relu"),
        "conv-weight-w": lambda mk: causal_conv1d_fn(mk(1, 2, 5), mk(2, 9)),
        "conv-final-str": lambda mk: causal_conv1d_fn(mk(1, 2, 5), mk(2, 4),
                                                      return_final_states="yes"),
        "convscan-act": lambda mk: conv_selective_scan_fn(
            mk(1, 2, 5), mk(2, 4), None, mk(1, 2, 5), -torch.rand(2, 3), mk(1, 3, 5),
            mk(1, 3, 5), activation="gelu"),
        "convscan-bias-shape": lambda mk: conv_selective_scan_fn(
            mk(1, 2, 5), mk(2, 4), mk(3), mk(1, 2, 5), -torch.rand(2, 3), mk(1, 3, 5),
            mk(1, 3, 5)),
        "rms-zero-h": lambda mk: rms_norm_fn(mk(4, 0), torch.ones(0)),
        "rms-residual-shape": lambda mk: rms_norm_fn(mk(4, 8), torch.ones(8),
                                                     residual=mk(2, 16)),
        "rms-eps-str": lambda mk: rms_norm_fn(mk(4, 8), torch.ones(8), eps="1e-5"),
        "rms-prenorm-int": lambda mk: rms_norm_fn(mk(4, 8), torch.ones(8), prenorm=1),
        "rms-weight-h": lambda mk: rms_norm_fn(mk(4, 8), torch.ones(7)),
        "swiglu-zero": lambda mk: swiglu(mk(4, 0), mk(4, 0)),
        "swiglu-shape": lambda mk: swiglu(mk(4, 8), mk(8, 4)),
        "swiglu-none": lambda mk: swiglu(mk(4, 8), None),
    }


@pytest.mark.parametrize("case", sorted(_grad_cases()))
def test_same_error_with_and_without_grad(case):
    """torch.library's schema check raised RuntimeError before our checks when an
    input required grad: the Rust checks now run first on every path, with the
    same message."""
    call = _grad_cases()[case]

    def outcome(grad):
        def mk(*shape):
            t = torch.randn(*shape)
            return t.requires_grad_() if grad else t
        try:
            call(mk)
        except Exception as e:  # noqa: BLE001 - the kind of error is what is tested
            return type(e), str(e)
        return None

    plain, grad = outcome(False), outcome(True)
    assert plain is not None and plain[0] in (TypeError, ValueError), plain
    assert grad == plain, f"with requires_grad: {grad}, without: {plain}"


def test_numpy_int_max_seqlen_with_grad():
    """np.int64 max_seqlen raised TypeError with gradients: accepted on every path."""
    cu = torch.tensor([0, 4], dtype=torch.int32)
    q = torch.randn(4, 2, 8, requires_grad=True)
    k, v = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    out = flash_attn_varlen_func(q, k, v, cu, cu, np.int64(4), np.int32(4))
    want = flash_attn_varlen_func(q.detach(), k, v, cu, cu, 4, 4)
    torch.testing.assert_close(out.detach(), want)
    out.sum().backward()
    assert q.grad is not None


@pytest.mark.parametrize("grad", [False, True], ids=["plain", "requires_grad"])
def test_window_size_any_pair(grad):
    """window_size: any pair of ints (list, tuple, NumPy array, torch tensor, NumPy
    ints), as flash-attn takes it; (1.5, 0) was truncated to 1 with gradients."""
    q, k, v = (torch.randn(1, 6, 2, 8) for _ in range(3))
    q.requires_grad_(grad)
    want = flash_attn_func(q, k, v, window_size=(2, 0))
    for ws in ([2, 0], np.array([2, 0]), torch.tensor([2, 0]), (np.int64(2), np.int32(0)),
               (torch.tensor(2), 0)):
        torch.testing.assert_close(flash_attn_func(q, k, v, window_size=ws), want, rtol=0,
                                   atol=0)
    for bad in ((1.5, 0), (2, 0.0), (True, 0), [2], (1, 2, 3), "20", 2, {0: 1, 1: 2}.keys()):
        with pytest.raises(TypeError, match="^window_size: expected a pair of ints"):
            flash_attn_func(q, k, v, window_size=bad)
    # past int64 a bound saturates (it is past every key: unbounded); far below -1 it
    # is still a ValueError
    torch.testing.assert_close(flash_attn_func(q, k, v, window_size=(2**64, 0)),
                               flash_attn_func(q, k, v, window_size=(-1, 0)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="^window_size: "):
        flash_attn_func(q, k, v, window_size=(-2**64, 0))


@cuda_only
def test_cuda_paths_raise_the_same_errors(target):
    """On CUDA the kernel path and the custom-op path (gradients) run the Rust checks
    first, as the CPU does; the ring cache's CUDA path too."""
    dt = torch.float16
    q = torch.randn(1, 4, 2, 8, device="cuda", dtype=dt)
    cu = torch.tensor([0, 4], dtype=torch.int32, device="cuda")
    for grad in (False, True):
        qq = q.clone().requires_grad_(grad)
        with pytest.raises(TypeError, match="^alibi_slopes: expected a tensor"):
            flash_attn_func(qq, q, q, alibi_slopes=[0.1, 0.2])
        with pytest.raises(TypeError, match="^window_size: expected a pair of ints"):
            flash_attn_func(qq, q, q, window_size=(1.5, 0))
        with pytest.raises(TypeError, match="^causal: expected a bool"):
            flash_attn_func(qq, q, q, causal="no")
        with pytest.raises(ValueError, match="^k: "):
            flash_attn_func(qq, q[..., :4], q)
        torch.testing.assert_close(flash_attn_func(qq, q, q, window_size=[2, 0]),
                                   flash_attn_func(qq, q, q, window_size=(2, 0)))
        q3 = qq[0]
        with pytest.raises(TypeError, match="^max_seqlen_q: expected an int"):
            flash_attn_varlen_func(q3, q[0], q[0], cu, cu, 4.0, 4)
        flash_attn_varlen_func(q3, q[0], q[0], cu, cu, np.int64(4), np.int32(4))
    torch.testing.assert_close(swiglu(neg_bit(q), q), swiglu(q.clone(), q))
    cache = ma.SlidingWindowKVCache(1, 4, 2, 8, dtype=dt, device="cuda")
    for bad in (None, 1.5, "q"):
        with pytest.raises(TypeError, match="^q: expected a tensor"):
            cache.append_and_attend(bad, q[:, :1], q[:, :1])
    with pytest.raises(TypeError, match="^softcap: expected a float"):
        cache.append_and_attend(q[:, :1], q[:, :1], q[:, :1], softcap="1")
    cache.k = q.new_zeros(1, 1, 2, 8).expand(1, 4, 2, 8)
    with pytest.raises(ValueError, match="^k_ring: .*overlap"):
        cache.append_and_attend(q[:, :1], q[:, :1], q[:, :1])
    assert cache.pos == 0


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_zero_size_last_dimension(framework):
    """A zero-size last dimension raised torch's reshape RuntimeError (or a ValueError
    naming nothing): a ValueError naming x / gate."""
    mk = (lambda *s: np.ones(s, np.float32)) if framework == "numpy" else torch.ones
    for shape in ((4, 0), (2, 3, 0), (0,)):
        with pytest.raises(ValueError, match=r"^x: expected a non-empty"):
            rms_norm_fn(mk(*shape), mk(0))
        with pytest.raises(ValueError, match=r"^gate: expected a non-empty"):
            swiglu(mk(*shape), mk(*shape))


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_rms_norm_residual_shape(framework):
    """A residual of another shape with the same number of elements was accepted."""
    mk = (lambda *s: np.ones(s, np.float32)) if framework == "numpy" else torch.ones
    for shape in ((2, 16), (8, 4), (32,), (1, 4, 8)):
        with pytest.raises(ValueError, match=r"^residual: expected the shape of x \(4, 8\)"):
            rms_norm_fn(mk(4, 8), mk(8), residual=mk(*shape))


def test_rms_norm_and_swiglu_any_rank(target):
    """x (..., h) of any rank, read in place where the leading dimensions collapse and
    through a copy where they do not; equal to the (rows, h) call."""
    x, r, w = rnd(3, 5, 8, seed=1), rnd(3, 5, 8, seed=2), rnd(8, seed=3)
    want, want_res = rms_norm_fn(x.reshape(15, 8), w, None, r.reshape(15, 8), prenorm=True)
    for xv, rv in ((x, r), (x.transpose(0, 1).contiguous().transpose(0, 1),
                            r.transpose(0, 1).contiguous().transpose(0, 1))):
        out, res = rms_norm_fn(xv, w, None, rv, prenorm=True)
        assert out.shape == x.shape and res.shape == x.shape
        assert torch.equal(out.reshape(15, 8), want)
        assert torch.equal(res.reshape(15, 8), want_res)
    g, u = rnd(3, 5, 8, seed=4), rnd(3, 5, 8, seed=5)
    want = swiglu(g.reshape(15, 8), u.reshape(15, 8))
    got = swiglu(g.transpose(0, 1).contiguous().transpose(0, 1), u)
    assert got.shape == g.shape and torch.equal(got.reshape(15, 8), want)


@pytest.mark.parametrize("q", [None, 1.5, "q", [1.0]])
def test_kvcache_append_and_attend_q_types(q):
    """q = None, a float or a str raised AttributeError."""
    cache = ma.SlidingWindowKVCache(1, 4, 2, 8, dtype=torch.float32)
    k = torch.randn(1, 1, 2, 8)
    with pytest.raises(TypeError, match=r"^q: expected a tensor"):
        cache.append_and_attend(q, k, k)
    assert cache.pos == 0


def test_kvcache_pos_types():
    cache = ma.SlidingWindowKVCache(1, 4, 2, 8, dtype=torch.float32)
    cache.pos = np.int64(3)
    assert cache.pos == 3 and type(cache.pos) is int
    for bad in (1.5, "3", None, True):
        with pytest.raises(TypeError, match=r"^pos: expected an int"):
            cache.pos = bad
    with pytest.raises(ValueError, match=r"^pos: expected an int in \[0, 2\*\*63 - 1\]"):
        cache.pos = -1


# -------------------------------------------------------------------------- nn modules

@cpu_only
def test_nn_constructor_arguments(target):
    """MambaAttention(0) and Mamba(16, dt_rank=0) raised ZeroDivisionError; a float
    window_size was accepted."""
    from mamba_attention.nn import (GatedMLP, Mamba, MambaAttention, RMSNorm, Samba,
                                    SambaBlock, SambaConfig, SlidingWindowAttention)

    V, T = ValueError, TypeError
    cases = [
        (lambda: MambaAttention(0), V, "hidden_size"),
        (lambda: MambaAttention(16, 0), V, "num_heads"),
        (lambda: MambaAttention(16, 4, window_size=2.5), T, "window_size"),
        (lambda: MambaAttention(16, 4, window_size=-1), V, "window_size"),
        (lambda: MambaAttention(16.0), T, "hidden_size"),
        (lambda: MambaAttention(16, 4, causal="yes"), T, "causal"),
        (lambda: MambaAttention(16, 4, dropout=1.5), V, "dropout"),
        (lambda: MambaAttention(16, 4, dropout="0"), T, "dropout"),
        (lambda: Mamba(16, dt_rank=0), V, "dt_rank"),
        (lambda: Mamba(16, dt_rank="full"), V, "dt_rank"),
        (lambda: Mamba(0), V, "d_model"),
        (lambda: Mamba(16, d_state=0), V, "d_state"),
        (lambda: Mamba(16, d_conv=1), V, "d_conv"),
        (lambda: Mamba(16, expand=0), V, "expand"),
        (lambda: Mamba(16, dt_min=0.2, dt_max=0.1), V, "dt_max"),
        (lambda: Mamba(16, dt_min=-1.0), V, "dt_min"),
        (lambda: Mamba(16, d_state=2.5), T, "d_state"),
        (lambda: SlidingWindowAttention(16, 0), V, "n_heads"),
        (lambda: SlidingWindowAttention(16, 4, n_kv_heads=0), V, "n_kv_heads"),
        (lambda: SlidingWindowAttention(16, 4, window_size=0), V, "window_size"),
        (lambda: SlidingWindowAttention(16, 4, window_size=2.0), T, "window_size"),
        (lambda: SlidingWindowAttention(16, 4, head_dim=5), V, "head_dim"),
        (lambda: SlidingWindowAttention(16, 4, rope_base=0.0), V, "rope_base"),
        (lambda: RMSNorm(0), V, "hidden_size"),
        (lambda: RMSNorm(8, eps=-1.0), V, "eps"),
        (lambda: GatedMLP(0), V, "in_features"),
        (lambda: GatedMLP(8, hidden_features=0), V, "hidden_features"),
        (lambda: SambaBlock(16, 0), V, "n_heads"),
        (lambda: SambaConfig(d_model=0, n_blocks=1, n_heads=1, n_kv_heads=1, head_dim=8),
         V, "d_model"),
        (lambda: Samba("samba-421m"), T, "config"),
    ]
    for make, exc, name in cases:
        with pytest.raises(exc, match=rf"^{name}: "):
            make()


@cpu_only
def test_nn_input_width(target):
    """A wrong input width surfaced as torch's matmul RuntimeError."""
    from mamba_attention.nn import (GatedMLP, Mamba, MambaAttention, RMSNorm, Samba,
                                    SambaBlock, SambaConfig, SlidingWindowAttention)

    torch.manual_seed(0)
    swa = SlidingWindowAttention(16, 4, window_size=4)
    mamba = Mamba(16, layer_idx=0)
    block = SambaBlock(16, 2, window_size=4)
    cfg = SambaConfig(d_model=16, n_blocks=1, n_heads=2, n_kv_heads=2, head_dim=8,
                      window_size=4, vocab_size=50)
    samba = Samba(cfg)
    bad = torch.randn(2, 3, 8)
    cases = [
        (lambda: MambaAttention(16, 4)(bad), V_, "x"),
        (lambda: MambaAttention(16, 4)(torch.randn(3, 16)), V_, "x"),
        (lambda: MambaAttention(16, 4)("x"), T_, "x"),
        (lambda: swa(bad), V_, "x"),
        (lambda: swa.step(bad, swa.allocate_inference_cache(2)), V_, "x"),
        (lambda: swa.step(torch.randn(2, 1, 16), None), T_, "cache"),
        (lambda: RMSNorm(16)(bad), V_, "x"),
        (lambda: GatedMLP(16)(bad), V_, "x"),
        (lambda: GatedMLP(16)(torch.ones(2, 16, dtype=torch.int64)), T_, "x"),
        (lambda: mamba(bad), V_, "hidden_states"),
        (lambda: mamba.step(torch.randn(2, 1, 8), *mamba.allocate_inference_cache(2, 1)),
         V_, "hidden_states"),
        (lambda: mamba.step(torch.randn(2, 1, 16), None, None), T_, "conv_state"),
        (lambda: block(bad), V_, "hidden"),
        (lambda: block(torch.randn(2, 3, 16), torch.randn(2, 4, 16)), V_, "residual"),
        (lambda: block.step(torch.randn(2, 2, 16), None, block.allocate_inference_cache(2)),
         V_, "hidden"),
        (lambda: samba(torch.randn(2, 3)), T_, "input_ids"),
        (lambda: samba(torch.zeros(2, 3, 1, dtype=torch.long)), V_, "input_ids"),
        (lambda: samba(torch.full((2, 3), 50)), V_, "input_ids"),
        (lambda: samba(torch.full((2, 3), -1)), V_, "input_ids"),
        (lambda: samba.step(torch.zeros(2, 2, dtype=torch.long),
                            samba.allocate_inference_cache(2)), V_, "input_ids"),
        (lambda: samba.generate(torch.zeros(1, 2, dtype=torch.long), 1.5), T_,
         "max_new_tokens"),
    ]
    for make, exc, name in cases:
        with pytest.raises(exc, match=rf"^{name}: "):
            make()


V_, T_ = ValueError, TypeError
