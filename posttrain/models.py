"""Loading and saving Hugging Face models, tokenizers and adapters with secure defaults.

- safetensors only unless `model.allow_pickle: true`; `trust_remote_code` off unless set.
- A missing local path and an unreachable hub name fail with one line saying which it was.
- pad must differ from eos (the end-of-turn/EOS token is supervised): an existing pad-like special token is
  reused; only if there is none is `<|pad|>` added (and the embeddings resized).
- A tokenizer without a chat template gets DEFAULT_CHAT_TEMPLATE (ChatML markup ending each turn with the
  model's EOS, so generation stops by itself); it is saved with every output.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
from pathlib import Path

from posttrain.config.schema import AdapterConfig, ModelConfig
from posttrain.errors import PosttrainError
from posttrain.files import atomic_dir, check_output_folder, write_json_atomic

DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.00.pth")


def resolve_path(name_or_path: str, allow_pickle: bool = False) -> str:
    """A local folder, a `tiny:` model (built on first use) or a hub name; fails clearly on a bad local path."""
    if name_or_path.startswith("tiny:"):
        from posttrain.tiny import resolve_tiny_model

        return str(resolve_tiny_model(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise PosttrainError(f"model path {name_or_path!r} is a file; give the model's folder")
        has_safetensors = any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists()
        has_pickle = any((path / name).exists() for name in PICKLE_WEIGHTS)
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise PosttrainError(f"{path} is not a model folder (no config.json or adapter_config.json)")
        if has_pickle and not has_safetensors and not allow_pickle:
            raise PosttrainError(
                f"{path} holds only pickle weights (pytorch_model.bin), which can run code when loaded; convert "
                "them to safetensors, or set model.allow_pickle: true if you trust the source"
            )
        return str(path)
    made_by = _bundled_output_dirs().get(os.path.normpath(name_or_path))
    if made_by or _looks_local(name_or_path):
        hint = f"run `posttrain run {made_by}` first" if made_by else "if it is a run's output, run that config first"
        raise PosttrainError(f"model path {name_or_path!r} does not exist (checked {path.resolve()}); {hint}")
    return name_or_path  # a hub name: transformers resolves it (network or HF cache)


def _looks_local(name: str) -> bool:
    """A name that cannot be a hub repo id (`owner/name`): it fails at once instead of costing a minute of
    hub retries offline. `runs/x` is local when a folder `runs` exists here; `Qwen/Qwen2.5-0.5B` without a
    folder `Qwen` stays a hub name."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        return True
    return "/" in name and Path(name.split("/", 1)[0]).is_dir()


@functools.lru_cache(maxsize=1)
def _bundled_output_dirs() -> dict[str, str]:
    """{output_dir: bundled run config that writes it}, e.g. {"runs/tiny-sft": "tiny/sft"}: a missing model
    path that a bundled config makes is a run not made yet, even before its first folder exists."""
    import yaml

    from posttrain.config.bundled import bundled_configs, configs_dir

    found = {}
    for name in bundled_configs(runnable=True):
        try:
            tree = yaml.safe_load((configs_dir() / name).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):  # a damaged install: the config itself reports it when it is run
            continue
        out = tree.get("output_dir") if isinstance(tree, dict) and tree.get("recipe") != "pipeline" else None
        if isinstance(out, str) and out:
            found.setdefault(os.path.normpath(out), name.removesuffix(".yaml"))
    return found


def _damaged(folder: str, what: str, err: Exception) -> PosttrainError:
    """A local model folder whose files do not load (truncated JSON, damaged weights ...)."""
    why = " ".join((str(err).strip().splitlines() or [""])[0].split())[:300]
    return PosttrainError(f"{folder}: cannot load the {what} ({type(err).__name__}: {why}); a file in the folder is "
                          "damaged or incomplete: re-download or re-save the model")


def hub_error(name: str, err: Exception) -> PosttrainError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(err).lower() or "connect" in str(err).lower()
    why = str(err).splitlines()[0]
    if offline:
        why = "the hub is unreachable (offline?) and it is not in the local HF cache"
    return PosttrainError(f"model {name!r} is not a local folder and loading it from the hub failed: {why}")


