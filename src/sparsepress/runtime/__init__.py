"""The native runtime: whole transformer stacks in one native call, and a native greedy decode loop.

`use_native_blocks(model)` builds a block plan (`plan.build_plan`) for a supported family (BERT,
RoBERTa, XLM-R, ELECTRA, MPNet, DistilBERT encoders; LLaMA, Mistral, Qwen2, Qwen3 decoders; Qwen3-MoE,
Qwen2-MoE, Mixtral and OLMoE decoders, their MoE blocks included: `moe_plan`) whose block Linears are
packed layers, puts it in the forward slot of the module that loops over the blocks, and checks on a
probe input that it agrees with the module path (else it undoes it). `sp.load` and `sp.compress` call
it; `SPARSEPRESS_NATIVE_BLOCKS=0` turns that off for the process and `disable_native_blocks(model)` for
one model; `native_blocks_reason(model)` says why a model stayed on its modules. Calls it does not
cover run the module path unchanged.

`generate(model, input_ids, max_new_tokens)` decodes greedily with everything native (embedding
lookup, blocks with a KV cache, final norm, LM head, argmax): one native call per token.

Example:
    >>> import torch
    >>> use_native_blocks(torch.nn.Linear(2, 2))
    False
"""

from __future__ import annotations

from .decode import NativeDecoder, generate
from .entries import NativeForward
from .plan import StackPlan, build_plan
from .switch import disable_native_blocks, native_blocks_of, native_blocks_reason, use_native_blocks

__all__ = [
    "NativeDecoder",
    "NativeForward",
    "StackPlan",
    "build_plan",
    "disable_native_blocks",
    "generate",
    "native_blocks_of",
    "native_blocks_reason",
    "use_native_blocks",
]
