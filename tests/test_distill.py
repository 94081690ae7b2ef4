"""The distill stage: the loss falls, pruning masks stay fixed through distillation and the quantize
solve after it, a seed fixes the result, and an interrupted run resumes to the very same result."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T

import sparsepress as sp
from sparsepress.checkpoint import Checkpoint
from sparsepress.distill import distill_
from sparsepress.distill.data import distill_batch
from sparsepress.distill.loss import distill_terms
from sparsepress.io import TENSORS
from sparsepress.passes import plan_passes
from sparsepress.recipe import DistillStage, Recipe
from tiny import tiny_bert, token_ids

VOCAB = 64


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB)).eval()


def _ids(n: int = 8) -> list[torch.Tensor]:
    return token_ids(n, length=16, vocab=VOCAB)


def _pruned(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Magnitude-prune every block Linear to 50% in place; returns the keep-masks."""
    masks = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                keep = module.weight.abs() >= module.weight.abs().median()
                module.weight.mul_(keep)
                masks[name] = keep
    return masks


def _loss(student: torch.nn.Module, teacher: torch.nn.Module, stage: DistillStage) -> float:
    """The distillation objective on one fixed held-out batch."""
    batch = distill_batch(token_ids(8, length=16, vocab=VOCAB)[::-1], 0, 8, 16, seed=99, pad_id=0, causal=True)
    with torch.no_grad():
        s = student(**batch, output_hidden_states=True)
        t = teacher(**batch, output_hidden_states=True)
    terms = distill_terms(list(s.hidden_states), list(t.hidden_states), batch["attention_mask"], [0, 1], stage,
                          logits=s.logits, teacher_logits=t.logits)
    return float(sum(terms.values()))


def test_loss_falls_and_masks_stay_fixed():
    teacher = _llama()
    student = copy.deepcopy(teacher)
    masks = _pruned(student)
    stage = DistillStage(steps=30, lr=3e-3, batch_size=4, seq_len=12)
    before = _loss(student, teacher, stage)
    history = distill_(student, teacher, _ids(), stage, masks=masks)
    assert _loss(student, teacher, stage) < 0.7 * before
    assert sum(history[-5:]) < sum(history[:5])
    for name, keep in masks.items():
        weight = student.get_submodule(name).weight
        assert torch.equal(weight != 0, keep)  # zeros stay zeros, kept weights were trained


def test_a_seed_fixes_the_result():
    teacher = _llama()
    runs = []
    for _ in range(2):
        student = copy.deepcopy(teacher)
        masks = _pruned(student)
        distill_(student, teacher, _ids(), DistillStage(steps=4, lr=1e-3, batch_size=4, seq_len=12), masks=masks, seed=3)
        runs.append(student.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


class Stop(Exception):
    pass


def test_resume_gives_the_same_result(tmp_path):
    stage = DistillStage(steps=6, lr=1e-3, batch_size=4, seq_len=12, checkpoint_every=2)
    teacher = _llama()
    reference = copy.deepcopy(teacher)
    masks = _pruned(reference)
    start = copy.deepcopy(reference)
    distill_(reference, teacher, _ids(), stage, masks=masks)

    ckpt = Checkpoint(tmp_path / ".c", weights="w")
    ckpt.folder.mkdir()

    def stop_at_5(what, done, total):
        if done == 5:
            raise Stop

    interrupted = copy.deepcopy(start)
    with pytest.raises(Stop):
        distill_(interrupted, teacher, _ids(), stage, masks=masks, checkpoint=ckpt, progress=stop_at_5)
    assert sorted(p.name for p in ckpt.folder.iterdir()) == ["distill-000004.json", "distill-000004.safetensors"]
    ckpt.resume = True
    resumed = copy.deepcopy(start)
    steps = []
    distill_(resumed, teacher, _ids(), stage, masks=masks, checkpoint=ckpt, progress=lambda w, d, t: steps.append(d))
    assert steps == [5, 6]
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in reference.state_dict().items())


