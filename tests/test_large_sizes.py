"""Large sizes (issue 15, item 5): long sequences and index arithmetic past 2^31.

* The selective scan runs at l = 2^20 (SPEC §1) on every SIMD level and on CUDA:
  forward (output and last state) and backward (every gradient, through autograd)
  against a float64 reference of SPEC's formulas that is vectorised over time (a
  doubling scan of the linear recurrence), so it costs seconds, not a Python loop
  of 2^20 steps. Channels have short and long memories (mean decays Δ·A from −0.08
  down to −4e-5 per step: up to ~30000 steps), so state carried across every chunk
  boundary is checked.
* CPU: attention whose logical key index j·hk·hd (and the batch's, past it) passes
  2^31 with a tiny buffer: K and V are overlapping-stride views (the key axis has
  stride 1) of a few-MB buffer, the query sees a window near the end of 2^24 keys.
* CUDA (skipped here; they need a GPU with the memory named in each test): tensors
  of just over 2^31 elements through the scan, attention, conv1d, RMSNorm and
  hidden attention, a few slices of each checked against float64 references
  computed on those slices.
"""

import numpy as np
import pytest

pytest.importorskip("mamba_attention._core")
torch = pytest.importorskip("torch")

import mamba_attention as ma  # noqa: E402
from conftest import cpu_only, cuda_only, on_cuda, target_device  # noqa: E402
from reference import rel_err  # noqa: E402


# ------------------------------------------------------------ float64 references


def linear_scan(a, x, h0=None, reverse=False):
    """h_t = a_t·h_{t-1} + x_t along axis -2 (time), h_{-1} = h0 (shape without time),
    in float64, by recursive doubling: log2(l) vectorised passes instead of l steps.
    reverse: g_t = a_{t+1}·g_{t+1} + x_t from the end (a given as a_{t+1} at t)."""
    if reverse:
        return linear_scan(a[..., ::-1, :], x[..., ::-1, :], h0)[..., ::-1, :]
    A, X = a.copy(), x.copy()
    if h0 is not None:
        X[..., 0, :] += A[..., 0, :] * h0
    s, l = 1, a.shape[-2]
    while s < l:
        X[..., s:, :] += A[..., s:, :] * X[..., :-s, :]
        A[..., s:, :] *= A[..., :-s, :]
        s *= 2
    return X


def _f64(t):
    return t.detach().to("cpu", torch.float64).numpy()


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def scan_fwd_ref(u, delta, A, B, C, D, z, bias, h0):
    """SPEC §1 with delta_softplus, B/C shared (b, n, l). Returns out, last_state and the
    intermediates the backward needs. Arrays (b, d, l, n) float64."""
    x = delta + bias[None, :, None]
    dt = np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))          # (b, d, l)
    a = np.exp(dt[..., None] * A[None, :, None, :])                          # (b, d, l, n)
    xin = (dt * u)[..., None] * np.swapaxes(B, 1, 2)[:, None]                 # (b, d, l, n)
    h = linear_scan(a, xin, h0)                                               # (b, d, l, n)
    y = np.einsum("bdln,bnl->bdl", h, C) + D[None, :, None] * u
    out = y * z * _sigmoid(z)
    return out, h[:, :, -1], dict(x=x, dt=dt, a=a, h=h, y=y)


