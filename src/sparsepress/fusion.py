"""Fusing activation modules into the SparseLinear that feeds them (one kernel call instead of two).

A transformer MLP runs `act(up(x))`: torch spends a whole pass over the intermediate outputs (and,
at 16 tokens, more in dispatch than in arithmetic) on the activation alone. When a SparseLinear's
output goes to an activation module and nowhere else, the kernel can apply the activation to its
outputs while they are still in cache, and the module becomes an `nn.Identity`.

Which pairs qualify is found by watching one short forward pass (no module names involved, so any
architecture works): the linear's output must be the input of exactly one module, an activation
of a known kind, called once, and no torch operation outside that module may read it (a residual
add of the pre-activation, say: seen by a TorchFunctionMode during the watch). The fused model is
then run on the same probe as a sanity check; an output that moves by more than int8 rounding
downstream can explain (a few percent) undoes every fusion.

Example:
    >>> import torch
    >>> from sparsepress.nn import SparseLinear
    >>> class Mlp(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.up = SparseLinear.from_linear(torch.nn.Linear(8, 16), format="dense", dtype="fp32")
    ...         self.act = torch.nn.GELU()
    ...     def forward(self, x):
    ...         return self.act(self.up(x))
    >>> model = Mlp()
    >>> fuse_activations(model, probe=(torch.randn(2, 8),))
    ['up']
    >>> model.up.activation, type(model.act).__name__
    ('gelu', 'Identity')
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .nn.sparse_linear import SparseLinear

# Activation module classes (by class name, so no optional package is imported) -> fused kind.
_KINDS: dict[str, Callable[[nn.Module], str | None]] = {
    "GELU": lambda m: {"none": "gelu", "tanh": "gelu_tanh"}.get(getattr(m, "approximate", "none")),
    "GELUActivation": lambda m: "gelu",  # transformers: erf GELU (torch's or its Python copy)
    "GELUTanh": lambda m: "gelu_tanh",
    "PytorchGELUTanh": lambda m: "gelu_tanh",
    "NewGELUActivation": lambda m: "gelu_tanh",
    "ReLU": lambda m: "relu",
    "SiLU": lambda m: "silu",
    "SiLUActivation": lambda m: "silu",
}

# Fused and unfused outputs differ by int8 roundings that flip downstream of a ~1e-6 change in one
# activation: ~1.5% of the output's norm on all-MiniLM-L6-v2's pooler (measured). Anything a real
# mistake would cause (a wrong activation, a pre-activation used elsewhere) moves it far more.
_TOLERANCE = 5e-2


def activation_kind(module: nn.Module) -> str | None:
    """The fused-activation name for an activation module, or None if it cannot be fused.

    Example:
        >>> activation_kind(torch.nn.GELU()), activation_kind(torch.nn.Tanh())
        ('gelu', None)
    """
    rule = _KINDS.get(type(module).__name__)
    return rule(module) if rule is not None else None


def probe_inputs(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """A short token batch for a transformers model (from its config's vocabulary), else None.

    Example:
        >>> probe_inputs(torch.nn.Linear(2, 2)) is None
        True
    """
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 2:
        return None
    ids = (torch.arange(8) * 7919 + 3) % vocab
    return {"input_ids": ids.view(1, 8), "attention_mask": torch.ones(1, 8, dtype=torch.long)}


def _run(model: nn.Module, probe: dict[str, torch.Tensor] | tuple) -> list[torch.Tensor]:
    with torch.inference_mode():
        out = model(**probe) if isinstance(probe, dict) else model(*probe)
    return [t for t in _tensors(out) if t.is_floating_point()]


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(module) -> every (parent, attribute) holding it."""
    owners: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is not None:
                owners[id(child)].append((parent, attr))
    return owners


class _OutsideReads(TorchFunctionMode):
    """Records, for every torch operation that reads a SparseLinear's output, the modules running at
    that moment (reads[id(linear)]). Metadata reads (shape, dim: no tensor result) are not recorded."""

    def __init__(self, produced: dict[int, nn.Module], running: list[int]):
        super().__init__()
        self.produced, self.running = produced, running
        self.reads: dict[int, list[frozenset[int]]] = defaultdict(list)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if _tensors(result):
            for t in _tensors(list(args) + list(kwargs.values())):
                linear = self.produced.get(id(t))
                if linear is not None:
                    self.reads[id(linear)].append(frozenset(self.running))
        return result


def _watch(model: nn.Module, probe: dict[str, torch.Tensor] | tuple) -> tuple[dict, dict, dict, list[torch.Tensor]]:
    """One forward: which modules consumed each SparseLinear's output, how often each module ran, and
    which modules were running whenever a torch operation read a SparseLinear's output."""
    produced: dict[int, SparseLinear] = {}
    keep_alive: list[torch.Tensor] = []  # outputs stay referenced so their ids are not reused
    consumers: dict[int, list[nn.Module]] = defaultdict(list)
    calls: dict[int, int] = defaultdict(int)
    running: list[int] = []

    def after_linear(module: nn.Module, args: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            produced[id(out)] = module  # type: ignore[assignment]
            keep_alive.append(out)

    def before_any(module: nn.Module, args: Any, kwargs: Any) -> None:
        calls[id(module)] += 1
        running.append(id(module))
        for t in _tensors(list(args) + list(kwargs.values())):
            if id(t) in produced:
                consumers[id(produced[id(t)])].append(module)

    def after_any(module: nn.Module, args: Any, out: Any) -> None:
        running.pop()

    handles = [m.register_forward_pre_hook(before_any, with_kwargs=True) for m in model.modules()]
    handles += [m.register_forward_hook(after_linear) for m in model.modules() if isinstance(m, SparseLinear)]
    handles += [m.register_forward_hook(after_any) for m in model.modules()]
    watch = _OutsideReads(produced, running)
    try:
        with watch:
            reference = _run(model, probe)
    finally:
        for handle in handles:
            handle.remove()
    return consumers, calls, watch.reads, reference


def fuse_activations(model: nn.Module, probe: dict[str, torch.Tensor] | tuple | None = None) -> list[str]:
    """Fuse every activation module that alone consumes a SparseLinear's output; names of the linears.

    `probe` is an input for one forward (keyword dict or positional tuple); by default a few tokens
    for a transformers model. Without a usable probe, or if the fused model's outputs differ from
    the unfused ones on it, nothing changes and the list is empty.

    Example:
        >>> fuse_activations(torch.nn.Sequential(torch.nn.Linear(2, 2)))
        []
    """
    linears = {id(m): name for name, m in model.named_modules() if isinstance(m, SparseLinear)}
    if not linears:
        return []
    probe = probe if probe is not None else probe_inputs(model)
    if probe is None:
        return []
    was_training = model.training
    model.eval()
    try:
        try:
            consumers, calls, reads, reference = _watch(model, probe)
        except Exception:  # noqa: BLE001 - a model our probe cannot drive simply stays unfused
            return []
        owners = _owners(model)
        fused: list[tuple[SparseLinear, nn.Module, nn.Module, str]] = []
        for name, linear in model.named_modules():
            if not isinstance(linear, SparseLinear) or linear.activation is not None:
                continue
            users = consumers.get(id(linear), [])
            if len(users) != 1 or calls[id(users[0])] != 1 or len(owners[id(users[0])]) != 1:
                continue
            kind = activation_kind(users[0])
            if kind is None or any(id(users[0]) not in running for running in reads.get(id(linear), [])):
                continue
            parent, attr = owners[id(users[0])][0]
            fused.append((linear, users[0], parent, attr))
        for linear, act, parent, attr in fused:
            linear.activation = activation_kind(act)
            parent._modules[attr] = nn.Identity()
        if fused and not _same(reference, _run(model, probe)):
            for linear, act, parent, attr in fused:
                linear.activation = None
                parent._modules[attr] = act
            fused = []
        return [linears[id(linear)] for linear, *_ in fused]
    finally:
        model.train(was_training)


def _same(reference: list[torch.Tensor], fused: list[torch.Tensor]) -> bool:
    """Within _TOLERANCE of each reference output's norm (and finite)."""
    if len(reference) != len(fused):
        return False
    for a, b in zip(reference, fused):
        if a.shape != b.shape or not bool(torch.isfinite(b).all()):
            return False
        scale = float(a.norm()) if a.numel() else 0.0
        if a.numel() and float((a - b).norm()) > _TOLERANCE * max(scale, 1e-6):
            return False
    return True


__all__ = ["activation_kind", "fuse_activations", "probe_inputs"]
