"""llama.cpp rows for benchmarks/e2e.py: the dense LLaMA's weights written as GGUF (the `gguf` package,
Q8_0 and Q4_0 matrices, f32 norms; query / key rows permuted as llama.cpp's converter does), then
greedy decoding timed through llama-cpp-python (built from source here, CPU only).

Prefill is one `eval` of the prompt; decode is argmax over the last logits then `eval` of that one
token, `new_tokens` times. Each model is timed alone (llama.cpp's own pool spins between calls).

Example:
    python benchmarks/e2e.py --skip-minilm --llamacpp
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half head layout -> llama.cpp's interleaved pairs (convert_hf_to_gguf's permute)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_gguf(model: torch.nn.Module, path: Path, qtype: str) -> Path:
    """A LLaMA GGUF of `model`'s weights with every matrix in `qtype` (Q8_0 / Q4_0) and a placeholder
    vocabulary (the benchmark feeds token ids)."""
    import gguf

    config = model.config
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    writer = gguf.GGUFWriter(str(path), "llama")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == "Q8_0" else gguf.LlamaFileType.MOSTLY_Q4_0)
    vocab = config.vocab_size
    writer.add_tokenizer_model("llama")
    writer.add_token_list([b"<unk>", b"<s>", b"</s>"] + [f"<t{i}>".encode() for i in range(3, vocab)])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
                           + [gguf.TokenType.NORMAL] * (vocab - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def matrix(name: str, weight: torch.Tensor) -> None:
        data = weight.detach().float().numpy()
        writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)

    def vector(name: str, weight: torch.Tensor) -> None:
        writer.add_tensor(name, weight.detach().float().numpy())

    base = model.model
    matrix("token_embd.weight", base.embed_tokens.weight)
    for i, layer in enumerate(base.layers):
        attn, mlp = layer.self_attn, layer.mlp
        vector(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight)
        matrix(f"blk.{i}.attn_q.weight", torch.from_numpy(_permute(attn.q_proj.weight.detach().numpy(), heads)))
        matrix(f"blk.{i}.attn_k.weight", torch.from_numpy(_permute(attn.k_proj.weight.detach().numpy(), kv_heads)))
        matrix(f"blk.{i}.attn_v.weight", attn.v_proj.weight)
        matrix(f"blk.{i}.attn_output.weight", attn.o_proj.weight)
        vector(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight)
        matrix(f"blk.{i}.ffn_gate.weight", mlp.gate_proj.weight)
        matrix(f"blk.{i}.ffn_up.weight", mlp.up_proj.weight)
        matrix(f"blk.{i}.ffn_down.weight", mlp.down_proj.weight)
    vector("output_norm.weight", base.norm.weight)
    matrix("output.weight", model.lm_head.weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _last_logits(llm) -> np.ndarray:
    """The last evaluated token's logits, read in place from llama.cpp's buffer. (`Llama.eval_logits`
    copies every evaluated row into Python lists on each access, ~20 ms per step at a 32k vocabulary,
    and in llama-cpp-python 0.3 holds zeros unless the model was opened with logits_all.)"""
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def _time(llm, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = int(np.argmax(_last_logits(llm)))
        llm.eval([token])
    return prefill, (time.perf_counter() - start) / new_tokens


def llamacpp_rates(model: torch.nn.Module, prompt: int, new_tokens: int, threads: int,
                   rounds: int = 3) -> list[tuple[str, float, float]]:
    """(name, prefill tokens/s, decode tokens/s) of llama.cpp Q8_0 and Q4_0 on `model`'s weights."""
    from llama_cpp import Llama

    ids = torch.randint(3, model.config.vocab_size, (prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = []
    folder = Path(tempfile.mkdtemp(prefix="sp-gguf-"))
    for qtype in ("Q8_0", "Q4_0"):
        path = write_gguf(model, folder / f"model-{qtype}.gguf", qtype)
        llm = Llama(str(path), n_ctx=prompt + new_tokens + 8, n_batch=max(prompt, 8), n_threads=threads,
                    n_threads_batch=threads, verbose=False)
        _time(llm, ids, 2)  # warm-up
        samples = [_time(llm, ids, new_tokens) for _ in range(rounds)]
        prefill = statistics.median(s[0] for s in samples)
        step = statistics.median(s[1] for s in samples)
        rows.append((f"llama.cpp {qtype} (dense weights)", prompt / prefill, 1.0 / step))
        del llm
        path.unlink()
    return rows
