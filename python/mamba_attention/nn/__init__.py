"""PyTorch modules (SPEC §5) built on mamba-attention's kernels.

Importing this subpackage imports torch (the top-level package does not).
"""

from .inference import InferenceParams
from .mamba import Mamba

__all__ = ["InferenceParams", "Mamba"]
