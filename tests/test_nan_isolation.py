"""NaN isolation (issue 15; DESIGN.md: "bad bits never leak"): a NaN, +inf or -inf
placed at one random element of one input (or of an output gradient) changes no
output element outside what SPEC's formulas make depend on that element. Every other
output element must keep its exact bits (CPU; CUDA: exact too, except where the kernel
sums with atomics in a varying order). This catches vector tail lanes, padding and
other rows / channels / batch entries that leak into a result.

The non-attention ops, forward and backward, on every SIMD level and on CUDA through
the ``target`` fixture; attention has its own tests (masked keys).

Dependencies used below, per op (b: batch entry, c: channel, t: time step, k: state):
  selective_scan_fn: u/delta[b,c,t] -> out[b,c,t:], last[b,c,:]; z[b,c,t] -> out[b,c,t];
    A[c,k] -> out[:,c,:], last[:,c,k]; D[c] -> out[:,c,:]; delta_bias[c] -> out, last
    of channel c; initial_state[b,c,k] -> out[b,c,:], last[b,c,k]; B at time t -> out
    of its channels from t on and their state k; C at t -> out of its channels at t.
  causal_conv1d_fn: x[b,c,t] -> out[b,c,t..t+w-1] (and final_states[b,c]).
  rms_norm_fn: x/residual[r,k] -> out[r,:], residual_out[r,k]; weight/bias[k] -> out[:,k].
  swiglu: one element -> that element.
  selective_state_update: x/dt[b,c] -> out[b,c], state row of (b, c);
    state[row,c,k] -> state[row,c,k] and out of the entry reading that row.
  hidden_attention: only α[.., i, j] with j <= i whose formula holds the element;
    never j > i (α is exactly 0 there).
Backward: dout[b,c,t] reaches only the gradients SPEC's chain rule gives (its channel,
times <= t, its group's dB/dC, its channel's parameter gradients), never another batch
entry's gradients.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("mamba_attention._core")
torch = pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import mamba_attention as ma  # noqa: E402
from conftest import on_cuda, sync, target_device  # noqa: E402

pytestmark = pytest.mark.usefixtures("target")

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
BAD = st.sampled_from([math.nan, math.inf, -math.inf])


# ----------------------------------------------------------------------- helpers

def dev(a, requires_grad=False):
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(target_device())
    return t.requires_grad_(requires_grad)


def cpu(t):
    return t.detach().to("cpu").double().numpy()


def draw_index(data, shape, label):
    return tuple(data.draw(st.integers(0, s - 1), label=f"{label}[{i}]") for i, s in enumerate(shape))


def divisor(data, d):
    return data.draw(st.sampled_from([g for g in range(1, d + 1) if d % g == 0]), label="groups")


def poisoned(arrays, name, idx, value):
    """A copy of the dict of float64 NumPy arrays with arrays[name][idx] = value."""
    out = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in arrays.items()}
    out[name][idx] = value
    return out


def assert_isolated(base, new, allowed, what, exact=None):
    """Every element of ``new`` outside ``allowed`` equals ``base`` (bitwise when
    ``exact``, the default on the CPU; NaN == NaN), else to 1e-5 (CUDA: sums by
    atomics, e.g. dA, dB, the channel mean, may change order between calls).
    ``base`` must be finite (else the check is vacuous)."""
    if exact is None:
        exact = not on_cuda()
    for key, b in base.items():
        n, ok = new[key], allowed[key]
        assert b.shape == n.shape == ok.shape, (key, b.shape, n.shape, ok.shape)
        assert np.isfinite(b).all(), f"{what}: the clean call's {key} is not finite"
        keep = ~ok
        if exact:
            bad = keep & ~((b == n) | (np.isnan(b) & np.isnan(n)))
        else:
            bad = keep & ~np.isclose(n, b, rtol=1e-5, atol=1e-6)
        if bad.any():
            where = np.argwhere(bad)
            raise AssertionError(
                f"{what}: {int(bad.sum())} element(s) of {key} outside what depends on the "
                f"poisoned element changed, first at {tuple(where[0])}: "
                f"{b[tuple(where[0])]!r} -> {n[tuple(where[0])]!r}")


def chans(d, g, gi):
    return slice(gi * (d // g), (gi + 1) * (d // g))


# ------------------------------------------------------------------- selective scan

def draw_scan(data, conv=False):
    b = data.draw(st.integers(1, 3), label="b")
    d = data.draw(st.integers(1, 20), label="d")
    l = data.draw(st.integers(1, 40), label="l")
    n = data.draw(st.integers(1, 20), label="n")
    g = divisor(data, d)
    lay = {x: data.draw(st.sampled_from(["const", "shared", "grouped"]), label=f"{x} layout")
           for x in "BC"}
    opts = {k: data.draw(st.booleans(), label=k) for k in ("D", "z", "delta_bias", "initial_state")}
    softplus = data.draw(st.booleans(), label="softplus")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31), label="seed"))
    shape_bc = {"const": (d, n), "shared": (b, n, l), "grouped": (b, g, n, l)}
    x = dict(u=rng.standard_normal((b, d, l)),
             delta=(rng.standard_normal((b, d, l)) * 0.5 - 1.0) if softplus
             else rng.uniform(0.01, 0.2, (b, d, l)),
             A=-np.exp(rng.standard_normal((d, n))),
             B=rng.standard_normal(shape_bc[lay["B"]]), C=rng.standard_normal(shape_bc[lay["C"]]))
    if opts["D"]:
        x["D"] = rng.standard_normal(d)
    if opts["z"]:
        x["z"] = rng.standard_normal((b, d, l))
    if opts["delta_bias"]:
        x["delta_bias"] = rng.uniform(-2.0, -0.5, d) if softplus else rng.uniform(0.0, 0.05, d)
    if opts["initial_state"]:
        x["initial_state"] = rng.standard_normal((b, d, n))
    w = None
    if conv:
        w = data.draw(st.integers(2, 4), label="w")
        x["x"] = x.pop("u")
        x["conv_weight"] = rng.standard_normal((d, w)) * 0.5
        if data.draw(st.booleans(), label="conv_bias"):
            x["conv_bias"] = rng.standard_normal(d) * 0.1
    meta = dict(b=b, d=d, l=l, n=n, g=g, lay=lay, softplus=softplus, w=w)
    return x, meta


def call_scan(x, meta, grad=False):
    """(outputs dict, inputs as tensors); the fused conv+scan when x has "x"."""
    t = {k: dev(v, grad) for k, v in x.items()}
    if "x" in t:
        out, last = ma.conv_selective_scan_fn(
            t["x"], t["conv_weight"], t.get("conv_bias"), t["delta"], t["A"], t["B"], t["C"],
            t.get("D"), t.get("z"), t.get("delta_bias"), delta_softplus=meta["softplus"],
            activation="silu", return_last_state=True, initial_state=t.get("initial_state"))
    else:
        out, last = ma.selective_scan_fn(
            t["u"], t["delta"], t["A"], t["B"], t["C"], t.get("D"), t.get("z"),
            t.get("delta_bias"), delta_softplus=meta["softplus"], return_last_state=True,
            initial_state=t.get("initial_state"))
    sync()
    return {"out": out, "last_state": last}, t


def scan_affected(name, idx, meta):
    b, d, l, n, g, w = (meta[k] for k in ("b", "d", "l", "n", "g", "w"))
    out = np.zeros((b, d, l), bool)
    last = np.zeros((b, d, n), bool)
    if name in ("u", "delta"):
        bi, c, t = idx
        out[bi, c, t:] = True
        last[bi, c] = True
    elif name == "x":  # the conv's input reaches u[t .. t+w-1]
        bi, c, t = idx
        out[bi, c, t:] = True
        last[bi, c] = True
    elif name == "z":
        out[idx] = True
    elif name == "A":
        c, k = idx
        out[:, c] = True
        last[:, c, k] = True
    elif name == "D":
        out[:, idx[0]] = True
    elif name in ("delta_bias", "conv_weight", "conv_bias"):
        out[:, idx[0]] = True
        last[:, idx[0]] = True
    elif name == "initial_state":
        bi, c, k = idx
        out[bi, c] = True
        last[bi, c, k] = True
    elif name in ("B", "C"):
        lay = meta["lay"][name]
        if lay == "const":
            c, k = idx
            out[:, c] = True
            if name == "B":
                last[:, c, k] = True
        else:
            if lay == "shared":
                (bi, k, t), cs = idx, slice(None)
            else:
                bi, gi, k, t = idx
                cs = chans(d, g, gi)
            if name == "B":
                out[bi, cs, t:] = True
                last[bi, cs, k] = True
            else:
                out[bi, cs, t] = True
    else:
        raise AssertionError(name)
    return {"out": out, "last_state": last}


def np_outs(outs):
    return {k: cpu(v) for k, v in outs.items()}


def check_scan_forward(data, conv):
    x, meta = draw_scan(data, conv)
    name = data.draw(st.sampled_from(sorted(x)), label="poisoned input")
    idx = draw_index(data, x[name].shape, name)
    value = data.draw(BAD, label="value")
    with torch.no_grad():
        base = np_outs(call_scan(x, meta)[0])
        new = np_outs(call_scan(poisoned(x, name, idx, value), meta)[0])
    assert_isolated(base, new, scan_affected(name, idx, meta), f"{name}{list(idx)} = {value}")


@SETTINGS
@given(data=st.data())
def test_selective_scan_forward(data):
    check_scan_forward(data, conv=False)


@SETTINGS
@given(data=st.data())
def test_conv_selective_scan_forward(data):
    check_scan_forward(data, conv=True)


def scan_grads(x, meta, dout, dlast):
    outs, t = call_scan(x, meta, grad=True)
    names = sorted(t)
    gr = torch.autograd.grad([outs["out"], outs["last_state"]], [t[k] for k in names],
                             [dev(dout), dev(dlast)], allow_unused=True)
    sync()
    return {f"d{k}": cpu(v) for k, v in zip(names, gr)}


def scan_grad_affected(name, idx, meta, keys):
    """What a bad dout[b,c,t] or dlast_state[b,c,k] may reach."""
    b, d, l, n, g = (meta[k] for k in ("b", "d", "l", "n", "g"))
    lay = meta["lay"]
    ok = {}
    bi, c, tk = idx
    gb = 0 if lay["B"] != "grouped" else c // (d // g)
    gc = 0 if lay["C"] != "grouped" else c // (d // g)
    for key, shape in keys.items():
        m = np.zeros(shape, bool)
        k = key[1:]
        if name == "dout":
            t = tk
            if k in ("u", "delta", "x"):
                m[bi, c, : t + 1] = True
            elif k == "z":
                m[bi, c, t] = True
            elif k == "initial_state":
                m[bi, c] = True
            elif k in ("A", "D", "delta_bias", "conv_weight", "conv_bias"):
                m[c] = True
            elif k in ("B", "C"):
                grp = gb if k == "B" else gc
                if lay[k] == "const":
                    m[c] = True
                elif lay[k] == "shared":
                    if k == "B":
                        m[bi, :, : t + 1] = True
                    else:
                        m[bi, :, t] = True
                else:
                    if k == "B":
                        m[bi, grp, :, : t + 1] = True
                    else:
                        m[bi, grp, :, t] = True
        else:  # dlast_state[b, c, k]: the state k of channel c, every time step
            kk = tk
            if k in ("u", "delta", "x"):
                m[bi, c] = True
            elif k == "initial_state":
                m[bi, c, kk] = True
            elif k == "A":
                m[c, kk] = True
            elif k in ("delta_bias", "conv_weight", "conv_bias"):
                m[c] = True
            elif k == "B":
                if lay["B"] == "const":
                    m[c, kk] = True
                elif lay["B"] == "shared":
                    m[bi, kk] = True
                else:
                    m[bi, gb, kk] = True
            # dz, dD and dC do not involve the state's gradient.
        ok[key] = m
    return ok


def check_scan_backward(data, conv):
    x, meta = draw_scan(data, conv)
    b, d, l, n = (meta[k] for k in ("b", "d", "l", "n"))
    rng = np.random.default_rng(1)
    dout, dlast = rng.standard_normal((b, d, l)), rng.standard_normal((b, d, n))
    name = data.draw(st.sampled_from(["dout", "dlast_state"]), label="poisoned gradient")
    idx = draw_index(data, (b, d, l) if name == "dout" else (b, d, n), name)
    value = data.draw(BAD, label="value")
    base = scan_grads(x, meta, dout, dlast)
    if name == "dout":
        dout = dout.copy()
        dout[idx] = value
    else:
        dlast = dlast.copy()
        dlast[idx] = value
    new = scan_grads(x, meta, dout, dlast)
    allowed = scan_grad_affected(name, idx, meta, {k: v.shape for k, v in base.items()})
    assert_isolated(base, new, allowed, f"{name}{list(idx)} = {value}")


@SETTINGS
@given(data=st.data())
def test_selective_scan_backward(data):
    check_scan_backward(data, conv=False)


@SETTINGS
@given(data=st.data())
def test_conv_selective_scan_backward(data):
    check_scan_backward(data, conv=True)


@SETTINGS
@given(data=st.data())
def test_selective_scan_backward_batch_entries(data):
    """A bad element of one batch entry's input reaches no other batch entry's
    gradient of a per-batch input (u, delta, z, initial_state, B/C (b, ...))."""
    x, meta = draw_scan(data)
    b, d, l, n = (meta[k] for k in ("b", "d", "l", "n"))
    per_batch = [k for k in sorted(x) if k in ("u", "delta", "z", "initial_state")
                 or (k in "BC" and meta["lay"][k] != "const")]
    name = data.draw(st.sampled_from(per_batch), label="poisoned input")
    idx = draw_index(data, x[name].shape, name)
    value = data.draw(BAD, label="value")
    rng = np.random.default_rng(2)
    dout, dlast = rng.standard_normal((b, d, l)), rng.standard_normal((b, d, n))
    base = scan_grads(x, meta, dout, dlast)
    new = scan_grads(poisoned(x, name, idx, value), meta, dout, dlast)
    keep = {f"d{k}" for k in per_batch}
    base = {k: v for k, v in base.items() if k in keep}
    new = {k: v for k, v in new.items() if k in keep}
    allowed = {}
    for k, v in base.items():
        m = np.ones(v.shape, bool)
        m[[i for i in range(b) if i != idx[0]]] = False
        allowed[k] = m
    assert_isolated(base, new, allowed, f"{name}{list(idx)} = {value}")


# --------------------------------------------------------------------- causal conv1d

def draw_conv(data):
    b = data.draw(st.integers(1, 3), label="b")
    d = data.draw(st.integers(1, 20), label="d")
    l = data.draw(st.integers(1, 40), label="l")
    w = data.draw(st.integers(2, 8), label="w")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31), label="seed"))
    x = dict(x=rng.standard_normal((b, d, l)), weight=rng.standard_normal((d, w)) * 0.5)
    if data.draw(st.booleans(), label="bias"):
        x["bias"] = rng.standard_normal(d) * 0.1
    if data.draw(st.booleans(), label="initial_states"):
        x["initial_states"] = rng.standard_normal((b, d, w - 1))
    act = data.draw(st.sampled_from([None, "silu"]), label="activation")
    return x, dict(b=b, d=d, l=l, w=w, act=act)


def call_conv(x, meta, grad=False):
    t = {k: dev(v, grad) for k, v in x.items()}
    out, fin = ma.causal_conv1d_fn(t["x"], t["weight"], t.get("bias"), t.get("initial_states"),
                                   return_final_states=True, activation=meta["act"])
    sync()
    return {"out": out, "final_states": fin}, t


def conv_affected(name, idx, meta):
    b, d, l, w = (meta[k] for k in ("b", "d", "l", "w"))
    out = np.zeros((b, d, l), bool)
    fin = np.zeros((b, d, w - 1), bool)
    if name in ("x", "initial_states"):
        bi, c, t = idx
        p = t + (w - 1) if name == "x" else t  # index into xpad = [initial_states | x]
        # out[t'] reads xpad[t' .. t' + w - 1]; final_states = xpad[l .. l + w - 2]
        out[bi, c, max(0, p - (w - 1)): p + 1] = True
        if p >= l:
            fin[bi, c, p - l] = True
    else:  # weight / bias of channel c
        out[:, idx[0]] = True
    return {"out": out, "final_states": fin}


@SETTINGS
@given(data=st.data())
def test_causal_conv1d_forward(data):
    x, meta = draw_conv(data)
    name = data.draw(st.sampled_from(sorted(x)), label="poisoned input")
    idx = draw_index(data, x[name].shape, name)
    value = data.draw(BAD, label="value")
    with torch.no_grad():
        base = np_outs(call_conv(x, meta)[0])
        new = np_outs(call_conv(poisoned(x, name, idx, value), meta)[0])
    assert_isolated(base, new, conv_affected(name, idx, meta), f"{name}{list(idx)} = {value}")


@SETTINGS
@given(data=st.data())
def test_causal_conv1d_backward(data):
    x, meta = draw_conv(data)
    b, d, l, w = (meta[k] for k in ("b", "d", "l", "w"))
    rng = np.random.default_rng(3)
    dout, dfin = rng.standard_normal((b, d, l)), rng.standard_normal((b, d, w - 1))
    name = data.draw(st.sampled_from(["dout", "dfinal_states"]), label="poisoned gradient")
    idx = draw_index(data, dout.shape if name == "dout" else dfin.shape, name)
    value = data.draw(BAD, label="value")

    def grads(dout, dfin):
        outs, t = call_conv(x, meta, grad=True)
        names = sorted(t)
        gr = torch.autograd.grad([outs["out"], outs["final_states"]], [t[k] for k in names],
                                 [dev(dout), dev(dfin)])
        sync()
        return {f"d{k}": cpu(v) for k, v in zip(names, gr)}

    base = grads(dout, dfin)
    dout, dfin = dout.copy(), dfin.copy()
    (dout if name == "dout" else dfin)[idx] = value
    new = grads(dout, dfin)
    bi, c, t = idx
    # xpad index p of the bad gradient: out[t] reads xpad[t .. t+w-1]; final_states[m]
    # is xpad[l + m].
    lo, hi = (t, t + w - 1) if name == "dout" else (l + t, l + t)
    allowed = {}
    for key, v in base.items():
        m = np.zeros(v.shape, bool)
        if key == "dx":
            m[bi, c, max(0, lo - (w - 1)): max(0, hi - (w - 1) + 1)] = True
        elif key == "dinitial_states":
            m[bi, c, lo: min(hi + 1, w - 1)] = True
        elif key in ("dweight", "dbias") and name == "dout":
            m[c] = True  # (final_states are xpad itself: no weight in their gradient)
        allowed[key] = m
    assert_isolated(base, new, allowed, f"{name}{list(idx)} = {value}")


@SETTINGS
@given(data=st.data())
def test_causal_conv1d_update(data):
    b = data.draw(st.integers(1, 3), label="b")
    d = data.draw(st.integers(1, 20), label="d")
    w = data.draw(st.integers(2, 8), label="w")
    sl = data.draw(st.integers(w - 1, w + 4), label="state_len")
    lnew = data.draw(st.sampled_from([None, 1, 2, 5]), label="l_new")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31), label="seed"))
    x = dict(x=rng.standard_normal((b, d) if lnew is None else (b, d, lnew)),
             conv_state=rng.standard_normal((b, d, sl)), weight=rng.standard_normal((d, w)))
    if data.draw(st.booleans(), label="bias"):
        x["bias"] = rng.standard_normal(d)
    act = data.draw(st.sampled_from([None, "silu"]), label="activation")
    seqlens = None
    if data.draw(st.booleans(), label="circular"):
        seqlens = torch.tensor(rng.integers(0, 3 * sl, b), dtype=torch.int32,
                               device=target_device())
    name = data.draw(st.sampled_from(sorted(x)), label="poisoned input")
    idx = draw_index(data, x[name].shape, name)
    value = data.draw(BAD, label="value")

    def run(x):
        t = {k: dev(v) for k, v in x.items()}
        out = ma.causal_conv1d_update(t["x"], t["conv_state"], t["weight"], t.get("bias"),
                                      activation=act, cache_seqlens=seqlens)
        sync()
        return {"out": cpu(out), "conv_state": cpu(t["conv_state"])}

    base, new = run(x), run(poisoned(x, name, idx, value))
    out = np.zeros(base["out"].shape, bool)
    state = np.zeros(base["conv_state"].shape, bool)
    if name in ("x", "conv_state"):
        out[idx[0], idx[1]] = True
        state[idx[0], idx[1]] = True
    else:
        out[:, idx[0]] = True
    assert_isolated(base, new, {"out": out, "conv_state": state}, f"{name}{list(idx)} = {value}")


# ------------------------------------------------------------------ rms_norm, swiglu

def draw_rows(data):
    rows = data.draw(st.integers(1, 70), label="rows")
    h = data.draw(st.integers(1, 40), label="h")
    return rows, h, np.random.default_rng(data.draw(st.integers(0, 2**31), label="seed"))


@SETTINGS
@given(data=st.data())
def test_rms_norm_forward(data):
    rows, h, rng = draw_rows(data)
    x = dict(x=rng.standard_normal((rows, h)), weight=rng.standard_normal(h))
    if data.draw(st.booleans(), label="bias"):
        x["bias"] = rng.standard_normal(h)
    # Mostly with a residual, and mostly a bad element in a row (x, residual): the
    # cases where a row's buffers are reused by the next rows.
    if data.draw(st.sampled_from([True, True, True, False]), label="residual"):
        x["residual"] = rng.standard_normal((rows, h))
    fp32 = data.draw(st.booleans(), label="residual_in_fp32")
    rowwise = [k for k in ("x", "residual") if k in x]
    name = data.draw(st.sampled_from(rowwise * 3 + sorted(x)), label="poisoned input")
    idx = draw_index(data, x[name].shape, name)
    value = data.draw(BAD, label="value")

    def run(x):
        t = {k: dev(v) for k, v in x.items()}
        out, res = ma.rms_norm_fn(t["x"], t["weight"], t.get("bias"), t.get("residual"),
                                  prenorm=True, residual_in_fp32=fp32)
        sync()
        return {"out": cpu(out), "residual_out": cpu(res)}

    base, new = run(x), run(poisoned(x, name, idx, value))
    out, res = np.zeros((rows, h), bool), np.zeros((rows, h), bool)
    if name in ("x", "residual"):
        out[idx[0]] = True
        res[idx] = True
    else:
        out[:, idx[0]] = True
    assert_isolated(base, new, {"out": out, "residual_out": res}, f"{name}{list(idx)} = {value}")


@SETTINGS
@given(data=st.data())
def test_rms_norm_backward(data):
    rows, h, rng = draw_rows(data)
    x = dict(x=rng.standard_normal((rows, h)), weight=rng.standard_normal(h),
             bias=rng.standard_normal(h), residual=rng.standard_normal((rows, h)))
    dy, dres = rng.standard_normal((rows, h)), rng.standard_normal((rows, h))
    name = data.draw(st.sampled_from(["dout", "dresidual_out"]), label="poisoned gradient")
    idx = draw_index(data, (rows, h), name)
    value = data.draw(BAD, label="value")

    def grads(dy, dres):
        t = {k: dev(v, True) for k, v in x.items()}
        out, res = ma.rms_norm_fn(t["x"], t["weight"], t["bias"], t["residual"], prenorm=True)
        names = sorted(t)
        gr = torch.autograd.grad([out, res], [t[k] for k in names], [dev(dy), dev(dres)])
        sync()
        return {f"d{k}": cpu(v) for k, v in zip(names, gr)}

    base = grads(dy, dres)
    dy, dres = dy.copy(), dres.copy()
    (dy if name == "dout" else dres)[idx] = value
    new = grads(dy, dres)
    r, k = idx
    allowed = {key: np.zeros(v.shape, bool) for key, v in base.items()}
    if name == "dout":
        allowed["dx"][r] = allowed["dresidual"][r] = True
        allowed["dweight"][:] = True  # Σ over rows of dy·ŝ
        allowed["dbias"][k] = True
    else:  # the residual stream's gradient adds to ds = dx = dresidual element-wise
        allowed["dx"][r, k] = allowed["dresidual"][r, k] = True
    assert_isolated(base, new, allowed, f"{name}{list(idx)} = {value}")


@SETTINGS
@given(data=st.data())
def test_swiglu(data):
    rows, h, rng = draw_rows(data)
    x = dict(gate=rng.standard_normal((rows, h)), up=rng.standard_normal((rows, h)))
    dy = rng.standard_normal((rows, h))
    name = data.draw(st.sampled_from(["gate", "up", "dout"]), label="poisoned")
    idx = draw_index(data, (rows, h), name)
    value = data.draw(BAD, label="value")

    def run(x, dy):
        t = {k: dev(v, True) for k, v in x.items()}
        out = ma.swiglu(t["gate"], t["up"])
        dg, du = torch.autograd.grad(out, [t["gate"], t["up"]], dev(dy))
        sync()
        return {"out": cpu(out), "dgate": cpu(dg), "dup": cpu(du)}

    base = run(x, dy)
    if name == "dout":
        dy = dy.copy()
        dy[idx] = value
        new = run(x, dy)
    else:
        new = run(poisoned(x, name, idx, value), dy)
    one = np.zeros((rows, h), bool)
    one[idx] = True
    allowed = {"out": one if name != "dout" else np.zeros_like(one), "dgate": one, "dup": one}
    assert_isolated(base, new, allowed, f"{name}{list(idx)} = {value}")


# ------------------------------------------------------------ selective_state_update

@SETTINGS
@given(data=st.data())
def test_selective_state_update(data):
    b = data.draw(st.integers(1, 3), label="b")
    d = data.draw(st.integers(1, 20), label="d")
    n = data.draw(st.integers(1, 40), label="n")
    g = divisor(data, d)
    grouped = {x: data.draw(st.booleans(), label=f"grouped {x}") for x in "BC"}
    softplus = data.draw(st.booleans(), label="softplus")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31), label="seed"))
    rows = list(range(b))
    cache = b
    if data.draw(st.booleans(), label="state_batch_indices"):
        cache = b + data.draw(st.integers(0, 2), label="extra rows")
        perm = data.draw(st.permutations(range(cache)), label="perm")
        rows = [r if data.draw(st.booleans(), label="keep") else -1 for r in perm[:b]]
    x = dict(state=rng.standard_normal((cache, d, n)), x=rng.standard_normal((b, d)),
             dt=(rng.standard_normal((b, d)) * 0.5 - 1.0) if softplus
             else rng.uniform(0.01, 0.2, (b, d)),
             A=-np.exp(rng.standard_normal((d, n))),
             B=rng.standard_normal((b, g, n) if grouped["B"] else (b, n)),
             C=rng.standard_normal((b, g, n) if grouped["C"] else (b, n)))
    for k in ("D", "z", "dt_bias"):
        if data.draw(st.booleans(), label=k):
            x[k] = rng.standard_normal((b, d) if k == "z" else d)
    name = data.draw(st.sampled_from(sorted(x)), label="poisoned input")
    idx = draw_index(data, x[name].shape, name)
    value = data.draw(BAD, label="value")
    idx_t = (torch.tensor(rows, dtype=torch.int32, device=target_device())
             if cache != b or rows != list(range(b)) else None)

    def run(x):
        t = {k: dev(v) for k, v in x.items()}
        out = ma.selective_state_update(
            t["state"], t["x"], t["dt"], t["A"], t["B"], t["C"], t.get("D"), t.get("z"),
            t.get("dt_bias"), dt_softplus=softplus, state_batch_indices=idx_t)
        sync()
        return {"out": cpu(out), "state": cpu(t["state"])}

    base, new = run(x), run(poisoned(x, name, idx, value))
    out = np.zeros((b, d), bool)
    state = np.zeros((cache, d, n), bool)
    live = [(bi, r) for bi, r in enumerate(rows) if r >= 0]
    if name == "state":
        r, c, k = idx
        state[idx] = True  # the poisoned element itself
        out[[bi for bi, rr in live if rr == r], c] = True
    elif name in ("x", "dt", "z"):
        bi, c = idx
        if rows[bi] >= 0:
            out[bi, c] = True
            if name != "z":
                state[rows[bi], c] = True
    elif name in ("A", "D", "dt_bias"):
        c = idx[0]
        out[:, c] = True
        for _, r in live:
            if name == "A":
                state[r, c, idx[1]] = True
            elif name == "dt_bias":
                state[r, c] = True
    else:  # B or C, (b, n) or (b, g, n)
        bi, k = idx[0], idx[-1]
        cs = chans(d, g, idx[1]) if grouped[name] else slice(None)
        if rows[bi] >= 0:
            out[bi, cs] = True
            if name == "B":
                state[rows[bi], cs, k] = True
    assert_isolated(base, new, {"out": out, "state": state}, f"{name}{list(idx)} = {value}")


# ------------------------------------------------------------------ hidden attention

@SETTINGS
@given(data=st.data())
def test_hidden_attention(data):
    b = data.draw(st.integers(1, 2), label="b")
    d = data.draw(st.integers(1, 6), label="d")
    l = data.draw(st.integers(1, 40), label="l")
    n = data.draw(st.integers(1, 20), label="n")
    g = divisor(data, d)
    lay = {x: data.draw(st.sampled_from(["const", "shared", "grouped"]), label=f"{x} layout")
           for x in "BC"}
    softplus = data.draw(st.booleans(), label="softplus")
    reduce = data.draw(st.sampled_from([None, "mean"]), label="reduce")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31), label="seed"))
    shape_bc = {"const": (d, n), "shared": (b, n, l), "grouped": (b, g, n, l)}
    x = dict(delta=(rng.standard_normal((b, d, l)) * 0.5 - 1.0) if softplus
             else rng.uniform(0.01, 0.2, (b, d, l)),
             A=-np.exp(rng.standard_normal((d, n))),
             B=rng.standard_normal(shape_bc[lay["B"]]), C=rng.standard_normal(shape_bc[lay["C"]]))
    if data.draw(st.booleans(), label="delta_bias"):
        x["delta_bias"] = rng.uniform(-2.0, -0.5, d) if softplus else rng.uniform(0.0, 0.05, d)
    name = data.draw(st.sampled_from(sorted(x)), label="poisoned input")
    idx = draw_index(data, x[name].shape, name)
    value = data.draw(BAD, label="value")

    def run(x):
        t = {k: dev(v) for k, v in x.items()}
        a = ma.hidden_attention(t["delta"], t["A"], t["B"], t["C"], t.get("delta_bias"),
                                delta_softplus=softplus, reduce=reduce)
        sync()
        return {"alpha": cpu(a)}

    base, new = run(x), run(poisoned(x, name, idx, value))
    upper = np.triu(np.ones((l, l), bool), 1)
    assert (new["alpha"][..., upper] == 0).all(), \
        f"{name}{list(idx)} = {value}: α is not 0 above the diagonal"
    ii, jj = np.meshgrid(np.arange(l), np.arange(l), indexing="ij")
    m = np.zeros((b, d, l, l), bool)
    if name == "delta":
        bi, c, t = idx
        m[bi, c] = (ii >= t) & (jj <= t)
    elif name == "A":
        m[:, idx[0]] = jj < ii
    elif name == "delta_bias":
        m[:, idx[0]] = jj <= ii
    else:
        if lay[name] == "const":
            m[:, idx[0]] = jj <= ii
        else:
            if lay[name] == "shared":
                (bi, k, t), cs = idx, slice(None)
            else:
                bi, gi, k, t = idx
                cs = chans(d, g, gi)
            # B_t enters column j = t (rows i >= t); C_t enters row i = t (columns j <= t)
            m[bi, cs] = ((jj == t) & (ii >= t)) if name == "B" else ((ii == t) & (jj <= t))
    if reduce == "mean":
        m = m.any(axis=1)
    assert_isolated(base, new, {"alpha": m}, f"{name}{list(idx)} = {value}")
