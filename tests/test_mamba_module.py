"""mamba_attention.nn.Mamba (SPEC §5): parameters and initialisation of mamba_ssm's
Mamba, forward / gradient parity with a float64 plain-PyTorch reference written from
the Mamba equations (tests/reference.py), decoding with step / inference_params."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import cuda_skip_reason  # noqa: E402
from reference import TOL, mamba_layer_ref, mamba_ref_state_dict, rel_err  # noqa: E402

from mamba_attention.nn import InferenceParams, Mamba  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def mamba_ssm_param_shapes(d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto",
                           conv_bias=True, bias=False):
    """The parameters of mamba_ssm.modules.mamba_simple.Mamba, written out by hand
    (name -> shape, in its registration order)."""
    d = int(expand * d_model)
    r = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
    names = [("A_log", (d, d_state)), ("D", (d,)), ("in_proj.weight", (2 * d, d_model))]
    if bias:
        names.append(("in_proj.bias", (2 * d,)))
    names.append(("conv1d.weight", (d, 1, d_conv)))
    if conv_bias:
        names.append(("conv1d.bias", (d,)))
    names += [("x_proj.weight", (r + 2 * d_state, d)), ("dt_proj.weight", (d, r)),
              ("dt_proj.bias", (d,)), ("out_proj.weight", (d_model, d))]
    if bias:
        names.append(("out_proj.bias", (d_model,)))
    return names


def randn(*shape, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def layer(d_model, seed=1, dtype=torch.float32, device="cpu", layer_idx=None, **kw):
    """A Mamba layer holding the reference's random state_dict (trained-looking values)."""
    cfg = {k: kw[k] for k in ("d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias")
           if k in kw}
    m = Mamba(d_model, layer_idx=layer_idx, device=device, dtype=dtype, **kw)
    m.load_state_dict(mamba_ref_state_dict(d_model, seed=seed, dtype=dtype, **cfg), strict=True)
    return m


def ref_out(m, u):
    p = {k: v.detach().cpu().double() for k, v in m.state_dict().items()}
    return mamba_layer_ref(p, u.detach().cpu().double())


def skip_if_unsupported_on_cuda(e):
    """The CUDA conv1d / scan backward may not exist in this build yet: skip, saying so."""
    msg = str(e)
    if "not supported on CUDA" in msg or "CPU only" in msg:
        pytest.skip(f"CUDA path not in this build yet: {msg}")
    raise e


# ------------------------------------------------------------------ parameters

