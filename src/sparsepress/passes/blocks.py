"""Running a model block by block on calibration data: capture block 0's inputs, run one block, see
what each Linear inside it receives, keep only real (unpadded, finite) tokens.

Every pass that calibrates on activations (the layer solve, activation thresholds, block influence,
distillation) runs blocks through these helpers instead of re-implementing a model's forward.

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> from sparsepress.calibration import make_batches
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...                              intermediate_size=64, vocab_size=100)).eval()
    >>> batches = make_batches([torch.randint(0, 100, (8,)) for _ in range(2)], 2, 0)
    >>> inputs = capture_block_inputs(model, model.encoder.layer[0], batches)
    >>> run_block(model.encoder.layer[0], inputs[0]).shape
    torch.Size([2, 8, 32])
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InputError, NonFiniteWarning, PoisonedWeightError
from ..prune.stats import LayerStats


class _StopForward(Exception):
    """Raised by a hook once the forward has reached what it was run for (block 0's inputs, say)."""


@dataclass
class BlockInputs:
    """The positional and keyword arguments one block received for one calibration batch.

    `tokens`: which of the batch's flattened tokens are real (not padding); None when all are.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    tokens: torch.Tensor | None = None


def real_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The flattened attention mask of a padded batch (None when every token is real).

    Padding is left out of every calibration statistic: a pad token's activations say nothing about
    the data, and texts of mixed lengths would otherwise weigh the Hessians towards them.

    Example:
        >>> real_tokens({"attention_mask": torch.tensor([[1, 0]])}).tolist()
        [True, False]
    """
    mask = batch.get("attention_mask")
    if mask is None or bool(mask.all()):
        return None
    return mask.reshape(-1).bool()


def drop_padding(flat: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    """The rows of a layer's flattened inputs that belong to real tokens (all, when the counts differ).

    Example:
        >>> drop_padding(torch.ones(2, 3), torch.tensor([True, False])).shape
        torch.Size([1, 3])
    """
    return flat if tokens is None or tokens.numel() != flat.shape[0] else flat[tokens]


def finite_rows(name: str, xs: Sequence[torch.Tensor], nonfinite: str, dropped: dict[str, int],
                tokens: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The rows (real tokens) of each x that are finite in every x; NaN / Inf rows raise, or are dropped
    and counted (nonfinite='skip'). Paired inputs (compressed and dense) lose a token together.

    Example:
        >>> x = torch.tensor([[1.0, float("nan")], [2.0, 3.0]])
        >>> dropped = {}
        >>> finite_rows("fc", [x], "skip", dropped)[0].tolist(), dropped
        ([[2.0, 3.0]], {'fc': 1})
    """
    flats = [drop_padding(x.detach().reshape(-1, x.shape[-1]), tokens) for x in xs]
    finite = torch.stack([torch.isfinite(flat).all(dim=1) for flat in flats]).all(dim=0)
    if bool(finite.all()):
        return flats
    if nonfinite != "skip":
        raise PoisonedWeightError(name, "calibration activations")
    dropped[name] = dropped.get(name, 0) + int((~finite).sum())
    return [flat[finite] for flat in flats]


def warn_dropped(dropped: dict[str, int]) -> None:
    """One NonFiniteWarning per layer that lost calibration tokens, then forget them."""
    for name, count in dropped.items():
        warnings.warn(f"{name}: dropped {count} calibration tokens whose inputs hold NaN or Inf",
                      NonFiniteWarning, stacklevel=3)
    dropped.clear()


def forward_kwargs(model: nn.Module) -> dict[str, Any]:
    """Keyword arguments every calibration forward passes (no KV cache for models that keep one).

    Example:
        >>> forward_kwargs(nn.Linear(2, 2))
        {}
    """
    params = inspect.signature(model.forward).parameters
    return {"use_cache": False} if "use_cache" in params else {}


def capture_block_inputs(model: nn.Module, first_block: nn.Module,
                         batches: list[dict[str, torch.Tensor]]) -> list[BlockInputs]:
    """What `first_block` receives for each batch; the forward stops there (see the module example)."""
    captured: list[BlockInputs] = []

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append(BlockInputs(args, kwargs, real_tokens(batches[len(captured)])))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    extra = forward_kwargs(model)
    try:
        for batch in batches:
            try:
                model(**batch, **extra)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise InputError("<model>", "the model's forward never reached its first transformer block")
    return captured


def model_inputs(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[BlockInputs]:
    """The whole model seen as one block: its inputs are the batches themselves.

    Example:
        >>> model_inputs(nn.Linear(2, 2), [{"input": torch.ones(1, 2)}])[0].kwargs["input"].shape
        torch.Size([1, 2])
    """
    extra = forward_kwargs(model)
    return [BlockInputs((), {**batch, **extra}, real_tokens(batch)) for batch in batches]


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden states in a block's output (a tensor, a tuple or a ModelOutput)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def run_block(block: nn.Module, inputs: BlockInputs) -> torch.Tensor:
    """The hidden states `block` produces from one batch's inputs."""
    return hidden_of(block(*inputs.args, **inputs.kwargs))


def hidden_in(inputs: BlockInputs) -> torch.Tensor:
    """The hidden states a block receives (its first positional or `hidden_states` argument)."""
    return inputs.args[0] if inputs.args else inputs.kwargs["hidden_states"]


def with_hidden(inputs: BlockInputs, hidden: torch.Tensor) -> BlockInputs:
    """The same block inputs with other hidden states (what the next block receives)."""
    if inputs.args:
        return BlockInputs((hidden, *inputs.args[1:]), inputs.kwargs, inputs.tokens)
    return BlockInputs((), {**inputs.kwargs, "hidden_states": hidden}, inputs.tokens)


def advance(block: nn.Module, inputs: list[BlockInputs]) -> list[BlockInputs]:
    """Every batch's inputs to the block after `block`."""
    return [with_hidden(item, run_block(block, item)) for item in inputs]


@contextmanager
def collecting(layers: dict[str, nn.Module], stats: dict[str, LayerStats], nonfinite: str = "error",
               dropped: dict[str, int] | None = None,
               tokens: Callable[[], torch.Tensor | None] = lambda: None) -> Iterator[None]:
    """Feed each layer's inputs to its stats while the block runs (`tokens()`: the running batch's real tokens).

    Layers that receive the very same input tensor (q, k, v projections) share one LayerStats, so
    the Hessian is accumulated once; sharing is decided on the first batch by object identity.
    """
    owners: dict[str, str] = {}
    first_inputs: list[tuple[torch.Tensor, str]] = []
    handles = []
    for name, layer in layers.items():
        def hook(_module: nn.Module, args: tuple[Any, ...], _name: str = name) -> None:
            x = args[0]
            if _name not in owners:
                owners[_name] = next((owner for seen, owner in first_inputs if seen is x), _name)
                first_inputs.append((x, _name))
            if owners[_name] == _name:
                rows = finite_rows(_name, [x], nonfinite, dropped if dropped is not None else {}, tokens())[0]
                stats[_name].add(rows)
        handles.append(layer.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        first_inputs.clear()
        for name, owner in owners.items():
            stats[name] = stats[owner]


@contextmanager
def stopping_once_seen(layers: dict[str, nn.Module]) -> Iterator[Callable[[], None]]:
    """Stop the forward once every layer in `layers` has received its input; yields `arm`, called
    before each forward. Hooks registered earlier (the recording ones) still see that last input.

    The layer solve's statistics passes need a block's forward only up to the group being solved:
    the q/k/v group is fed at the block's start, so its pass costs almost nothing. Run the block with
    `run_block_until_stopped`.

    Example:
        >>> import torch
        >>> block = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
        >>> with stopping_once_seen({"0": block[0]}) as arm:
        ...     arm(); run_block_until_stopped(block, BlockInputs((torch.ones(1, 2),), {})) is None
        True
    """
    waiting: set[str] = set()

    def hook(name: str) -> None:
        waiting.discard(name)
        if not waiting:
            raise _StopForward

    handles = [layer.register_forward_pre_hook(lambda _m, _args, _n=name: hook(_n)) for name, layer in layers.items()]
    try:
        yield lambda: waiting.update(layers)
    finally:
        for handle in handles:
            handle.remove()


def run_block_until_stopped(block: nn.Module, inputs: BlockInputs) -> torch.Tensor | None:
    """`run_block`, or None when a hook stopped the forward early (`stopping_once_seen`)."""
    try:
        return run_block(block, inputs)
    except _StopForward:
        return None


def layer_inputs(block: nn.Module, layers: dict[str, nn.Module], item: BlockInputs, *,
                 stop: bool = False) -> dict[str, torch.Tensor]:
    """Each layer's input tensor during one forward of `block` (shared tensors stay the same object).

    `stop`: end the forward as soon as every layer has been seen (what follows is not needed).
    """
    seen: dict[str, torch.Tensor] = {}

    def record(name: str, args: tuple[Any, ...]) -> None:  # a hook that returned a value would replace the input
        seen.setdefault(name, args[0])

    handles = [layer.register_forward_pre_hook(lambda _m, args, _n=name: record(_n, args)) for name, layer in layers.items()]
    try:
        if stop:
            with stopping_once_seen(layers) as arm:
                arm()
                run_block_until_stopped(block, item)
        else:
            run_block(block, item)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def shared_inputs(seen: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Owner -> the other layers fed the very same tensor (their statistics are the owner's).

    Example:
        >>> x = torch.ones(1)
        >>> shared_inputs({"q": x, "k": x, "o": torch.ones(1)})
        {'q': ['k'], 'o': []}
    """
    owners: dict[str, list[str]] = {}
    for name, x in seen.items():
        owner = next((o for o in owners if seen[o] is x), None)
        if owner is None:
            owners[name] = []
        else:
            owners[owner].append(name)
    return owners
