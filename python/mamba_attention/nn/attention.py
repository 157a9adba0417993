"""Attention modules of the hybrids (SPEC §5): the documents' ``MambaAttention``
(a global and a local ``nn.MultiheadAttention``-compatible branch, summed) and
Samba's ``SlidingWindowAttention`` with rotary embeddings and a ring-buffer
decode cache. Both run on our attention kernels (``flash_attn_func``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._args import bool_arg, float_arg, int_arg, tensor_arg

__all__ = ["MambaAttention", "SlidingWindowAttention", "apply_rotary", "apply_rotary_qk",
           "rotary_inv_freq"]


def _flash_attn_func(*args, **kwargs):
    from ..ops import flash_attn_func

    return flash_attn_func(*args, **kwargs)


class _MHABranch(nn.Module):
    """The parameters of ``nn.MultiheadAttention(E, num_heads, bias=bias)`` with
    the same names, shapes and initialisation (packed ``in_proj_weight`` (3E, E),
    ``in_proj_bias``, ``out_proj``), so its state_dict loads with strict=True."""

    def __init__(self, embed_dim, num_heads, bias, device=None, dtype=None):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"num_heads: hidden_size = {embed_dim} must be divisible by num_heads, "
                f"got {num_heads}"
            )
        kw = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **kw))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **kw))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self._reset_parameters()

    def _reset_parameters(self):
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)

    def forward(self, x, causal, window, dropout):
        """x (N, L, E) -> (N, L, E). ``window``: None (all keys) or w (|i − j| ≤ w,
        0 ≤ i − j ≤ w when causal)."""
        n, l, e = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(n, l, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)  # strided views: the kernels read them in place
        if dropout > 0.0:
            # Attention dropout (training only) is not in our kernels: torch SDPA
            # with an explicit mask, O(L²) memory, as nn.MultiheadAttention does.
            mask = None
            if window is not None or causal:
                i = torch.arange(l, device=x.device)
                dist = i[:, None] - i[None, :]
                mask = torch.ones(l, l, dtype=torch.bool, device=x.device)
                if causal:
                    mask &= dist >= 0
                if window is not None:
                    mask &= dist.abs() <= window
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                dropout_p=dropout,
            ).transpose(1, 2)
        else:
            if window is None:
                ws = (-1, -1)
            else:
                ws = (window, 0 if causal else window)
            o = _flash_attn_func(q, k, v, causal=causal, window_size=ws)
        return self.out_proj(o.reshape(n, l, e))


class MambaAttention(nn.Module):
    """The documents' layer: the sum of a global and a local attention branch.

    ``MambaAttention(hidden_size)`` has two submodules, ``global_attention`` and
    ``local_attention``, each parameter-compatible with
    ``nn.MultiheadAttention(hidden_size, num_heads)``; ``forward(x)`` returns
    ``global_out + local_out``. With the defaults it computes exactly what the
    documents' snippet computes (two full self-attentions, summed) and loads
    its state_dict with strict=True.

    Extensions: ``window_size=w`` makes the local branch truly local (keys with
    |i − j| ≤ w; 0 ≤ i − j ≤ w when ``causal``) through the windowed kernel, at
    O(L·w) cost; ``causal`` masks future keys in both branches; ``dropout``
    is attention dropout in training (through torch SDPA, since our kernels
    have none); ``batch_first`` takes x as (N, L, E) instead of (L, N, E).
    """

    def __init__(self, hidden_size, num_heads=8, window_size=None, causal=False, dropout=0.0,
                 bias=True, batch_first=False, device=None, dtype=None):
        super().__init__()
        hidden_size = int_arg("hidden_size", hidden_size)
        num_heads = int_arg("num_heads", num_heads)
        if window_size is not None:
            window_size = int_arg("window_size", window_size, 0)
        causal, bias = bool_arg("causal", causal), bool_arg("bias", bias)
        batch_first = bool_arg("batch_first", batch_first)
        dropout = float_arg("dropout", dropout, 0.0)
        if dropout > 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1], got {dropout}")
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.window_size, self.causal = window_size, causal
        self.dropout, self.batch_first = dropout, batch_first
        self.global_attention = _MHABranch(hidden_size, num_heads, bias, device, dtype)
        self.local_attention = _MHABranch(hidden_size, num_heads, bias, device, dtype)

    def forward(self, x):
        e = self.hidden_size
        tensor_arg("x", x, f"(N, L, {e})" if self.batch_first else f"(L, N, {e})", last=e, ndim=3,
                   last_name="hidden_size")
        xb = x if self.batch_first else x.transpose(0, 1)
        p = self.dropout if self.training else 0.0
        out = (self.global_attention(xb, self.causal, None, p)
               + self.local_attention(xb, self.causal, self.window_size, p))
        return out if self.batch_first else out.transpose(0, 1)

    def extra_repr(self):
        return (f"{self.hidden_size}, num_heads={self.num_heads}, window_size={self.window_size}, "
                f"causal={self.causal}, batch_first={self.batch_first}")


def rotary_inv_freq(head_dim, base=10000.0, device=None):
    """θ_i = base^(−2i/head_dim) for i < head_dim/2, float32."""
    return base ** (-torch.arange(head_dim // 2, device=device, dtype=torch.float32) * 2.0
                    / head_dim)


def apply_rotary(x, positions, base=10000.0):
    """NeoX-style rotary embedding over the whole head, in float32.

    ``x`` (b, l, h, hd) with hd even; ``positions`` (l,) integer positions.
    With θ_i = base^(−2i/hd) and halves x₁ = x[..., :hd/2], x₂ = x[..., hd/2:]:
    ``(x₁·cos − x₂·sin, x₂·cos + x₁·sin)`` at angle position·θ. Returns x's dtype.
    (The torch formula; :func:`apply_rotary_qk` rotates q and k in one kernel.)
    """
    from .._autograd import rotary_torch

    hd = x.shape[-1]
    if hd % 2:
        raise ValueError(f"x: rotary embeddings need an even head_dim, got {hd}")
    return rotary_torch(x, positions, rotary_inv_freq(hd, base, x.device))


def apply_rotary_qk(q, k, positions, base=10000.0):
    """:func:`apply_rotary` of q (b, l, hq, hd) and k (b, l, hk, hd) together: one
    fused CUDA kernel on the GPU (forward and backward, reading the projections'
    strided views and writing the contiguous inputs of attention), the torch
    formula on the CPU; differentiable, and traceable by torch.compile."""
    from .._autograd import rotary_qk

    hd = q.shape[-1]
    if hd % 2:
        raise ValueError(f"q: rotary embeddings need an even head_dim, got {hd}")
    return rotary_qk(q, k, positions.to(q.device), rotary_inv_freq(hd, base, q.device))


class SlidingWindowAttention(nn.Module):
    """Samba's sliding-window attention (SPEC §5).

    q/k/v/out projections (GQA/MQA with ``n_kv_heads`` < ``n_heads``), NeoX
    rotary embeddings over the whole head in float32 (q and k in one fused
    kernel on CUDA, :func:`apply_rotary_qk`), then
    ``flash_attn_func(causal=True, window_size=(window_size − 1, 0))``: each
    token sees itself and the ``window_size − 1`` previous tokens, at O(L·W).

    Decoding: ``allocate_inference_cache`` returns a ring buffer of
    ``window_size`` keys/values (``SlidingWindowKVCache``), and ``step`` appends
    one token and attends over it, so memory does not grow with context.
    """

    def __init__(self, d_model, n_heads, n_kv_heads=None, head_dim=None, window_size=2048,
                 rope_base=10000.0, bias=False, device=None, dtype=None):
        super().__init__()
        d_model, n_heads = int_arg("d_model", d_model), int_arg("n_heads", n_heads)
        n_kv_heads = n_heads if n_kv_heads is None else int_arg("n_kv_heads", n_kv_heads)
        if head_dim is not None:
            head_dim = int_arg("head_dim", head_dim)
        window_size = int_arg("window_size", window_size)
        rope_base = float_arg("rope_base", rope_base, 0.0, exclusive=True)
        bias = bool_arg("bias", bias)
        if n_heads % n_kv_heads:
            raise ValueError(
                f"n_kv_heads: n_heads = {n_heads} must be a multiple of n_kv_heads, got {n_kv_heads}"
            )
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"n_heads: d_model = {d_model} must be divisible by n_heads, "
                                 f"got {n_heads} (or pass head_dim)")
            head_dim = d_model // n_heads
        if head_dim % 2:
            raise ValueError(f"head_dim: rotary embeddings need an even head_dim, got {head_dim}")
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.head_dim, self.window_size, self.rope_base = head_dim, window_size, rope_base
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, **kw)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, **kw)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, **kw)
        self.out_proj = nn.Linear(n_heads * head_dim, d_model, **kw)

    def _qkv(self, x, positions):
        b, l, _ = x.shape
        q = self.q_proj(x).view(b, l, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, l, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, l, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary_qk(q, k, positions, self.rope_base)
        return q, k, v

    def forward(self, x):
        b, l, _ = tensor_arg("x", x, f"(b, l, {self.d_model})", last=self.d_model, ndim=3)
        q, k, v = self._qkv(x, torch.arange(l, device=x.device))
        o = _flash_attn_func(q, k, v, causal=True, window_size=(self.window_size - 1, 0))
        return self.out_proj(o.reshape(b, l, self.n_heads * self.head_dim))

    def allocate_inference_cache(self, batch_size, max_seqlen=None, dtype=None):
        """A ring-buffer cache of ``window_size`` positions (``max_seqlen`` is
        accepted for mamba_ssm's signature and does not change its size)."""
        from ..kvcache import SlidingWindowKVCache

        dtype = dtype or self.q_proj.weight.dtype
        return SlidingWindowKVCache(batch_size, self.window_size, self.n_kv_heads, self.head_dim,
                                    dtype=dtype, device=self.q_proj.weight.device)

    def step(self, x, cache):
        """One or a few new tokens ``x`` (b, n, d_model) at positions
        ``cache.pos …``; returns (b, n, d_model) and advances the cache."""
        from ..kvcache import SlidingWindowKVCache

        b, n, _ = tensor_arg("x", x, f"(b, n, {self.d_model})", last=self.d_model, ndim=3)
        if not isinstance(cache, SlidingWindowKVCache):
            raise TypeError(f"cache: expected a SlidingWindowKVCache (from "
                            f"allocate_inference_cache), got {type(cache).__name__}")
        pos = cache.positions(n)
        q, k, v = self._qkv(x, pos)
        o = cache.append_and_attend(q, k, v)
        return self.out_proj(o.reshape(b, n, self.n_heads * self.head_dim))

    def extra_repr(self):
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, window_size={self.window_size}")