RECIPE = {"stages": [{"prune": {"method": "sparsegpt", "sparsity": 0.5}}, {"distill": {"steps": 4, "batch_size": 4,
                                                                                      "seq_len": 12, "checkpoint_every": 2}},
                     {"quantize": {"method": "gptq", "bits": 8}}], "format": "bitmask"}


def test_plan_splits_the_solve_around_distillation():
    planned = [(p.name, getattr(p, "mode", None), p.order) for p in plan_passes(Recipe.model_validate(RECIPE))]
    assert planned == [("teacher", None, 0), ("allocation", None, 30), ("layer_solve", "prune", 50),
                       ("distill", None, 60), ("layer_solve", "finish", 70)]


def test_pipeline_keeps_the_prune_solve_masks_through_distillation_and_gptq(monkeypatch):
    import sparsepress.passes.distill as distill_pass

    seen = {}
    real = distill_pass.distill_

    def spy(student, teacher, samples, stage, **kwargs):
        seen.update({k: v.clone() for k, v in kwargs["masks"].items()})
        seen["weights"] = {k: student.get_submodule(k).weight.detach().clone() for k in kwargs["masks"]}
        history = real(student, teacher, samples, stage, **kwargs)
        seen["trained"] = {k: student.get_submodule(k).weight.detach().clone() for k in kwargs["masks"]}
        return history

    monkeypatch.setattr(distill_pass, "distill_", spy)
    model = sp.compress(tiny_bert(), RECIPE, calibration=token_ids(8, length=16))
    trained, weights = seen.pop("trained"), seen.pop("weights")
    assert len(seen) == 12
    for name, keep in seen.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, sp.SparseLinear) and layer.packed.dtype == "int8"
        packed = layer.packed.unpack()
        assert not bool(((packed != 0) & ~keep).any())  # nothing off the mask came back
        assert not torch.equal(trained[name], weights[name])  # distillation did train the kept weights
        assert abs(float(keep.float().mean()) - 0.5) < 0.02
    assert model.sparsepress_record.extra["distill"]["steps"] == 4


def test_pipeline_resumes_inside_distillation_byte_identical(tmp_path):
    reference = sp.save(sp.compress(tiny_bert(), RECIPE, calibration=token_ids(8, length=16)), tmp_path / "ref")
    out = tmp_path / "out"

    def stop_in_distill(what, done, total):
        if what == "distilling" and done == 3:
            raise Stop

    model = tiny_bert()
    with pytest.raises(Stop):
        sp.compress(model, RECIPE, calibration=token_ids(8, length=16), checkpoint=Checkpoint.for_output(out, model),
                    progress=stop_in_distill)
    model = tiny_bert()
    ticks = []
    resumed = sp.compress(model, RECIPE, calibration=token_ids(8, length=16),
                          checkpoint=Checkpoint.for_output(out, model, resume=True),
                          progress=lambda w, d, t: ticks.append((w, d)))
    assert ("distilling", 3) in ticks and ("distilling", 2) not in ticks  # steps 1-2 came from the checkpoint
    sp.save(resumed, out)
    assert (out / TENSORS).read_bytes() == (reference / TENSORS).read_bytes()


def test_structured_then_distill_matches_teacher_blocks_by_source():
    teacher = _llama()
    recipe = {"stages": [{"prune": {"pattern": "layer", "sparsity": 0.5, "score": "influence"}},
                         {"distill": {"steps": 3, "batch_size": 4, "seq_len": 12}}]}
    model = sp.compress(copy.deepcopy(teacher), recipe, calibration=_ids())
    assert model.config.num_hidden_layers == 1 and len(model.model.layers) == 1
    assert model.sparsepress_record.extra["distill"]["last_loss"] is not None


def test_distill_stage_validation():
    with pytest.raises(ValueError, match="output"):
        DistillStage(output=0, hidden=0, similarity=0)
    with pytest.raises(ValueError, match="rounds"):
        DistillStage(steps=2, rounds=3)
