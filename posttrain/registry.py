"""Finding recipes by name.

Recipes live in the top-level recipes/ folder (code) and are installed as the package `posttrain.recipes`;
run from a source checkout without installing, they are loaded from that folder by path.
"""

from __future__ import annotations

import importlib
import importlib.util
import typing
from pathlib import Path

from posttrain.config.schema import Config

_ROOT = Path(__file__).resolve().parent.parent


def recipe_names() -> list[str]:
    return [*typing.get_args(typing.get_type_hints(Config)["recipe"]), "pipeline"]


def load_recipe(name: str):
    try:
        return importlib.import_module(f"posttrain.recipes.{name}")
    except ModuleNotFoundError as err:
        if err.name not in ("posttrain.recipes", f"posttrain.recipes.{name}"):
            raise
    path = _ROOT / "recipes" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"posttrain.recipes.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_named_recipe(cfg: Config, resume: bool = False) -> dict:
    """Run the recipe that a loaded config names; returns the run's metrics (also in output_dir/metrics.json)."""
    return load_recipe(cfg.recipe).main(cfg, resume=resume)
