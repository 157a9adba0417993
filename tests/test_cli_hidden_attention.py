"""``python -m mamba_attention hidden-attention``: writes a PNG heatmap of a Mamba
layer's channel-mean hidden attention (random init or loaded weights)."""

from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from mamba_attention.__main__ import main  # noqa: E402
from mamba_attention.nn import Mamba  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def needs_matplotlib():
    pytest.importorskip("matplotlib")


def test_writes_png(tmp_path):
    needs_matplotlib()
    out = tmp_path / "map.png"
    assert main(["hidden-attention", "--out", str(out), "--seq-len", "24", "--d-model", "8",
                 "--seed", "3"]) == 0
    assert out.read_bytes()[:8] == PNG


def test_linear_scale(tmp_path):
    needs_matplotlib()
    out = tmp_path / "lin.png"
    assert main(["hidden-attention", "--out", str(out), "--seq-len", "9", "--d-model", "5",
                 "--linear"]) == 0
    assert out.read_bytes()[:8] == PNG


def test_as_module(tmp_path):
    needs_matplotlib()
    out = tmp_path / "m.png"
    r = subprocess.run([sys.executable, "-m", "mamba_attention", "hidden-attention", "--out", str(out),
                        "--seq-len", "16", "--d-model", "8"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == PNG


def test_weights_from_mamba_ssm_style_checkpoint(tmp_path):
    """A model checkpoint with several layers under backbone.layers.N.mixer. plus other keys."""
    needs_matplotlib()
    from mamba_attention._hidden_attention_cli import layer_from_state_dict, load_state_dict

    torch.manual_seed(0)
    layers = [Mamba(12, d_state=4, d_conv=3, bias=True), Mamba(12, d_state=4, d_conv=3, bias=True)]
    sd = {"backbone.embedding.weight": torch.randn(50, 12)}
    for i, m in enumerate(layers):
        sd.update({f"backbone.layers.{i}.mixer.{k}": v for k, v in m.state_dict().items()})
        sd[f"backbone.layers.{i}.norm.weight"] = torch.ones(12)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": sd}, path)
    loaded, prefix = layer_from_state_dict(load_state_dict(path), layer=1)
    assert prefix == "backbone.layers.1.mixer."
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, layers[1].state_dict()[k]), k
    out = tmp_path / "w.png"
    assert main(["hidden-attention", "--out", str(out), "--seq-len", "10", "--weights", str(path),
                 "--prefix", "backbone.layers.0.mixer."]) == 0
    assert out.read_bytes()[:8] == PNG
    # a bare layer's state_dict (prefix "") with an odd expand
    m = Mamba(7, expand=1.5, d_state=3)
    torch.save(m.state_dict(), tmp_path / "bare.pt")
    loaded, prefix = layer_from_state_dict(load_state_dict(tmp_path / "bare.pt"))
    assert prefix == "" and loaded.d_inner == 10


def test_bad_weights(tmp_path, capsys):
    needs_matplotlib()
    torch.save({"x": torch.zeros(2)}, tmp_path / "none.pt")
    assert main(["hidden-attention", "--out", str(tmp_path / "a.png"),
                 "--weights", str(tmp_path / "none.pt")]) == 2
    assert "no Mamba layer" in capsys.readouterr().err
    assert main(["hidden-attention", "--out", str(tmp_path / "a.png"),
                 "--weights", str(tmp_path / "missing.pt")]) == 2


def test_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["hidden-attention", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "[plot]" in err
    assert not (tmp_path / "x.png").exists()
