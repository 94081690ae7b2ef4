"""Budgets: the allocator against brute force, budgets met on a tiny model, impossible ones refused before any
long work, the sensitivity cache, and the record in the folder."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
from tiny import tiny_bert, token_ids

import sparsepress as sp
import sparsepress.passes.budget as budget_pass
import sparsepress.sensitivity as sensitivity
from sparsepress.budget import BudgetError, Item, Limits, Problem, allocate, embedding_bytes, synthetic_pack
from sparsepress.sensitivity import LayerOption, cache_dir, layer_options

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _random_problem(seed: int, items: int = 4, options: int = 4) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(items):
        size = sorted(torch.randint(1, 100, (options,), generator=gen).tolist(), reverse=True)
        loss = sorted(torch.rand(options, generator=gen).tolist())
        latency = [s / 10 for s in size]
        out.append(Item(f"l{i}", [f"o{o}" for o in range(options)], size=size, latency=latency, loss=loss))
    return Problem(out, fixed_bytes=10, fixed_ms=1.0)


def _brute_force(problem: Problem, limits: Limits) -> float | None:
    best = None
    for choice in itertools.product(*[range(len(i.options)) for i in problem.items]):
        totals = problem.totals(choice)
        if all(getattr(limits, w) is None or totals[w] <= getattr(limits, w) for w in ("size", "latency", "loss")):
            value = totals[problem.minimize]
            best = value if best is None else min(best, value)
    return best


@pytest.mark.parametrize("seed", range(8))
def test_allocation_meets_the_limits_close_to_the_optimum(seed):
    problem = _random_problem(seed)
    limits = Limits(size=10 + sum(sum(i.size) / len(i.size) for i in problem.items))
    choice = allocate(problem, limits)
    optimum = _brute_force(problem, limits)
    assert choice is not None and optimum is not None
    totals = problem.totals(choice)
    assert totals["size"] <= limits.size
    assert totals["loss"] <= optimum + 0.15  # Lagrangian + greedy: near the exact optimum on small cases
    problem.minimize = "size"
    reference = problem.totals([seed % 2 + 1 if i % 2 else 1 for i in range(len(problem.items))])
    loss_limits = Limits(loss=reference["loss"], latency=reference["latency"] + 0.5)
    choice = allocate(problem, loss_limits)
    optimum = _brute_force(problem, loss_limits)
    assert choice is not None
    totals = problem.totals(choice)
    assert totals["loss"] <= loss_limits.loss and totals["latency"] <= loss_limits.latency
    assert totals["size"] <= optimum * 1.25


def test_allocation_reports_impossible_limits():
    problem = _random_problem(0)
    assert allocate(problem, Limits(size=problem.extreme("size") - 1)) is None


def test_option_sizes_are_the_packed_sizes():
    packed = synthetic_pack((16, 64), LayerOption(0.75, "unstructured", 4), {4: 32})
    assert packed.name == "bitmask" and packed.dtype == "int4" and packed.nbytes == 16 * 8 + 16 * 8 + 16 * 2 * 4
    assert embedding_bytes(100, 32, 4) == 100 * 16 + 400
    assert [o.label for o in layer_options([0.0, 0.5], ["unstructured", "2:4"], [8, 4])] == [
        "dense int8", "dense int4", "unstructured 0.5 int8", "unstructured 0.5 int4", "2:4 0.5 int8", "2:4 0.5 int4"]


def _tensors_bytes(model) -> int:
    from safetensors.torch import save

    from sparsepress.io import _collect_tensors

    tensors = _collect_tensors(model)[0]
    return len(save({k: v.contiguous() for k, v in sorted(tensors.items())}, metadata={"format": "pt"}))


def _recipe(budget: dict) -> dict:
    return {"stages": [{"prune": {"method": "wanda"}}, {"quantize": {"method": "rtn"}}],
            "budget": {"sparsities": [0.0, 0.5, 0.9], "verify_rounds": 1, **budget}}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(sensitivity.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_size_budget_is_met_and_recorded(cache, tmp_path):
    dense = tiny_bert()
    limit = 0.035
    model = sp.compress(copy.deepcopy(dense), _recipe({"size_mb": limit}), calibration=token_ids(8, 16))
    record = model.sparsepress_record.extra["budget"]
    assert _tensors_bytes(model) <= limit * 1e6
    assert record["achieved"]["size_mb"] <= limit and record["target"] == {"size_mb": limit}
    assert set(record["layers"]) == {n for n, m in model.named_modules() if isinstance(m, sp.SparseLinear)}
    curves = model.sparsepress_record.extra["sensitivity"]["curves"]
    assert {c["layer"] for c in curves} == set(record["layers"]) | set(record["embeddings"])
    assert sum(c["chosen"] is not None for c in curves) == len(record["layers"]) + len(record["embeddings"])
    folder = sp.save(model, tmp_path / "m")
    assert (folder / "sparsepress.safetensors").stat().st_size <= limit * 1e6
    manifest = json.loads((folder / "sparsepress.json").read_text())
    assert manifest["budget"]["achieved"]["size_mb"] <= limit
    from sparsepress.sweep.sensitivity import read_budget, read_sensitivity

    assert read_budget(manifest)["target"] == {"size_mb": limit} and read_sensitivity(manifest).curves
    small = sp.compress(copy.deepcopy(dense), _recipe({"size_mb": 0.025}), calibration=token_ids(8, 16))
    assert _tensors_bytes(small) <= min(0.025e6, _tensors_bytes(model))
    tight = small.sparsepress_record.extra["budget"]["predicted"]["fidelity"]
    assert tight <= record["predicted"]["fidelity"] + 1e-9  # a tighter budget costs predicted fidelity


def test_min_fidelity_is_met_with_a_small_model(cache):
    target = 0.995
    model = sp.compress(tiny_bert(), _recipe({"min_fidelity": target}), calibration=token_ids(8, 16))
    record = model.sparsepress_record.extra["budget"]
    assert record["achieved"]["fidelity"] >= target
    assert record["achieved"]["size_mb"] < _tensors_bytes(tiny_bert()) / 1e6


def test_impossible_budgets_are_refused_before_any_long_work(cache, monkeypatch):
    def no_sensitivity(*args, **kwargs):
        raise AssertionError("the sensitivity analysis ran for an impossible budget")

    monkeypatch.setattr(budget_pass, "measure_sensitivity", no_sensitivity)
    with pytest.raises(BudgetError, match=r"size_mb = 0.001 cannot be met: the smallest tensors file .* is 0\.0\d\d MB"):
        sp.compress(tiny_bert(), _recipe({"size_mb": 0.001}), calibration=token_ids(8, 16))
    with pytest.raises(BudgetError, match="latency_ms = 1e-06 cannot be met: the fastest"):
        sp.compress(tiny_bert(), _recipe({"latency_ms": 1e-6, "seq_len": 8}), calibration=token_ids(8, 16))


def test_impossible_budget_exits_cleanly_in_the_cli(tiny_bert_dir, tmp_path, cache):
    from typer.testing import CliRunner

    from sparsepress.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - prune: {method: magnitude}\n  - quantize: {method: rtn}\nbudget: {size_mb: 0.01}\n")
    result = CliRunner().invoke(app, ["compress", str(tiny_bert_dir), "--recipe", str(recipe), "--out",
                                      str(tmp_path / "o"), "--samples", "4", "--seq-len", "16"])
    assert result.exit_code == 1 and "cannot be met" in result.output and not (tmp_path / "o").exists()


def test_sensitivity_is_cached_by_model_and_calibration(cache, monkeypatch):
    calls = []
    real = budget_pass.measure_sensitivity

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(budget_pass, "measure_sensitivity", counting)
    recipe = _recipe({"size_mb": 0.035, "verify_rounds": 0})
    first = sp.compress(tiny_bert(), recipe, calibration=token_ids(8, 16))
    again = sp.compress(tiny_bert(), recipe, calibration=token_ids(8, 16))
    assert len(calls) == 1 and any(cache.glob("sensitivity/*.json"))
    assert first.sparsepress_record.extra["budget"]["layers"] == again.sparsepress_record.extra["budget"]["layers"]
    sp.compress(tiny_bert(), recipe, calibration=token_ids(8, 16, vocab=50))  # other calibration: measured anew
    assert len(calls) == 2
    assert cache_dir() == cache


def test_budget_recipe_rules():
    with pytest.raises(sp.RecipeError, match="no value with a budget"):
        sp.Recipe.from_yaml_text("stages:\n  - prune: {sparsity: 0.5}\nbudget: {size_mb: 1}\n")
    with pytest.raises(sp.RecipeError, match="needs one, unless a budget"):
        sp.Recipe.from_yaml_text("stages:\n  - prune: {method: wanda}\n")
    with pytest.raises(sp.RecipeError, match="budget"):
        budget_pass.BudgetPass.plan(sp.Recipe.model_validate(
            {"stages": [{"prune": {"method": "wanda", "sparsity": [0.5, 0.7]}}]}).model_copy(
            update={"budget": sp.Recipe.model_validate(_recipe({"size_mb": 1})).budget}))
