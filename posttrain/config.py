"""Typed run configuration: the dataclasses below ARE the schema.

A YAML file plus dotted command-line overrides (``train.learning_rate=1e-4``) are merged, then converted
strictly into these dataclasses: an unknown key fails with its dotted path, its line in the file and a
did-you-mean; a wrong type or an impossible value fails naming the key and what is allowed. Defaults live
here and nowhere else. ``posttrain validate`` prints the resolved result.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from posttrain.errors import PosttrainError

DataFormat = Literal["auto", "messages", "prompt_completion", "alpaca", "sharegpt", "preference", "text"]


@dataclass
class ModelConfig:
    """The pretrained model to start from."""

    name_or_path: str = ""  # hub name, local folder, or `tiny:llama` / `tiny:qwen2` (offline tiny model)
    revision: str | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bf16 on a bf16 GPU, else fp32
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] | None = None
    trust_remote_code: bool = False  # runs code from the model repo: opt in only for repos you trust
    allow_pickle: bool = False  # load .bin/.pt weights (pickle can execute code); safetensors only otherwise
    chat_template: str | None = None  # a Jinja file or inline template replacing the tokenizer's

    def problems(self) -> list[tuple[str, str]]:
        if not self.name_or_path:
            return [("name_or_path", "is required: a hub name, a local model folder or tiny:llama")]
        return []


@dataclass
class DataSource:
    """One dataset: a local file (.jsonl/.json/.csv/.parquet), a folder of them, a hub name, or `tiny:TASK`.

    Written as a plain string it is shorthand for ``{path: STRING}``.
    """

    path: str = ""
    split: str = "train"
    subset: str | None = None  # hub dataset configuration name
    fraction: float = 1.0  # share of this source's rows to use when mixing (>1 repeats rows)

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if not self.path:
            out.append(("path", "is required"))
        if not (self.fraction > 0 and math.isfinite(self.fraction)):
            out.append(("fraction", "must be a positive number"))
        return out


@dataclass
class DataConfig:
    """Where the rows come from and how to read them."""

    train: list[DataSource] = field(default_factory=list)
    eval: list[DataSource] = field(default_factory=list)  # empty: hold out eval_fraction of train
    format: DataFormat = "auto"
    columns: dict[str, str] = field(default_factory=dict)  # standard name -> your column, e.g. {prompt: question}
    eval_fraction: float = 0.05
    max_eval_rows: int = 500
    system_prompt: str | None = None  # prepended as a system turn to chat rows that have none
    train_on: Literal["assistant", "all"] = "assistant"  # chat rows: which tokens carry the loss

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if not self.train:
            out.append(("train", "is required: a file, folder, hub dataset name or a list of sources"))
        if not 0 <= self.eval_fraction < 1:
            out.append(("eval_fraction", "must be in [0, 1)"))
        if self.max_eval_rows < 0:
            out.append(("max_eval_rows", "must be >= 0"))
        return out


@dataclass
class AdapterConfig:
    """LoRA / QLoRA (peft). QLoRA loads the base in 4-bit with bitsandbytes and trains LoRA on top."""

    method: Literal["lora", "qlora"] = "lora"
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    use_rslora: bool = False
    use_dora: bool = False
    quant_type: Literal["nf4", "fp4"] = "nf4"  # qlora only
    double_quant: bool = True  # qlora only

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.r < 1:
            out.append(("r", "must be >= 1"))
        if self.alpha < 1:
            out.append(("alpha", "must be >= 1"))
        if not 0 <= self.dropout < 1:
            out.append(("dropout", "must be in [0, 1)"))
        if not self.target_modules:
            out.append(("target_modules", "must name at least one module (or all-linear)"))
        return out


@dataclass
class TrainConfig:
    """Optimisation. Steps count optimizer updates; batch_size is per device."""

    max_steps: int = -1  # -1: run num_epochs
    num_epochs: float = 1.0
    learning_rate: float = 2e-5
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 8  # examples (dpo: pairs) per device per step; packed, the step holds their tokens
    grad_accum: int | Literal["auto"] = "auto"  # auto: 1, more only when the micro-batch would not fit in memory
    tokens_per_step: int = 0  # packing: tokens per optimizer step (all devices); 0: batch_size x grad_accum examples
    max_length: int = 1024  # tokens; longer rows are truncated (keep start) and counted
    packing: bool = True  # rows of max_length without padding; documents never attend to each other
    gradient_checkpointing: bool | Literal["auto"] = "auto"  # auto: on only when the step would not fit in memory
    optim: Literal["auto", "adamw_torch", "adamw_torch_fused"] = "auto"  # auto: fused AdamW (CUDA and CPU)
    liger_kernels: bool | Literal["auto"] = "auto"  # auto: on when liger-kernel is installed and a CUDA GPU is used
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on a bf16 GPU, fp32 on CPU
    seed: int = 42
    logging_steps: int = 10
    eval_steps: int = 0  # 0: evaluate once at the end
    save_steps: int = 0  # 0: no intermediate checkpoints (then --resume and SIGTERM have nothing to resume from)
    save_total_limit: int = 2  # checkpoints kept (oldest deleted; the newest is always kept); 0: keep all
    report_to: Literal["none", "tensorboard", "trackio", "wandb"] = "none"

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.max_steps == 0 or self.max_steps < -1:
            out.append(("max_steps", "must be -1 (use num_epochs) or >= 1"))
        if not self.num_epochs > 0:
            out.append(("num_epochs", "must be > 0"))
        if not (0 < self.learning_rate < 1):
            out.append(("learning_rate", "must be in (0, 1), e.g. 2e-5 full, 2e-4 LoRA"))
        for key in ("batch_size", "grad_accum", "logging_steps"):
            if getattr(self, key) != "auto" and getattr(self, key) < 1:
                out.append((key, "must be >= 1" + (" or auto" if key == "grad_accum" else "")))
        if self.tokens_per_step < 0 or (self.tokens_per_step and not self.packing):
            out.append(("tokens_per_step", "must be >= 0, and is a packing budget: set train.packing: true or use 0"))
        if self.max_length < 8:
            out.append(("max_length", "must be >= 8 tokens"))
        if self.max_grad_norm < 0 or self.weight_decay < 0:
            out.append(("max_grad_norm" if self.max_grad_norm < 0 else "weight_decay", "must be >= 0 (0 disables it)"))
        if not 0 <= self.warmup_ratio < 1:
            out.append(("warmup_ratio", "must be in [0, 1)"))
        for key in ("eval_steps", "save_steps", "save_total_limit"):
            if getattr(self, key) < 0:
                out.append((key, "must be >= 0"))
        if not 0 <= self.seed < 2**32:
            out.append(("seed", "must be in [0, 2**32 - 1] (numpy's seed range)"))
        return out


DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


@dataclass
class DPOSettings:
    """Preference optimization (recipe: dpo), on TRL's DPOTrainer; loss names and meanings are TRL's."""

    beta: float = 0.1
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])  # several combine with loss_weights
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0  # conservative DPO / robust: the assumed label-flip rate
    ref_model: str | None = None  # null: the starting model is the reference
    precompute_ref: bool = True  # reference log-probs once, cached on disk (no reference copy in memory)

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if not self.beta > 0:
            out.append(("beta", "must be > 0"))
        unknown = [t for t in self.loss_type if t not in DPO_LOSSES]
        if unknown or not self.loss_type:
            out.append(("loss_type", f"must be a list of {', '.join(DPO_LOSSES)}; unknown: {unknown}"))
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            out.append(("loss_weights", f"needs one weight per loss_type ({len(self.loss_type)})"))
        if not 0 <= self.label_smoothing < 0.5:
            out.append(("label_smoothing", "must be in [0, 0.5)"))
        return out


@dataclass
class TernarySettings:
    """1.58-bit ternary QAT (recipe: ternary): BitNet b1.58 weights and 8-bit activations, straight-through.

    The quantized forward blends x + lambda * (q(x) - x).detach(), lambda rising from 0 to 1 over
    lambda_warmup_steps (schedule linear or sigmoid; none: quantized from the first step).
    """

    lambda_schedule: Literal["linear", "sigmoid", "none"] = "linear"
    lambda_warmup_steps: int = 100
    granularity: Literal["tensor", "channel", "group"] = "tensor"  # only tensor exports to transformers' format
    group_size: int | None = None  # granularity: group
    skip: list[str] = field(default_factory=list)  # module-name patterns kept dense (embeddings, lm_head always)
    use_rms_norm: bool = False  # an RMSNorm before activation quantization (transformers' use_rms_norm)
    fake_quant_export: bool = False  # also write output_dir/fake_quant: dense weights = ternary x scale

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.lambda_warmup_steps < 0:
            out.append(("lambda_warmup_steps", "must be >= 0"))
        if self.granularity != "tensor":
            out.append(("granularity", "must be tensor for recipe ternary: transformers' BitNet format stores one "
                                       "scale per tensor (channel/group scales: posttrain.ternary.convert in Python)"))
        if self.granularity == "group" and not (self.group_size and self.group_size > 0):
            out.append(("group_size", "must be a positive integer when granularity is group"))
        elif self.group_size is not None and self.group_size < 1:
            out.append(("group_size", "must be a positive integer (or null)"))
        return out


@dataclass
class Config:
    """A whole run: which recipe, on which model and data, written where."""

    recipe: Literal["sft", "dpo", "ternary"] = "sft"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig | None = None  # absent: full fine-tuning
    train: TrainConfig = field(default_factory=TrainConfig)
    dpo: DPOSettings = field(default_factory=DPOSettings)  # used by recipe: dpo
    ternary: TernarySettings = field(default_factory=TernarySettings)  # used by recipe: ternary
    output_dir: str = ""
    overwrite: bool = False  # replace an output_dir that holds a finished run

    def problems(self) -> list[tuple[str, str]]:
        if not self.output_dir:
            return [("output_dir", "is required: the folder the run writes")]
        if self.recipe == "ternary" and self.adapter is not None:
            return [("adapter", "must be absent for recipe: ternary (QAT trains the full weights)")]
        if self.recipe == "dpo" and self.train.tokens_per_step:
            return [("train.tokens_per_step", "is an SFT packing budget; a DPO step is batch_size x grad_accum pairs")]
        return []


# ----------------------------------------------------------------------------------------------------------
# Strict conversion: plain data (from YAML) -> dataclasses.


class _Where:
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

    def fail(self, path: str, message: str) -> PosttrainError:
        if any(path == key or path.startswith(key + ".") or path.startswith(key + "[") for key in self.overridden):
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


def _convert(value: Any, tp, path: str, where: _Where):
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


def build(cls, data: dict, where: _Where | None = None, prefix: str = ""):
    """Convert a mapping into dataclass `cls`, strictly, then run its `problems()` checks."""
    where = where or _Where("config", None)
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


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load, override and validate a run config. The public entry point."""
    tree, text = read_yaml(path)
    apply_overrides(tree, list(overrides or []), str(path))
    return build(Config, tree, where_in(path, text, overrides))


def where_in(path, text: str, overrides: list[str] | None) -> _Where:
    """Error locations for a config file plus its overrides; a key written twice in the file is an error
    (YAML would silently keep the last one)."""
    where = _Where(str(path), text, {o.partition("=")[0].strip() for o in overrides or []})
    if where.duplicates:
        key, line = where.duplicates[-1]
        raise PosttrainError(f"{path}:{line}: key {key!r} is written twice; merge the two into one")
    return where


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
