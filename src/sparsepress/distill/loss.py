"""The distillation objective: the student's outputs and hidden states matched to the dense teacher's.

- hidden: every student block's output against the teacher block it stands for (the source index of
  a kept block when blocks were removed), relative squared error over real tokens,
  ||h_s - h_t||^2 / ||h_t||^2 averaged over blocks;
- output: causal LMs the KL divergence of the next-token distributions (teacher || student) per real
  token; encoders 1 - cosine of the mean-pooled embeddings (sentence-transformers' pooling);
- similarity (encoders): the in-batch cosine-similarity matrix of the pooled embeddings against the
  teacher's, squared error over the off-diagonal pairs scaled by the teacher's spread: what a
  sentence-similarity ranking reads, with every other sentence of the batch as a negative.

Example:
    >>> import torch
    >>> from sparsepress.recipe import DistillStage
    >>> h = [torch.randn(2, 3, 4) for _ in range(3)]
    >>> mask = torch.ones(2, 3, dtype=torch.long)
    >>> terms = distill_terms(h, h, mask, [0, 1], DistillStage(), logits=None, teacher_logits=None)
    >>> [round(abs(float(v)), 6) for v in terms.values()]
    [0.0, 0.0, 0.0]
"""

from __future__ import annotations

import torch
from torch import nn

from ..recipe import DistillStage


def mean_pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the real tokens' hidden states per sequence.

    Example:
        >>> mean_pooled(torch.ones(1, 2, 3), torch.tensor([[1, 0]])).tolist()
        [[1.0, 1.0, 1.0]]
    """
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def hidden_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], mask: torch.Tensor,
                block_map: list[int]) -> torch.Tensor:
    """Relative squared error of each student block output to its teacher block's (hidden states
    lists include the embeddings first, as transformers returns them)."""
    real = mask.bool()
    terms = []
    for i, source in enumerate(block_map):
        s, t = student[i + 1][real], teacher[source + 1][real]
        terms.append((s - t).pow(2).sum() / t.pow(2).sum().clamp(min=1e-12))
    return torch.stack(terms).mean()


def similarity_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared error of the in-batch cosine-similarity matrices (off-diagonal), over the teacher's variance."""
    if len(student) < 2:
        return student.new_zeros(())
    s = nn.functional.normalize(student, dim=-1)
    t = nn.functional.normalize(teacher, dim=-1)
    off = ~torch.eye(len(s), dtype=torch.bool)
    sim_s, sim_t = (s @ s.T)[off], (t @ t.T)[off]
    return (sim_s - sim_t).pow(2).mean() / sim_t.var(unbiased=False).clamp(min=1e-6)


def logit_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, mean over real tokens."""
    real = mask.bool()
    log_s = student[real].float().log_softmax(dim=-1)
    log_t = teacher[real].float().log_softmax(dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(dim=-1).mean()


def distill_terms(student_hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor], mask: torch.Tensor,
                  block_map: list[int], stage: DistillStage, *, logits: torch.Tensor | None,
                  teacher_logits: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Each weighted term of the loss (their sum is what the optimizer lowers); see the module docstring."""
    terms: dict[str, torch.Tensor] = {}
    if stage.hidden > 0:
        terms["hidden"] = stage.hidden * hidden_loss(student_hidden, teacher_hidden, mask, block_map)
    if logits is not None and teacher_logits is not None:
        if stage.output > 0:
            terms["output"] = stage.output * logit_kl(logits, teacher_logits, mask)
        return terms
    pooled_s = mean_pooled(student_hidden[-1], mask)
    pooled_t = mean_pooled(teacher_hidden[-1], mask)
    if stage.output > 0:
        terms["output"] = stage.output * (1 - nn.functional.cosine_similarity(pooled_s, pooled_t, dim=-1)).mean()
    if stage.similarity > 0:
        terms["similarity"] = stage.similarity * similarity_loss(pooled_s, pooled_t)
    return terms