def load_tokenizer(cfg: ModelConfig, resolved: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            resolved, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as err:  # ValueError: a damaged JSON file in a local folder
        if Path(resolved).is_dir():
            raise _damaged(resolved, "tokenizer", err) from None
        if not isinstance(err, OSError):
            raise
        raise hub_error(cfg.name_or_path, err) from None
    if not tokenizer.is_fast:
        raise PosttrainError(f"{cfg.name_or_path}: posttrain needs a fast tokenizer (for loss-mask offsets)")
    if cfg.chat_template:
        template = Path(cfg.chat_template).expanduser()
        if template.is_file():
            try:
                tokenizer.chat_template = template.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise PosttrainError(f"model.chat_template: cannot read {str(template)!r} as UTF-8 text "
                                     f"({type(err).__name__}); save the template as UTF-8") from None
        elif "{{" in cfg.chat_template or "{%" in cfg.chat_template:
            tokenizer.chat_template = cfg.chat_template
        else:
            raise PosttrainError(f"model.chat_template: file {cfg.chat_template!r} not found (and it is not an "
                                 "inline Jinja template)")
        from jinja2 import TemplateSyntaxError

        try:  # compile it now, not at the first row
            tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        except TemplateSyntaxError as err:
            raise PosttrainError(f"model.chat_template: invalid Jinja template, line {err.lineno}: "
                                 f"{' '.join(str(err.message).split())}") from None
    elif not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.eos_token is None:
        raise PosttrainError(f"{cfg.name_or_path}: the tokenizer has no eos_token; set one in tokenizer_config.json")
    _ensure_distinct_pad(tokenizer)
    return tokenizer


def _ensure_distinct_pad(tokenizer) -> None:
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    candidates = [t.content for t in tokenizer.added_tokens_decoder.values()
                  if "pad" in t.content.lower() and t.content != tokenizer.eos_token]
    if candidates:  # e.g. Llama 3's <|finetune_right_pad_id|>, Qwen's <|vision_pad|>
        candidates.sort(key=lambda c: ("finetune" not in c, len(c)))
        tokenizer.pad_token = candidates[0]
    elif tokenizer.unk_token is not None and tokenizer.unk_token != tokenizer.eos_token:
        tokenizer.pad_token = tokenizer.unk_token
    else:
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})


def torch_dtype(name: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def load_model(cfg: ModelConfig, resolved: str, tokenizer=None, adapter: AdapterConfig | None = None):
    """The causal LM for training or inference; 4-bit (bitsandbytes) when adapter.method is qlora.

    `resolved` may be a LoRA adapter folder (e.g. an SFT run's output): its base is loaded and the adapter
    merged in, so the next stage (DPO, a new adapter) starts from the adapted model.
    """
    from transformers import AutoModelForCausalLM

    if is_adapter_dir(resolved):
        return _load_merged_adapter(cfg, resolved, tokenizer, adapter)
    if adapter is not None and (adapter.ternary_merge or is_ternary_dir(resolved)):
        return _packed_ternary_base(cfg, resolved, adapter)
    if is_ternary_dir(resolved):  # a posttrain/BitNet export: trainable BitLinear layers, weights = ternary x scale
        from posttrain.ternary import load_ternary

        return load_ternary(resolved, torch_dtype(cfg.dtype))
    kwargs = dict(
        revision=cfg.revision,
        dtype=torch_dtype(cfg.dtype),
        trust_remote_code=cfg.trust_remote_code,
        use_safetensors=None if cfg.allow_pickle else True,
    )
    if cfg.attn_implementation:
        if cfg.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise PosttrainError("model.attn_implementation: flash_attention_2 needs flash-attn (pip install "
                                 "flash-attn, on a CUDA GPU); use sdpa otherwise")
        kwargs["attn_implementation"] = cfg.attn_implementation
    if adapter is not None and adapter.method == "qlora":
        kwargs["quantization_config"] = qlora_quantization(adapter, kwargs["dtype"])
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:  # ValueError: a damaged JSON file in a local folder
        if Path(resolved).is_dir():
            raise _damaged(resolved, "model", err) from None
        if not isinstance(err, OSError):
            raise
        raise hub_error(cfg.name_or_path, err) from None
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))  # only when a pad token had to be added
    if tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _packed_ternary_base(cfg: ModelConfig, resolved: str, adapter: AdapterConfig):
    """A ternary (BitNet) folder for LoRA: its linears stay packed in 2 bits and frozen (posttrain.ternary.lora)."""
    if not is_ternary_dir(resolved):
        raise PosttrainError(f"adapter.ternary_merge needs a ternary base model (a BitNet folder, e.g. the output of a "
                             f"recipe: ternary run or posttrain quantize); {cfg.name_or_path} is not one")
    if adapter.method == "qlora" or adapter.use_dora:
        what = "method: qlora" if adapter.method == "qlora" else "use_dora"
        raise PosttrainError(f"adapter.{what} does not apply to the ternary base {cfg.name_or_path}: it stays packed "
                             "in 2 bits already; use adapter.method: lora")
    from posttrain.ternary.lora import load_packed_ternary

    return load_packed_ternary(resolved, torch_dtype(cfg.dtype))


