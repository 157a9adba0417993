"""The hybrid modules (SPEC §5): MambaAttention against the documents' snippet,
SlidingWindowAttention against a float64 reference (RoPE + window mask), ring-buffer
decoding, RMSNorm / GatedMLP, and Samba's token-by-token decoding against its
parallel forward, past the window length."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mamba_attention._core")

from conftest import assert_close, sync, target_device  # noqa: E402

from torch import nn  # noqa: E402

from mamba_attention.nn import (GatedMLP, MambaAttention, RMSNorm, Samba, SambaBlock,  # noqa: E402
                                SambaConfig, SlidingWindowAttention, SAMBA_CONFIGS)
from mamba_attention.nn.attention import apply_rotary  # noqa: E402

pytestmark = pytest.mark.usefixtures("target")


class Snippet(nn.Module):
    """The documents' layer, verbatim."""

    def __init__(self, hidden_size):
        super().__init__()
        self.global_attention = nn.MultiheadAttention(hidden_size, num_heads=8)
        self.local_attention = nn.MultiheadAttention(hidden_size, num_heads=8)

    def forward(self, x):
        global_out, _ = self.global_attention(x, x, x)
        local_out, _ = self.local_attention(x, x, x)
        return global_out + local_out


def _dtype():
    """float32 on the CPU; bfloat16 on the GPU (the CUDA attention kernel's dtypes)."""
    return torch.bfloat16 if target_device() == "cuda" else torch.float32


def _tol_name():
    return "bfloat16" if target_device() == "cuda" else "float32"


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("L,N,E", [(1, 1, 64), (37, 3, 64), (130, 2, 128)])
def test_mamba_attention_matches_snippet(L, N, E, batch_first):
    dev, dt = target_device(), _dtype()
    torch.manual_seed(0)
    snip = Snippet(E).to(dev)
    ours = MambaAttention(E, batch_first=batch_first).to(dev)
    ours.load_state_dict(snip.state_dict(), strict=True)
    assert set(ours.state_dict()) == set(snip.state_dict())
    x = torch.randn(L, N, E, device=dev)
    want = snip.double()(x.double())
    xin = x.transpose(0, 1) if batch_first else x
    got = ours.to(dt)(xin.to(dt))
    sync()
    if batch_first:
        got = got.transpose(0, 1)
    assert got.shape == want.shape and got.dtype == dt
    assert_close(got, want, _tol_name())


