"""Samba (SPEC §5): pre-norm residual layers Mamba → MLP → SWA → MLP.

Mamba carries long-range state, sliding-window attention does precise recall
within its window, and decoding memory stays constant however long the
context: each block's cache is a Mamba conv/SSM state plus a ring buffer of
``window_size`` keys/values.

The residual stream is added and normalised in one kernel per layer
(``rms_norm_fn(..., residual=..., prenorm=True)``) and kept in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

from ._args import int_arg, float_arg, tensor_arg
from .attention import SlidingWindowAttention
from .layers import GatedMLP, RMSNorm
from .mamba import Mamba

__all__ = ["SambaBlock", "Samba", "SambaConfig", "SAMBA_CONFIGS", "SambaGraphStep"]


@dataclass(frozen=True)
class SambaConfig:
    """Sizes of a Samba model. ``n_blocks`` counts Mamba→MLP→SWA→MLP groups
    (4 layers each)."""

    d_model: int
    n_blocks: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    window_size: int = 2048
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    mlp_hidden: Optional[int] = None
    vocab_size: int = 32000
    norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("d_model", "n_blocks", "n_heads", "n_kv_heads", "head_dim", "window_size",
                     "d_state", "d_conv", "expand", "vocab_size"):
            int_arg(name, getattr(self, name))
        if self.mlp_hidden is not None:
            int_arg("mlp_hidden", self.mlp_hidden)
        float_arg("norm_eps", self.norm_eps, 0.0)


#: The published model sizes (SPEC §5: width, query/kv heads, head dim, window
#: 2048, d_state 16). Depths are our reading of the Samba paper and are not
#: used for anything but these presets; no weights are loaded here.
SAMBA_CONFIGS = {
    "samba-421m": SambaConfig(d_model=1536, n_blocks=6, n_heads=12, n_kv_heads=12, head_dim=128),
    "samba-1.3b": SambaConfig(d_model=2304, n_blocks=9, n_heads=18, n_kv_heads=18, head_dim=128),
    "samba-1.7b": SambaConfig(d_model=2048, n_blocks=12, n_heads=32, n_kv_heads=4, head_dim=64),
    "samba-3.8b": SambaConfig(d_model=2816, n_blocks=16, n_heads=11, n_kv_heads=1, head_dim=256),
}


class SambaBlock(nn.Module):
    """One Samba group: four pre-norm residual layers, Mamba → MLP → SWA → MLP.

    ``forward(hidden, residual=None)`` returns ``(hidden, residual)`` in the
    mamba_ssm ``Block`` convention: each layer computes
    ``residual = residual + hidden; hidden = mixer(norm(residual))``, the add
    and the norm fused; apply a final norm to ``(hidden, residual)`` at the end
    of a stack (``Samba`` does).
    """

    def __init__(self, d_model, n_heads, n_kv_heads=None, head_dim=None, window_size=2048,
                 d_state=16, d_conv=4, expand=2, mlp_hidden=None, norm_eps=1e-5, layer_idx=None,
                 device=None, dtype=None):
        super().__init__()
        # Checked here too, so that errors name this constructor's arguments.
        d_model, n_heads = int_arg("d_model", d_model), int_arg("n_heads", n_heads)
        window_size, d_state = int_arg("window_size", window_size), int_arg("d_state", d_state)
        d_conv = int_arg("d_conv", d_conv, 2)
        float_arg("norm_eps", norm_eps, 0.0)
        kw = dict(device=device, dtype=dtype)
        self.layer_idx = layer_idx
        self.norms = nn.ModuleList([RMSNorm(d_model, eps=norm_eps, **kw) for _ in range(4)])
        self.mamba = Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand,
                           layer_idx=layer_idx, **kw)
        self.mlp1 = GatedMLP(d_model, mlp_hidden, **kw)
        self.swa = SlidingWindowAttention(d_model, n_heads, n_kv_heads, head_dim, window_size, **kw)
        self.mlp2 = GatedMLP(d_model, mlp_hidden, **kw)

    def _mixers(self):
        return (self.mamba, self.mlp1, self.swa, self.mlp2)

    def _check(self, hidden, residual, one=False):
        d = self.norms[0].weight.shape[0]
        shape = tensor_arg("hidden", hidden, f"(b, {1 if one else 'l'}, {d})", last=d, ndim=3)
        if one and shape[1] != 1:
            raise ValueError(f"hidden: step decodes one token, expected shape (b, 1, {d}), "
                             f"got {tuple(shape)}")
        if residual is not None:
            tensor_arg("residual", residual, f"{tuple(shape)} (hidden's)", last=d, ndim=3)
            if residual.shape != shape:
                raise ValueError(f"residual: expected hidden's shape {tuple(shape)}, got "
                                 f"{tuple(residual.shape)}")

    def forward(self, hidden, residual=None):
        self._check(hidden, residual)
        for norm, mixer in zip(self.norms, self._mixers()):
            hidden, residual = norm(hidden, residual, prenorm=True, residual_in_fp32=True)
            hidden = mixer(hidden)
        return hidden, residual

    def allocate_inference_cache(self, batch_size, max_seqlen=None, dtype=None):
        """(conv_state, ssm_state, kv ring buffer): size independent of the context."""
        conv_state, ssm_state = self.mamba.allocate_inference_cache(batch_size, max_seqlen or 1,
                                                                    dtype=dtype)
        return [conv_state, ssm_state, self.swa.allocate_inference_cache(batch_size, dtype=dtype)]

    def step(self, hidden, residual, cache):
        """One token: ``hidden`` (b, 1, d); returns (hidden, residual); updates ``cache``."""
        self._check(hidden, residual, one=True)
        if not isinstance(cache, list) or len(cache) != 3:
            raise TypeError("cache: expected the list [conv_state, ssm_state, kv cache] of "
                            f"allocate_inference_cache, got {type(cache).__name__}")
        conv_state, ssm_state, kv = cache
        for i, (norm, mixer) in enumerate(zip(self.norms, self._mixers())):
            hidden, residual = norm(hidden, residual, prenorm=True, residual_in_fp32=True)
            if i == 0:
                hidden, conv_state, ssm_state = self.mamba.step(hidden, conv_state, ssm_state)
            elif i == 2:
                hidden = self.swa.step(hidden, kv)
            else:
                hidden = mixer(hidden)
        cache[0], cache[1] = conv_state, ssm_state
        return hidden, residual


class Samba(nn.Module):
    """A Samba language model: embedding, ``n_blocks`` SambaBlocks, final RMSNorm,
    LM head (tied to the embedding by default).

    ``Samba.from_config("samba-421m")`` builds a published size (random weights).
    ``forward(input_ids (b, l))`` returns logits (b, l, vocab); ``step`` decodes one
    token with a cache from ``allocate_inference_cache`` whose size does not grow
    with the context; ``generate`` decodes greedily.
    """

    def __init__(self, config: SambaConfig, tie_embeddings=True, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, SambaConfig):
            raise TypeError(f"config: expected a SambaConfig, got {type(config).__name__}")
        c = config
        kw = dict(device=device, dtype=dtype)
        self.config = c
        self.embedding = nn.Embedding(c.vocab_size, c.d_model, **kw)
        self.blocks = nn.ModuleList([
            SambaBlock(c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.window_size, c.d_state,
                       c.d_conv, c.expand, c.mlp_hidden, c.norm_eps, layer_idx=i, **kw)
            for i in range(c.n_blocks)
        ])
        self.norm_f = RMSNorm(c.d_model, eps=c.norm_eps, **kw)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False, **kw)
        if tie_embeddings:
            self.lm_head.weight = self.embedding.weight

    @classmethod
    def from_config(cls, name, **overrides):
        """A published size by name (``SAMBA_CONFIGS``), fields overridable."""
        if name not in SAMBA_CONFIGS:
            raise ValueError(f"name: expected one of {sorted(SAMBA_CONFIGS)}, got {name!r}")
        kw = {k: overrides.pop(k) for k in ("tie_embeddings", "device", "dtype") if k in overrides}
        cfg = SAMBA_CONFIGS[name]
        return cls(SambaConfig(**{**cfg.__dict__, **overrides}), **kw)

    def _ids(self, input_ids, one=False):
        """Checks token ids: an integer tensor (b, l) (l = 1 for a step), values in
        [0, vocab_size) (checked on the CPU; on CUDA the embedding asserts)."""
        want = "(b, 1)" if one else "(b, l) with l ≥ 1"
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids: expected an integer torch.Tensor {want}, got "
                            f"{type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"input_ids: expected an int32 or int64 tensor (token ids), got "
                            f"dtype {input_ids.dtype}")
        if input_ids.dim() != 2 or input_ids.numel() == 0 or (one and input_ids.shape[1] != 1):
            raise ValueError(f"input_ids: expected shape {want} (non-empty), got "
                             f"{tuple(input_ids.shape)}")
        if input_ids.device.type == "cpu" and input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"input_ids: expected token ids in [0, vocab_size = "
                                 f"{self.config.vocab_size}), got values in [{lo}, {hi}]")

    def forward(self, input_ids):
        self._ids(input_ids)
        hidden, residual = self.embedding(input_ids), None
        for block in self.blocks:
            hidden, residual = block(hidden, residual)
        hidden = self.norm_f(hidden, residual)
        return self.lm_head(hidden)

    def allocate_inference_cache(self, batch_size, max_seqlen=None, dtype=None) -> List[list]:
        return [b.allocate_inference_cache(batch_size, max_seqlen, dtype) for b in self.blocks]

    @torch.no_grad()
    def step(self, input_ids, cache):
        """Logits (b, 1, vocab) of one new token per sequence (``input_ids`` (b, 1))."""
        self._ids(input_ids, one=True)
        if not isinstance(cache, (list, tuple)) or len(cache) != len(self.blocks):
            raise ValueError(f"cache: expected one entry per block ({len(self.blocks)}) from "
                             f"allocate_inference_cache, got {type(cache).__name__}")
        hidden, residual = self.embedding(input_ids), None
        for block, c in zip(self.blocks, cache):
            hidden, residual = block.step(hidden, residual, c)
        return self.lm_head(self.norm_f(hidden, residual))

    def capture_step(self, cache):
        """Records one :meth:`step` with ``cache`` in a CUDA graph (the decode fast
        path: a token then costs one graph launch instead of a few hundred kernel
        launches from Python). Returns a :class:`SambaGraphStep`; calling it with
        ``input_ids`` (b, 1) is ``step(input_ids, cache)``. The cache's contents
        are left as they were (warm-up and capture do not advance it)."""
        return SambaGraphStep(self, cache)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, cuda_graph=None):
        """Greedy decoding: returns (b, l + max_new_tokens) token ids. The prompt is
        fed token by token through ``step`` (constant memory at any length).
        ``cuda_graph`` (default: on when the model is on CUDA) runs each step as a
        captured CUDA graph (:meth:`capture_step`)."""
        self._ids(input_ids)
        max_new_tokens = int_arg("max_new_tokens", max_new_tokens, 0)
        on_cuda = self.embedding.weight.device.type == "cuda"
        if cuda_graph is None:
            cuda_graph = on_cuda
        if cuda_graph and not on_cuda:
            raise ValueError("cuda_graph: CUDA graphs need the model on a CUDA device, "
                             f"got {self.embedding.weight.device}")
        cache = self.allocate_inference_cache(input_ids.shape[0])
        step = self.capture_step(cache) if cuda_graph else (lambda ids: self.step(ids, cache))
        logits = None
        for t in range(input_ids.shape[1]):
            logits = step(input_ids[:, t:t + 1])
        out = [input_ids]
        for _ in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            logits = step(nxt)
        return torch.cat(out, dim=1)


class SambaGraphStep:
    """One :meth:`Samba.step` recorded in a CUDA graph, replayed per token.

    Built by :meth:`Samba.capture_step`. The graph reads the token ids from a
    static buffer, runs every block's step (norms, Mamba state update, MLPs, the
    ring-buffer attention, with the positions read on the device) and writes the
    logits; ``__call__`` copies the ids in, replays it, advances the caches' host
    positions and returns a copy of the logits. The caches are updated in place,
    exactly as by ``Samba.step``; do not resize or replace their tensors afterwards.
    """

    def __init__(self, model, cache):
        dev = model.embedding.weight.device
        if dev.type != "cuda":
            raise ValueError(f"model: CUDA graphs need the model on a CUDA device, got {dev}")
        if len(cache) != len(model.blocks):
            raise ValueError(f"cache: expected one entry per block ({len(model.blocks)}), "
                             f"got {len(cache)}")
        self.model, self.cache = model, cache
        b = cache[0][0].shape[0]
        self.ids = torch.zeros(b, 1, dtype=torch.long, device=dev)
        state = [t for blk in cache for t in (blk[0], blk[1], blk[2].k, blk[2].v, blk[2]._pos_t)]
        saved = [t.clone() for t in state]
        host_pos = [blk[2].pos for blk in cache]
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up: loads kernels and library handles
            for _ in range(2):
                model.step(self.ids, cache)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.step(self.ids, cache)
        for t, s in zip(state, saved):
            t.copy_(s)
        for blk, p in zip(cache, host_pos):
            blk[2]._pos = p

    def __call__(self, input_ids):
        if tuple(input_ids.shape) != tuple(self.ids.shape):
            raise ValueError(f"input_ids: expected shape {tuple(self.ids.shape)}, got "
                             f"{tuple(input_ids.shape)}")
        self.ids.copy_(input_ids)
        self.graph.replay()
        for blk in self.cache:
            blk[2]._pos += 1
        return self.logits.clone()
