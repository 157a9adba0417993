"""Functional API (SPEC §1): tensor in, tensor out.

Each function accepts NumPy arrays (float32, float16, float64 and ml_dtypes'
bfloat16), PyTorch tensors (float32, float16, bfloat16, float64) and other
objects that implement ``__dlpack__`` on the CPU. The result has the kind,
dtype and device of the first tensor argument. Arithmetic is float32 (float64
inputs are computed in float32 too, so expect float32 accuracy from them).

Outputs are allocated by the caller's framework (``numpy.empty`` /
``torch.empty``) and written by the Rust core, with the GIL released while the
kernel runs. All argument checking happens in Rust (``src/ops/``), which raises
``ValueError`` for shapes and values and ``TypeError`` for kinds and dtypes,
naming the argument.
"""

from __future__ import annotations

from . import _core

__all__ = ["selective_scan_fn", "selective_state_update"]


def selective_scan_fn(
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
    """Selective scan (Mamba-1 "S6"), a drop-in for mamba_ssm's ``selective_scan_fn``.

    Shapes: ``u``, ``delta``, ``z``: (b, d, l); ``A``: (d, n); ``B``, ``C``:
    (d, n) constant, (b, n, l) shared, or (b, g, n, l) grouped with d % g == 0;
    ``D``, ``delta_bias``: (d,); ``initial_state`` (extension): (b, d, n).

    For each channel c and state k::

        Δ = delta + delta_bias[c];  Δ = softplus(Δ) if delta_softplus (threshold 20)
        h_t[k] = exp(Δ_t·A[c,k])·h_{t-1}[k] + Δ_t·B_t[k]·u_t,   h_0 = initial_state
        y_t = Σ_k C_t[k]·h_t[k] + D[c]·u_t;   y_t *= z_t·sigmoid(z_t) if z is given

    Returns ``out`` (b, d, l) in u's dtype, and with ``return_last_state`` also
    ``last_state`` = h_l, (b, d, n) float32.
    """
    return _core.selective_scan_fwd(
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        bool(delta_softplus),
        bool(return_last_state),
        initial_state,
    )


def selective_state_update(
    state,
    x,
    dt,
    A,
    B,
    C,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus=False,
    state_batch_indices=None,
):
    """One decoding step of the selective scan, updating ``state`` in place.

    Shapes: ``state`` (b, d, n) float32 (or (B_cache, d, n) with
    ``state_batch_indices``); ``x``, ``dt``, ``z``: (b, d); ``A``: (d, n);
    ``B``, ``C``: (b, n) or (b, g, n); ``D``, ``dt_bias``: (d,);
    ``state_batch_indices``: (b,) integers selecting the state row of each
    batch entry; a negative index skips that entry and writes 0 to its output.

    Returns ``out`` (b, d) in x's dtype.
    """
    return _core.selective_state_update(
        state,
        x,
        dt,
        A,
        B,
        C,
        D,
        z,
        dt_bias,
        bool(dt_softplus),
        state_batch_indices,
    )