def _load_merged_adapter(cfg: ModelConfig, adapter_dir: str, tokenizer, adapter: AdapterConfig | None):
    from peft import PeftModel

    if adapter is not None and adapter.method == "qlora":
        raise PosttrainError(f"{adapter_dir} is a LoRA adapter; merge it first (posttrain merge {adapter_dir} "
                             "--out DIR) and start QLoRA from the merged folder")
    base_name = adapter_base(adapter_dir)
    base_path = resolve_path(base_name, cfg.allow_pickle)
    if is_ternary_dir(base_path):  # merged inside the quantizer: a ternary model again (BitLinear layers)
        from posttrain.ternary.lora import check_mergeable, load_adapter, load_packed_ternary, merged_ternary_model

        check_mergeable(adapter_dir)
        base = load_packed_ternary(base_path, torch_dtype(cfg.dtype))
        return merged_ternary_model(load_adapter(base, adapter_dir), adapter_dir)
    base_cfg = dataclasses.replace(cfg, name_or_path=base_name)
    base = load_model(base_cfg, base_path, tokenizer)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def qlora_quantization(adapter: AdapterConfig, compute_dtype):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise PosttrainError("adapter.method: qlora needs bitsandbytes: pip install 'posttrain[qlora]'") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=adapter.quant_type,
        bnb_4bit_use_double_quant=adapter.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype,  # lets FSDP shard the 4-bit weights like the rest
    )


def lora_config(adapter: AdapterConfig | None, model=None):
    """peft LoraConfig for the adapter section (None: full fine-tuning); target names checked against model."""
    if adapter is None:
        return None
    from peft import LoraConfig

    targets = adapter.target_modules
    if model is not None and targets != ["all-linear"]:
        _check_targets(targets, model)
    config = LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        use_rslora=adapter.use_rslora,
        use_dora=adapter.use_dora,
        task_type="CAUSAL_LM",
    )
    if model is not None and any(type(m).__name__ == "PackedTernaryLinear" for m in model.modules()):
        from posttrain.ternary.lora import lora_config_for

        return lora_config_for(config, adapter.ternary_merge)  # the quantizer-aware layer, with ternary_merge
    return config