CONFIGS = [
    dict(d_model=16),
    dict(d_model=13, d_state=5, d_conv=3, expand=1.5, dt_rank=3),
    dict(d_model=40, d_state=8, d_conv=2, bias=True, conv_bias=False),
    dict(d_model=7, d_conv=4, dt_rank=1, bias=True),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_parameter_names_and_shapes(cfg):
    m = Mamba(**cfg)
    got = [(k, tuple(v.shape)) for k, v in m.state_dict().items()]
    assert got == mamba_ssm_param_shapes(**cfg)
    assert [k for k, _ in m.named_parameters()] == [k for k, _ in got]
    assert m.d_inner == int(cfg.get("expand", 2) * cfg["d_model"])
    assert m.conv1d.groups == m.d_inner and m.conv1d.padding == (m.d_conv - 1,)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_reference_state_dict_loads_strict(cfg, tmp_path):
    sd = mamba_ref_state_dict(**cfg, seed=3, dtype=torch.float32)
    path = tmp_path / "mamba.pt"
    torch.save(sd, path)
    m = Mamba(**cfg)
    res = m.load_state_dict(torch.load(path), strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # and the other way round: ours loads into a fresh layer of the same config
    Mamba(**cfg).load_state_dict(m.state_dict(), strict=True)


def test_mismatched_state_dict_is_refused():
    sd = mamba_ref_state_dict(16, seed=0, dtype=torch.float32)
    with pytest.raises(RuntimeError):
        Mamba(16, d_state=8).load_state_dict(sd, strict=True)
    sd.pop("D")
    with pytest.raises(RuntimeError, match="D"):
        Mamba(16).load_state_dict(sd, strict=True)


@pytest.mark.parametrize("dt_init", ["random", "constant"])
def test_initialisation(dt_init):
    torch.manual_seed(0)
    dt_min, dt_max, scale = 0.002, 0.05, 1.7
    m = Mamba(48, d_state=7, dt_init=dt_init, dt_min=dt_min, dt_max=dt_max, dt_scale=scale)
    d, r = m.d_inner, m.dt_rank
    assert r == 3
    want_alog = torch.log(torch.arange(1, 8, dtype=torch.float32)).repeat(d, 1)
    assert m.A_log.dtype == torch.float32 and torch.equal(m.A_log.detach(), want_alog)
    assert m.D.dtype == torch.float32 and torch.equal(m.D.detach(), torch.ones(d))
    assert m.A_log._no_weight_decay and m.D._no_weight_decay
    assert m.dt_proj.bias._no_reinit
    dt = torch.nn.functional.softplus(m.dt_proj.bias.detach().double())
    assert dt.min() >= dt_min * (1 - 1e-5) and dt.max() <= dt_max * (1 + 1e-5)
    # log-uniform: log dt spread over the interval, not clumped
    lo, hi = math.log(dt_min), math.log(dt_max)
    frac = (dt.log() - lo) / (hi - lo)
    assert frac.min() < 0.15 and frac.max() > 0.85 and abs(frac.mean().item() - 0.5) < 0.12
    std = r ** -0.5 * scale
    w = m.dt_proj.weight.detach()
    if dt_init == "constant":
        assert torch.allclose(w, torch.full_like(w, std))
    else:
        assert w.abs().max() <= std and w.abs().max() > 0.8 * std and abs(w.mean()) < 0.2 * std


def test_initialisation_floor_and_dtype():
    m = Mamba(16, dt_min=1e-6, dt_max=2e-6, dt_init_floor=1e-4)
    dt = torch.nn.functional.softplus(m.dt_proj.bias.detach().double())
    assert torch.allclose(dt, torch.full_like(dt, 1e-4), rtol=1e-5)
    m = Mamba(16, dt_min=1e-6, dt_max=2e-6, dt_init_floor=1e-4, dtype=torch.bfloat16)
    dt = torch.nn.functional.softplus(m.dt_proj.bias.detach().double())
    assert torch.allclose(dt, torch.full_like(dt, 1e-4), rtol=5e-2)  # bias ≈ -9.2 in bf16
    assert m.in_proj.weight.dtype == torch.bfloat16
    assert m.A_log.dtype == torch.float32 and m.D.dtype == torch.float32


def test_same_seed_same_parameters():
    torch.manual_seed(5)
    a = Mamba(24)
    torch.manual_seed(5)
    b = Mamba(24)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


def test_bad_arguments():
    with pytest.raises(ValueError, match="dt_init"):
        Mamba(16, dt_init="xavier")
    m = Mamba(16)
    with pytest.raises(ValueError, match=r"hidden_states.*\(b, l, 16\)"):
        m(torch.randn(2, 5, 15))
    with pytest.raises(ValueError, match="hidden_states"):
        m(torch.randn(5, 16))
    with pytest.raises(TypeError, match="hidden_states"):
        m(np.zeros((1, 2, 16), dtype=np.float32))
    conv, ssm = m.allocate_inference_cache(2, 8)
    with pytest.raises(ValueError, match="one token"):
        m.step(torch.randn(2, 3, 16), conv, ssm)
    with pytest.raises(ValueError, match="conv_state"):
        m.step(torch.randn(2, 1, 16), conv[:1], ssm)
    with pytest.raises(ValueError, match="ssm_state"):
        m.step(torch.randn(2, 1, 16), conv, ssm[:, :, :3])
    with pytest.raises(ValueError, match="layer_idx"):
        m(torch.randn(1, 3, 16), inference_params=InferenceParams(max_seqlen=8, max_batch_size=1))


# ------------------------------------------------------------------ forward parity

@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("cfg,b,l", [
    (dict(d_model=16), 2, 33),
    (dict(d_model=13, d_state=5, d_conv=3, dt_rank=2), 1, 1),
    (dict(d_model=13, d_state=5, d_conv=3, dt_rank=2), 3, 7),
    (dict(d_model=24, d_conv=2, bias=True, conv_bias=False), 2, 64),
    (dict(d_model=9, expand=1, d_state=3, d_conv=4, bias=True), 1, 200),
], ids=["d16-l33", "odd-l1", "odd-l7", "bias-w2-l64", "d9-l200"])
def test_forward_parity(cfg, b, l, dtype):
    m = layer(seed=b + l, dtype=DTYPES[dtype], **cfg)
    u = randn(b, l, cfg["d_model"], seed=l, dtype=DTYPES[dtype])
    out = m(u)
    assert out.shape == u.shape and out.dtype == u.dtype and not out.isnan().any()
    err = rel_err(out, ref_out(m, u))
    assert err <= TOL[dtype], f"rel_err {err:.2e} > {TOL[dtype]:.0e}"


def test_forward_parity_every_simd_level(simd_level):
    m = layer(21, d_state=6, d_conv=4, bias=True)
    u = randn(2, 45, 21, seed=7)
    err = rel_err(m(u), ref_out(m, u))
    assert err <= TOL["float32"], (simd_level, err)


def test_forward_long_sequence():
    m = layer(8, d_state=4)
    u = randn(1, 3000, 8, seed=11)
    err = rel_err(m(u), ref_out(m, u))
    assert err <= TOL["float32"], err


def test_forward_noncontiguous_input():
    m = layer(16)
    u = randn(20, 2, 16, seed=2).transpose(0, 1)  # (2, 20, 16) with batch stride 16
    assert not u.is_contiguous()
    assert rel_err(m(u), ref_out(m, u)) <= TOL["float32"]


def test_forward_under_no_grad_matches_grad_path():
    m = layer(16)
    u = randn(2, 9, 16, seed=4)
    with torch.no_grad():
        a = m(u)
    b = m(u.clone().requires_grad_())
    assert torch.allclose(a, b.detach(), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ gradients

def grads(m, u, g):
    u = u.detach().clone().requires_grad_()
    m.zero_grad(set_to_none=True)
    (m(u).float() * g).sum().backward()
    return u.grad, {k: p.grad for k, p in m.named_parameters()}


def ref_grads(m, u, g):
    p64 = {k: v.detach().cpu().double().requires_grad_() for k, v in m.state_dict().items()}
    u64 = u.detach().cpu().double().requires_grad_()
    (mamba_layer_ref(p64, u64) * g.cpu().double()).sum().backward()
    return u64.grad, {k: v.grad for k, v in p64.items()}


def peer_grads(m, u, g):
    """The reference run in the layer's own dtype (plain PyTorch in fp16/bf16)."""
    p = {k: v.detach().clone().requires_grad_() for k, v in m.state_dict().items()}
    ul = u.detach().clone().requires_grad_()
    (mamba_layer_ref(p, ul).float() * g).sum().backward()
    return ul.grad, {k: v.grad for k, v in p.items()}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("cfg,b,l", [
    (dict(d_model=16, bias=True), 2, 33),
    (dict(d_model=11, d_state=3, d_conv=3, dt_rank=2), 1, 6),
    (dict(d_model=8, d_state=4, conv_bias=False), 2, 1),
], ids=["d16-bias-l33", "odd-l6", "l1-nobias"])
def test_gradients(cfg, b, l, dtype):
    """Gradients of the input and of every parameter vs float64 autograd of the reference.

    float32: ≤ 1e-5. fp16/bf16: the layer's intermediate tensors (projections, conv
    output, their gradients) are rounded to the dtype, which on a few-element sum (l = 1)
    alone can exceed the per-op bound; so each gradient must be within the per-op
    tolerance or within 2× the error of the same reference layer run in plain PyTorch
    in that dtype (no worse than the unfused peer)."""
    m = layer(seed=l, dtype=DTYPES[dtype], **cfg)
    u = randn(b, l, cfg["d_model"], seed=l + 1, dtype=DTYPES[dtype])
    g = randn(b, l, cfg["d_model"], seed=l + 2)
    du, dp = grads(m, u, g)
    rdu, rdp = ref_grads(m, u, g)
    assert du.dtype == u.dtype
    if dtype == "float32":
        bound = dict.fromkeys(["input", *dp], TOL[dtype])
    else:
        pdu, pdp = peer_grads(m, u, g)
        bound = {"input": max(TOL[dtype], 2 * rel_err(pdu, rdu))}
        bound.update({k: max(TOL[dtype], 2 * rel_err(pdp[k], rdp[k])) for k in dp})
    errs = {"input": rel_err(du, rdu)}
    for k, v in dp.items():
        assert v is not None, f"{k} got no gradient"
        assert v.dtype == dict(m.named_parameters())[k].dtype, k
        errs[k] = rel_err(v, rdp[k])
    bad = {k: f"{e:.2e} > {bound[k]:.1e}" for k, e in errs.items() if not e <= bound[k]}
    assert not bad, f"rel_err too large: {bad}"


def test_gradients_every_simd_level(simd_level):
    m = layer(10, d_state=5, d_conv=4, bias=True)
    u = randn(2, 19, 10, seed=8)
    g = randn(2, 19, 10, seed=9)
    du, dp = grads(m, u, g)
    rdu, rdp = ref_grads(m, u, g)
    assert rel_err(du, rdu) <= 1e-5
    for k, v in dp.items():
        assert rel_err(v, rdp[k]) <= 1e-5, (simd_level, k)


# ------------------------------------------------------------------ decoding

def decode_all(m, u, conv, ssm):
    return torch.cat([m.step(u[:, t:t + 1], conv, ssm)[0] for t in range(u.shape[1])], dim=1)


@pytest.mark.parametrize("l", [1, 2, 3, 5, 17])
@pytest.mark.parametrize("cfg", [dict(d_model=16), dict(d_model=13, d_state=5, d_conv=3, bias=True),
                                 dict(d_model=6, d_conv=2, conv_bias=False)],
                         ids=["d16", "odd-w3-bias", "w2-nobias"])
def test_step_reproduces_forward(cfg, l):
    m = layer(seed=l, **cfg)
    u = randn(2, l, cfg["d_model"], seed=l)
    conv, ssm = m.allocate_inference_cache(2, l)
    assert conv.shape == (2, m.d_inner, m.d_conv) and conv.dtype == torch.float32
    assert ssm.shape == (2, m.d_inner, m.d_state) and ssm.dtype == torch.float32
    assert not conv.any() and not ssm.any()
    conv_ptr, ssm_ptr = conv.data_ptr(), ssm.data_ptr()
    out = decode_all(m, u, conv, ssm)
    assert conv.data_ptr() == conv_ptr and ssm.data_ptr() == ssm_ptr  # updated in place
    full = m(u)
    assert rel_err(out, full.detach()) <= 1e-5
    assert rel_err(out, ref_out(m, u)) <= TOL["float32"]
    # conv_state holds the last d_conv inputs of the conv (zero-padded), ssm_state h_l
    x = torch.nn.functional.linear(u, m.in_proj.weight, m.in_proj.bias)[..., :m.d_inner]
    want = torch.nn.functional.pad(x.transpose(1, 2), (m.d_conv - l, 0)) if l < m.d_conv \
        else x.transpose(1, 2)[..., -m.d_conv:]
    assert torch.allclose(conv, want.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_step_low_precision(dtype):
    m = layer(16, dtype=DTYPES[dtype])
    u = randn(2, 9, 16, seed=3, dtype=DTYPES[dtype])
    conv, ssm = m.allocate_inference_cache(2, 9)
    assert conv.dtype == DTYPES[dtype] and ssm.dtype == torch.float32
    out = decode_all(m, u, conv, ssm)
    assert out.dtype == u.dtype
    assert rel_err(out, ref_out(m, u)) <= TOL[dtype]


def test_step_accepts_non_float32_ssm_state():
    """A mamba_ssm-style cache (ssm_state in the model's dtype) still works."""
    m = layer(16)
    u = randn(1, 6, 16, seed=1)
    conv = torch.zeros(1, m.d_inner, m.d_conv)
    ssm = torch.zeros(1, m.d_inner, m.d_state, dtype=torch.float64)
    out = decode_all(m, u, conv, ssm)
    assert ssm.dtype == torch.float64 and ssm.abs().sum() > 0
    assert rel_err(out, ref_out(m, u)) <= 1e-5


@pytest.mark.parametrize("prompt,new", [(1, 4), (5, 3), (7, 1), (2, 6)])
def test_inference_params(prompt, new):
    """Prompt through forward(inference_params) at offset 0, then one token per call."""
    m = layer(13, d_state=5, d_conv=4, layer_idx=3)
    u = randn(2, prompt + new, 13, seed=prompt)
    ip = InferenceParams(max_seqlen=prompt + new, max_batch_size=2)
    outs = [m(u[:, :prompt], inference_params=ip)]
    conv, ssm = ip.key_value_memory_dict[3]
    assert conv.shape == (2, m.d_inner, 4) and ssm.shape == (2, m.d_inner, 5)
    ip.seqlen_offset += prompt
    for t in range(prompt, prompt + new):
        outs.append(m(u[:, t:t + 1], inference_params=ip))
        ip.seqlen_offset += 1
    assert ip.key_value_memory_dict[3][0] is conv  # the same state objects, updated in place
    assert rel_err(torch.cat(outs, 1).detach(), ref_out(m, u)) <= TOL["float32"]
    ip.reset(8, 2)
    assert ip.seqlen_offset == 0 and not conv.any() and not ssm.any()


@pytest.mark.parametrize("chunks", [(3, 4, 5), (1, 2, 1, 9), (6, 2)])
def test_inference_params_chunked(chunks):
    """Extension: at seqlen_offset > 0 a chunk of l > 1 tokens continues from the states."""
    m = layer(10, d_state=4, d_conv=3, layer_idx=0, bias=True)
    u = randn(2, sum(chunks), 10, seed=len(chunks))
    ip = InferenceParams()
    outs, t = [], 0
    for c in chunks:
        outs.append(m(u[:, t:t + c], inference_params=ip))
        t += c
        ip.seqlen_offset = t
    assert rel_err(torch.cat(outs, 1).detach(), ref_out(m, u)) <= TOL["float32"]


def test_chunked_continuation_is_differentiable():
    m = layer(8, d_state=4, layer_idx=0)
    u = randn(1, 10, 8, seed=1).requires_grad_()
    ip = InferenceParams()
    a = m(u[:, :4], inference_params=ip)
    ip.seqlen_offset = 4
    b = m(u[:, 4:], inference_params=ip)
    torch.cat([a, b], 1).sum().backward()
    u2 = u.detach().clone().requires_grad_()
    m(u2).sum().backward()
    # the states are detached at the chunk boundary: gradients of the second chunk's
    # inputs agree, the first chunk's differ only through the cut dependence
    assert rel_err(u.grad[:, 4:], u2.grad[:, 4:]) <= 1e-5


# ------------------------------------------------------------------ hidden attention

def test_hidden_attention_method():
    from mamba_attention import ops

    if not hasattr(ops, "hidden_attention"):
        pytest.skip("ops.hidden_attention is not in this build")
    m = layer(12, d_state=4)
    u = randn(2, 15, 12, seed=1)
    a = m.hidden_attention(u)
    assert a.shape == (2, 15, 15) and a.dtype == torch.float32
    assert torch.all(a.triu(1) == 0)
    full = m.hidden_attention(u, reduce=None)
    assert full.shape == (2, m.d_inner, 15, 15)
    assert torch.allclose(full.mean(1), a, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ CUDA

def cuda_or_skip():
    reason = cuda_skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_cuda_forward(dtype):
    cuda_or_skip()
    m = layer(32, d_state=16, dtype=DTYPES[dtype], device="cuda")
    u = randn(2, 65, 32, seed=5, dtype=DTYPES[dtype], device="cuda")
    try:
        out = m(u)
        torch.cuda.synchronize()
    except RuntimeError as e:
        skip_if_unsupported_on_cuda(e)
    assert out.device.type == "cuda" and out.dtype == u.dtype
    t = {"float32": 3e-5}.get(dtype, TOL[dtype])
    assert rel_err(out, ref_out(m, u)) <= t


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_gradients(dtype):
    cuda_or_skip()
    m = layer(16, bias=True, dtype=DTYPES[dtype], device="cuda")
    u = randn(2, 33, 16, seed=2, dtype=DTYPES[dtype], device="cuda")
    g = randn(2, 33, 16, seed=3, device="cuda")
    try:
        du, dp = grads(m, u, g)
        torch.cuda.synchronize()
    except RuntimeError as e:
        skip_if_unsupported_on_cuda(e)
    rdu, rdp = ref_grads(m, u, g)
    if dtype == "float32":
        assert rel_err(du, rdu) <= 3e-5
        for k, v in dp.items():
            assert rel_err(v, rdp[k]) <= 3e-5, k
    else:
        pdu, pdp = peer_grads(m, u, g)
        assert rel_err(du, rdu) <= max(TOL[dtype], 2 * rel_err(pdu, rdu))
        for k, v in dp.items():
            assert rel_err(v, rdp[k]) <= max(TOL[dtype], 2 * rel_err(pdp[k], rdp[k])), k


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_step(dtype):
    cuda_or_skip()
    m = layer(16, dtype=DTYPES[dtype], device="cuda")
    u = randn(2, 7, 16, seed=4, dtype=DTYPES[dtype], device="cuda")
    conv, ssm = m.allocate_inference_cache(2, 7)
    assert conv.device.type == "cuda" and ssm.device.type == "cuda"
    try:
        out = decode_all(m, u, conv, ssm)
        torch.cuda.synchronize()
    except RuntimeError as e:
        skip_if_unsupported_on_cuda(e)
    t = {"float32": 3e-5}.get(dtype, TOL[dtype])
    assert rel_err(out, ref_out(m, u)) <= t


@pytest.mark.cuda
def test_cuda_hidden_attention_method():
    cuda_or_skip()
    m = layer(16, device="cuda")
    u = randn(1, 20, 16, seed=4, device="cuda")
    try:
        a = m.hidden_attention(u)
        torch.cuda.synchronize()
    except RuntimeError as e:
        skip_if_unsupported_on_cuda(e)
    cpu = layer(16).hidden_attention(u.cpu())
    assert a.device.type == "cuda" and rel_err(a, cpu) <= 1e-4
