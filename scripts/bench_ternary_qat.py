"""Time one QAT training step (forward + backward + AdamW) dense vs BitLinear on a small Llama-shaped model.

    python scripts/bench_ternary_qat.py                      # hidden 384, 4 layers, seq 256, batch 4, fp32
    python scripts/bench_ternary_qat.py --lam 0.5            # the warm-up (blend) path instead of lam = 1

Both models start from the same random weights; their steps alternate (--warmup untimed, then --repeats timed)
and the medians are reported. Target: BitLinear step <= ~1.3x the dense step.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from posttrain.ternary import convert, set_quant_lambda  # noqa: E402


def make_step(model, batch):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        start = time.perf_counter()
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--lam", type=float, default=1.0, help="quant lambda of the BitLinear model")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=args.vocab,
    )
    dense = LlamaForCausalLM(config).train()
    ternary = copy.deepcopy(dense)
    n = convert(ternary)
    set_quant_lambda(ternary, args.lam)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq))

    # alternate dense and BitLinear step by step, so machine noise (turbo, other jobs) hits both alike
    dense_step, ternary_step = make_step(dense, batch), make_step(ternary, batch)
    for _ in range(args.warmup):
        dense_step(), ternary_step()
    dense_t, ternary_t = [], []
    for _ in range(args.repeats):
        dense_t.append(dense_step())
        ternary_t.append(ternary_step())
    d, t = statistics.median(dense_t), statistics.median(ternary_t)
    pair = statistics.median(b / a for a, b in zip(dense_t, ternary_t))
    print(
        f"model: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, vocab {args.vocab}, "
        f"seq {args.seq}, batch {args.batch}, fp32, {torch.get_num_threads()} threads, {n} BitLinear, lam {args.lam}"
    )
    print(f"dense step    median {d * 1e3:8.1f} ms  (n={len(dense_t)})")
    print(f"BitLinear step median {t * 1e3:8.1f} ms  (n={len(ternary_t)})")
    print(f"ratio BitLinear / dense = {t / d:.3f}  (median of per-pair ratios {pair:.3f})")


if __name__ == "__main__":
    main()
