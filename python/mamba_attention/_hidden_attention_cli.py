"""``python -m mamba_attention hidden-attention``: draw the channel-mean hidden
attention (SPEC §4) of one Mamba layer as a heatmap.

The layer is :class:`mamba_attention.nn.Mamba`, randomly initialised (mamba_ssm's
initialisation, seeded by ``--seed``) or loaded from ``--weights``. The input is
``--seed``-seeded standard normal noise of shape (1, seq_len, d_model).

Weights: a file saved by ``torch.save`` (a state_dict, or a dict holding one under
"state_dict" / "model") or a ``.safetensors`` file (needs the safetensors package).
The layer's parameters are found by the key suffix ``A_log``: every prefix P with
``P + "A_log"`` in the file is a Mamba layer (e.g. ``backbone.layers.0.mixer.`` in a
mamba_ssm MambaLMHeadModel checkpoint; "" for a bare layer's state_dict). ``--prefix``
picks one explicitly, else ``--layer I`` (default 0) picks the I-th in numeric
order. The layer's sizes (d_model, d_inner, d_state, d_conv, dt_rank, biases) are read
from the shapes, so ``--d-model`` is ignored with ``--weights``.

The picture: α̅[i, j] = mean over channels of α[c, i, j] (rows i = output position,
columns j = input position; lower-triangular). By default |α̅| on a logarithmic colour
scale, since the decay along each row is exponential (``--linear`` draws the signed
values on a diverging linear scale instead). The upper triangle is left blank.
"""

from __future__ import annotations

import re
import sys

PLOT_HINT = "pip install 'mamba-attention[plot]' (or pip install matplotlib)"


def _natural_key(s):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def load_state_dict(path):
    """A flat {name: tensor} from a torch or safetensors file."""
    import torch

    if str(path).endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise RuntimeError(f"--weights {path}: reading .safetensors needs the safetensors package ({e})")
        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"--weights {path}: expected a state_dict (a dict of tensors), got {type(obj).__name__}")
    return obj


def mamba_prefixes(sd):
    """Every prefix P such that P + "A_log" is a key, in numeric order."""
    return sorted({k[: -len("A_log")] for k in sd if k.endswith("A_log")}, key=_natural_key)


def layer_from_state_dict(sd, prefix=None, layer=0):
    """(Mamba layer holding the weights, the prefix used)."""
    from .nn import Mamba

    prefixes = mamba_prefixes(sd)
    if prefix is None:
        if not prefixes:
            raise ValueError("--weights: no Mamba layer found (no key ending in 'A_log')")
        if not 0 <= layer < len(prefixes):
            raise ValueError(f"--layer: expected 0 ≤ layer < {len(prefixes)} (the Mamba layers found), got {layer}")
        prefix = prefixes[layer]
    elif prefix + "A_log" not in sd:
        raise ValueError(f"--prefix: no key {prefix + 'A_log'!r} in the weights (found prefixes: {prefixes[:8]})")
    sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    need = ["A_log", "in_proj.weight", "conv1d.weight", "dt_proj.weight", "x_proj.weight"]
    missing = [k for k in need if k not in sub]
    if missing:
        raise ValueError(f"--weights: layer {prefix!r} lacks {missing}")
    d_inner, d_state = sub["A_log"].shape
    d_model = sub["in_proj.weight"].shape[1]
    m = Mamba(
        d_model,
        d_state=d_state,
        d_conv=sub["conv1d.weight"].shape[-1],
        expand=(d_inner + 0.25) / d_model,  # int(expand · d_model) == d_inner exactly
        dt_rank=sub["dt_proj.weight"].shape[1],
        conv_bias="conv1d.bias" in sub,
        bias="in_proj.bias" in sub,
    )
    keys = set(m.state_dict())
    m.load_state_dict({k: v.float() for k, v in sub.items() if k in keys}, strict=True)
    return m, prefix


