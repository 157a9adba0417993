"""PyTorch autograd and torch.compile support for the selective scan.

Two ``torch.library`` custom ops wrap the Rust kernels:

- ``mamba_attention::selective_scan_fwd`` -> ``(out, last_state)``: always
  returns last_state (float32), so that its gradient can flow back (SPEC §1
  extension; mamba_ssm drops it). :func:`selective_scan` drops it again when
  it was not requested.
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

__all__ = ["selective_scan"]

_F32 = torch.float32


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
) -> Tuple[Tensor, Tensor]:
    out, last_state = _core.selective_scan_fwd(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, True, initial_state
    )
    return out, last_state


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
    b, d, _ = u.shape
    return u.new_empty(u.shape), u.new_empty((b, d, A.shape[1]), dtype=_F32)


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
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _core.selective_scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, dout, dlast_state
    )
    return tuple(u.new_empty((0,)) if g is None else g for g in grads)


@selective_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, dout, dlast_state):
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
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state)
    ctx.delta_softplus = delta_softplus


def _backward(ctx, dout, dlast_state):
    u, delta, A, B, C, D, z, delta_bias, initial_state = ctx.saved_tensors
    if dout is None:  # only last_state was used
        dout = u.new_zeros(u.shape)
    grads = torch.ops.mamba_attention.selective_scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, initial_state, dout, dlast_state
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
    """``selective_scan_fn`` for torch tensors through the differentiable custom op."""
    out, last_state = torch.ops.mamba_attention.selective_scan_fwd(
        u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), initial_state
    )
    return (out, last_state) if return_last_state else out
