"""Typed stubs of the Rust extension ``mamba_attention._core``.

Tensors are NumPy arrays, torch tensors or other ``__dlpack__`` objects; each
function returns the kind, dtype and device of its first tensor argument.

Every argument is checked here, in Rust (SPEC: a TypeError or ValueError naming
it): flags take ``bool`` or ``numpy.bool_`` only; ints anything with
``__index__`` but bool and float; ``window_size`` any sequence of two ints. A
torch tensor with the negative (or conjugate) bit is read through a resolved copy;
an argument written in place cannot have it (TypeError), must have distinct
elements and must not share memory with any other argument (ValueError). The
``*_check`` functions run a function's checks without running it (the custom-op
and CUDA paths of ``ops`` call them first) and return its parsed options.
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

Tensor = Any

__version__: str

def simd_level() -> str:
    """The SIMD level kernels use now: "portable", "avx2" or "avx512" (honours MAMBA_ATTENTION_SIMD)."""

def simd_levels() -> List[str]:
    """Every SIMD level this CPU supports, slowest first."""

def num_threads() -> int:
    """Threads used by the CPU kernels (rayon; RAYON_NUM_THREADS sets it)."""

def cuda_info() -> Dict[str, Union[bool, str]]:
    """{"driver": bool, "nvrtc": bool, "detail": str}: whether CUDA kernels can run here."""

def kernel_cache_dir() -> str:
    """Where compiled CUDA kernels are cached (MAMBA_ATTENTION_CACHE overrides)."""

def compile_kernels(
    arch: str, modules: Optional[List[str]] = None, use_cache: bool = True
) -> List[Tuple[str, int, str, bool]]:
    """Compiles the CUDA kernels through NVRTC for ``arch`` (e.g. "sm_90"), no GPU
    needed: every kernel source, or those named in ``modules``. With ``use_cache`` each
    goes through the on-disk kernel cache as at first use (a valid entry is read, a
    missing or damaged one is compiled and stored). Returns (module, cubin bytes, NVRTC
    log, whether it came from the cache) per kernel source."""

def selective_scan_fwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Selective scan forward (SPEC §1): out (b, d, l) [, last_state (b, d, n) float32]."""

def selective_scan_check(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Optional[Tensor] = None,
) -> Tuple[bool, bool]:
    """selective_scan_fwd's checks without running it: (delta_softplus, return_last_state)."""

def selective_scan_bwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    initial_state: Optional[Tensor] = None,
    dout: Optional[Tensor] = None,
    dlast_state: Optional[Tensor] = None,
    checkpoints: Optional[Tensor] = None,
) -> Tuple[Optional[Tensor], ...]:
    """Gradients of selective_scan_fn given dout (b, d, l) [and dlast_state (b, d, n)]:
    (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state); du and ddelta in
    u's dtype, dz in z's, the rest float32 in their input's shape; None for an input
    that was None. ``checkpoints`` (CPU and CUDA): selective_scan_fwd_ck's third output, which
    saves recomputing the chunk-start states (an empty tensor counts as None)."""

def selective_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    dt_softplus: bool = False,
    state_batch_indices: Optional[Tensor] = None,
) -> Tensor:
    """One decoding step; updates ``state`` in place and returns out (b, d).
    state_batch_indices: any integer dtype (uint64 values ≥ 2**63: ValueError)."""

def causal_conv1d_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    initial_states: Optional[Tensor] = None,
    return_final_states: bool = False,
    activation: Optional[str] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Causal depthwise conv1d (SPEC §2): out (b, d, l) [, final_states (b, d, w - 1)], x's dtype."""

def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    activation: Optional[str] = None,
    cache_seqlens: Optional[Tensor] = None,
) -> Tensor:
    """Decoding step(s): updates ``conv_state`` in place (shift, or circular with cache_seqlens); returns out with x's shape."""

