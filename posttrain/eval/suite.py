"""The evaluation suite: typed dataclasses (the schema), loaded by posttrain.config.schema's strict converter.

A suite names the held-out data and the settings of each metric family; every section is optional, so a
suite with only `perplexity:` is valid. Unknown keys fail with the key's path, its line in the file and a
did-you-mean, because a misspelt `strid:` silently falling back to a default would change the numbers without
anyone noticing. Value checks are the sections' `problems()`, as in posttrain.config.schema.

Data is read by posttrain.data.sources.read_source, so a section's `data` is a DataSource: a file (.jsonl, .json,
.csv, .parquet), a folder of them, a hub dataset, or `tiny:TASK`, written as a string or as
`{path: ..., split: ..., subset: ...}`. Relative paths (data files, `include_path`, local model folders) are
resolved against the suite file's folder first, then against the current directory, so a suite can ship next
to its data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from posttrain.config.schema import DataSource
from posttrain.config.strict import Where, build, read_yaml
from posttrain.data.sources import looks_like_path, read_source
from posttrain.errors import PosttrainError
from posttrain.eval.variants import split_model_spec

_DATA_HELP = "is required: a data file or folder, a hub dataset or tiny:TASK"


def _required(section, *keys: str) -> list[tuple[str, str]]:
    return [(key, "is required") for key in keys if not getattr(section, key)]


def _common_problems(section) -> list[tuple[str, str]]:
    """Checks every data-reading section shares: data given, batch_size positive, no unused `fraction`."""
    out = []
    if section.data is None:
        out.append(("data", _DATA_HELP))
    elif section.data.fraction != 1.0:
        out.append(("data.fraction", "is not used by eval; use the section's limit for the first N rows"))
    if section.batch_size < 1:
        out.append(("batch_size", "must be >= 1"))
    if section.limit is not None and section.limit < 1:
        out.append(("limit", f"must be >= 1 (got {section.limit}); leave it out for every row"))
    return out


@dataclass
class PerplexitySuite:
    data: DataSource | None = None  # rows with a "text" field
    context: int = 512  # tokens the model sees per window
    stride: int = 512  # new tokens scored per window; stride == context reproduces lm-eval's rolling perplexity
    batch_size: int = 8
    limit: int | None = None  # first N documents only

    def problems(self) -> list[tuple[str, str]]:
        out = _common_problems(self)
        if self.context < 2 or not 1 <= self.stride <= self.context:
            out.append(("stride", f"needs context >= 2 and 1 <= stride <= context (got {self.context}, {self.stride})"))
        return out


@dataclass
class MultipleChoiceTask:
    name: str = ""
    data: DataSource | None = None  # {"question" | "context": str, "choices": [str, ...], "answer": int}
    target_delimiter: str = " "  # lm-eval's default: placed between context and each choice
    batch_size: int = 16  # questions per forward
    limit: int | None = None

    def problems(self) -> list[tuple[str, str]]:
        return _required(self, "name") + _common_problems(self)


@dataclass
class GenerationTask:
    name: str = ""
    data: DataSource | None = None  # {"prompt" | "messages", "answer"} or chat rows ending in the assistant answer
    max_new_tokens: int = 32
    chat_template: bool = True  # applied only when the tokenizer has one
    batch_size: int = 8
    limit: int | None = None

    def problems(self) -> list[tuple[str, str]]:
        return _required(self, "name") + _common_problems(self)


@dataclass
class PreferenceSuite:
    data: DataSource | None = None  # {"prompt", "chosen", "rejected"}: strings, or message lists (conversational)
    reference: str = ""  # MODEL spec of pi_ref (usually the SFT model DPO started from)
    beta: float = 0.1
    batch_size: int = 8
    limit: int | None = None

    def problems(self) -> list[tuple[str, str]]:
        return _common_problems(self) + _required(self, "reference")


@dataclass
class DriftSuite:
    base: str = ""  # MODEL spec the variants are compared with
    data: DataSource | None = None  # rows with a "text" field
    context: int = 512
    batch_size: int = 8
    limit: int | None = None

    def problems(self) -> list[tuple[str, str]]:
        return _required(self, "base") + _common_problems(self)


@dataclass
class LmEvalSuite:
    tasks: list[str] = field(default_factory=list)
    include_path: str | None = None  # folder of local lm-eval task YAMLs
    num_fewshot: int | None = None
    limit: int | None = None
    batch_size: int = 1

    def problems(self) -> list[tuple[str, str]]:
        return _required(self, "tasks")


@dataclass
class Suite:
    perplexity: PerplexitySuite | None = None
    multiple_choice: list[MultipleChoiceTask] = field(default_factory=list)
    generation: list[GenerationTask] = field(default_factory=list)
    preference: PreferenceSuite | None = None
    drift: DriftSuite | None = None
    lm_eval: LmEvalSuite | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: the checkpoint's
    seed: int = 0  # torch's seed, and the seed of the bootstrap and permutation resampling
    baseline: str | None = None  # the variant the others are tested against (default: the first MODEL)
    source: ClassVar[str] = "<dict>"  # the YAML file it came from (set by load_suite; not a YAML key)

    def problems(self) -> list[tuple[str, str]]:
        names = [t.name for t in self.multiple_choice] + [t.name for t in self.generation]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            return [("multiple_choice", f"and generation task names must be unique: {dupes}")]
        return []

    def sections(self) -> list[tuple[str, object]]:
        """(dotted key, section) for every section present, in the suite's order."""
        out = [(key, getattr(self, key)) for key in ("perplexity", "preference", "drift", "lm_eval")]
        out += [(f"multiple_choice[{i}]", t) for i, t in enumerate(self.multiple_choice)]
        out += [(f"generation[{i}]", t) for i, t in enumerate(self.generation)]
        return [(key, section) for key, section in out if section is not None]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_suite(suite: str | Path | dict) -> Suite:
    """Read, type-check and resolve a suite YAML file (or an already-parsed dict)."""
    if isinstance(suite, dict):
        tree, where, base_dir = suite, Where("<dict>", None), Path.cwd()
    else:
        path = Path(suite)
        if not path.is_file():
            raise PosttrainError(f"suite file {path} does not exist: pass the path of a suite YAML (see docs/EVAL.md)")
        tree, text = read_yaml(path)
        where, base_dir = Where(str(path), text), path.parent
    result = build(Suite, tree, where)
    result.source = where.source
    _resolve_paths(result, base_dir, where)
    return result


