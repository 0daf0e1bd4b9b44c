"""Reward functions named in a config (`rl.rewards[i].function`), found and checked when the config loads.

A built-in is a name (posttrain.eval.rewards implements them); your own is `path/to/file.py:function` (a path
relative to the config's folder, then the current folder) or `package.module:function` (importable). Each is
imported and its signature bound to (prompts=..., completions=..., column=...) the way TRL calls it, so a missing
file, a missing function or a signature without **kwargs fails here, in one line naming the key, before any
data or model is loaded. A found file is written back as an absolute path, so the saved posttrain.yaml names
it from anywhere.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

from posttrain.errors import PosttrainError

BUILTIN_REWARDS = ("exact_answer", "numeric_answer", "regex_answer", "format", "length_penalty", "math_verify")

# The keyword arguments TRL passes to every reward besides the prompts and completions (plus the data's columns).
TRL_REWARD_KWARGS = ("completion_ids", "trainer_state", "log_extra", "log_metric")


def check_reward_functions(rewards, config_dir: Path, where) -> None:
    """Resolve every rl.rewards[i].function; raise one clear line (file:line: key: problem) on the first bad one."""
    for index, spec in enumerate(rewards):
        key = f"rl.rewards[{index}].function"
        try:
            if spec.function == "math_verify" and importlib.util.find_spec("math_verify") is None:
                raise PosttrainError("math_verify needs the math-verify package: pip install 'posttrain[rl]'")
            if spec.function in BUILTIN_REWARDS:
                continue
            spec.function = absolute_reference(spec.function, config_dir, where.from_override(key))
            load_reward_function(spec.function)
        except PosttrainError as err:
            raise where.fail(key, f"{key}: {err}") from None


def _split(reference: str) -> tuple[str, str]:
    target, sep, name = reference.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise PosttrainError(f"{reference!r} is neither a built-in ({', '.join(BUILTIN_REWARDS)}) nor "
                             "FILE.py:FUNCTION or MODULE:FUNCTION")
    return target, name


def absolute_reference(reference: str, config_dir: Path, from_command_line: bool) -> str:
    """FILE.py:NAME with FILE made absolute (looked for next to the config, then in the current folder; the other
    way round for a value given on the command line); MODULE:NAME as it is."""
    target, name = _split(reference)
    if not target.endswith(".py"):
        return reference
    path = Path(target).expanduser()
    roots = [Path.cwd(), config_dir] if from_command_line else [config_dir, Path.cwd()]
    candidates = [path] if path.is_absolute() else [root / path for root in roots]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        looked = " and ".join(str(c.parent) for c in candidates)
        raise PosttrainError(f"file {target} not found (looked in {looked})")
    return f"{found.resolve()}:{name}"


def load_reward_function(reference: str):
    """The callable that FILE.py:NAME or MODULE:NAME names, checked to take TRL's reward call."""
    target, name = _split(reference)
    module = _import_file(Path(target)) if target.endswith(".py") else _import_module(target)
    function = getattr(module, name, None)
    if function is None:
        defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))[:20]
        raise PosttrainError(f"{target} defines no {name!r} (its functions: {', '.join(defined) or 'none'})")
    check_signature(function, name)
    return function


def check_signature(function, name: str) -> None:
    if not callable(function):
        raise PosttrainError(f"{name} is a {type(function).__name__}, not a function")
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # a builtin without a signature: its call decides
        return
    call = {"prompts": [], "completions": [], "answer": [], **{key: None for key in TRL_REWARD_KWARGS}}
    try:
        signature.bind(**call)
    except TypeError as err:
        raise PosttrainError(f"{name}{signature} cannot be called as {name}(prompts, completions, **kwargs) "
                             f"({err}); TRL passes the data's columns as keyword arguments, so end the signature "
                             "with **kwargs") from None


def _import_file(path: Path):
    module_name = f"posttrain_reward_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # before it runs: dataclasses, pickling and tracebacks look it up there
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - the user's file: any failure is reported in one line
        del sys.modules[module_name]
        raise PosttrainError(f"importing {path} failed: {type(err).__name__}: {err}") from None
    return module


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise PosttrainError(f"no module named {err.name!r} (for MODULE:FUNCTION, the module must be importable; "
                             "for a file, give its path ending in .py)") from None
    except Exception as err:  # noqa: BLE001 - the user's module
        raise PosttrainError(f"importing {name} failed: {type(err).__name__}: {err}") from None
