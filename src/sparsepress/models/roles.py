"""What each module of a transformer block does, per architecture: the adapter the native runtime
reads to run a block without its Python modules.

A family is a table row, not code: the block's shape (post-norm encoders, pre-norm decoders with a
gated MLP or a mixture of experts), where the block's Linear layers and norms sit relative to the
block, and what the base model (whose forward the runtime takes over) runs around the blocks:
embeddings, a pooler, MPNet's relative position bias, a decoder's rotary embeddings and final norm.
A MoE family names where its blocks keep the MLP (`moe`); whether that MLP is a mixture of experts,
and how it routes, is the MoE adapter's business (`sparsepress.models.moe`).

Example:
    >>> roles_for("bert").q, roles_for("llama").gate, roles_for("gpt2") is None
    ('attention.self.query', 'mlp.gate_proj', True)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockRoles:
    """Relative paths of one family's block members and what the base model runs around them.

    `entry` names the base model's call convention (`encoder` or `decoder`, see
    `sparsepress.runtime.entries`); `pre_norm` blocks norm before attention and MLP and add their
    outputs to the residual stream, post-norm ones add first and norm the sum. Paths of `embeddings`,
    `pooler`, `position_bias` (a module with `compute_position_bias`), `final_norm` and `rotary` are
    relative to the base model; `output` is the transformers output class the base model returns.
    `qk_norm_full`: q_norm / k_norm span the whole projection (OLMoE) instead of each head (Qwen3).
    `moe`: the block member that is a mixture-of-experts block in the layers that have one (the others
    keep the dense `gate` / `up` / `down` MLP).
    """

    entry: str
    pre_norm: bool
    q: str
    k: str
    v: str
    o: str
    up: str
    down: str
    norm1: str
    norm2: str
    gate: str | None = None
    q_norm: str | None = None
    k_norm: str | None = None
    embeddings: str = "embeddings"
    token_types: bool = False  # the embeddings take token_type_ids
    pooler: str | None = None
    position_bias: str | None = None
    final_norm: str | None = None
    rotary: str | None = None
    output: str = "BaseModelOutput"
    activation: tuple[str, ...] = ("hidden_act",)  # config fields naming the MLP activation, first found wins
    qk_norm_full: bool = False
    moe: str | None = None

    def linears(self) -> dict[str, str]:
        """Role -> relative path of every Linear of the block.

        Example:
            >>> sorted(roles_for("bert").linears())
            ['down', 'k', 'o', 'q', 'up', 'v']
        """
        names = {"q": self.q, "k": self.k, "v": self.v, "o": self.o, "up": self.up, "down": self.down}
        if self.gate is not None:
            names["gate"] = self.gate
        return names


_BERT = BlockRoles(entry="encoder", pre_norm=False, q="attention.self.query", k="attention.self.key",
                   v="attention.self.value", o="attention.output.dense", up="intermediate.dense",
                   down="output.dense", norm1="attention.output.LayerNorm", norm2="output.LayerNorm",
                   token_types=True, pooler="pooler", output="BaseModelOutputWithPoolingAndCrossAttentions")
_MPNET = BlockRoles(entry="encoder", pre_norm=False, q="attention.attn.q", k="attention.attn.k",
                    v="attention.attn.v", o="attention.attn.o", up="intermediate.dense", down="output.dense",
                    norm1="attention.LayerNorm", norm2="output.LayerNorm", pooler="pooler", position_bias="encoder",
                    output="BaseModelOutputWithPooling")
_DISTILBERT = BlockRoles(entry="encoder", pre_norm=False, q="attention.q_lin", k="attention.k_lin",
                         v="attention.v_lin", o="attention.out_lin", up="ffn.lin1", down="ffn.lin2",
                         norm1="sa_layer_norm", norm2="output_layer_norm", activation=("activation",))
_LLAMA = BlockRoles(entry="decoder", pre_norm=True, q="self_attn.q_proj", k="self_attn.k_proj",
                    v="self_attn.v_proj", o="self_attn.o_proj", gate="mlp.gate_proj", up="mlp.up_proj",
                    down="mlp.down_proj", norm1="input_layernorm", norm2="post_attention_layernorm",
                    embeddings="embed_tokens", final_norm="norm", rotary="rotary_emb", output="BaseModelOutputWithPast")
_QWEN3 = BlockRoles(**{**_LLAMA.__dict__, "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"})
_MOE = {"moe": "mlp", "output": "MoeModelOutputWithPast"}

# model_type -> roles. Families whose blocks match one of these shapes exactly; others run on modules.
FAMILY_ROLES: dict[str, BlockRoles] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "mpnet": _MPNET,
    "distilbert": _DISTILBERT,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _QWEN3,
    "mixtral": BlockRoles(**{**_LLAMA.__dict__, **_MOE}),
    "qwen2_moe": BlockRoles(**{**_LLAMA.__dict__, **_MOE}),
    "qwen3_moe": BlockRoles(**{**_QWEN3.__dict__, **_MOE}),
    "olmoe": BlockRoles(**{**_QWEN3.__dict__, **_MOE, "qk_norm_full": True}),
}


def roles_for(model_type: str | None) -> BlockRoles | None:
    """The block roles of a `config.model_type`, or None when the runtime has no native plan for it.

    Example:
        >>> roles_for("qwen3").q_norm
        'self_attn.q_norm'
    """
    return FAMILY_ROLES.get(model_type or "")


__all__ = ["FAMILY_ROLES", "BlockRoles", "roles_for"]
