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
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 1024  # tokens; longer rows are truncated (keep start) and counted
    packing: bool = False
    gradient_checkpointing: bool = False  # trades ~30% speed for activation memory
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on a bf16 GPU, fp32 on CPU
    seed: int = 42
    logging_steps: int = 10
    eval_steps: int = 0  # 0: evaluate once at the end
    save_steps: int = 0  # 0: no intermediate checkpoints
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
            if getattr(self, key) < 1:
                out.append((key, "must be >= 1"))
        if self.max_length < 8:
            out.append(("max_length", "must be >= 8 tokens"))
        if self.max_grad_norm < 0 or self.weight_decay < 0:
            out.append(("max_grad_norm" if self.max_grad_norm < 0 else "weight_decay", "must be >= 0 (0 disables it)"))
        if not 0 <= self.warmup_ratio < 1:
            out.append(("warmup_ratio", "must be in [0, 1)"))
        for key in ("eval_steps", "save_steps"):
            if getattr(self, key) < 0:
                out.append((key, "must be >= 0"))
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
                self._walk(yaml.compose(text, Loader=yaml.SafeLoader), "")
            except yaml.YAMLError:
                pass

    def _walk(self, node, prefix):
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                self.lines[path] = key_node.start_mark.line + 1
                self._walk(value_node, path)
            if list(k.value for k, _ in node.value).count(key_node.value) > 1:
                self.duplicates.append((path, key_node.start_mark.line + 1))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.lines[f"{prefix}[{i}]"] = item.start_mark.line + 1
                self._walk(item, f"{prefix}[{i}]")

    def fail(self, path: str, message: str) -> PosttrainError:
        if any(path == key or path.startswith(key + ".") or path.startswith(key + "[") for key in self.overridden):
            return PosttrainError(f"command-line override: {message}")
        line = self.lines.get(path)
        while line is None and "." in path:
            path_up = path.rsplit(".", 1)[0]
            line, path = self.lines.get(path_up), path_up
        where = f"{self.source}:{line}" if line else self.source
        return PosttrainError(f"{where}: {message}")


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
    wrong = lambda: where.fail(path, f"{path} must be {_type_name(tp)}, got {value!r}")  # noqa: E731
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                return _convert(value, arg, path, where)
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise where.fail(path, f"{path} must be one of {_type_name(tp)}, got {value!r}{hint}")
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
            return value
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        raise wrong()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                number = float(value)
            except ValueError:
                raise wrong() from None
        else:
            raise wrong()
        if not math.isfinite(number):
            raise where.fail(path, f"{path} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
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
        except yaml.YAMLError as err:
            raise PosttrainError(f"override {item!r}: the value is not valid YAML ({err.problem})") from None
        _set_dotted(tree, key.strip(), value, source)
    return tree


def read_yaml(path: str | Path) -> tuple[dict, str]:
    """Read a YAML mapping with yaml.safe_load; return it and the raw text (for line numbers)."""
    path = Path(path)
    if not path.is_file():
        raise PosttrainError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
        tree = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise PosttrainError(f"{path}: not UTF-8 text; save the config as UTF-8 YAML") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise PosttrainError(f"{path}{line}: invalid YAML: {getattr(err, 'problem', err)}") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise PosttrainError(f"{path}: the config must be a YAML mapping (key: value), got {type(tree).__name__}")
    return tree, text


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
