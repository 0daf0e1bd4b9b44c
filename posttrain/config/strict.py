"""Strict conversion of plain data (YAML) into dataclasses, with the file and line of every problem.

Generic: the schemas are the dataclasses in posttrain.config.schema (run configs), posttrain.pipeline and
posttrain.eval.suite. `build` converts a mapping into a dataclass strictly (unknown keys with a did-you-mean,
wrong types, impossible values via the dataclass's `problems()`); `Where` maps dotted key paths to 'file:line'
from YAML's node marks so each error names its line; `read_yaml` and `apply_overrides` read a file and apply
dotted command-line overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from posttrain.errors import PosttrainError


class Where:
    """Maps dotted key paths to 'file:line' using YAML's node marks, for error messages. Keys set by a
    command-line override are named as such instead."""

    def __init__(self, source: str, text: str | None, overridden: set[str] | None = None):
        self.source, self.lines, self.overridden, self.duplicates = source, {}, overridden or set(), []
        if text is not None:
            try:
                self._walk(yaml.compose(text, Loader=yaml.SafeLoader), "", set())
            except (yaml.YAMLError, RecursionError, ValueError):
                pass

    def _walk(self, node, prefix, seen: set):
        if id(node) in seen:  # an alias: its anchor was walked already (keeps a billion-laughs file cheap)
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys = set()
            for key_node, value_node in node.value:
                path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                self.lines[path] = key_node.start_mark.line + 1
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else id(key_node)
                if key in keys and key != "<<":
                    self.duplicates.append((path, key_node.start_mark.line + 1))
                keys.add(key)
                self._walk(value_node, path, seen)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.lines[f"{prefix}[{i}]"] = item.start_mark.line + 1
                self._walk(item, f"{prefix}[{i}]", seen)

    def from_override(self, path: str) -> bool:
        """Whether the value at `path` came from a command-line override: the overridden key itself, something
        inside its value, or a section that only an override names (`trian.max_steps=3` creates `trian`, which
        the file never had, so the misspelling is the command line's)."""
        for key in self.overridden:
            if path == key or path.startswith((key + ".", key + "[")):
                return True
            if key.startswith(path + ".") and path not in self.lines:
                return True
        return False

    def fail(self, path: str, message: str) -> PosttrainError:
        if self.from_override(path):
            return PosttrainError(f"command-line override: {message}")
        line = self.lines.get(path)
        while line is None and "." in path:
            path_up = path.rsplit(".", 1)[0]
            line, path = self.lines.get(path_up), path_up
        where = f"{self.source}:{line}" if line else self.source
        return PosttrainError(f"{where}: {message}")


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel = 80, 80, 3


def _show(value) -> str:
    """A value for an error message: short, one line, and cheap even for a huge or self-referencing one."""
    if value is None:
        return "null (an empty value)"
    try:
        return " ".join(_REPR.repr(value).split())
    except ValueError:  # an int too long to print
        return "a number too large to print"


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, str(tp)
    )


