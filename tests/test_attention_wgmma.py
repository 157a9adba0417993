"""The sm_90a (wgmma) CUDA flash-attention forward (kernels/flash_attn_fwd_wgmma.cu).

On a compute capability 9.0 GPU, ``_core._flash_attn_fwd_cuda`` routes float16 /
bfloat16 calls with head dim 128, aligned rows, no softcap / ALiBi / varlen to the
wgmma kernel (src/cuda/attention_wgmma.rs); ``MAMBA_ATTENTION_FA_WGMMA=0`` sends
them to the mma.sync kernel. These tests use shapes that take the wgmma path
(odd lengths, sq != sk, windows, GQA/MQA, tile-boundary lengths around the
kernel's 128-row / 128-key tiles, long sequences) and check them against the
float64 reference of SPEC §3 and against the mma.sync path. On other GPUs they
run through the mma.sync kernel and still check the reference.
"""

import math

import pytest

torch = pytest.importorskip("torch")
_core = pytest.importorskip("mamba_attention._core")

from test_attention_cuda import (DTYPES, HAVE_CUDA, NAN, TOL, attn_ref, check, fwd,  # noqa: E402
                                 make, rel_err, run_fwd)

needs_cuda = [pytest.mark.cuda,
              pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA GPU and torch with CUDA")]
pytestmark = needs_cuda

D = 128
MASKS = [(-1, -1), (-1, 0), (0, 0), (5, 0), (127, 0), (128, 0), (300, 0), (2047, 0), (9, 200), (-1, 130)]
LENGTHS = [(1, 1), (17, 17), (127, 128), (128, 128), (129, 129), (129, 67), (67, 129), (200, 333),
           (256, 255), (300, 1000)]


@pytest.fixture(autouse=True)
def _wgmma_on(monkeypatch):
    monkeypatch.delenv("MAMBA_ATTENTION_FA_WGMMA", raising=False)
    monkeypatch.delenv("MAMBA_ATTENTION_FA_CFG", raising=False)


def mma_sync(monkeypatch, q, k, v, left, right, scale=None):
    monkeypatch.setenv("MAMBA_ATTENTION_FA_WGMMA", "0")
    try:
        return run_fwd(q, k, v, scale, left, right)
    finally:
        monkeypatch.delenv("MAMBA_ATTENTION_FA_WGMMA")


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
def test_uniform_softmax_checks_pv(dtype):
    """A tiny scale makes the softmax uniform: out = mean of the visible V rows
    (isolates O += P·V and V's transposed descriptor from S = Q·Kᵀ)."""
    q, k, v = make(1, 128, 128, 2, 2, D, dtype, seed=1)
    check(q, k, v, -1, -1, scale=1e-6)
    check(q, k, v, -1, 0, scale=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
def test_one_tile_checks_qk(dtype):
    """One 128 x 128 tile, large scale (the softmax follows S closely)."""
    q, k, v = make(1, 128, 128, 2, 2, D, dtype, seed=2)
    check(q, k, v, -1, -1, scale=0.5)
    check(q, k, v, -1, -1)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("left,right", MASKS)
@pytest.mark.parametrize("sq,sk", LENGTHS)
def test_masks_and_lengths(dtype, left, right, sq, sk):
    q, k, v = make(2, sq, sk, 4, 2, D, dtype, seed=sq * 1000 + sk + left)
    check(q, k, v, left, right)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("hq,hk", [(8, 8), (8, 2), (8, 1), (6, 3)])
@pytest.mark.parametrize("left,right", [(-1, -1), (-1, 0), (100, 0)])
def test_gqa_mqa(dtype, hq, hk, left, right):
    q, k, v = make(2, 257, 385, hq, hk, D, dtype, seed=hq * 10 + hk)
    check(q, k, v, left, right)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("s", [4096, 4099])
@pytest.mark.parametrize("left,right", [(-1, -1), (-1, 0), (2047, 0), (1000, 300)])
def test_long_sequences(dtype, s, left, right):
    q, k, v = make(1, s, s, 2, 1, D, dtype, seed=s + left)
    check(q, k, v, left, right)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
def test_no_visible_key_rows(dtype):
    q, k, v = make(1, 300, 70, 2, 2, D, dtype, seed=5)
    out, lse = check(q, k, v, -1, 0)
    assert (out[:, :230] == 0).all() and torch.isinf(lse[:, :, :230]).all()
    check(q, k, v, 0, 0)
    q2, k2, v2 = make(1, 200, 10, 2, 1, D, dtype, seed=6)
    check(q2, k2, v2, 0, 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("left,right", [(-1, -1), (-1, 0), (200, 0), (50, 9)])
def test_matches_the_mma_sync_path(dtype, left, right, monkeypatch):
    q, k, v = make(2, 701, 901, 8, 2, D, dtype, seed=17)
    a, la = run_fwd(q, k, v, None, left, right)
    b, lb = mma_sync(monkeypatch, q, k, v, left, right)
    assert rel_err(a, b) <= TOL[dtype] / 2
    fin = ~torch.isinf(lb)
    assert torch.equal(torch.isinf(la), torch.isinf(lb))
    assert (la[fin] - lb[fin]).abs().max().item() < 1e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
def test_packed_qkv_odd_out_stride_and_scale(dtype):
    """q/k/v sliced from packed qkv (aligned, non-contiguous); out with an odd
    row stride (2-byte stores); an explicit scale; lse not requested."""
    b, s, h = 2, 333, 4
    g = torch.Generator(device="cuda").manual_seed(3)
    qkv = torch.randn(b, s, 3, h, D, device="cuda", generator=g).to(dtype)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    check(q, k, v, -1, 0, scale=0.05)
    out_buf = torch.full((b, s, h, D + 1), NAN, dtype=dtype, device="cuda")
    out = out_buf[..., :D]
    fwd(q, k, v, out, None, 0.2, 40, 0, 0.0, None)
    torch.cuda.synchronize()
    ref, _ = attn_ref(q, k, v, 0.2, 40, 0)
    assert rel_err(out, ref) <= TOL[dtype]
    assert torch.isnan(out_buf[..., D]).all(), "wrote past the head dim"


def test_deterministic_and_lse_optional():
    q, k, v = make(2, 1000, 1000, 4, 1, D, torch.bfloat16, seed=21)
    a, _ = run_fwd(q, k, v, left=-1, right=0, with_lse=False)
    b, _ = run_fwd(q, k, v, left=-1, right=0, with_lse=True)
    assert torch.equal(a, b)


def test_falls_back_where_not_covered():
    """softcap / ALiBi / unaligned rows keep using the mma.sync kernel (still right)."""
    q, k, v = make(1, 300, 300, 4, 2, D, torch.bfloat16, seed=8)
    check(q, k, v, -1, 0, softcap=20.0)
    check(q, k, v, -1, 0, alibi=torch.rand(4, device="cuda") * 0.1)
    wide = torch.randn(1, 300, 4, D + 4, device="cuda").to(torch.bfloat16)
    qu = wide[..., 2:2 + D]
    out = torch.full_like(q, NAN)
    fwd(qu, k, v, out, None, 1 / math.sqrt(D), -1, 0, 0.0, None)
    torch.cuda.synchronize()
    ref, _ = attn_ref(qu, k, v, 1 / math.sqrt(D), -1, 0)
    assert rel_err(out, ref) <= TOL[torch.bfloat16]
