"""Automatic speed and memory settings, decided once at start; each is printed with its reason and its key.

- attention [model.attn_implementation]: flash_attention_2 when flash-attn is installed (CUDA, bf16/fp16),
  else sdpa; packed documents are isolated on both.
- micro-batch and accumulation [train.grad_accum, train.tokens_per_step]: the step's token budget
  (train.tokens_per_step, else batch_size x grad_accum examples' worth of tokens) as packed rows in one
  micro-batch, halved into more accumulation steps only while a micro-batch would not fit in memory.
- activation checkpointing [train.gradient_checkpointing]: on only when the step would not fit otherwise
  (at one row per micro-batch, or at the grad_accum that was set).
- optimizer [train.optim]: fused AdamW (torch >= 2.8, on CUDA and on CPU, where it is ~20x faster than the
  for-loop AdamW on 2 cores).
- Liger kernels [train.liger_kernels]: on when liger-kernel is installed (`pip install 'posttrain[speed]'`)
  and a CUDA GPU trains.
- torch.compile per decoder layer [train.compile]: opt-in (posttrain.engine.compile): two H200 runs disagreed.
- DPO's reference pass [dpo.precompute_ref]: REFERENCE_BATCH_FACTOR x the training micro-batch per forward: it
  keeps no gradients or activations, and each forward has fixed launch, sync and host costs (a one-off timing
  on an H200, Qwen2.5-0.5B shape, 400 pairs: 8 pairs per forward 4.0 s, 32: 2.7 s, 64: 2.3 s); halved while one
  layer's activations would not fit.

The memory estimate is deliberately simple, so that each decision can be explained in one line: weights (unless
already resident) + gradients and two AdamW moments of the trainable parameters + activations, which are about
(10 h + 5 I) elements per token per layer (h hidden size, I MLP size) without checkpointing and 2 h per layer plus
one whole layer with it. TRL's fused LM head never materializes the logits. For the Qwen2.5-0.5B shape in bf16
and 8 x 1024 tokens it gives 15.9 GiB without checkpointing and 4.8 GiB with it; TRL's peaks on batches padded
to at most that were 15.4 and 4.4 GiB (H200, docs/BENCHMARKS.md). A step is said to fit when the estimate is under 85%
of what is free: CUDA free memory, or MemAvailable on CPU (with several processes: the device's total memory,
so that every rank takes the same decision). Sharding (FSDP, ZeRO) is ignored, which only errs towards
checkpointing.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import asdict, dataclass, field

from posttrain import log
from posttrain.data.packing import PaddingFreeCollator, pack_examples
from posttrain.engine.compile import compile_decoder_layers
from posttrain.errors import PosttrainError
from posttrain.integrations.transformers_models import flat_rows_needed

FIT_FRACTION = 0.85
GIB = 2**30
REFERENCE_BATCH_FACTOR = 8


FIT_WARNING = "estimated memory: "  # the plan's one line that is a warning


@dataclass
class SpeedPlan:
    """The resolved settings (batch_size: packed rows, examples or pairs per device per micro-batch)."""

    batch_size: int
    grad_accum: int
    gradient_checkpointing: bool
    optim: str
    liger_kernels: bool
    lines: list[str] = field(default_factory=list)
    compile_layers: bool = False  # torch.compile per decoder layer (posttrain.engine.compile)
    reference_batch_size: int | None = None  # DPO with precompute_ref: pairs per forward of the reference pass

    def trainer_kwargs(self) -> dict:
        return {"per_device_train_batch_size": self.batch_size, "gradient_accumulation_steps": self.grad_accum,
                "optim": self.optim, "use_liger_kernel": self.liger_kernels}

    def report(self) -> None:
        for line in self.lines:
            if line.startswith(FIT_WARNING):
                log.warning(line)  # shown with --quiet too: the run may fail on memory
            else:
                log.info(f"speed: {line}")

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "lines" and v is not None}


def fixed_plan(train) -> SpeedPlan:
    """The config's values with every auto resolved without measuring anything (no memory checks)."""
    return SpeedPlan(train.batch_size, 1 if train.grad_accum == "auto" else train.grad_accum,
                     train.gradient_checkpointing is True, _optimizer(train.optim)[0], False)


# ----------------------------------------------------------------------------------------------------------
# Memory.


