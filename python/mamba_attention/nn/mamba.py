"""The Mamba (S6) mixer layer on mamba-attention's kernels (SPEC §5 "Mamba").

Parameter names, shapes and initialisation are those of
``mamba_ssm.modules.mamba_simple.Mamba``, so a state_dict of that layer (or the
``mixer`` of a block of a mamba_ssm checkpoint, once its prefix is stripped)
loads with ``strict=True``, and with the same seed the constructor draws the
same random numbers in the same order, giving the same parameters.

The computation, for ``hidden_states`` u of shape (b, l, d_model)::

    x, z   = split(in_proj(u))                         each (b, d_inner, l)
    x      = silu(causal depthwise conv1d(x))          causal_conv1d_fn
    dt,B,C = split(x_proj(x))                          (b, dt_rank|d_state|d_state, l)
    delta  = dt_proj.weight @ dt                       dt_proj.bias goes in as delta_bias
    y      = selective_scan_fn(x, delta, A=-exp(A_log), B, C, D, z,
                               delta_bias=dt_proj.bias, delta_softplus=True)
    out    = out_proj(y)                               (b, l, d_model)
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._args import bool_arg, float_arg, int_arg, tensor_arg
from ..ops import (
    causal_conv1d_fn,
    causal_conv1d_update,
    conv_selective_scan_fn,
    selective_scan_fn,
    selective_state_update,
)

__all__ = ["Mamba"]


class Mamba(nn.Module):
    """Mamba-1 mixer: in_proj → causal conv1d + SiLU → selective scan (S6) gated
    by SiLU(z) → out_proj, a drop-in for ``mamba_ssm.modules.mamba_simple.Mamba``.

    Parameters (names and shapes as mamba_ssm's, d_inner = expand·d_model,
    dt_rank = ceil(d_model / 16) when "auto"):

    - ``in_proj.weight`` (2·d_inner, d_model) [``in_proj.bias`` if ``bias``]
    - ``conv1d.weight`` (d_inner, 1, d_conv), ``conv1d.bias`` (d_inner,) if ``conv_bias``
      (a depthwise ``nn.Conv1d`` with padding d_conv − 1, as mamba_ssm's)
    - ``x_proj.weight`` (dt_rank + 2·d_state, d_inner)
    - ``dt_proj.weight`` (d_inner, dt_rank), ``dt_proj.bias`` (d_inner,)
    - ``A_log`` (d_inner, d_state) float32, ``D`` (d_inner,) float32
    - ``out_proj.weight`` (d_model, d_inner) [``out_proj.bias`` if ``bias``]

    Initialisation: ``dt_proj.weight`` is constant or uniform in ±dt_rank^-0.5·dt_scale
    (``dt_init`` "constant" / "random"); ``dt_proj.bias`` is the inverse softplus of
    dt drawn log-uniformly in [dt_min, dt_max] and clamped below at dt_init_floor
    (marked ``_no_reinit``); ``A_log[c, k] = log(k + 1)`` (S4D-real); ``D = 1``
    (both marked ``_no_weight_decay``); everything else as torch's defaults.

    ``use_fast_path`` is accepted for compatibility and ignored: every call
    goes through this package's kernels. ``layer_idx`` keys this layer's
    decoding state in :class:`InferenceParams`.

    Decoding keeps ``conv_state`` (b, d_inner, d_conv) in the conv's dtype and
    ``ssm_state`` (b, d_inner, d_state) in float32 (the state update kernel's
    contract; mamba_ssm uses dt_proj's dtype). :meth:`step` also accepts an
    ``ssm_state`` of another dtype (it is updated through a float32 copy).

    ``fused_conv_scan`` (a class attribute, settable per instance): without
    ``inference_params``, the scan takes x before the conv and runs the conv
    itself (:func:`~mamba_attention.ops.conv_selective_scan_fn`) instead of
    reading the conv's output; the results are the same (bit for bit on the
    CPU, to float32 rounding of the conv's SiLU on CUDA).
    x_proj still needs the conv's output (Δ, B and C are computed from it), so
    the conv also runs once on its own: the fusion saves no memory traffic in
    this layer, and its backward runs the conv backward twice.
    """

    #: Use conv_selective_scan_fn in forward() when no inference_params are given.
    fused_conv_scan = False

    def __init__(
        self,
        d_model,
        d_state=16,
        d_conv=4,
        expand=2,
        dt_rank="auto",
        dt_min=0.001,
        dt_max=0.1,
        dt_init="random",
        dt_scale=1.0,
        dt_init_floor=1e-4,
        conv_bias=True,
        bias=False,
        use_fast_path=True,
        layer_idx=None,
        device=None,
        dtype=None,
    ):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        d_model = int_arg("d_model", d_model)
        d_state = int_arg("d_state", d_state)
        d_conv = int_arg("d_conv", d_conv, 2)
        float_arg("expand", expand, 0.0, exclusive=True)
        if int(expand * d_model) < 1:
            raise ValueError(f"expand: expand · d_model must be ≥ 1, got {expand} · {d_model}")
        if not (isinstance(dt_rank, str) and dt_rank == "auto"):
            if isinstance(dt_rank, str):
                raise ValueError(f'dt_rank: expected "auto" or an int ≥ 1, got {dt_rank!r}')
            dt_rank = int_arg("dt_rank", dt_rank)
        dt_min = float_arg("dt_min", dt_min, 0.0, exclusive=True)
        dt_max = float_arg("dt_max", dt_max, 0.0, exclusive=True)
        if dt_min > dt_max:
            raise ValueError(f"dt_max: expected dt_max ≥ dt_min = {dt_min}, got {dt_max}")
        dt_scale = float_arg("dt_scale", dt_scale)
        dt_init_floor = float_arg("dt_init_floor", dt_init_floor, 0.0)
        conv_bias, bias = bool_arg("conv_bias", conv_bias), bool_arg("bias", bias)
        if dt_init not in ("constant", "random"):
            raise ValueError(f'dt_init: expected "constant" or "random", got {dt_init!r}')
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(self.expand * self.d_model)
        self.dt_rank = math.ceil(self.d_model / 16) if dt_rank == "auto" else dt_rank
        self.use_fast_path = use_fast_path
        self.layer_idx = layer_idx
        self.activation = "silu"

        # Created in mamba_ssm's order, so that a seed gives the same parameters.
        self.in_proj = nn.Linear(self.d_model, self.d_inner * 2, bias=bias, **factory_kwargs)
        self.conv1d = nn.Conv1d(
            in_channels=self.d_inner,
            out_channels=self.d_inner,
            kernel_size=d_conv,
            groups=self.d_inner,
            padding=d_conv - 1,
            bias=conv_bias,
            **factory_kwargs,
        )
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(
            self.d_inner, self.dt_rank + 2 * self.d_state, bias=False, **factory_kwargs
        )
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory_kwargs)

        # dt_proj.weight: keeps the variance of delta at initialisation.
        dt_init_std = self.dt_rank**-0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                self.dt_proj.weight.fill_(dt_init_std)
            else:
                self.dt_proj.weight.uniform_(-dt_init_std, dt_init_std)

        # dt_proj.bias: softplus(bias) is log-uniform in [dt_min, dt_max] (≥ floor).
        log_min, log_max = math.log(dt_min), math.log(dt_max)
        dt = torch.exp(
            torch.rand(self.d_inner, **factory_kwargs) * (log_max - log_min) + log_min
        ).clamp(min=dt_init_floor)
        # softplus⁻¹(dt) = log(exp(dt) − 1) = dt + log(1 − exp(−dt)), stable for small dt.
        inv_softplus_dt = dt + torch.log(-torch.expm1(-dt))
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_softplus_dt)
        self.dt_proj.bias._no_reinit = True  # a model-wide init must not zero this bias

        # S4D-real: A[c, k] = -(k + 1); A_log is kept in float32 whatever ``dtype`` is.
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=device)
        self.A_log = nn.Parameter(torch.log(a).repeat(self.d_inner, 1).contiguous())
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))  # float32
        self.D._no_weight_decay = True

        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=bias, **factory_kwargs)

    # ---------------------------------------------------------------- pieces

    def _conv_weight(self) -> Tensor:
        """conv1d.weight (d_inner, 1, d_conv) as the (d_inner, d_conv) view the ops take."""
        return self.conv1d.weight.squeeze(1)

    def _A(self) -> Tensor:
        return -torch.exp(self.A_log.float())

    def _in_proj(self, hidden_states: Tensor) -> Tuple[Tensor, Tensor]:
        """in_proj of (b, l, d_model) straight into the (b, 2·d_inner, l) layout; x, z views."""
        _check_input(hidden_states, self.d_model)
        xz = torch.matmul(self.in_proj.weight, hidden_states.transpose(1, 2))
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias.to(dtype=xz.dtype)[:, None]
        return xz.chunk(2, dim=1)

    def _ssm_params(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """x (b, d_inner, l) after the conv → delta (b, d_inner, l) (without the bias),
        B and C (b, d_state, l)."""
        x_dbl = torch.matmul(self.x_proj.weight, x)  # (b, dt_rank + 2 d_state, l)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
        delta = torch.matmul(self.dt_proj.weight, dt)  # (b, d_inner, l)
        return delta, B, C

    def _get_states_from_cache(self, inference_params, batch_size, initialize_states=False):
        if self.layer_idx is None:
            raise ValueError(
                "layer_idx: a Mamba layer used with inference_params needs a layer_idx "
                "(the key of its state in inference_params.key_value_memory_dict), got None"
            )
        cache = inference_params.key_value_memory_dict
        if self.layer_idx not in cache:
            cache[self.layer_idx] = self.allocate_inference_cache(batch_size, 0)
        conv_state, ssm_state = cache[self.layer_idx]
        if initialize_states:
            conv_state.zero_()
            ssm_state.zero_()
        return conv_state, ssm_state

    # ---------------------------------------------------------------- forward

    def forward(self, hidden_states: Tensor, inference_params=None) -> Tensor:
        """hidden_states (b, l, d_model) → (b, l, d_model), differentiable.

        With ``inference_params`` (see :class:`InferenceParams`; needs ``layer_idx``):
        at ``seqlen_offset == 0`` the whole prompt runs and this layer's
        ``(conv_state, ssm_state)`` in ``key_value_memory_dict[layer_idx]`` are set to
        the states after it; at ``seqlen_offset > 0`` one token (l == 1) goes
        through :meth:`step`, and l > 1 tokens (an extension: mamba_ssm allows
        only one) continue from the cached states as one chunk.
        """
        batch, seqlen, _ = _check_input(hidden_states, self.d_model)
        conv_state = ssm_state = None
        resume = False
        if inference_params is not None:
            conv_state, ssm_state = self._get_states_from_cache(inference_params, batch)
            if inference_params.seqlen_offset > 0:
                if seqlen == 1:
                    out, _, _ = self.step(hidden_states, conv_state, ssm_state)
                    return out
                resume = True

        x, z = self._in_proj(hidden_states)
        weight, bias = self._conv_weight(), self.conv1d.bias
        if resume:
            # Continue a sequence: the conv sees the last d_conv - 1 inputs kept in
            # conv_state, the scan starts from ssm_state.
            # (copies: the states change in place below, autograd may keep these)
            init = conv_state[:, :, conv_state.shape[-1] - (self.d_conv - 1):]
            init = init.to(dtype=x.dtype, copy=True)
            xc = causal_conv1d_fn(x, weight, bias, initial_states=init, activation="silu")
            with torch.no_grad():
                full = torch.cat([conv_state.to(x.dtype), x.detach()], dim=-1)
                conv_state.copy_(full[:, :, full.shape[-1] - conv_state.shape[-1]:])
        else:
            if conv_state is not None:
                with torch.no_grad():  # the last d_conv inputs, zero-padded on the left
                    conv_state.copy_(F.pad(x.detach(), (conv_state.shape[-1] - seqlen, 0)))
            xc = causal_conv1d_fn(x, weight, bias, activation="silu")

        delta, B, C = self._ssm_params(xc)
        if self.fused_conv_scan and inference_params is None:
            # The scan recomputes xc from x (xc is not read back).
            y = conv_selective_scan_fn(
                x,
                weight,
                bias,
                delta,
                self._A(),
                B,
                C,
                self.D.float(),
                z=z,
                delta_bias=self.dt_proj.bias.float(),
                delta_softplus=True,
            )
            return F.linear(y.transpose(1, 2), self.out_proj.weight, self.out_proj.bias)
        y = selective_scan_fn(
            xc,
            delta,
            self._A(),
            B,
            C,
            self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            return_last_state=ssm_state is not None,
            initial_state=ssm_state.to(torch.float32, copy=True) if resume else None,
        )
        if ssm_state is not None:
            y, last_state = y
            with torch.no_grad():
                ssm_state.copy_(last_state)
        return F.linear(y.transpose(1, 2), self.out_proj.weight, self.out_proj.bias)

    # ---------------------------------------------------------------- decoding

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        """Zeroed ``(conv_state (b, d_inner, d_conv), ssm_state (b, d_inner, d_state))``
        on this layer's device: conv_state in ``dtype`` (default: conv1d.weight's),
        ssm_state in float32. ``max_seqlen`` is unused (the state does not grow)."""
        device = self.out_proj.weight.device
        conv_dtype = self.conv1d.weight.dtype if dtype is None else dtype
        conv_state = torch.zeros(
            batch_size, self.d_inner, self.d_conv, device=device, dtype=conv_dtype
        )
        ssm_state = torch.zeros(
            batch_size, self.d_inner, self.d_state, device=device, dtype=torch.float32
        )
        return conv_state, ssm_state

    @torch.no_grad()
    def step(self, hidden_states: Tensor, conv_state: Tensor, ssm_state: Tensor):
        """Decode one token: hidden_states (b, 1, d_model) → (out (b, 1, d_model),
        conv_state, ssm_state), both states updated in place (not differentiable)."""
        batch, seqlen, _ = _check_input(hidden_states, self.d_model)
        if seqlen != 1:
            raise ValueError(
                f"hidden_states: step decodes one token, expected shape (b, 1, {self.d_model}), "
                f"got {tuple(hidden_states.shape)}"
            )
        want_conv = (batch, self.d_inner, self.d_conv)
        want_ssm = (batch, self.d_inner, self.d_state)
        for name, t in (("conv_state", conv_state), ("ssm_state", ssm_state)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                what = f"dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise TypeError(f"{name}: expected a floating-point torch.Tensor (from "
                                f"allocate_inference_cache), got {what}")
        if tuple(conv_state.shape) != want_conv:
            raise ValueError(f"conv_state: expected shape {want_conv}, got {tuple(conv_state.shape)}")
        if tuple(ssm_state.shape) != want_ssm:
            raise ValueError(f"ssm_state: expected shape {want_ssm}, got {tuple(ssm_state.shape)}")

        xz = F.linear(hidden_states[:, 0], self.in_proj.weight, self.in_proj.bias)  # (b, 2 d)
        x, z = xz.chunk(2, dim=-1)
        x = causal_conv1d_update(
            x, conv_state, self._conv_weight(), self.conv1d.bias, self.activation
        )
        x_db = F.linear(x, self.x_proj.weight)  # (b, dt_rank + 2 d_state)
        dt, B, C = torch.split(x_db, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # the bias goes in as dt_bias
        # The kernel updates a float32 state in place: another dtype, or a lazily
        # negated view (the negative bit), goes through a float32 copy.
        direct = ssm_state.dtype == torch.float32 and not ssm_state.is_neg()
        state = ssm_state if direct else ssm_state.to(torch.float32).resolve_neg()
        y = selective_state_update(
            state,
            x,
            dt,
            self._A(),
            B,
            C,
            self.D.float(),
            z=z,
            dt_bias=self.dt_proj.bias.float(),
            dt_softplus=True,
        )
        if state is not ssm_state:
            ssm_state.copy_(state)
        out = F.linear(y, self.out_proj.weight, self.out_proj.bias)
        return out.unsqueeze(1), conv_state, ssm_state

    # ---------------------------------------------------------------- analysis

    @torch.no_grad()
    def hidden_attention(self, hidden_states: Tensor, reduce: Optional[str] = "mean") -> Tensor:
        """The hidden attention matrices of this layer (Ali, Zimerman, Wolf 2024) for
        ``hidden_states`` (b, l, d_model): α[c, i, j] = Σₖ Cᵢ[k]·exp(Σ_{t=j+1..i} Δₜ·A[c,k])·Δⱼ·Bⱼ[k]
        (j ≤ i), the weights with which the scan mixes the (post-conv) inputs into
        its outputs. Returns the channel mean (b, l, l) float32 (``reduce="mean"``,
        the default) or every channel (b, d_inner, l, l) with ``reduce=None``."""
        from ..ops import hidden_attention

        x, _ = self._in_proj(hidden_states)
        xc = causal_conv1d_fn(x, self._conv_weight(), self.conv1d.bias, activation="silu")
        delta, B, C = self._ssm_params(xc)
        return hidden_attention(
            delta,
            self._A(),
            B,
            C,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            reduce=reduce,
        )

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, "
            f"d_conv={self.d_conv}, dt_rank={self.dt_rank}, layer_idx={self.layer_idx}"
        )


def _check_input(hidden_states, d_model):
    """(b, l, d_model) floating torch tensor check; returns the shape."""
    return tensor_arg("hidden_states", hidden_states, f"(b, l, {d_model})", last=d_model, ndim=3)
