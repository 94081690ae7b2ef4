"""Streamed decoding for `sparsepress generate`, timed against the dense source.

A decoder is a callable `(model, input_ids, attention_mask, max_new_tokens, on_token) -> new token ids`
that calls `on_token(id)` as each token is chosen (greedy). `DECODERS` maps names to decoders; today
there is `transformers` (its `generate()` with a streamer, KV cache on). A faster native decode loop
registers itself here under another name and `generate --decoder NAME` picks it; the timing and the
streaming around it stay the same.

Example:
    >>> "transformers" in DECODERS
    True
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

Decoder = Callable[[nn.Module, torch.Tensor, torch.Tensor, int, Callable[[int], None]], list[int]]


class _TokenStreamer:
    """transformers' streamer protocol: `put` gets the prompt first, then each new token; `end` once."""

    def __init__(self, on_token: Callable[[int], None]):
        self.on_token, self.prompt_seen, self.tokens = on_token, False, []  # type: list[int]

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.tokens.append(int(token))
            self.on_token(int(token))

    def end(self) -> None:
        return None


def transformers_decoder(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                         on_token: Callable[[int], None]) -> list[int]:
    """Greedy decoding with transformers' `generate()` and its KV cache, streaming each token.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                                  num_attention_heads=2, num_key_value_heads=1)).eval()
        >>> seen = []
        >>> len(transformers_decoder(m, torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.long), 3, seen.append)) == len(seen) == 3
        True
    """
    streamer = _TokenStreamer(on_token)
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    with torch.no_grad():
        model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                       min_new_tokens=max_new_tokens, do_sample=False, use_cache=True, streamer=streamer,
                       pad_token_id=pad if pad is not None else (eos if isinstance(eos, int) else 0))
    return streamer.tokens


DECODERS: dict[str, Decoder] = {"transformers": transformers_decoder}


@dataclass
class Timing:
    """One timed generation: prompt (prefill) time, then the decode rate over the remaining tokens."""

    tokens: list[int]
    first_token_s: float
    total_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first, per second of the time after the first (the KV-cached steps)."""
        steps = len(self.tokens) - 1
        return steps / max(self.total_s - self.first_token_s, 1e-9) if steps > 0 else 0.0


def timed_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, decoder: Decoder,
                   on_token: Callable[[int], None] | None = None) -> Timing:
    """Run `decoder` greedily, timing the first token and the whole run.

    Example:
        >>> def fake(model, ids, mask, n, emit):
        ...     for t in range(n): emit(t)
        ...     return list(range(n))
        >>> timed_generate(None, torch.tensor([[1]]), 4, fake).tokens
        [0, 1, 2, 3]
    """
    marks: list[float] = []

    def record(token: int) -> None:
        marks.append(time.perf_counter())
        if on_token is not None:
            on_token(token)

    start = time.perf_counter()
    tokens = decoder(model, input_ids, torch.ones_like(input_ids), max_new_tokens, record)
    end = time.perf_counter()
    return Timing(tokens=tokens, first_token_s=(marks[0] - start) if marks else end - start, total_s=end - start)


def run_generate(folder: Path, prompt: str, max_new_tokens: int, decoder: Decoder, reference: str | None,
                 compare: bool, console: Any) -> dict[str, float]:
    """`sparsepress generate`: stream the packed model's continuation, then time the dense source the same way."""
    from transformers import AutoTokenizer

    from ..errors import InputError
    from ..evaluate import is_causal_lm
    from ..io import load, read_manifest
    from ..report import kv_table
    from ..sources import load_source

    manifest = read_manifest(folder)
    model = load(folder)
    if not is_causal_lm(model):
        raise InputError(folder, f"{type(model).__name__} is not a causal LM: nothing to generate")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError):
        raise InputError(folder, "no tokenizer files in the folder") from None
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    console.print(prompt, end="", highlight=False, soft_wrap=True)
    emitted: list[int] = []

    def show(token: int) -> None:  # decode the whole tail so multi-token characters print once complete
        before = tokenizer.decode(emitted, skip_special_tokens=True)
        emitted.append(token)
        console.print(tokenizer.decode(emitted, skip_special_tokens=True)[len(before):], end="", highlight=False, soft_wrap=True)

    ours = timed_generate(model, ids, max_new_tokens, decoder, show)
    console.print()
    rows = {"prompt tokens": float(ids.shape[1]), "new tokens": float(len(ours.tokens)),
            "first token ms (sparsepress)": ours.first_token_s * 1e3,
            "decode tokens/s (sparsepress)": ours.decode_tokens_per_s}
    source = reference or manifest.get("source")
    if compare and source:
        dense = load_source(source).model
        timed_generate(dense, ids, min(4, max_new_tokens), decoder)  # warm-up
        theirs = timed_generate(dense, ids, max_new_tokens, decoder)
        rows.update({"first token ms (dense)": theirs.first_token_s * 1e3,
                     "decode tokens/s (dense)": theirs.decode_tokens_per_s,
                     "decode speedup": ours.decode_tokens_per_s / max(theirs.decode_tokens_per_s, 1e-9)})
    elif compare:
        console.print("(no dense source recorded: pass --reference MODEL to time against it)")
    console.print(kv_table("generate", [(k, f"{v:.1f}" if "tokens" in k and "/s" not in k else f"{v:.2f}") for k, v in rows.items()]))
    return rows
