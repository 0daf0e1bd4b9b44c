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
"""

from __future__ import annotations

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
    import posttrain.packing as packing
    import posttrain.regional_compile as regional

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


def cudagraph_skips() -> int:
    """How many compiled passes torch ran without a CUDA graph in this process (inductor's counter; the reasons are
    in the log as "skipping cudagraphs due to ...")."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])
