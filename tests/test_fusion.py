"""Activation fusion: found by watching a forward pass, kept only when the outputs do not change."""

from __future__ import annotations

import copy

import torch
from torch import nn

import sparsepress as sp
from sparsepress.fusion import activation_kind, fuse_activations, probe_inputs
from sparsepress.nn import SparseLinear
from tiny import tiny_bert, token_ids


def sparse(in_features: int, out_features: int) -> SparseLinear:
    torch.manual_seed(in_features * 31 + out_features)
    return SparseLinear.from_linear(nn.Linear(in_features, out_features), format="bitmask", dtype="int8")


class Mlp(nn.Module):
    def __init__(self, act: nn.Module | None = None):
        super().__init__()
        self.up, self.act, self.down = sparse(16, 32), act or nn.GELU(), sparse(32, 16)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class ResidualTrap(Mlp):
    """The pre-activation output is used again outside any module: fusing would change the result."""

    def forward(self, x):
        h = self.up(x)
        return self.down(self.act(h) + h)


class FaintResidualTrap(Mlp):
    """The pre-activation is reused, but so faintly that the outputs barely move: only the watch of
    the operations reading it can tell."""

    def forward(self, x):
        h = self.up(x)
        return self.down(self.act(h) + 1e-4 * h)


class ShapeReader(Mlp):
    """Reads the linear's output's shape (no tensor comes of it) before the activation: still fusable."""

    def forward(self, x):
        h = self.up(x)
        assert h.shape[-1] == h.size(-1) == 32 and h.dim() == 2
        return self.down(self.act(h))


class SharedAct(nn.Module):
    """One activation module called twice: turning it into Identity would break the second use."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.act = sparse(16, 16), sparse(16, 16), nn.ReLU()

    def forward(self, x):
        return self.act(self.b(self.act(self.a(x))))


def test_mlp_is_fused_and_outputs_are_unchanged():
    model = Mlp().eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        before = model(x)
    assert fuse_activations(model, probe=(x,)) == ["up"]
    assert model.up.activation == "gelu" and isinstance(model.act, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)


def test_hidden_reuse_is_detected_and_undone():
    model = ResidualTrap().eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        before = model(x)
    assert fuse_activations(model, probe=(x,)) == []
    assert model.up.activation is None and isinstance(model.act, nn.GELU)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)


def test_faint_reuse_is_caught_by_the_read_watch_and_shape_reads_are_not():
    x = torch.randn(3, 16)
    trap = FaintResidualTrap().eval()
    assert fuse_activations(trap, probe=(x,)) == []
    assert trap.up.activation is None and isinstance(trap.act, nn.GELU)
    reader = ShapeReader().eval()
    assert fuse_activations(reader, probe=(x,)) == ["up"]


def test_shared_activation_module_is_left_alone():
    model = SharedAct().eval()
    assert fuse_activations(model, probe=(torch.randn(2, 16),)) == []
    assert isinstance(model.act, nn.ReLU)


def test_unknown_activation_and_no_probe_leave_the_model_unchanged():
    model = Mlp(act=nn.Tanh()).eval()
    assert fuse_activations(model, probe=(torch.randn(2, 16),)) == []
    assert fuse_activations(Mlp().eval()) == []  # no config: no default probe
    assert probe_inputs(Mlp()) is None


def test_activation_kinds():
    from transformers.activations import ACT2FN

    assert activation_kind(nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert activation_kind(ACT2FN["gelu"]) == "gelu"
    assert activation_kind(ACT2FN["gelu_new"]) == "gelu_tanh"
    assert activation_kind(ACT2FN["silu"]) == "silu"
    assert activation_kind(ACT2FN["quick_gelu"]) is None


def test_compress_and_load_fuse_bert_intermediate(tmp_path):
    model = sp.compress(tiny_bert(), {"stages": [{"prune": {"method": "wanda", "sparsity": 0.5}},
                                                 {"quantize": {"method": "rtn", "bits": 8}}]},
                        calibration=token_ids(4))
    fused = sorted(n for n, m in model.named_modules() if isinstance(m, SparseLinear) and m.activation)
    assert fused == ["encoder.layer.0.intermediate.dense", "encoder.layer.1.intermediate.dense"]
    sp.save(model, tmp_path / "m")
    loaded = sp.load(tmp_path / "m")
    assert sorted(n for n, m in loaded.named_modules() if isinstance(m, SparseLinear) and m.activation) == fused
    ids = torch.stack(token_ids(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)
    plain = copy.deepcopy(loaded)
    for name in fused:
        layer = plain.get_submodule(name)
        layer.activation = None
        plain.get_submodule(name.rsplit(".", 1)[0]).intermediate_act_fn = nn.GELU()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).last_hidden_state, loaded(input_ids=ids).last_hidden_state,
                                   rtol=1e-3, atol=1e-3)