def precision_flags(precision: str) -> dict:
    """auto: bf16 where the GPU has it, fp32 elsewhere (CPU bf16 autocast is slower than fp32 here)."""
    import torch

    cuda = torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not cuda:
        raise PosttrainError("train.precision: fp16 needs a CUDA GPU; use fp32 or bf16 on CPU")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16", "use_cpu": not cuda}


def available_memory() -> tuple[int, str]:
    """Bytes free for training on this process's device, and what they are. With several processes it is the
    device's total memory (a fair share of the RAM on CPU) instead: free memory differs a little from rank to
    rank, and ranks that chose different micro-batches would wait for each other forever."""
    import torch

    shared = log.world_size() > 1
    if torch.cuda.is_available():
        device = int(os.environ.get("LOCAL_RANK", 0))
        free, total = torch.cuda.mem_get_info(device)
        name = torch.cuda.get_device_name(device)
        return (int(0.9 * total), f"of {name}'s total") if shared else (free, f"free on {name}")
    try:
        with open("/proc/meminfo") as handle:
            info = {key: int(value.split()[0]) * 1024 for key, value in (line.split(":", 1) for line in handle)}
    except (OSError, ValueError):
        info = {"MemAvailable": os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")}
    if shared and "MemTotal" in info:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", log.world_size()))
        return info["MemTotal"] // (2 * local), "RAM (half the total, shared by the local processes)"
    return info["MemAvailable"], "available RAM"


def _layer_activation_bytes(model, act_bytes: int) -> tuple[int, int, int]:
    """(bytes per token of one layer's activations, hidden size, layers)."""
    text = model.config.get_text_config()
    hidden, layers = text.hidden_size, text.num_hidden_layers
    mlp = getattr(text, "intermediate_size", None) or 4 * hidden
    return (10 * hidden + 5 * mlp) * act_bytes, hidden, layers


def estimate_bytes(model, tokens: int, checkpointing: bool, act_bytes: int, trainable_fraction: float | None,
                   weights_resident: bool, extra_weights: int = 0) -> int:
    """Peak training memory of one micro-batch of `tokens` tokens (see the module docstring)."""
    one_layer, hidden, layers = _layer_activation_bytes(model, act_bytes)
    per_token = layers * 2 * hidden * act_bytes + one_layer if checkpointing else layers * one_layer
    params = list(model.parameters())
    if trainable_fraction is None:  # full fine-tuning: every parameter that requires a gradient
        trainable = sum(p.numel() * max(p.element_size(), act_bytes) for p in params if p.requires_grad)
    else:  # an adapter TRL adds later: a small share of the weights, kept in fp32
        trainable = int(trainable_fraction * sum(p.numel() for p in params) * 4)
    weights = 0 if weights_resident else model.get_memory_footprint()
    return tokens * per_token + 3 * trainable + weights + extra_weights


# ----------------------------------------------------------------------------------------------------------
# Decisions.


def _optimizer(choice: str) -> tuple[str, str]:
    import torch

    if choice != "auto":
        return choice, "set"
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    if (major, minor) >= (2, 8):
        return "adamw_torch_fused", "fused AdamW: one kernel for all parameters (CUDA and CPU)"
    return "adamw_torch", f"torch {torch.__version__} has no fused AdamW on every device"


def _liger(choice) -> tuple[bool, str]:
    import torch

    installed = importlib.util.find_spec("liger_kernel") is not None
    if choice is True and not installed:
        raise PosttrainError("train.liger_kernels: true needs liger-kernel: pip install 'posttrain[speed]'")
    if choice != "auto":
        return bool(choice), "set"
    if not installed:
        return False, "liger-kernel not installed (pip install 'posttrain[speed]')"
    if not torch.cuda.is_available():
        return False, "Liger's Triton kernels need a CUDA GPU"
    return True, "liger-kernel installed: fused RMSNorm/SwiGLU/RoPE kernels"


def fastest_attention(model_cfg):
    """model.attn_implementation resolved (and printed): flash-attn when installed and the model runs in bf16/fp16
    on CUDA, else transformers' default, sdpa. Both keep packed documents isolated."""
    import dataclasses

    import torch

    from posttrain.models import torch_dtype

    chosen, why = model_cfg, "flash-attn not installed; a block-diagonal mask from position_ids isolates documents"
    if model_cfg.attn_implementation:
        why = "set"
    elif importlib.util.find_spec("flash_attn") is None:
        pass
    elif torch.cuda.is_available() and torch_dtype(model_cfg.dtype) in (torch.bfloat16, torch.float16):
        chosen = dataclasses.replace(model_cfg, attn_implementation="flash_attention_2")
        why = "flash-attn installed: varlen kernels over the packed documents"
    else:
        why = "flash-attn needs a CUDA GPU and a bf16/fp16 model"
    log.info(f"speed: attention {chosen.attn_implementation or 'sdpa'}: {why} [model.attn_implementation]")
    return chosen


def micro_batches(train, rows_per_step: int, fits) -> tuple[int, int, bool, str]:
    """(micro-batch rows, accumulation, checkpointing, why) for a step of `rows_per_step` rows per device;
    `fits(rows, checkpointing)` says whether a micro-batch of that many rows fits in memory."""
    fixed_accum = train.grad_accum != "auto"
    accum = train.grad_accum if fixed_accum else 1
    micro = max(1, math.ceil(rows_per_step / accum))
    forced = train.gradient_checkpointing if train.gradient_checkpointing != "auto" else None
    while not fixed_accum and micro > 1 and not fits(micro, bool(forced)):
        micro = math.ceil(micro / 2)  # the same step in more, smaller micro-batches: cheaper than checkpointing
        accum = math.ceil(rows_per_step / micro)
    if forced is not None:
        return micro, accum, forced, "set"
    if fits(micro, False):
        return micro, accum, False, "fits without it"
    return micro, accum, True, "the step would not fit otherwise"


def _memory(train) -> tuple[int, int, str, bool]:
    """(bytes per activation value, bytes free, what they are, whether the loaded weights already count as used)."""
    import torch


    flags = precision_flags(train.precision)
    free, where = available_memory()
    return 2 if flags["bf16"] or flags["fp16"] else 4, free, where, not torch.cuda.is_available()


def plan(train, model, rows_per_step: int, tokens_per_row: int, unit: str, budget_line: str,
         trainable_fraction: float | None = None, extra_weights: int = 0) -> SpeedPlan:
    """Micro-batch, accumulation, checkpointing, optimizer and Liger for a step of `rows_per_step` rows (packed
    rows, examples or pairs) per device, each row at most `tokens_per_row` tokens."""
    act_bytes, free, where, resident = _memory(train)

    def need(rows, checkpointing):
        return estimate_bytes(model, rows * tokens_per_row, checkpointing, act_bytes, trainable_fraction, resident,
                              extra_weights)

    def fits(rows, checkpointing):
        return need(rows, checkpointing) <= FIT_FRACTION * free

    micro, accum, checkpointing, why = micro_batches(train, rows_per_step, fits)
    optim, optim_why = _optimizer(train.optim)
    liger, liger_why = _liger(train.liger_kernels)
    estimate = need(micro, checkpointing) / GIB
    lines = [budget_line,
             f"micro-batch {micro} {unit} x {accum} accumulation step(s) [train.grad_accum]",
             f"activation checkpointing {'on' if checkpointing else 'off'}: {why}; est. {estimate:.1f} GiB of "
             f"{free / GIB:.1f} GiB {where} [train.gradient_checkpointing]",
             f"optimizer {optim}: {optim_why} [train.optim]",
             f"Liger kernels {'on' if liger else 'off'}: {liger_why} [train.liger_kernels]",
             f"torch.compile per decoder layer {'on (the first step compiles one layer)' if train.compile else 'off'}"
             " [train.compile]"]
    if not fits(micro, checkpointing):
        lines.append(f"{FIT_WARNING}{estimate:.1f} GiB may not fit in {free / GIB:.1f} GiB; lower "
                     "train.batch_size or train.max_length, or set train.gradient_checkpointing: true")
    return SpeedPlan(micro, accum, checkpointing, optim, liger, lines, compile_layers=train.compile)


def plan_sft(cfg, model, examples: list[dict], packed) -> SpeedPlan:
    """SFT-style data: packed rows sized to the step's token budget, or padded examples."""
    train = cfg.train
    accum = 1 if train.grad_accum == "auto" else train.grad_accum
    fraction = 0.02 if cfg.adapter is not None else None
    if packed is None:
        longest = max(len(e["input_ids"]) for e in examples)
        line = f"no packing: {train.batch_size} x {accum} examples per step, padded to the longest [train.packing]"
        return plan(train, model, train.batch_size * accum, longest, "examples", line, fraction)
    mean_example = packed.tokens / packed.documents
    budget = train.tokens_per_step or train.batch_size * accum * log.world_size() * mean_example
    rows = max(1, round(budget / log.world_size() / packed.mean_row_tokens))
    source = "train.tokens_per_step" if train.tokens_per_step else (
        f"{train.batch_size} x {accum} examples x {mean_example:.0f} mean tokens")
    line = (f"packing {packed.summary()} [train.packing]; step budget {budget:,.0f} tokens ({source}) -> "
            f"{rows} rows per device [train.tokens_per_step]")
    return plan(train, model, rows, packed.capacity, "packed rows", line, fraction)


def plan_dpo(cfg, model, pairs: list[dict], reference_in_memory: bool) -> SpeedPlan:
    """DPO: batch_size pairs per step; a pair is two sequences (chosen, rejected) sharing the prompt."""
    train = cfg.train
    accum = 1 if train.grad_accum == "auto" else train.grad_accum
    longest = max(len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs)
    layout = ("chosen and rejected packed into rows without padding" if train.packing
              else "chosen and rejected padded to the longest")
    line = f"{train.batch_size} x {accum} pairs per step; {layout} [train.packing]"
    fraction = 0.02 if cfg.adapter is not None else None
    extra = model.get_memory_footprint() if reference_in_memory and cfg.adapter is None else 0
    result = plan(train, model, train.batch_size * accum, 2 * longest, "pairs", line, fraction, extra)
    if not reference_in_memory:
        result.reference_batch_size, why = reference_batch(train, model, result.batch_size, 2 * train.max_length)
        result.lines.append(f"reference pass: {result.reference_batch_size} pairs per forward ({why}) "
                            "[dpo.precompute_ref]")
    return result


def reference_batch(train, model, micro: int, tokens_per_pair: int) -> tuple[int, str]:
    """Pairs per forward of DPO's reference pass, and why: REFERENCE_BATCH_FACTOR x the training micro-batch,
    halved (not below it) while the weights plus one layer's activations would not fit; under no_grad every
    other layer's activations are already freed. tokens_per_pair bounds a pair's chosen plus rejected tokens."""
    act_bytes, free, _, resident = _memory(train)
    per_token = _layer_activation_bytes(model, act_bytes)[0]
    weights = 0 if resident else model.get_memory_footprint()
    pairs = REFERENCE_BATCH_FACTOR * micro
    while pairs > micro and weights + pairs * tokens_per_pair * per_token > FIT_FRACTION * free:
        pairs = max(micro, pairs // 2)
    if pairs == REFERENCE_BATCH_FACTOR * micro:
        return pairs, f"{REFERENCE_BATCH_FACTOR}x the micro-batch: no gradients or activations are kept"
    return pairs, f"as many as fit, up to {REFERENCE_BATCH_FACTOR}x the micro-batch"


@dataclass
class SFTInputs:
    """What an SFT-style recipe (sft, ternary) hands SFTTrainer, and the speed report for metrics.json."""

    plan: SpeedPlan
    train_dataset: object
    eval_dataset: object | None
    data_collator: PaddingFreeCollator | None
    speed: dict


def sft_inputs(cfg, model, tokenizer, train_set, eval_set) -> SFTInputs:
    """The documents packed into rows of max_length (unless train.packing is off), the speed plan for them
    (printed), and evaluation left unpacked so eval_loss means what it means without packing."""
    from datasets import Dataset

    packed = pack_examples(train_set.examples, cfg.train.max_length, cfg.train.seed) if cfg.train.packing else None
    plan = plan_sft(cfg, model, train_set.examples, packed)
    plan.report()
    if plan.compile_layers:
        compile_decoder_layers(model)
    return SFTInputs(
        plan=plan,
        train_dataset=Dataset.from_list(packed.rows if packed else train_set.examples),
        eval_dataset=Dataset.from_list(eval_set.examples) if eval_set else None,
        data_collator=PaddingFreeCollator(tokenizer.pad_token_id, flat_rows_needed(model)) if packed else None,
        speed={**plan.as_dict(), **(packed.stats if packed else {})},
    )
