"""Argument checks of the modules' constructors and inputs (SPEC conventions: a
TypeError or ValueError that names the argument, says what was expected and what
was given). Module hyper-parameters exist only here; the tensors a module passes
on are checked again by the Rust core."""

from __future__ import annotations

import math
import operator

import torch


def _what(value):
    return f"{type(value).__name__} {value!r}"


def int_arg(name, value, minimum=1):
    """``value`` as an int ≥ ``minimum`` (Python / NumPy ints; not bool or float)."""
    if isinstance(value, bool) or type(value).__name__ in ("bool_", "bool"):
        raise TypeError(f"{name}: expected an int ≥ {minimum}, got {_what(value)}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an int ≥ {minimum}, got {_what(value)}") from None
    if not minimum <= v < 2**63:
        raise ValueError(f"{name}: expected an int ≥ {minimum} (below 2**63), got {v}")
    return v


def float_arg(name, value, minimum=None, exclusive=False):
    """``value`` as a finite float (≥ ``minimum``, or > with ``exclusive``)."""
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise TypeError(f"{name}: expected a float, got {_what(value)}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a float, got {_what(value)}") from None
    if not math.isfinite(v) or (minimum is not None and (v <= minimum if exclusive
                                                          else v < minimum)):
        bound = "" if minimum is None else f" {'>' if exclusive else '≥'} {minimum}"
        raise ValueError(f"{name}: expected a finite float{bound}, got {value!r}")
    return v


def bool_arg(name, value):
    """``value`` as a bool (bool or numpy.bool_)."""
    if isinstance(value, bool) or type(value).__name__ in ("bool_", "bool"):
        return bool(value)
    raise TypeError(f"{name}: expected a bool (True or False), got {_what(value)}")


def tensor_arg(name, x, shape_desc, last=None, ndim=None, last_name="d_model"):
    """Checks that ``x`` is a floating torch.Tensor of ``ndim`` dimensions (any
    ≥ 1 if None) whose last dimension is ``last`` (the module's ``last_name``);
    ``shape_desc`` names the expected shape in messages, e.g. "(b, l, 16)".
    Returns the shape."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape {shape_desc}, "
                        f"got {type(x).__name__}")
    if not (x.is_floating_point()):
        raise TypeError(f"{name}: expected a floating-point tensor of shape {shape_desc}, "
                        f"got dtype {x.dtype}")
    if (ndim is not None and x.dim() != ndim) or x.dim() == 0:
        rank = f"a {ndim}-d tensor" if ndim is not None else "a tensor"
        raise ValueError(f"{name}: expected {rank} of shape {shape_desc}, got shape "
                         f"{tuple(x.shape)}")
    if last is not None and x.shape[-1] != last:
        raise ValueError(f"{name}: expected last dimension {last_name} = {last} (shape "
                         f"{shape_desc}), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor of shape {shape_desc}, got "
                         f"{tuple(x.shape)}")
    return x.shape