def scan_bwd_ref(u, delta, A, B, C, D, z, bias, h0, dout, dlast, it):
    """Every gradient of sum(out·dout) + sum(last·dlast) (formulas of src/cpu/scan_bwd.rs)."""
    x, dt, a, h, y = it["x"], it["dt"], it["a"], it["h"], it["y"]
    sz = _sigmoid(z)
    dy = dout * z * sz
    dz = dout * y * sz * (1 + z * (1 - sz))
    Ct = np.swapaxes(C, 1, 2)[:, None]                                        # (b, 1, l, n)
    Bt = np.swapaxes(B, 1, 2)[:, None]
    src = Ct * dy[..., None]
    src[:, :, -1] += dlast
    a_next = np.concatenate([a[:, :, 1:], np.zeros_like(a[:, :, :1])], axis=2)
    g = linear_scan(a_next, src, reverse=True)                               # dL/dh_t
    h_prev = np.concatenate([h0[:, :, None, :], h[:, :, :-1]], axis=2)
    p = a * h_prev
    gB = (g * Bt).sum(-1)                                                    # (b, d, l)
    du = D[None, :, None] * dy + dt * gB
    ddt = (A[None, :, None, :] * g * p).sum(-1) + u * gB
    dA = (g * p * dt[..., None]).sum((0, 2))
    dB = np.einsum("bdln,bdl->bnl", g, dt * u)
    dC = np.einsum("bdl,bdln->bnl", dy, h)
    dD = (dy * u).sum((0, 2))
    ddelta = ddt * np.where(x > 20, 1.0, _sigmoid(x))
    dbias = ddelta.sum((0, 2))
    dh0 = a[:, :, 0] * g[:, :, 0]
    return dict(u=du, delta=ddelta, A=dA, B=dB, C=dC, D=dD, z=dz, delta_bias=dbias,
                initial_state=dh0)


# ------------------------------------------------------------ scan at l = 2^20

L_LONG = 1 << 20
NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


_A_LONG = -np.array([[1.5, 0.8, 0.3, 0.1], [0.05, 0.02, 0.01, 0.005], [1.0, 0.01, 0.2, 0.003]])


