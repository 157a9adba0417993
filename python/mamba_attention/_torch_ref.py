"""Pure-PyTorch reference implementations, used as benchmark peers.

Written from the formulas of SPEC §1 in the style of the classic sequential
PyTorch reference loop (all of ``exp(Δ·A)`` and ``Δ·B·u`` up front, then one
step per time index). Arithmetic is float32; results are cast back to the
input's dtype. These are deliberately simple and slow: they are the
"PyTorch reference loop" peer of BENCHMARKS.md, not an oracle for the tests
(those use an independent float64 reference).

torch is imported lazily so that ``mamba_attention`` imports without it.
"""

from __future__ import annotations

__all__ = ["selective_scan_ref", "selective_state_update_ref"]


def _softplus(x):
    """softplus with the SPEC threshold: x if x > 20 else log1p(exp(x))."""
    import torch.nn.functional as F

    return F.softplus(x, beta=1.0, threshold=20.0)  # same rule as SPEC §1


def _per_channel(M, d):
    """Expand a grouped (b, g, n[, l]) tensor to (b, d, n[, l]): channel c uses group c // (d // g)."""
    g = M.shape[1]
    if g == 1:  # one group == the shared layout: a broadcastable view, no copy
        return M
    if d % g:
        raise ValueError(f"d={d} is not a multiple of the group count g={g}")
    return M.repeat_interleave(d // g, dim=1)


def selective_scan_ref(
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
    """Selective scan forward as a loop over time (float32 torch).

    Shapes as in :func:`mamba_attention.selective_scan_fn`: ``u``, ``delta``,
    ``z`` (b, d, l); ``A`` (d, n); ``B``, ``C`` (d, n) | (b, n, l) | (b, g, n, l);
    ``D``, ``delta_bias`` (d,); ``initial_state`` (b, d, n).
    Returns ``out`` (b, d, l) in u's dtype [, ``last_state`` (b, d, n) float32].
    """
    import torch

    out_dtype = u.dtype
    u, delta, A, B, C = (t.float() for t in (u, delta, A, B, C))
    bsz, d, length = u.shape
    n = A.shape[1]
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = _softplus(delta)
    # Grouped (b, g, n, l) -> per channel (b, d, n, l); g == 1 is the shared layout (b, n, l).
    if B.dim() == 4:
        B = B[:, 0] if B.shape[1] == 1 else _per_channel(B, d)
    if C.dim() == 4:
        C = C[:, 0] if C.shape[1] == 1 else _per_channel(C, d)

    # Everything that does not depend on the state, for all t at once: (b, d, l, n).
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    du = delta * u
    if B.dim() == 2:
        deltaB_u = torch.einsum("bdl,dn->bdln", du, B)
    elif B.dim() == 3:
        deltaB_u = torch.einsum("bdl,bnl->bdln", du, B)
    else:
        deltaB_u = torch.einsum("bdl,bdnl->bdln", du, B)

    if initial_state is None:
        x = u.new_zeros((bsz, d, n))
    else:
        x = initial_state.float().clone()
    ys = []
    for t in range(length):
        x = deltaA[:, :, t] * x + deltaB_u[:, :, t]
        if C.dim() == 2:
            y = torch.einsum("bdn,dn->bd", x, C)
        elif C.dim() == 3:
            y = torch.einsum("bdn,bn->bd", x, C[:, :, t])
        else:
            y = torch.einsum("bdn,bdn->bd", x, C[:, :, :, t])
        ys.append(y)
    out = torch.stack(ys, dim=2)
    if D is not None:
        out = out + u * D.float()[:, None]
    if z is not None:
        z = z.float()
        out = out * (z * torch.sigmoid(z))
    out = out.to(out_dtype)
    return (out, x) if return_last_state else out


def selective_state_update_ref(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False
):
    """One decoding step of the selective scan in torch; updates ``state`` in place.

    ``state`` (b, d, n) float32; ``x``, ``dt``, ``z`` (b, d); ``A`` (d, n);
    ``B``, ``C`` (b, n) or (b, g, n); ``D``, ``dt_bias`` (d,).
    Returns ``out`` (b, d) in x's dtype.
    """
    import torch

    out_dtype = x.dtype
    d = x.shape[1]
    x, dt, A, B, C = (t.float() for t in (x, dt, A, B, C))
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = _softplus(dt)
    B = _per_channel(B, d) if B.dim() == 3 else B[:, None, :]  # (b, d|1, n)
    C = _per_channel(C, d) if C.dim() == 3 else C[:, None, :]
    dA = torch.exp(dt[:, :, None] * A)  # (b, d, n)
    dBx = (dt * x)[:, :, None] * B
    state.copy_(state * dA + dBx)
    out = (state * C).sum(-1)
    if D is not None:
        out = out + x * D.float()
    if z is not None:
        z = z.float()
        out = out * (z * torch.sigmoid(z))
    return out.to(out_dtype)


def selective_scan_ref_unbind(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                              delta_softplus=False):
    """:func:`selective_scan_ref` for shared B, C (b, n, l), written for autograd: the
    per-step slices come from ``unbind`` (whose backward is one ``stack``) instead of
    indexing (whose backward writes a full-size zero tensor per step, O(l²) memory
    traffic: ~75 s for one backward at b1 d512 l1024 on the CPU). Same formulas,
    float32 arithmetic, result in u's dtype."""
    import torch

    out_dtype = u.dtype
    u, delta, A, B, C = (t.float() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = _softplus(delta)
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A)).unbind(2)
    deltaB_u = torch.einsum("bdl,bnl->bdln", delta * u, B).unbind(2)
    Cs = C.unbind(2)  # (b, n) each
    x = u.new_zeros((u.shape[0], u.shape[1], A.shape[1]))
    ys = []
    for dA, dBu, c in zip(deltaA, deltaB_u, Cs):
        x = dA * x + dBu
        ys.append(torch.einsum("bdn,bn->bd", x, c))
    out = torch.stack(ys, dim=2)
    if D is not None:
        out = out + u * D.float()[:, None]
    if z is not None:
        z = z.float()
        out = out * (z * torch.sigmoid(z))
    return out.to(out_dtype)


def mamba_layer_ref(layer, hidden_states):
    """The forward of a :class:`mamba_attention.nn.Mamba` layer (or any module with
    mamba_ssm's Mamba parameters) built from plain PyTorch: torch's ``F.conv1d`` for
    the causal depthwise conv and the reference scan loop
    (:func:`selective_scan_ref_unbind`), with autograd through everything. The
    "same layer from the PyTorch references" peer of the Mamba-layer benchmark rows;
    hidden_states (b, l, d_model)."""
    import torch
    import torch.nn.functional as F

    m = layer
    seqlen = hidden_states.shape[1]
    d_inner, d_state = m.A_log.shape
    dt_rank = m.dt_proj.weight.shape[1]
    xz = F.linear(hidden_states, m.in_proj.weight, m.in_proj.bias).transpose(1, 2)
    x, z = xz.chunk(2, dim=1)  # (b, d_inner, l)
    w = m.conv1d.weight.shape[-1]
    x = F.conv1d(x, m.conv1d.weight, m.conv1d.bias, padding=w - 1, groups=d_inner)[..., :seqlen]
    x = F.silu(x)
    x_dbl = F.linear(x.transpose(1, 2), m.x_proj.weight)  # (b, l, r + 2n)
    dt, B, C = torch.split(x_dbl, [dt_rank, d_state, d_state], dim=-1)
    delta = F.linear(dt, m.dt_proj.weight).transpose(1, 2)  # (b, d_inner, l)
    y = selective_scan_ref_unbind(
        x, delta, -torch.exp(m.A_log.float()), B.transpose(1, 2), C.transpose(1, 2),
        m.D.float(), z=z, delta_bias=m.dt_proj.bias.float(), delta_softplus=True,
    )
    return F.linear(y.transpose(1, 2), m.out_proj.weight, m.out_proj.bias)


__all__ += ["selective_scan_ref_unbind", "mamba_layer_ref"]
