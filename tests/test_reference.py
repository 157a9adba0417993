"""Self-checks of tests/reference.py against a scalar, per-element brute force.

These need neither the compiled extension nor torch.
"""

import itertools
import math
import zlib

import numpy as np
import pytest

from reference import (rel_err, scalar_scan_ref, selective_scan_ref, selective_state_update_ref,
                       softplus)


def _bc(X, i, c, k, t, d):
    if X.ndim == 2:
        return X[c, k]
    if X.ndim == 3:
        return X[i, k, t]
    g = X.shape[1]
    return X[i, c // (d // g), k, t]


def brute_scan(u, delta, A, B, C, D, z, delta_bias, softplus_, h0):
    b, d, l = u.shape
    n = A.shape[1]
    out, last = np.zeros((b, d, l)), np.zeros((b, d, n))
    for i, c in itertools.product(range(b), range(d)):
        h = [0.0 if h0 is None else h0[i, c, k] for k in range(n)]
        for t in range(l):
            dt = delta[i, c, t] + (0.0 if delta_bias is None else delta_bias[c])
            if softplus_ and dt <= 20.0:
                dt = math.log1p(math.exp(dt))
            y = 0.0
            for k in range(n):
                h[k] = math.exp(dt * A[c, k]) * h[k] + dt * _bc(B, i, c, k, t, d) * u[i, c, t]
                y += _bc(C, i, c, k, t, d) * h[k]
            if D is not None:
                y += D[c] * u[i, c, t]
            if z is not None:
                y *= z[i, c, t] / (1.0 + math.exp(-z[i, c, t]))
            out[i, c, t] = y
        last[i, c] = h
    return out, last


def _inputs(rng, b, d, l, n, g, bl, cl):
    shape = {"const": (d, n), "shared": (b, n, l), "grouped": (b, g, n, l)}
    return dict(
        u=rng.standard_normal((b, d, l)), delta=rng.uniform(-1.0, 1.0, (b, d, l)),
        A=-np.exp(rng.standard_normal((d, n))), B=rng.standard_normal(shape[bl]),
        C=rng.standard_normal(shape[cl]), D=rng.standard_normal(d),
        z=rng.standard_normal((b, d, l)), delta_bias=rng.uniform(0.0, 0.5, d),
        initial_state=rng.standard_normal((b, d, n)))


LAYOUTS = list(itertools.product(["const", "shared", "grouped"], repeat=2))


@pytest.mark.parametrize("bl,cl", LAYOUTS)
@pytest.mark.parametrize("opts", list(itertools.product([False, True], repeat=5)),
                         ids=lambda o: "".join("DZbsi"[j] if v else "-" for j, v in enumerate(o)))
def test_scan_ref_matches_brute_force(bl, cl, opts):
    use_D, use_z, use_bias, sp, use_h0 = opts
    rng = np.random.default_rng(zlib.crc32(repr((bl, cl, opts)).encode()))
    x = _inputs(rng, b=2, d=4, l=5, n=3, g=2, bl=bl, cl=cl)
    x["D"], x["z"] = (x["D"] if use_D else None), (x["z"] if use_z else None)
    x["delta_bias"] = x["delta_bias"] if use_bias else None
    x["initial_state"] = x["initial_state"] if use_h0 else None
    out, last = selective_scan_ref(**x, delta_softplus=sp, return_last_state=True)
    exp_out, exp_last = brute_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                   x["delta_bias"], sp, x["initial_state"])
    np.testing.assert_allclose(out, exp_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(last, exp_last, rtol=1e-12, atol=1e-12)
    assert np.array_equal(selective_scan_ref(**x, delta_softplus=sp), out)


def test_scan_ref_grouped_channel_mapping():
    # d=6, g=3: channels (0,1)->group 0, (2,3)->1, (4,5)->2; grouped == shared per group.
    rng = np.random.default_rng(1)
    x = _inputs(rng, b=1, d=6, l=4, n=2, g=3, bl="grouped", cl="grouped")
    out = selective_scan_ref(**x)
    for c in range(6):
        y = {k: v[:, c:c + 1] for k, v in x.items() if k in ("u", "delta", "z", "initial_state")}
        y.update(A=x["A"][c:c + 1], D=x["D"][c:c + 1], delta_bias=x["delta_bias"][c:c + 1],
                 B=x["B"][:, c // 2], C=x["C"][:, c // 2])
        np.testing.assert_allclose(selective_scan_ref(**y), out[:, c:c + 1], rtol=1e-13)


def test_scan_ref_single_step_closed_form():
    u, delta, A, B, C = (np.array([[[2.0]]]), np.array([[[0.5]]]), np.array([[-1.0]]),
                         np.array([[3.0]]), np.array([[4.0]]))
    y = selective_scan_ref(u, delta, A, B, C, D=np.array([0.25]))
    assert y[0, 0, 0] == pytest.approx(4.0 * 0.5 * 3.0 * 2.0 + 0.25 * 2.0, rel=1e-15)


def test_softplus_threshold():
    x = np.array([-50.0, 0.0, 19.0, 20.0, 20.5, 1e4])
    np.testing.assert_allclose(softplus(x), [math.log1p(math.exp(-50.0)), math.log(2.0),
                                             math.log1p(math.exp(19.0)),
                                             math.log1p(math.exp(20.0)), 20.5, 1e4])
    assert np.isfinite(softplus(np.array([1e6]))).all()


@pytest.mark.parametrize("grouped_B,grouped_C", list(itertools.product([False, True], repeat=2)))
@pytest.mark.parametrize("opts", list(itertools.product([False, True], repeat=4)))
def test_state_update_ref_is_one_scan_step(grouped_B, grouped_C, opts):
    use_D, use_z, use_bias, sp = opts
    rng = np.random.default_rng(7)
    b, d, n, g = 3, 4, 5, 2
    x = _inputs(rng, b=b, d=d, l=1, n=n, g=g, bl="grouped" if grouped_B else "shared",
                cl="grouped" if grouped_C else "shared")
    kw = dict(D=x["D"] if use_D else None, delta_bias=x["delta_bias"] if use_bias else None)
    ref_out, ref_last = selective_scan_ref(
        x["u"], x["delta"], x["A"], x["B"], x["C"], z=x["z"] if use_z else None,
        delta_softplus=sp, return_last_state=True, initial_state=x["initial_state"], **kw)
    state = x["initial_state"].copy()
    out, new_state = selective_state_update_ref(
        state, x["u"][..., 0], x["delta"][..., 0], x["A"], x["B"][..., 0], x["C"][..., 0],
        D=kw["D"], z=x["z"][..., 0] if use_z else None, dt_bias=kw["delta_bias"], dt_softplus=sp)
    np.testing.assert_array_equal(state, x["initial_state"])  # not mutated
    np.testing.assert_allclose(out, ref_out[..., 0], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(new_state, ref_last, rtol=1e-13, atol=1e-13)


def test_state_update_ref_batch_indices():
    rng = np.random.default_rng(3)
    b, d, n, cache = 3, 2, 4, 5
    state = rng.standard_normal((cache, d, n))
    x, dt, z = (rng.standard_normal((b, d)) for _ in range(3))
    dt = np.abs(dt)
    A, B, C = -np.exp(rng.standard_normal((d, n))), rng.standard_normal((b, n)), rng.standard_normal((b, n))
    idx = np.array([4, -1, 1])
    out, new = selective_state_update_ref(state, x, dt, A, B, C, z=z, state_batch_indices=idx)
    assert np.all(out[1] == 0.0)
    np.testing.assert_array_equal(new[[0, 2, 3]], state[[0, 2, 3]])
    for i, row in ((0, 4), (2, 1)):
        o, s = selective_state_update_ref(state[row:row + 1], x[i:i + 1], dt[i:i + 1], A,
                                          B[i:i + 1], C[i:i + 1], z=z[i:i + 1])
        np.testing.assert_allclose(out[i], o[0], rtol=1e-14)
        np.testing.assert_allclose(new[row], s[0], rtol=1e-14)


def test_rel_err():
    a = np.array([1.0, 2.0, 3.0])
    assert rel_err(a, a) == 0.0
    assert rel_err(a * (1 + 1e-6), a) == pytest.approx(1e-6)
    assert rel_err(np.array([1.0, np.nan, 3.0]), a) == float("inf")
    assert rel_err(a[:2], a) == float("inf")
    assert rel_err(a.astype(np.float32), a) == 0.0


def test_scalar_scan_ref():
    rng = np.random.default_rng(11)
    l = 300
    u, B, C = (rng.standard_normal(l) for _ in range(3))
    dt, A, h0 = rng.uniform(0.01, 0.5, l), -0.7, 1.3
    y, h = scalar_scan_ref(u, dt, A, B, C, h0)
    ry, rh = selective_scan_ref(u[None, None], dt[None, None], np.array([[A]]), B[None, None],
                                C[None, None], return_last_state=True,
                                initial_state=np.array([[[h0]]]))
    np.testing.assert_allclose(y, ry[0, 0], rtol=1e-12, atol=1e-13)
    assert h == pytest.approx(rh[0, 0, 0], rel=1e-12)