def _relative_to_suite(value: str, base_dir: Path) -> Path | None:
    """The existing path `value` names, the suite folder winning over the current directory; else None."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return path if path.exists() else None
    for root in (base_dir, Path.cwd()):
        if (root / path).exists():
            return (root / path).resolve()
    return None


def _resolve_paths(suite: Suite, base_dir: Path, where: Where) -> None:
    for key, section in suite.sections():
        data = getattr(section, "data", None)
        if data is not None and not data.path.startswith("tiny:"):
            found = _relative_to_suite(data.path, base_dir)
            if found is None and looks_like_path(data.path):
                raise where.fail(
                    f"{key}.data", f"'data: {data.path}' not found (looked in {base_dir} and {Path.cwd()})"
                )
            data.path = str(found) if found is not None else data.path  # not found and not path-like: a hub name
        include = getattr(section, "include_path", None)
        if include is not None:
            found = _relative_to_suite(include, base_dir)
            if found is None:
                raise where.fail(f"{key}.include_path", f"'include_path: {include}' not found (looked in {base_dir} "
                                 f"and {Path.cwd()})")
            section.include_path = str(found)
        for model_key in ("reference", "base"):
            spec = getattr(section, model_key, None)
            if spec:
                setattr(section, model_key, _resolve_model_spec(spec, base_dir))


def _resolve_model_spec(spec: str, base_dir: Path) -> str:
    # Only rewrite a spec whose path part exists next to the suite; hub names and CWD paths stay as written.
    name, value = split_model_spec(spec)
    candidate = base_dir / Path(value).expanduser()
    if not Path(value).is_absolute() and candidate.exists():
        value = str(candidate.resolve())
    return f"{name}={value}" if name else value


def read_rows(
    data: DataSource | str | Path, required: tuple[str, ...] = (), limit: int | None = None
) -> tuple[list[dict], list[str]]:
    """(rows, origins) of one data source via posttrain.data.sources.read_source, first `limit` rows; a row without a
    required column fails naming its origin (file:line, or tiny:TASK[split] row N) and the column."""
    source = data if isinstance(data, DataSource) else DataSource(path=str(data))
    rows, origins = read_source(source)
    if limit is not None:
        rows, origins = rows[:limit], origins[:limit]
    if not rows:
        raise PosttrainError(
            f"{source.path}: split {source.split!r} has no rows; point `data` at a source with rows, or name "
            "another split ({path: ..., split: ...})"
        )
    for row, origin in zip(rows, origins):
        missing = [c for c in required if c not in row]
        if missing:
            raise PosttrainError(
                f"{origin}: missing column(s) {missing}; each row needs {list(required)}, this one has {sorted(row)}"
            )
    return rows, origins


def read_jsonl(path: str | Path, required: tuple[str, ...] = (), limit: int | None = None) -> list[dict]:
    """Rows only (scripts/bench_mc_scoring.py uses this); see read_rows."""
    return read_rows(path, required, limit)[0]