def run(args):
    """The subcommand; returns the exit status."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LogNorm, TwoSlopeNorm
    except ImportError:
        print(f"error: hidden-attention draws with matplotlib, which is not installed: {PLOT_HINT}",
              file=sys.stderr)
        return 2
    try:
        import torch
    except ImportError:
        print("error: hidden-attention needs PyTorch: pip install 'mamba-attention[torch]'", file=sys.stderr)
        return 2
    import numpy as np

    if args.seq_len < 1 or args.d_model < 1:
        print("error: --seq-len and --d-model must be at least 1", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    if args.weights:
        try:
            m, prefix = layer_from_state_dict(load_state_dict(args.weights), args.prefix, args.layer)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        source = f"{args.weights} [{prefix or 'layer'}]"
    else:
        from .nn import Mamba

        m = Mamba(args.d_model)
        source = f"random init (seed {args.seed})"
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(1, args.seq_len, m.d_model, generator=g)
    alpha = m.hidden_attention(x)[0].numpy().astype(np.float64)  # (l, l)

    l = alpha.shape[0]
    upper = np.triu(np.ones((l, l), dtype=bool), 1)
    fig, ax = plt.subplots(figsize=(6.4, 5.4), dpi=args.dpi)
    if args.linear:
        vmax = float(np.abs(alpha).max()) or 1.0
        img = np.ma.masked_where(upper, alpha)
        im = ax.imshow(img, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -vmax, vmax), interpolation="nearest")
        label = "mean over channels of α[c, i, j]"
    else:
        mag = np.abs(alpha)
        pos = mag[~upper & (mag > 0)]
        vmax = float(pos.max()) if pos.size else 1.0
        vmin = max(float(pos.min()) if pos.size else vmax * 1e-8, vmax * 1e-8)
        img = np.ma.masked_where(upper | (mag <= 0), mag)
        im = ax.imshow(img, cmap="magma", norm=LogNorm(vmin=vmin, vmax=vmax), interpolation="nearest")
        label = "|mean over channels of α[c, i, j]| (log scale)"
    fig.colorbar(im, ax=ax, label=label)
    ax.set_xlabel("j (input position)")
    ax.set_ylabel("i (output position)")
    ax.set_title(f"Mamba hidden attention: d_model {m.d_model}, d_inner {m.d_inner}, "
                 f"d_state {m.d_state}, l {l}\n{source}", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out)
    plt.close(fig)
    print(f"wrote {args.out} ({l}×{l}, |α̅| from {np.abs(alpha)[~upper].min():.3g} "
          f"to {np.abs(alpha).max():.3g})", file=sys.stderr)
    return 0


def add_parser(sub):
    """Registers the subcommand on an argparse subparsers object."""
    p = sub.add_parser(
        "hidden-attention",
        help="draw the channel-mean hidden attention of a Mamba layer as a heatmap (needs matplotlib)",
        description=__doc__.split("\n\n")[0].replace("``", ""),
    )
    p.add_argument("--out", required=True, metavar="PATH", help="image file to write (e.g. map.png)")
    p.add_argument("--seq-len", type=int, default=128, metavar="L", help="sequence length (default 128)")
    p.add_argument("--d-model", type=int, default=64, metavar="D",
                   help="d_model of the random layer (default 64; ignored with --weights)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the init and the input (default 0)")
    p.add_argument("--weights", metavar="PATH",
                   help="state_dict (torch.save or .safetensors) of a Mamba layer or of a model holding some, "
                        "e.g. a mamba_ssm checkpoint (layers found by their A_log keys)")
    p.add_argument("--prefix", metavar="P", help="key prefix of the layer in --weights, e.g. backbone.layers.0.mixer.")
    p.add_argument("--layer", type=int, default=0, metavar="I",
                   help="with --weights and no --prefix: the I-th Mamba layer found (default 0)")
    p.add_argument("--linear", action="store_true", help="signed values on a linear scale instead of log |α̅|")
    p.add_argument("--dpi", type=int, default=120, help="resolution (default 120)")
    p.set_defaults(func=run)
    return p
