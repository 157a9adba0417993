"""A ring-buffer KV cache for sliding-window attention (SPEC §5 "Decoding").

A sliding window of ``window`` keys (each query sees itself and the
``window - 1`` previous positions: ``causal=True, window_size=(window - 1, 0)``)
only ever needs the last ``window`` keys and values, so the cache holds exactly
that many per batch entry, overwritten in a ring: position p lives in slot
p mod window. Decoding memory is independent of the context length.

On the CPU each :meth:`SlidingWindowKVCache.append_and_attend` call runs one
Rust kernel (``_core.attention_ring``) that attends the new queries over the
ring's entries and the new keys (in their true positions, so ALiBi distances
are exact), then writes the new keys/values into the ring. On CUDA a one-token
step writes the new key/value into its slot and runs one masked attention over
the ring, with the position kept on the device (CUDA-graph capturable); several
tokens at once take a torch formula.
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
        pos: the number of tokens appended so far (the next token's position);
            assignable (``cache.pos = p`` rewinds or fast-forwards), in
            [0, 2**63 − 1] (positions are int64). Setting it below the window
            (``reset()`` included) zeroes the slots that then hold no position, so
            nothing of an earlier stream (NaN included) can reach a new one.

    On CUDA a one-token step synchronises nothing with the host and keeps every
    shape static, so ``Samba.capture_step`` can record it in a CUDA graph.
    """

    def __init__(self, batch, window, n_kv_heads, head_dim, dtype="float32", device=None):
        import operator

        sizes = []
        for name, val in (("batch", batch), ("window", window), ("n_kv_heads", n_kv_heads),
                          ("head_dim", head_dim)):
            try:
                if isinstance(val, bool) or type(val).__name__ in ("bool", "bool_"):
                    raise TypeError
                val = operator.index(val)  # Python / NumPy ints
            except TypeError:
                raise TypeError(f"{name}: expected an int ≥ 1, got {type(val).__name__} "
                                f"{val!r}") from None
            if not 1 <= val < 2**63:
                raise ValueError(f"{name}: expected an int ≥ 1 (below 2**63), got {val}")
            sizes.append(val)
        batch, window, n_kv_heads, head_dim = sizes
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
        # On CUDA the position also lives on the device (``_pos_t``), so that a
        # decoding step reads and advances it without a host round trip and can be
        # captured in a CUDA graph; ``pos`` mirrors it on the host.
        self._pos_t = None
        if torch is not None and self.k.device.type == "cuda":
            self._pos_t = torch.zeros((), dtype=torch.int64, device=self.k.device)
        self._pos = 0

    @property
    def pos(self):
        """The number of tokens appended so far (the next token's position)."""
        return self._pos

    @pos.setter
    def pos(self, value):
        import operator

        try:
            if isinstance(value, bool) or type(value).__name__ in ("bool", "bool_"):
                raise TypeError
            value = operator.index(value)  # Python / NumPy ints
        except TypeError:
            raise TypeError(f"pos: expected an int in [0, 2**63 - 1], got "
                            f"{type(value).__name__} {value!r}") from None
        if not 0 <= value <= _POS_MAX:
            raise ValueError(f"pos: expected an int in [0, 2**63 - 1], got {value!r}")
        self._pos = value
        if self._pos_t is not None:
            self._pos_t.fill_(value)
        if value < self.window:
            # Slots value.. hold no position of the new stream (they would hold
            # negative ones): zero them, so that whatever they held (NaN from
            # an earlier stream included) cannot reach a query through a
            # masked score (0·NaN = NaN in the CUDA decoding step).
            self.k[:, value:] = 0
            self.v[:, value:] = 0

    def _check_positions(self, n):
        """The positions pos .. pos + n − 1 of n new tokens must fit int64."""
        if self._pos + n - 1 > _POS_MAX:
            raise ValueError(f"pos: the positions of {n} new tokens from pos = {self._pos} "
                             f"exceed 2**63 - 1")

    def reset(self):
        """Forget every token (the buffers are reused)."""
        self.pos = 0

    def positions(self, n):
        """The positions of the next ``n`` tokens as an int64 tensor (on the device of
        the buffers; computed there from the device-side position on CUDA, so it is
        valid inside a captured CUDA graph)."""
        import torch

        self._check_positions(n)
        if self._pos_t is not None:
            return self._pos_t + torch.arange(n, device=self._pos_t.device)
        return torch.arange(self._pos, self._pos + n)

    def append_and_attend(self, q, k, v, softmax_scale=None, softcap=0.0, alibi_slopes=None):
        """Appends n new tokens and returns their attention output.

        ``q`` (b, n, hq, hd), ``k``/``v`` (b, n, hk, hd), with the buffers' dtype and
        kind; n ≥ 1 (one token per decoding step, or a few; n larger than the window
        works too). Token t of the call has position ``pos + t`` and attends, like
        ``flash_attn_func(causal=True, window_size=(window - 1, 0))`` over the whole
        stream, to the positions ``pos + t - window + 1 .. pos + t``; ALiBi uses those
        true positions. Only ``pos`` modulo the window and the distances matter, so
        positions up to 2**63 − 1 work; a token whose position would pass that raises
        ValueError. ``softmax_scale``, ``softcap``, ``alibi_slopes`` as in
        :func:`mamba_attention.flash_attn_func`.

        Returns ``out`` (b, n, hq, hd); ``pos`` advances by n.
        """
        # (q itself is checked by the Rust ring checks below; this only needs its length)
        n = q.shape[1] if hasattr(q, "shape") and len(q.shape) > 1 else 1
        self._check_positions(n)
        if getattr(getattr(q, "device", None), "type", None) == "cuda":
            # The Rust ring kernel's checks (shapes, dtypes, devices, the rings'
            # memory), without running it; returns the number of new tokens.
            n = _core.attention_ring_check(q, self.k, self.v, k, v, self._pos, softmax_scale,
                                           softcap, alibi_slopes)
            if n == 1 and self._pos_t is not None and q.device == self.k.device:
                out = self._decode_one_cuda(q, k, v, softmax_scale, softcap, alibi_slopes)
            else:
                out = self._attend_torch(q, k, v, softmax_scale, softcap, alibi_slopes)
                if self._pos_t is not None:
                    self._pos_t.add_(n)
        else:
            # The kernel needs the position only modulo the window (slots) and
            # relative to the keys (ALiBi): pass the equivalent one below 2W.
            pos = self._pos if self._pos < self.window else self.window + self._pos % self.window
            out, _ = _core.attention_ring(q, self.k, self.v, k, v, pos, softmax_scale,
                                          softcap, alibi_slopes)
            n = out.shape[1]
        self._pos += n
        return out

    def _decode_one_cuda(self, q, k, v, softmax_scale, softcap, alibi_slopes):
        """One new token on CUDA with no host synchronisation and static shapes (so a
        step can be captured in a CUDA graph): the token's k/v are first written into
        slot p mod W (that slot held position p − W, which has just left the window),
        then the query attends over the W ring slots, slot s holding position
        p − ((p − s) mod W), masked where that position is negative (not written yet).
        The query heads of one kv head share the keys and the mask, so they are
        folded into the query length of one SDPA call (GQA without repeated K/V)."""
        import math

        import torch
        import torch.nn.functional as F

        b, _, hq, hd = q.shape
        hk, w = k.shape[2], self.window
        rep = hq // hk
        p = self._pos_t
        slot = torch.remainder(p, w).view(1)
        self.k.index_copy_(1, slot, k)
        self.v.index_copy_(1, slot, v)
        s = torch.arange(w, device=q.device)
        dist = torch.remainder(p - s, w)  # p − (position held by slot s)
        valid = dist <= p
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(hd)
        qg = q.view(b, hk, rep, hd)  # (b, 1, hq, hd) with hq = hk·rep, head-major
        kr, vr = self.k.transpose(1, 2), self.v.transpose(1, 2)  # (b, hk, W, hd)
        if softcap or alibi_slopes is not None:
            sc = torch.einsum("bgrd,bgwd->bgrw", qg.float(), kr.float()) * scale
            if softcap:
                sc = softcap * torch.tanh(sc / softcap)
            if alibi_slopes is not None:
                sl = alibi_slopes.float().to(q.device)
                sl = sl.view(1, hk, rep, 1) if sl.dim() == 1 else sl.view(b, hk, rep, 1)
                sc = sc - sl * dist.float()
            sc = sc.masked_fill(~valid, float("-inf"))
            o = torch.einsum("bgrw,bgwd->bgrd", torch.softmax(sc, -1), vr.float()).to(q.dtype)
        else:
            o = F.scaled_dot_product_attention(qg, kr, vr, attn_mask=valid.view(1, 1, 1, w),
                                               scale=scale)
        p.add_(1)
        return o.reshape(b, 1, hq, hd)

    def _attend_torch(self, q, k, v, softmax_scale, softcap, alibi_slopes):
        """The CUDA path until a ring kernel exists there: the cached positions still in
        the first new token's window, followed by the new tokens, form one key sequence
        that the new queries attend causally with a window of W (bottom-right aligned,
        so distances, ALiBi included, are the true ones), through the torch formula
        (O(W) per token, constant memory; masked keys contribute nothing whatever
        their values); then the ring update. Positions are relative, so any pos works."""
        import torch

        from .ops import _torch_attention

        n, w, p0 = q.shape[1], self.window, self.pos
        m = min(p0, w - 1)  # cached positions p0 − m .. p0 − 1
        old = (torch.arange(m, device=q.device) + (p0 - m) % w) % w
        keys = torch.cat((self.k[:, old], k), 1)
        vals = torch.cat((self.v[:, old], v), 1)
        if alibi_slopes is not None:
            alibi_slopes = torch.as_tensor(alibi_slopes, device=q.device)
        o, _ = _torch_attention(q, keys, vals, softmax_scale, True, w - 1, 0, softcap,
                                alibi_slopes)
        keep = min(n, w)  # only the last W new tokens stay in the ring
        slots = (torch.arange(keep, device=q.device) + (p0 + n - keep) % w) % w
        self.k[:, slots] = k[:, n - keep:]
        self.v[:, slots] = v[:, n - keep:]
        return o


# Token positions are int64 (``positions``, the CUDA step's device position).
_POS_MAX = 2**63 - 1


def _torch_if_dtype(dtype):
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and isinstance(dtype, torch.dtype):
        return torch
    return None