def _check_targets(targets: list[str], model) -> None:
    """Each target names a layer LoRA can wrap (a linear, embedding or convolution), checked before training."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    wrappable = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D)
    kinds: dict[str, set[str]] = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        kinds.setdefault(leaf, set()).add("ok" if isinstance(module, wrappable) else type(module).__name__)
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    missing = [t for t in targets if t not in kinds]
    if missing:
        raise PosttrainError(f"adapter.target_modules {missing} not in the model; its linear layers: {linear} "
                             "(or use all-linear)")
    other = {t: sorted(kinds[t] - {"ok"}) for t in targets if "ok" not in kinds[t]}
    if other:
        found = ", ".join(f"{t} is {'/'.join(v)}" for t, v in other.items())
        raise PosttrainError(f"adapter.target_modules {list(other)} are not linear layers of the model ({found}); "
                             f"LoRA wraps linear layers: {linear} (or use all-linear)")


def is_ternary_dir(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # a damaged config.json: loading the model reports it
        return False
    quantization = (settings.get("quantization_config") if isinstance(settings, dict) else None) or {}
    return isinstance(quantization, dict) and quantization.get("quant_method") == "bitnet"


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base(adapter_dir: str | Path) -> str:
    """The adapter's base_model_name_or_path, with a relative local path found from any current folder.

    peft records the base as it was given at training time, often relative to the folder training ran in
    (`runs/demo/base`), which is unknown later. Where that path is no model folder from the current folder, it
    is looked up relative to the adapter folder and then each folder above it (`/proj/runs/demo/lora` trained
    in `/proj` finds `/proj/runs/demo/base`), and the nearest model folder is returned as an absolute path.
    The current folder comes first because the path was written relative to the folder a run started in, and
    runs are usually started from the same project folder. A hub name matches no folder and comes back
    unchanged; a local-looking path found nowhere is an error naming the adapter.
    """
    try:
        config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise _damaged(str(adapter_dir), "adapter_config.json", err) from None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not base or not isinstance(base, str):
        raise PosttrainError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path; add it")
    path = Path(base).expanduser()
    if base.startswith("tiny:") or path.is_absolute() or _is_model_folder(path):
        return base
    found = next((c for c in _around(Path(adapter_dir).resolve(), path) if _is_model_folder(c)), None)
    if found is not None:
        return str(found)
    if path.exists():
        return base  # something else is there: resolve_path says what is wrong with it
    try:
        resolve_path(base)  # a hub name passes; a local-looking path fails
    except PosttrainError:
        raise PosttrainError(
            f"{adapter_dir}: its base model {base!r} (adapter_config.json's base_model_name_or_path) is not found "
            "from the current folder nor from the adapter's folder or any folder above it; set it to the base "
            "model's absolute path"
        ) from None
    return base


def _around(adapter_dir: Path, relative: Path):
    return (folder / relative for folder in (adapter_dir, *adapter_dir.parents))


def _is_model_folder(path: Path) -> bool:
    # Model folders only: a same-named folder of something else (data called `base`) nearer the adapter must
    # not shadow the real base further up.
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def absolute_adapter_base(folder: str | Path) -> None:
    """Rewrite a just-saved adapter's base_model_name_or_path as an absolute path when it names a local folder.

    The adapter then loads from any current folder. Call it right after saving, from the folder the run
    started in (a relative base is relative to that); hub names, `tiny:` names, absolute paths and folders
    without adapter_config.json are left as they are. Write from the main process only.
    """
    file = Path(folder) / "adapter_config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # no adapter here (a full model), or damaged: loading it reports that
        return
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(base, str) or base.startswith("tiny:"):
        return
    path = Path(base).expanduser()
    if path.is_absolute() or not path.is_dir():
        return
    config["base_model_name_or_path"] = str(path.resolve())
    write_json_atomic(file, config)


def record_ternary_adapter(folder: str | Path, adapter: AdapterConfig | None, model_path: str) -> None:
    """An adapter trained on a packed ternary base says so in its folder, and whether it trained through the
    quantizer (ternary_merge): loading it registers the matching LoRA layer (posttrain.ternary.lora)."""
    if adapter is None or not is_adapter_dir(folder) or not is_ternary_dir(model_path):
        return
    from posttrain.ternary.lora import write_adapter_kind

    write_adapter_kind(folder, adapter.ternary_merge)


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, dtype: str = "float32",
                  allow_pickle: bool = False, trust_remote_code: bool = False, overwrite: bool = False,
                  fmt: str = "hf") -> Path:
    """LoRA adapter + its base -> one full model folder (written atomically). A QLoRA adapter is merged
    into the base loaded in `dtype`, not in 4-bit (merging into 4-bit weights would round them).

    An adapter on a ternary base (trained with adapter.ternary_merge) merges inside the quantizer: the output is
    ternary again, in transformers' BitNet format (fmt hf) or as llama.cpp GGUF (fmt gguf-tq1 / gguf-tq2,
    out_dir/model-tq*_0.gguf)."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    check_output_folder(out_dir, "--out", overwrite)
    if not adapter_dir.is_dir():
        raise PosttrainError(f"adapter folder {adapter_dir} does not exist")
    if not is_adapter_dir(adapter_dir):
        raise PosttrainError(f"{adapter_dir}: not a LoRA adapter folder (no adapter_config.json)")
    cfg = ModelConfig(name_or_path=str(adapter_dir), dtype=dtype, allow_pickle=allow_pickle,
                      trust_remote_code=trust_remote_code)
    has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
    tokenizer_source = str(adapter_dir) if has_tokenizer else resolve_path(adapter_base(adapter_dir), allow_pickle)
    tokenizer = load_tokenizer(dataclasses.replace(cfg, name_or_path=tokenizer_source), tokenizer_source)
    if fmt != "hf" or is_ternary_dir(resolve_path(adapter_base(adapter_dir), allow_pickle)):
        return _merge_ternary(cfg, adapter_dir, out_dir, tokenizer, fmt)
    merged = load_model(cfg, str(adapter_dir), tokenizer)
    with atomic_dir(out_dir) as staging:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return Path(out_dir)


def _merge_ternary(cfg: ModelConfig, adapter_dir: Path, out_dir: Path, tokenizer, fmt: str) -> Path:
    from posttrain.ternary.export.gguf import GGUF_FORMATS, check_gguf_options, export_gguf
    from posttrain.ternary.export.hf import export_bitnet

    if fmt != "hf":
        check_gguf_options(fmt, "f16")  # an unknown format or no gguf package fails before loading
    if not is_ternary_dir(resolve_path(adapter_base(adapter_dir), cfg.allow_pickle)):
        raise PosttrainError(f"--format {fmt} writes a ternary model: {adapter_dir}'s base is not ternary; "
                             f"use --format hf (formats: hf, {', '.join(GGUF_FORMATS)})")
    merged = load_model(cfg, str(adapter_dir), tokenizer)  # ternary again: Q(W + BA) per layer
    if fmt == "hf":
        return export_bitnet(merged, tokenizer, out_dir, overwrite=True)
    return export_gguf(merged, tokenizer, out_dir, fmt, overwrite=True)
