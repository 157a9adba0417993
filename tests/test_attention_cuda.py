"""CUDA flash-attention forward (SPEC §3) through the private binding
``_core._flash_attn_fwd_cuda``, against a float64 reference written from SPEC's
formulas (mask, softcap, ALiBi, GQA, rows with no visible key).

Every GPU test is marked ``cuda`` and skipped without a usable GPU (``-m cuda``
selects them). The binding takes normalised options: ``left``/``right`` window
bounds with -1 = unbounded (causal: right = 0, bottom-right aligned), a resolved
``softmax_scale``, and caller-allocated ``out`` and ``lse`` (float32
(b, hq, sq); varlen (hq, total_q)). float32 inputs raise TypeError (the kernel
computes on float16/bfloat16 tensor cores).
"""

import math

import pytest

torch = pytest.importorskip("torch")
_core = pytest.importorskip("mamba_attention._core")

HAVE_CUDA = torch.cuda.is_available() and hasattr(_core, "_flash_attn_fwd_cuda")
needs_cuda = [pytest.mark.cuda,
              pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA GPU and torch with CUDA")]
fwd = getattr(_core, "_flash_attn_fwd_cuda", None)

TOL = {torch.bfloat16: 1e-2, torch.float16: 3e-3}
DTYPES = [torch.bfloat16, torch.float16]
NAN = float("nan")


# ------------------------------------------------------------------ reference

def attn_ref(q, k, v, scale, left, right, softcap=0.0, alibi=None):
    """float64 attention of one batched call: q (b, sq, hq, d), k/v (b, sk, hk, d);
    alibi (hq,) or (b, hq). Returns out (b, sq, hq, d) and lse (b, hq, sq)."""
    q, k, v = (t.double() for t in (q, k, v))
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    rep = hq // hk
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(sq, device=q.device)[:, None]
    j = torch.arange(sk, device=q.device)[None, :]
    diag = i + sk - sq
    if alibi is not None:
        slope = alibi.double().reshape(-1, hq) if alibi.dim() == 2 else alibi.double()[None, :]
        s = s - slope[:, :, None, None] * (diag - j).abs()
    vis = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if left >= 0:
        vis &= j >= diag - left
    if right >= 0:
        vis &= j <= diag + right
    s = s.masked_fill(~vis, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    p = torch.nan_to_num(p, nan=0.0)  # rows with no visible key: lse = -inf, p = 0
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    return out, lse


def rel_err(a, b):
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


def run_fwd(q, k, v, scale=None, left=-1, right=-1, softcap=0.0, alibi=None, with_lse=True):
    b, sq, hq, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.full(q.shape, NAN, dtype=q.dtype, device=q.device)
    lse = torch.full((b, hq, sq), NAN, dtype=torch.float32, device=q.device) if with_lse else None
    fwd(q, k, v, out, lse, scale, left, right, softcap, alibi)
    torch.cuda.synchronize()
    return out, lse


def make(b, sq, sk, hq, hk, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, sq, hq, d, device="cuda", generator=g).to(dtype)
    k = torch.randn(b, sk, hk, d, device="cuda", generator=g).to(dtype)
    v = torch.randn(b, sk, hk, d, device="cuda", generator=g).to(dtype)
    return q, k, v


def check(q, k, v, left=-1, right=-1, softcap=0.0, alibi=None, scale=None, lse_check=True):
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out, lse = run_fwd(q, k, v, scale, left, right, softcap, alibi)
    ref, ref_lse = attn_ref(q, k, v, scale, left, right, softcap, alibi)
    assert not torch.isnan(out).any(), "NaN (unwritten or bad arithmetic) in out"
    err = rel_err(out, ref)
    assert err <= TOL[q.dtype], f"rel L2 error {err:.2e} > {TOL[q.dtype]:.0e}"
    # Rows with no visible key: exactly zero output and lse = -inf.
    empty = torch.isinf(ref_lse)  # (b, hq, sq)
    if empty.any():
        o_bhq = out.permute(0, 2, 1, 3)
        assert (o_bhq[empty] == 0).all(), "rows with no visible key must output 0"
    if lse_check:
        assert not torch.isnan(lse).any(), "NaN in lse"
        assert torch.equal(torch.isinf(lse), empty), "lse = -inf exactly where no key is visible"
        fin = ~empty
        if fin.any():
            diff = (lse[fin].double() - ref_lse[fin]).abs()
            bound = 1e-3 * (1 + ref_lse[fin].abs())
            assert (diff <= bound).all(), f"lse error {diff.max().item():.2e}"
    return out, lse


# ------------------------------------------------------------------ parity sweeps

MASKS = [(-1, -1), (-1, 0), (0, 0), (3, 0), (1000, 0), (5, 7), (-1, 4), (16, -1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("left,right", MASKS)
@pytest.mark.parametrize("sq,sk", [(1, 1), (17, 17), (129, 67), (67, 129), (200, 333)])
def test_masks_and_lengths(dtype, left, right, sq, sk):
    if not HAVE_CUDA:
        pytest.skip("no CUDA")
    q, k, v = make(2, sq, sk, 4, 2, 64, dtype, seed=sq * 1000 + sk)
    check(q, k, v, left, right)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("d", [8, 16, 40, 64, 96, 128, 200, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims(dtype, d, causal):
    if not HAVE_CUDA:
        pytest.skip("no CUDA")
    q, k, v = make(2, 150, 150, 2, 1, d, dtype, seed=d)
    check(q, k, v, -1, 0 if causal else -1)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("hq,hk", [(4, 4), (6, 2), (8, 1)])
def test_gqa_mqa(dtype, hq, hk):
    if not HAVE_CUDA:
        pytest.skip("no CUDA")
    q, k, v = make(2, 97, 131, hq, hk, 64, dtype, seed=hq * 10 + hk)
    check(q, k, v, 20, 0)
    check(q, k, v, -1, -1)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("left,right", [(-1, -1), (-1, 0), (40, 0)])
def test_softcap(dtype, left, right):
    if not HAVE_CUDA:
        pytest.skip("no CUDA")
    q, k, v = make(2, 130, 170, 4, 2, 64, dtype, seed=7)
    # Large scale so the cap matters.
    check(q * 4, k, v, left, right, softcap=5.0)
    check(q, k, v, left, right, softcap=30.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("left,right", [(-1, -1), (-1, 0), (30, 3)])
def test_alibi(dtype, per_batch, left, right):
    if not HAVE_CUDA:
        pytest.skip("no CUDA")
    b, hq = 2, 4
    q, k, v = make(b, 120, 90, hq, 2, 64, dtype, seed=11)
    g = torch.Generator(device="cuda").manual_seed(3)
    shape = (b, hq) if per_batch else (hq,)
    slopes = torch.rand(shape, device="cuda", generator=g, dtype=torch.float32) * 0.5
    check(q, k, v, left, right, alibi=slopes)
    check(q, k, v, left, right, softcap=10.0, alibi=slopes)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
def test_no_visible_key_rows(dtype):
    if not HAVE_CUDA:
        pytest.skip("no CUDA")
    # sq > sk with causal: the first sq - sk rows see nothing.
    q, k, v = make(1, 200, 70, 2, 2, 64, dtype, seed=5)
    out, lse = check(q, k, v, -1, 0)
    assert (out[:, :130] == 0).all() and torch.isinf(lse[:, :, :130]).all()
    # A window that leaves some rows empty in the middle of a tile: left = 0,
    # right = -? (keys i+sk-sq only) with sq > sk.
    check(q, k, v, 0, 0)
    # Window entirely past the keys.
    q2, k2, v2 = make(1, 64, 10, 2, 1, 64, dtype, seed=6)
    check(q2, k2, v2, 0, 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("d", [64, 128])
def test_long_sequences_and_windows(dtype, d):
    """Many key tiles: fully visible tiles (no per-element mask) and skipped ones."""
    if not HAVE_CUDA:
        pytest.skip("no CUDA")
    q, k, v = make(1, 1100, 1300, 4, 2, d, dtype, seed=d + 1)
    for left, right in [(-1, -1), (-1, 0), (255, 0), (300, 77)]:
        check(q, k, v, left, right)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_packed_qkv_and_unaligned(dtype, d):
    """q sliced from packed qkv (non-contiguous, aligned rows), and rows not
    16-byte aligned (the kernel's scalar-load path) with an odd-strided out."""
    if not HAVE_CUDA:
        pytest.skip("no CUDA")
    b, s, h = 2, 77, 4
    g = torch.Generator(device="cuda").manual_seed(d)
    qkv = torch.randn(b, s, 3, h, d, device="cuda", generator=g).to(dtype)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert not q.is_contiguous()
    check(q, k, v, -1, 0)
    wide = torch.randn(b, s, h, d + 4, device="cuda", generator=g).to(dtype)
    qu = wide[..., 2:2 + d]  # row starts 4 bytes past 16-byte alignment
    scale = 1.0 / math.sqrt(d)
    out_buf = torch.full((b, s, h, d + 1), NAN, dtype=dtype, device="cuda")
    out = out_buf[..., :d]  # odd row stride: pairs not 4-byte aligned
    lse = torch.full((b, h, s), NAN, device="cuda")
    fwd(qu, k, v, out, lse, scale, 10, 0, 0.0, None)
    torch.cuda.synchronize()
    ref, ref_lse = attn_ref(qu, k, v, scale, 10, 0)
    assert rel_err(out, ref) <= TOL[dtype]
    assert torch.isnan(out_buf[..., d]).all(), "wrote past the head dim"
    assert (lse.double() - ref_lse).abs().max().item() < 1e-3 * (1 + ref_lse.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
def test_varlen(dtype):
    if not HAVE_CUDA:
        pytest.skip("no CUDA")
    lens_q = [1, 70, 129, 0, 33]
    lens_k = [5, 70, 100, 7, 200]
    hq, hk, d = 4, 2, 64
    g = torch.Generator(device="cuda").manual_seed(9)
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, hq, d, device="cuda", generator=g).to(dtype)
    k = torch.randn(tk, hk, d, device="cuda", generator=g).to(dtype)
    v = torch.randn(tk, hk, d, device="cuda", generator=g).to(dtype)
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device="cuda")
    scale = 0.1
    slopes = torch.rand(hq, device="cuda", generator=g) * 0.2
    for left, right, alibi in [(-1, -1, None), (-1, 0, None), (20, 0, slopes)]:
        out = torch.full_like(q, NAN)
        lse = torch.full((hq, tq), NAN, device="cuda")
        fwd(q, k, v, out, lse, scale, left, right, 0.0, alibi, cu_q, cu_k, max(lens_q), max(lens_k))
        torch.cuda.synchronize()
        oq = ok = 0
        for lq, lk in zip(lens_q, lens_k):
            if lq:
                ref, ref_lse = attn_ref(q[None, oq:oq + lq], k[None, ok:ok + lk], v[None, ok:ok + lk],
                                        scale, left, right, 0.0, alibi)
                assert rel_err(out[oq:oq + lq], ref[0]) <= TOL[dtype]
                got = lse[:, oq:oq + lq].double()
                assert torch.equal(torch.isinf(got), torch.isinf(ref_lse[0]))
                fin = ~torch.isinf(got)
                assert ((got[fin] - ref_lse[0][fin]).abs() <= 1e-3 * (1 + ref_lse[0][fin].abs())).all()
            oq += lq
            ok += lk
        assert not torch.isnan(out).any()


def test_lse_optional_deterministic_and_stream():
    if not HAVE_CUDA:
        pytest.skip("no CUDA")
    q, k, v = make(2, 300, 300, 4, 4, 128, torch.bfloat16, seed=21)
    a, _ = run_fwd(q, k, v, left=-1, right=0, with_lse=False)
    b, _ = run_fwd(q, k, v, left=-1, right=0, with_lse=True)
    assert torch.equal(a, b), "the forward must be deterministic"
    s = torch.cuda.Stream()
    out = torch.full_like(q, NAN)
    with torch.cuda.stream(s):
        torch.cuda._sleep(int(2e7)) if hasattr(torch.cuda, "_sleep") else None
        q2 = q * 1  # produced on s
        fwd(q2, k, v, out, None, 1 / math.sqrt(128), -1, 0, 0.0, None)
    s.synchronize()
    assert torch.equal(out, a), "must run on the current stream"


def test_large_tile_counts():
    """Several (b, h) and many query tiles; GQA groups of 4; bf16 hd128 causal."""
    if not HAVE_CUDA:
        pytest.skip("no CUDA")
    q, k, v = make(2, 2048, 2048, 8, 2, 128, torch.bfloat16, seed=33)
    check(q, k, v, -1, 0)
    check(q, k, v, 511, 0)


@pytest.mark.parametrize("cfg", ["w8m1n64", "w4m2n32"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
def test_hd128_configurations(cfg, dtype, monkeypatch):
    """Every compiled hd-128 tiling (MAMBA_ATTENTION_FA_CFG picks one)."""
    if not HAVE_CUDA:
        pytest.skip("no CUDA")
    monkeypatch.setenv("MAMBA_ATTENTION_FA_CFG", cfg)
    q, k, v = make(2, 333, 401, 4, 2, 128, dtype, seed=44)
    for left, right in [(-1, -1), (-1, 0), (100, 0), (50, 9)]:
        check(q, k, v, left, right)
    check(q, k, v, 60, 0, softcap=20.0, alibi=torch.rand(4, device="cuda") * 0.1)


# ------------------------------------------------------------------ errors

def test_errors_cpu_tensors():
    if fwd is None:
        pytest.skip("binding not built")
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(TypeError, match="q"):
        fwd(q, q, q, q.clone(), None, 1.0, -1, -1, 0.0, None)


@pytest.mark.parametrize("case", ["float32", "hd12", "hd264", "gqa", "shape", "window", "lse", "varlen"])
def test_errors_cuda(case):
    if not HAVE_CUDA:
        pytest.skip("no CUDA")
    bf = torch.bfloat16
    q, k, v = make(1, 8, 8, 4, 2, 64, bf)
    out = torch.empty_like(q)
    args = dict(lse=None, left=-1, right=-1)
    if case == "float32":
        q, k, v, out = q.float(), k.float(), v.float(), out.float()
        exc, msg = TypeError, "float32"
    elif case == "hd12":
        q, k, v = make(1, 8, 8, 4, 2, 12, bf)
        out, exc, msg = torch.empty_like(q), ValueError, "head dim"
    elif case == "hd264":
        q, k, v = make(1, 8, 8, 4, 2, 264, bf)
        out, exc, msg = torch.empty_like(q), ValueError, "head dim"
    elif case == "gqa":
        q, k, v = make(1, 8, 8, 3, 2, 64, bf)
        out, exc, msg = torch.empty_like(q), ValueError, "hk"
    elif case == "shape":
        v = v[:, :4]
        exc, msg = ValueError, "v"
    elif case == "window":
        args.update(left=-2)
        exc, msg = ValueError, "window"
    elif case == "lse":
        args.update(lse=torch.empty(1, 4, 9, device="cuda"))
        exc, msg = ValueError, "lse"
    else:
        cu = torch.tensor([0, 8], dtype=torch.int32, device="cuda")
        with pytest.raises(ValueError, match="cu_seqlens"):
            fwd(q[0], k[0], v[0], out[0], None, 1.0, -1, -1, 0.0, None, cu, None, 8, 8)
        return
    with pytest.raises(exc, match=msg):
        fwd(q, k, v, out, args["lse"], 1.0, args["left"], args["right"], 0.0, None)


for _name, _obj in list(globals().items()):
    if _name.startswith("test_") and _name not in ("test_errors_cpu_tensors",):
        for _m in needs_cuda:
            _obj = _m(_obj)
        globals()[_name] = _obj
