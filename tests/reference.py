"""Float64 NumPy references for SPEC §1, written directly from its formulas.

Every function accepts NumPy arrays (any float dtype, ml_dtypes' bfloat16
included) or torch tensors; values are upcast exactly to float64 first, so a
reference computed from low-precision inputs measures the kernel, not the
rounding of its inputs.
"""

from __future__ import annotations

import itertools

import numpy as np

TOL = {"float32": 1e-5, "float64": 1e-5, "float16": 3e-3, "bfloat16": 1e-2}


def to_f64(x):
    """Exact float64 NumPy copy of a NumPy array or torch tensor (None passes)."""
    if x is None:
        return None
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().double().numpy()
    return np.array(x, dtype=np.float64)


def rel_err(ours, ref) -> float:
    """‖ours − ref‖ / ‖ref‖ in float64; inf if ours holds a NaN or the shapes differ."""
    ours, ref = to_f64(ours), to_f64(ref)
    if ours.shape != ref.shape or np.isnan(ours).any():
        return float("inf")
    den = np.linalg.norm(ref)
    num = np.linalg.norm(ours - ref)
    return float(num / den) if den > 0 else float(num)


def softplus(x):
    """Δ if Δ > 20 else log1p(exp(Δ)) (mamba_ssm's threshold)."""
    return np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0))))


def silu(x):
    return x / (1.0 + np.exp(-x))


