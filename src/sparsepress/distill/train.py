"""The distillation loop: AdamW on the student's non-embedding parameters toward the dense teacher,
with pruning masks held fixed (gradients and weights zeroed off the mask after every step), warmup
then a cosine / linear / constant learning rate, one seeded batch per step, progress ticks and
checkpoints every `checkpoint_every` steps.

The student runs in eval mode (no dropout), so a seed fixes the result; a run resumed from a
checkpoint continues with the same weights, optimizer state and batches and ends where an
uninterrupted one would.

Example:
    >>> import copy, torch
    >>> from transformers import BertConfig, BertModel
    >>> from sparsepress.recipe import DistillStage
    >>> teacher = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...                                intermediate_size=64, vocab_size=64)).eval()
    >>> student = copy.deepcopy(teacher)
    >>> with torch.no_grad():
    ...     _ = student.encoder.layer[0].output.dense.weight.zero_()
    >>> samples = [torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    >>> stage = DistillStage(steps=40, lr=1e-3, batch_size=4, seq_len=8, similarity=0)
    >>> history = distill_(student, teacher, samples, stage)
    >>> sum(history[-5:]) < sum(history[:5])
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..evaluate import is_causal_lm
from ..models.layout import find_layout
from ..passes.blocks import forward_kwargs
from ..recipe import DistillStage
from .checkpoint import DistillCheckpoint
from .data import distill_batch
from .loss import distill_terms

Progress = Callable[[str, int, int], None]


def learning_rate(stage: DistillStage, step: int) -> float:
    """The learning rate of (0-based) step `step`: linear warmup, then the stage's schedule down to 0.

    Example:
        >>> s = DistillStage(steps=10, lr=1.0, warmup=0.2)
        >>> [round(learning_rate(s, k), 3) for k in (0, 1, 2, 10)]
        [0.5, 1.0, 1.0, 0.0]
    """
    warm = int(round(stage.warmup * stage.steps))
    if step < warm:
        return stage.lr * (step + 1) / warm
    span = max(stage.steps - warm, 1)
    progress = min((step - warm) / span, 1.0)
    if stage.schedule == "cosine":
        return stage.lr * 0.5 * (1 + math.cos(math.pi * progress))
    if stage.schedule == "linear":
        return stage.lr * (1 - progress)
    return stage.lr


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters distillation trains: all but embedding tables (and heads tied to them).

    Example:
        >>> [n for n, _ in trainable_parameters(nn.Sequential(nn.Embedding(4, 2), nn.Linear(2, 2)))]
        ['1.weight', '1.bias']
    """
    embedded = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) not in embedded]


def _hidden_and_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    out = model(**batch, output_hidden_states=True, **forward_kwargs(model))
    return list(out.hidden_states), getattr(out, "logits", None)


def distill_(student: nn.Module, teacher: nn.Module, samples: list[torch.Tensor], stage: DistillStage, *,
             masks: dict[str, torch.Tensor] | None = None, block_map: list[int] | None = None, seed: int = 0,
             pad_id: int = 0, progress: Progress | None = None, checkpoint: Checkpoint | None = None,
             checkpoint_prefix: str = "") -> list[float]:
    """Fine-tune `student` in place toward `teacher` for `stage.steps` steps (see the module docstring).

    `masks`: keep-masks by Linear name, held fixed; `block_map[i]`: the teacher block student block i
    stands for (default: the same index); `checkpoint_prefix` keeps several distillations of one run
    apart in its checkpoint. Returns the loss of every step this call ran.
    """
    causal = is_causal_lm(student)
    named = trainable_parameters(student)
    params = [p for _, p in named]
    fixed = {id(p): masks[n.rpartition(".")[0]] for n, p in named
             if masks and n.endswith(".weight") and n.rpartition(".")[0] in masks}
    block_map = block_map if block_map is not None else list(range(len(find_layout(student).blocks)))
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    saver = DistillCheckpoint(checkpoint, checkpoint_prefix) if checkpoint is not None else None
    start = saver.restore(params, optimizer, stage.steps) if saver is not None else 0
    teacher.eval()
    student.eval()  # no dropout: a seed fixes the run
    history: list[float] = []
    teacher_flags = [(p, p.requires_grad) for p in teacher.parameters()]
    student_flags = [(p, p.requires_grad) for p in student.parameters()]
    trained = {id(p) for p in params}
    for p, _ in teacher_flags:
        p.requires_grad_(False)
    for p, _ in student_flags:  # embedding tables: no gradient to compute
        p.requires_grad_(id(p) in trained)
    try:
        _train(student, teacher, samples, stage, params, fixed, optimizer, saver, start, block_map, seed, pad_id,
               causal, progress, history)
    finally:
        for p, flag in teacher_flags + student_flags:
            p.requires_grad_(flag)
    return history


def _train(student: nn.Module, teacher: nn.Module, samples: list[torch.Tensor], stage: DistillStage,
           params: list[nn.Parameter], fixed: dict[int, torch.Tensor], optimizer: torch.optim.Optimizer,
           saver: DistillCheckpoint | None, start: int, block_map: list[int], seed: int, pad_id: int, causal: bool,
           progress: Progress | None, history: list[float]) -> None:
    for step in range(start, stage.steps):
        batch = distill_batch(samples, step, stage.batch_size, stage.seq_len, seed, pad_id, causal)
        with torch.no_grad():
            teacher_hidden, teacher_logits = _hidden_and_logits(teacher, batch)
        hidden, logits = _hidden_and_logits(student, batch)
        terms = distill_terms(hidden, teacher_hidden, batch["attention_mask"], block_map, stage,
                              logits=logits if causal else None, teacher_logits=teacher_logits if causal else None)
        loss = torch.stack(list(terms.values())).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for p in params:
            if p.grad is not None and id(p) in fixed:
                p.grad.mul_(fixed[id(p)])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(stage, step)
        optimizer.step()
        with torch.no_grad():
            for p in params:
                if id(p) in fixed:
                    p.mul_(fixed[id(p)])
        history.append(float(loss.detach()))
        done = step + 1
        if saver is not None and (done % stage.checkpoint_every == 0 or done == stage.steps):
            saver.save(done, params, optimizer)
        if progress is not None:
            progress("distilling", done, stage.steps)
