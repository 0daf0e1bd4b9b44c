"""What a finished run says about itself: the model card (README.md in Hugging Face's format) and the versions
of the libraries that made it."""

from __future__ import annotations

import sys
from pathlib import Path

from posttrain.config.schema import Config, dump_yaml


def versions() -> dict:
    import peft
    import torch
    import transformers
    import trl

    import posttrain

    return {"posttrain": posttrain.__version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__, "peft": peft.__version__}


def model_card(cfg: Config, metrics: dict, is_adapter: bool, recipe_title: str) -> str:
    """README.md for the output folder: Hugging Face front matter + what was done and measured."""
    datasets = [s.path for s in cfg.data.train if not s.path.startswith(("tiny:", ".", "/", "~"))
                and not Path(s.path).exists()]
    tags = ["posttrain", cfg.recipe] + ([cfg.adapter.method] if cfg.adapter else [])
    library = "peft" if is_adapter else "transformers"
    front = ["---", f"base_model: {cfg.model.name_or_path}", f"library_name: {library}",
             "pipeline_tag: text-generation", "tags:"] + [f"- {t}" for t in tags]
    if datasets:
        front += ["datasets:"] + [f"- {d}" for d in datasets]
    front.append("---")
    rows = [(k, metrics.get(k)) for k in ("train_loss_first", "train_loss_last", "eval_loss", "steps",
                                          "trained_tokens", "tokens_per_second", "train_runtime_s")]
    table = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in rows
                      if v is not None)
    return "\n".join(front) + f"""

# {Path(cfg.output_dir).name}

{recipe_title} of `{cfg.model.name_or_path}` with [posttrain](https://github.com/posttrain/posttrain),
on {', '.join(f'`{s.path}`' for s in cfg.data.train)}.

| metric | value |
| --- | --- |
{table}

Data: {metrics.get('data')}

## Config

```yaml
{dump_yaml(cfg)}```
"""