def _convert(value: Any, tp, path: str, where: Where):
    origin = typing.get_origin(tp)
    wrong = lambda: where.fail(path, f"{path} must be {_type_name(tp)}, got {_show(value)}")  # noqa: E731
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        if len(options) == 1:  # X | None: X's own, more precise message
            return _convert(value, options[0], path, where)
        for arg in options:  # e.g. int | "auto": the first that takes the value
            try:
                return _convert(value, arg, path, where)
            except PosttrainError:
                pass
        raise wrong()
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        typed = value[:100] if isinstance(value, str) else _show(value)
        close = difflib.get_close_matches(typed, [str(a) for a in typing.get_args(tp)], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise where.fail(path, f"{path} must be one of {_type_name(tp)}, got {_show(value)}{hint}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        items = value if isinstance(value, list) else [value]  # a single item is a one-item list
        return [_convert(v, item_tp, f"{path}[{i}]", where) for i, v in enumerate(items)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise wrong()
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str):  # shorthand: a string fills the first field (e.g. a data source's path)
            value = {dataclasses.fields(tp)[0].name: value}
        if not isinstance(value, dict):
            raise wrong()
        return build(tp, value, where, path)
    return _convert_scalar(value, tp, path, where, wrong)


def _convert_scalar(value: Any, tp, path: str, where: Where, wrong):
    """bool, int, float and str: strict (no bool where a number goes), with YAML 1.1's strings for numbers."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str) and re.fullmatch(r"[+-]?[0-9]{1,30}", value.strip()):
            number = int(value)
        else:
            raise wrong()
        if not -(2**63) <= number < 2**63:
            raise where.fail(path, f"{path} is too large: {_show(value)} does not fit in 64 bits")
        return number
    if tp is float:
        try:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                number = float(value)
            elif isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
                number = float(value)
            else:
                raise wrong()
        except ValueError:
            raise wrong() from None
        except OverflowError:  # an integer beyond float range
            number = math.inf
        if not math.isfinite(number):
            raise where.fail(path, f"{path} must be a finite number, got {_show(value)}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return str(value)
            except ValueError:  # an int too long to print
                raise wrong() from None
        raise wrong()
    raise TypeError(f"unsupported config type {tp} at {path}")


def build(cls, data: dict, where: Where | None = None, prefix: str = ""):
    """Convert a mapping into dataclass `cls`, strictly, then run its `problems()` checks."""
    where = where or Where("config", None)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {'.'.join(filter(None, [prefix, close[0]]))!r}?" if close else f"known: {names}"
            raise where.fail(path, f"unknown key {path!r}: {hint}")
        kwargs[key] = _convert(value, hints[key], path, where)
    obj = cls(**kwargs)
    for key, message in obj.problems() if hasattr(obj, "problems") else []:
        path = f"{prefix}.{key}" if prefix else key
        raise where.fail(path, f"{path} {message}")
    for name in names:  # a section left out is its defaults, which must pass too (e.g. model: is required)
        default = getattr(obj, name)
        if name not in kwargs and dataclasses.is_dataclass(default) and hasattr(default, "problems"):
            for key, message in default.problems():
                path = ".".join(filter(None, [prefix, name, key]))
                raise where.fail(path, f"{path} {message}")
    return obj


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise PosttrainError(f"override {dotted!r}: {key!r} is not a section in {source}")
        node = child
    node[keys[-1]] = value


def apply_overrides(tree: dict, overrides: list[str], source: str) -> dict:
    """Apply ``key.sub=value`` overrides; values are parsed as YAML (so lists and null work)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise PosttrainError(f"override {item!r} must look like key.sub=value, e.g. train.learning_rate=1e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except (yaml.YAMLError, ValueError, RecursionError) as err:
            problem = _yaml_problem(err)
            raise PosttrainError(f"override {_show(item)}: the value is not valid YAML ({problem})") from None
        _set_dotted(tree, key.strip(), value, source)
    return tree


def read_yaml(path: str | Path) -> tuple[dict, str]:
    """Read a YAML mapping with yaml.safe_load; return it and the raw text (for line numbers)."""
    path = Path(path)
    if path.is_dir():
        raise PosttrainError(f"{path}: is a folder; give the config's YAML file")
    if not path.is_file():
        raise PosttrainError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
        tree = yaml.safe_load(text)
    except OSError as err:  # permission denied, I/O error ...
        raise PosttrainError(f"{path}: cannot read the config ({err.strerror or err}); check its permissions") from None
    except UnicodeDecodeError:
        raise PosttrainError(f"{path}: not UTF-8 text; save the config as UTF-8 YAML") from None
    except (yaml.YAMLError, ValueError, RecursionError) as err:
        mark = getattr(err, "problem_mark", None)
        if mark is None and isinstance(getattr(err, "position", None), int):  # yaml.ReaderError: a bad character
            mark = types.SimpleNamespace(line=text[: err.position].count("\n"))
        line = f":{mark.line + 1}" if mark else ""
        raise PosttrainError(f"{path}{line}: invalid YAML: {_yaml_problem(err)}") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise PosttrainError(f"{path}: the config must be a YAML mapping (key: value), got {type(tree).__name__}")
    return tree, text


def _yaml_problem(err: Exception) -> str:
    """One line saying what is wrong with some YAML, with a hint for the usual mistakes."""
    if isinstance(err, RecursionError):
        return "nested too deeply"
    if isinstance(err, yaml.reader.ReaderError):
        char = f"#x{err.character:04x}" if isinstance(err.character, int) else repr(err.character)
        return f"unacceptable character {char} ({err.reason}); is it a text file?"
    if isinstance(err, yaml.YAMLError):
        problem = getattr(err, "problem", None) or getattr(err, "context", None) or str(err)
    else:  # e.g. an integer with more than 4300 digits
        problem = str(err).split(":")[0]
    problem = " ".join(str(problem).split())
    if "'\\t'" in problem:
        problem += "; indent with spaces, not tabs"
    return problem


def where_in(path, text: str, overrides: list[str] | None) -> Where:
    """Error locations for a config file plus its overrides; a key written twice in the file is an error
    (YAML would silently keep the last one)."""
    where = Where(str(path), text, {o.partition("=")[0].strip() for o in overrides or []})
    if where.duplicates:
        key, line = where.duplicates[-1]
        raise PosttrainError(f"{path}:{line}: key {key!r} is written twice; merge the two into one")
    return where
