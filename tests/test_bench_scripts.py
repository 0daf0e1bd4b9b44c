"""The benchmark scripts' own bookkeeping, where a mistake would only show on a GPU run."""

import importlib.util
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_static_cache_decode_equals_generate():
    """bench_ternary's CUDA-graph decode: its warm-up step must not shift the StaticCache's write position
    (transformers >= 5.2x writes at the layer's own counter, not at cache_position): run eagerly, the same steps
    give generate's greedy tokens, for the dense model and with TernaryLinear swapped in."""
    bench = load_script("bench_ternary")
    from posttrain.ternary import convert, load_fast_ternary

    dense, _ = bench.random_llama(128, 2, 256, 500, torch.float32, "cpu")
    ternary = bench.copy.deepcopy(dense)
    convert(ternary)
    load_fast_ternary(ternary)
    ids = torch.randint(3, 500, (1, 8), generator=torch.Generator().manual_seed(0))
    for model in (dense, ternary):
        with torch.no_grad():
            expected = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
        _, tokens = bench.graph_decode(model, ids, 12, capture=False)
        assert torch.equal(tokens, expected)
