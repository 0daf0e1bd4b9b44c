"""Greedy decoding with each new token one replay of a CUDA graph: how a ternary model decodes faster than bf16.

    out = graph_generate(load_fast_ternary("out/ternary", device="cuda"), input_ids, max_new_tokens=128)
    out.tokens, out.tokens_per_second()

Why: a decode step of a ~1B model is a few hundred small launches, and called from Python each TernaryLinear costs
~48 us of host time on an H200 whatever the layer (its GPU time is 12-26 us on 4096x14336 .. 8192x28672), so eager
`model.generate` ran a 1B-shaped ternary model at 0.70x the bf16 model's tokens/s. Captured once and replayed, a
step costs its GPU time only: 514.5 vs 441.7 tok/s, 1.16x bf16 (docs/BENCHMARKS.md). Any decoder-only
transformers model with full attention in every layer (Llama, Qwen2 without its sliding window, ...; the benchmark
runs the dense model through it too). Greedy only; the batch's rows are prompts of one length without padding
(there is no attention mask), decoded in lockstep; a fixed number of new tokens (no stop at EOS: a check per step
would synchronize the host every token). The model runs in eval mode (restored afterwards).

The cache is a transformers StaticCache (fixed shapes, which a graph needs). One eager step runs first, off the
capture, so that lazy initialization and the kernels' one-time tuning happen outside it; it writes the position
the first real step writes again, and StaticCache layers write at their own counter (cumulative_length) rather
than at cache_position, so that counter is put back afterwards (tests: the eager replay of these exact steps
equals `generate`'s tokens, dense and ternary). Sliding-window layers keep a Python int counter that a graph would
freeze at its captured value: capture refuses them (cuda_graph=False still decodes them correctly).
"""

from __future__ import annotations

import inspect
import time
import warnings
from dataclasses import dataclass

import torch

from posttrain.errors import PosttrainError


@dataclass
class Decoded:
    tokens: torch.Tensor  # (batch, prompt + max_new_tokens): the prompt, then the greedy tokens
    new_tokens: int
    decode_seconds: float  # the steps after the first new token (prefill, warm-up and capture excluded)

    def tokens_per_second(self) -> float:
        """Per batch row: new tokens after the first, over the time they took (the rate `generate` reports)."""
        return (self.new_tokens - 1) / self.decode_seconds if self.decode_seconds > 0 else float("nan")


@torch.no_grad()
def graph_generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, cuda_graph: bool | None = None) -> Decoded:
    """Greedy tokens after `input_ids` (batch, prompt), each step after the first one CUDA-graph replay.
    cuda_graph: None = on when the model runs on CUDA; False runs the very same steps eagerly (any device)."""
    from transformers import StaticCache

    if input_ids.dim() != 2 or input_ids.dtype != torch.long or max_new_tokens < 1:
        raise PosttrainError("graph_generate needs input_ids of shape (batch, prompt) as torch.long and "
                             "max_new_tokens >= 1")
    capture = input_ids.is_cuda if cuda_graph is None else cuda_graph
    (rows, n), device = input_ids.shape, input_ids.device
    cache = StaticCache(model.config, max_cache_len=n + max_new_tokens + 1)
    if capture and any(hasattr(layer, "cumulative_length_int") for layer in getattr(cache, "layers", [])):
        raise PosttrainError(f"graph_generate: {type(model).__name__} has sliding-window attention layers, whose "
                             "cache position a CUDA graph would freeze; pass cuda_graph=False or use model.generate")
    if capture and not input_ids.is_cuda:
        raise PosttrainError("graph_generate: cuda_graph=True needs the model and input_ids on a CUDA device")
    cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # past_key_values: renamed in newer transformers
            logits = model(input_ids, **{cache_kwarg: cache}, cache_position=torch.arange(n, device=device),
                           use_cache=True).logits
            token, position = logits[:, -1:].argmax(-1), torch.tensor([n], device=device)
            position_ids = position.view(1, 1).expand(rows, 1)  # a view: follows position's in-place updates

            def step():
                return model(token, **{cache_kwarg: cache}, cache_position=position, position_ids=position_ids,
                             use_cache=True).logits

            replay, last_logits = _prepare(step, cache, capture, input_ids.is_cuda)
            tokens = [token.clone()]
            _sync(input_ids)
            start = time.perf_counter()
            for _ in range(max_new_tokens - 1):
                replay()
                token.copy_(last_logits()[:, -1:].argmax(-1))
                position.add_(1)
                tokens.append(token.clone())
            _sync(input_ids)
            seconds = time.perf_counter() - start
    finally:
        model.train(was_training)
    return Decoded(torch.cat([input_ids, *tokens], dim=1), max_new_tokens, seconds)


def _prepare(step, cache, capture: bool, cuda: bool):
    """(replay, last_logits): the warm-up step off the capture, its cache counters put back, then the graph (or
    the eager step)."""
    layers = getattr(cache, "layers", [])
    counters = [(layer.cumulative_length, layer.cumulative_length.clone()) for layer in layers
                if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)]
    int_counters = [(layer, layer.cumulative_length_int) for layer in layers if hasattr(layer, "cumulative_length_int")]
    if cuda:  # warm-up on a side stream, as torch.cuda.graphs asks before a capture
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
    else:
        step()
    for counter, value in counters:
        counter.copy_(value)
    for layer, value in int_counters:
        layer.cumulative_length_int = value
    if capture:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = step()
        return graph.replay, lambda: logits
    holder = {}
    return (lambda: holder.__setitem__("logits", step())), (lambda: holder["logits"])


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