def _bc_per_step(X, b, d, l):
    """B or C as a function t -> array broadcastable to (b, d, n).

    (d, n) constant, (b, n, l) shared, (b, g, n, l) grouped: channel c uses
    group c // (d // g).
    """
    if X.ndim == 2:
        const = X[None]
        return lambda t: const
    if X.ndim == 3:
        Xt = np.ascontiguousarray(np.moveaxis(X, -1, 0))[:, :, None, :]  # (l, b, 1, n)
        return lambda t: Xt[t]
    if X.ndim == 4:
        g = X.shape[1]
        group = np.arange(d) // (d // g)
        Xt = np.ascontiguousarray(np.moveaxis(X, -1, 0)[:, :, group, :])  # (l, b, d, n)
        return lambda t: Xt[t]
    raise ValueError(f"B/C must have rank 2, 3 or 4, got {X.shape}")


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, return_last_state=False, initial_state=None):
    u, delta, A, B, C, D, z, delta_bias, initial_state = map(
        to_f64, (u, delta, A, B, C, D, z, delta_bias, initial_state))
    b, d, l = u.shape
    n = A.shape[1]
    dt = delta if delta_bias is None else delta + delta_bias[:, None]
    if delta_softplus:
        dt = softplus(dt)
    B_t, C_t = _bc_per_step(B, b, d, l), _bc_per_step(C, b, d, l)
    h = np.zeros((b, d, n)) if initial_state is None else initial_state.copy()
    y = np.empty((b, d, l))
    for t in range(l):
        dt_t = dt[:, :, t, None]
        h = np.exp(dt_t * A) * h + dt_t * B_t(t) * u[:, :, t, None]
        y[:, :, t] = np.sum(C_t(t) * h, axis=-1)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * silu(z)
    return (y, h) if return_last_state else y


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                               dt_softplus=False, state_batch_indices=None):
    """One decoding step; returns (out (b, d), new_state) and never mutates ``state``."""
    state, x, dt, A, B, C, D, z, dt_bias = map(to_f64, (state, x, dt, A, B, C, D, z, dt_bias))
    b, d = x.shape
    if state_batch_indices is None:
        idx = np.arange(b)
    else:
        idx = state_batch_indices
        idx = np.asarray(idx.cpu().numpy() if hasattr(idx, "cpu") else idx, dtype=np.int64)
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = softplus(dt)
    if B.ndim == 3:  # (b, g, n) -> (b, d, n)
        B = B[:, np.arange(d) // (d // B.shape[1])]
    else:
        B = B[:, None, :]
    if C.ndim == 3:
        C = C[:, np.arange(d) // (d // C.shape[1])]
    else:
        C = C[:, None, :]
    new_state = state.copy()
    out = np.zeros((b, d))
    for i in range(b):
        if idx[i] < 0:
            continue
        h = np.exp(dt[i, :, None] * A) * state[idx[i]] + dt[i, :, None] * B[i] * x[i, :, None]
        new_state[idx[i]] = h
        y = np.sum(C[i] * h, axis=-1)
        if D is not None:
            y = y + D * x[i]
        if z is not None:
            y = y * silu(z[i])
        out[i] = y
    return out, new_state


def scalar_scan_ref(u, dt, A, B, C, h0=0.0):
    """One channel with n = 1, for very long sequences: u, dt (already biased and
    softplus'd), B, C are (l,) float64, A and h0 scalars. Returns (Σ C·h, h_l) with
    h_t = exp(dt_t·A)·h_{t-1} + dt_t·B_t·u_t (D and z are left to the caller)."""
    dA, dBu = np.exp(dt * A).tolist(), (dt * B * u).tolist()
    h = np.fromiter(itertools.accumulate(zip(dA, dBu), lambda h, ab: ab[0] * h + ab[1],
                                         initial=float(h0)), dtype=np.float64, count=len(dA) + 1)
    return C * h[1:], float(h[-1])


# ------------------------------------------------------------- SPEC §2: conv1d

def _act(v, activation):
    return silu(v) if activation in ("silu", "swish") else v


def causal_conv1d_ref(x, weight, bias=None, initial_states=None, return_final_states=False,
                      activation=None):
    """out[c, t] = act(bias[c] + Σ_i weight[c, i]·xpad[c, t + i]), xpad = initial_states
    (or zeros) followed by x; final_states = the last w-1 entries of xpad."""
    x, weight, bias, initial_states = map(to_f64, (x, weight, bias, initial_states))
    b, d, l = x.shape
    w = weight.shape[1]
    init = np.zeros((b, d, w - 1)) if initial_states is None else initial_states
    xpad = np.concatenate([init, x], axis=-1)
    out = np.zeros((b, d, l)) if bias is None else np.broadcast_to(bias[None, :, None], (b, d, l)).copy()
    for i in range(w):
        out += weight[None, :, i, None] * xpad[:, :, i:i + l]
    out = _act(out, activation)
    return (out, xpad[:, :, l:]) if return_final_states else out


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation=None,
                             cache_seqlens=None):
    """Returns (out, new conv_state) in float64; inputs are not modified.

    Without cache_seqlens: context = conv_state's last w-1 entries followed by x;
    new state = (conv_state ++ x)[-state_len:]. With cache_seqlens (circular, the
    peer's semantics): context = conv_state[(s - (w-1) + j) mod state_len],
    j < w-1, followed by x; then x[t] is written at (s + t) mod state_len, in order."""
    x, state, weight, bias = map(to_f64, (x, conv_state, weight, bias))
    squeeze = x.ndim == 2
    if squeeze:
        x = x[..., None]
    b, d, l = x.shape
    w = weight.shape[1]
    L = state.shape[-1]
    if cache_seqlens is None:
        full = np.concatenate([state, x], axis=-1)
        ctx = full[:, :, L - (w - 1):]
        new_state = full[:, :, full.shape[-1] - L:].copy()
    else:
        s = to_f64(cache_seqlens).astype(np.int64)
        idx = np.mod(s[:, None] + np.arange(-(w - 1), 0)[None, :], L)  # (b, w-1)
        idx = np.broadcast_to(idx[:, None, :], (b, d, w - 1))
        ctx = np.concatenate([np.take_along_axis(state, idx, axis=-1), x], axis=-1)
        new_state = state.copy()
        for t in range(l):
            new_state[np.arange(b), :, np.mod(s + t, L)] = x[:, :, t]
    out = np.zeros((b, d, l)) if bias is None else np.broadcast_to(bias[None, :, None], (b, d, l)).copy()
    for i in range(w):
        out += weight[None, :, i, None] * ctx[:, :, i:i + l]
    out = _act(out, activation)
    return (out[..., 0] if squeeze else out), new_state


# ---------------------------------------------------------------- RMSNorm, SwiGLU


def rms_norm_ref(x, weight, bias=None, residual=None, eps=1e-6):
    """float64 RMSNorm over the last axis with an optional residual added first:
    s = x + residual; y = s / sqrt(mean(s²) + eps) · weight (+ bias). Returns (y, s)."""
    s = to_f64(x) + (0.0 if residual is None else to_f64(residual))
    y = s / np.sqrt(np.mean(s * s, axis=-1, keepdims=True) + eps) * to_f64(weight)
    if bias is not None:
        y = y + to_f64(bias)
    return y, s


def swiglu_ref(gate, up):
    """float64 silu(gate) · up."""
    g = to_f64(gate)
    return g / (1.0 + np.exp(-g)) * to_f64(up)
# ------------------------------------------------------- SPEC §5: the Mamba layer

def mamba_layer_ref(params, hidden_states, d_conv=None):
    """The Mamba (S6) mixer layer in plain PyTorch, from the published equations
    (Gu & Dao 2023, Algorithm 2 with the mamba_simple block structure), in the
    dtype of ``hidden_states`` (use float64 for a reference) and differentiable
    through torch autograd.

    ``params`` maps mamba_ssm's parameter names to tensors (a state_dict):
    in_proj.weight (2d, d_model) [+ in_proj.bias], conv1d.weight (d, 1, w)
    [+ conv1d.bias], x_proj.weight (r + 2n, d), dt_proj.weight (d, r),
    dt_proj.bias (d,), A_log (d, n), D (d,), out_proj.weight (d_model, d)
    [+ out_proj.bias]. Every parameter is cast to hidden_states' dtype.

        x, z  = split(u W_inᵀ + b_in)                       (b, l, d) each
        x̃_t   = silu(b_conv + Σ_i w[:, i]·x_{t-(w-1)+i})   (zeros before t = 0)
        r|B|C = x̃ W_xᵀ;  Δ = softplus(r W_dtᵀ + b_dt);  A = −exp(A_log)
        h_t   = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t x̃_t;   y_t = C_t·h_t + D ⊙ x̃_t
        out   = (y ⊙ silu(z)) W_outᵀ + b_out
    """
    import torch

    u = hidden_states
    p = {k: (v.to(device=u.device, dtype=u.dtype) if v is not None else None)
         for k, v in params.items()}
    get = p.get
    bsz, l, _ = u.shape
    A = -torch.exp(p["A_log"])
    d, n = A.shape
    conv_w = p["conv1d.weight"][:, 0, :]  # (d, w)
    w = conv_w.shape[1] if d_conv is None else d_conv
    r = p["x_proj.weight"].shape[0] - 2 * n

    xz = u @ p["in_proj.weight"].T
    if get("in_proj.bias") is not None:
        xz = xz + p["in_proj.bias"]
    x, z = xz[..., :d], xz[..., d:]
    xpad = torch.cat([x.new_zeros(bsz, w - 1, d), x], dim=1)
    xc = sum(conv_w[:, i] * xpad[:, i:i + l] for i in range(w))
    if get("conv1d.bias") is not None:
        xc = xc + p["conv1d.bias"]
    xc = xc * torch.sigmoid(xc)
    dbl = xc @ p["x_proj.weight"].T
    dt, B, C = dbl[..., :r], dbl[..., r:r + n], dbl[..., r + n:]
    dt = dt @ p["dt_proj.weight"].T + p["dt_proj.bias"]
    delta = torch.where(dt > 20.0, dt, torch.log1p(torch.exp(torch.clamp(dt, max=20.0))))
    h = u.new_zeros(bsz, d, n)
    ys = []
    for t in range(l):
        dl = delta[:, t, :, None]  # (b, d, 1)
        h = torch.exp(dl * A) * h + dl * B[:, t, None, :] * xc[:, t, :, None]
        ys.append((h * C[:, t, None, :]).sum(-1) + p["D"] * xc[:, t])
    y = torch.stack(ys, dim=1) * (z * torch.sigmoid(z))
    out = y @ p["out_proj.weight"].T
    if get("out_proj.bias") is not None:
        out = out + p["out_proj.bias"]
    return out


def mamba_ref_state_dict(d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto",
                         conv_bias=True, bias=False, seed=0, dtype=None):
    """A random state_dict with mamba_ssm's Mamba names and shapes, built here without
    the module under test (plain torch tensors; values of a trained-looking scale:
    A_log random, D random, softplus(dt_proj.bias) in about [1e-3, 1e-1])."""
    import math

    import torch

    g = torch.Generator().manual_seed(seed)
    d = int(expand * d_model)
    r = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    sd = {"A_log": rnd(d, d_state, scale=0.5), "D": rnd(d),
          "in_proj.weight": rnd(2 * d, d_model, scale=d_model ** -0.5)}
    if bias:
        sd["in_proj.bias"] = rnd(2 * d, scale=0.1)
    sd["conv1d.weight"] = rnd(d, 1, d_conv, scale=d_conv ** -0.5)
    if conv_bias:
        sd["conv1d.bias"] = rnd(d, scale=0.1)
    sd["x_proj.weight"] = rnd(r + 2 * d_state, d, scale=d ** -0.5)
    sd["dt_proj.weight"] = rnd(d, r, scale=r ** -0.5)
    dt = torch.exp(torch.rand(d, generator=g, dtype=torch.float64)
                   * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    sd["dt_proj.bias"] = dt + torch.log(-torch.expm1(-dt))
    sd["out_proj.weight"] = rnd(d_model, d, scale=d ** -0.5)
    if bias:
        sd["out_proj.bias"] = rnd(d_model, scale=0.1)
    if dtype is not None:
        sd = {k: v.to(torch.float32 if k in ("A_log", "D") else dtype) for k, v in sd.items()}
    return sd


# ------------------------------------------------------- SPEC §4: hidden attention

def _bc_full(X, b, d, l):
    """B or C as a float64 (b, d, l, n) array from any of its three layouts."""
    if X.ndim == 2:  # (d, n)
        return np.broadcast_to(X[None, :, None, :], (b, d, l, X.shape[1]))
    if X.ndim == 3:  # (b, n, l)
        return np.broadcast_to(np.moveaxis(X, 1, 2)[:, None], (b, d, l, X.shape[1]))
    g = X.shape[1]
    return np.moveaxis(X, 2, 3)[:, np.arange(d) // (d // g)]  # (b, g, n, l) -> (b, d, l, n)


def hidden_attention_ref(delta, A, B, C, delta_bias=None, delta_softplus=False, reduce=None):
    """α[c, i, j] = Σ_k C_i[k]·exp(Σ_{t=j+1..i} Δ_t·A[c,k])·Δ_j·B_j[k] for j ≤ i, else 0,
    in float64 (the decay as exp of a difference of float64 cumulative sums, masked
    before the exp); (b, d, l, l), or the channel mean (b, l, l) with reduce="mean"."""
    delta, A, B, C, delta_bias = map(to_f64, (delta, A, B, C, delta_bias))
    b, d, l = delta.shape
    dt = delta if delta_bias is None else delta + delta_bias[:, None]
    if delta_softplus:
        dt = softplus(dt)
    Bf, Cf = _bc_full(B, b, d, l), _bc_full(C, b, d, l)
    lower = np.tril(np.ones((l, l), dtype=bool))
    out = np.zeros((b, d, l, l))
    for c in range(d):
        S = np.cumsum(dt[:, c, :, None] * A[c], axis=1)  # (b, l, n): Σ_{t≤i} Δ_t A
        diff = S[:, :, None, :] - S[:, None, :, :]  # (b, i, j, n)
        decay = np.exp(np.where(lower[None, :, :, None], diff, -np.inf))
        DB = dt[:, c, :, None] * Bf[:, c]  # (b, j, n)
        out[:, c] = np.einsum("bin,bijn,bjn->bij", Cf[:, c], decay, DB)
    return out.mean(axis=1) if reduce == "mean" else out
# ----------------------------------------------------------- SPEC §3: attention

TOL_ATTN = {"float32": 1e-4, "float64": 1e-4, "float16": 3e-3, "bfloat16": 1e-2}


def attention_mask(sq, sk, causal=False, window_size=(-1, -1)):
    """(sq, sk) bool: query i may attend key j iff i + sk - sq - left <= j <= i + sk - sq + right
    and 0 <= j < sk; -1 is unbounded on that side; causal forces right = 0."""
    left, right = window_size
    if causal:
        right = 0
    i = np.arange(sq)[:, None]
    j = np.arange(sk)[None, :]
    ok = np.ones((sq, sk), dtype=bool)
    if left >= 0:
        ok &= j >= i + sk - sq - left
    if right >= 0:
        ok &= j <= i + sk - sq + right
    return ok


def attention_ref(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1),
                  softcap=0.0, alibi_slopes=None):
    """Float64 attention from SPEC §3. q (b, sq, hq, hd), k/v (b, sk, hk, hd); query head h
    reads kv head h // (hq // hk). alibi_slopes: (hq,) or (b, hq).

    Returns (out (b, sq, hq, hd) float64, lse (b, hq, sq) float64). A query that sees no key
    outputs 0 and has lse = -inf (log of an empty sum; flash-attn's CUDA kernel stores +inf
    there instead, so that its backward's exp(s - lse) is 0 -- we follow the mathematics,
    which also makes exp(lse) = 0 the right weight when merging partial attentions)."""
    q, k, v, alibi = map(to_f64, (q, k, v, alibi_slopes))
    b, sq, hq, hd = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = 1.0 / np.sqrt(hd) if softmax_scale is None else float(softmax_scale)
    heads = np.arange(hq) // (hq // hk)
    kk, vv = k[:, :, heads], v[:, :, heads]
    s = np.einsum("bihd,bjhd->bhij", q, kk) * scale
    if softcap > 0:
        s = softcap * np.tanh(s / softcap)
    if alibi is not None:
        slopes = np.broadcast_to(alibi, (b, hq))
        dist = np.abs(np.arange(sq)[:, None] + sk - sq - np.arange(sk)[None, :])
        s = s - slopes[:, :, None, None] * dist[None, None]
    ok = attention_mask(sq, sk, causal, window_size)
    s = np.where(ok[None, None], s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    empty = ~np.isfinite(m)
    m = np.where(empty, 0.0, m)
    p = np.exp(s - m)
    den = p.sum(axis=-1, keepdims=True)
    safe = np.where(empty, 1.0, den)
    out = np.einsum("bhij,bjhd->bihd", p / safe, vv)
    with np.errstate(divide="ignore"):
        lse = np.where(empty, -np.inf, m + np.log(safe))[..., 0]
    return out, lse
