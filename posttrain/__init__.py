"""posttrain: post-training for Hugging Face causal LMs (SFT, LoRA/QLoRA, DPO, 1.58-bit ternary) with one
config, one CLI, and one report that compares every variant.

Python API::

    import posttrain
    cfg = posttrain.load_config("configs/tiny/sft.yaml", ["train.max_steps=20"])
    metrics = posttrain.run(cfg)
    posttrain.load_result(cfg.output_dir)   # metrics.json of a finished run
"""

__version__ = "0.1.0"

from posttrain.config.schema import Config, load_config  # noqa: E402
from posttrain.engine.run_dir import load_result  # noqa: E402
from posttrain.errors import PosttrainError  # noqa: E402
from posttrain.pipeline import run  # noqa: E402

__all__ = ["Config", "PosttrainError", "__version__", "load_config", "load_result", "run"]
