"""The configs that ship with posttrain (the repository's configs/ folder, installed as `posttrain.configs`).

Run configs and pipelines are what `posttrain run` takes; configs/accelerate/ (launcher settings) and configs/eval/
(evaluation suites) ship too but are inputs to other flags, so `posttrain ls` lists them apart.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_SOURCE_TREE = Path(__file__).resolve().parents[2] / "configs"
NOT_RUNNABLE = ("accelerate", "eval")  # sub-folders whose YAML is not a run config


def configs_dir() -> Path | None:
    """configs/ of a source checkout, else the installed package's copy."""
    if _SOURCE_TREE.is_dir():
        return _SOURCE_TREE
    # configs/ holds YAML only (no __init__.py), so the installed copy is a namespace package: its folder is
    # the spec's search location (importlib.resources.files would give a MultiplexedPath, not a folder).
    try:
        spec = importlib.util.find_spec("posttrain.configs")
    except ModuleNotFoundError:
        return None
    folders = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    return next((f for f in folders if f.is_dir()), None)


def bundled_configs(runnable: bool | None = None) -> list[str]:
    """Bundled YAML names relative to configs/ (`tiny/sft.yaml`); runnable=True: run configs and pipelines only,
    False: the others (accelerate and eval settings)."""
    root = configs_dir()
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*.yaml")) if root else []
    if runnable is None:
        return names
    return [n for n in names if (n.split("/")[0] not in NOT_RUNNABLE) == runnable]


def resolve_config_path(path: str | Path) -> Path:
    """A config path as given, or the name of a bundled config (`tiny/sft` or `configs/tiny/sft.yaml`)."""
    path = Path(path)
    if path.exists() or configs_dir() is None:
        return path
    name = str(path).removeprefix("configs/")
    candidate = configs_dir() / (name if name.endswith(".yaml") else f"{name}.yaml")
    return candidate if candidate.is_file() else path
