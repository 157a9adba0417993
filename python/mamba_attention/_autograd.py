"""PyTorch autograd and torch.compile support for the selective scan.

Two ``torch.library`` custom ops wrap the Rust kernels:

- ``mamba_attention::selective_scan_fwd`` -> ``(out, last_state, checkpoints)``:
  always returns last_state (float32), so that its gradient can flow back (SPEC §1
  extension; mamba_ssm drops it). :func:`selective_scan` drops it again when
  it was not requested. checkpoints are the states before every
  ``_checkpoint_chunk`` steps on the CPU, every 32 steps on CUDA (float32
  (b, d, nchunks, n)), saved for the backward so that it does not recompute
  them; on CUDA only where the backward's fast kernel runs
  (``_cuda_checkpoints``), elsewhere an empty tensor.
- ``mamba_attention::selective_scan_bwd`` -> the gradients of every input.
  Custom ops cannot return ``None``, so the gradient of an optional input that
  was not given is an empty tensor here (and ``None`` to autograd).

Both have fake (meta) implementations giving shapes and dtypes only, so
``torch.compile(fullgraph=True)`` traces through them, and the forward op has
an autograd formula that calls the backward op. This module imports torch; the
package itself does not (``ops.selective_scan_fn`` imports this lazily).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _core

__all__ = ["selective_scan", "rms_norm", "swiglu_op"]

_F32 = torch.float32


def _eager():
    """Whether the wrappers below check their arguments in Rust before calling a
    custom op (``_core.*_check``: the messages of the direct path, where
    torch.library's schema check would raise its own RuntimeError first). Under
    torch.compile tracing the tensors are fakes: the scalars then reach the op's
    schema as given, and the tensors are checked when the compiled op runs."""
    return not torch.compiler.is_compiling()


@torch.library.custom_op("mamba_attention::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    initial_state: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor]:
    return _core.selective_scan_fwd_ck(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state
    )


def _cuda_checkpoints(d, n, B, C):
    """Whether the CUDA training forward saves checkpoints (every 32 steps): the
    rule of the Rust ``ops::scan_ck::cuda_checkpoints`` (the backward's fast
    kernel runs: n <= 16, time-varying B and C, groups of whole 32-channel
    blocks), for the fake implementation."""

    def fits(X):
        if X.dim() == 2:  # constant (d, n)
            return False
        g = 1 if X.dim() == 3 else X.shape[1]
        return g == 1 or (g > 1 and d % g == 0 and (d // g) % 32 == 0)

    return 1 <= n <= 16 and fits(B) and fits(C)


def _checkpoint_chunk(b, d, n, l):
    """Steps between the CPU forward's checkpoints: the rule of the Rust
    ``cpu::scan_bwd::checkpoint_chunk`` (16, doubled up to 64 while the
    checkpoints would pass 256 MB), for the fake implementation."""
    ts = 16
    while ts < 64 and b * d * n * ((l + ts - 1) // ts) * 4 > (256 << 20):
        ts *= 2
    return ts


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
    b, d, l = u.shape
    n = A.shape[1]
    if u.device.type == "cpu":
        nch = (l + _checkpoint_chunk(b, d, n, l) - 1) // _checkpoint_chunk(b, d, n, l)
        ck = u.new_empty((b, d, nch, n), dtype=_F32)
    elif _cuda_checkpoints(d, n, B, C):
        ck = u.new_empty((b, d, (l + 31) // 32, n), dtype=_F32)
    else:
        ck = u.new_empty((0,), dtype=_F32)
    return u.new_empty(u.shape), u.new_empty((b, d, n), dtype=_F32), ck


@torch.library.custom_op("mamba_attention::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    initial_state: Optional[Tensor],
    dout: Tensor,
    dlast_state: Optional[Tensor],
    checkpoints: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _core.selective_scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, dout, dlast_state,
        checkpoints,
    )
    return tuple(u.new_empty((0,)) if g is None else g for g in grads)


@selective_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, dout, dlast_state,
      checkpoints=None):
    def like(t, dtype=_F32):
        return u.new_empty((0,)) if t is None else t.new_empty(t.shape, dtype=dtype)

    return (
        u.new_empty(u.shape),
        u.new_empty(u.shape),
        like(A),
        like(B),
        like(C),
        like(D),
        like(z, z.dtype if z is not None else None),
        like(delta_bias),
        like(initial_state),
    )


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state = inputs
    checkpoints = output[2]
    ctx.mark_non_differentiable(checkpoints)
    # No zero-filled gradients for unused outputs: the checkpoints' would be as
    # large as u (b·d·l·n/16 floats), and an unused last_state's is just None.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints)
    ctx.delta_softplus = delta_softplus


def _backward(ctx, dout, dlast_state, _dcheckpoints=None):
    u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints = ctx.saved_tensors
    if dout is None:  # only last_state was used
        dout = u.new_zeros(u.shape)
    grads = torch.ops.mamba_attention.selective_scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, initial_state, dout, dlast_state,
        checkpoints,
    )
    # Optional inputs that were None get None; float32 gradients of inputs of
    # another dtype (A in float64, B in bfloat16, ...) get the input's dtype.
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinit = (
        None if t is None else g.to(t.dtype) for t, g in zip(inputs, grads)
    )
    return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, None, dinit


selective_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def selective_scan(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    return_last_state=False,
    initial_state=None,
):
    """``selective_scan_fn`` for torch tensors through the differentiable custom op,
    after the Rust checks of every argument (see :func:`_eager`)."""
    if _eager():
        delta_softplus, return_last_state = _core.selective_scan_check(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state
        )
    out, last_state, _ = torch.ops.mamba_attention.selective_scan_fwd(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state
    )
    return (out, last_state) if return_last_state else out


# ---------------------------------------------------------------- RMSNorm, SwiGLU
#
# Same pattern as the scan: forward and backward custom ops on (rows, h) views
# (ops.py flattens), fake implementations, and an autograd formula. The
# forward always returns rstd (float32 (rows,)) for the backward, and the
# residual stream when ``store_residual`` (else an empty tensor).


def _res_dtype(x, residual, residual_in_fp32):
    if residual is not None:
        return residual.dtype
    return _F32 if residual_in_fp32 else x.dtype


@torch.library.custom_op("mamba_attention::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    eps: float,
    store_residual: bool,
    residual_in_fp32: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    out, res, rstd = _core.rms_norm_fwd(
        x, weight, bias, residual, eps, store_residual, residual_in_fp32
    )
    return out, (x.new_empty((0,)) if res is None else res), rstd


@rms_norm_fwd.register_fake
def _(x, weight, bias, residual, eps, store_residual, residual_in_fp32):
    res = (
        x.new_empty(x.shape, dtype=_res_dtype(x, residual, residual_in_fp32))
        if store_residual
        else x.new_empty((0,))
    )
    return x.new_empty(x.shape), res, x.new_empty((x.shape[0],), dtype=_F32)


@torch.library.custom_op("mamba_attention::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    rstd: Tensor,
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    dresidual_out: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = _core.rms_norm_bwd(dy, x, weight, rstd, bias, residual, dresidual_out)
    return tuple(x.new_empty((0,)) if g is None else g for g in grads)


@rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, bias, residual, dresidual_out):
    h = x.shape[1]
    return (
        x.new_empty(x.shape),
        x.new_empty((h,), dtype=_F32),
        x.new_empty((h,) if bias is not None else (0,), dtype=_F32),
        residual.new_empty(residual.shape) if residual is not None else x.new_empty((0,)),
    )


def _rms_setup(ctx, inputs, output):
    x, weight, bias, residual, eps, store_residual, residual_in_fp32 = inputs
    ctx.save_for_backward(x, weight, bias, residual, output[2])
    ctx.store_residual = store_residual


def _rms_backward(ctx, dout, dres_out, _drstd):
    x, weight, bias, residual, rstd = ctx.saved_tensors
    if dout is None:
        dout = x.new_zeros(x.shape)
    if not ctx.store_residual:
        dres_out = None
    dx, dw, db, dres = torch.ops.mamba_attention.rms_norm_bwd(
        dout, x, weight, rstd, bias, residual, dres_out
    )
    return (
        dx,
        dw.to(weight.dtype),
        None if bias is None else db.to(bias.dtype),
        None if residual is None else dres,
        None,
        None,
        None,
    )


rms_norm_fwd.register_autograd(_rms_backward, setup_context=_rms_setup)


def rms_norm(x, weight, bias=None, residual=None, prenorm=False, residual_in_fp32=False,
             eps=1e-6):
    """``rms_norm_fn`` (x (..., h)) through the custom op on (rows, h) views, after
    the Rust checks; returns out, or (out, residual_out) with ``prenorm``."""
    if _eager():
        eps, prenorm, residual_in_fp32 = _core.rms_norm_check(
            x, weight, bias, residual, eps, prenorm, residual_in_fp32
        )
    shape = x.shape
    h = shape[-1]
    x2 = x.reshape(-1, h)
    r2 = None if residual is None else residual.reshape(-1, h)
    out, res, _ = torch.ops.mamba_attention.rms_norm_fwd(
        x2, weight, bias, r2, eps, prenorm, residual_in_fp32
    )
    out = out.reshape(shape)
    return (out, res.reshape(shape)) if prenorm else out


@torch.library.custom_op("mamba_attention::swiglu_fwd", mutates_args=())
def swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    return _core.swiglu_fwd(gate, up)


@swiglu_fwd.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("mamba_attention::swiglu_bwd", mutates_args=())
def swiglu_bwd(gate: Tensor, up: Tensor, dout: Tensor) -> Tuple[Tensor, Tensor]:
    dg, du = _core.swiglu_bwd(gate, up, dout)
    return dg, du


@swiglu_bwd.register_fake
def _(gate, up, dout):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, dout):
    gate, up = ctx.saved_tensors
    return torch.ops.mamba_attention.swiglu_bwd(gate, up, dout)


swiglu_fwd.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


def swiglu_op(gate, up):
    """``swiglu`` (gate, up (..., cols)) through the custom op, after the Rust checks."""
    if _eager():
        _core.swiglu_check(gate, up)
    return torch.ops.mamba_attention.swiglu_fwd(gate, up)
# ------------------------------------------------------------ attention (SPEC §3)
#
# ``mamba_attention::flash_attn_fwd`` -> (out, softmax_lse) and
# ``mamba_attention::flash_attn_bwd`` -> (dq, dk, dv), and their varlen twins.
# The window is passed as two ints (custom-op schemas have no int pairs). The
# gradient reaching softmax_lse (if any) flows back too (D_i − dlse_i in the
# backward). alibi_slopes, the offsets and the flags get no gradient.

__all__ += ["flash_attn", "flash_attn_varlen", "attention_options"]


@torch.library.custom_op("mamba_attention::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    softmax_scale: Optional[float],
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: Optional[Tensor],
    deterministic: bool = False,
) -> Tuple[Tensor, Tensor]:
    out, lse = _core.attention_fwd(
        q, k, v, softmax_scale, causal, (window_left, window_right), softcap, alibi_slopes
    )
    return out, lse


@flash_attn_fwd.register_fake
def _(q, k, v, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
      deterministic=False):
    b, sq, hq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, hq, sq), dtype=_F32)


@torch.library.custom_op("mamba_attention::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    softmax_lse: Tensor,
    dsoftmax_lse: Optional[Tensor],
    softmax_scale: Optional[float],
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: Optional[Tensor],
    deterministic: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = _core.attention_bwd(
        dout, q, k, v, out, softmax_lse, softmax_scale, causal, (window_left, window_right),
        softcap, alibi_slopes, dsoftmax_lse,
    )
    return dq, dk, dv


@flash_attn_bwd.register_fake
def _(dout, q, k, v, out, softmax_lse, dsoftmax_lse, softmax_scale, causal, window_left,
      window_right, softcap, alibi_slopes, deterministic=False):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attn_setup_context(ctx, inputs, output):
    q, k, v, softmax_scale, causal, wl, wr, softcap, alibi_slopes = inputs[:9]
    ctx.deterministic = bool(inputs[9]) if len(inputs) > 9 else False
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes)
    ctx.params = (softmax_scale, causal, wl, wr, softcap)


def _attn_backward(ctx, dout, dlse):
    q, k, v, out, lse, alibi_slopes = ctx.saved_tensors
    if dout is None:  # only lse was used
        dout = torch.zeros_like(out)
    softmax_scale, causal, wl, wr, softcap = ctx.params
    dq, dk, dv = torch.ops.mamba_attention.flash_attn_bwd(
        dout, q, k, v, out, lse, dlse, softmax_scale, causal, wl, wr, softcap, alibi_slopes,
        ctx.deterministic,
    )
    return dq, dk, dv, None, None, None, None, None, None, None


flash_attn_fwd.register_autograd(_attn_backward, setup_context=_attn_setup_context)


@torch.library.custom_op("mamba_attention::flash_attn_varlen_fwd", mutates_args=())
def flash_attn_varlen_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: Optional[float],
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: Optional[Tensor],
    deterministic: bool = False,
) -> Tuple[Tensor, Tensor]:
    out, lse = _core.attention_varlen_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
        (window_left, window_right), softcap, alibi_slopes,
    )
    return out, lse


@flash_attn_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
      window_left, window_right, softcap, alibi_slopes, deterministic=False):
    total, hq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((hq, total), dtype=_F32)


@torch.library.custom_op("mamba_attention::flash_attn_varlen_bwd", mutates_args=())
def flash_attn_varlen_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    softmax_lse: Tensor,
    dsoftmax_lse: Optional[Tensor],
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: Optional[float],
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: Optional[Tensor],
    deterministic: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = _core.attention_varlen_bwd(
        dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        softmax_scale, causal, (window_left, window_right), softcap, alibi_slopes, dsoftmax_lse,
    )
    return dq, dk, dv


@flash_attn_varlen_bwd.register_fake
def _(dout, q, k, v, out, softmax_lse, dsoftmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
      max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
      deterministic=False):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup_context(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, wl, wr, softcap,
     alibi_slopes) = inputs[:13]
    ctx.deterministic = bool(inputs[13]) if len(inputs) > 13 else False
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi_slopes)
    ctx.params = (max_q, max_k, softmax_scale, causal, wl, wr, softcap)


def _varlen_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, alibi_slopes = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    max_q, max_k, softmax_scale, causal, wl, wr, softcap = ctx.params
    dq, dk, dv = torch.ops.mamba_attention.flash_attn_varlen_bwd(
        dout, q, k, v, out, lse, dlse, cu_q, cu_k, max_q, max_k, softmax_scale, causal, wl, wr,
        softcap, alibi_slopes, ctx.deterministic,
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None


flash_attn_varlen_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)


def attention_options(q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes,
                      deterministic, return_attn_probs, varlen=None):
    """flash_attn_func's (``varlen``: (cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
    max_seqlen_k): flash_attn_varlen_func's) arguments checked in Rust
    (``_core.attention_check``, ``_core.attention_varlen_check``) and its options
    parsed: (softmax_scale or None, causal, left, right, softcap, deterministic[,
    max_seqlen_q, max_seqlen_k]). Under torch.compile tracing they pass as given."""
    if not _eager():
        left, right = window_size
        opts = (softmax_scale, causal, left, right, softcap or 0.0, deterministic)
        return opts if varlen is None else opts + tuple(varlen[2:])
    if varlen is None:
        return _core.attention_check(q, k, v, softmax_scale, causal, window_size, softcap,
                                     alibi_slopes, deterministic, return_attn_probs)
    cu_q, cu_k, max_q, max_k = varlen
    return _core.attention_varlen_check(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale,
                                        causal, window_size, softcap, alibi_slopes,
                                        deterministic, return_attn_probs)


def flash_attn(q, k, v, softmax_scale, causal, left, right, softcap, alibi_slopes,
               deterministic=False):
    """(out, softmax_lse) of flash_attn_func through the differentiable custom op, with
    the options of :func:`attention_options`."""
    return torch.ops.mamba_attention.flash_attn_fwd(
        q, k, v, softmax_scale, causal, left, right, softcap, alibi_slopes, deterministic,
    )


def flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      softmax_scale, causal, left, right, softcap, alibi_slopes,
                      deterministic=False):
    """(out, softmax_lse) of flash_attn_varlen_func through the differentiable custom op,
    with the options of :func:`attention_options`."""
    return torch.ops.mamba_attention.flash_attn_varlen_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        softmax_scale, causal, left, right, softcap, alibi_slopes, deterministic,
    )


# ------------------------------------------- attention on CUDA (SPEC §3, float16/bfloat16)
#
# CUDA implementations of the four attention custom ops above: the tensor-core
# forward (kernels/flash_attn_fwd.cu) and backward (kernels/flash_attn_bwd.cu)
# through the private bindings. They take float16/bfloat16 CUDA tensors with a
# head dim that is a multiple of 8 up to 256 (ops.py routes anything else to
# the differentiable torch formula); anything else raises from the binding.
# The backward allocates its float32 scratch here: lse2/dsum (hq, rows) and,
# unless deterministic, the zeroed dQ accumulator (rows, hq, hd rounded up to 16).


def _cuda_norm(q, softmax_scale, causal, wl, wr):
    import math

    right = 0 if causal else int(wr)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return scale, int(wl), right


def _cuda_fwd(q, k, v, softmax_scale, causal, wl, wr, softcap, alibi_slopes, varlen=None):
    scale, left, right = _cuda_norm(q, softmax_scale, causal, wl, wr)
    if varlen is None:
        out = q.new_empty(q.shape)
        b, sq, hq, _ = q.shape
        lse = q.new_empty((b, hq, sq), dtype=_F32)
        _core._flash_attn_fwd_cuda(q, k, v, out, lse, scale, left, right, float(softcap),
                                   alibi_slopes)
    else:
        # Rows outside every sequence (padding) are not written by the kernel:
        # out 0 and lse -inf there, as on the CPU.
        cu_q, cu_k, max_q, max_k = varlen
        out = q.new_zeros(q.shape)
        lse = q.new_full((q.shape[1], q.shape[0]), float("-inf"), dtype=_F32)
        _core._flash_attn_fwd_cuda(q, k, v, out, lse, scale, left, right, float(softcap),
                                   alibi_slopes, cu_q, cu_k, int(max_q), int(max_k))
    return out, lse


def _cuda_bwd(dout, q, k, v, out, lse, dlse, softmax_scale, causal, wl, wr, softcap,
              alibi_slopes, deterministic, varlen=None):
    scale, left, right = _cuda_norm(q, softmax_scale, causal, wl, wr)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    hq, hd = q.shape[-2], q.shape[-1]
    rows = q.shape[0] if varlen is not None else q.shape[0] * q.shape[1]
    # Varlen: rows outside every sequence get zero gradients.
    zero_q = varlen is not None and deterministic
    dq = q.new_zeros(q.shape) if zero_q else q.new_empty(q.shape)
    dk = k.new_zeros(k.shape) if varlen is not None else k.new_empty(k.shape)
    dv = v.new_zeros(v.shape) if varlen is not None else v.new_empty(v.shape)
    lse2 = q.new_empty((hq, rows), dtype=_F32)
    dsum = q.new_empty((hq, rows), dtype=_F32)
    dq_acc = None if deterministic else q.new_zeros((rows, hq, (hd + 15) // 16 * 16), dtype=_F32)
    extra = () if varlen is None else tuple(varlen[:2]) + (int(varlen[2]), int(varlen[3]))
    _core._flash_attn_bwd_cuda(dout, q, k, v, out, lse, dq, dk, dv, dq_acc, lse2, dsum, scale,
                               left, right, float(softcap), alibi_slopes, dlse, *extra,
                               deterministic=bool(deterministic))
    return dq, dk, dv


@flash_attn_fwd.register_kernel("cuda")
def _(q, k, v, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
      deterministic=False):
    return _cuda_fwd(q, k, v, softmax_scale, causal, window_left, window_right, softcap,
                     alibi_slopes)


@flash_attn_bwd.register_kernel("cuda")
def _(dout, q, k, v, out, softmax_lse, dsoftmax_lse, softmax_scale, causal, window_left,
      window_right, softcap, alibi_slopes, deterministic=False):
    return _cuda_bwd(dout, q, k, v, out, softmax_lse, dsoftmax_lse, softmax_scale, causal,
                     window_left, window_right, softcap, alibi_slopes, deterministic)


@flash_attn_varlen_fwd.register_kernel("cuda")
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
      window_left, window_right, softcap, alibi_slopes, deterministic=False):
    return _cuda_fwd(q, k, v, softmax_scale, causal, window_left, window_right, softcap,
                     alibi_slopes, (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))


@flash_attn_varlen_bwd.register_kernel("cuda")
def _(dout, q, k, v, out, softmax_lse, dsoftmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
      max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
      deterministic=False):
    return _cuda_bwd(dout, q, k, v, out, softmax_lse, dsoftmax_lse, softmax_scale, causal,
                     window_left, window_right, softcap, alibi_slopes, deterministic,
                     (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))


def cuda_attention_supported(q, k, v):
    """Whether the CUDA custom-op path (our forward and backward kernels) takes
    these tensors: float16/bfloat16 CUDA, one dtype, head dim a multiple of 8 ≤ 256."""
    return (
        q.dtype in (torch.float16, torch.bfloat16)
        and k.dtype == q.dtype
        and v.dtype == q.dtype
        and q.shape[-1] % 8 == 0
        and 0 < q.shape[-1] <= 256
    )
# ------------------------------------------------------------ rotary (SPEC §5)
#
# ``mamba_attention::rotary_qk`` -> (q_out, k_out): NeoX rotary embedding of q
# and k; one kernel launch for both on CUDA (kernels/rotary.cu), the torch
# formula on the CPU. Its gradient is the same rotation by the opposite angle.

__all__ += ["rotary_qk", "rotary_torch"]


def rotary_torch(x: Tensor, positions: Tensor, inv_freq: Tensor, conj: bool = False) -> Tensor:
    """The rotary formula in torch ops, float32 arithmetic, x's dtype out."""
    half = x.shape[-1] // 2
    ang = positions.to(device=x.device, dtype=_F32)[:, None] * inv_freq[None, :]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    if conj:
        sin = -sin
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