def _long_inputs(n=4):
    """b 1, d 3, l 2^20 float32 inputs (n 4; other n repeat A's columns scaled). Mean decays
    Δ·A range from −0.08 (a memory of tens of steps) to −4e-5 (tens of thousands of
    steps, across many kernel chunks)."""
    rng = np.random.default_rng(2020)
    b, d, l = 1, 3, L_LONG
    A = np.concatenate([_A_LONG * (1.0 + 0.1 * i) for i in range(-(-n // 4))], axis=1)[:, :n]
    x = dict(u=rng.standard_normal((b, d, l)),
             delta=rng.standard_normal((b, d, l)) * 0.3 - 2.0,
             A=A,
             B=rng.standard_normal((b, n, l)), C=rng.standard_normal((b, n, l)),
             D=rng.standard_normal(d), z=rng.standard_normal((b, d, l)),
             delta_bias=np.array([-1.0, -3.0, -2.0]),
             initial_state=rng.standard_normal((b, d, n)))
    # float32 values, kept in float64 for the reference
    return {k: v.astype(np.float32).astype(np.float64) for k, v in x.items()}


def _long_case(n=4):
    x = _long_inputs(n)
    out, last, it = scan_fwd_ref(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                 x["delta_bias"], x["initial_state"])
    rng = np.random.default_rng(7)
    dout = rng.standard_normal(out.shape).astype(np.float32).astype(np.float64)
    dlast = rng.standard_normal(last.shape).astype(np.float32).astype(np.float64)
    grads = scan_bwd_ref(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
                         x["initial_state"], dout, dlast, it)
    return x, out, last, dout, dlast, grads


@pytest.fixture(scope="module")
def long_case():
    return _long_case()


def _torch_inputs(x, grad):
    dev = target_device()
    return {k: torch.tensor(v, dtype=torch.float32, device=dev, requires_grad=grad) for k, v in x.items()}


def test_scan_long_sequence_forward(target, long_case):
    """selective_scan_fn at l = 2^20: output and last state against float64."""
    x, out_ref, last_ref = long_case[:3]
    t = _torch_inputs(x, grad=False)
    out, last = ma.selective_scan_fn(**t, delta_softplus=True, return_last_state=True)
    tol = 3e-5 if on_cuda() else 2e-5
    assert rel_err(out, out_ref) <= tol, rel_err(out, out_ref)
    assert rel_err(last, last_ref) <= tol, rel_err(last, last_ref)
    # The end of the sequence on its own (a wrong chunk carry shows there first).
    assert rel_err(out[..., -4096:], out_ref[..., -4096:]) <= tol


def test_scan_long_sequence_backward(target, long_case):
    """Every gradient of selective_scan_fn at l = 2^20 (autograd; dout and dlast_state)
    against float64. Sums over 2^20 steps (dA, dD, ddelta_bias) get 1e-4."""
    _check_long_backward(long_case)


@cuda_only
def test_cuda_scan_long_sequence_general_kernels(target):
    """n = 20 at l = 2^20 on CUDA: the general forward and backward kernels (n = 4 above
    takes the fast ones), forward and every gradient against float64."""
    case = _long_case(20)
    x, out_ref, last_ref = case[:3]
    out, last = ma.selective_scan_fn(**_torch_inputs(x, grad=False), delta_softplus=True,
                                     return_last_state=True)
    assert rel_err(out, out_ref) <= 3e-5 and rel_err(last, last_ref) <= 3e-5
    _check_long_backward(case)


def _check_long_backward(case):
    x, _, _, dout, dlast, ref = case
    t = _torch_inputs(x, grad=True)
    out, last = ma.selective_scan_fn(**t, delta_softplus=True, return_last_state=True)
    dev = target_device()
    grads = torch.autograd.grad(
        (out, last), [t[k] for k in NAMES],
        (torch.tensor(dout, dtype=torch.float32, device=dev),
         torch.tensor(dlast, dtype=torch.float32, device=dev)))
    bad = {}
    for k, g in zip(NAMES, grads):
        tol = 1e-4 if k in ("A", "D", "delta_bias") else (5e-5 if on_cuda() else 2e-5)
        e = rel_err(g, ref[k])
        if not e <= tol:
            bad[k] = (e, tol)
    assert not bad, bad


# ------------------------------------------------- CPU: key indices past 2^31


def _overlapping(base, shape):
    """A (b, s, h, e) view of 1-D `base` with strides (0, 1, 3, 1): row j of head h is
    base[j + 3h : j + 3h + e]. Its logical size is huge; its buffer is s + 3h + e."""
    return base.as_strided(shape, (0, 1, 3, 1))


def _attn_rows_ref(q, kb, vb, hk, rows, sq, sk, window, scale):
    """float64 outputs of the listed (z, i, head) rows; k/v rows from the overlapping bases."""
    hq = q.shape[2]
    e = q.shape[3]
    res = {}
    for z, i, hh in rows:
        kvh = hh // (hq // hk)
        hi = i + sk - sq
        lo = max(0, hi - window)
        j = np.arange(lo, hi + 1)
        idx = j[:, None] + 3 * kvh + np.arange(e)[None, :]
        K, V = kb[idx], vb[idx]
        s = (K @ q[z, i, hh]) * scale
        p = np.exp(s - s.max())
        res[(z, i, hh)] = (p[:, None] * V).sum(0) / p.sum()
    return res


@cpu_only
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cpu_attention_key_index_past_2_31(target, dtype):
    """flash_attn_func with sk = 2^24 keys of hk 2 × hd 64 per batch entry: the last key's
    logical element index is ≈ 2^31 and the second batch entry's past it. A causal window of
    256 keys at the end: only those are read. Also flash_attn_with_kvcache with the same
    cache and cache_seqlens near 2^24."""
    dt = getattr(torch, dtype)
    b, sq, hq, hk, e, sk, w = 2, 3, 4, 2, 64, 1 << 24, 255
    g = torch.Generator().manual_seed(11)
    kb = torch.randn(sk + 3 * hk + e, generator=g).to(dt)
    vb = torch.randn(sk + 3 * hk + e, generator=g).to(dt)
    q = torch.randn(b, sq, hq, e, generator=g).to(dt)
    k, v = _overlapping(kb, (b, sk, hk, e)), _overlapping(vb, (b, sk, hk, e))
    assert b * sk * hk * e > 2 ** 31
    out = ma.flash_attn_func(q, k, v, causal=True, window_size=(w, 0))
    rows = [(z, i, hh) for z in range(b) for i in range(sq) for hh in (0, hq - 1)]
    ref = _attn_rows_ref(_f64(q), _f64(kb), _f64(vb), hk, rows, sq, sk, w, e ** -0.5)
    tol = 1e-2 if dtype == "bfloat16" else 1e-5
    for r in rows:
        z, i, hh = r
        assert rel_err(out[z, i, hh], ref[r]) <= tol, (r, rel_err(out[z, i, hh], ref[r]))
    # kv cache: row z sees its first cache_seqlens[z] keys (+ its queries, bottom-right).
    lens = torch.tensor([sk - 5, sk - 1000], dtype=torch.int32)
    out2 = ma.flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, causal=True, window_size=(w, 0))
    for z in range(b):
        skz = int(lens[z])
        ref2 = _attn_rows_ref(_f64(q), _f64(kb), _f64(vb), hk, [(z, i, hh) for i in range(sq)
                                                                    for hh in (0, hq - 1)],
                              sq, skz, w, e ** -0.5)
        for (zz, i, hh), r in ref2.items():
            assert rel_err(out2[zz, i, hh], r) <= tol, (zz, i, hh)


# ------------------------------------------------ CUDA: tensors of > 2^31 elements


def _need_gpu_memory(gb):
    free, _ = torch.cuda.mem_get_info()
    if free < gb * (1 << 30):
        pytest.skip(f"needs {gb} GB of free GPU memory, {free / (1 << 30):.1f} GB free")


@cuda_only
def test_cuda_scan_past_2_31_elements(target):
    """selective_scan_fn on bf16 u/delta/z (b 2, d 1024, l 2^20 + 3: b·d·l > 2^31), B/C
    (b, 4, l): out and last_state of three channels (the last batch entry's among them)
    against float64. Needs ~40 GB."""
    _need_gpu_memory(40)
    b, d, l, n = 2, 1024, L_LONG + 3, 4
    assert b * d * l > 2 ** 31
    g = torch.Generator(device="cuda").manual_seed(5)
    bf = torch.bfloat16
    u = torch.randn(b, d, l, device="cuda", dtype=bf, generator=g)
    delta = (torch.randn(b, d, l, device="cuda", generator=g) * 0.3 - 2.0).to(bf)
    z = torch.randn(b, d, l, device="cuda", dtype=bf, generator=g)
    A = -torch.rand(d, n, device="cuda", generator=g) * 0.5 - 0.001
    B = torch.randn(b, n, l, device="cuda", generator=g)
    C = torch.randn(b, n, l, device="cuda", generator=g)
    D = torch.randn(d, device="cuda", generator=g)
    bias = torch.rand(d, device="cuda", generator=g) * -2 - 1
    out, last = ma.selective_scan_fn(u, delta, A, B, C, D, z, bias, delta_softplus=True,
                                     return_last_state=True)
    torch.cuda.synchronize()
    for bi, c in [(0, 0), (1, 517), (b - 1, d - 1)]:
        sl = lambda t: _f64(t[bi:bi + 1, c:c + 1])  # noqa: E731
        o_ref, h_ref, _ = scan_fwd_ref(sl(u), sl(delta), _f64(A[c:c + 1]), _f64(B[bi:bi + 1]),
                                       _f64(C[bi:bi + 1]), _f64(D[c:c + 1]), sl(z),
                                       _f64(bias[c:c + 1]), np.zeros((1, 1, n)))
        assert rel_err(out[bi, c], o_ref[0, 0]) <= 1e-2, (bi, c)
        assert rel_err(last[bi, c], h_ref[0, 0]) <= 3e-5, (bi, c)


@cuda_only
def test_cuda_attention_past_2_31_elements(target):
    """flash_attn_func, bf16 q/k/v of (2, 2^17 + 64, 64, 128) (> 2^31 elements each),
    causal with a window of 512, forward and backward: rows near the end of the last
    batch entry against float64. Needs ~50 GB."""
    _need_gpu_memory(50)
    b, s, h, e, w = 2, (1 << 17) + 64, 64, 128, 511
    assert b * s * h * e > 2 ** 31
    g = torch.Generator(device="cuda").manual_seed(6)
    q, k, v = (torch.randn(b, s, h, e, device="cuda", dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    for t in (q, k, v):
        t.requires_grad_(True)
    out = ma.flash_attn_func(q, k, v, causal=True, window_size=(w, 0))
    dout = torch.zeros_like(out)
    rows = [(b - 1, s - 1, h - 1), (b - 1, s - 700, 3), (0, s - 1, 0), (1, 0, 5)]
    for z, i, hh in rows:
        dout[z, i, hh] = 1.0
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()
    scale = e ** -0.5
    for z, i, hh in rows:
        lo = max(0, i - w)
        Q, K, V = _f64(q[z, i, hh]), _f64(k[z, lo:i + 1, hh]), _f64(v[z, lo:i + 1, hh])
        sc = K @ Q * scale
        p = np.exp(sc - sc.max())
        p /= p.sum()
        o = p @ V
        assert rel_err(out[z, i, hh], o) <= 1e-2, (z, i, hh)
        # dout is one-hot on this row: dv[j] = p_j, dq = scale·Σ_j p_j (v_j·1 − o·1) k_j
        dp = V.sum(1)
        ds = p * (dp - (p * dp).sum())
        assert rel_err(dq[z, i, hh], scale * ds @ K) <= 2e-2, (z, i, hh)
        assert rel_err(dv[z, lo:i + 1, hh], np.repeat(p[:, None], e, 1)) <= 2e-2, (z, i, hh)


@cuda_only
def test_cuda_conv1d_past_2_31_elements(target):
    """causal_conv1d_fn, bf16 x of (2, 2^15, 2^15 + 8) (> 2^31 elements), silu: three
    channels against float64 (the last one of the last batch entry among them). Needs ~20 GB."""
    _need_gpu_memory(20)
    b, d, l, wd = 2, 1 << 15, (1 << 15) + 8, 4
    assert b * d * l > 2 ** 31
    g = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(b, d, l, device="cuda", dtype=torch.bfloat16, generator=g)
    wt = torch.randn(d, wd, device="cuda", generator=g)
    bias = torch.randn(d, device="cuda", generator=g)
    out = ma.causal_conv1d_fn(x, wt, bias, activation="silu")
    torch.cuda.synchronize()
    for bi, c in [(0, 0), (1, 12345), (b - 1, d - 1)]:
        xs = np.concatenate([np.zeros(wd - 1), _f64(x[bi, c])])
        ww = _f64(wt[c])
        pre = sum(ww[i] * xs[i:i + l] for i in range(wd)) + float(bias[c])
        ref = pre * _sigmoid(pre)
        assert rel_err(out[bi, c], ref) <= 1e-2, (bi, c)


@cuda_only
def test_cuda_rms_norm_past_2_31_elements(target):
    """rms_norm_fn with a residual, bf16 x of (2^22 + 5, 512) (> 2^31 elements), prenorm:
    the first and last rows against float64. Needs ~24 GB."""
    _need_gpu_memory(24)
    rows, hdim = (1 << 22) + 5, 512
    assert rows * hdim > 2 ** 31
    g = torch.Generator(device="cuda").manual_seed(8)
    x = torch.randn(rows, hdim, device="cuda", dtype=torch.bfloat16, generator=g)
    r = torch.randn(rows, hdim, device="cuda", dtype=torch.bfloat16, generator=g)
    wt = torch.randn(hdim, device="cuda", generator=g)
    out, res = ma.rms_norm_fn(x, wt, residual=r, prenorm=True, eps=1e-5)
    torch.cuda.synchronize()
    for i in [0, rows // 2, rows - 1]:
        s = _f64(x[i]) + _f64(r[i])
        ref = s / np.sqrt((s * s).mean() + 1e-5) * _f64(wt)
        assert rel_err(out[i], ref) <= 1e-2, i
        assert rel_err(res[i], s) <= 1e-2, i


@cuda_only
def test_cuda_hidden_attention_past_2_31_elements(target):
    """hidden_attention with an output of (1, 520, 2048, 2048) float32 (> 2^31 elements):
    rows of the last channel against float64. Needs ~12 GB."""
    _need_gpu_memory(12)
    b, d, l, n = 1, 520, 2048, 4
    assert b * d * l * l > 2 ** 31
    g = torch.Generator(device="cuda").manual_seed(9)
    delta = torch.rand(b, d, l, device="cuda", generator=g) * 0.1
    A = -torch.rand(d, n, device="cuda", generator=g)
    B = torch.randn(b, n, l, device="cuda", generator=g)
    C = torch.randn(b, n, l, device="cuda", generator=g)
    alpha = ma.hidden_attention(delta, A, B, C)
    torch.cuda.synchronize()
    c = d - 1
    dl, a, Bm, Cm = _f64(delta[0, c]), _f64(A[c]), _f64(B[0]), _f64(C[0])
    cum = np.concatenate([[0.0], np.cumsum(dl)])
    for i in [l - 1, l // 2]:
        j = np.arange(i + 1)
        decay = np.exp(np.outer(cum[i + 1] - cum[j + 1], a))           # (j, n)
        ref = (Cm[:, i][None, :] * decay * (dl[j, None] * Bm[:, j].T)).sum(1)
        assert rel_err(alpha[0, c, i, :i + 1], ref) <= 1e-4, i
        assert float(alpha[0, c, i, i + 1:].abs().max() if i + 1 < l else 0) == 0.0


@cuda_only
def test_cuda_scan_grid_past_2_32_lanes(target):
    """The general scan kernel on d = 2^28 + 5 channels with n = 256 (16 lanes per channel,
    d·16 > 2^32: the block count is formed in 64 bits): three channels, the last among
    them, against float64. u and out are real (1 GB each in bf16); delta and A are
    expanded along d. Needs ~4 GB."""
    _need_gpu_memory(4)
    b, d, l, n = 1, (1 << 28) + 5, 2, 256
    g = torch.Generator(device="cuda").manual_seed(10)
    u = torch.randn(b, d, l, device="cuda", dtype=torch.bfloat16, generator=g)
    delta = (torch.rand(1, 1, l, device="cuda", generator=g) * 0.5).expand(b, d, l)
    A = (-torch.rand(1, n, device="cuda", generator=g)).expand(d, n)
    B = torch.randn(b, n, l, device="cuda", generator=g)
    C = torch.randn(b, n, l, device="cuda", generator=g)
    out, last = ma.selective_scan_fn(u, delta, A, B, C, return_last_state=True)
    torch.cuda.synchronize()
    for c in [0, d // 2, d - 1]:
        o_ref, h_ref, _ = scan_fwd_ref_plain(_f64(u[:, c]), _f64(delta[:, c]), _f64(A[c]), _f64(B), _f64(C))
        assert rel_err(out[0, c], o_ref) <= 1e-2, c
        assert rel_err(last[0, c], h_ref) <= 1e-5, c


def scan_fwd_ref_plain(u, dt, a_row, B, C):
    """One channel without softplus, D, z: u, dt (1, l); a_row (n,); B, C (1, n, l)."""
    h = np.zeros(a_row.shape[0])
    ys = []
    for t in range(u.shape[1]):
        h = np.exp(dt[0, t] * a_row) * h + dt[0, t] * B[0, :, t] * u[0, t]
        ys.append((C[0, :, t] * h).sum())
    return np.array(ys), h, None


@cuda_only
def test_cuda_dimension_limit_is_a_value_error(target):
    """A dimension above 2^31 − 2^16 (zero-stride views, no memory) is a ValueError naming
    the argument, before anything is allocated or launched."""
    big = (1 << 31) - (1 << 16) + 1
    z = torch.zeros(1, device="cuda")
    with pytest.raises(ValueError, match=r"^u: dimension 2 .*exceeds"):
        ma.selective_scan_fn(z.expand(1, 1, big), z.expand(1, 1, big), z.expand(1, 4),
                             z.expand(1, 4, big), z.expand(1, 4, big))
    with pytest.raises(ValueError, match=r"^x: dimension 2 .*exceeds"):
        ma.causal_conv1d_fn(z.expand(1, 1, big), torch.ones(1, 4, device="cuda"))
    with pytest.raises(ValueError, match=r"^x: dimension 0 .*exceeds"):
        ma.rms_norm_fn(z.expand(big, 1), torch.ones(1, device="cuda"))
    with pytest.raises(ValueError, match=r"^delta: dimension 2 .*exceeds"):
        ma.hidden_attention(z.expand(1, 1, big), z.expand(1, 4), z.expand(1, 4, big), z.expand(1, 4, big))
