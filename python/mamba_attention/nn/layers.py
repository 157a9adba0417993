"""RMSNorm (fused residual add) and the SwiGLU MLP of the hybrid blocks (SPEC §5)."""

from __future__ import annotations

import torch
from torch import nn

from ..ops import rms_norm_fn, swiglu
from ._args import bool_arg, float_arg, int_arg, tensor_arg

__all__ = ["RMSNorm", "GatedMLP"]


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, with the residual add fused in.

    ``forward(x)`` returns ``x / sqrt(mean(x²) + eps) · weight``.
    ``forward(x, residual, prenorm=True)`` first adds ``residual`` (float32
    arithmetic) and returns ``(normed, x + residual)``: the pre-norm residual
    stream of a block in one kernel (``residual_in_fp32`` keeps that stream in
    float32 when no residual is given yet). ``weight`` is the only parameter,
    initialised to ones, as in mamba_ssm's and torch's RMSNorm.
    """

    def __init__(self, hidden_size, eps=1e-5, device=None, dtype=None):
        super().__init__()
        hidden_size = int_arg("hidden_size", hidden_size)
        self.eps = float_arg("eps", eps, 0.0)
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        h = self.weight.shape[0]
        tensor_arg("x", x, f"(..., {h})", last=h, last_name="hidden_size")
        return rms_norm_fn(x, self.weight, None, residual=residual, prenorm=prenorm,
                           residual_in_fp32=residual_in_fp32, eps=self.eps)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GatedMLP(nn.Module):
    """SwiGLU MLP: ``down(silu(gate(x)) · up(x))``, the gate fused (``swiglu``).

    ``gate``/``up``/``down`` are bias-free ``nn.Linear`` layers by default
    (hidden_features defaults to 4·in_features rounded up to a multiple of 64).
    """

    def __init__(self, in_features, hidden_features=None, bias=False, multiple_of=64,
                 device=None, dtype=None):
        super().__init__()
        in_features = int_arg("in_features", in_features)
        multiple_of = int_arg("multiple_of", multiple_of)
        bias = bool_arg("bias", bias)
        if hidden_features is not None:
            hidden_features = int_arg("hidden_features", hidden_features)
        if hidden_features is None:
            hidden_features = -(-4 * in_features // multiple_of) * multiple_of
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.gate = nn.Linear(in_features, hidden_features, **kw)
        self.up = nn.Linear(in_features, hidden_features, **kw)
        self.down = nn.Linear(hidden_features, in_features, **kw)

    def forward(self, x):
        n = self.gate.in_features
        tensor_arg("x", x, f"(..., {n})", last=n, last_name="in_features")
        return self.down(swiglu(self.gate(x), self.up(x)))
