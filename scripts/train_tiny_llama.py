"""Train the tiny LLaMA fixture (tests/fixtures/tiny-llama/) on WikiText-2, so perplexity means something.

A byte-level BPE tokenizer (vocab 4096) and a 4-layer LlamaForCausalLM with grouped-query attention are
trained on the first 95% of the WikiText-2 validation split (its last 5% is held out to choose the
step count) and evaluated on the test split (the only two splits in /work/shared/data/wikitext-2).
Weights are stored in float16 to keep the fixture small; it runs on CPU or, with --device cuda, a GPU.

Example:
    python scripts/train_tiny_llama.py --device cuda --out tests/fixtures/tiny-llama
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

DATA = Path("/work/shared/data/wikitext-2")
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def train_tokenizer(text: str, vocab_size: int):
    """A byte-level BPE tokenizer wrapped as a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=512)


def encode(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(ids: torch.Tensor, seq_len: int, bos: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping `[bos] + seq_len-1 tokens` rows: the evaluation layout sparsepress uses."""
    body = seq_len - 1
    rows = ids[: (len(ids) // body) * body].view(-1, body)
    if limit is not None:
        rows = rows[:limit]
    return torch.cat([torch.full((len(rows), 1), bos), rows], dim=1)


@torch.no_grad()
def perplexity(model, rows: torch.Tensor, batch: int = 32) -> float:
    total, count = 0.0, 0
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        logits = model(input_ids=chunk, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), chunk[:, 1:], reduction="sum")
        total, count = total + float(nll), count + chunk[:, 1:].numel()
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/fixtures/tiny-llama")
    parser.add_argument("--data", type=Path, default=DATA, help="folder with valid.txt and test.txt")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--holdout", type=float, default=0.05, help="tail fraction of valid.txt kept out of training")
    parser.add_argument("--eval-every", type=int, default=0, help="print held-out perplexity every N steps")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--eval-windows", type=int, default=400)
    parser.add_argument("--time-budget", type=float, default=None, help="stop training after this many seconds")
    args = parser.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(2)
    valid_text = (args.data / "valid.txt").read_text(encoding="utf-8")
    test_text = (args.data / "test.txt").read_text(encoding="utf-8")
    cut = valid_text.rfind("\n", 0, int(len(valid_text) * (1 - args.holdout))) + 1
    train_text, holdout_text = valid_text[:cut], valid_text[cut:]
    tokenizer = train_tokenizer(train_text, args.vocab)
    train_ids, test_ids = encode(tokenizer, train_text), encode(tokenizer, test_text)
    bos = tokenizer.bos_token_id
    test_rows = windows(test_ids, args.seq_len, bos, args.eval_windows)
    holdout_rows = windows(encode(tokenizer, holdout_text), args.seq_len, bos).to(args.device)
    print(f"tokens: train {len(train_ids)}, held out {holdout_rows.numel()}, test {len(test_ids)} "
          f"(eval on {len(test_rows)} windows)")

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=704, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        bos_token_id=bos, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(args.device)
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
    for step in range(args.steps):
        offsets = torch.randint(0, len(train_ids) - body, (args.batch,), generator=gen)
        rows = torch.stack([train_ids[o : o + body] for o in offsets.tolist()])
        batch = torch.cat([torch.full((args.batch, 1), bos), rows], dim=1).to(args.device)
        for group in optim.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        elapsed = time.perf_counter() - start
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  lr {lr_at(step):.2e}  {elapsed:.0f}s", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            model.eval()
            print(f"step {step + 1:4d}  held-out perplexity {perplexity(model, holdout_rows):.2f}", flush=True)
            model.train()
        if args.time_budget is not None and elapsed > args.time_budget:
            print(f"time budget reached at step {step}")
            break
    model.eval()
    holdout_ppl = perplexity(model, holdout_rows)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.to("cpu", torch.float16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # Measure what ships: the float16 weights, run in float32 as sparsepress loads them.
    reloaded = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ppl = perplexity(reloaded, test_rows)
    summary = {"steps": step + 1, "batch": args.batch, "lr": args.lr, "device": args.device,
               "train_seconds": round(time.perf_counter() - start), "train_tokens": len(train_ids),
               "holdout_perplexity": round(holdout_ppl, 2), "test_windows": len(test_rows),
               "seq_len": args.seq_len, "test_perplexity": round(ppl, 2)}
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