def causal_conv1d_bwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    initial_states: Optional[Tensor],
    dout: Tensor,
    dfinal_states: Optional[Tensor] = None,
    activation: Optional[str] = None,
) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Backward of causal_conv1d_fwd: (dx in x's dtype, dweight float32 (d, w), dbias float32 (d,) or None, dinitial_states in its dtype or None)."""

def rms_norm_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    eps: float = 1e-6,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
) -> Tuple[Tensor, Optional[Tensor], Tensor]:
    """RMSNorm of x (..., h) (+ residual of x's shape): (out in x's dtype and shape,
    residual_out (with ``prenorm``) or None, rstd float32 (rows,)), rows the product
    of x's leading dimensions (read in place where they collapse into one stride,
    else through a copy)."""

def rms_norm_check(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    eps: float = 1e-6,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
) -> Tuple[float, bool, bool]:
    """rms_norm_fwd's checks without running it: (eps, prenorm, residual_in_fp32)."""

def rms_norm_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    rstd: Tensor,
    bias: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    dresidual_out: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """RMSNorm backward on (rows, h): (dx, dweight float32, dbias float32 or None,
    dresidual or None)."""

def swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) · up on gate, up (..., cols) of one shape, in gate's dtype and shape."""

def swiglu_bwd(gate: Tensor, up: Tensor, dout: Tensor) -> Tuple[Tensor, Tensor]:
    """SwiGLU gradients: (dgate in gate's dtype, dup in up's dtype), gate's shape."""

def swiglu_check(gate: Tensor, up: Tensor) -> None:
    """swiglu_fwd's checks without running it."""
def hidden_attention(
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    reduce: Optional[str] = None,
) -> Tensor:
    """Hidden attention of a selective scan (SPEC §4): α (b, d, l, l) float32, or (b, l, l) with reduce="mean"."""
def _flash_attn_fwd_cuda(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Optional[Tensor],
    softmax_scale: float,
    left: int,
    right: int,
    softcap: float,
    alibi_slopes: Optional[Tensor] = None,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
) -> None:
    """Private: CUDA flash-attention forward into caller-allocated out (like q) and lse
    (float32 (b, hq, sq); varlen (hq, total_q); or None). Options already normalised:
    left/right window bounds, -1 = unbounded (causal: right = 0, bottom-right aligned).
    Batched: q/out (b, sq, hq, hd), k/v (b, sk, hk, hd); varlen (cu_seqlens_q/k int32
    (b + 1,), max_seqlen_q/k): q/out (total_q, hq, hd), k/v (total_k, hk, hd).
    alibi_slopes float32 (hq,) or (b, hq). float16/bfloat16 torch CUDA tensors only
    (float32: TypeError); hd a multiple of 8 up to 256; last dim contiguous."""

def attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Optional[Sequence[int]] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[Tensor] = None,
    out: Optional[Tensor] = None,
    softmax_lse: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Attention forward (SPEC §3): (out (b, sq, hq, hd) in q's dtype, softmax_lse (b, hq, sq) float32); writes into out / softmax_lse when given. deterministic and return_attn_probs (flash_attn_func's flags) are checked, and change nothing here."""

def attention_check(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Optional[Sequence[int]] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Tuple[Optional[float], bool, int, int, float, bool]:
    """attention_fwd's checks without running it (any device): (softmax_scale or None,
    causal, left, right, softcap, deterministic), the window not yet normalised by causal."""

def attention_varlen_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Optional[Sequence[int]] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[Tensor] = None,
    out: Optional[Tensor] = None,
    softmax_lse: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Packed variable-length attention forward: (out (total_q, hq, hd), softmax_lse (hq, total_q) float32)."""

