"""mamba-attention: fused CPU and CUDA kernels for Mamba/attention hybrid models.

The functional API is a drop-in for ``mamba_ssm.ops.selective_scan_interface``:
every function takes NumPy arrays or PyTorch tensors and returns the same kind,
dtype and device.
"""

from . import _core
from .ops import selective_scan_fn, selective_state_update
from .ops import causal_conv1d_fn, causal_conv1d_update
from .ops import rms_norm_fn, swiglu
from .ops import hidden_attention
from .ops import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from .ops import sliding_window_attention
from .kvcache import SlidingWindowKVCache
from .ops import conv_selective_scan_fn

__version__ = _core.__version__

__all__ = [
    "__version__",
    "selective_scan_fn",
    "selective_state_update",
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "rms_norm_fn",
    "swiglu",
    "hidden_attention",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "sliding_window_attention",
    "SlidingWindowKVCache",
    "conv_selective_scan_fn",
]