@torch.library.custom_op("mamba_attention::rotary_qk", mutates_args=())
def rotary_qk_op(q: Tensor, k: Tensor, positions: Tensor, inv_freq: Tensor,
                 conj: bool) -> Tuple[Tensor, Tensor]:
    if q.device.type == "cuda":
        qo, ko = _core._rotary_cuda(q, k, positions, inv_freq, conj)
        return qo, ko
    return (rotary_torch(q, positions, inv_freq, conj),
            rotary_torch(k, positions, inv_freq, conj))


@rotary_qk_op.register_fake
def _(q, k, positions, inv_freq, conj):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _rotary_setup(ctx, inputs, output):
    _, _, positions, inv_freq, conj = inputs
    ctx.save_for_backward(positions, inv_freq)
    ctx.conj = conj


def _rotary_backward(ctx, dq, dk):
    positions, inv_freq = ctx.saved_tensors
    dq, dk = torch.ops.mamba_attention.rotary_qk(dq, dk, positions,
                                                 inv_freq, not ctx.conj)
    return dq, dk, None, None, None


rotary_qk_op.register_autograd(_rotary_backward, setup_context=_rotary_setup)


def rotary_qk(q, k, positions, inv_freq):
    """Rotary embedding of q (b, l, hq, hd) and k (b, l, hk, hd) through the custom op."""
    return torch.ops.mamba_attention.rotary_qk(q, k, positions, inv_freq, False)
