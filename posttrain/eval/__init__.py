"""Evaluation, benchmarking and the side-by-side report (`posttrain eval`, `posttrain bench`).

    run_eval(["base=runs/base", "sft=runs/sft-lora"], "configs/eval/tiny.yaml", "out/eval")
    run_bench(["base=runs/base", "ternary=runs/ternary"], "out/eval")

Both write results.json, report.md, report.html and plots into the output folder and return the results dict;
eval also writes one record per item (samples/<variant>/<task>.jsonl) and tests each variant against a baseline
(results["stats"]). The metric definitions are in docs/EVAL.md and in the docstrings of the modules that compute
them.
"""

from posttrain.eval.runner import environment, run_bench, run_eval
from posttrain.eval.suite import Suite, load_suite
from posttrain.eval.variants import Variant, load_variant, split_model_spec

__all__ = ["Suite", "Variant", "environment", "load_suite", "load_variant", "run_bench", "run_eval", "split_model_spec"]
