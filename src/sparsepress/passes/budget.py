"""Passes: a budget (size, latency, fidelity) turned into per-layer targets, then checked and corrected.

`BudgetPass` (allocation band) refuses an impossible size or latency before any long work (naming the
smallest reachable figure), measures the per-layer sensitivity curves (cached, `sparsepress.sensitivity`),
allocates each targeted Linear's sparsity, pattern and bits and each embedding table's bits
(`sparsepress.budget.allocate`) and hands them to the layer solve and the embeddings pass as
`ctx.targets` / `ctx.embedding_bits`. `BudgetCheckPass` runs after them: it measures the finished
model (tensors-file bytes, latency on this machine, fidelity as `sparsepress eval` computes it) and,
when a prediction was wrong (a target missed, or a fidelity target overshot by much), scales the
prediction by what it measured, allocates again and reruns the passes in between on the dense layers.

The record lands in the manifest under two keys (the shapes `sparsepress.sweep.sensitivity` reads):
`budget` (`target`, `achieved`, `predicted`, the allowed `options`, every layer's and table's choice,
each correction round) and `sensitivity` (`metric` and `curves`: per layer and pattern/bits, the loss
against sparsity; per embedding table, the loss against bits; the chosen points marked).

Example:
    >>> from sparsepress.recipe import Recipe
    >>> r = Recipe.model_validate({"stages": [{"prune": {"method": "wanda"}}], "budget": {"size_mb": 1}})
    >>> [p.name for p in BudgetPass.plan(r)]
    ['budget', 'budget_check']
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..budget import BudgetError, Item, Limits, Problem, SyntheticLayers, allocate, embedding_bytes, kernel_ms, overhead_ms
from ..evaluate import fidelity, median_ms
from ..models import replace_module
from ..recipe import Budget, Recipe
from ..sensitivity import (
    Curves,
    LayerOption,
    Probe,
    SensitivitySetup,
    fingerprint,
    layer_options,
    load_cached,
    measure_sensitivity,
    store_cached,
)
from .base import ORDER_ALLOCATION, ORDER_FINISH, CompressionPass, plan_passes, register_pass
from .context import CompressionContext, LayerTarget
from .embeddings import quantizable_embeddings
from .layer_solve import needs_statistics

# Calibration samples the sensitivity probe runs per measurement (evenly spread over the calibration).
PROBE_SAMPLES = 32
# Safetensors header bytes per tensor (names, dtypes, shapes, offsets in JSON), for the size prediction.
HEADER_BYTES_PER_TENSOR = 110
# A fidelity target overshot by this share of its allowed loss makes the check try a smaller model.
OVERSHOOT = 0.25
# Held-out samples of the fidelity check, as `sparsepress eval` takes them.
EVAL_SAMPLES, EVAL_SEQ_LEN, EVAL_SEED = 64, 128, 1234


def group_sizes(recipe: Recipe) -> dict[int, int | None]:
    """Scale group per bit width: the quantize stage's group_size, int4 at least per 128 inputs.

    Example:
        >>> group_sizes(Recipe.model_validate({"stages": [{"quantize": {}}]}))
        {8: None, 4: 128}
    """
    stage = recipe.quantize
    size = stage.group_size if stage is not None else None
    return {8: size, 4: size or 128}


def quant_method(recipe: Recipe) -> str:
    """The quantizer a budget's bits use: the quantize stage's, else GPTQ when calibration is read anyway."""
    if recipe.quantize is not None:
        return recipe.quantize.method
    return "gptq" if needs_statistics(recipe.prune, recipe.quantize) else "rtn"


@dataclass
class BudgetState:
    """What the allocation hands the check: the problem, the options, the choice, the dense model."""

    budget: Budget
    problem: Problem | None = None
    options: list[LayerOption] = field(default_factory=list)
    layer_names: list[str] = field(default_factory=list)
    embedding_names: list[str] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)
    choice: list[int] = field(default_factory=list)
    dense: nn.Module | None = None
    tables: dict[str, nn.Embedding] = field(default_factory=dict)
    curves: Curves | None = None


def _options_of(budget: Budget) -> list[LayerOption]:
    return layer_options(budget.sparsities, budget.patterns, budget.bits)


def fixed_bytes(model: nn.Module, layers: dict[str, nn.Linear], tables: dict[str, nn.Embedding]) -> tuple[int, int]:
    """(bytes, tensor count) of what no option changes: every tensor outside the targeted layers and tables."""
    skip = {f"{n}.{p}" for n in layers for p in ("weight", "bias")} | {f"{n}.weight" for n in tables}
    seen: set[tuple[int, int]] = set()
    total = count = 0
    for key, tensor in model.state_dict().items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in skip or identity in seen:
            continue
        seen.add(identity)
        total += tensor.numel() * tensor.element_size()
        count += 1
    return total, count


def build_problem(ctx: CompressionContext, state: BudgetState, losses: Curves | None) -> Problem:
    """The allocation problem of this model (losses zero until measured)."""
    budget = state.budget
    layers = ctx.selection.layers
    synthetic = SyntheticLayers(group_sizes(ctx.recipe))
    items = []
    latency_by_key: dict[tuple[int, int, LayerOption], float] = {}
    if budget.latency_ms is not None:
        keys = sorted({(layer.out_features, layer.in_features, o) for layer in layers.values() for o in state.options},
                      key=str)
        times = kernel_ms([synthetic.packed(k[:2], k[2]) for k in keys], budget.batch * budget.seq_len)
        latency_by_key = dict(zip(keys, times))
    for name in state.layer_names:
        layer = layers[name]
        shape = (layer.out_features, layer.in_features)
        bias = 0 if layer.bias is None else layer.bias.numel() * 4
        items.append(Item(
            name=name, options=[o.label for o in state.options],
            size=[synthetic.packed(shape, o).nbytes + bias for o in state.options],  # type: ignore[attr-defined]
            latency=[latency_by_key.get((*shape, o), 0.0) for o in state.options],
            loss=[losses.layers[name][o.label] if losses else 0.0 for o in state.options]))
    bits = budget.embedding_bits
    for name in state.embedding_names:
        rows, dim = state.tables[name].weight.shape
        items.append(Item(name=name, options=[f"int{b}" if b != 32 else "fp32" for b in bits],
                          size=[embedding_bytes(rows, dim, b) for b in bits], latency=[0.0] * len(bits),
                          loss=[losses.embeddings[name][str(b)] if losses else 0.0 for b in bits]))
    rest, count = fixed_bytes(ctx.model, layers, state.tables)
    tensors = count + 4 * len(state.layer_names) + 2 * len(state.embedding_names)
    fixed_ms = 0.0
    if budget.latency_ms is not None:
        fixed_ms = overhead_ms(ctx.model, state.layer_names, budget.batch, budget.seq_len)
    minimize = "size" if budget.min_fidelity is not None and budget.size_mb is None else "loss"
    return Problem(items, fixed_bytes=rest + HEADER_BYTES_PER_TENSOR * tensors + 8, fixed_ms=fixed_ms, minimize=minimize)


def limits_of(budget: Budget) -> Limits:
    """The budget's bounds in the allocator's units (bytes, ms, predicted loss)."""
    return Limits(size=budget.size_mb * 1e6 if budget.size_mb is not None else None,
                  latency=budget.latency_ms,
                  loss=1.0 - budget.min_fidelity if budget.min_fidelity is not None else None)


def check_reachable(problem: Problem, budget: Budget) -> None:
    """BudgetError naming the smallest size / latency reachable when the budget asks for less."""
    if budget.size_mb is not None and problem.extreme("size") > budget.size_mb * 1e6:
        raise BudgetError("size_mb", budget.size_mb,
                          f"the smallest tensors file the allowed options reach is {_mb(problem.extreme('size'))} MB "
                          f"(sparsities up to {max(budget.sparsities):g}, bits down to {min(budget.bits)}, "
                          f"embeddings down to {min(budget.embedding_bits)} bits)")
    if budget.latency_ms is not None and problem.extreme("latency") > budget.latency_ms:
        raise BudgetError("latency_ms", budget.latency_ms,
                          f"the fastest the allowed options run here is {problem.extreme('latency'):.2f} ms at "
                          f"batch {budget.batch} x {budget.seq_len} tokens ({problem.fixed_ms:.2f} ms of it outside "
                          f"the compressed Linear layers)")


def _mb(count: float) -> str:
    """Decimal megabytes with enough digits to tell a near miss (3 significant decimals at least)."""
    return f"{count / 1e6:.3f}" if count < 1e8 else f"{count / 1e6:.1f}"


def sensitivity(ctx: CompressionContext, state: BudgetState) -> Curves:
    """The model's sensitivity curves, from the cache when this model and calibration were measured before."""
    recipe, budget = ctx.recipe, state.budget
    prune = recipe.prune
    setup = SensitivitySetup(method=prune.method if prune is not None else "magnitude", quant_method=quant_method(recipe),
                             group_sizes=group_sizes(recipe), refit=recipe.solver.refit and needs_statistics(recipe.prune, recipe.quantize),
                             dampening=prune.dampening if prune is not None else 0.01)
    ids = ctx.token_ids
    step = max(1, len(ids) // PROBE_SAMPLES)
    samples = ids[::step][:PROBE_SAMPLES]
    layers = ctx.selection.layers
    key = fingerprint([layers[n].weight for n in state.layer_names] + [state.tables[n].weight for n in state.embedding_names]
                      + [torch.cat(ids)] + [torch.tensor([len(i) for i in ids])])
    key = fingerprint([torch.tensor(list(f"{key}|{setup.key()}|{[o.label for o in state.options]}|"
                                         f"{budget.embedding_bits}|{state.layer_names}|{PROBE_SAMPLES}".encode()),
                                    dtype=torch.uint8)])
    cached = load_cached(key)
    if cached is not None and all(n in cached.layers for n in state.layer_names):
        return cached
    pad = getattr(ctx.tokenizer, "pad_token_id", None) or 0
    probe = Probe(ctx.model, samples, pad_id=pad)
    curves = measure_sensitivity(ctx.model, {n: layers[n] for n in state.layer_names},
                                 {n: state.tables[n] for n in state.embedding_names}, ctx.batches, probe,
                                 state.options, budget.embedding_bits, setup,
                                 tick=lambda done, total: ctx.tick("measuring sensitivity", done, total))
    store_cached(key, curves)
    return curves


def apply_choice(ctx: CompressionContext, state: BudgetState, choice: list[int]) -> None:
    """Hand an allocation to the layer solve and the embeddings pass."""
    sizes = group_sizes(ctx.recipe)
    targets: dict[str, LayerTarget] = {}
    for name, index in zip(state.layer_names, choice):
        option = state.options[index]
        targets[name] = LayerTarget(sparsity=option.sparsity, pattern=option.pattern, bits=option.bits,
                                    group_size=sizes.get(option.bits), format=option.format)
    ctx.targets = targets
    bits = state.budget.embedding_bits
    ctx.embedding_bits = {name: bits[i] for name, i in zip(state.embedding_names, choice[len(state.layer_names):])}
    state.choice = list(choice)


def describe(state: BudgetState, choice: list[int]) -> dict[str, Any]:
    """Per-layer and per-table choices, and the predicted totals, for the record."""
    assert state.problem is not None
    totals = state.problem.totals(choice)
    return {
        "layers": {item.name: item.options[o] for item, o in zip(state.problem.items, choice)
                   if item.name in state.layer_names},
        "embeddings": {item.name: item.options[o] for item, o in zip(state.problem.items, choice)
                       if item.name in state.embedding_names},
        "predicted": {"size_mb": totals["size"] / 1e6, "latency_ms": totals["latency"] if state.budget.latency_ms else None,
                      "fidelity": 1.0 - totals["loss"]},
    }


@register_pass
class BudgetPass(CompressionPass):
    """Chooses every targeted layer's and embedding table's compression to meet `recipe.budget`."""

    name = "budget"
    handles = ("budget",)
    order = ORDER_ALLOCATION

    def __init__(self, state: BudgetState):
        self.state = state

    @classmethod
    def plan(cls, recipe: Recipe) -> list[CompressionPass]:
        if recipe.budget is None:
            return []
        prune = recipe.prune
        if prune is not None and isinstance(prune.sparsity, list):
            from ..errors import RecipeError

            raise RecipeError("budget", "with elastic levels", "a budget or a list of elastic sparsities, not both")
        state = BudgetState(recipe.budget)
        return [cls(state), BudgetCheckPass(state)]

    def run(self, ctx: CompressionContext) -> None:
        state, budget = self.state, self.state.budget
        state.options = _options_of(budget)
        layers = ctx.selection.layers
        state.layer_names = sorted(layers)
        state.tables, _ = quantizable_embeddings(ctx.model)
        state.embedding_names = sorted(state.tables)
        state.limits = limits_of(budget)
        state.problem = build_problem(ctx, state, None)
        check_reachable(state.problem, budget)  # before the long work
        state.dense = copy.deepcopy(ctx.model)  # the reference of the fidelity check, and the layers a correction restores
        state.curves = sensitivity(ctx, state)
        state.problem = _with_losses(state.problem, state)
        choice = allocate(state.problem, state.limits)
        if choice is None:
            best = 1.0 - state.problem.extreme("loss")
            raise BudgetError("min_fidelity", budget.min_fidelity or 0.0,
                              f"the highest fidelity the allowed options are predicted to reach within the other "
                              f"targets is {best:.4f}")
        apply_choice(ctx, state, choice)
        targets = budget.model_dump(mode="json", exclude_none=True)
        ctx.record.extra["budget"] = {
            "target": {k: targets[k] for k in ("size_mb", "latency_ms", "batch", "seq_len", "min_fidelity") if k in targets
                       and (k not in ("batch", "seq_len") or budget.latency_ms is not None)},
            "options": {k: targets[k] for k in ("sparsities", "patterns", "bits", "embedding_bits", "verify_rounds")},
            **describe(state, choice),
            "rounds": [],
        }
        ctx.record.extra["sensitivity"] = sensitivity_record(state, choice)


SENSITIVITY_METRIC = "fidelity loss (1 - mean cosine to the dense model on calibration samples, one layer compressed)"


def sensitivity_record(state: BudgetState, choice: list[int]) -> dict[str, Any]:
    """The curves in the manifest's `sensitivity` shape (sparsepress.sweep.sensitivity): per layer and
    pattern/bits option, loss against sparsity; per embedding table, loss against bits; chosen points marked."""
    assert state.curves is not None
    curves: list[dict[str, Any]] = []
    picked = dict(zip(state.layer_names, choice))
    for name in state.layer_names:
        chosen_option = state.options[picked[name]]
        families: dict[tuple[str, int], list[LayerOption]] = {}
        for option in state.options:
            pattern = "unstructured" if option.sparsity == 0.0 else option.pattern
            families.setdefault((pattern, option.bits), []).append(option)
        for (pattern, bits), members in families.items():
            if pattern != "unstructured":  # dense (0) belongs on every pattern's curve
                members = [o for o in state.options if o.bits == bits and o.sparsity == 0.0] + members
            chosen_family = ("unstructured" if chosen_option.sparsity == 0.0 else chosen_option.pattern) == pattern
            curves.append({"layer": name, "option": f"{pattern} int{bits}", "x": "sparsity",
                           "points": [[o.sparsity, state.curves.layers[name][o.label]] for o in members],
                           "chosen": chosen_option.sparsity if chosen_family and chosen_option.bits == bits else None})
    for name, index in zip(state.embedding_names, choice[len(state.layer_names):]):
        bits = state.budget.embedding_bits
        curves.append({"layer": name, "option": "embedding rows", "x": "bits",
                       "points": [[b, state.curves.embeddings[name][str(b)]] for b in bits], "chosen": bits[index]})
    return {"metric": SENSITIVITY_METRIC, "curves": curves}


def _with_losses(problem: Problem, state: BudgetState) -> Problem:
    curves = state.curves
    assert curves is not None
    for item in problem.items:
        if item.name in curves.layers:
            item.loss = [curves.layers[item.name][o.label] for o in state.options]
        else:
            item.loss = [curves.embeddings[item.name][str(b)] for b in state.budget.embedding_bits]
    return problem


@dataclass
class Achieved:
    size: int
    latency: float | None
    fidelity: float | None

    def as_record(self) -> dict[str, Any]:
        return {"size_mb": self.size / 1e6, "latency_ms": self.latency, "fidelity": self.fidelity}


class BudgetCheckPass(CompressionPass):
    """Measures the finished model against the budget and corrects the allocation (planned by BudgetPass)."""

    name = "budget_check"
    order = ORDER_FINISH + 5

    def __init__(self, state: BudgetState):
        self.state = state

    @classmethod
    def plan(cls, recipe: Recipe) -> list[CompressionPass]:
        return []  # planned together with BudgetPass, which shares its state

    def run(self, ctx: CompressionContext) -> None:
        state, budget = self.state, self.state.budget
        assert state.problem is not None
        limits = state.limits
        record = ctx.record.extra["budget"]
        passing: tuple[list[int], dict[str, nn.Module], dict[str, Any], Achieved] | None = None
        achieved = self.measure(ctx)
        for round_index in range(budget.verify_rounds + 1):
            predicted = state.problem.totals(state.choice)
            record["rounds"].append({"choice": describe(state, state.choice)["layers"],
                                     "embeddings": describe(state, state.choice)["embeddings"],
                                     "predicted": describe(state, state.choice)["predicted"],
                                     "achieved": achieved.as_record()})
            met = self.meets(achieved)
            if met and (passing is None or achieved.size < passing[3].size):
                passing = (list(state.choice), self.compressed_modules(ctx), dict(ctx.record.layers), achieved)
            if round_index == budget.verify_rounds:
                break
            limits = self.corrected(limits, predicted, achieved, met)
            if limits is None:
                break
            choice = allocate(state.problem, limits)
            if choice is None or choice == state.choice:
                break
            self.recompress(ctx, choice)
            achieved = self.measure(ctx)
        if passing is None:
            raise BudgetError(*self.missed(achieved))
        if passing[0] != state.choice:  # a later round missed: back to the best passing model
            for name, module in passing[1].items():
                replace_module(ctx.model, name, module)
            ctx.record.layers.update(passing[2])
            apply_choice(ctx, state, passing[0])
            achieved = passing[3]
        record.update(describe(state, state.choice))
        record["achieved"] = achieved.as_record()
        ctx.record.extra["sensitivity"] = sensitivity_record(state, state.choice)

    # --- measuring ---------------------------------------------------------------------------------------
    def measure(self, ctx: CompressionContext) -> Achieved:
        from safetensors.torch import save

        from ..attention import use_native_attention
        from ..fusion import fuse_activations
        from ..io import _collect_tensors

        budget = self.state.budget
        tensors = _collect_tensors(ctx.model)[0]
        size = len(save({k: v.detach().contiguous() for k, v in sorted(tensors.items())}, metadata={"format": "pt"}))
        latency = quality = None
        if budget.latency_ms is not None:
            twin = copy.deepcopy(ctx.model)  # fused and switched as sp.compress leaves it; the model itself
            fuse_activations(twin)           # must keep its activation modules for a correction round
            use_native_attention(twin)
            vocab = int(getattr(getattr(ctx.model, "config", None), "vocab_size", 1000) or 1000)
            ids = torch.randint(0, vocab, (budget.batch, budget.seq_len), generator=torch.Generator().manual_seed(0))
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

            def run() -> None:
                with torch.inference_mode():
                    twin(**inputs)

            latency = median_ms(run, repeats=15, warmup=3)
        if budget.min_fidelity is not None:
            quality = fidelity(ctx.model, self.state.dense, self.eval_samples(ctx),
                               pad_id=getattr(ctx.tokenizer, "pad_token_id", None) or 0)
        return Achieved(size, latency, quality)

    def eval_samples(self, ctx: CompressionContext) -> list[torch.Tensor]:
        """The held-out windows `sparsepress eval` reads (with a tokenizer), else every other calibration sample."""
        if ctx.tokenizer is not None:
            from ..sources import bundled_text, token_samples

            return token_samples(ctx.tokenizer, bundled_text("heldout"), EVAL_SAMPLES, EVAL_SEQ_LEN, seed=EVAL_SEED)
        return ctx.token_ids[1::2]

    def meets(self, achieved: Achieved) -> bool:
        budget = self.state.budget
        return ((budget.size_mb is None or achieved.size <= budget.size_mb * 1e6)
                and (budget.latency_ms is None or (achieved.latency or 0.0) <= budget.latency_ms)
                and (budget.min_fidelity is None or (achieved.fidelity or 0.0) >= budget.min_fidelity))

    def missed(self, achieved: Achieved) -> tuple[str, float, str]:
        budget = self.state.budget
        rounds = budget.verify_rounds
        if budget.size_mb is not None and achieved.size > budget.size_mb * 1e6:
            return "size_mb", budget.size_mb, f"reached {_mb(achieved.size)} MB after {rounds} corrections"
        if budget.min_fidelity is not None and (achieved.fidelity or 0.0) < budget.min_fidelity:
            return ("min_fidelity", budget.min_fidelity,
                    f"reached fidelity {achieved.fidelity:.4f} after {rounds} corrections (raise verify_rounds, or allow "
                    "more options)")
        return ("latency_ms", budget.latency_ms or 0.0,
                f"measured {achieved.latency:.2f} ms after {rounds} corrections (timings on a busy machine vary; "
                "measure when it is quiet)")

    # --- correcting --------------------------------------------------------------------------------------
    def corrected(self, limits: Limits, predicted: dict[str, float], achieved: Achieved, met: bool) -> Limits | None:
        """Bounds for the next allocation: each missed figure's bound moved by the prediction's error; a
        fidelity target overshot by much (minimising size) loosened by the same rule. None: nothing to correct."""
        budget = self.state.budget
        size, latency, loss = limits.size, limits.latency, limits.loss
        changed = False
        if budget.size_mb is not None and achieved.size > budget.size_mb * 1e6:
            size = (size or 0.0) - (achieved.size - budget.size_mb * 1e6) - 1.0
            changed = True
        if budget.latency_ms is not None and achieved.latency is not None and achieved.latency > budget.latency_ms:
            latency = (latency or 0.0) * budget.latency_ms / achieved.latency
            changed = True
        if budget.min_fidelity is not None and achieved.fidelity is not None and predicted["loss"] > 0:
            allowed = 1.0 - budget.min_fidelity
            actual = max(1.0 - achieved.fidelity, 1e-9)
            ratio = actual / predicted["loss"]
            overshoot = actual < (1.0 - OVERSHOOT) * allowed and self.state.problem.minimize == "size"  # type: ignore[union-attr]
            if achieved.fidelity < budget.min_fidelity or overshoot:
                loss = allowed / ratio * (0.97 if achieved.fidelity < budget.min_fidelity else 1.0)
                changed = True
        return Limits(size=size, latency=latency, loss=loss) if changed and not (loss is not None and math.isnan(loss)) else None

    def compressed_modules(self, ctx: CompressionContext) -> dict[str, nn.Module]:
        """The model's current compressed layers and tables (kept to restore the best passing round)."""
        names = self.state.layer_names + self.state.embedding_names
        return {name: ctx.model.get_submodule(name) for name in names}

    def recompress(self, ctx: CompressionContext, choice: list[int]) -> None:
        """Put the dense layers and tables back, hand over `choice`, and rerun the passes in between."""
        state = self.state
        for name in state.layer_names:
            replace_module(ctx.model, name, ctx.selection.layers[name])
        for name in state.embedding_names:
            replace_module(ctx.model, name, state.tables[name])
        apply_choice(ctx, state, choice)
        for step in plan_passes(ctx.recipe):
            if ORDER_ALLOCATION < step.order < self.order:
                step.run(ctx)
