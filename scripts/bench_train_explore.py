"""Exploration variants of scripts/bench_train.py that need more than a config key: they patch posttrain inside
the variant's own process only, to measure an idea on a GPU before it becomes a setting of the library.

posttrain_cudagraphs: every packed row padded to max_length (a padding segment of its own: position ids from 0,
labels ignored, so the loss is unchanged) and each decoder layer compiled with mode="reduce-overhead" and static
shapes, so that its forward and backward replay as CUDA graphs (torch's cudagraph trees). Why: on an H200 the
0.5B shape's ~4.4k-token SFT step took 120-170 ms of wall time eagerly, host-bound on ~3,000 launches, where
its GPU work is at most ~60 ms (docs/BENCHMARKS.md); replayed graphs cost one launch per layer and pass. Rows
are ~96% full, so the padding costs ~4% of the compute; every step then has the same shape (the last one aside).
On a CPU mode="reduce-overhead" skips the graphs and this is plain static compilation (the smoke run checks the
wiring and the losses, not the speed). The variant also sets train.grad_accum=1 (a second micro-batch's graph
replay would overwrite the first one's gradients, which live in the graphs' memory pool) and sdpa attention
(with flash-attn posttrain concatenates a micro-batch's rows into one of varying length: a recompile per length).
Its result counts cudagraph_skips: compiled passes torch ran without a graph (the log says why).

posttrain_model_loss: SFT's loss from the model's own forward (transformers' cross-entropy over the logits,
normalized by the step's label count: the same loss) instead of TRL's fused LM head, which on every step also
computes the entropy and top-1 accuracy it logs and reads them back (.item()). In smoke mode on the CPU (2 layers,
64 wide), cProfile put most of posttrain's gap to plain_loop in that head. Not measured on a GPU, where TRL's head is a
Triton kernel that never materializes the 151,936-wide logits.

plain_loop: the limit the issue measures posttrain against ("a plain PyTorch loop", docs/BENCHMARKS.md), on this
host in this run: the rows posttrain packs (its packing code), as many per step as posttrain's plan takes, trained
by a bare loop (forward with transformers' own loss, backward, clipping, fused AdamW, linear schedule; no Trainer,
no callbacks, no metrics). posttrain's rate over this one is its framework overhead, whatever the host's speed (the
anchors' host ran TRL 1.9x faster than the H200-A host of docs/BENCHMARKS.md). plain_loop_8k: the same with 8,192
tokens per step, the anchor's own setting (75.4k tokens/s there): this host's speed against the anchors' host.
"""

from __future__ import annotations

import os
import sys

IGNORE = -100


def pad_row(example: dict, length: int, pad_token_id: int) -> dict:
    """A packed row filled up to `length` with a segment of its own (as PaddingFreeCollator fills short rows)."""
    n = len(example["input_ids"])
    if n >= length:
        return example
    fill = length - n
    return {**example, "input_ids": list(example["input_ids"]) + [pad_token_id] * fill,
            "labels": list(example.get("labels", example["input_ids"])) + [IGNORE] * fill,
            "position_ids": list(example["position_ids"]) + list(range(fill))}


def patch_for_cudagraphs(max_length: int) -> None:
    """posttrain_cudagraphs (see the module docstring); the variant also sets train.compile=true."""
    import posttrain.data.packing as packing
    import posttrain.engine.compile as regional

    def compile_static(model) -> int:
        import torch

        torch._dynamo.config.suppress_errors = True  # as compile_decoder_layers: a frame that fails runs eagerly
        layers = regional.decoder_layers(model)
        for layer in layers:
            layer.compile(mode="reduce-overhead", dynamic=False)
        print(f"bench_train: {len(layers)} decoder layers compiled, mode reduce-overhead, static shapes")
        return len(layers)

    collate = packing.PaddingFreeCollator.__call__

    def collate_full_rows(self, examples):
        if "position_ids" in examples[0] and not self.flatten:
            examples = [pad_row(e, max_length, self.pad_token_id) for e in examples]
        return collate(self, examples)

    regional.compile_decoder_layers = compile_static
    packing.PaddingFreeCollator.__call__ = collate_full_rows


def prepare(variant: str, size: dict) -> None:
    """What a variant needs beyond its config keys, set up in its own process before anything is imported from
    posttrain's trainers. posttrain_liger: liger-kernel importable in that variant only, from $BENCH_LIGER_PATH (a pip
    --target folder), so that the other variants measure the base install."""
    if variant == "posttrain_cudagraphs":
        patch_for_cudagraphs(size["max_length"])
    elif variant == "posttrain_model_loss":
        patch_model_loss()
    elif variant == "posttrain_liger" and os.environ.get("BENCH_LIGER_PATH"):
        sys.path.insert(0, os.environ["BENCH_LIGER_PATH"])


def patch_model_loss() -> None:
    """posttrain_model_loss (see the module docstring), in this process only."""
    import transformers
    import trl

    trl.SFTTrainer.compute_loss = transformers.Trainer.compute_loss


def cudagraph_skips() -> int:
    """How many compiled passes torch ran without a CUDA graph in this process (inductor's counter; the reasons are
    in the log as "skipping cudagraphs due to ...")."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def plain_loop(work, size: dict, docs: list[list[int]], batch: int, pad_token_id: int, tokens_per_step: int = 0,
               seed: int = 42):
    """plain_loop (see the module docstring): (measurements as bench_train's Clock takes them, the trained model).
    tokens_per_step (plain_loop_8k: 8192, the anchor's 8 x 1024) replaces batch 8's worth, as posttrain_8k does."""
    import random
    import time

    import bench_train_measure as measure
    import torch
    from transformers import AutoModelForCausalLM

    from posttrain.data.packing import PaddingFreeCollator, pack_examples

    start, cuda = time.perf_counter(), torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa").to(device)
    model.config.use_cache = False  # with a cache, packed documents would attend to each other
    model.train()  # from_pretrained returns it in eval mode; the Trainer trains in train mode (dropout, if any)
    docs = [d[:size["max_length"]] for d in docs]  # as posttrain truncates (keeping the start)
    packed = pack_examples([{"input_ids": d, "labels": d} for d in docs], size["max_length"])
    budget = tokens_per_step or batch * packed.tokens / len(docs)
    per_step = max(1, round(budget / packed.mean_row_tokens))  # as posttrain's plan
    rows = packed.rows[:]
    random.Random(seed).shuffle(rows)
    steps = [rows[i:i + per_step] for i in range(0, len(rows), per_step)]
    collate = PaddingFreeCollator(pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=size["lr"], weight_decay=0.0, fused=True)  # as posttrain
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: 1 - done / len(steps))
    losses, tokens, wall0, setup = [], 0, None, time.perf_counter() - start
    for i, step_rows in enumerate(steps, 1):
        inputs = {k: (v.pin_memory() if cuda else v).to(device, non_blocking=True) for k, v in
                  collate(step_rows).items()}
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if i == size["warmup"]:
            measure.sync()
            wall0 = time.perf_counter()
        elif i > size["warmup"]:
            tokens += sum(len(row["input_ids"]) for row in step_rows)  # packed rows hold no padding
    measure.sync()
    seconds = time.perf_counter() - wall0 if wall0 is not None else 0.0
    result = {"setup_s": setup, "tokens_per_s": tokens / seconds if seconds else None, "steps": len(steps),
              "trained_tokens": sum(len(row["input_ids"]) for row in rows), "rows": len(rows),
              "all_steps_s": time.perf_counter() - start - setup, "rows_per_step": per_step, "timing": "wall-clock",
              "losses": [float(loss) for loss in losses], **measure.peak_memory()}
    return result, model
