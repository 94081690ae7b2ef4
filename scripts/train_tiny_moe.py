"""Train the tiny mixture-of-experts fixture (tests/fixtures/tiny-moe/) on WikiText-2, so perplexity means something.

A 4-layer Qwen3-MoE decoder (hidden 128, 8 experts of intermediate 192 per layer, top-2 routing with the
top-2 gate weights renormalised, load-balancing loss on) is trained with the tiny LLaMA fixture's
byte-level BPE tokenizer (tests/fixtures/tiny-llama, vocabulary 4096) on the same text: the first 95% of
the WikiText-2 validation split (its last 5% held out to choose the step count), evaluated on the test
split. Weights are stored in float16 to keep the fixture small (a few MB). It runs on 2 CPU cores in
about an hour (`--device cuda` on a GPU in seconds).

Example:
    nice -n 19 python scripts/train_tiny_moe.py --out tests/fixtures/tiny-moe
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny_llama import DATA, encode, perplexity, windows  # noqa: E402  (shared with the LLaMA fixture)

TOKENIZER = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny-llama"


def make_config(tokenizer, args: argparse.Namespace):
    """The fixture's Qwen3-MoE config (every layer a sparse MoE layer)."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=2 * args.expert_intermediate,
        moe_intermediate_size=args.expert_intermediate, num_experts=args.experts, num_experts_per_tok=args.top_k,
        norm_topk_prob=True, num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=args.hidden // 4, max_position_embeddings=512, rms_norm_eps=1e-5, decoder_sparse_step=1,
        output_router_logits=True, router_aux_loss_coef=args.aux_loss, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/fixtures/tiny-moe")
    parser.add_argument("--data", type=Path, default=DATA, help="folder with valid.txt and test.txt")
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER, help="folder of the tokenizer to reuse")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--holdout", type=float, default=0.05, help="tail fraction of valid.txt kept out of training")
    parser.add_argument("--eval-every", type=int, default=0, help="print held-out perplexity every N steps")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-intermediate", type=int, default=192)
    parser.add_argument("--aux-loss", type=float, default=0.001, help="load-balancing loss weight (Qwen3-MoE's default)")
    parser.add_argument("--experts-implementation", default="grouped_mm", help="transformers' experts forward to train with")
    parser.add_argument("--eval-windows", type=int, default=400)
    parser.add_argument("--time-budget", type=float, default=None, help="stop training after this many seconds")
    args = parser.parse_args()

    from transformers import AutoTokenizer, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    valid_text = (args.data / "valid.txt").read_text(encoding="utf-8")
    test_text = (args.data / "test.txt").read_text(encoding="utf-8")
    cut = valid_text.rfind("\n", 0, int(len(valid_text) * (1 - args.holdout))) + 1
    train_text, holdout_text = valid_text[:cut], valid_text[cut:]
    train_ids, test_ids = encode(tokenizer, train_text), encode(tokenizer, test_text)
    bos = tokenizer.bos_token_id
    test_rows = windows(test_ids, args.seq_len, bos, args.eval_windows)
    holdout_rows = windows(encode(tokenizer, holdout_text), args.seq_len, bos).to(args.device)
    print(f"tokens: train {len(train_ids)}, held out {holdout_rows.numel()}, test {len(test_ids)} "
          f"(eval on {len(test_rows)} windows)")

    config = make_config(tokenizer, args)
    model = Qwen3MoeForCausalLM(config).to(args.device)
    # grouped_mm: the same math as the eager per-expert loop, ~1.5x faster to train on CPU
    model.set_experts_implementation(args.experts_implementation)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                              lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(0)
    body = args.seq_len - 1
    model.train()
    start = time.perf_counter()
    step = 0
    for step in range(args.steps):
        offsets = torch.randint(0, len(train_ids) - body, (args.batch,), generator=gen)
        rows = torch.stack([train_ids[o : o + body] for o in offsets.tolist()])
        batch = torch.cat([torch.full((args.batch, 1), bos), rows], dim=1).to(args.device)
        for group in optim.param_groups:
            group["lr"] = lr_at(step)
        out = model(input_ids=batch, labels=batch, use_cache=False)
        optim.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        elapsed = time.perf_counter() - start
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {out.loss.item():.3f}  aux {out.aux_loss.item():.3f}  lr {lr_at(step):.2e}  "
                  f"{elapsed:.0f}s", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            model.eval()
            print(f"step {step + 1:4d}  held-out perplexity {perplexity(model, holdout_rows):.2f}", flush=True)
            model.train()
        if args.time_budget is not None and elapsed > args.time_budget:
            print(f"time budget reached at step {step}")
            break
    model.eval()
    holdout_ppl = perplexity(model, holdout_rows)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False  # inference default: no auxiliary loss outputs
    model.to("cpu", torch.float16).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    # Measure what ships: the float16 weights, run in float32 as sparsepress loads them.
    reloaded = Qwen3MoeForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    ppl = perplexity(reloaded, test_rows)
    summary = {"steps": step + 1, "batch": args.batch, "lr": args.lr, "device": args.device,
               "threads": args.threads, "train_seconds": round(time.perf_counter() - start),
               "train_tokens": len(train_ids), "holdout_perplexity": round(holdout_ppl, 2),
               "test_windows": len(test_rows), "seq_len": args.seq_len, "test_perplexity": round(ppl, 2)}
    (out_dir / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
