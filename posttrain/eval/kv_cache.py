"""Passing and reading a KV cache across transformers versions.

transformers 5.24 renamed the forward argument and output field `past_key_values` to `cache` (the old name still
works with a warning until 5.40); the GPU image has 5.17, which only knows the old name. posttrain's scorers and
the decode benchmark reuse caches, so they ask the model which name it takes instead of pinning a version.
"""

from __future__ import annotations

import inspect
from functools import cache


def cache_kwargs(model, cache) -> dict:
    """{'cache': cache} or {'past_key_values': cache}, whichever the model's forward takes."""
    return {_cache_arg_name(type(_inner_model(model))): cache}


def output_cache(outputs):
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else getattr(outputs, "past_key_values", None)


def _inner_model(model):
    # A PeftModel forwards **kwargs to the wrapped transformers model, whose signature is the one that matters.
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


@cache
def _cache_arg_name(model_cls) -> str:
    params = inspect.signature(model_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