# ------------------------------------------------- fused causal conv1d + selective scan
#
# ``mamba_attention::conv_selective_scan_fwd`` -> (out, last_state) and
# ``mamba_attention::conv_selective_scan_bwd`` -> the gradients of x,
# conv_weight, conv_bias, delta, A, B, C, D, z, delta_bias, initial_state
# (empty tensors for inputs that were None). The activation travels as a
# bool (silu). The backward recomputes u = act(conv(x)) (the forward never
# stores it), then runs the scan's backward and the conv's backward.

__all__ += ["conv_selective_scan"]


def _act_name(silu):
    return "silu" if silu else None


@torch.library.custom_op("mamba_attention::conv_selective_scan_fwd", mutates_args=())
def conv_selective_scan_fwd(
    x: Tensor,
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    silu: bool,
    initial_state: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    out, last_state = _core.conv_selective_scan_fwd(
        x, conv_weight, conv_bias, delta, A, B, C, D, z, delta_bias, delta_softplus,
        _act_name(silu), True, initial_state,
    )
    return out, last_state


@conv_selective_scan_fwd.register_fake
def _(x, conv_weight, conv_bias, delta, A, B, C, D, z, delta_bias, delta_softplus, silu,
      initial_state):
    b, d, _ = x.shape
    return x.new_empty(x.shape), x.new_empty((b, d, A.shape[1]), dtype=_F32)


@torch.library.custom_op("mamba_attention::conv_selective_scan_bwd", mutates_args=())
def conv_selective_scan_bwd(
    x: Tensor,
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    silu: bool,
    initial_state: Optional[Tensor],
    dout: Tensor,
    dlast_state: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
           Tensor]:
    act = _act_name(silu)
    u = _core.causal_conv1d_fwd(x, conv_weight, conv_bias, None, False, act)
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinit = _core.selective_scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, dout, dlast_state
    )
    del u
    dx, dw, db, _ = _core.causal_conv1d_bwd(x, conv_weight, conv_bias, None, du, None, act)
    grads = (dx, dw, db, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinit)
    return tuple(x.new_empty((0,)) if g is None else g for g in grads)


