"""The config reference (docs/CONFIG.md), generated from the dataclasses in posttrain/config/schema.py.

The dataclasses are the schema: this walks them and prints every key with its default, its allowed values
and the comment written next to the field in the source, so the reference cannot drift from the code.
Regenerate with `python -m posttrain.config.reference > docs/CONFIG.md` (a test checks it is current).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing

import yaml

from posttrain.config import schema

_FIELD_COMMENT = re.compile(r"^\s+(\w+):.*?#\s*(.+)$")


def _comments(cls) -> dict[str, str]:
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        match = _FIELD_COMMENT.match(line)
        if match:
            comments[match.group(1)] = match.group(2).strip()
    return comments


def _allowed(tp) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    literal = [a for a in args if typing.get_origin(a) is typing.Literal]
    if not literal:
        return ""
    others = {bool: "true | false", int: "an integer"}
    extra = [others.get(a, getattr(a, "__name__", str(a))) for a in args if a not in literal]
    nullable = ["null"] if type(None) in typing.get_args(tp) else []
    return " | ".join([_allowed(literal[0]), *extra, *nullable])


def _lines(cls, indent: str) -> list[str]:
    hints, comments, out = typing.get_type_hints(cls), _comments(cls), []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        nested = [a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)]
        note = "; ".join(x for x in (_allowed(tp), comments.get(f.name, "")) if x)
        if nested and typing.get_origin(tp) is not list:
            doc = (inspect.getdoc(nested[0]) or "").splitlines()[0]
            optional = " (optional section; absent = null)" if type(None) in typing.get_args(tp) else ""
            out.append(f"{indent}{f.name}:  # {doc}{optional}")
            out += _lines(nested[0], indent + "  ")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        items = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)] if typing.get_origin(tp) is list else []
        if items:  # a list of sections (rl.rewards): its default, then each item's keys
            default = [{k: v for k, v in dataclasses.asdict(d).items() if v != getattr(items[0](), k)}
                       for d in default]
        value = yaml.safe_dump(default, default_flow_style=True, width=1000).strip().removesuffix("\n...")
        out.append(f"{indent}{f.name}: {value}" + (f"  # {note}" if note else ""))
        if items and items[0] is not schema.DataSource:  # data sources have their own block below
            doc = (inspect.getdoc(items[0]) or "").splitlines()[0]
            out.append(f"{indent}# each item of {f.name}: {doc}")
            out += [f"{indent}#   {line.strip()}" for line in _lines(items[0], "")]
    return out


def reference() -> str:
    body = "\n".join(_lines(schema.Config, ""))
    sources = "\n".join(_lines(schema.DataSource, ""))
    return f"""# Config reference

Generated from `posttrain/config/schema.py` by `python -m posttrain.config.reference` — do not edit by hand.
Every key with its default; `#` gives the allowed values and the field's comment. Unknown keys are errors.

```yaml
{body}
```

A data source (`data.train`, `data.eval`) is a string (its path) or a mapping, alone or in a list:

```yaml
{sources}
```
"""


if __name__ == "__main__":
    print(reference(), end="")
