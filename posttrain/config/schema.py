"""Typed run configuration: the dataclasses below ARE the schema.

A YAML file plus dotted command-line overrides (``train.learning_rate=1e-4``) are merged, then converted
strictly into these dataclasses (posttrain.config.strict): an unknown key fails with its dotted path, its line
in the file and a did-you-mean; a wrong type or an impossible value fails naming the key and what is allowed.
Defaults live here and nowhere else. ``posttrain validate`` prints the resolved result.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from posttrain.config.functions import BUILTIN_REWARDS, check_reward_functions
from posttrain.config.strict import apply_overrides, build, read_yaml, where_in  # noqa: F401 (re-exported)

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
    # A ternary (BitNet) base stays packed in 2 bits under LoRA; ternary_merge trains the adapter through the
    # quantizer (LoRA dropout does not apply), so that `posttrain merge` writes an exactly ternary model.
    ternary_merge: bool = False  # ternary base only: effective weight Q(W + BA); the merge stays ternary

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.ternary_merge and (self.method != "lora" or self.use_dora):
            out.append(("ternary_merge", "needs method: lora without use_dora (the adapter is merged into the "
                                         "ternary weight inside the quantizer)"))
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
    compile: bool = False  # torch.compile each decoder layer: fewer kernel launches (see posttrain.engine.compile)
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
class DistillSettings:
    """Distillation into 1.58 bits (recipe: ternary): a frozen full-precision teacher teaches the ternary student.

    BitDistill (2025): the teacher's logits, one layer's attention relations and (optionally) its hidden states.

    loss = (1 - kd_weight) * CE + kd_weight * T^2 * KL(teacher || student at temperature T)
           + attention_weight * relation KL at `layer` + hidden_weight * hidden-state MSE at `layer`,
    each over the supervised tokens only (labels != -100), packed documents kept apart."""

    teacher: str | None = None  # a model folder (or hub name) with the student's vocabulary; null: the starting model
    temperature: float = 5.0  # softens both distributions; the KL is scaled by T^2 so its gradients keep their size
    kd_weight: float = 0.5  # share of the logits KD against cross-entropy (0: CE only, 1: KD only)
    attention_weight: float = 0.0  # Q-Q, K-K, V-V relations per head at `layer` (MiniLM-style); 0: off
    hidden_weight: float = 0.0  # mean squared error of the hidden state after `layer` (same hidden size); 0: off
    layer: int = -1  # decoder layer of both terms above; negative counts from the last (BitDistill: a late layer)

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            out.append(("temperature", "must be > 0 (BitDistill uses about 5)"))
        if not 0 <= self.kd_weight <= 1:
            out.append(("kd_weight", "must be in [0, 1]: the share of the logits KD against cross-entropy"))
        for key in ("attention_weight", "hidden_weight"):
            if not (getattr(self, key) >= 0 and math.isfinite(getattr(self, key))):
                out.append((key, "must be >= 0 (0 turns the term off)"))
        if self.teacher == "":
            out.append(("teacher", "must be a model folder, a hub name, or null (the starting model)"))
        return out


@dataclass
class RewardSpec:
    """One reward: exact_answer, numeric_answer, regex_answer, format, length_penalty, math_verify, or your own.

    posttrain/eval/rewards.py says what each built-in scores. Your own function is called as TRL calls rewards:
    f(prompts, completions, **columns) -> one float per completion (None skips it); the data's columns arrive as
    keyword arguments.
    """

    function: str = ""  # a built-in (exact_answer, format, math_verify ...), FILE.py:FN or MODULE:FN
    weight: float = 1.0  # the rewards are summed with these weights (TRL's reward_weights)
    column: str = "answer"  # the data column holding the reference answer (answer rewards)
    answer_pattern: str | None = None  # regex whose first group is the reference in the column, e.g. '#### (.+)$'
    pattern: str | None = None  # regex_answer: its first group is the completion's answer; format: the shape required
    tolerance: float = 1.0e-6  # numeric_answer: |completion's number - answer| allowed
    target_tokens: int | None = None  # length_penalty: 0 up to here, -1 at max_completion_length; null: half

    def problems(self) -> list[tuple[str, str]]:
        if not self.function:
            return [("function", f"is required: one of {', '.join(BUILTIN_REWARDS)}, or FILE.py:NAME / MODULE:NAME")]
        if self.function in ("regex_answer", "format") and not self.pattern:
            return [("pattern", f"is required for {self.function}: a regular expression")]
        for key in ("pattern", "answer_pattern"):
            try:
                re.compile(getattr(self, key) or "")
            except re.error as err:
                return [(key, f"is not a valid regular expression ({err})")]
        if self.tolerance < 0:
            return [("tolerance", "must be >= 0")]
        if self.target_tokens is not None and self.target_tokens < 0:
            return [("target_tokens", "must be >= 0 (or null: half of rl.max_completion_length)")]
        return []


@dataclass
class RLSettings:
    """RL with verifiable rewards (recipe: grpo), on TRL's GRPOTrainer or RLOOTrainer; names and meanings are TRL's.

    train.batch_size counts completions per device per micro-batch (a multiple of num_generations): each prompt of
    the batch is sampled num_generations times and its completions are scored against each other."""

    algorithm: Literal["grpo", "rloo"] = "grpo"
    num_generations: int = 8  # completions sampled per prompt (the group)
    max_completion_length: int = 256  # tokens sampled per completion at most
    temperature: float = 1.0  # sampling temperature (also scales the log-probs the loss uses)
    top_p: float = 1.0
    beta: float = 0.0  # KL coefficient to the reference (the starting model); 0: no reference pass at all
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"] = "dapo"  # grpo's only
    epsilon: float = 0.2  # clipping of the policy ratio
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec(function="exact_answer")])
    ternary: bool = False  # train through the 1.58-bit quantizer (the ternary section's settings); exports BitNet

    def problems(self) -> list[tuple[str, str]]:
        if self.num_generations < 2:
            return [("num_generations", "must be >= 2 (rewards are compared within each prompt's group)")]
        if self.max_completion_length < 1:
            return [("max_completion_length", "must be >= 1")]
        if not self.temperature > 0:
            return [("temperature", "must be > 0")]
        if not 0 < self.top_p <= 1:
            return [("top_p", "must be in (0, 1]")]
        if self.beta < 0 or self.epsilon <= 0:
            return [("beta" if self.beta < 0 else "epsilon", "must be >= 0" if self.beta < 0 else "must be > 0")]
        if self.algorithm == "rloo" and self.loss_type != "dapo":
            return [("loss_type", "is grpo's setting; rloo has one loss (TRL's RLOOTrainer): remove it")]
        if not self.rewards:
            return [("rewards", "must name at least one reward function")]
        return []


@dataclass
class EvaluateConfig:
    """Evaluation during training, any recipe: a suite scored every every_steps steps and at the last one.

    The model being trained is scored; the figures go to the log, the tracker (train.report_to, as eval/<key>) and
    metrics.json's eval_history. Only a suite's generation, multiple_choice and perplexity sections run here."""

    suite: str = ""  # an eval suite YAML (docs/EVAL.md); relative: next to this config, then the current folder
    every_steps: int = 100  # optimizer steps between evaluations
    limit: int | None = None  # first N items of each task (caps the suite's own limits); null: the suite's

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.every_steps < 1:
            out.append(("every_steps", "must be >= 1 (optimizer steps between evaluations)"))
        if self.limit is not None and self.limit < 1:
            out.append(("limit", "must be >= 1 (the first N items of each task) or null (the suite's own)"))
        if not self.suite:
            out.append(("suite", "is required: an eval suite YAML with generation, multiple_choice or perplexity"))
        return out


@dataclass
class Config:
    """A whole run: which recipe, on which model and data, written where."""

    recipe: Literal["sft", "dpo", "ternary", "grpo"] = "sft"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig | None = None  # absent: full fine-tuning
    train: TrainConfig = field(default_factory=TrainConfig)
    dpo: DPOSettings = field(default_factory=DPOSettings)  # used by recipe: dpo
    ternary: TernarySettings = field(default_factory=TernarySettings)  # used by recipe: ternary (and grpo's rl.ternary)
    rl: RLSettings = field(default_factory=RLSettings)  # used by recipe: grpo
    distill: DistillSettings | None = None  # recipe: ternary; absent: plain cross-entropy QAT
    evaluate: EvaluateConfig | None = None  # absent: no evaluation during training
    output_dir: str = ""
    overwrite: bool = False  # start over in an output_dir that holds a run (finished, or unfinished with checkpoints)

    def problems(self) -> list[tuple[str, str]]:
        if not self.output_dir:
            return [("output_dir", "is required: the folder the run writes")]
        if self.recipe == "ternary" and self.adapter is not None:
            return [("adapter", "must be absent for recipe: ternary (QAT trains the full weights)")]
        if self.distill is not None and self.recipe != "ternary":
            return [("distill", f"is a section of recipe: ternary (a teacher for the 1.58-bit student); remove it "
                                f"for recipe: {self.recipe}")]
        if self.recipe == "ternary" and self.train.compile:
            return [("train.compile", "is not supported for recipe: ternary (each lambda warm-up step would "
                                      "recompile the layers); leave it false")]
        if self.recipe == "grpo":
            return self._rl_problems()
        if self.recipe == "dpo" and self.train.tokens_per_step:
            return [("train.tokens_per_step", "is an SFT packing budget; a DPO step is batch_size x grad_accum pairs")]
        return []


    def _rl_problems(self) -> list[tuple[str, str]]:
        if self.train.batch_size % self.rl.num_generations:
            return [("train.batch_size", f"counts completions for recipe: grpo and must be a multiple of "
                                         f"rl.num_generations ({self.rl.num_generations})")]
        if self.rl.ternary and self.adapter is not None:
            return [("adapter", "must be absent with rl.ternary (QAT trains the full weights)")]
        if self.rl.ternary and self.rl.beta > 0:
            return [("rl.beta", "must be 0 with rl.ternary (the quantizer changes the model the reference would be)")]
        return []


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load, override and validate a run config (a path, or a bundled config's name such as tiny/sft).
    The public entry point."""
    from posttrain.config.bundled import resolve_config_path

    path = resolve_config_path(path)
    tree, text = read_yaml(path)
    apply_overrides(tree, list(overrides or []), str(path))
    where = where_in(path, text, overrides)
    cfg = build(Config, tree, where)
    if cfg.evaluate is not None:
        cfg.evaluate.suite = _suite_path(cfg.evaluate.suite, Path(path).parent, where)
    if cfg.recipe == "grpo":
        check_reward_functions(cfg.rl.rewards, Path(path).parent, where)
    return cfg


def _suite_path(value: str, config_dir: Path, where) -> str:
    """evaluate.suite as an absolute path, so that the saved posttrain.yaml names it from anywhere. A relative one is
    looked for next to the config first (a bundled config names its suite so), then in the current folder; one
    given on the command line is looked for in the current folder first, where the command runs."""
    path = Path(value).expanduser()
    roots = [config_dir, Path.cwd()]
    if where.from_override("evaluate.suite"):
        roots.reverse()
    candidates = [path] if path.is_absolute() else [root / path for root in roots]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        looked = " and ".join(str(c.parent) for c in candidates)
        raise where.fail("evaluate.suite", f"evaluate.suite: {value} not found (looked in {looked}); pass the path "
                                           "of an eval suite YAML (see docs/EVAL.md)")
    return str(found.resolve())


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
