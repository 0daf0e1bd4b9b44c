"""Finding and running recipes, and the bundled configs.

Recipes live in the top-level recipes/ folder (code) and are installed as the package `posttrain.recipes`;
run from a source checkout without installing, they are loaded from that folder by path.
"""

from __future__ import annotations

import importlib
import importlib.resources
import importlib.util
import typing
from pathlib import Path

from posttrain.config import Config, load_config, read_yaml

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


def run(cfg: Config | str | Path, overrides: list[str] | None = None, resume: bool = False) -> dict:
    """Run the recipe a config names; returns the run's metrics (also in output_dir/metrics.json).
    resume: continue an unfinished run from its latest complete checkpoint."""
    if not isinstance(cfg, Config):
        path = resolve_config_path(cfg)
        if read_yaml(path)[0].get("recipe") == "pipeline":
            from posttrain.pipeline import run_pipeline

            return {"pipeline": str(run_pipeline(path, overrides))}
        cfg = load_config(path, overrides)
    return load_recipe(cfg.recipe).main(cfg, resume=resume)


def configs_dir() -> Path | None:
    source = _ROOT / "configs"
    if source.is_dir():
        return source
    try:
        installed = Path(str(importlib.resources.files("posttrain.configs")))
    except ModuleNotFoundError:
        return None
    return installed if installed.is_dir() else None


def bundled_configs() -> list[str]:
    root = configs_dir()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.yaml")) if root else []


def resolve_config_path(path: str | Path) -> Path:
    """A config path as given, or the name of a bundled config (`tiny/sft` or `configs/tiny/sft.yaml`)."""
    path = Path(path)
    if path.exists() or configs_dir() is None:
        return path
    name = str(path).removeprefix("configs/")
    candidate = configs_dir() / (name if name.endswith(".yaml") else f"{name}.yaml")
    return candidate if candidate.is_file() else path
