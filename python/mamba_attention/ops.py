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

__all__ = ["selective_scan_fn", "selective_state_update", "rms_norm_fn", "swiglu"]


def _needs_autograd(first, tensors):
    """Whether torch tensors must go through the differentiable custom ops of
    ``_autograd``: gradients wanted, or a torch.compile trace. Everything else
    calls the kernels directly, the lowest-latency path. torch is never imported
    here: if the caller has not imported it, no argument can be a torch.Tensor."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not isinstance(first, torch.Tensor):
        return False
    return torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in tensors)
    )


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
    if _needs_autograd(u, (u, delta, A, B, C, D, z, delta_bias, initial_state)):
        from ._autograd import selective_scan

        return selective_scan(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
            initial_state,
        )
    return _core.selective_scan_fwd(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state
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
        state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices
    )


def causal_conv1d_fn(
    x,
    weight,
    bias=None,
    initial_states=None,
    return_final_states=False,
    activation=None,
):
    """Causal depthwise conv1d (SPEC §2), a drop-in for ``causal_conv1d``'s
    ``causal_conv1d_fn`` (CPU and CUDA).

    Shapes: ``x`` (b, d, l), any strides (channel-last views such as
    ``torch.randn(b, l, d).transpose(1, 2)`` are read in place); ``weight``
    (d, w) with 2 ≤ w ≤ 8; ``bias`` (d,); ``initial_states`` (b, d, w - 1).
    ``weight``, ``bias`` and ``initial_states`` may have another float dtype than x.

    With xpad = initial_states (or zeros) followed by x, along time::

        out[:, c, t] = act(bias[c] + Σ_i weight[c, i]·xpad[:, c, t + i])

    where act is the identity (``activation=None``) or SiLU (``"silu"`` /
    ``"swish"``); any other value raises ValueError. Arithmetic is float32.

    Returns ``out`` (b, d, l) in x's dtype, and with ``return_final_states``
    also ``final_states`` (b, d, w - 1) = the last w - 1 entries of xpad, in
    x's dtype (the ``initial_states`` of the next chunk).

    Differentiable: with torch tensors that require grad (and grad enabled),
    the call goes through a ``torch.autograd.Function`` whose backward is
    ``_core.causal_conv1d_bwd`` (gradients for x, weight, bias and
    initial_states; final_states' gradient flows back too).
    """
    if _conv1d_needs_grad(x, weight, bias, initial_states):
        return _conv1d_autograd().apply(
            x, weight, bias, initial_states, return_final_states, activation
        )
    return _core.causal_conv1d_fwd(
        x, weight, bias, initial_states, return_final_states, activation
    )


def _conv1d_needs_grad(*tensors):
    if any(getattr(t, "requires_grad", False) for t in tensors):
        import torch

        return torch.is_grad_enabled()
    return False


_CONV1D_FN = []


def _conv1d_autograd():
    """The autograd Function of causal_conv1d_fn, built on first use (torch is
    imported only then)."""
    if not _CONV1D_FN:
        import torch

        class CausalConv1dFn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, weight, bias, initial_states, return_final_states, activation):
                ctx.save_for_backward(x, weight, bias, initial_states)
                ctx.activation = activation
                return _core.causal_conv1d_fwd(
                    x, weight, bias, initial_states, return_final_states, activation
                )

            @staticmethod
            def backward(ctx, dout, dfinal_states=None):
                x, weight, bias, init = ctx.saved_tensors
                dx, dw, db, di = _core.causal_conv1d_bwd(
                    x, weight, bias, init, dout, dfinal_states, ctx.activation
                )
                dw = dw.to(weight.dtype)
                db = db.to(bias.dtype) if db is not None else None
                return dx, dw, db, di, None, None

        _CONV1D_FN.append(CausalConv1dFn)
    return _CONV1D_FN[0]


def causal_conv1d_update(
    x,
    conv_state,
    weight,
    bias=None,
    activation=None,
    cache_seqlens=None,
):
    """Decoding step(s) of the causal conv1d, updating ``conv_state`` in place
    (a drop-in for ``causal_conv1d``'s ``causal_conv1d_update``; CPU and CUDA).

    Shapes: ``x`` (b, d) for one token or (b, d, l_new); ``conv_state``
    (b, d, state_len) with state_len ≥ w - 1, any float dtype; ``weight``
    (d, w), 2 ≤ w ≤ 8; ``bias`` (d,); ``cache_seqlens`` (b,) integers (int32).

    Without ``cache_seqlens`` the state is a shift register: the context of
    the new tokens is the state's last w - 1 entries, and afterwards
    ``conv_state = concat(conv_state, x)[..., -state_len:]``.

    With ``cache_seqlens`` the state is a circular buffer (the peer's
    semantics): for batch entry i with s = cache_seqlens[i], the context is
    ``conv_state[i, :, (s - (w-1) + j) mod state_len]`` for j = 0 … w-2
    (oldest first), then x; afterwards x[..., t] is written at position
    (s + t) mod state_len, in order of t (with l_new > state_len the last
    tokens win). ``mod`` is the non-negative remainder. ``cache_seqlens`` is
    not advanced: the caller adds l_new.

    Returns ``out`` with x's shape and dtype: act(bias + Σ_i weight[:, i] ·
    context[..., t + i]).
    """
    return _core.causal_conv1d_update(x, conv_state, weight, bias, activation, cache_seqlens)


__all__ += ["causal_conv1d_fn", "causal_conv1d_update"]



def rms_norm_fn(x, weight, bias=None, residual=None, prenorm=False, residual_in_fp32=False,
                eps=1e-6):
    """RMSNorm with a fused residual add, a drop-in for mamba_ssm's ``rms_norm_fn``.

    ``x`` (..., h); ``weight``, ``bias`` (h,); ``residual`` of x's shape. With s = x +
    residual (float32), returns ``y = s / sqrt(mean(s²) + eps) · weight (+ bias)``
    in x's dtype, and with ``prenorm`` also the new residual stream s, in
    residual's dtype (float32 with ``residual_in_fp32`` when no residual is
    given, else x's). Differentiable in x, weight, bias and residual.
    """
    if _needs_autograd(x, (x, weight, bias, residual)):
        from ._autograd import rms_norm

        return rms_norm(x, weight, bias, residual, prenorm, residual_in_fp32, eps)
    out, res, _ = _core.rms_norm_fwd(x, weight, bias, residual, eps, prenorm, residual_in_fp32)
    return (out, res) if prenorm else out


def swiglu(gate, up):
    """``silu(gate) · up`` (SwiGLU's gating), fused; flash-attn's ``swiglu``.

    ``gate`` and ``up`` have the same shape (..., cols); the result has gate's
    shape and dtype. Differentiable in both.
    """
    if _needs_autograd(gate, (gate, up)):
        from ._autograd import swiglu_op

        return swiglu_op(gate, up)
    return _core.swiglu_fwd(gate, up)


def hidden_attention(delta, A, B, C, delta_bias=None, delta_softplus=False, reduce=None):
    """The hidden attention matrices of a selective scan (SPEC §4; Ali, Zimerman
    and Wolf 2024, "The Hidden Attention of Mamba Models").

    Shapes as in :func:`selective_scan_fn`: ``delta`` (b, d, l); ``A`` (d, n);
    ``B``, ``C``: (d, n) constant, (b, n, l) shared or (b, g, n, l) grouped;
    ``delta_bias`` (d,). With Δ = delta + delta_bias (softplus'd, threshold 20,
    if ``delta_softplus``)::

        α[c, i, j] = Σ_k C_i[k] · exp(Σ_{t=j+1..i} Δ_t·A[c,k]) · Δ_j·B_j[k]   for j ≤ i, else 0

    so that Σ_j α[c, i, j]·u[c, j] is the selective scan's output at i without
    D and z. Returns α (b, d, l, l) float32, or with ``reduce="mean"`` its mean
    over the channels (b, l, l) float32, computed without materialising the
    (b, d, l, l) tensor. Any other ``reduce`` raises ValueError. Not
    differentiable. O(b·d·l²·n) work; the result has the kind and device of
    ``delta``.
    """
    return _core.hidden_attention(delta, A, B, C, delta_bias, delta_softplus, reduce)


__all__ += ["hidden_attention"]
# ------------------------------------------------------------ SPEC §3: attention


def _check_dropout(dropout_p):
    try:
        if isinstance(dropout_p, (bool, str, bytes)) or type(dropout_p).__name__ == "bool_":
            raise TypeError
        dropout_p = float(dropout_p)  # Python and NumPy numbers
    except (TypeError, ValueError):
        raise TypeError(f"dropout_p: expected a float, got {type(dropout_p).__name__} "
                        f"{dropout_p!r}") from None
    if dropout_p != 0.0:
        raise ValueError(
            f"dropout_p: only 0.0 is supported (attention dropout is not implemented), got {dropout_p}"
        )


def _on_cuda(q):
    return getattr(getattr(q, "device", None), "type", None) == "cuda"


def _torch_attention(q, k, v, softmax_scale, causal, left, right, softcap, alibi_slopes):
    """SPEC §3 in differentiable torch ops (float32, O(sq·sk) memory): the CUDA
    training path for float32 and head dims the CUDA kernels lack (options as
    ``_autograd.attention_options`` parses them). Returns (out, lse)."""
    import math

    import torch

    b, sq, hq, hd = q.shape
    sk, hk = k.shape[1], k.shape[2]
    if causal:
        right = 0
    # Bounds past every key are unbounded (and would overflow int64 below).
    left = -1 if left >= sk else left
    right = -1 if right >= sq else right
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(hd)
    kf = k.float().repeat_interleave(hq // hk, 2)
    vf = v.float().repeat_interleave(hq // hk, 2)
    # A masked key contributes nothing, whatever its bits: P = 0 times a NaN V
    # (or a masked dS times a NaN K in the backward) would be NaN. So the
    # products use K and V with their non-finite entries zeroed, and those
    # entries come back only where visible: a key with a non-finite K gives
    # visible scores of NaN; a non-finite V[j, d] adds itself to out[i, d] of
    # the rows that see j (the IEEE sum of p·v for p > 0).
    kbad, vbad = ~torch.isfinite(kf), ~torch.isfinite(vf)
    kf, vclean = kf.masked_fill(kbad, 0.0), vf.masked_fill(vbad, 0.0)
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), kf) * scale
    s = s.masked_fill(kbad.any(-1).transpose(1, 2)[:, :, None, :], float("nan"))
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=q.device)[None, :]
    if alibi_slopes is not None:
        sl = alibi_slopes.float()
        sl = sl.view(1, hq, 1, 1) if sl.dim() == 1 else sl.view(b, hq, 1, 1)
        s = s - sl * (i - j).abs()
    vis = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if left >= 0:
        vis &= j >= i - left
    if right >= 0:
        vis &= j <= i + right
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, -1)  # -inf for rows with no visible key
    # Rows with no visible key output 0; softmax over a finite stand-in keeps their
    # gradients finite (they are multiplied by 0).
    any_key = vis.any(-1)[:, None]
    # Masked probabilities are exactly 0 even in a row that a NaN score poisons
    # (its softmax is NaN throughout), so the row's dV does not reach masked keys.
    p = torch.softmax(s.masked_fill(~any_key, 0.0), -1).masked_fill(~vis, 0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", p, vclean)
    # Per (row, column): how many visible keys have a non-finite V, and the sum
    # of their signs (±1 for ±inf, 0 for NaN): all +inf → +inf, all −inf →
    # −inf, else NaN. Counts are exact in float32 below 2²⁴ keys.
    sign = torch.where(vf.isnan(), 0.0, torch.sign(vf)) * vbad
    cnt = torch.einsum("qk,bkhd->bqhd", vis.float(), torch.cat((vbad.float(), sign), -1))
    n, tot = cnt[..., :hd], cnt[..., hd:]
    inf = float("inf")
    poison = torch.where(tot == n, inf, torch.where(tot == -n, -inf, float("nan")))
    out = torch.where(n > 0, poison, out).to(q.dtype)
    return out, lse


def _cuda_attention(op, q, k, v, opts, alibi_slopes, varlen=None):
    """Forward through the CUDA flash-attention kernel (torch float16/bfloat16 CUDA
    tensors), ``opts`` as ``_autograd.attention_options`` returns them. With
    gradients required (or under torch.compile), float16/bfloat16 with a head dim
    that is a multiple of 8 up to 256 go through the custom ops of ``_autograd``
    (our CUDA forward and backward kernels); other dtypes and head dims run the
    differentiable torch formula (:func:`_torch_attention`)."""
    import math

    import torch

    from . import _autograd

    softmax_scale, causal, left, right, softcap, deterministic = opts[:6]
    if _needs_autograd(q, (q, k, v)):
        if _autograd.cuda_attention_supported(q, k, v):
            if varlen is None:
                return _autograd.flash_attn(q, k, v, softmax_scale, causal, left, right,
                                            softcap, alibi_slopes, deterministic)
            cu_q, cu_k = varlen
            return _autograd.flash_attn_varlen(q, k, v, cu_q, cu_k, opts[6], opts[7],
                                               softmax_scale, causal, left, right, softcap,
                                               alibi_slopes, deterministic)
        if varlen is not None:
            raise RuntimeError(
                f"{op}: q is on {q.device} ({q.dtype}, head dim {q.shape[-1]}) and gradients "
                "are required: the CUDA attention backward takes float16/bfloat16 with a "
                "head dim that is a multiple of 8 up to 256"
            )
        return _torch_attention(q, k, v, softmax_scale, causal, left, right, softcap,
                                alibi_slopes)
    if causal:
        right = 0
    hd = q.shape[-1]
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(hd)
    if varlen is None:
        out = q.new_empty(q.shape)
        b, sq, hq, _ = q.shape
        lse = q.new_empty((b, hq, sq), dtype=torch.float32)
        _core._flash_attn_fwd_cuda(q, k, v, out, lse, scale, left, right, float(softcap),
                                   alibi_slopes)
    else:
        # The kernel writes the rows of the sequences only: the others (padding)
        # get out 0 and lse -inf, as on the CPU.
        cu_q, cu_k = varlen
        out = q.new_zeros(q.shape)
        lse = q.new_full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32)
        _core._flash_attn_fwd_cuda(q, k, v, out, lse, scale, left, right, float(softcap),
                                   alibi_slopes, cu_q, cu_k, int(opts[6]), int(opts[7]))
    return out, lse


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """Attention (SPEC §3), a drop-in for ``flash_attn.flash_attn_func``. CPU: forward
    and backward, every dtype. CUDA: tensor-core forward and backward kernels for
    float16/bfloat16 (head dims up to 256, a multiple of 8); for float32 (or other
    head dims) with gradients on CUDA, a differentiable torch implementation of the
    same formula runs instead (O(sq·sk) memory).

    Shapes: ``q`` (b, sq, hq, hd), ``k``/``v`` (b, sk, hk, hd) with hq % hk == 0
    (GQA/MQA: query head h reads kv head h // (hq // hk)); any hd; any strides (a
    slice of a packed qkv tensor is read in place). dtypes float32 (extension),
    float16, bfloat16 (float64 is accepted and computed in float32).

    With scale = softmax_scale or 1/sqrt(hd), s_ij = scale·q_i·k_j; softcap > 0:
    s ← softcap·tanh(s/softcap); ALiBi (``alibi_slopes`` (hq,) or (b, hq)):
    s ← s − slope·|i + sk − sq − j|. Query i sees key j iff
    i + sk − sq − left ≤ j ≤ i + sk − sq + right (``window_size=(left, right)``,
    −1 unbounded, as is any bound past the sequence, 2**63 − 1 included; ``causal``
    forces right = 0, bottom-right aligned). A query that sees no key outputs 0 (and
    its lse is −inf; flash-attn's kernel writes +inf there). A key a query cannot see
    contributes nothing to its output, lse or gradients, whatever its value (NaN/inf
    included). Work is proportional to the visible keys: a window of W costs O(s·W).

    ``dropout_p`` must be 0.0 (ValueError otherwise). ``deterministic``: the CUDA
    backward then computes dQ without atomics (bit-identical run to run, a little
    slower); the CPU kernels are always deterministic. Returns ``out`` (q's shape and
    dtype), or with ``return_attn_probs`` the tuple (out, softmax_lse (b, hq, sq)
    float32, None): flash-attn's third value (the dropout mask / probabilities,
    only meaningful in its tests) is not materialised.

    Differentiable in q, k, v (torch tensors that require grad, and
    ``torch.compile(fullgraph=True)``) through ``torch.library`` custom ops.
    """
    _check_dropout(dropout_p)
    if _on_cuda(q) or _needs_autograd(q, (q, k, v)):
        from . import _autograd

        # Checked in Rust first, so that every path raises the same errors.
        opts = _autograd.attention_options(q, k, v, softmax_scale, causal, window_size, softcap,
                                           alibi_slopes, deterministic, return_attn_probs)
        if _on_cuda(q):
            out, lse = _cuda_attention("flash_attn_func", q, k, v, opts, alibi_slopes)
        else:
            out, lse = _autograd.flash_attn(q, k, v, *opts[:5], alibi_slopes)
    else:
        out, lse = _core.attention_fwd(
            q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes,
            deterministic=deterministic, return_attn_probs=return_attn_probs,
        )
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """Variable-length attention, a drop-in for ``flash_attn.flash_attn_varlen_func``.

    ``q`` (total_q, hq, hd) and ``k``/``v`` (total_k, hk, hd) pack the sequences
    one after another; sequence i is rows ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` of q
    and ``cu_seqlens_k[i]:cu_seqlens_k[i+1]`` of k/v (int32 (b + 1,) offsets,
    non-decreasing). Each sequence is attended as :func:`flash_attn_func` would
    (its own bottom-right causal alignment; ``alibi_slopes`` (hq,) or (b, hq)).
    A sequence longer than ``max_seqlen_q`` / ``max_seqlen_k`` raises ValueError.
    Rows of q after the last sequence get 0.

    Returns ``out`` (total_q, hq, hd), or with ``return_attn_probs``
    (out, softmax_lse (hq, total_q) float32, None). Differentiable in q, k, v.
    """
    _check_dropout(dropout_p)
    if _on_cuda(q) or _needs_autograd(q, (q, k, v)):
        from . import _autograd

        # Checked in Rust first, so that every path raises the same errors.
        opts = _autograd.attention_options(
            q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
            return_attn_probs, varlen=(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
        )
        if _on_cuda(q):
            out, lse = _cuda_attention("flash_attn_varlen_func", q, k, v, opts, alibi_slopes,
                                       varlen=(cu_seqlens_q, cu_seqlens_k))
        else:
            out, lse = _autograd.flash_attn_varlen(
                q, k, v, cu_seqlens_q, cu_seqlens_k, opts[6], opts[7], *opts[:5], alibi_slopes,
            )
    else:
        out, lse = _core.attention_varlen_fwd(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            softmax_scale, causal, window_size, softcap, alibi_slopes,
            deterministic=deterministic, return_attn_probs=return_attn_probs,
        )
    return (out, lse, None) if return_attn_probs else out


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    cache_seqlens=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    return_softmax_lse=False,
):
    """Decoding attention over a KV cache, a drop-in for
    ``flash_attn.flash_attn_with_kvcache`` (without rotary, paged or
    batch-indexed caches).

    ``q`` (b, sq, hq, hd); ``k_cache``/``v_cache`` (b, s_cache, hk, hd); ``k``/``v``
    (b, s_new, hk, hd) or None; ``cache_seqlens`` an int or a (b,) int32 tensor:
    the number of valid cache entries of each batch entry (a tensor of any other
    shape, (1,) included, raises ValueError; so does a value past the cache).
    Cache rows past cache_seqlens + s_new are never read: whatever they hold
    (torch.empty's bits, NaN) cannot reach the output. If k/v are given they
    are written into the caches in place at rows cache_seqlens[i] ..
    cache_seqlens[i] + s_new (cache_seqlens itself is not advanced), and every
    batch entry attends over cache[i, :cache_seqlens[i] + s_new] with the usual
    mask (bottom-right aligned, so ``causal=True`` lets new query t see the cache
    and new keys up to t). Without cache_seqlens the whole cache is attended and
    k/v must be None. Not differentiable.

    Returns ``out`` (q's shape and dtype), or (out, softmax_lse (b, hq, sq) float32)
    with ``return_softmax_lse``.
    """
    out, lse = _core.attention_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, causal, window_size,
        softcap, alibi_slopes, return_softmax_lse,
    )
    return (out, lse) if return_softmax_lse else out


def sliding_window_attention(q, k, v, window):
    """Samba's sliding-window attention: each query attends to the ``window`` most
    recent keys including its own position, i.e.
    ``flash_attn_func(q, k, v, causal=True, window_size=(window - 1, 0))``."""
    import operator

    try:
        if isinstance(window, bool) or type(window).__name__ in ("bool", "bool_"):
            raise TypeError
        window = operator.index(window)  # Python / NumPy ints, 0-d integer tensors
    except TypeError:
        raise TypeError(f"window: expected an int ≥ 1, got {type(window).__name__} "
                        f"{window!r}") from None
    if not 1 <= window < 2**63:
        raise ValueError(f"window: expected an int in [1, 2**63), got {window}")
    return flash_attn_func(q, k, v, causal=True, window_size=(window - 1, 0))


__all__ += [
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "sliding_window_attention",
]


# ------------------------------------------------- fused causal conv1d + selective scan


def conv_selective_scan_fn(
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
    """The causal depthwise conv1d and the selective scan in one pass::

        conv_selective_scan_fn(x, conv_weight, conv_bias, delta, A, B, C, ...)
            == selective_scan_fn(causal_conv1d_fn(x, conv_weight, conv_bias,
                                                  activation=activation),
                                 delta, A, B, C, ...)

    with the conv's output u never written to memory: the scan forms it as it
    reads x (CPU: per tile of 64 steps in L1; CUDA: in the scan kernel's
    registers). u is rounded to x's dtype where the unfused pair stores it:
    on the CPU the result is the composition's, bit for bit; on CUDA the
    conv's SiLU is the scan kernel's fast one (ex2.approx and a fast divide,
    ~2 ulp), so the result equals the composition's to float32 rounding of u.
    CPU and CUDA; NumPy arrays and torch tensors.

    Shapes: ``x``, ``delta``, ``z``: (b, d, l) (x takes the scan's u place:
    same dtype as delta); ``conv_weight`` (d, w) with 2 ≤ w ≤ 8 (any float
    dtype); ``conv_bias`` (d,) or None; ``activation``: ``"silu"`` (the
    default, Mamba's) / ``"swish"`` or None (identity); the rest as
    :func:`selective_scan_fn` (``A`` (d, n); ``B``, ``C`` (d, n), (b, n, l) or
    (b, g, n, l); ``D``, ``delta_bias`` (d,); ``initial_state`` (b, d, n)).

    Not supported (use the two ops apart): the conv's ``initial_states`` /
    ``return_final_states`` (the conv starts from zeros; Mamba's decoding path
    keeps the unfused ops for its conv state).

    Returns ``out`` (b, d, l) in x's dtype, and with ``return_last_state``
    also the scan's ``last_state`` (b, d, n) float32.

    Differentiable (torch tensors that require grad, and
    ``torch.compile(fullgraph=True)``) in x, conv_weight, conv_bias, delta,
    A, B, C, D, z, delta_bias and initial_state, through the custom ops
    ``mamba_attention::conv_selective_scan_fwd`` / ``_bwd``. The backward
    recomputes u with the conv kernel (it is not saved), runs the scan's
    backward for du and the other gradients, then the conv's backward (SiLU'
    included) for dx, dconv_weight, dconv_bias.
    """
    if _needs_autograd(
        x, (x, conv_weight, conv_bias, delta, A, B, C, D, z, delta_bias, initial_state)
    ):
        from ._autograd import conv_selective_scan

        return conv_selective_scan(
            x, conv_weight, conv_bias, delta, A, B, C, D, z, delta_bias, delta_softplus,
            activation, return_last_state, initial_state,
        )
    return _core.conv_selective_scan_fwd(
        x,
        conv_weight,
        conv_bias,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        delta_softplus,
        activation,
        return_last_state,
        initial_state,
    )


__all__ += ["conv_selective_scan_fn"]