def attention_varlen_check(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Optional[Sequence[int]] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Tuple[Optional[float], bool, int, int, float, bool, int, int]:
    """attention_varlen_fwd's checks without running it (the offsets are read on the CPU
    only): attention_check's options, then max_seqlen_q, max_seqlen_k as ints."""

def attention_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    cache_seqlens: Union[int, Tensor, None] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Optional[Sequence[int]] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[Tensor] = None,
    return_softmax_lse: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Appends k/v into the caches in place at cache_seqlens, then attends over cache[:, :cache_seqlens + s_new]: (out, softmax_lse (b, hq, sq) float32). return_softmax_lse is checked and changes nothing here."""

def attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    softmax_lse: Tensor,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Optional[Sequence[int]] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[Tensor] = None,
    dsoftmax_lse: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward of attention_fwd from its out and softmax_lse: (dq, dk, dv) in the dtypes of q, k, v (GQA: dk/dv summed over each group's query heads)."""

def attention_varlen_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    softmax_lse: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Optional[Sequence[int]] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[Tensor] = None,
    dsoftmax_lse: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward of attention_varlen_fwd: (dq, dk, dv); rows outside every sequence get 0."""

def attention_ring(
    q: Tensor,
    k_ring: Tensor,
    v_ring: Tensor,
    k: Tensor,
    v: Tensor,
    pos: int,
    softmax_scale: Optional[float] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """One sliding-window ring-cache step: the n new tokens (positions pos..pos+n) attend causally to the window = k_ring.shape[1] most recent positions (ring slot = position mod window, plus the new k/v), then k/v are written into the rings. (out, softmax_lse (b, hq, n) float32)."""

def attention_ring_check(
    q: Tensor,
    k_ring: Tensor,
    v_ring: Tensor,
    k: Tensor,
    v: Tensor,
    pos: int,
    softmax_scale: Optional[float] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[Tensor] = None,
) -> int:
    """attention_ring's checks without running it (any device): the number n of new tokens."""
def _rotary_cuda(
    q: Tensor, k: Tensor, positions: Tensor, inv_freq: Tensor, conj: bool
) -> Tuple[Tensor, Tensor]:
    """Private: NeoX rotary embedding of q (b, l, hq, hd) and k (b, l, hk, hd), CUDA tensors
    of one float dtype, any strides, in one launch: (q_out, k_out), contiguous. positions
    (l,) int32/int64, inv_freq (hd/2,) float32; angle = float(pos)·inv; conj rotates by −angle."""
def _flash_attn_bwd_cuda(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
    dq_acc: Optional[Tensor],
    lse2: Tensor,
    dsum: Tensor,
    softmax_scale: float,
    left: int,
    right: int,
    softcap: float,
    alibi_slopes: Optional[Tensor] = None,
    dlse: Optional[Tensor] = None,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    deterministic: bool = False,
) -> None:
    """Private: CUDA flash-attention backward into caller-allocated dq, dk, dv (shapes of
    q, k, v) from the forward's out and lse (options normalised as for
    _flash_attn_fwd_cuda). Scratch, float32 contiguous, rows = b·sq or total_q: lse2,
    dsum (hq, rows); dq_acc (rows, hq, hd rounded up to 16) zero-filled, or None when
    deterministic (dQ without atomics, bit-identical run to run). dlse: the gradient of
    lse (or None). Varlen rows of dk/dv past the last sequence are not written."""
    ...


def selective_scan_fwd_ck(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    initial_state: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Training forward of selective_scan_fn: (out, last_state, checkpoints),
    checkpoints float32 (b, d, ceil(l / chunk), n) = the states before every chunk
    steps, for selective_scan_bwd. CPU: chunk 16, more for very large problems.
    CUDA: chunk 32 where the backward's fast kernel runs (n <= 16, time-varying
    B and C, groups of whole 32-channel blocks), else an empty (0,) tensor."""

def conv_selective_scan_check(
    x: Tensor,
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    activation: Optional[str] = None,
    return_last_state: bool = False,
    initial_state: Optional[Tensor] = None,
) -> Tuple[bool, bool, bool]:
    """conv_selective_scan_fwd's checks without running it: (delta_softplus, silu,
    return_last_state)."""

def conv_selective_scan_fwd(
    x: Tensor,
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    activation: Optional[str] = None,
    return_last_state: bool = False,
    initial_state: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Fused causal conv1d (+ SiLU with activation="silu"/"swish") and selective scan: selective_scan_fwd(causal_conv1d_fwd(x, conv_weight, conv_bias, activation=activation), delta, A, B, C, ...) without the conv's output in memory (x is (b, d, l), conv_weight (d, w) with 2 <= w <= 8, conv_bias (d,) or None; no conv initial/final states). out (b, d, l) in x's dtype, and with return_last_state (out, last_state (b, d, n) float32)."""
