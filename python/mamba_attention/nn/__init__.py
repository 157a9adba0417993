"""PyTorch modules (SPEC §5) built on mamba-attention's kernels.

Importing this subpackage imports torch (the top-level package does not).
"""

from .attention import MambaAttention, SlidingWindowAttention
from .inference import InferenceParams
from .layers import GatedMLP, RMSNorm
from .mamba import Mamba
from .samba import SAMBA_CONFIGS, Samba, SambaBlock, SambaConfig, SambaGraphStep

__all__ = [
    "InferenceParams",
    "Mamba",
    "MambaAttention",
    "SlidingWindowAttention",
    "RMSNorm",
    "GatedMLP",
    "SambaBlock",
    "Samba",
    "SambaConfig",
    "SAMBA_CONFIGS",
    "SambaGraphStep",
]
