"""Hypothesis property tests: random valid shapes, layouts and options vs the reference."""

import os
from contextlib import contextmanager

import pytest

pytest.importorskip("mamba_attention._core")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

from conftest import SIMD_LEVELS, run_scan, run_update  # noqa: E402

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


@contextmanager
def forced_simd(level):
    """Like the simd_level fixture, but usable inside a Hypothesis example."""
    old = os.environ.get("MAMBA_ATTENTION_SIMD")
    os.environ["MAMBA_ATTENTION_SIMD"] = level
    try:
        yield
    finally:
        if old is None:
            del os.environ["MAMBA_ATTENTION_SIMD"]
        else:
            os.environ["MAMBA_ATTENTION_SIMD"] = old


@st.composite
def divisor(draw, d):
    return draw(st.sampled_from([g for g in range(1, d + 1) if d % g == 0]))


@SETTINGS
@given(data=st.data(), b=st.integers(1, 3), d=st.integers(1, 40), n=st.integers(1, 32),
       l=st.integers(1, 300), opts=st.fixed_dictionaries({k: st.booleans() for k in (
           "D", "z", "delta_bias", "softplus", "initial_state", "last_state")}),
       B=st.sampled_from(["const", "shared", "grouped"]),
       C=st.sampled_from(["const", "shared", "grouped"]),
       seed=st.integers(0, 2**32 - 1))
def test_scan_matches_reference(data, b, d, n, l, opts, B, C, seed):
    g = data.draw(divisor(d), label="g")
    level = data.draw(st.sampled_from(SIMD_LEVELS), label="simd")
    last_state = opts.pop("last_state")
    with forced_simd(level):
        run_scan(b=b, d=d, n=n, l=l, g=g, B=B, C=C, seed=seed, last_state=last_state, **opts)


@SETTINGS
@given(data=st.data(), b=st.integers(1, 3), d=st.integers(1, 40), n=st.integers(1, 32),
       opts=st.fixed_dictionaries({k: st.booleans() for k in ("D", "z", "dt_bias", "softplus")}),
       grouped_B=st.booleans(), grouped_C=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_state_update_matches_reference(data, b, d, n, opts, grouped_B, grouped_C, seed):
    g = data.draw(divisor(d), label="g")
    level = data.draw(st.sampled_from(SIMD_LEVELS), label="simd")
    cache = data.draw(st.integers(b, b + 3), label="cache")
    idx = None
    if data.draw(st.booleans(), label="use indices"):
        perm = data.draw(st.permutations(range(cache)), label="perm")
        keep = data.draw(st.lists(st.booleans(), min_size=b, max_size=b), label="keep")
        idx = [row if k else -1 for row, k in zip(perm[:b], keep)]
    with forced_simd(level):
        run_update(b=b, d=d, n=n, g=g, grouped_B=grouped_B, grouped_C=grouped_C, seed=seed,
                   indices=idx, cache=None if idx is None else cache, **opts)
