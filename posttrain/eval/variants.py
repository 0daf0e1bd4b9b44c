"""MODEL specs (`path` or `name=path`) -> loaded model + tokenizer, whatever kind of checkpoint it is.

Kinds: a full HF model folder; a PEFT LoRA/QLoRA adapter folder (base from adapter_config.json's
`base_model_name_or_path`, then PeftModel on top); a ternary export in transformers' BitNet format (plain
`from_pretrained` reads its quantization_config); a hub model id; or `tiny:llama` / `tiny:qwen2` (the offline
tiny model). Paths are checked by posttrain.models.resolve_path, the same checks as a run config's
`model.name_or_path`. Loading is safetensors-only and never runs remote code: an evaluation must not execute
code shipped inside the checkpoint it is judging.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain.errors import PosttrainError
from posttrain.models import adapter_base, hub_error, is_adapter_dir, is_ternary_dir, resolve_path, torch_dtype


@dataclass
class Variant:
    """One loaded model under evaluation."""

    name: str
    source: str  # resolved folder or hub id
    kind: str  # full | adapter | bitnet | hub
    model: torch.nn.Module
    tokenizer: object
    load_seconds: float
    weight_files: list[Path] = field(default_factory=list)  # every safetensors file needed to run it
    trainable_params: int | None = None  # adapter parameters for PEFT variants, all parameters otherwise
    base_source: str | None = None  # an adapter's base model (folder or hub id)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def split_model_spec(spec: str) -> tuple[str, str]:
    """'name=path' -> (name, path); 'path' -> ('', path). A '/' before the '=' means the '=' is in a path."""
    head, sep, tail = spec.partition("=")
    if sep and head and "/" not in head and tail:
        return head, tail
    return "", spec


def variant_names(specs: list[str]) -> list[str]:
    """Display names: the explicit `name=`, else the folder's (or hub id's) last component; must be unique."""
    names = []
    for spec in specs:
        name, value = split_model_spec(spec)
        names.append(name or Path(value.rstrip("/")).name or value)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PosttrainError(f"two models would both be called {dupes[0]!r}: name them, e.g. base=PATH sft=PATH")
    return names


def check_model_specs(specs: list[str], names: list[str] | None = None) -> None:
    """Fail before any model is loaded on whatever would stop one of them from loading later: a missing path,
    a folder without safetensors weights, an adapter without its weights or whose base is missing or itself an
    adapter. A mistake in the last model must not surface after the first ones took minutes. Hub ids can only
    be checked by loading. The error names the model (`names`, else the display names)."""
    names = names or variant_names(specs)
    for spec, name in zip(specs, names):
        try:
            check_source(*classify(split_model_spec(spec)[1]))
        except PosttrainError as err:
            raise PosttrainError(f"model {name!r}: {err}") from None


def check_source(kind: str, source: str) -> None:
    """The file checks of a classified model that need no loading (see check_model_specs)."""
    if kind == "adapter":
        check_source(*adapter_base_source(Path(source)))
    elif kind != "hub" and not any(Path(source).glob("*.safetensors")):
        raise PosttrainError(f"{source} has no *.safetensors weights: posttrain loads safetensors only")


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_variant(spec: str, device: str = "auto", dtype: str = "auto", name: str | None = None) -> Variant:
    """Load a MODEL spec onto `device`; user mistakes (missing path, .bin-only folder...) raise PosttrainError."""
    _, value = split_model_spec(spec)
    name = name or variant_names([spec])[0]
    start = time.perf_counter()
    kind, source = classify(value)
    base_source = None
    if kind == "adapter":
        model, tokenizer, files, trainable, base_source = _load_adapter(Path(source), dtype)
    else:
        model, tokenizer, files = _load_full(source, dtype, is_hub=kind == "hub")
        trainable = count_parameters(model)
    model = model.to(pick_device(device)).eval()
    if tokenizer.pad_token is None:
        # Batched scoring pads; the pad id never reaches a scored position, so eos is a safe stand-in.
        tokenizer.pad_token = tokenizer.eos_token
    seconds = time.perf_counter() - start
    return Variant(name, source, kind, model, tokenizer, seconds, files, trainable, base_source)


def classify(value: str) -> tuple[str, str]:
    """(kind, source): full | bitnet | adapter (absolute folder) or hub (hub id). posttrain.models.resolve_path
    does the path checks (missing path, a file, pickle-only weights) and builds `tiny:` models."""
    resolved = resolve_path(value)
    path = Path(resolved)
    if not path.is_dir():
        return "hub", resolved
    if is_adapter_dir(path):
        return "adapter", str(path.resolve())
    return ("bitnet" if is_ternary_dir(path) else "full"), str(path.resolve())


def _load_full(source: str, dtype: str, is_hub: bool):
    # Plain from_pretrained, not posttrain.models.load_model: eval loads in the checkpoint's dtype (auto), keeps
    # the tokenizer as shipped (no added pad token or default chat template) and reads a BitNet export with
    # transformers' own BitLinear, so the numbers are those of the checkpoint as others would run it.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_dtype = "auto" if dtype == "auto" else torch_dtype(dtype)  # auto: the checkpoint's, as lm-eval's HFLM
    kwargs = dict(use_safetensors=True, trust_remote_code=False, dtype=load_dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        if not is_hub:
            raise
        raise hub_error(source, exc) from None
    return model, tokenizer, _weight_files(source, is_hub)


def _weight_files(source: str, is_hub: bool) -> list[Path]:
    if not is_hub:
        return sorted(Path(source).glob("*.safetensors"))
    try:  # the files from_pretrained just fetched are in the local hub cache
        from huggingface_hub import snapshot_download

        folder = snapshot_download(source, local_files_only=True, allow_patterns=["*.safetensors"])
        return sorted(Path(folder).glob("*.safetensors"))
    except Exception:  # noqa: BLE001 -- sizes are optional; a cache layout we do not know just leaves them out
        return []


def adapter_base_source(adapter_dir: Path) -> tuple[str, str]:
    """(kind, source) of an adapter's base, as classify gives it; fails if the adapter's weights are not
    safetensors or its base is missing or itself an adapter. Where a relative base is looked for:
    posttrain.models.adapter_base."""
    base_ref = adapter_base(adapter_dir)
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise PosttrainError(f"{adapter_dir} has no adapter_model.safetensors: posttrain loads safetensors only")
    kind, source = classify(base_ref)
    if kind == "adapter":
        raise PosttrainError(
            f"{adapter_dir}: base_model_name_or_path {base_ref} is itself an adapter; point it at the full base model"
        )
    return kind, source


def _load_adapter(adapter_dir: Path, dtype: str):
    # The adapter stays a PeftModel (not merged, unlike posttrain.models.load_model): its outputs are the
    # adapter's as trained, and its own parameters can be counted.
    from peft import PeftModel
    from transformers import AutoTokenizer

    kind, source = adapter_base_source(adapter_dir)
    base, base_tokenizer, files = _load_full(source, dtype, is_hub=kind == "hub")
    attach = PeftModel.from_pretrained
    if kind == "bitnet":  # LoRA on a ternary base: the same packed function, in a layer peft can wrap
        from posttrain.ternary.lora import load_adapter, to_packed_layers

        to_packed_layers(base)
        attach = load_adapter  # registers the quantizer-aware LoRA layer of a ternary_merge adapter
    base_ids = {id(p) for p in base.parameters()}
    model = attach(base, str(adapter_dir))
    trainable = sum(p.numel() for p in model.parameters() if id(p) not in base_ids)
    has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir)) if has_tokenizer else base_tokenizer
    return model, tokenizer, [*files, adapter_dir / "adapter_model.safetensors"], trainable, source


def count_parameters(model: torch.nn.Module) -> int:
    """Logical weights: packed low-bit weights (BitNet's uint8 buffers hold 4 ternary values) count unpacked."""
    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and not isinstance(weight, torch.nn.Parameter):
            if hasattr(module, "in_features") and hasattr(module, "out_features"):
                total += module.in_features * module.out_features
    return total
