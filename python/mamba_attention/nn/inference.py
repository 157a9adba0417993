"""Decoding state shared by the modules of a stack (mamba_ssm's ``InferenceParams``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

__all__ = ["InferenceParams"]


@dataclass
class InferenceParams:
    """What a stack of layers carries between decoding calls, laid out like
    ``mamba_ssm.utils.generation.InferenceParams`` so code written for it works.

    ``key_value_memory_dict`` maps each layer's ``layer_idx`` to its state (for
    :class:`~mamba_attention.nn.Mamba`: ``(conv_state, ssm_state)``), created on
    first use. ``seqlen_offset`` is the number of tokens already processed: 0
    means the next ``forward`` is the prompt (a full forward that also fills
    the states); > 0 means each ``forward`` decodes one token with ``step``.
    The caller advances ``seqlen_offset`` after each call, as with mamba_ssm.
    """

    max_seqlen: int = 0
    max_batch_size: int = 0
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: Dict[Any, Any] = field(default_factory=dict)
    lengths_per_sample: Optional[Any] = None

    def reset(self, max_seqlen: int, max_batch_size: int) -> None:
        """Start a new sequence: forget the offset and zero every cached state."""
        self.max_seqlen = max_seqlen
        self.max_batch_size = max_batch_size
        self.seqlen_offset = 0
        if self.lengths_per_sample is not None:
            self.lengths_per_sample.zero_()
        for states in self.key_value_memory_dict.values():
            for s in states if isinstance(states, (tuple, list)) else (states,):
                if hasattr(s, "zero_"):
                    s.zero_()