@conv_selective_scan_bwd.register_fake
def _(x, conv_weight, conv_bias, delta, A, B, C, D, z, delta_bias, delta_softplus, silu,
      initial_state, dout, dlast_state):
    def like(t, dtype=_F32):
        return x.new_empty((0,)) if t is None else t.new_empty(t.shape, dtype=dtype)

    return (
        x.new_empty(x.shape),
        like(conv_weight),
        like(conv_bias),
        x.new_empty(x.shape),
        like(A),
        like(B),
        like(C),
        like(D),
        like(z, z.dtype if z is not None else None),
        like(delta_bias),
        like(initial_state),
    )


def _conv_scan_setup(ctx, inputs, output):
    (x, conv_weight, conv_bias, delta, A, B, C, D, z, delta_bias, delta_softplus, silu,
     initial_state) = inputs
    ctx.save_for_backward(x, conv_weight, conv_bias, delta, A, B, C, D, z, delta_bias,
                          initial_state)
    ctx.flags = (delta_softplus, silu)


def _conv_scan_backward(ctx, dout, dlast_state):
    x, conv_weight, conv_bias, delta, A, B, C, D, z, delta_bias, initial_state = ctx.saved_tensors
    delta_softplus, silu = ctx.flags
    if dout is None:  # only last_state was used
        dout = x.new_zeros(x.shape)
    grads = torch.ops.mamba_attention.conv_selective_scan_bwd(
        x, conv_weight, conv_bias, delta, A, B, C, D, z, delta_bias, delta_softplus, silu,
        initial_state, dout, dlast_state,
    )
    inputs = (x, conv_weight, conv_bias, delta, A, B, C, D, z, delta_bias, initial_state)
    (dx, dw, db, ddelta, dA, dB, dC, dD, dz, ddb, dinit) = (
        None if t is None else g.to(t.dtype) for t, g in zip(inputs, grads)
    )
    return dx, dw, db, ddelta, dA, dB, dC, dD, dz, ddb, None, None, dinit


conv_selective_scan_fwd.register_autograd(_conv_scan_backward, setup_context=_conv_scan_setup)


def conv_selective_scan(
    x,
    conv_weight,
    conv_bias,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    activation="silu",
    return_last_state=False,
    initial_state=None,
):
    """``conv_selective_scan_fn`` for torch tensors through the differentiable custom op,
    after the Rust checks."""
    if _eager():
        delta_softplus, silu, return_last_state = _core.conv_selective_scan_check(
            x, conv_weight, conv_bias, delta, A, B, C, D, z, delta_bias, delta_softplus,
            activation, return_last_state, initial_state,
        )
    else:
        silu = activation in ("silu", "swish")
    out, last_state = torch.ops.mamba_attention.conv_selective_scan_fwd(
        x, conv_weight, conv_bias, delta, A, B, C, D, z, delta_bias, delta_softplus,
        silu, initial_state,
    )
    return (out, last_state) if return_last_state else out
