"""Tiny random-initialised mixture-of-experts decoders of every supported family, and an older
transformers-style layout (per-expert Linear layers, a Linear router) for the list-layout tests.

Example:
    >>> type(tiny_moe("qwen3_moe")).__name__
    'Qwen3MoeForCausalLM'
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 96
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def tiny_moe(family: str, experts: int = 8, top_k: int = 2, layers: int = 2, seed: int = 0) -> nn.Module:
    """A 2-layer MoE decoder of `family` (hidden 32, expert intermediate 32), seeded, in eval mode."""
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=top_k)
    configs = {
        "mixtral": lambda: transformers.MixtralConfig(intermediate_size=32, num_local_experts=experts, **common),
        "qwen2_moe": lambda: transformers.Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=32,
                                                         shared_expert_intermediate_size=48, num_experts=experts,
                                                         norm_topk_prob=True, **common),
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=32,
                                                         num_experts=experts, head_dim=8, **common),
        "olmoe": lambda: transformers.OlmoeConfig(intermediate_size=32, num_experts=experts, **common),
    }
    classes = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
               "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}
    torch.manual_seed(seed)
    model = getattr(transformers, classes[family])(configs[family]()).eval()
    with torch.no_grad():  # transformers initialises routers with zeros for some families: make routing real
        for name, param in model.named_parameters():
            if name.endswith("gate.weight") or "experts" in name:
                param.normal_(0.0, 0.2)
    return model


class LegacyExpert(nn.Module):
    """An expert as transformers 4 kept it: w2(silu(w1 x) * w3 x)."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, inter, bias=False)
        self.w2 = nn.Linear(inter, hidden, bias=False)
        self.w3 = nn.Linear(hidden, inter, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LegacyMoeBlock(nn.Module):
    """transformers 4's Mixtral sparse MoE block: a Linear router and a ModuleList of experts."""

    def __init__(self, hidden: int, inter: int, experts: int, top_k: int):
        super().__init__()
        self.top_k, self.num_experts = top_k, experts
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList([LegacyExpert(hidden, inter) for _ in range(experts)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = hidden_states.shape
        x = hidden_states.view(-1, hidden)
        weights = F.softmax(self.gate(x), dim=1, dtype=torch.float)
        weights, selected = torch.topk(weights, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        mask = F.one_hot(selected, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            slot, token = torch.where(mask[e])
            if token.numel():
                out.index_add_(0, token, self.experts[e](x[token]) * weights[token, slot, None])
        return out.reshape(batch, seq, hidden)


def legacy_mixtral(experts: int = 8, top_k: int = 2) -> nn.Module:
    """A tiny Mixtral whose MoE blocks are `LegacyMoeBlock`s computing what the fused ones did."""
    model = tiny_moe("mixtral", experts, top_k)
    for layer in model.model.layers:
        fused = layer.mlp
        inter = fused.experts.down_proj.shape[2]
        block = LegacyMoeBlock(32, inter, experts, top_k)
        with torch.no_grad():
            block.gate.weight.copy_(fused.gate.weight)
            for e, expert in enumerate(block.experts):
                expert.w1.weight.copy_(fused.experts.gate_up_proj[e, :inter])
                expert.w3.weight.copy_(fused.experts.gate_up_proj[e, inter:])
                expert.w2.weight.copy_(fused.experts.down_proj[e])
        layer.mlp = block
    return model.eval()


def token_ids(n: int = 8, length: int = 16) -> list[torch.Tensor]:
    """`n` seeded random token-id samples of `length` tokens."""
    return [torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(i)) for i in range(n)]
