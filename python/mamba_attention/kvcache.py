"""A ring-buffer KV cache for sliding-window attention (SPEC §5 "Decoding").

A sliding window of ``window`` keys (each query sees itself and the
``window - 1`` previous positions: ``causal=True, window_size=(window - 1, 0)``)
only ever needs the last ``window`` keys and values, so the cache holds exactly
that many per batch entry, overwritten in a ring: position p lives in slot
p mod window. Decoding memory is independent of the context length.

Each :meth:`SlidingWindowKVCache.append_and_attend` call runs one Rust kernel
(``_core.attention_ring``) that attends the new queries over the ring's entries
and the new keys (in their true positions, so ALiBi distances are exact), then
writes the new keys/values into the ring.
"""

from __future__ import annotations

from . import _core

__all__ = ["SlidingWindowKVCache"]


class SlidingWindowKVCache:
    """Ring-buffer K/V cache of ``window`` positions.

    Args:
        batch: batch size b.
        window: the window W (keys a query sees, itself included), ≥ 1.
        n_kv_heads: hk.
        head_dim: hd.
        dtype: a ``torch.dtype`` (the buffers are torch tensors on ``device``),
            or a NumPy dtype / name such as ``"float32"`` (NumPy buffers; ``device``
            must be None or "cpu").
        device: torch device of the buffers (default CPU).

    Attributes:
        k, v: the ring buffers (b, W, hk, hd); slot ``p % W`` holds position p.
        pos: the number of tokens appended so far (the next token's position).
    """

    def __init__(self, batch, window, n_kv_heads, head_dim, dtype="float32", device=None):
        for name, val in (("batch", batch), ("window", window), ("n_kv_heads", n_kv_heads),
                          ("head_dim", head_dim)):
            if isinstance(val, bool) or not isinstance(val, int):
                raise TypeError(f"{name}: expected an int ≥ 1, got {type(val).__name__}")
            if val < 1:
                raise ValueError(f"{name}: expected an int ≥ 1, got {val}")
        shape = (batch, window, n_kv_heads, head_dim)
        torch = _torch_if_dtype(dtype)
        if torch is not None:
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = torch.zeros(shape, dtype=dtype, device=device)
        else:
            import numpy as np

            if device not in (None, "cpu"):
                raise ValueError(f"device: NumPy buffers live on the CPU, got {device!r}")
            if str(dtype) == "bfloat16":
                import ml_dtypes

                dtype = ml_dtypes.bfloat16
            self.k = np.zeros(shape, dtype=dtype)
            self.v = np.zeros(shape, dtype=dtype)
        self.window = window
        self.pos = 0

    def reset(self):
        """Forget every token (the buffers are reused)."""
        self.pos = 0

    def append_and_attend(self, q, k, v, softmax_scale=None, softcap=0.0, alibi_slopes=None):
        """Appends n new tokens and returns their attention output.

        ``q`` (b, n, hq, hd), ``k``/``v`` (b, n, hk, hd), with the buffers' dtype and
        kind; n ≥ 1 (one token per decoding step, or a few; n larger than the window
        works too). Token t of the call has position ``pos + t`` and attends, like
        ``flash_attn_func(causal=True, window_size=(window - 1, 0))`` over the whole
        stream, to the positions ``pos + t - window + 1 .. pos + t``; ALiBi uses those
        true positions. ``softmax_scale``, ``softcap``, ``alibi_slopes`` as in
        :func:`mamba_attention.flash_attn_func`.

        Returns ``out`` (b, n, hq, hd); ``pos`` advances by n.
        """
        if getattr(getattr(q, "device", None), "type", None) == "cuda":
            out = self._attend_torch(q, k, v, softmax_scale, softcap, alibi_slopes)
        else:
            out, _ = _core.attention_ring(q, self.k, self.v, k, v, self.pos, softmax_scale,
                                          softcap, alibi_slopes)
        self.pos += q.shape[1]
        return out

    def _attend_torch(self, q, k, v, softmax_scale, softcap, alibi_slopes):
        """The CUDA path until a ring kernel exists there: the same semantics in torch
        ops over the ring's W entries plus the new tokens (O(W) per token, constant
        memory), then the ring update."""
        import math

        import torch

        b, n, hq, hd = q.shape
        hk, w, p0 = k.shape[2], self.window, self.pos
        old = torch.arange(max(0, p0 - w + 1), p0, device=q.device)  # cached positions
        kpos = torch.cat((old, torch.arange(p0, p0 + n, device=q.device)))
        keys = torch.cat((self.k[:, old % w], k), 1)
        vals = torch.cat((self.v[:, old % w], v), 1)
        qpos = torch.arange(p0, p0 + n, device=q.device)
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(hd)
        rep = hq // hk
        kf = keys.float().repeat_interleave(rep, 2)
        vf = vals.float().repeat_interleave(rep, 2)
        s = torch.einsum("bqhd,bkhd->bhqk", q.float(), kf) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        dist = qpos[:, None] - kpos[None, :]
        if alibi_slopes is not None:
            sl = alibi_slopes.float().to(q.device)
            sl = sl.view(1, hq, 1, 1) if sl.dim() == 1 else sl.view(b, hq, 1, 1)
            s = s - sl * dist.abs()
        s = s.masked_fill(~((dist >= 0) & (dist < w)), float("-inf"))
        o = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), vf).to(q.dtype)
        keep = min(n, w)  # only the last W new tokens stay in the ring
        slots = torch.arange(p0 + n - keep, p0 + n, device=q.device) % w
        self.k[:, slots] = k[:, n - keep:]
        self.v[:, slots] = v[:, n - keep:]
        return o


def _torch_if_dtype(dtype):
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and isinstance(dtype, torch.dtype):
        return torch
    return None