def test_mamba_attention_grads_match_snippet():
    dev, dt = target_device(), _dtype()
    torch.manual_seed(1)
    snip = Snippet(64).to(dev).double()
    ours = MambaAttention(64).to(dev)
    ours.load_state_dict(snip.state_dict(), strict=True)
    ours = ours.to(dt)
    x = torch.randn(21, 2, 64, device=dev, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().to(dt).requires_grad_()
    gy = torch.randn(21, 2, 64, device=dev, dtype=torch.float64)
    (snip(x) * gy).sum().backward()
    (ours(x2).double() * gy).sum().backward()
    sync()
    assert_close(x2.grad, x.grad, _tol_name(), "dx")
    for (n1, p1), (n2, p2) in zip(sorted(snip.named_parameters()), sorted(ours.named_parameters())):
        assert n1 == n2
        assert_close(p2.grad, p1.grad, _tol_name(), f"d{n1}")


def _masked_mha_ref(branch, x, causal, window):
    """float64 multi-head attention of one branch with the |i−j| ≤ w (causal: 0 ≤ i−j ≤ w)
    mask, from the branch's parameters (x (N, L, E))."""
    n, l, e = x.shape
    h = branch.num_heads
    w_in, b_in = branch.in_proj_weight.double(), branch.in_proj_bias.double()
    qkv = (x.double() @ w_in.T + b_in).view(n, l, 3, h, e // h)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    s = q @ k.transpose(-1, -2) / math.sqrt(e // h)
    i = torch.arange(l, device=x.device)
    dist = i[:, None] - i[None, :]
    mask = torch.ones(l, l, dtype=torch.bool, device=x.device)
    if causal:
        mask &= dist >= 0
    if window is not None:
        mask &= dist.abs() <= window
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    o = (p @ v).transpose(1, 2).reshape(n, l, e)
    return o @ branch.out_proj.weight.double().T + branch.out_proj.bias.double()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [0, 3, 100])
def test_mamba_attention_window(causal, window):
    dev, dt = target_device(), _dtype()
    torch.manual_seed(2)
    m = MambaAttention(64, window_size=window, causal=causal, batch_first=True).to(dev)
    x = torch.randn(2, 45, 64, device=dev)
    want = (_masked_mha_ref(m.global_attention, x, causal, None)
            + _masked_mha_ref(m.local_attention, x, causal, window))
    got = m.to(dt)(x.to(dt))
    sync()
    assert_close(got, want, _tol_name())


def test_mamba_attention_errors():
    with pytest.raises(ValueError, match="num_heads"):
        MambaAttention(60, num_heads=8)
    with pytest.raises(ValueError, match="window_size"):
        MambaAttention(64, window_size=-1)
    m = MambaAttention(64)
    with pytest.raises(ValueError, match="x: expected last dimension hidden_size = 64"):
        m(torch.randn(3, 2, 32))
    with pytest.raises(ValueError, match="x: expected a 3-d tensor"):
        m(torch.randn(3, 64))


def test_mamba_attention_compiles():
    if target_device() == "cuda":
        pytest.skip("CPU check")
    torch.manual_seed(3)
    m = MambaAttention(64, window_size=4, causal=True)
    x = torch.randn(9, 2, 64, requires_grad=True)
    f = torch.compile(m, fullgraph=True, backend="aot_eager")
    got = f(x)
    want = m(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- sliding-window attention


def _swa_ref(m, x):
    """float64 reference of SlidingWindowAttention: projections, NeoX RoPE, window mask."""
    b, l, _ = x.shape
    hd, hq, hk, w = m.head_dim, m.n_heads, m.n_kv_heads, m.window_size
    xd = x.double()
    q = (xd @ m.q_proj.weight.double().T).view(b, l, hq, hd)
    k = (xd @ m.k_proj.weight.double().T).view(b, l, hk, hd)
    v = (xd @ m.v_proj.weight.double().T).view(b, l, hk, hd)
    pos = torch.arange(l, dtype=torch.float64, device=x.device)
    inv = m.rope_base ** (-torch.arange(hd // 2, dtype=torch.float64, device=x.device) * 2 / hd)
    ang = pos[:, None] * inv[None]
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]

    def rot(t):
        t1, t2 = t[..., :hd // 2], t[..., hd // 2:]
        return torch.cat((t1 * cos - t2 * sin, t2 * cos + t1 * sin), -1)

    q, k = rot(q), rot(k)
    k = k.repeat_interleave(hq // hk, dim=2)
    v = v.repeat_interleave(hq // hk, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(hd)
    i = torch.arange(l, device=x.device)
    dist = i[:, None] - i[None, :]
    mask = (dist >= 0) & (dist <= w - 1)
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    o = torch.einsum("bhij,bjhd->bihd", p, v).reshape(b, l, hq * hd)
    return o @ m.out_proj.weight.double().T


@pytest.mark.parametrize("hq,hk", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("window,l", [(1, 7), (5, 23), (64, 40)])
def test_swa_forward(hq, hk, window, l):
    dev, dt = target_device(), _dtype()
    torch.manual_seed(4)
    m = SlidingWindowAttention(48, hq, hk, head_dim=16, window_size=window).to(dev)
    x = torch.randn(2, l, 48, device=dev)
    want = _swa_ref(m, x)
    got = m.to(dt)(x.to(dt))
    sync()
    assert_close(got, want, _tol_name())


def test_rotary_matches_complex_rotation():
    """NeoX RoPE is the rotation of (x₁ + i·x₂) by position·θ."""
    torch.manual_seed(5)
    x = torch.randn(1, 6, 2, 8, dtype=torch.float64)
    pos = torch.arange(3, 9)
    got = apply_rotary(x.float(), pos).double()
    inv = 10000.0 ** (-torch.arange(4, dtype=torch.float64) * 2 / 8)
    z = torch.complex(x[..., :4], x[..., 4:]) * torch.polar(
        torch.ones(6, 4, dtype=torch.float64), pos.double()[:, None] * inv)[None, :, None]
    want = torch.cat((z.real, z.imag), -1)
    assert (got - want).abs().max() < 1e-5


def test_swa_decoding_matches_forward_past_window():
    dev, dt = target_device(), _dtype()
    torch.manual_seed(6)
    m = SlidingWindowAttention(32, 4, 2, head_dim=8, window_size=5).to(dev).to(dt)
    x = torch.randn(3, 17, 32, device=dev, dtype=dt)
    with torch.no_grad():
        full = m(x)
        cache = m.allocate_inference_cache(3, 17)
        steps = torch.cat([m.step(x[:, t:t + 1], cache) for t in range(17)], 1)
    sync()
    assert tuple(cache.k.shape) == (3, 5, 2, 8)  # window entries, not context
    assert_close(steps, full.double(), _tol_name(), "decode")


# ---------------------------------------------------------------- norm, MLP, Samba


def test_rmsnorm_and_mlp_modules():
    dev = target_device()
    torch.manual_seed(7)
    norm = RMSNorm(40, eps=1e-5).to(dev)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x, r = torch.randn(3, 5, 40, device=dev), torch.randn(3, 5, 40, device=dev)
    y, s = norm(x, r, prenorm=True)
    sd = (x + r).double()
    want = sd / torch.sqrt((sd * sd).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    sync()
    assert_close(y, want, "float32")
    assert_close(s, sd, "float32", "residual")
    mlp = GatedMLP(40, 96).to(dev)
    want = mlp.down(torch.nn.functional.silu(mlp.gate(x)) * mlp.up(x))
    assert_close(mlp(x), want.double(), "float32", "mlp")
    assert GatedMLP(40).gate.out_features == 192  # 4·40 rounded up to 64


def _tiny_samba(dev, dt, window=4):
    cfg = SambaConfig(d_model=32, n_blocks=2, n_heads=4, n_kv_heads=2, head_dim=8,
                      window_size=window, d_state=8, vocab_size=50, mlp_hidden=64)
    torch.manual_seed(8)
    return Samba(cfg).to(dev).to(dt)


def test_samba_decoding_matches_forward_past_window():
    dev, dt = target_device(), _dtype()
    model = _tiny_samba(dev, dt, window=4).eval()
    ids = torch.randint(0, 50, (2, 11), device=dev)
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_inference_cache(2)
        steps = torch.cat([model.step(ids[:, t:t + 1], cache) for t in range(11)], 1)
    sync()
    assert full.shape == (2, 11, 50)
    assert_close(steps, full.double(), _tol_name(), "decode")


def test_samba_generate_and_backward():
    dev, dt = target_device(), _dtype()
    model = _tiny_samba(dev, dt)
    ids = torch.randint(0, 50, (2, 6), device=dev)
    out = model.generate(ids, 5)
    assert out.shape == (2, 11) and torch.equal(out[:, :6], ids)
    # Greedy tokens agree with argmax of the parallel forward over the generated text.
    with torch.no_grad():
        logits = model(out[:, :-1])
    assert torch.equal(logits[:, 5:].argmax(-1), out[:, 6:]) or dt != torch.float32
    model.train()
    loss = model(ids).float().logsumexp(-1).mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def test_samba_configs():
    assert set(SAMBA_CONFIGS) == {"samba-421m", "samba-1.3b", "samba-1.7b", "samba-3.8b"}
    c = SAMBA_CONFIGS["samba-1.7b"]
    assert (c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.window_size, c.d_state) == \
        (2048, 32, 4, 64, 2048, 16)
    m = Samba.from_config("samba-421m", n_blocks=1, vocab_size=64, device="meta")
    assert isinstance(m.blocks[0], SambaBlock)
    with pytest.raises(ValueError, match="name"):
        Samba.from_config("samba-9b")


def test_numpy_is_not_needed_here():
    assert np is not None


# ------------------------------------------------------ decoding on CUDA (graphs)

from conftest import cuda_only  # noqa: E402


@cuda_only
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_ring_cache_cuda_stream(target, dt):
    """The CUDA ring paths (one token: write-then-attend over the ring with the
    position on the device; several: the torch formula) over a 60-token stream with
    window 8 equal sliding-window attention over the whole stream, with and without
    softcap/ALiBi; the device position follows ``pos``."""
    from mamba_attention import SlidingWindowKVCache, flash_attn_func

    b, total, hq, hk, hd, w = 2, 60, 6, 2, 16, 8
    torch.manual_seed(11)
    q, k, v = (torch.randn(b, total, h, hd, device="cuda").to(dt) for h in (hq, hk, hk))
    slopes = torch.rand(hq, device="cuda")
    for kw in (dict(), dict(alibi_slopes=slopes, softcap=3.0, softmax_scale=0.3)):
        cache = SlidingWindowKVCache(b, w, hk, hd, dtype=dt, device="cuda")
        outs, t = [], 0
        for n in [1, 1, 1, 3, 1, 9, 1, 1, 2] * 10:
            n = min(n, total - t)
            if n == 0:
                break
            outs.append(cache.append_and_attend(q[:, t:t + n], k[:, t:t + n], v[:, t:t + n], **kw))
            t += n
            assert cache.pos == t and int(cache._pos_t) == t
        got = torch.cat(outs, 1)
        ckw = {**kw, "alibi_slopes": slopes.cpu()} if kw else {}
        want = flash_attn_func(q.cpu().float(), k.cpu().float(), v.cpu().float(), causal=True,
                               window_size=(w - 1, 0), **ckw)
        assert_close(got, want.double(), "float32" if dt == torch.float32 else "bfloat16", "ring")
    with pytest.raises(TypeError, match="k"):
        cache.append_and_attend(q[:, :1], k[:, :1].half(), v[:, :1])
    with pytest.raises(ValueError, match="k"):
        cache.append_and_attend(q[:, :1], k[:, :1, :1], v[:, :1])
    assert cache.pos == t
    cache.pos = 3
    assert int(cache._pos_t) == 3 and cache.positions(2).tolist() == [3, 4]


@cuda_only
@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])  # the CUDA attention dtypes
def test_samba_cuda_graph_step_matches_eager_and_forward(target, dt):
    """A step replayed from a CUDA graph equals ``Samba.step`` and the parallel
    forward, past the window; capturing leaves the cache untouched."""
    model = _tiny_samba("cuda", dt, window=4).eval()
    ids = torch.randint(0, 50, (3, 13), device="cuda")
    with torch.no_grad():
        full = model(ids)
        eager_cache, cache = model.allocate_inference_cache(3), model.allocate_inference_cache(3)
        step = model.capture_step(cache)
        assert all(blk[2].pos == 0 and int(blk[2]._pos_t) == 0 for blk in cache)
        assert all(not blk[1].any() and not blk[2].k.any() for blk in cache)
        got, eager = [], []
        for t in range(13):
            got.append(step(ids[:, t:t + 1]))
            eager.append(model.step(ids[:, t:t + 1], eager_cache))
        got, eager = torch.cat(got, 1), torch.cat(eager, 1)
    sync()
    assert all(blk[2].pos == 13 and int(blk[2]._pos_t) == 13 for blk in cache)
    tol = "float16" if dt == torch.float16 else "bfloat16"
    assert_close(got, eager.double(), tol, "graph vs eager")
    assert_close(got, full.double(), tol, "graph vs forward")
    with pytest.raises(ValueError, match="input_ids"):
        step(ids[:2, :1])
    out = model.generate(ids[:, :5], 4)  # graphs by default on CUDA
    assert torch.equal(out, model.generate(ids[:, :5], 4, cuda_graph=False))


def test_samba_graph_step_needs_cuda():
    model = _tiny_samba("cpu", torch.float32)
    with pytest.raises(ValueError, match="model"):
        model.capture_step(model.allocate_inference_cache(1))
    with pytest.raises(ValueError, match="cuda_graph"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 1, cuda_graph=True)


# ------------------------------------------------------------------ fused rotary

def _rot64(x, pos, base=10000.0, sign=1.0):
    hd = x.shape[-1]
    inv = base ** (-torch.arange(hd // 2, dtype=torch.float64) * 2 / hd)
    ang = pos.double().cpu()[:, None] * inv[None] * sign
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
    xd = x.double().cpu()
    x1, x2 = xd[..., :hd // 2], xd[..., hd // 2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)


@pytest.mark.parametrize("dt", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,l,hq,hk,hd", [(1, 1, 1, 1, 2), (2, 17, 6, 2, 16), (3, 40, 4, 1, 64),
                                          (1, 9, 2, 2, 256)])
def test_apply_rotary_qk(dt, b, l, hq, hk, hd):
    """apply_rotary_qk (one CUDA kernel for q and k; the torch formula on the CPU)
    against the float64 rotation, from strided projection views, with gradients
    (the rotation by the opposite angle)."""
    from mamba_attention.nn.attention import apply_rotary_qk

    dev = target_device()
    if dev == "cpu" and dt != torch.float32:
        pytest.skip("the CPU path is the torch formula; dtypes are covered on CUDA")
    torch.manual_seed(12)
    proj = torch.randn(b, l, (hq + 2 * hk) * hd, device=dev).to(dt)
    q = proj[..., :hq * hd].view(b, l, hq, hd).requires_grad_(False)
    k = proj[..., hq * hd:(hq + hk) * hd].view(b, l, hk, hd)
    pos = torch.randint(0, 300, (l,), device=dev)  # float32 angles: see the next test
    tol = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dt]
    qo, ko = apply_rotary_qk(q, k, pos)
    sync()
    assert qo.dtype == dt and qo.is_contiguous() and qo.shape == q.shape
    assert_close(qo, _rot64(q, pos), tol, "q")
    assert_close(ko, _rot64(k, pos), tol, "k")
    # Gradients: d/dx <rot(x), g> = rot(g, −angle).
    qg, kg = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    qo, ko = apply_rotary_qk(qg, kg, pos.int())  # int32 positions too
    torch.autograd.backward((qo, ko), (gq, gk))
    sync()
    assert_close(qg.grad, _rot64(gq, pos, sign=-1.0), tol, "dq")
    assert_close(kg.grad, _rot64(gk, pos, sign=-1.0), tol, "dk")


def test_apply_rotary_qk_long_positions_and_ops():
    """At positions past 2^16 the float32 angle rounding is the formula's own: the
    kernel equals the torch formula (apply_rotary) to float32 rounding. opcheck and
    torch.compile pass."""
    from mamba_attention._autograd import rotary_qk_op
    from mamba_attention.nn.attention import apply_rotary_qk, rotary_inv_freq

    dev = target_device()
    torch.manual_seed(13)
    q, k = torch.randn(2, 33, 4, 32, device=dev), torch.randn(2, 33, 2, 32, device=dev)
    pos = torch.arange(70000, 70033, device=dev)
    qo, ko = apply_rotary_qk(q, k, pos)
    assert (qo - apply_rotary(q, pos)).abs().max() < 1e-5
    assert (ko - apply_rotary(k, pos)).abs().max() < 1e-5
    inv = rotary_inv_freq(32, device=dev)
    for conj in (False, True):
        torch.library.opcheck(rotary_qk_op, (q.requires_grad_(), k.requires_grad_(), pos, inv,
                                             conj))
    # Compiled, θ may be computed by a generated kernel (pow rounding differs by an
    # ulp, which large positions amplify): compare at small positions.
    small = pos - 70000
    f = torch.compile(lambda a, b: apply_rotary_qk(a, b, small), fullgraph=True)
    qc, kc = f(q.detach(), k.detach())
    qe, ke = apply_rotary_qk(q.detach(), k.detach(), small)
    assert (qc - qe).abs().max() < 1e-5 and (kc - ke).abs().max() < 1e-5


def test_rotary_cuda_errors():
    from mamba_attention import _core

    q, k = torch.randn(1, 3, 2, 8), torch.randn(1, 3, 1, 8)
    pos, inv = torch.arange(3), torch.ones(4)
    with pytest.raises(ValueError, match="q: .*CUDA"):
        _core._rotary_cuda(q, k, pos, inv, False)
    if target_device() != "cuda":
        return
    q, k, pos, inv = q.cuda(), k.cuda(), pos.cuda(), inv.cuda()
    with pytest.raises(TypeError, match="positions"):
        _core._rotary_cuda(q, k, pos.float(), inv, False)
    with pytest.raises(ValueError, match="k"):
        _core._rotary_cuda(q, k[:, :2], pos, inv, False)
    with pytest.raises(TypeError, match="k"):
        _core._rotary_cuda(q, k.half(), pos, inv, False)
    with pytest.raises(ValueError, match="inv_freq"):
        _core._rotary_cuda(q, k, pos, inv[:3], False)
    with pytest.raises(ValueError, match="head_dim"):
        _core._rotary_cuda(q[..., :7], k[..., :7], pos, inv, False)
